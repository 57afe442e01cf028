"""swapmoe against prune per stream and budget, from the sweeps of scripts/issue14_results.sh.

    python scripts/issue14_compare.py WORK_DIR   # reads WORK_DIR/sweep-{shuffled,grouped,shifted}/cells
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cell(work: Path, stream: str, policy: str, budget: str) -> dict | None:
    path = work / f"sweep-{stream}" / "cells" / f"{policy}__{budget.replace('%', 'pct')}__importance.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main(work: Path) -> None:
    print("| stream | budget | prune ROUGE-2 | swapmoe ROUGE-2 | Δ | prune same-as-full | swapmoe same-as-full | Δ | swapmoe swaps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stream in ("shuffled", "grouped", "shifted"):
        full = work / f"sweep-{stream}" / "cells" / "full__100pct.json"
        if full.is_file():
            f = json.loads(full.read_text())
            print(f"| {stream} | full | {f['rouge2']:.4f} | | | 100% | | | |")
        for budget in ("75%", "50%", "33%", "25%"):
            p, s = cell(work, stream, "prune", budget), cell(work, stream, "swapmoe", budget)
            if p is None or s is None:
                continue
            pe, se = p["fidelity"]["exact_match"], s["fidelity"]["exact_match"]
            print(f"| {stream} | {budget} | {p['rouge2']:.4f} | {s['rouge2']:.4f} | {s['rouge2'] - p['rouge2']:+.4f} | "
                  f"{pe:.1%} | {se:.1%} | {100 * (se - pe):+.1f} | {s['swaps']} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
