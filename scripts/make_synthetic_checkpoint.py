#!/usr/bin/env python3
"""Write a random-weight MoE checkpoint (Switch or decoder-only) in Hugging Face layout.

    python scripts/make_synthetic_checkpoint.py --shape switch-base-8 -o /tmp/sb8
    python scripts/make_synthetic_checkpoint.py --shape olmoe-1b-7b --dtype float16 -o /tmp/olmoe
    python scripts/make_synthetic_checkpoint.py --shape olmoe-1b-7b --layers 2 -o /tmp/olmoe-2l
    python scripts/make_synthetic_checkpoint.py --shape mixtral-reduced --dtype float16 -o /tmp/mixtral-2l

Shapes: ``switch-base-{8,16,64}`` (SwitchTransformersForConditionalGeneration), ``olmoe-1b-7b``
(OlmoeForCausalLM at OLMoE-1B-7B's published widths: hidden 2048, 16 layers, 64 experts,
top-8, expert width 1024, 16 heads, vocab 50304), ``mixtral-reduced`` (MixtralForCausalLM at
Mixtral-8x7B's widths: hidden 4096, 8 experts, top-2, expert width 14336, 32 heads / 8 KV
heads, vocab 32000, but 2 layers), and ``tiny``, ``olmoe-tiny``, ``mixtral-tiny`` for tests.
``--layers N`` sets the depth of a decoder-only shape. Decoder-only experts are written in the
per-expert layout the models were published in (``mlp.experts.N.gate_proj/up_proj/down_proj``
for OLMoE, ``block_sparse_moe.experts.N.w1/w2/w3`` for Mixtral), which transformers converts
to its fused 3-D tensors when it loads them.

The output directory gets sharded safetensors (``model-0000i-of-0000N.safetensors``),
``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map``), ``config.json``,
``generation_config.json`` and a ``synthetic_checkpoint.json`` marker. It loads with
``SwitchTransformersForConditionalGeneration.from_pretrained(DIR)``.

The weights are RANDOM (normal, with init scales roughly like HF's ``_init_weights`` so
activations stay finite): use them for scale, memory and speed work only, never for quality.

The model is never built in memory: each shard's safetensors header is written first, then
every tensor is generated with numpy in chunks of at most ``CHUNK_ELEMS`` values and appended,
so peak memory is a few tens of MB whatever the shape. Only numpy is imported (no torch, no
transformers, no safetensors). Switch tensor names mirror the state_dict of transformers'
``SwitchTransformersForConditionalGeneration`` with the tied embeddings left out (only
``shared.weight``). Shards are written under a temporary name and renamed when complete; the
index is written last, so an interrupted run is never mistaken for a complete checkpoint.

Scales: Switch as HF's init roughly does; decoder-only linear weights and embeddings normal
with std ``initializer_range`` (0.02, as HF), norm weights 1, and router weights with std
``ROUTER_LOGIT_STD / sqrt(hidden)``: the router sees the RMS-normed hidden state (RMS 1), so
its logits have a spread of about ``ROUTER_LOGIT_STD`` (2.0: the top-2 of 8 hold ~3/4 of the
softmax mass, the top-8 of 64 about 2/3, instead of the near-uniform softmax HF's 0.02 init
gives at these widths).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import time

import numpy as np

INDEX_NAME = "model.safetensors.index.json"
MARKER_NAME = "synthetic_checkpoint.json"
GENERATOR = "swapmoe_edge/scripts/make_synthetic_checkpoint.py"
# Files this script owns in an output directory (removed before a re-run into the same DIR).
OWNED = re.compile(r"^(model-\d{5}-of-\d{5}\.safetensors(\.tmp)?|model\.safetensors\.index\.json(\.tmp)?"
                   r"|config\.json|generation_config\.json|synthetic_checkpoint\.json)$")

_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_layers=12,
             num_decoder_layers=12, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6,
             expert_capacity=64, relative_attention_num_buckets=32, relative_attention_max_distance=128)
SHAPES = {
    "tiny": dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
                 num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                 num_experts=4, expert_capacity=64, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16),
    "switch-base-8": dict(_BASE, num_experts=8),
    "switch-base-16": dict(_BASE, num_experts=16),
    "switch-base-64": dict(_BASE, num_experts=64),
}

# Decoder-only shapes: (HF architecture, config fields). The full-size fields are the published
# config.json facts of allenai/OLMoE-1B-7B-0924 and mistralai/Mixtral-8x7B-v0.1.
_OLMOE = dict(
    architectures=["OlmoeForCausalLM"], model_type="olmoe", vocab_size=50304, hidden_size=2048,
    intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
    num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, hidden_act="silu",
    max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-5, rope_theta=10000.0,
    rope_scaling=None, attention_bias=False, attention_dropout=0.0, clip_qkv=None,
    output_router_logits=False, router_aux_loss_coef=0.01, pad_token_id=1, bos_token_id=None,
    eos_token_id=50279, tie_word_embeddings=False, use_cache=True)
_MIXTRAL = dict(
    architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    num_local_experts=8, num_experts_per_tok=2, hidden_act="silu", max_position_embeddings=32768,
    initializer_range=0.02, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
    attention_dropout=0.0, output_router_logits=False, router_aux_loss_coef=0.02, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False, use_cache=True)
CAUSAL_SHAPES = {
    "olmoe-1b-7b": _OLMOE,
    "mixtral-reduced": dict(_MIXTRAL, num_hidden_layers=2),
    "olmoe-tiny": dict(_OLMOE, vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
                       max_position_embeddings=256, eos_token_id=2),
    "mixtral-tiny": dict(_MIXTRAL, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                         max_position_embeddings=256),
}
ROUTER_LOGIT_STD = 2.0
DTYPES = {"float32": (np.float32, "F32"), "float16": (np.float16, "F16")}
CHUNK_ELEMS = 1 << 23  # values generated at once (32 MiB of float32)


class CheckpointError(Exception):
    """A clean refusal: reported as a one-line message and a non-zero exit status."""


def make_config(shape: str, layers: int | None = None, dtype: str = "float32") -> dict:
    """config.json for a named shape (``layers``: depth of a decoder-only shape)."""
    if shape in CAUSAL_SHAPES:
        cfg = dict(CAUSAL_SHAPES[shape])
        if layers is not None:
            if layers < 1:
                raise CheckpointError(f"--layers must be at least 1, not {layers}")
            cfg["num_hidden_layers"] = layers
        cfg["dtype"] = dtype
        return cfg
    if layers is not None:
        raise CheckpointError(f"--layers applies to the decoder-only shapes ({', '.join(CAUSAL_SHAPES)}), "
                              f"not to {shape}")
    cfg = switch_config(shape)
    cfg["dtype"] = dtype
    return cfg


def switch_config(shape: str) -> dict:
    """All SwitchTransformersConfig fields (transformers 5.x defaults) for a named shape."""
    cfg = dict(
        architectures=["SwitchTransformersForConditionalGeneration"], model_type="switch_transformers",
        vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, expert_capacity=64, num_layers=12,
        num_sparse_encoder_layers=3, num_decoder_layers=12, num_sparse_decoder_layers=3, num_heads=12,
        num_experts=8, router_bias=False, router_jitter_noise=0.01, router_dtype="float32",
        router_ignore_padding_tokens=False, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6,
        router_z_loss_coef=0.001, router_aux_loss_coef=0.001, initializer_factor=1.0,
        dense_act_fn="relu", is_encoder_decoder=True, add_router_probs=False, use_cache=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, decoder_start_token_id=0,
        tie_word_embeddings=True, is_decoder=False, add_cross_attention=False, dtype="float32",
    )
    cfg.update(SHAPES[shape])
    # Same rule as SwitchTransformersConfig.__post_init__.
    for n_sparse, n_layers, key in (("num_sparse_encoder_layers", "num_layers", "encoder_sparse_step"),
                                    ("num_sparse_decoder_layers", "num_decoder_layers", "decoder_sparse_step")):
        cfg[key] = cfg[n_layers] // cfg[n_sparse] if cfg[n_sparse] > 0 else cfg[n_layers]
    return cfg


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], float | None]]:
    """(name, shape, std) in state_dict order; std None means ones (norm weights)."""
    if cfg["model_type"] in ("olmoe", "mixtral"):
        return causal_specs(cfg)
    return switch_specs(cfg)


def causal_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], float | None]]:
    """OlmoeForCausalLM / MixtralForCausalLM tensors as published (one tensor per expert matrix).

    OLMoE: ``model.layers.i.mlp.gate`` (router), ``mlp.experts.e.{gate,up,down}_proj``, and
    ``self_attn.q_norm`` / ``k_norm`` over the whole projection. Mixtral:
    ``block_sparse_moe.gate``, ``block_sparse_moe.experts.e.w1`` (gate), ``w2`` (down), ``w3`` (up).
    """
    d, f, h = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // h
    kv = cfg["num_key_value_heads"] * hd
    std, router = cfg["initializer_range"], ROUTER_LOGIT_STD / d ** 0.5
    olmoe = cfg["model_type"] == "olmoe"
    E = cfg["num_experts"] if olmoe else cfg["num_local_experts"]
    if cfg["tie_word_embeddings"]:
        raise CheckpointError("only tie_word_embeddings=False is supported")
    specs = [("model.embed_tokens.weight", (cfg["vocab_size"], d), std)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs.extend([(f"{p}.self_attn.q_proj.weight", (h * hd, d), std),
                      (f"{p}.self_attn.k_proj.weight", (kv, d), std),
                      (f"{p}.self_attn.v_proj.weight", (kv, d), std),
                      (f"{p}.self_attn.o_proj.weight", (d, h * hd), std)])
        if olmoe:
            specs.extend([(f"{p}.self_attn.q_norm.weight", (h * hd,), None),
                          (f"{p}.self_attn.k_norm.weight", (kv,), None)])
        moe = f"{p}.mlp" if olmoe else f"{p}.block_sparse_moe"
        specs.append((f"{moe}.gate.weight", (E, d), router))
        names = (("gate_proj", "up_proj", "down_proj") if olmoe else ("w1", "w3", "w2"))
        for e in range(E):
            specs.extend([(f"{moe}.experts.{e}.{names[0]}.weight", (f, d), std),
                          (f"{moe}.experts.{e}.{names[1]}.weight", (f, d), std),
                          (f"{moe}.experts.{e}.{names[2]}.weight", (d, f), std)])
        specs.extend([(f"{p}.input_layernorm.weight", (d,), None),
                      (f"{p}.post_attention_layernorm.weight", (d,), None)])
    specs.extend([("model.norm.weight", (d,), None), ("lm_head.weight", (cfg["vocab_size"], d), std)])
    return specs


def switch_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], float | None]]:
    """(name, shape, std) in state_dict order; std None means ones (layer norms).

    Mirrors modeling_switch_transformers.py: block i of a stack is sparse when
    ``i % step == 1 or step == 1``; block 0 owns the relative attention bias; decoder blocks
    have layer.0 SelfAttention, layer.1 EncDecAttention, layer.2 FF; encoder blocks layer.0/1.
    """
    d, dkv, h, dff, E = cfg["d_model"], cfg["d_kv"], cfg["num_heads"], cfg["d_ff"], cfg["num_experts"]
    inner, f = h * dkv, cfg["initializer_factor"]
    if not cfg["tie_word_embeddings"]:
        raise CheckpointError("only tie_word_embeddings=True is supported")
    specs = [("shared.weight", (cfg["vocab_size"], d), f * 1.0)]

    def attention(prefix: str, rel_bias: bool) -> None:
        specs.extend([(f"{prefix}.q.weight", (inner, d), f * (d * dkv) ** -0.5),
                      (f"{prefix}.k.weight", (inner, d), f * d ** -0.5),
                      (f"{prefix}.v.weight", (inner, d), f * d ** -0.5),
                      (f"{prefix}.o.weight", (d, inner), f * inner ** -0.5)])
        if rel_bias:
            specs.append((f"{prefix}.relative_attention_bias.weight",
                          (cfg["relative_attention_num_buckets"], h), f * d ** -0.5))

    for stack, n_layers, step in (("encoder", cfg["num_layers"], cfg["encoder_sparse_step"]),
                                  ("decoder", cfg["num_decoder_layers"], cfg["decoder_sparse_step"])):
        for i in range(n_layers):
            blk = f"{stack}.block.{i}.layer"
            attention(f"{blk}.0.SelfAttention", rel_bias=(i == 0))
            specs.append((f"{blk}.0.layer_norm.weight", (d,), None))
            ff = 1
            if stack == "decoder":
                attention(f"{blk}.1.EncDecAttention", rel_bias=False)
                specs.append((f"{blk}.1.layer_norm.weight", (d,), None))
                ff = 2
            sparse = (i % step == 1 or step == 1) if step > 0 else False
            if sparse:
                specs.append((f"{blk}.{ff}.mlp.router.classifier.weight", (E, d), f * 1.0))
                if cfg["router_bias"]:
                    specs.append((f"{blk}.{ff}.mlp.router.classifier.bias", (E,), 0.0))
                for e in range(E):
                    specs.extend([(f"{blk}.{ff}.mlp.experts.expert_{e}.wi.weight", (dff, d), f * d ** -0.5),
                                  (f"{blk}.{ff}.mlp.experts.expert_{e}.wo.weight", (d, dff), f * d ** -0.5)])
            else:
                specs.extend([(f"{blk}.{ff}.mlp.wi.weight", (dff, d), f * d ** -0.5),
                              (f"{blk}.{ff}.mlp.wo.weight", (d, dff), f * dff ** -0.5)])
            specs.append((f"{blk}.{ff}.layer_norm.weight", (d,), None))
        specs.append((f"{stack}.final_layer_norm.weight", (d,), None))
    return specs


def nbytes(shape: tuple[int, ...], itemsize: int = 4) -> int:
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def plan_shards(specs: list, max_bytes: int, itemsize: int = 4) -> list[list]:
    """Greedy packing in order (as HF does): a tensor larger than the limit gets its own shard."""
    shards, cur, cur_bytes = [], [], 0
    for spec in specs:
        size = nbytes(spec[1], itemsize)
        if cur and cur_bytes + size > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(spec)
        cur_bytes += size
    if cur:
        shards.append(cur)
    return shards


def parse_size(text: str) -> int:
    """'2GiB', '500MB', '20KB', '1048576' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 2GiB, 500MB, 20KB)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise argparse.ArgumentTypeError("shard size must be positive")
    return value


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def prepare_dir(out: str) -> int:
    """Refuse unsafe targets; return bytes held by this script's old files (to be replaced)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise CheckpointError(f"output path {out!r} exists and is not a directory; refusing to touch it")
    if not os.path.isdir(out):
        return 0
    entries = os.listdir(out)
    if entries and MARKER_NAME not in entries:
        raise CheckpointError(f"output directory {out!r} is not empty and was not written by this script "
                              f"(no {MARKER_NAME}); choose an empty or new directory")
    foreign = [e for e in entries if not OWNED.match(e)]
    if foreign:
        raise CheckpointError(f"output directory {out!r} holds files this script did not write: "
                              f"{', '.join(sorted(foreign)[:5])}; refusing to overwrite")
    return sum(os.path.getsize(os.path.join(out, e)) for e in entries)


def free_bytes(out: str) -> int:
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def generation_config(cfg: dict) -> dict:
    keys = (("decoder_start_token_id", "eos_token_id", "pad_token_id") if cfg["model_type"] == "switch_transformers"
            else ("bos_token_id", "eos_token_id", "pad_token_id"))
    return dict(_from_model_config=True, use_cache=True, **{k: cfg[k] for k in keys if cfg.get(k) is not None})


def tensor_chunks(shape: tuple[int, ...], std: float | None, rng: np.random.Generator, dtype):
    """The tensor's values, row blocks of at most CHUNK_ELEMS values, drawn in order from ``rng``."""
    rows, row = (shape[0], int(np.prod(shape[1:], dtype=np.int64))) if len(shape) > 1 else (1, shape[0])
    step = max(1, CHUNK_ELEMS // max(row, 1))
    for r0 in range(0, rows, step):
        n = (min(rows, r0 + step) - r0, row)
        if std is None:
            yield np.ones(n, dtype=dtype)
        else:
            arr = rng.standard_normal(n, dtype=np.float32)
            arr *= np.float32(std)
            yield arr.astype(dtype, copy=False)


def write_shard(path: str, shard: list, rng: np.random.Generator, dtype: str) -> int:
    """One safetensors file, header first, then each tensor streamed chunk by chunk; returns bytes."""
    np_dtype, st_dtype = DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in shard:
        size = nbytes(shape, itemsize)
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + size]}
        off += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for _, shape, std in shard:
            for chunk in tensor_chunks(shape, std, rng, np_dtype):
                fh.write(chunk.tobytes())
    return off


def make_checkpoint(shape: str, out: str, seed: int = 0, max_shard_bytes: int = 2 * 2**30,
                    quiet: bool = False, layers: int | None = None, dtype: str = "float32") -> dict:
    """Write the checkpoint; return the index dict. Raises CheckpointError on a clean refusal."""
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (use {' or '.join(DTYPES)})")
    itemsize = np.dtype(DTYPES[dtype][0]).itemsize
    cfg = make_config(shape, layers, dtype)
    specs = tensor_specs(cfg)
    shards = plan_shards(specs, max_shard_bytes, itemsize)
    total = sum(nbytes(s[1], itemsize) for s in specs)
    # safetensors headers + index entries (~2 x name + 128 B per tensor) + json files: an estimate.
    overhead = sum(2 * len(s[0]) + 128 for s in specs) + 16 * 1024
    reclaimable = prepare_dir(out)
    log(f"{shape}: {len(specs)} tensors, {total} bytes ({human(total)}) of {dtype} weights "
        f"in {len(shards)} shard(s) (+~{human(overhead)} headers/json) -> {out}")
    free = free_bytes(out) + reclaimable
    if total + overhead > free:
        raise CheckpointError(f"not enough disk space at {out!r}: need {human(total + overhead)}, "
                              f"{human(free)} available")

    os.makedirs(out, exist_ok=True)
    for entry in os.listdir(out):  # old output of this script: index first, so it never looks complete
        if entry == INDEX_NAME:
            os.remove(os.path.join(out, entry))
    for entry in os.listdir(out):
        if OWNED.match(entry):
            os.remove(os.path.join(out, entry))
    write_json(os.path.join(out, MARKER_NAME), dict(
        generator=GENERATOR, shape=shape, seed=seed, max_shard_size=max_shard_bytes, dtype=dtype,
        layers=cfg.get("num_hidden_layers", cfg.get("num_layers")),
        note="RANDOM weights: for scale/speed work only, never for quality"))
    write_json(os.path.join(out, "config.json"), cfg)
    write_json(os.path.join(out, "generation_config.json"), generation_config(cfg))

    umask = os.umask(0o022)
    os.umask(umask)
    mode = 0o666 & ~umask
    rng = np.random.default_rng(seed)
    weight_map, t_all = {}, time.perf_counter()
    for k, shard in enumerate(shards, 1):
        t0 = time.perf_counter()
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        path = os.path.join(out, fname)
        try:
            shard_bytes = write_shard(path + ".tmp", shard, rng, dtype)
            os.chmod(path + ".tmp", mode)
            os.replace(path + ".tmp", path)
        except BaseException:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            raise
        weight_map.update((name, fname) for name, _, _ in shard)
        log(f"[{k}/{len(shards)}] {fname}: {len(shard)} tensors, {human(shard_bytes)} "
            f"in {time.perf_counter() - t0:.1f}s")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(os.path.join(out, INDEX_NAME), index)  # last: marks the checkpoint complete
    log(f"done: {human(total)} in {time.perf_counter() - t_all:.1f}s; RANDOM weights, not for quality")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES) + sorted(CAUSAL_SHAPES))
    parser.add_argument("--layers", type=int, default=None,
                        help="depth of a decoder-only shape (default: the shape's own; mixtral-reduced: 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default float32)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GiB"),
                        help="max bytes of weights per shard, e.g. 2GiB, 500MB, 20KB (default 2GiB)")
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = parser.parse_args(argv)
    try:
        make_checkpoint(args.shape, args.output, args.seed, args.max_shard_size, args.quiet, args.layers, args.dtype)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
