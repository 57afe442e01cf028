"""Where the bytes freed by int8/int4 dense weights go: the same absolute budget on artifacts that
differ only in their dense type, one runtime at a time.

    python scripts/dense_lowbit_budget.py --budget 1.2GiB --policy swapmoe ART_F32 ART_INT8 ART_INT4 [--json OUT]

For each: the measured baseline (the process with every dense part loaded and no expert), the
bytes left for experts, the measured cost of one resident expert and how many the planner keeps
(``ART:ladder`` runs the `ladder` policy instead, with residents counted per rung).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--budget", required=True)
    ap.add_argument("--policy", default="swapmoe")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for spec in a.artifacts:
        art, _, policy = spec.partition(":")
        with Runtime(art, RuntimeConfig(policy=policy or a.policy, budget=a.budget, threads=1, read_mode="cached")) as rt:
            m = rt.manifest
            residents = rt.residents.residents()
            row = {"artifact": art, "policy": policy or a.policy, "dense_dtype": m.dense_dtype, "dense_bytes": m.dense_bytes,
                   "budget_bytes": rt.budget_bytes, "baseline_bytes": rt.baseline,
                   "for_experts_bytes": rt.budget_bytes - rt.baseline,
                   "resident_experts": sum(len(v) for v in residents.values()),
                   "experts_total": len(m.experts),
                   "by_rung": dict(Counter(r for layer in rt.residents.placement().values() for r in layer.values()))}
        rows.append(row)
        print(f"{art} ({row['policy']}): dense {row['dense_dtype']} {row['dense_bytes'] / 2**20:.0f} MiB on disk; baseline "
              f"{row['baseline_bytes'] / 2**20:.0f} MiB of the {row['budget_bytes'] / 2**20:.0f} MiB budget, "
              f"{row['for_experts_bytes'] / 2**20:.0f} MiB for experts: {row['resident_experts']}/{row['experts_total']} "
              f"resident {row['by_rung']}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
