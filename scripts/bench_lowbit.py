"""Low-bit experts: one expert's call and the whole model's decode, float32 against int4.

    python scripts/bench_lowbit.py ARTIFACT [--threads 1] [--rounds 3] [--out results.json]

ARTIFACT needs a ladder (export, or `swapmoe ladder add`). One expert, one token (and 16):
the shared float32 kernel (weights fed as inputs), the int4 rung's standard-op kernel (as
small `--expert-dtype int4` experts and providers without MatMulNBits run them), and the
rung's MatMulNBits session (as larger int4 experts and copies run). Whole model: `full` (float32 experts) against
`ladder` with every expert an int4 copy (`ladder_primary=False`), on MatMulNBits and on
standard ops, decode ms/token over random 64-token inputs with forced decoder ids,
interleaved round by round, medians. (The cells share one process, so no memory figures
here: `swapmoe sweep` and `swapmoe bench` measure memory, one process per cell.) Runs on a shared machine move absolute times: read
the ratios, which are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig
from swapmoe_edge.model.sessions import session_options
from swapmoe_export import graphs, ladder


def _median_ms(fn, n: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def one_expert(art: Path, threads: int, calls: int) -> dict:
    m = load_manifest(art)
    c = m.config
    key = next(iter(m.experts))
    e = m.experts[key]
    blob = np.fromfile(m.path(e.weights_file), dtype=np.uint8)
    w = {t.role: blob[t.offset: t.offset + t.nbytes].view(t.dtype).reshape(t.shape).astype(np.float32) for t in e.tensors}
    opts = session_options(threads)
    f32 = ort.InferenceSession(graphs.expert_kernel_graph(c.d_model, c.d_ff, c.dense_act_fn, "float32").proto.SerializeToString(), opts)
    r = e.rungs["int4"]
    rblob = np.fromfile(m.path(r.weights_file), dtype=np.uint8)
    parts = {t.role: rblob[t.offset: t.offset + t.nbytes].view(t.dtype).reshape(t.shape) for t in r.tensors}
    std = ort.InferenceSession(str(m.path(f"dense/{m.ladder['int4'].kernel}.onnx")), opts)
    nopts = session_options(threads)
    nopts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    nopts.add_external_initializers_from_files_in_memory([ladder.RUNG_DATA], [rblob], [rblob.nbytes])
    nbits = ort.InferenceSession(str(m.path(m.ladder["int4"].session_graph)), nopts)
    out = {}
    for tokens in (1, 16):
        x = np.random.default_rng(0).standard_normal((tokens, c.d_model)).astype(np.float32)
        row = {
            "float32_kernel_ms": _median_ms(lambda: f32.run(None, {"x": x, "wi": w["wi"], "wo": w["wo"]}), calls),
            "int4_rung_standard_ops_ms": _median_ms(lambda: std.run(None, {"x": x, **parts}), calls),
            "int4_rung_matmulnbits_ms": _median_ms(lambda: nbits.run(None, {"x": x}), calls),
        }
        row["nbits_vs_float32"] = row["int4_rung_matmulnbits_ms"] / row["float32_kernel_ms"]
        out[f"{tokens}_token"] = row
    return out


def whole_model(art: Path, threads: int, rounds: int, requests: int, new_tokens: int) -> dict:
    m = load_manifest(art)
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(3, m.config.vocab_size, size=63)) + [m.config.eos_token_id] for _ in range(requests)]
    forced = [list(rng.integers(3, m.config.vocab_size, size=new_tokens)) for _ in range(requests)]
    cells = {
        "full_float32": dict(policy="full", budget="100%"),
        "ladder_int4_matmulnbits": dict(policy="ladder", budget="100%", ladder_primary=False, lowbit_kernel="nbits"),
        "ladder_int4_standard_ops": dict(policy="ladder", budget="100%", ladder_primary=False, lowbit_kernel="standard"),
    }
    runs: dict[str, list[float]] = {k: [] for k in cells}
    ttft: dict[str, list[float]] = {k: [] for k in cells}
    for rnd in range(rounds):
        for name, kw in cells.items():
            with Runtime(art, RuntimeConfig(threads=threads, read_mode="cached", **kw)) as rt:
                rt.generate(ids[:1], max_new_tokens=4, forced_ids=forced[:1])  # warm
                for i in range(requests):
                    s = rt.generate(ids[i: i + 1], max_new_tokens=new_tokens, forced_ids=forced[i: i + 1])[0].stats
                    runs[name].append(s["decode_ms_per_token"])
                    ttft[name].append(s["ttft_ms"])
                by_rung = rt.residents_by_rung()
            print(f"round {rnd + 1}/{rounds} {name}: decode {statistics.median(runs[name][-requests:]):.2f} ms/token "
                  f"{by_rung}", file=sys.stderr, flush=True)
    base = statistics.median(runs["full_float32"])
    return {name: {"decode_ms_per_token": statistics.median(v), "ratio_to_full": statistics.median(v) / base,
                   "ttft_ms": statistics.median(ttft[name]), "requests": len(v)}
            for name, v in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    res = {"artifact": str(a.artifact), "threads": a.threads, "ort": ort.__version__,
           "one_expert": one_expert(a.artifact, a.threads, a.calls),
           "whole_model": whole_model(a.artifact, a.threads, a.rounds, a.requests, a.new_tokens)}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
