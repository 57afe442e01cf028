"""Peak RSS against the budget, and decode time, across budgets and policies.

    python scripts/bench_budget.py ARTIFACT --budgets 100% 50% 25% --policies swapmoe on-demand \
        [--requests 5] [--source-len 64] [--max-new-tokens 16] [--out results.json]

Every cell (policy x budget) runs in a fresh process, so its peak RSS is its own. A cell
makes one warm-up request, then ``--requests`` requests, each on new random token ids
(seeded: every cell sees the same inputs; no tokenizer needed, so synthetic checkpoints
work). Reported per cell: the budget in force, the process's peak RSS over the measured
requests (kernel VmHWM, reset before each request) and over its whole life, and medians
of time to first token and decode time per token; ratios are against the first policy's
100% cell when present. The inputs are random, so for lossy policies only speed and
memory mean anything here; quality is measured with `swapmoe eval` on real text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run_cell(artifact: str, policy: str, budget: str, requests: int, source_len: int, max_new_tokens: int, threads: int | None) -> dict:
    import numpy as np

    from swapmoe_edge.system import memory
    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig

    life_start = memory.current_rss()
    rt = Runtime(artifact, RuntimeConfig(policy=policy, budget=budget, threads=threads))
    vocab = rt.manifest.config.vocab_size
    def rows(i: int) -> list[list[int]]:  # request i: the same ids in every cell, new ids per request
        return [[int(t) for t in np.random.default_rng(i).integers(3, vocab, source_len)] + [1]]

    rt.generate(rows(0), max_new_tokens=max_new_tokens)  # warm-up
    stats = [rt.generate(rows(i + 1), max_new_tokens=max_new_tokens)[0].stats for i in range(requests)]
    rt.close()
    return {
        "policy": policy,
        "budget": budget,
        "budget_bytes": stats[-1]["budget_bytes"],
        "baseline_bytes": stats[-1]["baseline_bytes"],
        "resident_expert_bytes": stats[-1]["resident_expert_bytes"],
        "residents": stats[-1]["residents"],
        "peak_rss_bytes": max(s["peak_rss_bytes"] for s in stats),
        "process_start_rss_bytes": life_start,
        "ttft_ms": statistics.median(s["ttft_ms"] for s in stats),
        "decode_ms_per_token": statistics.median(s["decode_ms_per_token"] for s in stats),
        "bytes_read_per_request": statistics.median(s["bytes_read"] for s in stats),
        "swaps_per_request": statistics.median(s["swaps"] for s in stats),
        "loads_per_request": statistics.median(s["loads"] for s in stats),
        "stall_ms": statistics.median(s["stall_ms"] for s in stats),
        "first_choice_resident": statistics.median(s["first_choice_resident"] for s in stats),
        "steps": stats[-1]["steps"],
        "exact": stats[-1]["exact"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--budgets", nargs="+", default=["100%", "50%", "25%"])
    ap.add_argument("--policies", nargs="+", default=["swapmoe", "on-demand"])
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--source-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cell", nargs=2, metavar=("POLICY", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.artifact, *args.cell, args.requests, args.source_len, args.max_new_tokens, args.threads)))
        return
    rows = []
    for policy in args.policies:
        for budget in args.budgets:
            cmd = [sys.executable, __file__, args.artifact, "--cell", policy, budget, "--requests", str(args.requests),
                   "--source-len", str(args.source_len), "--max-new-tokens", str(args.max_new_tokens)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{policy} {budget}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["peak_over_budget"] = row["peak_rss_bytes"] / row["budget_bytes"]
            rows.append(row)
            print(f"{policy:>9} {budget:>5}: budget {row['budget_bytes'] / 2**20:7.0f} MiB  peak {row['peak_rss_bytes'] / 2**20:7.0f} MiB "
                  f"({row['peak_over_budget']:.3f}x)  ttft {row['ttft_ms']:7.1f} ms  decode {row['decode_ms_per_token']:6.1f} ms/tok  "
                  f"read/req {row['bytes_read_per_request'] / 2**20:6.1f} MiB  stall {row['stall_ms']:6.0f} ms  "
                  f"first-choice resident {row['first_choice_resident']:.2f}", file=sys.stderr, flush=True)
    ref = next((r for r in rows if r["budget"] == "100%"), rows[0] if rows else None)
    for r in rows:
        r["decode_ratio_vs_ref"] = r["decode_ms_per_token"] / ref["decode_ms_per_token"] if ref else None
    text = json.dumps({"artifact": args.artifact, "cells": rows, "reference": ref and f"{ref['policy']} {ref['budget']}"}, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
