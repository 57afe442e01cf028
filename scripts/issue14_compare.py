"""swapmoe against prune per stream and budget, from the sweeps of scripts/issue14_results.sh.

    python scripts/issue14_compare.py WORK_DIR   # reads WORK_DIR/sweep-{shuffled,grouped,shifted}/cells

Besides the two policies' figures it prints the standard error of the ROUGE-2 difference,
paired by document (per-document ROUGE-2 against the reference, the same documents in the
same order): a difference within about two of them is within what 1,000 documents resolve.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swapmoe_edge.lab.evaluate import _scorer, read_pairs  # noqa: E402


def cell(work: Path, stream: str, policy: str, budget: str) -> dict | None:
    path = work / f"sweep-{stream}" / "cells" / f"{policy}__{budget.replace('%', 'pct')}__importance.json"
    return json.loads(path.read_text()) if path.is_file() else None


def paired_se(a: dict, b: dict) -> float:
    """Standard error of mean(ROUGE-2 of b - ROUGE-2 of a) over the documents of the cells' stream."""
    s = a["settings"]
    docs = read_pairs(s["data"], s["limit"], s["order"], s["sections"], s["exclude_sections"])
    scorer = _scorer()
    diffs = []
    for ref, x, y in zip((d["summary"] for d in docs), a["outputs"], b["outputs"]):
        if x["summary"] == y["summary"]:
            diffs.append(0.0)
            continue
        diffs.append(scorer.score(ref, y["summary"])["rouge2"].fmeasure - scorer.score(ref, x["summary"])["rouge2"].fmeasure)
    n = len(diffs)
    mean = sum(diffs) / n
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)


def main(work: Path) -> None:
    print("| stream | budget | prune ROUGE-2 | swapmoe ROUGE-2 | Δ (± paired s.e.) | prune same-as-full | "
          "swapmoe same-as-full | Δ | swapmoe experts per layer | swaps |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for stream in ("shuffled", "grouped", "shifted"):
        full = work / f"sweep-{stream}" / "cells" / "full__100pct.json"
        if full.is_file():
            f = json.loads(full.read_text())
            print(f"| {stream} | full | {f['rouge2']:.4f} | | | 100% | | | | |")
        for budget in ("75%", "50%", "33%", "25%"):
            p, s = cell(work, stream, "prune", budget), cell(work, stream, "swapmoe", budget)
            if p is None or s is None:
                continue
            pe, se = p["fidelity"]["exact_match"], s["fidelity"]["exact_match"]
            counts = "/".join(str(n) for n in s["resident_experts_per_layer"].values())
            print(f"| {stream} | {budget} | {p['rouge2']:.4f} | {s['rouge2']:.4f} | "
                  f"{s['rouge2'] - p['rouge2']:+.4f} (± {paired_se(p, s):.4f}) | {pe:.1%} | {se:.1%} | "
                  f"{100 * (se - pe):+.1f} | {counts} | {s['swaps']} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
