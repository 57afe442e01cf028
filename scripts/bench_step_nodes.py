"""Where one decoder step's time goes, node type by node type, for one or more artifacts.

    python scripts/bench_step_nodes.py ART [ART ...] [--layer dec.L02.step] [--past 30] [--calls 500]

Opens the artifact's decoder step subgraph alone (one thread, the runtime's graph
optimisations), feeds it one token of random activations with ``--past`` cached positions and
a 64-token encoder output, runs it ``--calls`` times after a warm-up, and prints the time a call
takes, ONNX Runtime's own per-node profile summed by operator type, what is left for the
call itself (binding, allocation, the executor, and most of all the profiler's own work), and
the time a call takes in a session without the profiler. The step's weights stay in cache across calls,
so this prices compute and overhead, not the memory-bandwidth floor (bench_decode.py).

    python scripts/bench_step_nodes.py ART --decode 90 [--json OUT]

``--decode N``: the same profile inside decoding, where each graph's weights come from memory.
The runtime (`full`, one thread) decodes N tokens (a new 60-token request every 30) with ONNX
Runtime's profiler on in its decoder step graphs and LM head; prints ms/token by part (ORT calls
by subgraph kind, the expert kernel, the routing and dispatch around it) and the step graphs'
and LM head's node time by operator type, a token's worth. The profiler costs time of its own
(tens of microseconds a call, mostly outside the nodes), so the same tokens are decoded first
without it, and that total is printed beside.

    python scripts/bench_step_nodes.py ART --pair dec.L02.step,dec.L03.step

``--pair A,B``: two consecutive decoder steps as two calls against one graph made of both
(B's hidden input fed by A's output, cached weights, alternating rounds): what running the
dense layers between two sparse ones as one graph would save in calls alone.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from decode_probe import install_profile
from onnx import compose

from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def _options(profiling: bool = False) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = profiling
    return opts


def _random_feeds(sess: ort.InferenceSession, past: int, rng) -> dict[str, np.ndarray]:
    """One token of random activations for a decoder step with ``past`` cached positions, 64 source tokens."""
    dims = {"B": 1, "b": 1, "T": 1, "P": past, "S": 64, "L": past + 1}
    return {i.name: (rng.standard_normal([d if isinstance(d, int) else dims.get(d, 1) for d in i.shape]) * 0.1)
            .astype(np.float32) for i in sess.get_inputs()}


def _per_call_us(call, warm: int, calls: int) -> float:
    for _ in range(warm):
        call()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - t0) / calls * 1e6


def profile(art: Path, layer: str, past: int, calls: int) -> dict:
    m = load_manifest(art)
    path = str(m.path(m.subgraphs[layer].file))
    opts = _options(profiling=True)
    warm = max(50, calls // 2)
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "step")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feeds = _random_feeds(sess, past, np.random.default_rng(0))
        per_call = _per_call_us(lambda: sess.run(None, feeds), warm, calls)
        events = json.loads(Path(sess.end_profiling()).read_text())
        # the same calls without the profiler, which costs time of its own
        plain = ort.InferenceSession(path, _options(), providers=["CPUExecutionProvider"])
        plain_call = _per_call_us(lambda: plain.run(None, feeds), warm, calls)
    runs = warm + calls
    by_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    nodes = sum(by_op.values()) / runs
    return {"artifact": str(art), "layer": layer, "past": past, "call_us": per_call, "unprofiled_call_us": plain_call,
            "nodes_us": nodes,
            "outside_nodes_us": per_call - nodes,
            "by_op_us": {op: d / runs for op, d in by_op.most_common()}, "nodes_per_call": {op: count[op] / runs for op in by_op}}


def _node_events(events: list[dict]) -> tuple[collections.Counter, int]:
    """Kernel time by operator type (us) and model runs, leaving out each session's first run (its
    start: weights paged in, buffers made)."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    if len(starts) < 2:
        return collections.Counter(), 0
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[1]:
            by_op[e["args"]["op_name"]] += e["dur"]
    return by_op, len(starts) - 1


def decode_profile(art: Path, tokens: int) -> dict:
    """``--decode``: a token's time by part and its step graphs' and LM head's nodes (module docstring)."""
    rt = Runtime(art, RuntimeConfig(policy="full", budget="100%", threads=1))
    sessions, model = rt.sessions, rt.model
    profiled = [n for n in rt.manifest.subgraphs if n.startswith("dec.") and n.endswith(".step")] + ["lm_head"]
    vocab = rt.manifest.config.vocab_size
    ids = np.array([[int(t) for t in np.random.default_rng(0).integers(5, vocab, 59)] + [1]])
    mask = np.ones_like(ids)
    timers = install_profile(rt)

    def run(tokens: int) -> None:
        for step in range(tokens + 1):
            if step % 30 == 0:
                state, tok = model.start_decoder(model.encode(ids, mask), mask), np.zeros((1, 1), np.int64)
            if step == 1:
                timers.clear()  # the first token (opening the profiled sessions, on the second pass) left out
            logits, state = model.decode(tok, state)
            tok = logits[:, -1].argmax(-1).reshape(1, 1)

    run(tokens)  # without ORT's profiler: what profiling adds is the difference of the totals
    plain = timers["decode() total"] / timers.counts["decode() total"] * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        sessions.opts.enable_profiling = True  # the sessions released here reopen with it on first use
        sessions.opts.profile_file_prefix = str(Path(tmp) / "dec")
        for name in profiled:
            sessions.release(name)
        run(tokens)
        parts = {"step" if n != "lm_head" else "lm_head": collections.Counter() for n in profiled}
        for name in profiled:
            by_op, runs = _node_events(json.loads(Path(sessions.get(name).end_profiling()).read_text()))
            for op, us in by_op.items():
                parts["step" if name != "lm_head" else "lm_head"][op] += us / max(runs, 1)  # one call a token
    n = timers.counts.get("decode() total", 1)
    out = {"artifact": str(art), "tokens": tokens, "unprofiled_ms_per_token": plain,
           "ms_per_token": {k: v / n * 1e3 for k, v in sorted(timers.items())},
           "nodes_us_per_token": {part: dict(c.most_common()) for part, c in parts.items()}}
    rt.close()
    return out


def pair_profile(art: Path, layers: list[str], past: int, calls: int) -> dict:
    """``--pair``: two consecutive steps as two calls and as one graph, cached weights (module docstring)."""
    m = load_manifest(art)
    first, second = (onnx.load(str(m.path(m.subgraphs[n].file))) for n in layers)
    graph = compose.merge_graphs(first.graph, compose.add_prefix(second, "b_").graph, io_map=[("hidden_out", "b_hidden")])
    merged = onnx.helper.make_model(graph, opset_imports=first.opset_import, ir_version=first.ir_version)
    a, b, both = (ort.InferenceSession(g.SerializeToString(), _options(), providers=["CPUExecutionProvider"])
                  for g in (first, second, merged))
    rng = np.random.default_rng(0)
    fa, fb, fboth = (_random_feeds(s, past, rng) for s in (a, b, both))

    def two():
        fb["hidden"] = a.run(None, fa)[0]
        b.run(None, fb)

    variants = {"two calls": two, "one graph": lambda: both.run(None, fboth)}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(9):  # alternating rounds, the first a warm-up
        for v, fn in variants.items():
            us = _per_call_us(fn, 0, calls)
            if r:
                times[v].append(us)
    res = {v: statistics.median(t) for v, t in times.items()}
    return {"artifact": str(art), "layers": layers, "past": past, "us": res, "one_over_two": res["one graph"] / res["two calls"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--layer", default="dec.L02.step", help="a decoder step subgraph (default: a dense layer's)")
    ap.add_argument("--past", type=int, default=30, help="cached positions")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--decode", type=int, metavar="TOKENS", help="profile TOKENS decoded tokens instead (module docstring)")
    ap.add_argument("--pair", metavar="A,B", help="two consecutive steps: two calls against one graph")
    a = ap.parse_args(argv)
    if a.decode or a.pair:
        out = []
        for art in a.artifacts:
            if a.decode:
                r = decode_profile(art, a.decode)
                print(f"{art}: without ORT's profiler {r['unprofiled_ms_per_token']:.2f} ms/token; with it "
                      + ", ".join(f"{k} {v:.2f}" for k, v in r["ms_per_token"].items()) + " (ms/token)")
                for part, ops in r["nodes_us_per_token"].items():
                    print(f"    {part}: " + ", ".join(f"{op} {us:.0f}" for op, us in list(ops.items())[:8]) + " (us/token)")
            else:
                r = pair_profile(art, a.pair.split(","), a.past, a.calls // 2)
                print(f"{art}: " + ", ".join(f"{k} {v:.1f} us" for k, v in r["us"].items()) + f"; one/two {r['one_over_two']:.3f}")
            out.append(r)
        if a.json:
            a.json.write_text(json.dumps(out, indent=2) + "\n")
        return 0
    out = []
    for art in a.artifacts:
        r = profile(art, a.layer, a.past, a.calls)
        out.append(r)
        print(f"{art}: {r['call_us']:.1f} us a call, nodes {r['nodes_us']:.1f} us, outside them {r['outside_nodes_us']:.1f} us; "
              f"without the profiler {r['unprofiled_call_us']:.1f} us a call")
        for op, us in r["by_op_us"].items():
            print(f"    {op:34s} {us:8.1f} us  ({r['nodes_per_call'][op]:.0f} a call)")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
