"""Quality of int8/int4 dense weights against the float32 model, from `swapmoe sweep` cells.

    python scripts/dense_lowbit_quality.py --base /tmp/h5/sweep-float32 \
        --run int8=/tmp/h5/sweep-int8 --run int4=/tmp/h5/sweep-int4 [--json OUT]

Every cell of every run (and the base's own non-full cells) is set against the base's `full`
cell on the same documents: ROUGE-2 and its difference (± the paired standard error over
documents, evaluate.results_paired_se), the share of summaries token for token the same as
the float32 `full` summaries, and decode ms/token (its own process; the machine was shared).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swapmoe_edge.lab.evaluate import results_paired_se


def cells(sweep_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((sweep_dir / "cells").glob("*.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, type=Path, help="sweep directory of the float32 artifact")
    ap.add_argument("--run", action="append", default=[], help="NAME=SWEEP_DIR of a low-bit artifact")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    base_cells = cells(a.base)
    base = base_cells["full__100pct"]
    runs = [("float32", a.base)] + [tuple(r.split("=", 1)) for r in a.run]
    rows = []
    for name, d in runs:
        for cell_name, c in cells(Path(d)).items():
            if c["documents"] != base["documents"]:
                raise SystemExit(f"{d}/{cell_name}: {c['documents']} documents, the base has {base['documents']}")
            same = sum(x["token_ids"] == y["token_ids"] for x, y in zip(c["outputs"], base["outputs"])) / len(base["outputs"])
            rows.append({"dense": name, "cell": cell_name, "policy": c["policy"], "budget": c["budget"], "rouge2": c["rouge2"],
                         "delta_rouge2": c["rouge2"] - base["rouge2"], "paired_se": results_paired_se(base, c) if c is not base else 0.0,
                         "same_as_float32_full": same, "decode_ms_per_token": c["decode_ms_per_token"],
                         "peak_rss_bytes": c["peak_rss_bytes"], "baseline_bytes": c["baseline_bytes"],
                         "resident_experts": c["resident_experts"], "documents": c["documents"]})
    print("| dense | policy, budget | ROUGE-2 | vs float32 full | same as float32 full | decode ms/token | baseline MiB | residents |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dense']} | {r['policy']} {r['budget']} | {r['rouge2']:.4f} | {r['delta_rouge2']:+.4f} (± {r['paired_se']:.4f}) | "
              f"{r['same_as_float32_full']:.1%} | {r['decode_ms_per_token']:.2f} | {r['baseline_bytes'] / 2**20:.1f} | {r['resident_experts']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
