"""Export time and peak RSS of `swapmoe export`, against the checkpoint's size.

    python scripts/make_synthetic_checkpoint.py --shape switch-base-8 -o /tmp/sb8
    python scripts/bench_export.py /tmp/sb8 -o /tmp/sb8_art [--runs 3] [--no-validate]

Each run is a fresh `swapmoe export` process; its peak RSS is the largest of the
process and its children (the PyTorch reference runs in a child), read from
getrusage(RUSAGE_CHILDREN) after each run in a fresh wrapper process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

WRAPPER = (
    "import resource, subprocess, sys, json, time;"
    "t = time.perf_counter(); r = subprocess.run(sys.argv[1:]);"
    "dt = time.perf_counter() - t;"
    "print(json.dumps({'rc': r.returncode, 'seconds': dt,"
    " 'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    ckpt_bytes = sum(p.stat().st_size for p in args.model_dir.glob("*.safetensors")) + sum(
        p.stat().st_size for p in args.model_dir.glob("*.bin")
    )
    cmd = [sys.executable, "-m", "swapmoe_edge", "export", str(args.model_dir), "-o", str(args.output), "--quiet", "--dtype", args.dtype]
    if args.no_validate:
        cmd.append("--no-validate")
    results = []
    for i in range(args.runs):
        out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if res["rc"] != 0:
            sys.exit(f"export failed (exit {res['rc']})")
        results.append(res)
        print(f"run {i + 1}: {res['seconds']:.1f} s, peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    secs = statistics.median(r["seconds"] for r in results)
    peak = statistics.median(r["peak_rss_bytes"] for r in results)
    print(json.dumps({
        "checkpoint_bytes": ckpt_bytes,
        "validate": not args.no_validate,
        "dtype": args.dtype,
        "runs": args.runs,
        "median_seconds": round(secs, 2),
        "median_peak_rss_bytes": int(peak),
        "peak_rss_share_of_checkpoint": round(peak / ckpt_bytes, 4),
    }, indent=1))


if __name__ == "__main__":
    main()
