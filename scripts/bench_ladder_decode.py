"""Decode time of policies against `full`, paired: round by round, each configuration in turn.

    python scripts/bench_ladder_decode.py ARTIFACT --data test.jsonl [--budgets 33%,15%] \
        [--policies ladder,swapmoe,prune] [--docs 64] [--rounds 5] [--out decode.json]

A sweep runs its cells minutes apart, and on a shared machine the load moves between
them (the same `full` cell gave 1.0-1.8 ms/token in one session). Here every round runs
`full` and then each (policy, budget) on the same documents (batches of 8, greedy, one
ORT thread), so each round gives a ratio measured side by side; the figure is the median
of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from swapmoe_edge.evaluate import read_pairs
from swapmoe_edge.runtime import Runtime, RuntimeConfig


def _decode(artifact: Path, texts: list[str], threads: int, **kw) -> float:
    with Runtime(artifact, RuntimeConfig(threads=threads, **kw)) as rt:
        rt.summarize(texts[:8])  # warm: sessions, arenas, the swapper's first plan
        per_batch = [rt.summarize(texts[i: i + 8])[0].stats["decode_ms_per_token"] for i in range(0, len(texts), 8)]
    return statistics.median(per_batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--budgets", default="100%,75%,50%,33%,25%,15%")
    ap.add_argument("--policies", default="ladder")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    texts = [d["text"] for d in read_pairs(a.data, a.docs)]
    configs = [(p, b) for p in a.policies.split(",") for b in a.budgets.split(",")]
    ratios: dict[str, list[float]] = {f"{p} {b}": [] for p, b in configs}
    full_ms = []
    import warnings

    warnings.filterwarnings("ignore", message=r"input \d+ has \d+ tokens; truncated")
    for rnd in range(a.rounds):
        base = _decode(a.artifact, texts, a.threads, policy="full", budget="100%")
        full_ms.append(base)
        for p, b in configs:
            ms = _decode(a.artifact, texts, a.threads, policy=p, budget=b)
            ratios[f"{p} {b}"].append(ms / base)
        print(f"round {rnd + 1}/{a.rounds}: full {base:.2f} ms/token; " +
              ", ".join(f"{k} {v[-1]:.2f}x" for k, v in ratios.items()), file=sys.stderr, flush=True)
    res = {"artifact": str(a.artifact), "documents": len(texts), "rounds": a.rounds, "threads": a.threads,
           "full_ms_per_token": statistics.median(full_ms),
           "ratios": {k: statistics.median(v) for k, v in ratios.items()},
           "per_round": ratios}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
