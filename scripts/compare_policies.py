"""One policy against another per stream and budget, from `swapmoe sweep` output folders.

    python scripts/compare_policies.py WORK/sweep-shuffled WORK/sweep-grouped WORK/sweep-shifted \
        [--a prune --b swapmoe] [--budgets 75%,50%,33%,25%] [--planner importance]

Each folder is one stream (its name, less a leading ``sweep-``, labels the rows). Besides
the two policies' reference ROUGE-2 and same-as-full it prints the standard error of the
ROUGE-2 difference, paired by document (per-document ROUGE-2 against the reference, the same
documents in the same order): a difference within about two of them is within what the
stream's documents resolve.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swapmoe_edge.lab.evaluate import results_paired_se


def cell(sweep: Path, policy: str, budget: str, planner: str = "importance") -> dict | None:
    """The cell file of a `swapmoe sweep` folder, or None when that cell was not run."""
    name = "full__100pct.json" if policy == "full" else f"{policy}__{budget.replace('%', 'pct')}__{planner}.json"
    path = sweep / "cells" / name
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", type=Path, nargs="+", help="`swapmoe sweep -o` folders, one per stream")
    ap.add_argument("--a", default="prune", help="the policy compared against")
    ap.add_argument("--b", default="swapmoe", help="the policy compared")
    ap.add_argument("--budgets", default="75%,50%,33%,25%")
    ap.add_argument("--planner", default="importance")
    args = ap.parse_args()
    pa, pb = args.a, args.b
    print(f"| stream | budget | {pa} ROUGE-2 | {pb} ROUGE-2 | Δ (± paired s.e.) | {pa} same-as-full | "
          f"{pb} same-as-full | Δ | {pb} experts per layer | swaps |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sweep in args.sweeps:
        stream = sweep.name.removeprefix("sweep-")
        full = cell(sweep, "full", "100%")
        if full is not None:
            print(f"| {stream} | full | {full['rouge2']:.4f} | | | 100% | | | | |")
        for budget in args.budgets.split(","):
            a, b = cell(sweep, pa, budget, args.planner), cell(sweep, pb, budget, args.planner)
            if a is None or b is None:
                continue
            ea, eb = a["fidelity"]["exact_match"], b["fidelity"]["exact_match"]
            counts = "/".join(str(n) for n in b["resident_experts_per_layer"].values())
            print(f"| {stream} | {budget} | {a['rouge2']:.4f} | {b['rouge2']:.4f} | "
                  f"{b['rouge2'] - a['rouge2']:+.4f} (± {results_paired_se(a, b):.4f}) | {ea:.1%} | {eb:.1%} | "
                  f"{100 * (eb - ea):+.1f} | {counts} | {b['swaps']} |")


if __name__ == "__main__":
    main()
