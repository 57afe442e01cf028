"""The routing arithmetic's cost per sparse-layer call, one token (decoding one row) and a prefill.

    python docs/results/topk/bench_route.py [--repeat 9] [--number 2000]

In one process, for Switch's top-1 route and top-k shapes of the decoder-only families, all
experts allowed (full) and a third of them allowed (a masked policy: substitute, drop): the
median over --repeat rounds of the mean microseconds a call of route + dispatch (experts that
cost nothing) takes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import timeit

import numpy as np

from swapmoe_edge.model.moe import dispatch, route, route_topk

SHAPES = [("switch top-1 of 8", 8, 1), ("mixtral top-2 of 8", 8, 2), ("olmoe top-8 of 64", 64, 8),
          ("qwen3-moe top-8 of 128", 128, 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--number", type=int, default=2000)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name, e, k in SHAPES:
        for tokens in (1, 64):
            logits = (rng.normal(size=(1, tokens, e)) * 2).astype(np.float32)
            x = rng.normal(size=(1, tokens, 16)).astype(np.float32)
            allowed = np.arange(e) % 3 == 0
            for mode, mask, absent in (("all allowed", None, "substitute"), ("1/3 substitute", allowed, "substitute"),
                                       ("1/3 drop", allowed, "drop")):
                if k == 1:
                    call = lambda: dispatch(route(logits, 64, mask, absent=absent), x, lambda i, xs: xs)  # noqa: E731
                else:
                    call = lambda: dispatch(route_topk(logits, k, mask, True, absent), x, lambda i, xs: xs)  # noqa: E731
                n = a.number if tokens == 1 else a.number // 10
                us = statistics.median(t / n * 1e6 for t in timeit.repeat(call, number=n, repeat=a.repeat))
                rows.append({"shape": name, "tokens": tokens, "mode": mode, "us_per_call": us})
    print("| shape | tokens | experts allowed | µs a call (route + dispatch) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['tokens']} | {r['mode']} | {r['us_per_call']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
