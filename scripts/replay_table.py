"""Markdown tables from `swapmoe trace replay --json` output (one JSON object per budget per line).

    python scripts/replay_table.py docs/results/streams/replay_test_*.jsonl
"""

from __future__ import annotations

import argparse
import json

BOUND = {"belady": "exact bound", "best-fixed": "fixed-set bound"}


def table(path: str) -> str:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    names = [r["policy"] for r in rows[0]["results"]]
    head = "| budget | " + " | ".join(f"{n}{' *' if n in BOUND else ''}" for n in names) + " |"
    out = [head, "|" + "---|" * (len(names) + 1)]
    for r in rows:
        cells = [f"{x['hit_rate']:.3f} ({x['encoder_hit_rate']:.2f} / {x['decoder_hit_rate']:.3f})" for x in r["results"]]
        out.append(f"| {r['budget']} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("| budget | policy | experts per layer | MB read | stall s (at %g MB/s) | swaps |" % rows[0]["flash_mbps"])
    out.append("|---|---|---|---|---|---|")
    for r in rows:
        for x in r["results"]:
            if x["policy"] in ("lru", "lfu", "belady", "swapmoe"):
                counts = "/".join(str(v) for v in x["counts"].values())
                out.append(f"| {r['budget']} | {x['policy']} | {counts} | {x['bytes_read'] / 1e6:.1f} | "
                           f"{x['stall_s']:.1f} | {x['swaps']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("replays", nargs="+", help="`swapmoe trace replay --json` output files")
    for p in ap.parse_args().replays:
        print(f"### {p}\n\n{table(p)}\n")


if __name__ == "__main__":
    main()
