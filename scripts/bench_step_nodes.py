"""Where one decoder step's time goes, node type by node type, for one or more artifacts.

    python scripts/bench_step_nodes.py ART [ART ...] [--layer dec.L02.step] [--past 30] [--calls 500]

Opens the artifact's decoder step subgraph alone (one thread, the runtime's graph
optimisations), feeds it one token of random activations with ``--past`` cached positions and
a 64-token encoder output, runs it ``--calls`` times after a warm-up, and prints the time a call
takes, ONNX Runtime's own per-node profile summed by operator type, and what is left for the
call itself (binding, allocation, the executor). The step's weights stay in cache across calls,
so this prices compute and overhead, not the memory-bandwidth floor (bench_decode.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from swapmoe_edge.artifact.manifest import load_manifest


def profile(art: Path, layer: str, past: int, calls: int) -> dict:
    m = load_manifest(art)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "step")
        sess = ort.InferenceSession(str(m.path(m.subgraphs[layer].file)), opts, providers=["CPUExecutionProvider"])
        dims = {"B": 1, "b": 1, "T": 1, "P": past, "S": 64, "L": past + 1}
        rng = np.random.default_rng(0)
        feeds = {i.name: (rng.standard_normal([d if isinstance(d, int) else dims.get(d, 1) for d in i.shape]) * 0.1)
                 .astype(np.float32) for i in sess.get_inputs()}
        warm = max(50, calls // 2)
        for _ in range(warm):
            sess.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(calls):
            sess.run(None, feeds)
        per_call = (time.perf_counter() - t0) / calls * 1e6
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = warm + calls
    by_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    nodes = sum(by_op.values()) / runs
    return {"artifact": str(art), "layer": layer, "past": past, "call_us": per_call, "nodes_us": nodes,
            "outside_nodes_us": per_call - nodes,
            "by_op_us": {op: d / runs for op, d in by_op.most_common()}, "nodes_per_call": {op: count[op] / runs for op in by_op}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--layer", default="dec.L02.step", help="a decoder step subgraph (default: a dense layer's)")
    ap.add_argument("--past", type=int, default=30, help="cached positions")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    out = []
    for art in a.artifacts:
        r = profile(art, a.layer, a.past, a.calls)
        out.append(r)
        print(f"{art}: {r['call_us']:.1f} us a call, nodes {r['nodes_us']:.1f} us, outside them {r['outside_nodes_us']:.1f} us")
        for op, us in r["by_op_us"].items():
            print(f"    {op:34s} {us:8.1f} us  ({r['nodes_per_call'][op]:.0f} a call)")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
