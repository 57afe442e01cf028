"""Paired A/B of two runtimes in one process: decode tokens (or encoder passes) interleaved.

    python scripts/bench_decode_pairs.py --floors ART_1 ART_2 [ART_3 ...] [--steps 90] [--json OUT]

``--floors``: every artifact's `full` decode in one process, each step run by every runtime in
a rotating order and then once by the bandwidth probe of decode_probe.py (256 MiB of float32
MatMul weights). Each artifact's floor is decode_floor.bytes_per_token of its own files (a
model with int8/int4 dense weights is held to its own, lower floor) over the probe's rate;
per step: ms/token of each, its ratio to the first artifact's and to its own floor (medians).
``ART:RUNG`` (e.g. ``ART:int4``) runs that artifact's experts as their ladder copies only (the
`ladder` policy at 100% with ``ladder_primary`` off: the whole model on the low-bit rungs), its
floor counting the copies' bytes.

    python scripts/bench_decode_pairs.py ART_A '{"prepack_experts": "off"}' ART_B '{"prepack_experts": "on"}' \
        [--steps 90] [--encoder 512 --pairs 10]

Both runtimes run `full` at 100% with one thread unless their JSON says otherwise (`{"policy": "on-demand"}`), on the same random input (60 tokens);
each decode step (or encoder pass) runs A then B, or B then A on odd steps, and the
median of the per-step ratio B/A is printed. On a shared machine this is the robust way
to price one change: both sides see the same load at the same moment. Needs memory for
both runtimes at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from decode_probe import PROBE_BYTES, PROBE_D, probe_session

from swapmoe_edge.lab.decode_floor import bytes_per_token
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def floors(arts: list[str], steps: int, threads: int = 1) -> dict:
    """Every artifact's `full` decode, paired step by step, against its own floor (module docstring)."""
    specs = [(a.rsplit(":", 1) + [None])[:2] if ":" in a else [a, None] for a in arts]
    rts = [Runtime(art, RuntimeConfig(policy="full", budget="100%", threads=threads)) if rung is None else
           Runtime(art, RuntimeConfig(policy="ladder", budget="100%", threads=threads, ladder_primary=False))
           for art, rung in specs]
    probe = probe_session(threads)
    x = {"x": np.ones((1, PROBE_D), np.float32)}
    for _ in range(3):
        probe.run(None, x)
    need = [bytes_per_token(rt.manifest, rung) for rt, (_, rung) in zip(rts, specs)]
    vocab = rts[0].manifest.config.vocab_size
    ids = np.array([[int(t) for t in np.random.default_rng(0).integers(5, vocab, 59)] + [1]])
    mask = np.ones_like(ids)
    times: list[list[float]] = [[] for _ in rts]
    probe_ms: list[float] = []
    for step in range(steps):
        if step % 30 == 0:
            states = [rt.model.start_decoder(rt.model.encode(ids, mask), mask) for rt in rts]
            toks = [np.zeros((1, 1), np.int64) for _ in rts]
        order = [(j + step) % len(rts) for j in range(len(rts))]
        for j in order:
            t = time.perf_counter()
            logits, states[j] = rts[j].model.decode(toks[j], states[j])
            times[j].append((time.perf_counter() - t) * 1e3)
            toks[j] = logits[:, -1].argmax(-1).reshape(1, 1)
        t = time.perf_counter()
        probe.run(None, x)
        probe_ms.append((time.perf_counter() - t) * 1e3)
    gbps = [PROBE_BYTES / (ms * 1e-3) / 1e9 for ms in probe_ms]
    out = {"threads": threads, "steps": steps, "probe_gbps_median": statistics.median(gbps), "artifacts": []}
    for j, (art, rt, tb) in enumerate(zip(arts, rts, need)):
        floor = [tb.total / (g * 1e9) * 1e3 for g in gbps]  # this step's floor, ms
        row = {"artifact": art, "dense_dtype": rt.manifest.dense_dtype, "experts": specs[j][1] or rt.manifest.expert_dtype,
               "bytes_per_token": tb.total, "bytes_by_part": tb.weights,
               "decode_ms": statistics.median(times[j]),
               "floor_ms": statistics.median(floor),
               "ratio_to_floor": statistics.median([t / f for t, f in zip(times[j], floor)]),
               "ratio_to_first": statistics.median([t / t0 for t, t0 in zip(times[j], times[0])])}
        out["artifacts"].append(row)
        print(f"{art}: dense {row['dense_dtype']}, experts {row['experts']}, {tb.total / 1e6:.1f} MB/token; decode {row['decode_ms']:.2f} ms/token, "
              f"floor {row['floor_ms']:.2f} ms ({row['ratio_to_floor']:.2f}x), {row['ratio_to_first']:.3f}x the first")
    print(f"probe {out['probe_gbps_median']:.2f} GB/s (median of {steps} runs, one after every step)")
    for rt in rts:
        rt.close()
    return out


def main() -> None:
    if "--floors" in sys.argv:
        fp = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        fp.add_argument("--floors", nargs="+", required=True, metavar="ARTIFACT")
        fp.add_argument("--steps", type=int, default=90, help="decode steps (a fresh request every 30)")
        fp.add_argument("--json", default=None)
        f = fp.parse_args()
        res = floors(f.floors, f.steps)
        if f.json:
            Path(f.json).write_text(json.dumps(res, indent=1))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("art_a")
    ap.add_argument("cfg_a", help="RuntimeConfig fields as JSON")
    ap.add_argument("art_b")
    ap.add_argument("cfg_b")
    ap.add_argument("--steps", type=int, default=90, help="decode steps (a fresh request every 30)")
    ap.add_argument("--encoder", type=int, help="time the encoder on this many source tokens instead of decoding")
    ap.add_argument("--pairs", type=int, default=10)
    a = ap.parse_args()
    rts = [Runtime(art, RuntimeConfig(**{"policy": "full", "budget": "100%", "threads": 1, **json.loads(cfg)}))
           for art, cfg in ((a.art_a, a.cfg_a), (a.art_b, a.cfg_b))]
    vocab = rts[0].manifest.config.vocab_size
    times: list[list[float]] = [[], []]
    same = True
    if a.encoder:
        for i in range(a.pairs):
            ids = np.array([[int(t) for t in np.random.default_rng(i).integers(5, vocab, a.encoder - 1)] + [1]])
            for j in ((0, 1) if i % 2 else (1, 0)):
                t = time.perf_counter()
                rts[j].model.encode(ids, np.ones_like(ids))
                times[j].append(time.perf_counter() - t)
    else:
        ids = np.array([[int(t) for t in np.random.default_rng(0).integers(5, vocab, 59)] + [1]])
        mask = np.ones_like(ids)
        for step in range(a.steps):
            if step % 30 == 0:
                states = [rt.model.start_decoder(rt.model.encode(ids, mask), mask) for rt in rts]
                toks = [np.zeros((1, 1), np.int64) for _ in rts]
            for j in ((0, 1) if step % 2 else (1, 0)):
                t = time.perf_counter()
                logits, states[j] = rts[j].model.decode(toks[j], states[j])
                times[j].append(time.perf_counter() - t)
                toks[j] = logits[:, -1].argmax(-1).reshape(1, 1)
            same &= int(toks[0][0, 0]) == int(toks[1][0, 0])
    ta, tb = np.array(times[0]) * 1e3, np.array(times[1]) * 1e3
    for name, ts in (("A", ta), ("B", tb)):
        print(f"{name}: min {ts.min():.3f} p25 {np.percentile(ts, 25):.3f} median {np.median(ts):.3f} ms")
    r = tb / ta
    print(f"paired B/A: median {np.median(r):.3f} (p25 {np.percentile(r, 25):.3f}, p75 {np.percentile(r, 75):.3f})"
          + ("" if a.encoder else f"; same tokens: {same}"))
    for rt in rts:
        rt.close()


if __name__ == "__main__":
    main()
