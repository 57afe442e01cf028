"""What deterministic serving costs: the default runtime and a deterministic one, paired batch by batch.

    python scripts/bench_deterministic.py ARTIFACT --data test.jsonl [--policies swapmoe,ladder] \
        [--budgets 50%,33%,25%] [--docs 200] [--rounds 3] [--out cost.json]

For each (policy, budget) both runtimes are opened in this process (one ORT thread each) and
take the same batches of 8 documents in turn, the order flipped every batch, so that the load of
a shared machine falls on both alike. While one runs, the other's background work is held: the
default runtime's swapper is paused (its ``background_io`` closed, as during a prefill), and the
deterministic runtime's last boundary round is finished before the default one starts. Per
batch: decode ms/token, time to first token, and the time the deterministic runtime's request
boundaries cost: the rounds its requests waited for, plus the wait for the batch's last round
(what the next request would wait, back to back). A configuration's figure is the median of
its per-batch ratios (deterministic / default), with the quartiles, over all rounds; each round
opens fresh runtimes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from swapmoe_edge.lab.evaluate import read_pairs
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def _batch(rt: Runtime, texts: list[str]) -> dict[str, float]:
    """One batch's figures: medians over its requests (chunks), and the boundaries' waits summed."""
    res = rt.summarize(texts)
    t0 = time.perf_counter()
    rt.policy.settle()  # the last boundary's round, which the next request would wait for
    last = (time.perf_counter() - t0) * 1e3
    reqs = list({r.stats["request"]: r.stats for r in res}.values())
    return {"decode": statistics.median(s["decode_ms_per_token"] for s in reqs),
            "ttft": statistics.median(s["ttft_ms"] for s in reqs),
            "wait": sum(s["boundary_wait_ms"] for s in reqs) + last,
            "request": sum(s["request_ms"] for s in reqs),
            "swaps": sum(s["swaps"] for s in reqs),
            "deterministic": all(s["deterministic"] for s in reqs)}


def _round(artifact: Path, texts: list[str], threads: int, policy: str, budget: str) -> list[dict]:
    batches = [texts[i: i + 8] for i in range(0, len(texts), 8)]
    cfg = dict(threads=threads, policy=policy, budget=budget)
    with Runtime(artifact, RuntimeConfig(**cfg, deterministic=False)) as base, \
            Runtime(artifact, RuntimeConfig(**cfg, deterministic=True)) as det:
        out = []
        for i, batch in enumerate(batches):
            got = {}
            for name in (("default", "deterministic") if i % 2 == 0 else ("deterministic", "default")):
                if name == "default":
                    base.policy.background_io.set()
                    got[name] = _batch(base, batch)
                else:
                    base.policy.background_io.clear()  # the default's swapper waits while the other one runs
                    got[name] = _batch(det, batch)
            base.policy.background_io.set()
            out.append(got)
    return out


def _quartiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return [q[0], statistics.median(xs), q[2]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--budgets", default="50%,33%,25%")
    ap.add_argument("--policies", default="swapmoe,ladder")
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    texts = [d["text"] for d in read_pairs(a.data, a.docs)]
    rows = []
    for policy in a.policies.split(","):
        for budget in a.budgets.split(","):
            batches = []
            for _ in range(a.rounds):
                batches += _round(a.artifact, texts, a.threads, policy, budget)
            ratio = lambda k: _quartiles([b["deterministic"][k] / b["default"][k] for b in batches])  # noqa: E731
            row = {"policy": policy, "budget": budget, "batches": len(batches),
                   "decode_ms_default": statistics.median(b["default"]["decode"] for b in batches),
                   "decode_ms_deterministic": statistics.median(b["deterministic"]["decode"] for b in batches),
                   "decode_ratio_q1_median_q3": ratio("decode"),
                   "ttft_ratio_q1_median_q3": ratio("ttft"),
                   "boundary_wait_ms_per_batch": statistics.fmean(b["deterministic"]["wait"] for b in batches),
                   "request_ms_per_batch_default": statistics.fmean(b["default"]["request"] for b in batches),
                   "request_ms_per_batch_deterministic": statistics.fmean(b["deterministic"]["request"] for b in batches),
                   "swaps_per_batch_default": statistics.fmean(b["default"]["swaps"] for b in batches),
                   "swaps_per_batch_deterministic": statistics.fmean(b["deterministic"]["swaps"] for b in batches),
                   "all_deterministic": all(b["deterministic"]["deterministic"] for b in batches)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if a.out:
        a.out.write_text(json.dumps({"artifact": str(a.artifact), "docs": len(texts), "rounds": a.rounds,
                                     "threads": a.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
