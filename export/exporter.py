"""Export a HF MoE checkpoint into a swapmoe artifact directory: the driver (Switch Transformers here; a decoder-only family goes to causal_export.py).

Reads the checkpoint block by block, writes one subgraph per dense block and one per expert
(writer.py), then the manifest, last, and only then shows the directory (staging.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from swapmoe_edge.core.errors import CheckpointError, ExportError
from swapmoe_edge.artifact.manifest import FORMAT_NAME, SCHEMA_VERSION
from swapmoe_edge.artifact.model_config import ModelConfig, config_to_dict
from swapmoe_edge.core.keys import STACK_PREFIX, ExpertKey

from . import causal_export, fused, graphs, ladder, options, quant, space
from .checkpoint import CheckpointReader, check_sparse_layers, confined, ff_prefix, read_config
from .staging import install, prepare_output, removed_on_failure, sigterm_unwinds
from .validate import summary as validation_summary
from .validate import validate_artifact
from .writer import ArtifactWriter, write_manifest


# What export reads from the checkpoint besides config.json and the weights.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


class Progress:
    def __init__(self, total: int, quiet: bool, stream=None):
        self.total, self.quiet, self.done = total, quiet, 0
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.quiet:
            elapsed = time.perf_counter() - self.t0
            print(f"[export {self.done:>3}/{self.total}] {what}  ({elapsed:.1f}s)", file=self.stream, flush=True)

    def say(self, what: str) -> None:
        if not self.quiet:
            print(f"[export] {what}", file=self.stream, flush=True)


def _tokenizer_extra(model_dir: Path) -> dict:
    """``max_source_tokens``: the tokenizer's ``model_max_length`` (the input length the model
    was trained on), which the runtime uses as its default input limit. HF writes a huge
    number there for "no limit"; that is left out."""
    path = confined(model_dir, "tokenizer_config.json")
    try:
        n = json.loads(path.read_text()).get("model_max_length") if path.is_file() else None
    except ValueError:
        return {}  # a broken tokenizer config only loses the hint
    return {"max_source_tokens": int(n)} if isinstance(n, (int, float)) and 0 < n <= 1_000_000 else {}


def export_checkpoint(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    validate: bool = True,
    expert_dtype: str | None = None,
    quiet: bool = False,
    stream=None,
    fuse_layers: bool = True,
    ladder_rungs: tuple[str, ...] | None = None,
    force: bool = False,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    lm_head: str | None = None,
    expert_accuracy_level: int | None = None,
    ladder_block: int | None = None,
) -> Path:
    """Export ``model_dir`` (a HF Switch checkpoint, or a decoder-only MoE one: causal_export.py) to
    ``out_dir``; return the artifact path.

    An old artifact at ``out_dir`` is replaced; one that holds files its manifest does not list
    (a profile, notes) is refused unless ``force``, which removes them and says so.

    ``ladder_rungs``: the low-bit copies written beside every expert (ladder.py); None: int4
    where the experts are float32 or float16, none otherwise; ``()``: none.

    ``fuse_layers=False`` writes the schema-1 layout (separate attention/FFN subgraphs) for
    tests and before/after benchmarks; the fused layout decodes with fewer ORT calls.

    ``dtype`` int8 or int4: every dense MatMul weight but the router's is stored for ONNX Runtime's
    MatMulNBits (``block_size`` inputs a scale, ``accuracy_level`` 4: int8 activations, 0: float32;
    None: the measured defaults, quant.py), everything else float32. Lossy; the validation compares
    with PyTorch running the same quantised weights and reports the loss against the float model.

    ``ladder_block`` (None: ladder.BLOCK, 32): inputs a scale in the ladder's copies (16-128). A
    larger block holds fewer bytes, and a level-4 session of it less still (switch-base int4: 4.17
    MB a session at 32, 2.85 MB at 128; docs/results/device_box_lowbit/).

    ``expert_accuracy_level`` (int4 experts only; None: ``quant.INT4_ACCURACY``, 0): MatMulNBits'
    compute type in the experts' own graphs. 4 rounds each expert's activations to int8 per block
    (faster, and validated against PyTorch rounding them alike), and a session then holds ~1.4x
    the expert's bytes.
    """
    if causal_export.is_causal(model_dir):  # a decoder-only top-k MoE (Mixtral, Qwen-MoE, OLMoE): its own driver
        return causal_export.export_causal(model_dir, out_dir, dtype=dtype, validate=validate, expert_dtype=expert_dtype,
                                           quiet=quiet, stream=stream, ladder_rungs=ladder_rungs, force=force,
                                           block_size=block_size, accuracy_level=accuracy_level, lm_head=lm_head,
                                           ladder_block=ladder_block, expert_accuracy_level=expert_accuracy_level)
    dense, expert_dtype, ladder_rungs = options.export_types(dtype, block_size, accuracy_level, lm_head, expert_dtype,
                                                             ladder_rungs)
    expert_level = options.expert_level(expert_accuracy_level, expert_dtype)
    block = options.ladder_block(ladder_block, ladder_rungs)
    model_dir, out = Path(model_dir), Path(out_dir)
    options.check_validation_packages(validate)
    raw_cfg, cfg = read_config(model_dir)
    for name in SIDE_FILES:  # refused now, not after the weights are written
        confined(model_dir, name)
    reader = CheckpointReader(model_dir)
    check_sparse_layers(model_dir, cfg, reader.names())
    need = _artifact_bytes(reader, model_dir, cfg, dense, expert_dtype, tuple(ladder_rungs), fuse_layers, block)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = space.check_space(out.parent, need)
    except OSError as e:
        raise space.write_error(e, out, need, None) from e
    with sigterm_unwinds():
        return _export_into(reader, model_dir, out, raw_cfg, cfg, dense, expert_dtype, validate, quiet, stream, fuse_layers,
                            tuple(ladder_rungs), force, (need, free), expert_level, block)


def _artifact_bytes(reader: CheckpointReader, model_dir: Path, cfg: ModelConfig, dtype: quant.DenseWeights, expert_dtype: str,
                    rungs: tuple[str, ...], fuse_layers: bool, ladder_block: int = ladder.BLOCK) -> int:
    """space.artifact_bytes for this checkpoint: its own per-stack tables and tokenizer count too."""
    tables = 0 if cfg.tie_word_embeddings else sum(reader.has(f"{s}.embed_tokens.weight") for s in ("encoder", "decoder"))
    tok = confined(model_dir, "tokenizer.json")
    side = tok.stat().st_size if tok.is_file() else 0
    return space.artifact_bytes(cfg, dtype, expert_dtype, rungs, stack_tables=tables, side_bytes=side, fused=fuse_layers,
                                ladder_block=ladder_block)


def _export_into(reader: CheckpointReader, model_dir: Path, out: Path, raw_cfg: dict, cfg: ModelConfig, dense: quant.DenseWeights, expert_dtype: str,
                 validate: bool, quiet: bool, stream, fuse_layers: bool = True, rungs: tuple[str, ...] = (), force: bool = False,
                 space_need_free: tuple[int, int] = (0, 0), expert_level: int = quant.INT4_ACCURACY,
                 ladder_block: int = ladder.BLOCK) -> Path:
    def warn(what: str) -> None:  # not progress: shown even with quiet
        print(f"[export] {what}", file=stream or sys.stderr, flush=True)

    try:
        tmp = prepare_output(out, force=force, say=warn)
    except OSError as e:
        raise space.write_error(e, out, *space_need_free) from e
    def stopped() -> None:
        if not quiet:
            print(f"[export] stopped by a signal; removed the partial artifact {tmp}", file=stream or sys.stderr, flush=True)

    with removed_on_failure(tmp, out, space_need_free, on_signal=stopped):
        n_layers = cfg.num_layers + cfg.num_decoder_layers
        progress = Progress(n_layers + 4 + (1 if validate else 0), quiet, stream)
        writer = ArtifactWriter(tmp)
        body = _write_subgraphs(reader, cfg, dense, expert_dtype, writer, progress, fuse_layers, rungs, expert_level,
                                ladder_block)
        for rung, info in body.get("ladder", {}).items():
            ladder.check_rung(tmp, rung, info, body["experts"][0], cfg.d_model, cfg.dense_act_fn)
        tok = confined(model_dir, "tokenizer.json")
        if tok.is_file():
            writer.write_bytes("tokenizer.json", tok.read_bytes())
        gen = confined(model_dir, "generation_config.json")
        generation = {}
        if gen.is_file():
            try:
                generation = json.loads(gen.read_text(encoding="utf-8"))
            except ValueError as e:  # UnicodeDecodeError is a ValueError too
                raise CheckpointError(f"{gen} is not valid UTF-8 JSON ({e}). Fix or remove it.") from e
        manifest = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION if fuse_layers else 1,
            "created_by": "swapmoe_export 0.1.0",
            "source": str(model_dir.resolve()),
            "dtype": dense.storage,
            **({"dense_dtype": dense.name, "dense_nbits": dense.manifest()} if dense.bits else {}),
            "expert_dtype": expert_dtype,
            "expert_dtype_lossy": quant.LOSSY[expert_dtype],
            "config": config_to_dict(cfg),
            "hf_config": raw_cfg,
            "tokenizer": "tokenizer.json" if tok.is_file() else None,
            "generation": generation,
            "extra": _tokenizer_extra(model_dir),
            **body,
            "files": writer.files,
            "validation": None,
        }
        reader.close()
        if validate:
            # The manifest goes in first so the runtime code can read the unfinished artifact;
            # the directory is still hidden, so nobody else sees it yet.
            write_manifest(tmp, manifest)
            report = validate_artifact(model_dir, tmp, dtype=dense.storage, expert_dtype=expert_dtype)
            manifest["validation"] = report
            progress.step(validation_summary(report))
        write_manifest(tmp, manifest)
        install(tmp, out)
        progress.say(f"wrote {out} ({sum(f['size'] for f in writer.files.values()) / 2**20:.1f} MiB)")
        return out


def _write_subgraphs(reader: CheckpointReader, cfg: ModelConfig, dtype: quant.DenseWeights, expert_dtype: str, writer: ArtifactWriter,
                     progress: Progress, fuse_layers: bool = True, rungs: tuple[str, ...] = (),
                     expert_level: int = quant.INT4_ACCURACY, ladder_block: int = ladder.BLOCK) -> dict:
    subgraphs: dict[str, dict] = {}
    layers: list[dict] = []
    experts: list[dict] = []

    def add(name: str, kind: str, model) -> str:
        rel = f"dense/{name}.onnx"
        writer.write_onnx(rel, model)
        ins, outs = graphs.IO[kind]
        subgraphs[name] = {"file": rel, "inputs": list(ins), "outputs": list(outs)}
        return name

    def shared_weight() -> np.ndarray:
        return reader.get_first("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

    shared = shared_weight()
    add("embed", "embed", graphs.embed_graph(shared, dtype))
    for stack in ("encoder", "decoder"):
        # Recent transformers keep untied encoder/decoder embeddings when
        # tie_word_embeddings is false; when they equal `shared`, both stacks share one file.
        own = f"{stack}.embed_tokens.weight"
        table = reader.get(own) if reader.has(own) else shared
        if table is shared or np.array_equal(table, shared):
            subgraphs[f"{stack[:3]}.embed"] = dict(subgraphs["embed"])
        else:
            add(f"{stack[:3]}.embed", "embed", graphs.embed_graph(table, dtype))
        del table
    del shared  # 100 MB at switch-base size: read again for the LM head instead of holding it
    progress.step("embeddings")
    for stack in ("encoder", "decoder"):
        table = graphs.relative_position_buckets(stack == "encoder", cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        w = reader.get(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        add(f"{stack[:3]}.position_bias", "position_bias",
            graphs.position_bias_graph(f"/{stack}/position_bias", w, table, cfg.relative_attention_max_distance, dtype))
    progress.step("relative position bias")

    for stack in ("encoder", "decoder"):
        for i in range(cfg.depth(stack)):
            t0 = time.perf_counter()
            p = f"{stack}.block.{i}.layer"
            name = f"{STACK_PREFIX[stack]}.L{i:02d}"
            scope = f"/{stack}/block.{i}"

            def attn_w(prefix: str) -> dict:
                return {k: reader.get(f"{prefix}.{k}.weight") for k in "qkvo"}

            sa = attn_w(f"{p}.0.SelfAttention")
            sa["layer_norm"] = reader.get(f"{p}.0.layer_norm.weight")
            ca = None
            if stack == "decoder":
                ca = attn_w(f"{p}.1.EncDecAttention")
                ca["layer_norm"] = reader.get(f"{p}.1.layer_norm.weight")
            ff = ff_prefix(stack, i)
            sparse = cfg.is_sparse(stack, i)
            w = {"layer_norm": reader.get(f"{ff}.layer_norm.weight")}
            if not sparse:
                w.update(wi=reader.get(f"{ff}.mlp.wi.weight"), wo=reader.get(f"{ff}.mlp.wo.weight"))
            else:
                w["classifier"] = reader.get(f"{ff}.mlp.router.classifier.weight")
                if cfg.router_bias:
                    w["classifier_bias"] = reader.get(f"{ff}.mlp.router.classifier.bias")
            parts = fused.add_layer_graphs(add, name, scope, stack, sa, ca, w, cfg, dtype, sparse, fuse_layers)
            del sa, ca, w
            layer = {"stack": stack, "layer": i, "sparse": sparse, "parts": parts}
            if sparse:
                layer["experts"] = list(range(cfg.num_experts))
                for e in range(cfg.num_experts):
                    experts.append(_write_expert(reader, cfg, expert_dtype, writer, ExpertKey(stack, i, e), f"{ff}.mlp.experts.expert_{e}",
                                                 scope, rungs, expert_level, ladder_block))
            layers.append(layer)
            kind = f"sparse, {cfg.num_experts} experts" if sparse else "dense"
            progress.step(f"{name} ({kind}) {time.perf_counter() - t0:.1f}s")

    add("enc.final_norm", "final_norm", graphs.final_norm_graph("/encoder/final_norm", reader.get("encoder.final_layer_norm.weight"), cfg, dtype))
    lm = shared_weight() if cfg.tie_word_embeddings else reader.get("lm_head.weight")
    model = graphs.lm_head_graph(reader.get("decoder.final_layer_norm.weight"), lm, cfg, dtype,
                                 fused=fuse_layers and fused.CONTRIB_OPS)
    del lm  # the graph holds its own copy
    add("lm_head", "lm_head", model)
    kernel_io = f"expert_kernel_{expert_dtype}" if expert_dtype in ("int8", "int4") else "expert_kernel"
    add("expert_kernel", kernel_io, graphs.expert_kernel_graph(cfg.d_model, cfg.d_ff, cfg.dense_act_fn, expert_dtype))
    body = {"subgraphs": subgraphs, "layers": layers, "experts": experts}
    if rungs and experts:
        body["ladder"] = add_ladder_graphs(writer, add, cfg, rungs, experts[0])
    if expert_dtype == "int4":
        body["expert_nbits"] = quant.expert_nbits(expert_level)
    progress.step("final norms and LM head")
    return body


def add_ladder_graphs(writer: ArtifactWriter, add, cfg: ModelConfig, rungs: tuple[str, ...], first_expert: dict) -> dict:
    """Each rung's session template and standard-op kernel; the manifest's ``ladder`` entry."""
    out = {}
    for rung in rungs:
        out[rung] = ladder.write_templates(writer, cfg.d_model, cfg.d_ff, cfg.dense_act_fn, rung, first_expert["rungs"][rung])
        add(ladder.kernel_name(rung), "rung_kernel",
            ladder.kernel_graph(cfg.d_model, cfg.d_ff, cfg.dense_act_fn, rung, out[rung]["block"]))
    return out


def _write_expert(reader: CheckpointReader, cfg: ModelConfig, expert_dtype: str, writer: ArtifactWriter, key: ExpertKey, prefix: str, scope: str,
                  rungs: tuple[str, ...] = (), expert_level: int = quant.INT4_ACCURACY, ladder_block: int = ladder.BLOCK) -> dict:
    wi_t = np.ascontiguousarray(reader.get(f"{prefix}.wi.weight").T)  # [D, F], as the graph multiplies
    wo_t = np.ascontiguousarray(reader.get(f"{prefix}.wo.weight").T)  # [F, D]
    bin_rel = f"experts/{key.name}.bin"
    name = f"{scope}/moe/expert.{key.expert}"
    if expert_dtype == "int8":
        (qi, si), (qo, so) = quant.quantize_int8(wi_t), quant.quantize_int8(wo_t)
        parts = {"wi": qi, "wi_scale": si, "wo": qo, "wo_scale": so}
        offs = dict(zip(parts, writer.write_blocks(bin_rel, list(parts.values()))))
        model = graphs.expert_int8_graph(name, parts, cfg.dense_act_fn, f"{key.name}.bin", offs)
        ran = (quant.dequantize_int8(qi, si), quant.dequantize_int8(qo, so))
    elif expert_dtype == "int4":
        try:
            parts, ran = ladder.int4_expert(wi_t, wo_t)
        except ValueError as e:
            raise ExportError(f"expert {key.name}: {e}. Export with --expert-dtype int8 instead.") from e
        offs = dict(zip(parts, writer.write_blocks(bin_rel, list(parts.values()))))
        model = ladder.int4_expert_graph(name, cfg.d_model, cfg.d_ff, cfg.dense_act_fn, parts, offs, f"{key.name}.bin",
                                         expert_level)
    else:
        parts = {"wi": wi_t.astype(expert_dtype), "wo": wo_t.astype(expert_dtype)}
        offs = dict(zip(parts, writer.write_blocks(bin_rel, list(parts.values()))))
        model = graphs.expert_graph(name, wi_t.T, wo_t.T, cfg.dense_act_fn, expert_dtype, f"{key.name}.bin", (offs["wi"], offs["wo"]))
        ran = (parts["wi"], parts["wo"])
    # ||E|| of SwapMoE's Eq. 1, on the weights that actually run.
    norm = float(np.sqrt(sum(np.sum(np.asarray(w, np.float64) ** 2) for w in ran)))
    onnx_rel = f"experts/{key.name}.onnx"
    writer.write_onnx(onnx_rel, model)
    ins, outs = graphs.IO["expert"]
    rung_entries = {r: ladder.write_rung(writer, key.name, name, wi_t, wo_t, r, ladder_block)  # from the checkpoint's weights
                    for r in rungs}
    return {
        **({"rungs": rung_entries} if rung_entries else {}),
        "stack": key.stack,
        "layer": key.layer,
        "expert": key.expert,
        "graph": {"file": onnx_rel, "inputs": list(ins), "outputs": list(outs)},
        "weights_file": bin_rel,
        "nbytes": writer.files[bin_rel]["size"],
        "norm": norm,
        "tensors": [
            {"name": f"{name}/{quant.TENSOR_LEAF[role]}", "role": role, "offset": offs[role], "shape": list(arr.shape), "dtype": str(arr.dtype)}
            for role, arr in parts.items()
        ],
    }
