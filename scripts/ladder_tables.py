"""The precision ladder's tables for docs/results/ladder.md, from a sweep's sweep.json.

    python scripts/ladder_tables.py SWEEP_DIR [--also OTHER_SWEEP_DIR] [--decode PAIRS.json]
    python scripts/ladder_tables.py --cells CELLS_DIR      # scripts/ladder_eval.py results, full.json among them

One table per measure (reference ROUGE-2, same-as-full, peak RSS / budget, decode ms/token
as a ratio to `full` of the same sweep), policies as rows and budgets as columns, and the
ladder's targets checked: within 0.005 ROUGE-2 of `full` at 33%, at or above
`prune` in every cell (with the standard error of the difference, paired by document,
from the cells' outputs), peak RSS within budget + 5%. ``--decode``: a bench_ladder_decode.py
result (interleaved, paired) for the decode target, which a sweep's cells, run minutes
apart on a shared machine, cannot judge. ``--also``: cells of policies SWEEP_DIR lacks, from
another sweep of the same documents (its `full` must give the same outputs: checked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swapmoe_edge.lab.evaluate import paired_se, read_pairs, results_paired_se

POLICIES = ("ladder", "swapmoe", "prune", "on-demand")


def _budget_key(b: str) -> float:
    return -float(b.rstrip("%")) if b.endswith("%") else 0.0


def cells_table(folder: Path) -> None:
    """One row per scripts/ladder_eval.py cell of FOLDER, against its full.json, paired by document."""
    cells = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    full = cells.pop("full")
    docs = read_pairs(full["data"], full["documents"])
    refs = [d["summary"] for d in docs]
    ref_out = [o["summary"] for o in full["outputs"]]
    print(f"{full['documents']} documents; full: ROUGE-2 {full['rouge2']:.4f}. Budgets are shares of the artifact's "
          "expert bytes; copies by rung (int2 + int4 + own precision).\n")
    print("| cell | policy | budget | config | ROUGE-2 | - full (± paired s.e.) | same as full | experts resident "
          "| first choice resident | peak / budget |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, c in sorted(cells.items(), key=lambda kv: (kv[1]["policy"], _budget_key(kv[1]["budget"]), kv[0])):
        same = sum(list(o["token_ids"]) == list(f["token_ids"]) for o, f in zip(c["outputs"], full["outputs"])) / len(refs)
        se = paired_se(refs, ref_out, [o["summary"] for o in c["outputs"]])
        by = c.get("residents_by_rung") or {}
        res = "+".join(str(by.get(k, 0)) for k in ("int2", "int4", "float16", "float32") if k in by) if by else str(c["resident_experts"])
        cfg = ", ".join(f"{k}={v}" for k, v in (c.get("config") or {}).items()) or "default"
        print(f"| {name} | {c['policy']} | {c['budget']} | {cfg} | {c['rouge2']:.4f} | {c['rouge2'] - full['rouge2']:+.4f} (± {se:.4f}) "
              f"| {same:.1%} | {res} | {c['first_choice_resident']:.3f} | {c['peak_rss_bytes'] / c['budget_bytes']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, nargs="?")
    ap.add_argument("--decode", type=Path)
    ap.add_argument("--also", type=Path)
    ap.add_argument("--cells", type=Path, help="a folder of scripts/ladder_eval.py results instead of a sweep")
    a = ap.parse_args()
    if a.cells:
        cells_table(a.cells)
        return
    d = json.loads((a.sweep / "sweep.json").read_text())
    cells = [c for c in d["cells"] if not c.get("error")]
    if a.also:
        other = [c for c in json.loads((a.also / "sweep.json").read_text())["cells"] if not c.get("error")]
        mine = next(c for c in cells if c["policy"] == "full")
        theirs = next(c for c in other if c["policy"] == "full")
        if (mine["rouge2"], mine["documents"]) != (theirs["rouge2"], theirs["documents"]):
            raise SystemExit(f"{a.also}'s full run differs from {a.sweep}'s: not the same documents or model")
        have = {c["policy"] for c in cells}
        cells += [c for c in other if c["policy"] not in have]
    full = next(c for c in cells if c["policy"] == "full")
    budgets = sorted({c["budget"] for c in cells if c["policy"] != "full"}, key=_budget_key)
    at = {(c["policy"], c["budget"]): c for c in cells}

    def table(title: str, fmt) -> None:
        print(f"\n{title}\n")
        print("| policy | " + " | ".join(budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for p in POLICIES:
            row = [fmt(at[(p, b)]) if (p, b) in at else "—" for b in budgets]
            print(f"| {p} | " + " | ".join(row) + " |")

    print(f"{d['documents']} documents; full: ROUGE-2 {full['rouge2']:.4f}, decode {full['decode_ms_per_token']:.2f} ms/token, "
          f"peak RSS {full['peak_rss_bytes'] / 2**20:.1f} MiB. Budgets are shares of the artifact's expert bytes.")
    table("Reference ROUGE-2", lambda c: f"{c['rouge2']:.4f}")
    table("Same as full (share of documents whose summary equals full's)", lambda c: f"{c['exact_match']:.1%}")
    table("Experts resident (ladder: int4 copies + full precision)", lambda c: (
        "+".join(str(c["residents_by_rung"].get(k, 0)) for k in ("int4", "float16", "float32") if k in c["residents_by_rung"])
        if c["policy"] == "ladder" else str(c["resident_experts"])))
    table("Peak RSS / budget", lambda c: f"{c['peak_rss_bytes'] / c['budget_bytes']:.3f}")
    table("Decode ms/token / full's (cells run one after another; see the paired figures)",
          lambda c: f"{c['decode_ms_per_token'] / full['decode_ms_per_token']:.2f}")
    table("Tokens that ran a low-bit copy", lambda c: f"{c.get('low_precision_tokens', 0):,}")

    def cell_file(c: dict) -> dict | None:
        for root in (a.sweep, a.also):
            path = root and root / "cells" / f"{c['policy']}__{c['budget'].replace('%', 'pct')}__{c['planner']}.json"
            if path and path.is_file():
                return json.loads(path.read_text())
        return None

    print("\nLadder minus prune, reference ROUGE-2 (± standard error, paired by document)\n")
    print("| " + " | ".join(budgets) + " |")
    print("|" + "---|" * len(budgets))
    row = []
    for b in budgets:
        pair = [cell_file(at[(p, b)]) if (p, b) in at else None for p in ("prune", "ladder")]
        row.append(f"{pair[1]['rouge2'] - pair[0]['rouge2']:+.4f} (± {results_paired_se(*pair):.4f})" if all(pair) else "—")
    print("| " + " | ".join(row) + " |")

    lad = {b: at[("ladder", b)] for b in budgets if ("ladder", b) in at}
    checks = []
    if "33%" in lad:
        gap = full["rouge2"] - lad["33%"]["rouge2"]
        checks.append(f"ladder at 33% within 0.005 ROUGE-2 of full: {'yes' if gap <= 0.005 else 'NO'} (gap {gap:+.4f})")
    below = [f"{b} ({lad[b]['rouge2']:.4f} < {at[('prune', b)]['rouge2']:.4f})" for b in lad
             if ("prune", b) in at and lad[b]["rouge2"] < at[("prune", b)]["rouge2"]]
    if not any(("prune", b) in at for b in lad):
        checks.append("ladder at or above prune: no prune cells to compare with")
    else:
        checks.append(f"ladder at or above prune in every cell: {'yes' if not below else 'NO: ' + ', '.join(below)}")
    over = [f"{c['policy']} {c['budget']} ({c['peak_rss_bytes'] / c['budget_bytes']:.3f})" for c in cells
            if c["peak_rss_bytes"] > 1.05 * c["budget_bytes"]]
    checks.append(f"peak RSS within budget + 5% in every cell: {'yes' if not over else 'NO: ' + ', '.join(over)}")
    if a.decode:
        dec = json.loads(a.decode.read_text())
        for k, r in dec["ratios"].items():
            if k.startswith("ladder "):
                checks.append(f"decode, {k} vs full (paired): {r:.2f}x ({'met' if r <= 1.15 else 'NOT met'}: target 1.15x)")
    print("\nTargets\n")
    for c in checks:
        print(f"- {c}")


if __name__ == "__main__":
    main()
