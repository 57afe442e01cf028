"""Reports of `swapmoe bench cells` result folders, from their cells.json.

    python scripts/device_box_report.py docs/results/device_box/sb8 [more folders...]
    python scripts/device_box_report.py --check docs/results/device_box/sb8 docs/results/device_box/sb64

By default it rewrites each folder's cells.md and cells.png. ``--check`` instead prints one
line per cell against the device box's targets: every cell completes without an OOM kill
and within its memory limit; swapmoe decodes within 1.15x of prune's time per token and
starts within 1.3x of prune's TTFT; on-demand's cost against prune (decode, TTFT, stall,
bytes read per token); launch to first token at 4.7 GiB and 250 MB/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swapmoe_edge.lab.bench import add_ratios, write_report

DECODE_VS_PRUNE, TTFT_VS_PRUNE = 1.15, 1.3


def rewrite(folder: Path) -> None:
    data = json.loads((folder / "cells.json").read_text())
    add_ratios(data["cells"])
    write_report(data["cells"], folder, f"swapmoe bench: {Path(data['meta']['artifact']).name}", data["meta"])
    print(f"rewrote {folder}/cells.md", file=sys.stderr)


def check(folder: Path) -> None:
    f = folder / "cells.json"
    rows = json.loads(f.read_text())["cells"] if f.is_file() else []
    if not rows:
        return
    bad = [r for r in rows if r["completed"] < r["requests"] or r["oom_kills"] or (r.get("peak_over_limit") or 0) > 1]
    print(f"{folder.name}: {len(rows)} cells, incomplete/OOM/over-limit: {len(bad)}; "
          f"peak/limit max {max(r.get('peak_over_limit') or 0 for r in rows):.3f}")
    for r in rows:
        if r["policy"] == "swapmoe" and "decode_vs_prune" in r:
            ok = r["decode_vs_prune"] <= DECODE_VS_PRUNE and r["ttft_vs_prune"] <= TTFT_VS_PRUNE
            print(f"  swapmoe {r['budget']:>6} {r['flash_mbps']:>6g} MB/s: decode/prune {r['decode_vs_prune']:.2f}, "
                  f"TTFT/prune {r['ttft_vs_prune']:.2f}, first TTFT/prune {r['first_ttft_vs_prune']:.2f}"
                  f"{'' if ok else '  <- target missed'}")
        if r["policy"] == "on-demand" and "decode_vs_prune" in r:
            tokens = r["read_bytes_per_token"] or 0
            print(f"  on-demand {r['budget']:>6} {r['flash_mbps']:>6g} MB/s: decode/prune {r['decode_vs_prune']:.2f}, "
                  f"TTFT/prune {r['ttft_vs_prune']:.1f}, stall {r['stall_ms']:.0f} ms/request, "
                  f"{tokens / 2**20:.0f} MiB read per token (fill included)")
    for r in rows:
        if r["budget"] == "4.7GiB" and r["flash_mbps"] == 250:
            print(f"  launch->first token {r['policy']} 4.7GiB 250 MB/s: {r['launch_to_first_token_s']:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+", help="`swapmoe bench cells -o` folders")
    ap.add_argument("--check", action="store_true", help="print the targets' checks instead of rewriting reports")
    a = ap.parse_args()
    for folder in a.folders:
        (check if a.check else rewrite)(folder)


if __name__ == "__main__":
    main()
