"""What swapmoe's decoder prediction costs in time: TTFT, decode and stall of
``predict_decoder=auto`` against ``off``, paired (docs/results/streams/README.md).

    python scripts/bench_predict_cost.py --data CORPUS/test.jsonl --budget 33% --docs 480 [--artifact ART]

One process holds both runtimes; batches of 8 documents go to both, in alternating order.
Prints the medians over requests of TTFT and decode time per token, and stall per request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings

from swapmoe_export import export_checkpoint

from swapmoe_edge.lab.evaluate import read_pairs
from swapmoe_edge.runtime.embedded import default_artifact
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", help="default: the embedded model (its profile has a predictor)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--budget", default="33%")
    ap.add_argument("--docs", type=int, default=240)
    ap.add_argument("--order", default="shuffled")
    ap.add_argument("--modes", default="auto,off", help="two predict_decoder modes (off,off: the bench's own noise)")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message=r"input \d+ has \d+ tokens; truncated")
    art = a.artifact or default_artifact(export_checkpoint, quiet=True)
    docs = read_pairs(a.data, a.docs, a.order)
    modes = tuple(a.modes.split(","))
    if len(modes) != 2:
        sys.exit("--modes takes two predict_decoder modes, e.g. auto,off")
    rts = [Runtime(art, RuntimeConfig(policy="swapmoe", budget=a.budget, threads=1, predict_decoder=m)) for m in modes]
    try:
        stats: list[list[dict]] = [[], []]
        for i in range(0, len(docs), 8):
            texts = [d["text"] for d in docs[i:i + 8]]
            for j in (0, 1) if (i // 8) % 2 == 0 else (1, 0):
                stats[j] += [r.stats for r in rts[j].summarize(texts)]
        for m, rows in zip(modes, stats):
            req = list({s["request"]: s for s in rows}.values())
            print(f"{a.budget} {m} ttft_ms median {statistics.median(s['ttft_ms'] for s in req):.2f} "
                  f"decode ms/token median {statistics.median(s['decode_ms_per_token'] for s in req):.3f} "
                  f"stall ms/request {sum(s['stall_ms'] for s in req) / len(req):.2f} requests {len(req)}")
    finally:
        for rt in rts:
            rt.close()


if __name__ == "__main__":
    main()
