#!/usr/bin/env python3
"""Write a random-weight Switch Transformers checkpoint in Hugging Face layout.

    python scripts/make_synthetic_checkpoint.py --shape switch-base-8 -o /tmp/sb8

The output directory gets sharded safetensors (``model-0000i-of-0000N.safetensors``),
``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map``), ``config.json``,
``generation_config.json`` and a ``synthetic_checkpoint.json`` marker. It loads with
``SwitchTransformersForConditionalGeneration.from_pretrained(DIR)``.

The weights are RANDOM (normal, with init scales roughly like HF's ``_init_weights`` so
activations stay finite): use them for scale, memory and speed work only, never for quality.

The model is never built in memory: tensors are generated one at a time with numpy, packed
into a shard up to ``--max-shard-size``, written with ``safetensors.numpy.save_file`` and
freed, so peak memory is about one shard. Only numpy and safetensors are imported (no torch,
no transformers). Tensor names mirror the state_dict of transformers'
``SwitchTransformersForConditionalGeneration`` with the tied embeddings left out (only
``shared.weight``). Shards are written under a temporary name and renamed when complete; the
index is written last, so an interrupted run is never mistaken for a complete checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time

import numpy as np
from safetensors.numpy import save_file

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


class CheckpointError(Exception):
    """A clean refusal: reported as a one-line message and a non-zero exit status."""


def make_config(shape: str) -> dict:
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


def nbytes(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * 4  # float32


def plan_shards(specs: list, max_bytes: int) -> list[list]:
    """Greedy packing in order (as HF does): a tensor larger than the limit gets its own shard."""
    shards, cur, cur_bytes = [], [], 0
    for spec in specs:
        size = nbytes(spec[1])
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


def make_checkpoint(shape: str, out: str, seed: int = 0, max_shard_bytes: int = 2 * 2**30,
                    quiet: bool = False) -> dict:
    """Write the checkpoint; return the index dict. Raises CheckpointError on a clean refusal."""
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg = make_config(shape)
    specs = tensor_specs(cfg)
    shards = plan_shards(specs, max_shard_bytes)
    total = sum(nbytes(s[1]) for s in specs)
    # safetensors headers + index entries (~2 x name + 128 B per tensor) + json files: an estimate.
    overhead = sum(2 * len(s[0]) + 128 for s in specs) + 16 * 1024
    reclaimable = prepare_dir(out)
    log(f"{shape}: {len(specs)} tensors, {total} bytes ({human(total)}) of float32 weights "
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
        generator=GENERATOR, shape=shape, seed=seed, max_shard_size=max_shard_bytes,
        note="RANDOM weights: for scale/speed work only, never for quality"))
    write_json(os.path.join(out, "config.json"), cfg)
    write_json(os.path.join(out, "generation_config.json"), dict(
        _from_model_config=True, decoder_start_token_id=cfg["decoder_start_token_id"],
        eos_token_id=cfg["eos_token_id"], pad_token_id=cfg["pad_token_id"], use_cache=True))

    umask = os.umask(0o022)
    os.umask(umask)
    mode = 0o666 & ~umask  # safetensors creates files 0600; give shards the usual permissions
    rng = np.random.default_rng(seed)
    weight_map, t_all = {}, time.perf_counter()
    for k, shard in enumerate(shards, 1):
        t0 = time.perf_counter()
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, tshape, std in shard:
            if std is None:
                arr = np.ones(tshape, dtype=np.float32)
            else:
                arr = rng.standard_normal(tshape, dtype=np.float32)
                arr *= np.float32(std)
            tensors[name] = arr
            weight_map[name] = fname
        path = os.path.join(out, fname)
        try:
            save_file(tensors, path + ".tmp", metadata={"format": "pt"})
            os.chmod(path + ".tmp", mode)
            os.replace(path + ".tmp", path)
        except BaseException:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            raise
        shard_bytes = sum(a.nbytes for a in tensors.values())
        del tensors, arr
        log(f"[{k}/{len(shards)}] {fname}: {len(shard)} tensors, {human(shard_bytes)} "
            f"in {time.perf_counter() - t0:.1f}s")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(os.path.join(out, INDEX_NAME), index)  # last: marks the checkpoint complete
    log(f"done: {human(total)} in {time.perf_counter() - t_all:.1f}s; RANDOM weights, not for quality")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GiB"),
                        help="max bytes of weights per shard, e.g. 2GiB, 500MB, 20KB (default 2GiB)")
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = parser.parse_args(argv)
    try:
        make_checkpoint(args.shape, args.output, args.seed, args.max_shard_size, args.quiet)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
