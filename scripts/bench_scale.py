"""The paper's scale: synthetic switch-base-64 (14.2 GiB float32) under every policy, and HF eager.

    python scripts/bench_scale.py --work /tmp/scale [--shape switch-base-64] \
        [--budgets 4.7GiB 2.6GiB] [--requests 3] [--source-len 64] [--max-new-tokens 16] [--skip-hf]

Steps: make the random-weight checkpoint (scripts/make_synthetic_checkpoint.py), export it,
then run `full` and `on-demand`, `prune`, `swapmoe` at each budget (the paper's 4.7 GiB and
2.6 GiB), each cell in a fresh process (scripts/bench_budget.py --cell), on the same
inputs; then HF PyTorch eager `generate` on the same checkpoint, what a user would run
instead. The weights are random: speed and memory only, never quality.

Needs about 30 GiB of disk (checkpoint + artifact); it says so first and refuses cleanly
when the disk is short. Results: JSON on stdout and in WORK/scale.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

HF_CELL = r"""
import json, resource, sys, time, statistics
import numpy as np, torch
from transformers import SwitchTransformersForConditionalGeneration
ckpt, source_len, max_new, requests, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if threads > 0:
    torch.set_num_threads(threads)
t0 = time.perf_counter()
model = SwitchTransformersForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
load_s = time.perf_counter() - t0
vocab = model.config.vocab_size
def ids(i):
    row = [int(t) for t in np.random.default_rng(i).integers(3, vocab, source_len)] + [1]
    return torch.tensor([row])
def timed(x, n):
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - t, out.shape[1] - 1
timed(ids(0), 2)  # warm-up
ttft, decode = [], []
for i in range(requests):
    # from_pretrained maps the weights lazily: the first pass over a new input pays page
    # faults for experts it touches first. TTFT is taken cold, as a user sees it; the
    # per-token decode time from a warm pair, or it would be the fault cost divided by n.
    t1_cold, _ = timed(ids(i + 1), 1)
    timed(ids(i + 1), max_new)
    t1, _ = timed(ids(i + 1), 1)
    tn, n = timed(ids(i + 1), max_new)
    ttft.append(t1_cold * 1e3)
    decode.append((tn - t1) / max(1, n - 1) * 1e3)
print(json.dumps({"policy": "hf-eager", "budget": None, "load_s": load_s, "ttft_ms": statistics.median(ttft),
                  "decode_ms_per_token": statistics.median(decode), "steps": max_new,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "bytes_read_per_request": 0, "exact": True}))
"""


def run(cmd: list[str], what: str) -> None:
    print(f"[scale] {what}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0:
        sys.exit(f"[scale] {what} failed (exit {r.returncode})")


def cell(cmd: list[str], label: str) -> dict | None:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"[scale] {label}: failed\n{r.stderr[-3000:]}", file=sys.stderr)
        return None
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.perf_counter() - t
    print(f"[scale] {label}: decode {row['decode_ms_per_token']:.1f} ms/token, ttft {row['ttft_ms']:.0f} ms, "
          f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shape", default="switch-base-64")
    ap.add_argument("--budgets", nargs="+", default=["4.7GiB", "2.6GiB"])
    ap.add_argument("--policies", nargs="+", default=["on-demand", "prune", "swapmoe"])
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--source-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="threads for ONNX Runtime and torch alike (0: their defaults)")
    ap.add_argument("--no-validate", action="store_true", help="export without the PyTorch comparison")
    args = ap.parse_args()

    need = 32 * 2**30 if args.shape == "switch-base-64" else 8 * 2**30
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt, art = args.work / "ckpt", args.work / "artifact"
    have = sum(p.stat().st_size for p in ckpt.glob("*") if p.is_file()) + sum(p.stat().st_size for p in art.rglob("*") if p.is_file())
    free = shutil.disk_usage(args.work).free
    print(f"[scale] {args.shape}: needs about {need / 2**30:.0f} GiB of disk at {args.work} "
          f"({have / 2**30:.1f} GiB already there, {free / 2**30:.1f} GiB free)", file=sys.stderr)
    if free + have < need:
        sys.exit(f"[scale] not enough disk: {free / 2**30:.1f} GiB free, about {(need - have) / 2**30:.1f} GiB more needed. "
                 "Free space or pass another --work.")

    if not (ckpt / "model.safetensors.index.json").is_file():
        run([sys.executable, str(HERE / "make_synthetic_checkpoint.py"), "--shape", args.shape, "-o", str(ckpt)], "checkpoint")
    if not (art / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "swapmoe_edge", "export", str(ckpt), "-o", str(art)]
        run(cmd + (["--no-validate"] if args.no_validate else []), "export")

    common = ["--requests", str(args.requests), "--source-len", str(args.source_len), "--max-new-tokens", str(args.max_new_tokens)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    bench = [sys.executable, str(HERE / "bench_budget.py"), str(art)]
    rows = []
    for policy, budget in [("full", "100%")] + [(p, b) for b in args.budgets for p in args.policies]:
        row = cell(bench + ["--cell", policy, budget] + common, f"{policy} {budget}")
        if row:
            rows.append(row)
    if not args.skip_hf:
        row = cell([sys.executable, "-c", HF_CELL, str(ckpt), str(args.source_len), str(args.max_new_tokens), str(args.requests), str(args.threads)], "hf-eager")
        if row:
            rows.append(row)
    full = next((r for r in rows if r["policy"] == "full"), None)
    for r in rows:
        r["bytes_read_per_token"] = r.get("bytes_read_per_request", 0) / max(1, r.get("steps", 1))
        if full:
            r["decode_ratio_vs_full"] = r["decode_ms_per_token"] / full["decode_ms_per_token"]
            r["ttft_ratio_vs_full"] = r["ttft_ms"] / full["ttft_ms"]
        if r.get("budget_bytes"):
            r["peak_over_budget"] = r["peak_rss_bytes"] / r["budget_bytes"]
    out = {"shape": args.shape, "threads": args.threads or "default", "requests": args.requests, "source_len": args.source_len,
           "max_new_tokens": args.max_new_tokens, "cells": rows}
    (args.work / "scale.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
