"""How an expert read uses the page cache: O_DIRECT, read + fadvise(DONTNEED), plain cached reads.

    python scripts/bench_reads.py ARTIFACT [--experts 24] [--rounds 3] [--flash-mbps 250] [--memory 1GiB]

Runs each mode in a fresh child process inside a device box (root; the same cgroup box as
`swapmoe bench`), after dropping the experts' pages: reads N experts one after the other
as the swapper does, then reports per expert the wall time and the CPU time (median over
experts, then over rounds), the bytes the kernel read from the disk, and what the page
cache still holds of those experts afterwards, i.e. what a device's memory limit is still
charged for beyond our own buffers. Modes alternate within each round (side by side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.artifact.store import ExpertStore
from swapmoe_edge.system import pagecache
art, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = load_manifest(art)
keys = list(m.experts)[:n]
store = ExpertStore(m, verify="never", read_mode=mode)
wall, cpu, held = [], [], []
for k in keys:
    t, c = time.perf_counter(), time.process_time()
    e = store.read(k)
    wall.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
    held.append(e)  # resident, like the swapper's experts
cached = sum(pagecache.cached_bytes(m.path(m.experts[k].weights_file)) for k in keys)
print(json.dumps({"wall_ms": [w * 1e3 for w in wall], "cpu_ms": [c * 1e3 for c in cpu], "cached_after": cached,
                  "mode_used": store.read_mode, "expert_bytes": m.experts[keys[0]].nbytes}))
"""


def main() -> None:
    from swapmoe_edge.system import pagecache
    from swapmoe_edge.core.units import parse_size
    from swapmoe_edge.lab.devicebox import DeviceBox
    from swapmoe_edge.artifact.manifest import load_manifest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--experts", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flash-mbps", type=float, default=250)
    ap.add_argument("--memory", default="1GiB")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    m = load_manifest(args.artifact)
    files = [m.path(e.weights_file) for e in list(m.experts.values())[: args.experts]]
    modes = ("direct", "fadvise", "cached")
    runs: dict[str, list[dict]] = {k: [] for k in modes}
    with DeviceBox(parse_size(args.memory), args.flash_mbps * 1e6, args.artifact) as box:
        for r in range(args.rounds):
            for mode in modes[r % 3:] + modes[: r % 3]:
                pagecache.drop(files)
                box.reset_counters()
                out = subprocess.run([sys.executable, "-c", CHILD, args.artifact, mode, str(args.experts)],
                                     preexec_fn=box.join, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout)
                row["disk_read"] = box.counters().read_bytes
                runs[mode].append(row)
    table = {}
    for mode, rows in runs.items():
        table[mode] = {
            "wall_ms_per_expert": statistics.median(statistics.median(r["wall_ms"]) for r in rows),
            "cpu_ms_per_expert": statistics.median(statistics.median(r["cpu_ms"]) for r in rows),
            "page_cache_after_mib": statistics.median(r["cached_after"] for r in rows) / 2**20,
            "disk_read_mib": statistics.median(r["disk_read"] for r in rows) / 2**20,
            "mode_used": rows[-1]["mode_used"],
        }
    result = {"artifact": args.artifact, "experts": args.experts, "expert_bytes": runs["direct"][0]["expert_bytes"],
              "flash_mbps": args.flash_mbps, "memory": args.memory, "rounds": args.rounds, "modes": table}
    text = json.dumps(result, indent=1)
    if args.out:
        open(args.out, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
