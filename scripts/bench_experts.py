"""How to hold and run a resident expert: swap-in time and run time of each option.

    python scripts/bench_experts.py ARTIFACT [--runs 20] [--expert enc.L01.E00]

Options measured side by side, on the same expert, in one process:
  raw       plain read of the expert's weight block (the floor for any swap-in)
  session   one InferenceSession per expert, ORT reading the external weights itself
  kernel    the shared expert-kernel session, weights read by us and fed as inputs
  iobinding the shared kernel with the weights bound once as OrtValues (IOBinding)
For each: swap-in median (ms), run median for 1 token and for 64 tokens (ms), and the
RSS each resident expert adds. Page cache is warm after the first read: the raw read is
measured the same way, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from swapmoe_edge.system import memory
from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.model.sessions import open_session, session_options
from swapmoe_edge.artifact.store import ExpertStore


def med_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rss_per_copy(make, copies: int = 4) -> float:
    memory.trim()
    before = memory.current_rss()
    held = [make() for _ in range(copies)]
    after = memory.current_rss()
    del held
    memory.trim()
    return (after - before) / copies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--expert", default=None, help="expert name, e.g. enc.L01.E00 (default: the first)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    m = load_manifest(args.artifact)
    key = next(k for k in sorted(m.experts) if args.expert in (None, k.name))
    entry = m.experts[key]
    d = m.config.d_model
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, d)).astype(np.float32)
    x64 = rng.standard_normal((64, d)).astype(np.float32)
    opts = session_options(args.threads)
    store = ExpertStore(m, verify="never")
    bin_path = m.path(entry.weights_file)

    def raw_read():
        buf = np.empty(entry.nbytes, np.uint8)
        with open(bin_path, "rb", buffering=0) as f:
            f.readinto(memoryview(buf))
        return buf

    raw_read()  # warm the page cache once for every option alike
    results = {"expert": key.name, "expert_bytes": entry.nbytes, "runs": args.runs, "threads": args.threads}
    results["raw"] = {"swap_in_ms": med_ms(raw_read, args.runs)}

    sess_path = m.path(entry.graph.file)
    sess = open_session(sess_path, opts)
    results["session"] = {
        "swap_in_ms": med_ms(lambda: open_session(sess_path, opts), max(3, args.runs // 4)),
        "run_1_ms": med_ms(lambda: sess.run(None, {"x": x1}), args.runs),
        "run_64_ms": med_ms(lambda: sess.run(None, {"x": x64}), args.runs),
        "rss_per_expert": rss_per_copy(lambda: open_session(sess_path, opts)),
    }

    kernel = open_session(m.path(m.subgraphs["expert_kernel"].file), opts)
    ex = store.read(key)
    results["kernel"] = {
        "swap_in_ms": med_ms(lambda: store.read(key), args.runs),
        "run_1_ms": med_ms(lambda: kernel.run(None, {"x": x1, **ex.feeds}), args.runs),
        "run_64_ms": med_ms(lambda: kernel.run(None, {"x": x64, **ex.feeds}), args.runs),
        "rss_per_expert": rss_per_copy(lambda: store.read(key)),
    }

    def bind():
        e = store.read(key)
        return ort.OrtValue.ortvalue_from_numpy(e.wi), ort.OrtValue.ortvalue_from_numpy(e.wo), e

    wi_v, wo_v, _keep = bind()

    def run_bound(x):
        b = kernel.io_binding()
        b.bind_cpu_input("x", x)
        b.bind_ortvalue_input("wi", wi_v)
        b.bind_ortvalue_input("wo", wo_v)
        b.bind_output("y")
        kernel.run_with_iobinding(b)
        return b.copy_outputs_to_cpu()[0]

    results["iobinding"] = {
        "swap_in_ms": med_ms(bind, args.runs),
        "run_1_ms": med_ms(lambda: run_bound(x1), args.runs),
        "run_64_ms": med_ms(lambda: run_bound(x64), args.runs),
        "rss_per_expert": rss_per_copy(bind),
    }
    y_sess = sess.run(None, {"x": x64})[0]
    y_kernel = kernel.run(None, {"x": x64, **ex.feeds})[0]
    results["max_abs_diff_kernel_vs_session"] = float(np.max(np.abs(y_sess - y_kernel)))
    raw = results["raw"]["swap_in_ms"]
    for name in ("session", "kernel", "iobinding"):
        results[name]["swap_in_over_raw"] = results[name]["swap_in_ms"] / raw
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
