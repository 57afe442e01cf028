"""The issue-13 targets checked against docs/results/device_box/*: prints one line per check.

    python scripts/device_box_summary.py [docs/results/device_box]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cells(folder: Path) -> list[dict]:
    f = folder / "cells.json"
    return json.loads(f.read_text())["cells"] if f.is_file() else []


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/device_box")
    for name in ("sb8", "sb64"):
        rows = cells(root / name)
        if not rows:
            continue
        bad = [r for r in rows if r["completed"] < r["requests"] or r["oom_kills"] or (r.get("peak_over_limit") or 0) > 1]
        print(f"{name}: {len(rows)} cells, incomplete/OOM/over-limit: {len(bad)}; "
              f"peak/limit max {max(r.get('peak_over_limit') or 0 for r in rows):.3f}")
        for r in rows:
            if r["policy"] == "swapmoe" and "decode_vs_prune" in r:
                ok = r["decode_vs_prune"] <= 1.15 and r["ttft_vs_prune"] <= 1.3
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


if __name__ == "__main__":
    main()
