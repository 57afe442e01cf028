"""What on-demand reads with each eviction rule, live: the same documents through the runtime
under ``on_demand_evict="recency"`` (least recently used) and ``"frequency"`` (least chosen so
far), one after the other in one process, at each budget.

    python scripts/bench_on_demand_evict.py ARTIFACT --data test.jsonl --limit 1000 \
        --budgets 50%,33%,25% [--beams 1] --json out.json

Greedy (or ``--beams``), 32 new tokens, batches of 8, one ORT thread, summaries through the
model's prompt template where it has one (as ``summarize``). Per budget and rule: experts read,
bytes read, token-loop stall, the share of first choices resident, and whether the summaries are
the recency run's token for token (on-demand is exact: they must be). Reads come from the page
cache here, so the stall is RAM-speed; bytes read is what a board's flash would serve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from swapmoe_edge.lab.streams import read_stream
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig

RULES = ("recency", "frequency")


def run(artifact: str, texts: list[str], budget: str, rule: str, batch: int, beams: int | None) -> dict:
    cfg = RuntimeConfig(policy="on-demand", budget=budget, threads=1, on_demand_evict=rule)
    requests: dict[int, dict] = {}
    ids: list[list[int]] = []
    t0 = time.perf_counter()
    with Runtime(artifact, cfg) as rt, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation notes, one a document
        for i in range(0, len(texts), batch):
            for r in rt.summarize(texts[i: i + batch], num_beams=beams):
                requests[r.stats["request"]] = r.stats  # a chunk's stats, once
                ids.append(list(r.token_ids))
    stats = list(requests.values())
    routed_hit = [s["first_choice_resident"] for s in stats]
    return {"rule": rule, "budget": budget, "requests": len(stats), "wall_s": time.perf_counter() - t0,
            "loads": sum(s["loads"] for s in stats), "bytes_read": sum(s["bytes_read"] for s in stats),
            "stall_ms": sum(s["stall_ms"] for s in stats),
            "first_choice_resident_median": sorted(routed_hit)[len(routed_hit) // 2] if routed_hit else 1.0,
            "token_ids": ids}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--budgets", default="50%,33%,25%")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--beams", type=int, default=None, help="beam width (default: the model's generation config)")
    ap.add_argument("--json", dest="out", default=None)
    a = ap.parse_args(argv)
    texts = [d["text"] for d in read_stream(a.data, a.limit)]
    cells = []
    for budget in [b.strip() for b in a.budgets.split(",") if b.strip()]:
        got = {rule: run(a.artifact, texts, budget, rule, a.batch_size, a.beams) for rule in RULES}
        base = got["recency"]
        for rule in RULES:
            c = got[rule]
            c["same_tokens_as_recency"] = c["token_ids"] == base["token_ids"]
            c["bytes_vs_recency"] = c["bytes_read"] / base["bytes_read"] if base["bytes_read"] else 1.0
            print(f"{budget} {rule:9s}: {c['loads']} experts read, {c['bytes_read'] / 1e6:.1f} MB "
                  f"({c['bytes_vs_recency']:.3f}x recency), stall {c['stall_ms'] / 1e3:.2f} s, first choice resident "
                  f"(median request) {c['first_choice_resident_median']:.3f}, same tokens {c['same_tokens_as_recency']}",
                  flush=True)
            cells.append({k: v for k, v in c.items() if k != "token_ids"})
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"artifact": a.artifact, "documents": len(texts), "cells": cells}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
