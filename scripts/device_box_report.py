"""Rewrite cells.md and cells.png of `swapmoe bench cells` result folders from their cells.json.

    python scripts/device_box_report.py docs/results/device_box/sb8 [more folders...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from swapmoe_edge.lab.bench import add_ratios, write_report


def main() -> None:
    for folder in map(Path, sys.argv[1:]):
        data = json.loads((folder / "cells.json").read_text())
        add_ratios(data["cells"])
        write_report(data["cells"], folder, f"swapmoe bench: {Path(data['meta']['artifact']).name}", data["meta"])
        print(f"rewrote {folder}/cells.md", file=sys.stderr)


if __name__ == "__main__":
    main()
