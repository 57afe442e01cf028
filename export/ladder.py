"""The precision ladder's low rungs: a low-bit copy of every expert, beside the expert.

A rung is an expert's two weights quantised to ``bits`` (2, 4 or 8) in the layout of ONNX
Runtime's ``com.microsoft.MatMulNBits`` kernel, so that the runtime can open a session
whose weights are constants (prepacked once at session creation: a 768x3072 int4 expert
ran a token in 0.29 ms against 1.18 ms for float32 weights fed to the shared kernel, one
thread, docs/results/ladder.md). Per weight ``w[K, N]`` (K inputs, N outputs):

- blocks of ``BLOCK`` consecutive inputs per output column (the last block zero-padded);
- symmetric: ``q = clip(rint(w / s), -2^(b-1), 2^(b-1) - 1)``, ``s = amax / (2^(b-1) - 1)``
  per block, stored as ``n = q + 2^(b-1)`` (MatMulNBits' default zero point, so none is stored);
- int2 only four levels, ``{-2, -1, 0, 1}·s``: the scale is searched per block instead
  (``SEARCH`` multiples of ±amax, the sign putting the level -2 on the block's heavier tail)
  for the least squared error. On the embedded model's experts that halves the relative RMS
  error of the weights (0.66 -> 0.33 at blocks of 32; an asymmetric float zero point at its
  min/max range gave 0.39 and costs a second float per block; docs/results/ladder.md);
- ``q[N, K/BLOCK, BLOCK·b/8]`` uint8 (int4: two inputs a byte, the lower one in the low
  nibble; int2: four, lowest bits first), ``scale[N, K/BLOCK]`` float32 (the type of the
  activations the kernel takes; int2's may be negative).

The expert is Switch's FFN, ``y = act(x @ wi) @ wo`` with ``wi[D, F]``, or, with
``act="swiglu"`` (decoder-only families), ``wi[D, 2F]`` = gate | up (gate first) and
``y = (silu(x @ wi[:, :F]) * (x @ wi[:, F:])) @ wo``; ``wo[F, D]`` in both. ``d_ff`` is F.

Files per rung: ``experts/NAME.RUNG.bin`` for every expert (wi, wi_scale, wo, wo_scale, each
at a 4 KiB boundary), one session template ``experts/rung.RUNG.onnx`` whose initializers
point at the placeholder ``RUNG_DATA`` (the runtime hands ONNX Runtime the bytes it read,
in memory), and ``dense/rung_kernel.RUNG.onnx``, the same computation in standard ONNX ops
with the weights as inputs, for providers without MatMulNBits.

The rung is lossy; its cost is measured (docs/results/ladder.md), not assumed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import helper

from swapmoe_edge.core.errors import ExportError

from . import quant
from .builder import F32, MS, OPSET_INT4, U8, BuiltGraph, GraphBuilder, external_tensor, point_at
from .expert_check import activation

BLOCK = 32  # the default; export's --ladder-block (and `swapmoe ladder add --block`) may choose 16-128
BLOCKS = (16, 32, 64, 128)
RUNGS = {"int2": 2, "int4": 4, "int8": 8}  # rung name -> bits (ORT 1.32's MatMulNBits refuses 3)
RUNG_DATA = "rung.bin"  # the external-data name the session templates use; never a file on disk
ROLES = ("wi", "wi_scale", "wo", "wo_scale")
# A rung must be below the artifact's own expert type: bytes per weight, roughly.
_WIDTH = {"float32": 32, "float16": 16, "int8": 8, "int4": 4, "int2": 2}
# MatMulNBits' accuracy level in the session templates. 4 quantises the activations to int8
# per block and runs int8 dot products: at 768x3072, one thread, an int4 call of 2-8 tokens
# took 0.17-0.46 ms against 1.0-1.4 ms at level 0 or 1 (prefill routes a few tokens to each of
# many experts), one token 0.14 against 0.32 ms; int2 and int8 have no fast kernel below 4
# (int2 at level 1: 40 ms a token; at 128x512, level 0: 0.2 ms against 0.01). Its costs: the
# activations' rounding (~0.7% of an expert's output) and memory (a level-4 session packs a
# 768x3072 int4 copy into 1.42x its bytes; a 128x512 one +33 KB). So int4 copies of at most
# SMALL_COPY bytes keep level 0 (their calls take ~10-40 us either way, and the embedded
# model's ladder at 33% held 50 copies at level 0 against 44 at 4), the rest get level 4
# (scripts/bench_rung_prefill.py, docs/results/ladder.md).
ACCURACY_LEVEL = 4
SMALL_COPY = 1 << 20
ACTIVATION_ROUNDING = 0.05  # the export check's bound on a level-4 template against float (measured ~0.01)
SEARCH = np.linspace(0.2, 1.2, 41)  # int2: candidate scales, as multiples of the block's amax


def wi_columns(d_ff: int, act: str) -> int:
    """N of the expert's first weight: F, or 2F for SwiGLU's gate | up."""
    return 2 * d_ff if act == "swiglu" else d_ff


def quantize(w: np.ndarray, bits: int, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """w[K, N] float -> (q[N, ceil(K/block), block*bits/8] uint8, scale[N, ceil(K/block)] float32);
    int2's scale is searched per block (_search_scale)."""
    return quant.quantize_nbits(w, bits, block, _search_scale if bits == 2 else None)


def _search_scale(g: np.ndarray, amax: np.ndarray, bits: int) -> np.ndarray:
    """Per block of g[N, K/B, B], the scale among ±SEARCH·amax/qmax with the least squared error."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    best = np.full(amax.shape, np.inf)
    scale = (amax / hi).astype(np.float32)
    for sign in (1.0, -1.0):
        for c in SEARCH:
            s = (sign * c / hi * amax).astype(np.float32)
            safe = np.where(s == 0, 1.0, s)[..., None]
            err = np.square(g - np.clip(np.rint(g / safe), lo, hi) * safe).sum(axis=-1)
            better = err < best
            best[better], scale[better] = err[better], s[better]
    return scale


def dequantize(q: np.ndarray, scale: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The float32 w[K, N] a rung stands for: (n - 2^(b-1)) * scale per block."""
    return quant.dequantize_nbits(q, scale, bits, k)


def rung_error(rung: str, expert_dtype: str) -> str | None:
    """Why ``rung`` cannot sit below experts of ``expert_dtype``, or None."""
    if rung not in RUNGS:
        return f"unknown rung {rung!r}; use one of {', '.join(RUNGS)}"
    if _WIDTH[rung] >= _WIDTH[expert_dtype]:
        return f"a {rung} rung is not below the artifact's {expert_dtype} experts"
    return None


def rung_arrays(wi_t: np.ndarray, wo_t: np.ndarray, rung: str, block: int = BLOCK) -> dict[str, np.ndarray]:
    """The four arrays of one expert's rung, from its float weights wi[D, F] and wo[F, D]."""
    bits = RUNGS[rung]
    qi, si = quantize(wi_t, bits, block)
    qo, so = quantize(wo_t, bits, block)
    return {"wi": qi, "wi_scale": si, "wo": qo, "wo_scale": so}


def rung_file(key_name: str, rung: str) -> str:
    return f"experts/{key_name}.{rung}.bin"


def write_rung(writer, key_name: str, scope: str, wi_t: np.ndarray, wo_t: np.ndarray, rung: str, block: int = BLOCK) -> dict:
    """Write one expert's rung (``block`` inputs a scale); return its manifest entry."""
    parts = rung_arrays(wi_t, wo_t, rung, block)
    rel = rung_file(key_name, rung)
    offs = writer.write_blocks(rel, list(parts.values()))
    return {
        "weights_file": rel,
        "nbytes": writer.files[rel]["size"],
        "tensors": [{"name": f"{scope}/{rung}/{role}", "role": role, "offset": off, "shape": list(arr.shape),
                     "dtype": str(arr.dtype)} for (role, arr), off in zip(parts.items(), offs)],
    }


def default_accuracy(rung: str, d_model: int, d_ff: int, act: str) -> int:
    """The accuracy level export gives a rung's template: 0 for small int4 copies, else 4."""
    bits = RUNGS[rung]
    copy = (d_model * wi_columns(d_ff, act) + d_ff * d_model) * bits // 8
    return 0 if rung == "int4" and copy <= SMALL_COPY else ACCURACY_LEVEL


def session_template(d_model: int, d_ff: int, act: str, rung: str, entry: dict, accuracy_level: int | None = None) -> bytes:
    """x[N, D] -> act(x Wi) Wo through two MatMulNBits, weights external in ``RUNG_DATA``
    (``act="swiglu"``: Wi is gate | up, module docstring); ``accuracy_level``: MatMulNBits'
    (None: ``default_accuracy``).

    Every expert's rung file has the same layout, so one template serves them all: the
    runtime opens a session per resident expert with that expert's bytes in memory.
    """
    accuracy_level = default_accuracy(rung, d_model, d_ff, act) if accuracy_level is None else accuracy_level
    built = _nbits_expert(f"/ladder/{rung}", d_model, d_ff, act, RUNGS[rung], entry["tensors"], RUNG_DATA, accuracy_level)
    return built.proto.SerializeToString()


def _nbits_expert(scope: str, d_model: int, d_ff: int, act: str, bits: int, tensors: list[dict], location: str,
                accuracy_level: int) -> BuiltGraph:
    """An expert's two weights as MatMulNBits constants, external in ``location`` at the offsets of
    ``tensors`` (the rung layout's wi, wi_scale, wo, wo_scale entries, each initializer named by
    its entry's ``name``, else its role): x[N, D] -> act(x Wi) Wo."""
    g = GraphBuilder(scope)
    x = g.input("x", F32, ["N", d_model])
    where = {t["role"]: t for t in tensors}
    name = {role: where[role].get("name", role) for role in ROLES}
    block = codes_block(where["wi"]["shape"], bits)
    for role in ROLES:
        t = where[role]
        init = external_tensor(name[role], U8 if t["dtype"] == "uint8" else F32, t["shape"])
        point_at(init, location, t["offset"], int(np.prod(t["shape"])) * (1 if t["dtype"] == "uint8" else 4))
        g.inits.append(init)

    def nbits(a: str, w: str, k: int, n: int, hint: str) -> str:
        out = g._name(hint)
        g.nodes.append(helper.make_node("MatMulNBits", [a, name[w], name[f"{w}_scale"]], [out], name=f"{scope}/{hint}/MatMulNBits",
                                        domain=MS, K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level))
        return out

    hid = _ffn_act(g, nbits(x, "wi", d_model, wi_columns(d_ff, act), "wi"), act, d_ff)
    g.output(nbits(hid, "wo", d_ff, d_model, "wo"), "y", F32, ["N", d_model])
    built = g.model()
    built.proto.opset_import.append(helper.make_opsetid(MS, 1))
    return built


def int4_expert(wi_t: np.ndarray, wo_t: np.ndarray) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """An int4 expert as the artifact stores it (``--expert-dtype int4``: the int4 rung's layout,
    its blocks ``quant.INT4_GROUP`` inputs) and the float32 weights wi[D, F'], wo[F, D] it stands for."""
    assert quant.INT4_GROUP == BLOCK
    parts = rung_arrays(wi_t, wo_t, "int4")
    return parts, (dequantize(parts["wi"], parts["wi_scale"], 4, wi_t.shape[0]),
                   dequantize(parts["wo"], parts["wo_scale"], 4, wo_t.shape[0]))


def int4_expert_graph(scope: str, d_model: int, d_ff: int, act: str, parts: dict, offsets: dict, location: str,
                      accuracy_level: int = quant.INT4_ACCURACY) -> BuiltGraph:
    """An int4 expert's own subgraph: two MatMulNBits at ``accuracy_level`` on its weight block."""
    tensors = [{"name": f"{scope}/{quant.TENSOR_LEAF[r]}", "role": r, "offset": offsets[r], "shape": list(a.shape), "dtype": str(a.dtype)}
               for r, a in parts.items()]
    return _nbits_expert(scope, d_model, d_ff, act, 4, tensors, location, accuracy_level)


def kernel_graph(d_model: int, d_ff: int, act: str, rung: str, block: int = BLOCK) -> BuiltGraph:
    """The rung's computation in standard ONNX ops, weights as inputs (any execution provider).

    Slower than MatMulNBits (it dequantises on every call), but it runs where that kernel does not.
    """
    bits = RUNGS[rung]
    g = GraphBuilder(f"/ladder/{rung}_kernel")
    x = g.input("x", F32, ["N", d_model])

    def dq(w: str, k: int, n: int) -> str:
        kb = -(-k // block)
        q = g.input(w, U8, [n, kb, block * bits // 8])
        s = g.input(f"{w}_scale", F32, [n, kb])
        h = f"{w}/dequant"
        per = 8 // bits
        if per > 1:  # input j of a byte sits in bits j*b .. j*b + b - 1
            mask = g.const(np.uint8((1 << bits) - 1), np.uint8)
            vals = [g.op("BitwiseAnd", [g.op("BitShift", [q, g.const(np.uint8(j * bits), np.uint8)], hint=h, direction="RIGHT")
                                        if j else q, mask], hint=h) for j in range(per - 1)]
            vals.append(g.op("BitShift", [q, g.const(np.uint8(8 - bits), np.uint8)], hint=h, direction="RIGHT"))
            q = g.op("Concat", [g.op("Unsqueeze", [v, g.const([3])], hint=h) for v in vals], hint=h, axis=3)
        full = g.op("Reshape", [q, g.const([n, kb, block])], hint=h)
        val = g.op("Sub", [g.op("Cast", [full], hint=h, to=F32), g.const(np.float32(1 << (bits - 1)), np.float32)], hint=h)
        w_nk = g.op("Mul", [val, g.op("Unsqueeze", [s, g.const([2])], hint=h)], hint=h)  # [N, K/B, B]
        w_nk = g.op("Reshape", [w_nk, g.const([n, kb * block])], hint=h)
        if kb * block != k:
            w_nk = g.op("Slice", [w_nk, g.const([0]), g.const([k]), g.const([1])], hint=h)
        return w_nk  # [N, K]

    hid = _ffn_act(g, g.op("Gemm", [x, dq("wi", d_model, wi_columns(d_ff, act))], hint="wi", transB=1), act, d_ff)
    g.output(g.op("Gemm", [hid, dq("wo", d_ff, d_model)], hint="wo", transB=1), "y", F32, ["N", d_model])
    return g.model(OPSET_INT4)


def ladder_entry(rung: str, template_rel: str, kernel_name: str, level0_rel: str | None = None, block: int = BLOCK) -> dict:
    return {"bits": RUNGS[rung], "block": block, "session_graph": template_rel, "kernel": kernel_name, "data_name": RUNG_DATA,
            **({"session_graph_level0": level0_rel} if level0_rel else {})}


def template_rel(rung: str) -> str:
    return f"experts/rung.{rung}.onnx"


def level0_rel(rung: str) -> str:
    return f"experts/rung.{rung}.a0.onnx"


def write_templates(writer, d_model: int, d_ff: int, act: str, rung: str, entry: dict, accuracy_level: int | None = None,
                    temp_suffix: str = "") -> dict:
    """Write a rung's session template (``accuracy_level``; None: ``default_accuracy``) and, for an
    int4 rung at a level above 0, the same template at level 0 beside it, which the runtime takes when
    the first budget cannot hold every copy at the level-4 session's cost (a level-4 session packs
    an int4 copy into ~1.4x its bytes; model/rungs.py). Returns the rung's manifest entry.
    ``temp_suffix``: write each file under that suffix (the caller renames it into place)."""
    level = default_accuracy(rung, d_model, d_ff, act) if accuracy_level is None else accuracy_level
    writer.write_bytes(template_rel(rung) + temp_suffix, session_template(d_model, d_ff, act, rung, entry, level))
    alt = level0_rel(rung) if level > 0 and rung == "int4" else None  # int2/int8 have no fast kernel below level 4
    if alt:
        writer.write_bytes(alt + temp_suffix, session_template(d_model, d_ff, act, rung, entry, 0))
    return ladder_entry(rung, template_rel(rung), kernel_name(rung), alt, entry_block(entry, rung))


def entry_block(entry: dict, rung: str) -> int:
    """The block size of a rung copy's manifest entry."""
    return codes_block(next(t for t in entry["tensors"] if t["role"] == "wi")["shape"], RUNGS[rung])


def codes_block(shape, bits: int) -> int:
    """The block size of MatMulNBits codes of ``shape`` [N, K/block, block*bits/8]."""
    return shape[2] * 8 // bits


def kernel_name(rung: str) -> str:
    return f"rung_kernel.{rung}"


def check_rung(root, rung: str, info: dict, expert: dict, d_model: int, act: str) -> float:
    """Run one expert's rung through its session templates and its standard-op kernel and
    compare both with the numpy dequantisation; return the larger relative error.

    Export calls this for each rung it writes (a template ONNX Runtime cannot run, or a
    layout mismatch, fails the export instead of the first request on a device).
    """
    e = expert["rungs"][rung]
    blob = np.fromfile(Path(root) / e["weights_file"], dtype=np.uint8)
    parts = {}
    for t in e["tensors"]:
        dt = np.dtype(t["dtype"])
        count = int(np.prod(t["shape"]))
        parts[t["role"]] = blob[t["offset"]: t["offset"] + count * dt.itemsize].view(dt).reshape(t["shape"])
    bits = info["bits"]
    wi = dequantize(parts["wi"], parts["wi_scale"], bits, d_model)
    d_ff = wi.shape[1] // 2 if act == "swiglu" else wi.shape[1]
    if -(-d_ff // info["block"]) != parts["wo"].shape[1]:
        raise ExportError(f"the {rung} rung's wi has {wi.shape[1]} outputs, its wo {parts['wo'].shape[1]} blocks of "
                          f"inputs: not a {act} expert (SwiGLU's wi is gate | up, twice wo's inputs)")
    wo = dequantize(parts["wo"], parts["wo_scale"], bits, d_ff)
    x = np.random.default_rng(0).standard_normal((3, d_model)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_external_initializers_from_files_in_memory([RUNG_DATA], [blob], [blob.nbytes])
    templates = [Path(root) / rel for rel in (info["session_graph"], info.get("session_graph_level0")) if rel]
    kernel = ort.InferenceSession(str(Path(root) / f"dense/{info['kernel']}.onnx"))
    ys = [ort.InferenceSession(str(t), opts).run(None, {"x": x})[0] for t in templates]
    ys.append(kernel.run(None, {"x": x, **parts})[0])
    ref = activation(x @ wi, act) @ wo
    errs = [float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12)) for y in ys]
    # level 4 rounds the activations to int8 (~1% of the output); a layout error is ~100%
    bound = [ACTIVATION_ROUNDING if template_accuracy(t) >= 4 else 1e-4 for t in templates] + [1e-4]
    err = max(errs)
    if not all(e < b for e, b in zip(errs, bound)):
        raise ExportError(f"the {rung} rung of expert {expert['stack']}.{expert['layer']}.{expert['expert']} "
                          f"(d_ff {d_ff}) computes {err:.2e} away from its dequantised weights; the ladder is broken. "
                          "Export without it (--ladder none) and report this.")
    return err


def template_accuracy(path) -> int:
    """The MatMulNBits accuracy level a session template was written with."""
    import onnx  # deferred: the export side only

    levels = {a.i for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    return max(levels, default=0)


def _ffn_act(g: GraphBuilder, h: str, act: str, d_ff: int) -> str:
    """The activation between an expert's two matmuls: SwiGLU's silu(gate) * up on h[N, 2F],
    else GraphBuilder.act on h[N, F]."""
    if act != "swiglu":
        return g.act(h, act)
    gate, up = g.op("Split", [h, g.const([d_ff, d_ff])], hint="swiglu", n_out=2, axis=1)
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], hint="swiglu")], hint="swiglu")
    return g.op("Mul", [silu, up], hint="swiglu")
