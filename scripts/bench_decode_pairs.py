"""Paired A/B of two runtimes in one process: decode tokens (or encoder passes) interleaved.

    python scripts/bench_decode_pairs.py ART_A '{"prepack_experts": "off"}' ART_B '{"prepack_experts": "on"}' \
        [--steps 90] [--encoder 512 --pairs 10]

Both runtimes run `full` at 100% with one thread, on the same random input (60 tokens);
each decode step (or encoder pass) runs A then B, or B then A on odd steps, and the
median of the per-step ratio B/A is printed. On a shared machine this is the robust way
to price one change: both sides see the same load at the same moment. Needs memory for
both runtimes at once.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("art_a")
    ap.add_argument("cfg_a", help="RuntimeConfig fields as JSON")
    ap.add_argument("art_b")
    ap.add_argument("cfg_b")
    ap.add_argument("--steps", type=int, default=90, help="decode steps (a fresh request every 30)")
    ap.add_argument("--encoder", type=int, help="time the encoder on this many source tokens instead of decoding")
    ap.add_argument("--pairs", type=int, default=10)
    a = ap.parse_args()
    rts = [Runtime(art, RuntimeConfig(policy="full", budget="100%", threads=1, **json.loads(cfg)))
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
