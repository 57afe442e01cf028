"""Budget sweep over policies x budgets x planners on a summarisation set (library call, not the CLI).

    python scripts/sweep.py ARTIFACT --data val.jsonl --out runs/sweep \
        [--budgets 100% 50% 25%] [--policies full on-demand prune swapmoe] \
        [--planners importance uniform] [--limit 500] [--max-new-tokens 32]

Each cell runs in its own process (its peak RSS is its own); re-running the same command
resumes where it stopped. Writes OUT/cells/*.json, OUT/sweep.csv, OUT/sweep.json and three
PNG plots; see swapmoe_edge/sweep.py.
"""

from __future__ import annotations

import argparse
import sys

from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.lab.sweep import sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--data", required=True, help="JSONL with `text` and `summary`")
    ap.add_argument("--out", "-o", required=True)
    ap.add_argument("--budgets", nargs="+", default=["100%", "75%", "50%", "33%", "25%"])
    ap.add_argument("--policies", nargs="+", default=["full", "on-demand", "prune", "swapmoe"])
    ap.add_argument("--planners", nargs="+", default=["importance", "uniform"])
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout-s", type=float, default=None, help="per cell")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    try:
        res = sweep(args.artifact, args.data, args.out, budgets=args.budgets, policies=args.policies,
                    planners=args.planners, limit=args.limit, max_new_tokens=args.max_new_tokens,
                    num_beams=args.num_beams, batch_size=args.batch_size, threads=args.threads,
                    timeout_s=args.timeout_s, plots=not args.no_plots, quiet=args.quiet)
    except SwapMoEError as e:
        sys.exit(f"error: {e}")
    if res["failed"]:
        sys.exit(f"{len(res['failed'])} cell(s) failed; run again to retry them")


if __name__ == "__main__":
    main()
