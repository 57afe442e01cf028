"""Decode speed of a decoder-only artifact against the memory-bandwidth floor, at one thread.

    python scripts/bench_causal_decode.py ART [--threads 1] [--tokens 32] [--requests 7]
        [--prompt-len 64] [--profile] [--json OUT]

`full` at 100%, greedy, one row: each request is a random prompt of --prompt-len ids and
--tokens decode steps that are fed a fixed, varied id sequence (forced ids), so that routing
varies as it would on text although the weights are random. In the same process, after every
token, decode_probe.py's bandwidth probe streams 256 MiB of prepacked float32 MatMul weights
once: each token is set against the probe run beside it, so both see the same load on a
shared machine. floor = decode_floor.bytes_per_token (the artifact's bytes one token reads:
dense blocks, k experts a layer, LM head, one embedding row) / the probe's rate; the ratio is
token time / floor, median over tokens. Also printed: the runtime's own decode ms/token per
request (stats, without the probe between tokens) and, with --profile, where a token's time
goes (ORT calls by subgraph, the expert kernel, routing and dispatch in Python, the rest).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import decode_probe
import numpy as np

from swapmoe_edge.lab.decode_floor import bytes_per_token
from swapmoe_edge.model.generate import Decoding
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def _ids(vocab: int, avoid: set[int], n: int, seed: int) -> list[int]:
    ids = np.random.default_rng(seed).integers(3, vocab, n)
    return [int(t) if int(t) not in avoid else 3 for t in ids]


def run(artifact: str, threads: int, tokens: int, requests: int, prompt_len: int, profile: bool,
        prepack: str = "off") -> dict:
    rt = Runtime(artifact, RuntimeConfig(policy="full", budget="100%", threads=threads or None, prepack_experts=prepack))
    m, fam = rt.manifest, rt.family
    c = m.config
    need = bytes_per_token(m)  # k experts a layer (the family's top_k)
    avoid = {int(t) for t in (getattr(c, "eos_token_id", None), getattr(c, "pad_token_id", None)) if t is not None}
    vocab = c.vocab_size
    probe = decode_probe.probe_session(threads)
    x = {"x": np.ones((1, decode_probe.PROBE_D), np.float32)}
    for _ in range(3):
        probe.run(None, x)
    prof = decode_probe.StepProfile(rt) if profile else None

    def request(seed: int, paired: bool) -> tuple[list[float], list[float], float]:
        row = _ids(vocab, avoid, prompt_len, seed)
        forced = np.array([_ids(vocab, avoid, tokens, 5000 + seed)], dtype=np.int64)
        dec = Decoding(tokens, 1, 0, forced)
        token_ms, probe_ms, last, t_first = [], [], 0.0, 0.0
        if prof is not None:
            prof.active = False
        for step in fam.generate(rt.model, [row], dec, prof.hook if prof else None):
            t = time.perf_counter()
            if step.index == 0:
                t_first = t
                if prof is not None:
                    prof.active = True  # decode steps only: the prompt's pass is not counted
            else:
                token_ms.append((t - last) * 1e3)
            if paired:
                probe.run(None, x)
                probe_ms.append((time.perf_counter() - t) * 1e3)
            last = time.perf_counter()
        if prof is not None:
            prof.active = False
        plain = (last - t_first) * 1e3 / max(len(token_ms), 1)
        return token_ms, probe_ms[:-1], plain

    request(999, paired=True)  # warm-up
    if prof is not None:
        prof.clear()
    token_ms, probe_ms, ratios, plain = [], [], [], []
    for i in range(requests):
        # Alternate: paired requests give the ratio; unpaired ones the runtime's plain ms/token.
        tm, pm, _ = request(i, paired=True)
        token_ms += tm
        probe_ms += pm
        ratios += [t / (need.total * p / decode_probe.PROBE_BYTES) for t, p in zip(tm, pm)]
        if prof is None:
            plain.append(request(100 + i, paired=False)[2])
    gbps = decode_probe.PROBE_BYTES / (statistics.median(probe_ms) / 1e3) / 1e9
    out = {
        "artifact": str(artifact), "prepacked_experts": rt.prepacked, "family": fam.name, "top_k": fam.top_k, "threads": threads, "tokens": tokens,
        "requests": requests, "prompt_len": prompt_len, "expert_dtype": m.expert_dtype, "dtype": m.dtype,
        "bytes_per_token": need.total, "bytes_by_part": need.weights, "ort_calls_per_token": need.ort_calls,
        "probe_gbps_median": gbps, "floor_ms": need.total / gbps / 1e6,
        "token_ms_median": statistics.median(token_ms), "ratio_median": statistics.median(ratios),
        "ratio_p10_p90": [float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90))],
        "plain_ms_per_token_by_request": plain,
        "plain_ms_per_token_median": statistics.median(plain) if plain else None,
    }
    if prof is not None:
        steps = requests * (tokens - 1)
        per = {k: v * 1e3 / steps for k, v in prof.items()}
        # against the mean step (the parts are sums): what no timer saw is Python around the calls
        out["token_ms_mean"] = statistics.fmean(token_ms)
        per["other (python glue: caches, masks, argmax)"] = out["token_ms_mean"] - sum(per.values())
        out["profile_ms_per_token"] = per
    rt.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=1, help="ORT threads (0: all cores)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="time each part of a decode step (adds a little)")
    ap.add_argument("--prepack-experts", choices=["auto", "on", "off"], default="off",
                    help="RuntimeConfig.prepack_experts (experts as their own prepacked sessions; default off)")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args(argv)
    out = run(a.artifact, a.threads, a.tokens, a.requests, a.prompt_len, a.profile, a.prepack_experts)
    print(f"{out['family']} top-{out['top_k']}, {out['expert_dtype']} experts"
          f"{' (prepacked)' if out['prepacked_experts'] else ''}, {a.threads} thread(s): "
          f"{out['bytes_per_token'] / 2**20:.1f} MiB/token; probe {out['probe_gbps_median']:.2f} GB/s "
          f"-> floor {out['floor_ms']:.1f} ms/token")
    for part, n in out["bytes_by_part"].items():
        print(f"  {part:24s} {n / 2**20:9.1f} MiB")
    print(f"decode {out['token_ms_median']:.1f} ms/token (paired), ratio to floor {out['ratio_median']:.2f} "
          f"(p10-p90 {out['ratio_p10_p90'][0]:.2f}-{out['ratio_p10_p90'][1]:.2f})")
    if out["plain_ms_per_token_median"] is not None:
        print(f"unpaired: {out['plain_ms_per_token_median']:.1f} ms/token (median of {a.requests} requests)")
    if "profile_ms_per_token" in out:
        print(f"profile (mean step {out['token_ms_mean']:.1f} ms):")
    for part, ms in sorted(out.get("profile_ms_per_token", {}).items(), key=lambda kv: -kv[1]):
        print(f"  {part:44s} {ms:7.2f} ms/token")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
