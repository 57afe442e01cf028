"""Time to first token of the ladder against prune, and where the ladder's goes.

    python scripts/bench_ladder_ttft.py --budget 2.6GiB --cell prune:ART --cell ladder:ART \
        [--cell ladder:ART_LEVEL0] [--rounds 3] [--requests 8] [--source-len 64] [--out r.json]

Each cell runs in a fresh process (a runtime's budget is its process's: two cannot share
one), the cells in turn, round after round, so that a shared machine's load falls on all of
them alike. In a cell: the runtime starts, serves one request, waits until its start set is
resident (``wait_ready``), then serves ``--requests`` requests of ``--source-len`` random
token ids (the same ids in every cell and round) with one new token each: the request's
TTFT. Around each request the expert calls are counted and timed (the shared float kernel
and the rungs' runners), giving the expert share of the TTFT, the calls and the tokens per
call. Reported per cell: the median TTFT over all requests and rounds, and the median (and
quartiles) of the per-request ratio to the first cell's request on the same ids in the
same round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(cells: list[tuple[str, str]], budget: str, requests: int, source_len: int, threads: int) -> dict:
    """The cells' runtimes in this process (one, unless their budgets allow more); the requests
    go to each in turn, the order rotating request by request."""
    import numpy as np

    from swapmoe_edge.model.rungs import RungRunner
    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig

    acc = {"ms": 0.0, "calls": 0, "tokens": 0}
    rung_run = RungRunner.run

    def timed_rung(self, expert, x):
        t = time.perf_counter()
        y = rung_run(self, expert, x)
        _count(acc, t, x)
        return y

    RungRunner.run = timed_rung
    rts = []
    for policy, art in cells:
        rt = Runtime(art, RuntimeConfig(policy=policy, budget=budget, threads=threads))
        kernel = rt.sessions.get("expert_kernel")
        inner = kernel.run

        def run(out, feeds, *rest, inner=inner):
            t = time.perf_counter()
            y = inner(out, feeds, *rest)
            _count(acc, t, feeds["x"])
            return y

        kernel.run = run
        rts.append(rt)
    vocab = rts[0].manifest.config.vocab_size
    rows = [[int(t) for t in np.random.default_rng(7000 + i).integers(3, vocab, source_len)] + [1] for i in range(requests + 1)]
    for rt in rts:
        rt.generate([rows[0]], max_new_tokens=1)
    for rt in rts:
        rt.wait_ready(timeout=3600)
    out: list[list[dict]] = [[] for _ in rts]
    for i, row in enumerate(rows[1:]):
        for j in [(i + k) % len(rts) for k in range(len(rts))]:
            acc.update(ms=0.0, calls=0, tokens=0)
            r = rts[j].generate([row], max_new_tokens=1)[0]
            out[j].append({"ttft_ms": r.stats["ttft_ms"], "expert_ms": acc["ms"], "expert_calls": acc["calls"],
                           "expert_tokens": acc["tokens"], "first_choice_resident": r.stats["first_choice_resident"]})
    res = [{"requests": o, "residents": rt.residents_by_rung() if rt.policy.name == "ladder" else
            sum(rt.residents.counts().values())} for o, rt in zip(out, rts)]
    for rt in rts:
        rt.close()
    return {"cells": res}


def _count(acc: dict, t: float, x) -> None:
    acc["ms"] += (time.perf_counter() - t) * 1e3
    acc["calls"] += 1
    acc["tokens"] += int(x.shape[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", action="append", required=True, help="POLICY:ARTIFACT (the first is the reference)")
    ap.add_argument("--budget", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--source-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cells = [tuple(c.split(":", 1)) for c in a.cell]
    if a.worker:
        print(json.dumps(worker(cells, a.budget, a.requests, a.source_len, a.threads)))
        return 0
    runs: dict[str, list[dict]] = {c: [] for c in a.cell}
    for rnd in range(a.rounds):
        for cell in a.cell:
            cmd = [sys.executable, __file__, "--worker", "--budget", a.budget, "--requests", str(a.requests),
                   "--source-len", str(a.source_len), "--threads", str(a.threads), "--cell", cell]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                print(p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"round {rnd + 1}, {cell} failed")
            res = json.loads(p.stdout.strip().splitlines()[-1])["cells"][0]
            reqs = res["requests"]
            res["median_ttft_ms"] = statistics.median(r["ttft_ms"] for r in reqs)
            res["median_expert_ms"] = statistics.median(r["expert_ms"] for r in reqs)
            res["median_expert_calls"] = statistics.median(r["expert_calls"] for r in reqs)
            res["tokens_per_call"] = sum(r["expert_tokens"] for r in reqs) / max(1, sum(r["expert_calls"] for r in reqs))
            runs[cell].append(res)
            print(f"round {rnd + 1} {cell}: ttft {res['median_ttft_ms']:.0f} ms, experts {res['median_expert_ms']:.0f} ms in "
                  f"{res['median_expert_calls']:.0f} calls ({res['tokens_per_call']:.1f} tokens a call), residents {res['residents']}",
                  flush=True)
    ref = a.cell[0]
    summary = {}
    for cell, rs in runs.items():
        # per request, the ratio to the reference's request of the same ids in the same process
        ratios = [r["ttft_ms"] / q["ttft_ms"] for run, base in zip(rs, runs[ref]) for r, q in zip(run["requests"], base["requests"])]
        summary[cell] = {"ttft_ms": statistics.median(r["ttft_ms"] for run in rs for r in run["requests"]),
                         "expert_ms": statistics.median(r["expert_ms"] for run in rs for r in run["requests"]),
                         "expert_calls": statistics.median(r["expert_calls"] for run in rs for r in run["requests"]),
                         "tokens_per_call": statistics.median(r["tokens_per_call"] for r in rs),
                         "ratio_to_first": statistics.median(ratios),
                         "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios}
        s = summary[cell]
        print(f"{cell} at {a.budget}: TTFT {s['ttft_ms']:.0f} ms, x{s['ratio_to_first']:.2f} of {ref} "
              f"(quartiles {', '.join(f'{x:.2f}' for x in s['ratio_quartiles'])}); experts {s['expert_ms']:.0f} ms, "
              f"{s['expert_calls']:.0f} calls, {s['tokens_per_call']:.1f} tokens a call")
    if a.out:
        Path(a.out).write_text(json.dumps({"settings": vars(a), "summary": summary, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
