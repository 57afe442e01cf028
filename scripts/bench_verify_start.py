"""What checking the dense files costs a launch: first start (hashing), later starts (digests
remembered by file identity), experts checked only (the runtime before dense checks) and no
verification at all, each in a fresh process.

    python scripts/bench_verify_start.py SB8 SB64 --budget 15% --budget 3% --runs 3 -o verify_start.json

Every mode shares one baseline cache (measured once before the runs), so the modes differ only
in verification; the three modes of a run take turns, so a load drift on the machine spreads
over them. The page cache is left as it is (warm after the first launch): the figures are the
CPU cost of hashing at page-cache speed, not a device's flash.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from swapmoe_edge.runtime import load
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig
if sys.argv[4] == "experts":  # as before dense files were checked: experts hashed on first read only
    load.verify_dense = lambda *args: 0.0
t1 = time.perf_counter()
rt = Runtime(sys.argv[1], RuntimeConfig(policy="prune", budget=sys.argv[2], verify=sys.argv[3], baseline_cache=True))
t2 = time.perf_counter()
print(json.dumps({"load_s": t2 - t1, "import_s": t1 - t0, **rt.startup}))
rt.close()
"""
# never: no checks at all; experts: experts hashed on first read, dense files not checked (the
# runtime before dense checks); first: dense files hashed (a first start); cached: digests remembered.
MODES = ("never", "experts", "first", "cached")


def launch(artifact: str, budget: str, mode: str, cache: Path) -> dict:
    env = dict(os.environ, SWAPMOE_CACHE_DIR=str(cache))
    verify = "never" if mode == "never" else "first"
    out = subprocess.run([sys.executable, "-c", CHILD, artifact, budget, verify, mode], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(artifact: str, budget: str, runs: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="verify_start_"))
    try:
        base = work / "base"
        launch(artifact, budget, "never", base)  # the baseline cache, and a warm page cache
        rows: dict[str, list[dict]] = {m: [] for m in MODES}
        for i in range(runs):
            for mode in MODES[i % len(MODES):] + MODES[: i % len(MODES)]:
                cache = work / f"{mode}{i}"
                shutil.copytree(base, cache)  # baselines.json only: no digests remembered
                if mode == "cached":
                    launch(artifact, budget, "first", cache)  # remembers the digests
                rows[mode].append(launch(artifact, budget, mode, cache))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("load_s", "verify_s")} for m, rs in rows.items()}
    old = med["experts"]["load_s"]
    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    experts = {f for e in manifest["experts"] for f in [e["weights_file"], e["graph"]["file"],
                                                        *(r["weights_file"] for r in e.get("rungs", {}).values())]}
    dense = sum(f["size"] for rel, f in manifest["files"].items() if rel not in experts)
    return {"artifact": artifact, "budget": budget, "runs": runs, "dense_bytes_checked": dense, "median": med,
            "load_ratio_to_experts_only": {m: med[m]["load_s"] / old for m in MODES}, "all": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget", action="append", help="prune's budget, once for all artifacts or once each: a few "
                    "experts a layer, so that the load is mostly dense (switch-base-8: 15%%, switch-base-64: 3%%; default 15%%)")
    ap.add_argument("-o", "--out", type=Path)
    args = ap.parse_args()
    budgets = args.budget or ["15%"]
    if len(budgets) not in (1, len(args.artifacts)):
        ap.error("give --budget once, or once for each artifact")
    results = [measure(a, b, args.runs) for a, b in zip(args.artifacts, budgets * len(args.artifacts))]
    for r in results:
        m, ratio = r["median"], r["load_ratio_to_experts_only"]
        print(f"{r['artifact']}: dense {r['dense_bytes_checked'] / 2**20:.0f} MiB; load s (median of {r['runs']}) "
              f"no checks {m['never']['load_s']:.2f}, experts only {m['experts']['load_s']:.2f}, "
              f"first start {m['first']['load_s']:.2f} (verify {m['first']['verify_s']:.2f}), "
              f"later starts {m['cached']['load_s']:.2f} (verify {m['cached']['verify_s']:.3f}); to experts only: "
              + ", ".join(f"{k} {v:.3f}x" for k, v in ratio.items()))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
