"""The decode benchmarks' shared measures: the memory-bandwidth probe that prices the floor, and
the step profile that splits a decoded token's time by part.

    python scripts/decode_probe.py [--threads 1] [--runs 20]

prints ONNX Runtime's streaming rate for one token through 256 MiB of prepacked float32 MatMul
weights (16 constant [1024, 4096] matrices, as the runtime's own dense weights are held) and
the fixed cost of one session call from Python. bench_decode.py, bench_decode_pairs.py,
bench_causal_decode.py and bench_step_nodes.py import it, so that every floor has one definition.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

PROBE_D, PROBE_F, PROBE_N = 1024, 4096, 16  # 16 float32 [1024, 4096] MatMul weights: 256 MiB
PROBE_BYTES = PROBE_D * PROBE_F * 4 * PROBE_N


def probe_session(threads: int):
    """A session that streams PROBE_BYTES of prepacked float32 MatMul weights for one token."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from swapmoe_edge.model.sessions import session_options

    d, f, n = PROBE_D, PROBE_F, PROBE_N
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((d, f), dtype=np.float32), f"w{i}") for i in range(n)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(n)]
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(n)], ["y"]))
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, f])
    model = helper.make_model(helper.make_graph(nodes, "stream", [x_info], [y_info], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), session_options(threads or None),
                                providers=["CPUExecutionProvider"])


def bandwidth(threads: int, runs: int = 20) -> dict:
    """ORT's streaming rate for one token through big constant MatMuls, and the cost of one call."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from swapmoe_edge.model.sessions import session_options

    d = PROBE_D
    sess = probe_session(threads)
    opts = session_options(threads or None)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])
    x = np.ones((1, d), np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    nbytes = PROBE_BYTES
    # One ORT call that does nothing: the fixed price of a session run from Python.
    ident = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x_info],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, d])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    ident.ir_version = 8
    tiny = ort.InferenceSession(ident.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    call = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(1000):
            tiny.run(None, {"x": x})
        call.append((time.perf_counter() - t) / 1000)
    return {"bytes": nbytes, "gbps_median": nbytes / statistics.median(times) / 1e9,
            "gbps_best": nbytes / min(times) / 1e9, "empty_call_us": min(call) * 1e6}


class StepProfile(dict):
    """Seconds (and calls) per part of a decode step, summed while ``active``: every ORT call by
    subgraph kind, the expert kernel, and the routing glue around it (``hook``, a split.MoEHook
    around the model's MoE). Installs itself on the runtime's sessions and policy."""

    def __init__(self, rt):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.active = False
        self.in_moe = 0.0
        sessions, policy = rt.sessions, rt.policy
        run, kernel = sessions.run, policy.kernel

        def timed_run(name, feeds):
            if not self.active:
                return run(name, feeds)
            t = time.perf_counter()
            out = run(name, feeds)
            self.add(f"ort:{name.rsplit('.', 1)[-1]}", time.perf_counter() - t)
            return out

        def timed_kernel(expert, x):
            t = time.perf_counter()
            out = kernel(expert, x)
            dt = time.perf_counter() - t
            if self.active:
                self.add("ort:expert_kernel", dt)
                self.in_moe += dt
            return out

        sessions.run, policy.kernel = timed_run, timed_kernel

    def add(self, key: str, dt: float, calls: int = 1) -> None:
        self[key] = self.get(key, 0.0) + dt
        self.counts[key] = self.counts.get(key, 0) + calls

    def clear(self) -> None:
        super().clear()
        self.counts.clear()

    def hook(self, layer, normed, logits, mask, moe):
        self.in_moe = 0.0
        t = time.perf_counter()
        out = moe(layer, normed, logits, mask)
        if self.active:
            self.add("python:routing+dispatch", time.perf_counter() - t - self.in_moe)
        return out


def install_profile(rt) -> StepProfile:
    """A StepProfile active during the Switch model's decode steps only (the encoder's calls are
    not counted), with each step's total."""
    prof = StepProfile(rt)
    model = rt.model
    decode = model.decode

    def timed_decode(ids, state, capture=None, hook=None):
        prof.active = True
        t = time.perf_counter()
        try:
            return decode(ids, state, capture, hook=prof.hook)
        finally:
            prof.active = False
            prof.add("decode() total", time.perf_counter() - t)

    model.decode = timed_decode
    return prof


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0: all cores)")
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args(argv)
    print(json.dumps(bandwidth(a.threads, a.runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
