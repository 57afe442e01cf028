"""Time ONNX Runtime's MatMulNBits against a float32 MatMul, one thread, for choosing the dense
low-bit defaults (block size, accuracy level): a decoded token through a 768x3072 FFN weight and
a 768x32128 LM head (M = 1), and a 64-token prefill through 768x3072 (M = 64).

Every variant of one shape runs in one process, in alternating rounds; the figure is the median
over rounds of each round's median. Weights are random (speed does not depend on their values).

    python scripts/bench_nbits_kernels.py --rounds 7 --json docs/results/dense_lowbit/kernels.json

``--cold``: each kernel's distance from the memory-bandwidth floor on its own. Every variant is
one session holding a chain of ``--pairs`` distinct 768x3072 and 3072x768 weights (one token
through them: far more bytes than the caches hold, so every call streams its weights from
memory, as a decoded token does); variants take turns, so none finds its weights cached. The
figure is the weights' bytes over the median call time, and its ratio to the float32 chain's
rate: float32 MatMul streams at the memory's rate (the floor's probe), so the ratio is how far
the kernel alone sits from its own floor. Beside it, each kernel's rate on one pair called over
and over (its weights cached: compute alone, call overhead included), and the rate the two would
give if a call first streamed and then computed, never both at once (1 / (1/cold float32 +
1/cached)): where the cold rate matches that, the kernel does not overlap its loads with its
arithmetic.

    python scripts/bench_nbits_kernels.py --cold --rounds 15 --json docs/results/dense_lowbit/kernels_cold.json
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


def chain_session(kind: str, pairs: int, threads: int, rng, bits: int = 4, block: int = 32, level: int = 4):
    """One session of ``pairs`` distinct (768x3072, 3072x768) products in a chain; -> (session, weight bytes)."""
    nodes, inits, x = [], [], "x"
    for i in range(pairs):
        for j, (k, n) in enumerate(((768, 3072), (3072, 768))):
            g = (float_model(k, n, rng) if kind == "float32" else nbits_model(k, n, bits, block, level, rng)).graph
            for t in g.initializer:
                t.name = f"{t.name}_{i}_{j}"
                inits.append(t)
            node = g.node[0]
            out = f"h{i}_{j}"
            nodes.append(helper.make_node(node.op_type, [x] + [f"{a}_{i}_{j}" for a in node.input[1:]], [out], domain=node.domain,
                                          **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
            x = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 768])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 768])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    return _session(model, threads), sum(numpy_helper.to_array(t).nbytes for t in inits)


def _hot_rate(variant: str, threads: int, rng, x: dict, calls: int = 300) -> float:
    """GB/s of ``variant`` on one pair whose weights stay cached (median of 5 runs of ``calls`` calls)."""
    if variant == "float32":
        sess, nbytes = chain_session("float32", 1, threads, rng)
    else:
        bits, block, level = (int(p[1:]) for p in variant.replace("int", "i").split())
        sess, nbytes = chain_session("nbits", 1, threads, rng, bits, block, level)
    for _ in range(calls // 3):
        sess.run(None, x)
    per_call = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            sess.run(None, x)
        per_call.append((time.perf_counter() - t0) / calls)
    return nbytes / statistics.median(per_call) / 1e9


def cold(rounds: int, pairs: int, threads: int) -> dict:
    """Every kernel streaming its weights from memory (``--cold``, module docstring)."""
    rng = np.random.default_rng(0)
    variants = {"float32": chain_session("float32", pairs, threads, rng)}
    for bits, block, level in [(8, b, 4) for b in (32, 64, 128)] + [(4, b, 4) for b in (32, 64, 128)] + [(4, 32, 0)]:
        variants[f"int{bits} b{block} a{level}"] = chain_session("nbits", pairs, threads, rng, bits, block, level)
    x = {"x": np.ones((1, 768), np.float32)}
    hot = {v: _hot_rate(v, threads, rng, x) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds + 2):  # two warm-up rounds
        for v, (sess, _) in variants.items():
            t0 = time.perf_counter()
            sess.run(None, x)
            if r >= 2:
                times[v].append(time.perf_counter() - t0)
    rate = {v: variants[v][1] / statistics.median(t) / 1e9 for v, t in times.items()}
    out = {"threads": threads, "rounds": rounds, "pairs": pairs, "ort": ort.__version__, "variants": {}}
    for v, gbps in rate.items():
        ms = statistics.median(times[v]) * 1e3
        serial = 1 / (1 / rate["float32"] + 1 / hot[v])
        out["variants"][v] = {"weight_mb": round(variants[v][1] / 1e6, 1), "ms": round(ms, 3), "gb_per_s": round(gbps, 2),
                              "x_floor": round(rate["float32"] / gbps, 3), "cached_gb_per_s": round(hot[v], 2),
                              "stream_then_compute_gb_per_s": round(serial, 2)}
        print(f"  {v:<14} {variants[v][1] / 1e6:7.1f} MB  {ms:7.2f} ms  {gbps:5.1f} GB/s  {rate['float32'] / gbps:.2f}x its floor;"
              f" cached {hot[v]:5.1f} GB/s, stream then compute {serial:5.1f} GB/s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=30, help="calls per variant per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cold", action="store_true", help="each kernel's distance from its floor, streaming from memory")
    ap.add_argument("--pairs", type=int, default=32, help="--cold: 768x3072 + 3072x768 weight pairs in each chain")
    args = ap.parse_args()
    if args.cold:
        out = cold(args.rounds, args.pairs, args.threads)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return
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
