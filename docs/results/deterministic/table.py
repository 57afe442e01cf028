"""The table of README.md from the four sweeps and the paired cost: python table.py WORK_DIR COST_JSON."""

import json
import sys
from pathlib import Path

from swapmoe_edge.lab.evaluate import results_paired_se

work, cost = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
costs = {(r["policy"], r["budget"]): r for r in cost["rows"]}


def cell(run: str, policy: str, budget: str) -> dict:
    return json.loads((work / run / "cells" / f"{policy}__{budget.replace('%', 'pct')}__importance.json").read_text())


print("| policy | budget | ROUGE-2 default (run 1 / run 2) | ROUGE-2 deterministic | deterministic - default run 1 "
      "(paired s.e.) | default run 2 - run 1 (paired s.e.) | same as full: default (1 / 2) | deterministic "
      "| swaps default / deterministic | deterministic runs agree | decode ms/token, deterministic / default "
      "(median, quartiles) | boundary wait ms per batch of 8 |")
print("|" + "---|" * 12)
for policy in ("swapmoe", "ladder"):
    for budget in ("50%", "33%", "25%"):
        d1, d2, t1, t2 = (cell(r, policy, budget) for r in ("default-1", "default-2", "deterministic-1", "deterministic-2"))
        agree = [x["token_ids"] for x in t1["outputs"]] == [x["token_ids"] for x in t2["outputs"]]
        c = costs[(policy, budget)]
        q = c["decode_ratio_q1_median_q3"]
        print(f"| {policy} | {budget} | {d1['rouge2']:.4f} / {d2['rouge2']:.4f} | {t1['rouge2']:.4f} "
              f"| {t1['rouge2'] - d1['rouge2']:+.4f} ({results_paired_se(d1, t1):.4f}) "
              f"| {d2['rouge2'] - d1['rouge2']:+.4f} ({results_paired_se(d1, d2):.4f}) "
              f"| {d1['fidelity']['exact_match']:.1%} / {d2['fidelity']['exact_match']:.1%} "
              f"| {t1['fidelity']['exact_match']:.1%} | {d1['swaps']} / {t1['swaps']} "
              f"| {'yes' if agree and t1['deterministic'] and t2['deterministic'] else 'NO'} "
              f"| {q[1]:.3f} ({q[0]:.3f}-{q[2]:.3f}) | {c['boundary_wait_ms_per_batch']:.1f} |")

print()
print("| policy | budget | batches | decode ms/token default / deterministic | decode ratio (q1, median, q3) "
      "| TTFT ratio (q1, median, q3) | request ms per batch default / deterministic | boundary wait ms per batch "
      "| swaps per batch default / deterministic |")
print("|" + "---|" * 9)
for c in cost["rows"]:
    d, t = c["decode_ratio_q1_median_q3"], c["ttft_ratio_q1_median_q3"]
    print(f"| {c['policy']} | {c['budget']} | {c['batches']} | {c['decode_ms_default']:.3f} / {c['decode_ms_deterministic']:.3f} "
          f"| {d[0]:.3f}, {d[1]:.3f}, {d[2]:.3f} | {t[0]:.3f}, {t[1]:.3f}, {t[2]:.3f} "
          f"| {c['request_ms_per_batch_default']:.1f} / {c['request_ms_per_batch_deterministic']:.1f} "
          f"| {c['boundary_wait_ms_per_batch']:.1f} | {c['swaps_per_batch_default']:.2f} / {c['swaps_per_batch_deterministic']:.2f} |")
