"""What a manifest must hold before the runtime trusts it, checked on the raw JSON.

Every field's type and range, and every cross-reference: the files that subgraphs, experts,
rungs and the tokenizer name are listed in ``files``; each sparse layer's experts have entries
and each entry a sparse layer; a tensor lies where the exporter puts it in its weight block,
with the shape and type the expert kernel (or the rung's kernel) takes for the model's d_model
and d_ff. References carry the exporter's names (``experts/dec.L01.E05.bin`` for that expert,
``enc.L00.block`` for that layer's part): a reference to another expert's or layer's file would
pass every hash check, run in its place, and give wrong output labelled exact.
Checked before manifest.py builds its frozen dataclasses, so that building them cannot fail
half-way, and each problem is one ArtifactError line: what is wrong, where, and what to do.
"""

from __future__ import annotations

import math
import re
from typing import Any

from swapmoe_edge.core.errors import ArtifactError
from swapmoe_edge.core.keys import STACK_PREFIX, STACKS, ExpertKey

ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1}
DENSE_DTYPES = ("float32", "float16")
DENSE_NBITS = {"int8": 8, "int4": 4}  # dense_dtype -> bits of its MatMulNBits weights
EXPERT_DTYPES = ("float32", "float16", "int8", "int4")
ROLES = ("wi", "wo", "wi_scale", "wo_scale")
INT4_GROUP = 32  # inputs sharing one float32 scale in an int4 expert (MatMulNBits block_size)
ALIGN = 4096  # where each tensor of a weight block starts (export's writer.ALIGN): page boundaries
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BIG = 1 << 48  # no file, offset or count of a real artifact comes near this
REDO = "The artifact is damaged or was not written by `swapmoe export`; export the model again."

# ModelConfig's fields: (lowest, highest) for integers; floats and flags below.
_CONFIG_INTS = {
    "vocab_size": (1, 1 << 24), "d_model": (1, 1 << 20), "d_kv": (1, 1 << 20), "d_ff": (1, 1 << 24),
    "num_heads": (1, 1 << 12), "num_layers": (0, 1 << 12),  # 0: decoder-only
    "num_decoder_layers": (1, 1 << 12),
    "num_experts": (1, 1 << 16), "encoder_sparse_step": (0, 1 << 12), "decoder_sparse_step": (0, 1 << 12),
    "expert_capacity": (1, 1 << 30), "relative_attention_num_buckets": (1, 1 << 16),
    "relative_attention_max_distance": (1, 1 << 24),
}
_CONFIG_TOKENS = ("pad_token_id", "eos_token_id", "decoder_start_token_id")


class _Checker:
    """Type and range checks that fail with the manifest's path and the field's place in it."""

    def __init__(self, path):
        self.path = path
        self.files: dict[str, Any] = {}

    def fail(self, where: str, what: str):
        raise ArtifactError(f"{self.path}: {where} {what}. {REDO}")

    def dict(self, v: Any, where: str) -> dict:
        if not isinstance(v, dict):
            self.fail(where, f"must be a JSON object, not {_kind(v)}")
        return v

    def list(self, v: Any, where: str) -> list:
        if not isinstance(v, list):
            self.fail(where, f"must be a JSON list, not {_kind(v)}")
        return v

    def int(self, v: Any, where: str, lo: int = 0, hi: int = _BIG) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(where, f"must be an integer, not {_kind(v)}")
        if not lo <= v <= hi:
            self.fail(where, f"is {v}, outside {lo}..{hi}")
        return v

    def num(self, v: Any, where: str, lo: float = 0.0) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            self.fail(where, f"must be a finite number >= {lo}, not {v!r}"[:200])
        return float(v)

    def str(self, v: Any, where: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(v, str) or not v:
            self.fail(where, f"must be a non-empty string, not {_kind(v)}")
        if choices is not None and v not in choices:
            self.fail(where, f"is {v[:60]!r}, not one of {', '.join(choices)}")
        return v

    def bool(self, v: Any, where: str) -> bool:
        if not isinstance(v, bool):
            self.fail(where, f"must be true or false, not {_kind(v)}")
        return v

    def strings(self, v: Any, where: str) -> list[str]:
        return [self.str(s, f"{where}[{i}]") for i, s in enumerate(self.list(v, where))]

    def file(self, rel: Any, where: str) -> str:
        """``rel`` is a path listed in ``files``."""
        self.str(rel, where)
        if rel not in self.files:
            self.fail(where, f"names {rel[:120]!r}, which 'files' does not list (no size or sha256 to check it by)")
        return rel


def _kind(v: Any) -> str:
    return "null" if v is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), f"a {type(v).__name__}")


def check_manifest(raw: Any, path, schema_version: int, format_name: str) -> None:
    """Raise ArtifactError at the first field of ``raw`` (parsed manifest.json) the runtime cannot trust."""
    c = _Checker(path)
    c.dict(raw, "the manifest")
    if raw.get("format") != format_name:
        raise ArtifactError(f"{path} is not a swapmoe artifact manifest (format={str(raw.get('format'))[:60]!r}). {REDO}")
    version = raw.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > schema_version:
        raise ArtifactError(
            f"{path} has schema version {version}, newer than this runtime understands ({schema_version}). "
            "Upgrade swapmoe-edge, or export the model with this version.")
    c.int(version, "schema_version", 1, schema_version)
    c.files = {rel: _file_entry(c, rel, d) for rel, d in c.dict(raw.get("files"), "'files'").items()}
    c.str(raw.get("dtype"), "dtype", DENSE_DTYPES)
    _dense_nbits(c, raw)
    expert_dtype = c.str(raw.get("expert_dtype", raw.get("dtype")), "expert_dtype", EXPERT_DTYPES)
    _expert_nbits(c, raw, expert_dtype)
    cfg = _config(c, raw.get("config"))
    if raw.get("tokenizer") is not None:
        c.file(raw["tokenizer"], "tokenizer")
    for key in ("generation", "extra"):
        c.dict(raw.get(key, {}), key)
    if raw.get("validation") is not None:
        c.dict(raw["validation"], "validation")
    _extra(c, raw.get("extra", {}))
    subgraphs = c.dict(raw.get("subgraphs"), "subgraphs")
    for name, sg in subgraphs.items():
        _subgraph(c, sg, f"subgraph {name[:60]!r}")
        # The exporter's names: dense/NAME.onnx, or one file for both stacks' tied embeddings.
        named = {f"dense/{name}.onnx"} | ({f"dense/{name[4:]}.onnx"} if name[:4] in ("enc.", "dec.") else set())
        if sg["file"] not in named:
            c.fail(f"subgraph {name[:60]!r}.file", f"is {sg['file'][:80]!r}, not {sorted(named)[0]!r} (another subgraph's "
                   "file would run in its place)")
    ladder = {name: _rung_info(c, name, r, subgraphs) for name, r in c.dict(raw.get("ladder", {}), "ladder").items()}
    sparse = _layers(c, c.list(raw.get("layers"), "layers"), cfg, subgraphs)
    wi_cols = 2 * cfg["d_ff"] if raw.get("extra", {}).get("expert_act") == "swiglu" else None  # gate | up
    _experts(c, c.list(raw.get("experts"), "experts"), cfg, expert_dtype, sparse, ladder, wi_cols)


def _expert_nbits(c: _Checker, raw: dict, expert_dtype: str) -> None:
    """int4 experts say their MatMulNBits settings (``expert_nbits``): blocks of INT4_GROUP, level 0 or 4."""
    nb = raw.get("expert_nbits")
    if nb is None:
        return
    if expert_dtype != "int4":
        c.fail("expert_nbits", f"is set, but expert_dtype is {expert_dtype}")
    nb = c.dict(nb, "expert_nbits")
    c.int(nb.get("bits"), "expert_nbits.bits", 4, 4)
    c.int(nb.get("block_size"), "expert_nbits.block_size", INT4_GROUP, INT4_GROUP)
    if c.int(nb.get("accuracy_level"), "expert_nbits.accuracy_level", 0, 4) not in (0, 4):
        c.fail("expert_nbits.accuracy_level", f"is {nb['accuracy_level']}; int4 experts run at level 0 or 4")


def _dense_nbits(c: _Checker, raw: dict) -> None:
    """``dense_dtype`` int8/int4 (MatMulNBits dense weights) comes with its ``dense_nbits`` settings."""
    dense = c.str(raw.get("dense_dtype", raw.get("dtype")), "dense_dtype", DENSE_DTYPES + tuple(DENSE_NBITS))
    nb = raw.get("dense_nbits")
    if dense not in DENSE_NBITS:
        if nb is not None:
            c.fail("dense_nbits", f"is set, but dense_dtype is {dense}")
        return
    nb = c.dict(nb, "dense_nbits")
    if c.int(nb.get("bits"), "dense_nbits.bits", 2, 8) != DENSE_NBITS[dense]:
        c.fail("dense_nbits.bits", f"is {nb['bits']}, but dense_dtype is {dense}")
    c.int(nb.get("block_size"), "dense_nbits.block_size", 16, 1 << 12)
    c.int(nb.get("accuracy_level"), "dense_nbits.accuracy_level", 0, 4)
    c.int(nb.get("lm_head_bits", nb["bits"]), "dense_nbits.lm_head_bits", nb["bits"], 8)
    c.str(nb.get("float_dtype", raw.get("dtype")), "dense_nbits.float_dtype", DENSE_DTYPES)


def _file_entry(c: _Checker, rel: str, d: Any) -> int:
    where = f"files[{rel[:120]!r}]"
    c.str(rel, f"{where}: the path")
    c.dict(d, where)
    if not isinstance(d.get("sha256"), str) or not _HEX64.fullmatch(d["sha256"]):
        c.fail(f"{where}.sha256", "must be 64 lowercase hex digits")
    return c.int(d.get("size"), f"{where}.size")


def _config(c: _Checker, cfg: Any) -> dict:
    cfg = c.dict(cfg, "config")
    for name, (lo, hi) in _CONFIG_INTS.items():
        c.int(cfg.get(name), f"config.{name}", lo, hi)
    for name in _CONFIG_TOKENS:
        c.int(cfg.get(name), f"config.{name}", 0, cfg["vocab_size"] - 1)
    eps = cfg.get("layer_norm_epsilon")
    if c.num(eps, "config.layer_norm_epsilon") <= 0 or eps >= 1:
        c.fail("config.layer_norm_epsilon", f"is {eps}, not between 0 and 1")
    c.str(cfg.get("dense_act_fn"), "config.dense_act_fn")
    for name in ("tie_word_embeddings", "router_bias"):
        c.bool(cfg.get(name), f"config.{name}")
    return cfg


def _extra(c: _Checker, extra: dict) -> None:
    if "max_source_tokens" in extra:
        c.int(extra["max_source_tokens"], "extra.max_source_tokens", 1, 1 << 24)
    if "family" in extra:
        c.str(extra["family"], "extra.family")
    if "expert_act" in extra:  # absent: the config's dense_act_fn between wi [D, F] and wo [F, D]
        c.str(extra["expert_act"], "extra.expert_act", ("swiglu",))


def _subgraph(c: _Checker, sg: Any, where: str) -> None:
    c.dict(sg, where)
    c.file(sg.get("file"), f"{where}.file")
    c.strings(sg.get("inputs"), f"{where}.inputs")
    c.strings(sg.get("outputs"), f"{where}.outputs")


def _rung_info(c: _Checker, name: str, r: Any, subgraphs: dict) -> dict:
    where = f"ladder rung {name[:40]!r}"
    c.dict(r, where)
    bits = c.int(r.get("bits"), f"{where}.bits", 1, 8)
    block = c.int(r.get("block"), f"{where}.block", 1, 1 << 16)
    if (block * bits) % 8:
        c.fail(f"{where}.block", f"is {block}: {block} weights of {bits} bits do not fill whole bytes")
    _named(c, c.file(r.get("session_graph"), f"{where}.session_graph"), f"experts/rung.{name}.onnx", f"{where}.session_graph")
    if r.get("session_graph_level0") is not None:  # the same template at MatMulNBits accuracy level 0
        _named(c, c.file(r["session_graph_level0"], f"{where}.session_graph_level0"), f"experts/rung.{name}.a0.onnx",
               f"{where}.session_graph_level0")
    if c.str(r.get("kernel"), f"{where}.kernel") not in subgraphs:
        c.fail(f"{where}.kernel", f"names {r['kernel'][:60]!r}, which is not a subgraph")
    _named(c, r["kernel"], f"rung_kernel.{name}", f"{where}.kernel")
    c.str(r.get("data_name"), f"{where}.data_name")
    return r


def _named(c: _Checker, value: str, own: str, where: str) -> None:
    """``value`` is the exporter's name ``own``: a file or graph of another expert, layer or rung
    would pass every hash check and run in this one's place."""
    if value != own:
        c.fail(where, f"is {value[:80]!r}, not {own!r}")


def _stack_and_layer(c: _Checker, d: dict, where: str, cfg: dict) -> tuple[str, int]:
    stack = c.str(d.get("stack"), f"{where}.stack", STACKS)
    depth = cfg["num_layers"] if stack == "encoder" else cfg["num_decoder_layers"]
    return stack, c.int(d.get("layer"), f"{where}.layer", 0, depth - 1)


def _is_sparse(cfg: dict, stack: str, layer: int) -> bool:
    step = cfg["encoder_sparse_step"] if stack == "encoder" else cfg["decoder_sparse_step"]
    return (layer % step == 1 or step == 1) if step > 0 else False


def _layers(c: _Checker, layers: list, cfg: dict, subgraphs: dict) -> set[tuple[str, int]]:
    """Each stack's layers 0..depth-1 once each, sparse where the config says; the sparse ones."""
    seen, sparse = set(), set()
    for i, d in enumerate(layers):
        where = f"layers[{i}]"
        c.dict(d, where)
        stack, layer = _stack_and_layer(c, d, where, cfg)
        if (stack, layer) in seen:
            c.fail(where, f"repeats {stack} layer {layer}")
        seen.add((stack, layer))
        if c.bool(d.get("sparse"), f"{where}.sparse") != _is_sparse(cfg, stack, layer):
            c.fail(f"{where}.sparse", f"is {d['sparse']} for {stack} layer {layer}; the config's sparse steps say otherwise")
        for role, name in c.dict(d.get("parts"), f"{where}.parts").items():
            if c.str(name, f"{where}.parts.{role[:40]}") not in subgraphs:
                c.fail(f"{where}.parts.{role[:40]}", f"names {name[:60]!r}, which is not a subgraph")
            own = f"{STACK_PREFIX[stack]}.L{layer:02d}.{role}"
            if name != own:
                c.fail(f"{where}.parts.{role[:40]}", f"names {name[:60]!r}, not this layer's {own!r}")
        experts = [c.int(e, f"{where}.experts[{j}]") for j, e in enumerate(c.list(d.get("experts", []), f"{where}.experts"))]
        want = list(range(cfg["num_experts"])) if d["sparse"] else []
        if experts != want:
            c.fail(f"{where}.experts", f"must list experts 0..{cfg['num_experts'] - 1} in order" if d["sparse"]
                   else "must be empty (a dense layer)")
        if d["sparse"]:
            sparse.add((stack, layer))
    for stack in STACKS:
        depth = cfg["num_layers"] if stack == "encoder" else cfg["num_decoder_layers"]
        missing = [i for i in range(depth) if (stack, i) not in seen]
        if missing:
            c.fail("layers", f"has no entry for {stack} layer(s) {missing[:5]}")
    if not sparse:
        c.fail("layers", "hold no sparse layer (this runtime serves mixture-of-experts models)")
    return sparse


def expert_layout(expert_dtype: str, d_model: int, d_ff: int, wi_cols: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """role -> (shape, dtype) of an expert's weights as the expert kernel takes them; ``wi_cols``: the
    first weight's columns where they are not d_ff (SwiGLU's gate | up: 2 d_ff)."""
    D, F = d_model, d_ff
    N = wi_cols or F
    if expert_dtype == "int8":  # per output column float32 scales
        return {"wi": ((D, N), "int8"), "wi_scale": ((N,), "float32"), "wo": ((F, D), "int8"), "wo_scale": ((D,), "float32")}
    if expert_dtype == "int4":  # MatMulNBits' layout, blocks of INT4_GROUP inputs (the int4 rung's)
        return rung_layout(4, INT4_GROUP, D, F, wi_cols)
    return {"wi": ((D, N), expert_dtype), "wo": ((F, D), expert_dtype)}


def rung_layout(bits: int, block: int, d_model: int, d_ff: int, wi_cols: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """role -> (shape, dtype) of a rung's copy: MatMulNBits' [N, K/block, block*bits/8] and scales [N, K/block]."""
    D, F, width = d_model, d_ff, block * bits // 8
    N = wi_cols or F
    kd, kf = -(-D // block), -(-F // block)
    return {"wi": ((N, kd, width), "uint8"), "wi_scale": ((N, kd), "float32"),
            "wo": ((D, kf, width), "uint8"), "wo_scale": ((D, kf), "float32")}


def _block(c: _Checker, d: dict, where: str, layout: dict) -> None:
    """A weight block as the exporter writes it (writer.write_blocks): its file listed and its size
    the file's; its tensors the layout's roles in the layout's order, each of the shape and type the
    kernel takes, back to back from offset 0, each at the next ALIGN-ed offset. Any other offset,
    even one inside the block, would hand the kernel bytes of another tensor or of the padding."""
    rel = c.file(d.get("weights_file"), f"{where}.weights_file")
    nbytes = c.int(d.get("nbytes"), f"{where}.nbytes", 1)
    if nbytes != c.files[rel]:
        c.fail(f"{where}.nbytes", f"is {nbytes}, but {rel} has {c.files[rel]} bytes in 'files'")
    tensors = c.list(d.get("tensors"), f"{where}.tensors")
    if len(tensors) != len(layout):
        c.fail(f"{where}.tensors", f"hold {len(tensors)} tensors, the kernel takes {len(layout)} ({', '.join(layout)})")
    pos = 0
    for j, (t, want_role) in enumerate(zip(tensors, layout)):
        tw = f"{where}.tensors[{j}]"
        c.dict(t, tw)
        name = c.str(t.get("name"), f"{tw}.name")
        role = t.get("role") or name.rsplit("/", 1)[-1].replace(".weight", "").replace(".scale", "_scale")
        c.str(role, f"{tw}.role", (want_role,))
        dtype = c.str(t.get("dtype"), f"{tw}.dtype", tuple(ITEMSIZE))
        shape = tuple(c.int(s, f"{tw}.shape[{k}]", 1, 1 << 32) for k, s in enumerate(c.list(t.get("shape"), f"{tw}.shape")))
        if layout[role] != (shape, dtype):
            want = layout[role]
            c.fail(tw, f"is {role} {dtype}{list(shape)}, the kernel takes {want[1]}{list(want[0])}")
        offset = c.int(t.get("offset"), f"{tw}.offset")
        start = pos + (-pos) % ALIGN
        if offset != start:
            c.fail(f"{tw}.offset", f"is {offset}; {role} lies at {start}, the first {ALIGN}-aligned byte after the tensor before it")
        pos = offset + math.prod(shape) * ITEMSIZE[dtype]
    if pos != nbytes:
        c.fail(f"{where}.nbytes", f"is {nbytes}, but its tensors end at byte {pos}")


def _experts(c: _Checker, experts: list, cfg: dict, expert_dtype: str, sparse: set, ladder: dict,
             wi_cols: int | None = None) -> None:
    D, F = cfg["d_model"], cfg["d_ff"]
    first = experts[0] if experts and isinstance(experts[0], dict) else {}
    scales = [t.get("dtype") for t in first.get("tensors") or () if isinstance(t, dict)][1:2]
    if expert_dtype == "int4" and scales == ["float16"]:
        c.fail("expert_dtype", "is int4 in an earlier layout (float16 scales per group of input rows), which this "
                               "version does not run")
    layout = expert_layout(expert_dtype, D, F, wi_cols)
    rungs = {name: rung_layout(r["bits"], r["block"], D, F, wi_cols) for name, r in ladder.items()}
    seen: set[ExpertKey] = set()
    for i, d in enumerate(experts):
        where = f"experts[{i}]"
        c.dict(d, where)
        stack, layer = _stack_and_layer(c, d, where, cfg)
        key = ExpertKey(stack, layer, c.int(d.get("expert"), f"{where}.expert", 0, cfg["num_experts"] - 1))
        where = f"expert {key.name}"
        if (stack, layer) not in sparse:
            c.fail(where, f"belongs to {stack} layer {layer}, which is not sparse")
        if key in seen:
            c.fail(where, "is listed twice")
        seen.add(key)
        _subgraph(c, d.get("graph"), f"{where}.graph")
        _named(c, d["graph"]["file"], f"experts/{key.name}.onnx", f"{where}.graph.file")
        c.num(d.get("norm"), f"{where}.norm")
        _block(c, d, where, layout)
        _named(c, d["weights_file"], f"experts/{key.name}.bin", f"{where}.weights_file")
        own = c.dict(d.get("rungs", {}), f"{where}.rungs")
        if set(own) != set(rungs):
            c.fail(f"{where}.rungs", f"are {sorted(own)[:4]}, the ladder's rungs are {sorted(rungs)}")
        for name, r in own.items():
            _block(c, c.dict(r, f"{where}.rungs.{name}"), f"{where} rung {name}", rungs[name])
            _named(c, r["weights_file"], f"experts/{key.name}.{name}.bin", f"{where} rung {name}.weights_file")
    missing = len(sparse) * cfg["num_experts"] - len(seen)
    if missing:
        c.fail("experts", f"lack {missing} expert(s) of the sparse layers")
