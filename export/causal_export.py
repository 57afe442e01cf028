"""Export a Hugging Face decoder-only top-k MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE) into a swapmoe artifact: the driver.

The same artifact format as Switch (staging.py, writer.py, the manifest): one "step"
subgraph per layer (causal_graphs.py), one subgraph and weight block per expert (wi [D, 2F]
= gate | up, wo [F, D]; SwiGLU), the embedding, the LM head and the shared expert kernel.
The manifest says ``extra.family = "causal"`` and records the decoder config in
``extra.causal_config``. The checkpoint is read one tensor (or one expert) at a time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from swapmoe_edge.artifact.manifest import FORMAT_NAME, SCHEMA_VERSION
from swapmoe_edge.artifact.causal_config import CausalConfig
from swapmoe_edge.core.errors import CheckpointError, ExportError
from swapmoe_edge.core.keys import ExpertKey

from . import causal_graphs as cg
from . import graphs, ladder, options, quant, space
from .causal_checkpoint import CausalReader, architecture, read_causal_config
from .causal_validate import validate_causal
from .checkpoint import confined
from .staging import install, prepare_output, removed_on_failure, sigterm_unwinds
from .writer import ArtifactWriter, write_manifest

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "swapmoe.json")
IO = {
    "step": (("hidden", "position_ids", "attn_bias", "past_key", "past_value"),
             ("hidden_out", "present_key", "present_value", "normed", "router_logits")),
}


def is_causal(model_dir) -> bool:
    """Whether ``model_dir``'s config.json names a decoder-only MoE class this exporter serves
    (anything unreadable is left to the Switch exporter, which says what is wrong)."""
    try:
        raw = json.loads(confined(Path(model_dir), "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, CheckpointError):
        return False
    return architecture(raw) is not None


def swiglu_ladder() -> bool:
    """Whether ladder.py writes rungs for SwiGLU experts (wi [D, 2F])."""
    return hasattr(ladder, "wi_columns")


def export_causal(model_dir, out_dir, dtype: str = "float32", validate: bool = True, expert_dtype: str | None = None,
                  quiet: bool = False, stream=None, ladder_rungs: tuple[str, ...] | None = None, force: bool = False,
                  block_size: int | None = None, accuracy_level: int | None = None, lm_head: str | None = None,
                  ladder_block: int | None = None, expert_accuracy_level: int | None = None) -> Path:
    """Export ``model_dir`` (a HF decoder-only MoE checkpoint) to ``out_dir``; return the artifact path.

    ``dtype`` int8 or int4: q/k/v/o, the shared expert and the LM head are stored for ONNX Runtime's
    MatMulNBits (``block_size``, ``accuracy_level``, the LM head's width ``lm_head``; None: quant.py's
    measured defaults), the embedding, norms and router float32. Lossy: validation compares with
    PyTorch on the same quantised weights and reports the loss against the float model.
    ``ladder_rungs``: None: int4 where ladder.py can write SwiGLU rungs and the experts are float32
    or float16, none otherwise; ``()``: none. ``ladder_block``: inputs a scale in their copies (None: 32).
    ``expert_accuracy_level`` (int4 experts; None: 0): 4 rounds the experts' activations to int8 per
    block, validated against transformers rounding them alike.
    """
    dense, expert_dtype, ladder_rungs = options.export_types(dtype, block_size, accuracy_level, lm_head, expert_dtype,
                                                             ladder_rungs, default_ladder=swiglu_ladder())
    if ladder_rungs and not swiglu_ladder():
        raise ExportError("the precision ladder has no SwiGLU rungs in this version; export with --ladder none.")
    block = options.ladder_block(ladder_block, ladder_rungs)
    expert_level = options.expert_level(expert_accuracy_level, expert_dtype)
    model_dir, out = Path(model_dir), Path(out_dir)
    options.check_validation_packages(validate)
    raw, cfg = read_causal_config(model_dir)
    for name in SIDE_FILES:
        confined(model_dir, name)
    reader = CausalReader(model_dir, cfg)
    need = artifact_bytes(cfg, dense, expert_dtype, tuple(ladder_rungs), block)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = space.check_space(out.parent, need)
    except OSError as e:
        raise space.write_error(e, out, need, None) from e
    with sigterm_unwinds():
        return _export_into(reader, model_dir, out, raw, cfg, dense, expert_dtype, validate, quiet, stream,
                            tuple(ladder_rungs), force, (need, free), block, expert_level)


def expert_block_bytes(d: int, f: int, expert_dtype: str) -> int:
    """One SwiGLU expert's weight block: wi [D, 2F] and wo [F, D] as stored, with their scales."""
    n = 2 * f
    sizes = {"float32": [d * n * 4, f * d * 4], "float16": [d * n * 2, f * d * 2],
             "int8": [d * n, n * 4, f * d, d * 4], "int4": space.nbits_sizes(d, n, 4) + space.nbits_sizes(f, d, 4)}
    return space._packed(sizes[expert_dtype])


def artifact_bytes(cfg: CausalConfig, dtype: "str | quant.DenseWeights", expert_dtype: str, rungs: tuple[str, ...],
                   ladder_block: int = ladder.BLOCK) -> int:
    """Bytes on disk of the artifact export writes (an upper estimate, whole filesystem blocks)."""
    v, d, f, e, n = cfg.vocab_size, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_layers
    dw = dtype if isinstance(dtype, quant.DenseWeights) else quant.dense_weights(dtype)
    w = 4 if dw.storage == "float32" else 2

    def mm(bits: int | None) -> float:  # bytes per MatMul weight: float, or MatMulNBits' codes and a float32 scale a block
        return w if not bits else bits / 8 + 4 / dw.block

    attn = 2 * d * cfg.num_heads * cfg.head_dim + 2 * d * cfg.num_kv_heads * cfg.head_dim
    layer = int((attn + 3 * d * cfg.shared_expert_size) * mm(dw.bits)) + (4 * d + e * d + 2 * d) * w
    dense = [v * d * w, int(v * d * mm(dw.lm_head_bits or dw.bits)) + d * w] + [layer] * n  # embed, LM head, step graphs
    per_expert = space._blocks(expert_block_bytes(d, f, expert_dtype)) + space._blocks(space.GRAPH_BYTES)
    per_expert += sum(space._blocks(space.rung_block_bytes(d, f, r, ladder_block) + d * f * 2) for r in rungs)  # wi has 2F rows
    total = sum(space._blocks(x + space.GRAPH_BYTES) for x in dense) + n * e * per_expert
    n_files = len(dense) + n * e * (2 + len(rungs)) + 3 * len(rungs) + 3
    return total + len(rungs) * 3 * space._blocks(space.GRAPH_BYTES) + space._blocks(n_files * space.MANIFEST_BYTES_PER_FILE)


def _side_json(model_dir: Path, name: str) -> dict:
    path = confined(model_dir, name)
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid UTF-8 JSON ({e}). Fix or remove it.") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object.")
    return value


def extra_of(model_dir: Path, cfg: CausalConfig) -> dict:
    """The manifest's ``extra``: the family, the decoder config, the expert activation, and from the
    checkpoint folder the prompt template (swapmoe.json) and the input limit (tokenizer_config.json)."""
    extra = {"family": "causal", "hf_architecture": cfg.architecture, "causal_config": cfg.to_dict(), "expert_act": "swiglu"}
    template = _side_json(model_dir, "swapmoe.json").get("prompt_template")
    if template is not None:
        if not isinstance(template, str) or "{document}" not in template:
            raise CheckpointError(f"{model_dir / 'swapmoe.json'}: prompt_template must be a string holding '{{document}}'.")
        extra["prompt_template"] = template
    n = _side_json(model_dir, "tokenizer_config.json").get("model_max_length")
    if isinstance(n, (int, float)) and 0 < n <= 1_000_000:
        extra["max_source_tokens"] = int(n)
    return extra


def _export_into(reader: CausalReader, model_dir: Path, out: Path, raw: dict, cfg: CausalConfig, dense: quant.DenseWeights, expert_dtype: str,
                 validate: bool, quiet: bool, stream, rungs: tuple[str, ...], force: bool, need_free: tuple[int, int],
                 ladder_block: int = ladder.BLOCK, expert_level: int = quant.INT4_ACCURACY) -> Path:
    stream = stream or sys.stderr

    def say(what: str) -> None:
        if not quiet:
            print(f"[export] {what}", file=stream, flush=True)

    try:
        tmp = prepare_output(out, force=force, say=lambda w: print(f"[export] {w}", file=stream, flush=True))
    except OSError as e:
        raise space.write_error(e, out, *need_free) from e
    with removed_on_failure(tmp, out, need_free):
        writer = ArtifactWriter(tmp)
        body = _write_subgraphs(reader, cfg, dense, expert_dtype, writer, rungs, say, ladder_block, expert_level)
        for rung, info in body.get("ladder", {}).items():
            ladder.check_rung(tmp, rung, info, body["experts"][0], cfg.hidden_size, "swiglu")
        tok = confined(model_dir, "tokenizer.json")
        if tok.is_file():
            writer.write_bytes("tokenizer.json", tok.read_bytes())
        manifest = {
            "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "created_by": "swapmoe_export 0.1.0",
            "source": str(model_dir.resolve()), "dtype": dense.storage,
            **({"dense_dtype": dense.name, "dense_nbits": dense.manifest()} if dense.bits else {}), "expert_dtype": expert_dtype,
            "expert_dtype_lossy": quant.LOSSY[expert_dtype], "config": cfg.switch_view(), "hf_config": raw,
            "tokenizer": "tokenizer.json" if tok.is_file() else None,
            "generation": _side_json(model_dir, "generation_config.json"), "extra": extra_of(model_dir, cfg),
            **body, "files": writer.files, "validation": None,
        }
        reader.close()
        if validate:
            write_manifest(tmp, manifest)
            manifest["validation"] = validate_causal(model_dir, tmp, dtype=dense.storage, expert_dtype=expert_dtype)
            say(f"validated: max |logit difference| {manifest['validation']['max_abs_diff']:.2e}")
            q = manifest["validation"].get("quantisation_vs_float")
            if q:
                say(f"against the float model (quantisation, lossy): top-1 agrees at {q['top1_agreement']:.0%} of "
                    f"{q['positions']} positions, logits off by {q['mean_diff_over_logit_rms']:.3f} of their RMS on average")
        write_manifest(tmp, manifest)
        install(tmp, out)
        say(f"wrote {out} ({sum(x['size'] for x in writer.files.values()) / 2**20:.1f} MiB)")
        return out


def _write_subgraphs(reader: CausalReader, cfg: CausalConfig, dtype: quant.DenseWeights, expert_dtype: str, writer: ArtifactWriter,
                     rungs: tuple[str, ...], say, ladder_block: int = ladder.BLOCK,
                     expert_level: int = quant.INT4_ACCURACY) -> dict:
    subgraphs: dict[str, dict] = {}
    layers: list[dict] = []
    experts: list[dict] = []

    def add(name: str, io: tuple, model) -> str:
        rel = f"dense/{name}.onnx"
        writer.write_onnx(rel, model)
        subgraphs[name] = {"file": rel, "inputs": list(io[0]), "outputs": list(io[1])}
        return name

    add("embed", graphs.IO["embed"], graphs.embed_graph(reader.embed(), dtype))
    for i in range(cfg.num_layers):
        t0 = time.perf_counter()
        key = ExpertKey("decoder", i, 0).layer_key
        scope = f"/model/layers.{i}"
        step = add(f"{key.name}.step", IO["step"], cg.step_graph(scope, reader.attention(i), reader.router(i),
                                                                  reader.shared_expert(i), cfg, dtype))
        layers.append({"stack": "decoder", "layer": i, "sparse": True, "parts": {"step": step},
                       "experts": list(range(cfg.num_experts))})
        for e in range(cfg.num_experts):
            wi_t, wo_t = reader.expert(i, e)
            experts.append(write_expert(writer, ExpertKey("decoder", i, e), f"{scope}/mlp/experts.{e}", wi_t, wo_t,
                                        expert_dtype, rungs, ladder_block, expert_level))
        say(f"{key.name}: {cfg.num_experts} experts ({time.perf_counter() - t0:.1f}s)")
    add("lm_head", graphs.IO["lm_head"], cg.lm_head_graph(reader.get("model.norm.weight"), reader.lm_head(), cfg, dtype))
    kernel_io = f"expert_kernel_{expert_dtype}" if expert_dtype in ("int8", "int4") else "expert_kernel"
    add("expert_kernel", graphs.IO[kernel_io], cg.kernel_graph(cfg.hidden_size, cfg.moe_intermediate_size, expert_dtype))
    body = {"subgraphs": subgraphs, "layers": layers, "experts": experts}
    if rungs and experts:
        body["ladder"] = _ladder_graphs(writer, add, cfg, rungs, experts[0])
    if expert_dtype == "int4":
        body["expert_nbits"] = quant.expert_nbits(expert_level)
    return body


def _ladder_graphs(writer: ArtifactWriter, add, cfg: CausalConfig, rungs: tuple[str, ...], first: dict) -> dict:
    """Each rung's session template and standard-op kernel for SwiGLU experts (ladder.py)."""
    out = {}
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    for rung in rungs:
        out[rung] = ladder.write_templates(writer, d, f, "swiglu", rung, first["rungs"][rung])
        add(ladder.kernel_name(rung), graphs.IO["rung_kernel"], ladder.kernel_graph(d, f, "swiglu", rung, out[rung]["block"]))
    return out


def stored_parts(wi_t: np.ndarray, wo_t: np.ndarray, expert_dtype: str) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """An expert's arrays as stored (the expert kernel's roles in order) and the float32 weights they stand for."""
    if expert_dtype == "int8":
        (qi, si), (qo, so) = quant.quantize_int8(wi_t), quant.quantize_int8(wo_t)
        return {"wi": qi, "wi_scale": si, "wo": qo, "wo_scale": so}, (quant.dequantize_int8(qi, si), quant.dequantize_int8(qo, so))
    if expert_dtype == "int4":
        return ladder.int4_expert(wi_t, wo_t)
    parts = {"wi": wi_t.astype(expert_dtype), "wo": wo_t.astype(expert_dtype)}
    return parts, (parts["wi"].astype(np.float32), parts["wo"].astype(np.float32))


def write_expert(writer: ArtifactWriter, key: ExpertKey, scope: str, wi_t: np.ndarray, wo_t: np.ndarray, expert_dtype: str,
                 rungs: tuple[str, ...] = (), ladder_block: int = ladder.BLOCK, expert_level: int = quant.INT4_ACCURACY) -> dict:
    """One expert's weight block, its standalone subgraph and rung copies; its manifest entry."""
    try:
        parts, ran = stored_parts(wi_t, wo_t, expert_dtype)
    except ValueError as e:
        raise ExportError(f"expert {key.name}: {e}. Export with --expert-dtype int8 instead.") from e
    bin_rel = f"experts/{key.name}.bin"
    offs = dict(zip(parts, writer.write_blocks(bin_rel, list(parts.values()))))
    onnx_rel = f"experts/{key.name}.onnx"
    writer.write_onnx(onnx_rel, cg.expert_graph(scope, parts, expert_dtype, f"{key.name}.bin", offs, expert_level))
    ins, outs = graphs.IO["expert"]
    rung_entries = {r: ladder.write_rung(writer, key.name, scope, wi_t, wo_t, r, ladder_block) for r in rungs}
    return {
        **({"rungs": rung_entries} if rung_entries else {}),
        "stack": key.stack, "layer": key.layer, "expert": key.expert,
        "graph": {"file": onnx_rel, "inputs": list(ins), "outputs": list(outs)},
        "weights_file": bin_rel, "nbytes": writer.files[bin_rel]["size"],
        # ||E|| of SwapMoE's Eq. 1, on the weights that actually run
        "norm": float(np.sqrt(sum(np.sum(np.asarray(w, np.float64) ** 2) for w in ran))),
        "tensors": [{"name": f"{scope}/{quant.TENSOR_LEAF[role]}", "role": role, "offset": offs[role], "shape": list(arr.shape),
                     "dtype": str(arr.dtype)} for role, arr in parts.items()],
    }
