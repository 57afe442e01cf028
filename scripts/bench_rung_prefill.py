"""One expert at prefill sizes: the float experts' shared kernel against the ladder's
MatMulNBits sessions at each accuracy level, M tokens a call.

    python scripts/bench_rung_prefill.py [--d-model 768 --d-ff 3072] [--tokens 1,2,4,16,64,256] \
        [--threads 1] [--calls 50] [--out results.json]

Random weights of the given shape (the kernels' speed does not depend on the values).
Variants, each a session of its own, timed in turn call by call (so a shared machine's load
moves every variant alike), medians:

- ``float16_kernel`` / ``float32_kernel``: the artifact's ``expert_kernel`` with the weights
  fed as inputs (what full, prune and swapmoe run; float16 experts are cast on every call);
- ``int4_acc{0,1,4}`` / ``int2_acc{0,4}``: a rung's session template (weights prepacked at
  session creation) with MatMulNBits' ``accuracy_level`` (0/1: float32 compute; 4: the
  activations quantised to int8 per block, int8 dot products).

Also the error of each variant against float32 on the same dequantised weights (the
accuracy level's own loss: level 4 quantises the activations), and, with ``--session-bytes``,
what one more session of each rung variant holds resident (prepacked.session_bytes: heap in
use over several sessions) against the copy's bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

from swapmoe_edge.model.prepacked import session_bytes
from swapmoe_edge.model.sessions import session_options
from swapmoe_export import graphs, ladder
from swapmoe_export.writer import ArtifactWriter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-ff", type=int, default=3072)
    ap.add_argument("--tokens", default="1,2,4,16,64,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--variants", default="float16_kernel,float32_kernel,int4_acc0,int4_acc1,int4_acc4,int2_acc0,int2_acc4")
    ap.add_argument("--session-bytes", action="store_true", help="also measure each rung variant's resident bytes")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    d, f = a.d_model, a.d_ff
    rng = np.random.default_rng(0)
    wi = (rng.standard_normal((d, f)) / np.sqrt(d)).astype(np.float32)
    wo = (rng.standard_normal((f, d)) / np.sqrt(f)).astype(np.float32)
    variants, ref_w, held = {}, {}, {}
    import tempfile  # deferred: only for the rung blocks this writes

    tmp = tempfile.TemporaryDirectory()
    from pathlib import Path  # deferred: with tempfile

    writer = ArtifactWriter(Path(tmp.name))
    for name in a.variants.split(","):
        if name.endswith("_kernel"):
            dt = name.split("_")[0]
            sess = ort.InferenceSession(graphs.expert_kernel_graph(d, f, "relu", dt).proto.SerializeToString(),
                                        session_options(a.threads))
            feeds = {"wi": wi.astype(dt), "wo": wo.astype(dt)}
            variants[name] = (lambda x, s=sess, fd=feeds: s.run(None, {"x": x, **fd})[0])
            ref_w[name] = (feeds["wi"].astype(np.float32), feeds["wo"].astype(np.float32))
            continue
        rung, level = name.split("_acc")
        entry = ladder.write_rung(writer, f"bench.{rung}", "/bench", wi, wo, rung)
        block = np.fromfile(Path(tmp.name) / entry["weights_file"], dtype=np.uint8)
        opts = session_options(a.threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_external_initializers_from_files_in_memory([ladder.RUNG_DATA], [block], [block.nbytes])
        template = ladder.session_template(d, f, "relu", rung, entry, int(level))
        sess = ort.InferenceSession(template, opts)
        if a.session_bytes:
            held[name] = {"copy_bytes": int(block.nbytes),
                          "session_bytes": session_bytes(lambda t=template, o=opts: ort.InferenceSession(t, o), block.nbytes)}
            print(f"{name}: copy {block.nbytes / 1e6:.2f} MB, a session holds {held[name]['session_bytes'] / 1e6:.2f} MB "
                  f"({held[name]['session_bytes'] / block.nbytes:.2f}x)", flush=True)
        variants[name] = (lambda x, s=sess: s.run(None, {"x": x})[0])
        parts = ladder.rung_arrays(wi, wo, rung)
        bits = ladder.RUNGS[rung]
        ref_w[name] = (ladder.dequantize(parts["wi"], parts["wi_scale"], bits, d),
                       ladder.dequantize(parts["wo"], parts["wo_scale"], bits, f))
    out = {"d_model": d, "d_ff": f, "threads": a.threads, "calls": a.calls, "ort": ort.__version__, "tokens": {},
           **({"session_bytes": held} if held else {})}
    for m in [int(t) for t in a.tokens.split(",")]:
        x = rng.standard_normal((m, d)).astype(np.float32)
        times = {n: [] for n in variants}
        for fn in variants.values():
            fn(x)
        for _ in range(a.calls):
            for n, fn in variants.items():
                t = time.perf_counter()
                fn(x)
                times[n].append(time.perf_counter() - t)
        row = {}
        for n, fn in variants.items():
            w1, w2 = ref_w[n]
            want = np.maximum(x @ w1, 0) @ w2
            err = float(np.abs(fn(x) - want).max() / np.abs(want).max())
            row[n] = {"ms": statistics.median(times[n]) * 1e3, "rel_err_vs_own_weights": err}
        out["tokens"][m] = row
        print(f"M={m:4d} " + "  ".join(f"{n} {r['ms']:.3f}" for n, r in row.items()), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
