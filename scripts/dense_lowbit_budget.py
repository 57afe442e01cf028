"""Where the bytes freed by int8/int4 dense weights go: the same absolute budget on artifacts that
differ only in their dense type, one runtime at a time.

    python scripts/dense_lowbit_budget.py --budget 1.2GiB --policy swapmoe ART_F32 ART_INT8 ART_INT4 [--json OUT]

For each: the measured baseline (the process with every dense part loaded and no expert), the
bytes left for experts and how many experts the planner keeps (``ART:ladder`` runs the `ladder`
policy instead, residents counted per rung). Each artifact in its own process: the baseline is
measured from the process's memory, which a runtime opened and closed before would inflate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--budget", required=True)
    ap.add_argument("--policy", default="swapmoe")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not a.one:
        rows = []
        for spec in a.artifacts:
            out = subprocess.run([sys.executable, __file__, spec, "--budget", a.budget, "--policy", a.policy, "--one"],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['artifact']} ({r['policy']}): dense {r['dense_dtype']} {r['dense_bytes'] / 2**20:.0f} MiB on disk; baseline "
                  f"{r['baseline_bytes'] / 2**20:.0f} MiB of the {r['budget_bytes'] / 2**20:.0f} MiB budget, "
                  f"{r['for_experts_bytes'] / 2**20:.0f} MiB for experts: {r['resident_experts']}/{r['experts_total']} "
                  f"resident {r['by_rung']}", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
        return
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
        print(json.dumps(row))


if __name__ == "__main__":
    main()
