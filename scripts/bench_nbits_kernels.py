"""Time ONNX Runtime's MatMulNBits against a float32 MatMul, one thread, for choosing the dense
low-bit defaults (block size, accuracy level): a decoded token through a 768x3072 FFN weight and
a 768x32128 LM head (M = 1), and a 64-token prefill through 768x3072 (M = 64).

Every variant of one shape runs in one process, in alternating rounds; the figure is the median
over rounds of each round's median. Weights are random (speed does not depend on their values).

    python scripts/bench_nbits_kernels.py --rounds 7 --json docs/results/dense_lowbit/kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"


def _session(model, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def float_model(k: int, n: int, rng):
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) * 0.02, "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    g = helper.make_graph([node], "f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def nbits_model(k: int, n: int, bits: int, block: int, level: int, rng):
    kb = -(-k // block)
    q = numpy_helper.from_array(rng.integers(0, 256, (n, kb, block * bits // 8), dtype=np.uint8), "q")
    s = numpy_helper.from_array((rng.random((n, kb)).astype(np.float32) + 0.5) * 0.01, "s")
    node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain=MS, K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=level)
    g = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], [q, s])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=30, help="calls per variant per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shapes = [("token ffn 768x3072", 1, 768, 3072), ("token lm_head 768x32128", 1, 768, 32128), ("64 tokens 768x3072", 64, 768, 3072)]
    out = {"threads": args.threads, "rounds": args.rounds, "calls": args.calls, "ort": ort.__version__, "shapes": {}}
    for label, m, k, n in shapes:
        variants = {"float32": _session(float_model(k, n, rng), args.threads)}
        for bits in (8, 4):
            for block in (32, 64, 128):
                for level in (0, 4):
                    variants[f"int{bits} b{block} a{level}"] = _session(nbits_model(k, n, bits, block, level, rng), args.threads)
        x = rng.standard_normal((m, k)).astype(np.float32)
        times = {v: [] for v in variants}
        for sess in variants.values():
            for _ in range(3):
                sess.run(None, {"x": x})
        for _ in range(args.rounds):
            for v, sess in variants.items():
                ts = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    sess.run(None, {"x": x})
                    ts.append(time.perf_counter() - t0)
                times[v].append(statistics.median(ts))
        res = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        out["shapes"][label] = {v: {"ms": round(ms, 4), "x_float32": round(ms / res["float32"], 3)} for v, ms in res.items()}
        print(label)
        for v, ms in res.items():
            print(f"  {v:<18} {ms:8.4f} ms  {ms / res['float32']:.3f}x float32")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
