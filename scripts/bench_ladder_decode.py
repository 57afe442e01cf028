"""Decode time of policies against `full`, paired batch by batch.

    python scripts/bench_ladder_decode.py ARTIFACT --data test.jsonl [--budgets 33%,15%] \
        [--policies ladder,swapmoe,prune] [--docs 64] [--rounds 5] [--out decode.json]

A sweep runs its cells minutes apart, and on a shared machine the load moves between
them (the same `full` cell gave 1.0-1.8 ms/token within one hour). Here each (policy,
budget) runs beside a `full` runtime in the same process: both are opened and warmed, then
they take the same batches of 8 documents in turn (greedy, one ORT thread), and each batch
gives a ratio (the policy's decode ms/token over `full`'s mean on the batches before and
after it). Configurations take turns round by round; a configuration's figure is the median
of all its batch ratios, with the quartiles. (Until 2026-12-02 each round ran `full` once and
then every configuration in a fresh runtime, so one `full` figure set every ratio of a round:
`prune` at 100%, which does full's work, came out anywhere from 0.83x to 1.38x.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from swapmoe_edge.lab.evaluate import read_pairs
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def _pairs(artifact: Path, texts: list[str], threads: int, policy: str, budget: str, lowbit_kernel: str = "auto"
           ) -> tuple[list[float], list[float]]:
    """(policy / full ratio per batch, full ms/token per batch), the two runtimes taking turns."""
    batches = [texts[i: i + 8] for i in range(0, len(texts), 8)]
    with Runtime(artifact, RuntimeConfig(threads=threads, policy="full", budget="100%")) as full, \
            Runtime(artifact, RuntimeConfig(threads=threads, policy=policy, budget=budget, lowbit_kernel=lowbit_kernel)) as rt:
        for r in (full, rt):
            r.summarize(batches[0])  # warm: sessions, arenas, the swapper's first plan

        def ms(r, batch):
            return r.summarize(batch)[0].stats["decode_ms_per_token"]

        base = [ms(full, batches[0])]
        ratios = []
        for batch in batches:
            mine = ms(rt, batch)
            base.append(ms(full, batch))
            ratios.append(mine / ((base[-2] + base[-1]) / 2))
    return ratios, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--budgets", default="100%,75%,50%,33%,25%,15%")
    ap.add_argument("--policies", default="ladder")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lowbit-kernel", default="auto", help="the ladder's rung kernels (auto|nbits|standard)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    texts = [d["text"] for d in read_pairs(a.data, a.docs)]
    configs = [(p, b) for p in a.policies.split(",") for b in a.budgets.split(",")]
    ratios: dict[str, list[float]] = {f"{p} {b}": [] for p, b in configs}
    full_ms = []
    import warnings

    warnings.filterwarnings("ignore", message=r"input \d+ has \d+ tokens; truncated")
    for rnd in range(a.rounds):
        for p, b in configs:
            r, base = _pairs(a.artifact, texts, a.threads, p, b, a.lowbit_kernel)
            ratios[f"{p} {b}"] += r
            full_ms += base
            print(f"round {rnd + 1}/{a.rounds}: {p} {b} {statistics.median(r):.2f}x "
                  f"(full {statistics.median(base):.2f} ms/token)", file=sys.stderr, flush=True)

    def quartiles(v):
        q = statistics.quantiles(v, n=4)
        return {"median": statistics.median(v), "p25": q[0], "p75": q[2], "batches": len(v)}

    res = {"artifact": str(a.artifact), "documents": len(texts), "rounds": a.rounds, "threads": a.threads,
           "lowbit_kernel": a.lowbit_kernel,
           "pairing": "batch", "full_ms_per_token": statistics.median(full_ms),
           "ratios": {k: statistics.median(v) for k, v in ratios.items()},
           "quartiles": {k: quartiles(v) for k, v in ratios.items()},
           "per_batch": ratios}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
