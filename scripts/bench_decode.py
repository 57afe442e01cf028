"""Decode speed against the memory-bandwidth floor, and against HF eager, for one artifact.

    python scripts/bench_decode.py ARTIFACT [--checkpoint HF_DIR] [--threads 1 2 0]
        [--tokens 32] [--requests 5] [--source-len 64] [--ttft-lengths 64 512]
        [--before ARTIFACT2 --before-tree SRC] [--json OUT]

For each thread count (0: all cores), each in a fresh process:
- bandwidth: ONNX Runtime streaming 256 MiB of float32 MatMul weights for one token
  (16 constant [1024, 4096] matrices, prepacked as the runtime's own) -> GB/s;
- ours: the `full` policy at 100%, greedy decoding of --tokens tokens (no stop at EOS) on
  --requests random inputs -> decode ms/token; TTFT (generate, one token) at each
  --ttft-lengths; with --profile (thread count 1), where a token's time goes;
- hf: HF eager `generate` on --checkpoint, same inputs and threads (when torch is installed).
The floor is bytes_per_token / bandwidth (weights only; the caches' share is printed).
``--before ART2 --before-tree SRC`` runs the `ours` step again with the code of another
source tree (e.g. a worktree of an older commit) on ART2, alternating with ours, so that
before/after are measured side by side.

Times are medians (and minima) over requests; on a shared machine read the ratios, which
come from one run, more than the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from decode_probe import PROBE_BYTES, PROBE_D, bandwidth, install_profile, probe_session


def _inputs(vocab: int, eos: int, length: int, seed: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, length - 1)] + [eos]


# -- phases (each runs in its own process) -------------------------------------------------------


def phase_ours(artifact: str, threads: int, tokens: int, requests: int, source_len: int,
               ttft_lengths: list[int], profile: bool, prepack: str | None = None, paired_floor: bool = True) -> dict:
    import numpy as np

    from swapmoe_edge.system import memory
    from swapmoe_edge.model.generate import greedy_search
    from swapmoe_edge.model.encdec import StepDecoder
    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig

    t0 = time.perf_counter()
    extra = {"prepack_experts": prepack} if prepack else {}  # absent from older trees' RuntimeConfig
    rt = Runtime(artifact, RuntimeConfig(policy="full", budget="100%", threads=threads or None, **extra))
    load_s = time.perf_counter() - t0
    c = rt.manifest.config
    model = rt.model
    timers = install_profile(rt) if profile else None

    def decode_once(seed: int) -> tuple[list[int], float]:
        row = np.array([_inputs(c.vocab_size, c.eos_token_id, source_len, seed)])
        mask = np.ones_like(row)
        state = model.start_decoder(model.encode(row, mask), mask)
        stamps: list[float] = []
        out = greedy_search(StepDecoder(model), state, 1, start_id=c.decoder_start_token_id, eos_id=-1,
                            pad_id=c.pad_token_id, max_new_tokens=tokens, no_repeat_ngram_size=rt.no_repeat_ngram_size,
                            on_token=lambda step: stamps.append(time.perf_counter()))
        return out[0], (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3

    decode_once(1000)  # warm-up
    if timers is not None:
        timers.clear()
    per_request, first_tokens = [], None
    for i in range(requests):
        toks, ms = decode_once(i)
        per_request.append(ms)
        first_tokens = first_tokens or toks
    result = {"load_s": load_s, "decode_ms": per_request, "tokens": first_tokens,
              "baseline_bytes": rt.baseline, "peak_rss_bytes": memory.peak_rss()}
    if paired_floor and timers is None:
        result["paired"] = _paired_floor(model, c, threads, tokens, requests, source_len, rt.no_repeat_ngram_size)
    if timers is not None:
        steps = requests * tokens  # decode() of every step, the first included
        result["profile_ms_per_token"] = {k: v * 1e3 / steps for k, v in timers.items()}
        result["profile_calls_per_token"] = {k: n / steps for k, n in timers.counts.items()}
    ttft = {}
    for length in ttft_lengths:
        length = min(length, rt.config.max_source_tokens)
        rows = [_inputs(c.vocab_size, c.eos_token_id, length, 500 + i) for i in range(requests + 1)]
        ms = [rt.generate([r], max_new_tokens=1)[0].stats["ttft_ms"] for r in rows]
        ttft[str(length)] = ms[1:]
    result["ttft_ms"] = ttft
    rt.close()
    return result


def _paired_floor(model, c, threads: int, tokens: int, requests: int, source_len: int, ngram: int) -> dict:
    """Decode tokens and the bandwidth probe alternately, in this process: after every token
    the probe streams PROBE_BYTES once. Each token is set against the probe run next to it,
    so both see the same load on a shared machine. (The probe adds 256 MiB to this process,
    after peak_rss_bytes was read.)"""
    import numpy as np

    from swapmoe_edge.model.generate import greedy_search
    from swapmoe_edge.model.encdec import StepDecoder

    probe = probe_session(threads)
    x = {"x": np.ones((1, PROBE_D), np.float32)}
    for _ in range(2):
        probe.run(None, x)
    token_ms, probe_ms = [], []
    for i in range(requests):
        row = np.array([_inputs(c.vocab_size, c.eos_token_id, source_len, 2000 + i)])
        mask = np.ones_like(row)
        state = model.start_decoder(model.encode(row, mask), mask)
        last = [0.0]

        def on_token(step: int) -> None:
            t = time.perf_counter()
            if step > 0:  # the first step follows the encoder, not a probe
                token_ms.append((t - last[0]) * 1e3)
            probe.run(None, x)
            last[0] = time.perf_counter()
            if step > 0:
                probe_ms.append((last[0] - t) * 1e3)

        greedy_search(StepDecoder(model), state, 1, start_id=c.decoder_start_token_id, eos_id=-1, pad_id=c.pad_token_id,
                      max_new_tokens=tokens, no_repeat_ngram_size=ngram, on_token=on_token)
    return {"token_ms": token_ms, "probe_ms": probe_ms, "probe_bytes": PROBE_BYTES}


def phase_hfpair(artifact: str, checkpoint: str, threads: int, tokens: int, requests: int, source_len: int,
                 ttft_lengths: list[int]) -> dict:
    """Ours and HF eager in one process, request by request in alternating order (ours first on
    odd requests), so that each pair of requests sees the same load. Needs memory for both models."""
    import copy

    import numpy as np
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, SwitchTransformersForConditionalGeneration

    from swapmoe_edge.model.generate import greedy_search
    from swapmoe_edge.model.encdec import StepDecoder
    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig

    if threads > 0:
        torch.set_num_threads(threads)
    rt = Runtime(artifact, RuntimeConfig(policy="full", budget="100%", threads=threads or None))
    hf = SwitchTransformersForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    c = rt.manifest.config
    cfg = copy.deepcopy(hf.generation_config)
    cfg.do_sample = False
    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    def run_hf(row: list[int], n: int) -> list[int]:
        with torch.no_grad():  # min_new_tokens: n steps, as ours with no EOS stop
            out = hf.generate(input_ids=torch.tensor([row]), generation_config=cfg, max_new_tokens=n,
                              min_new_tokens=n, logits_processor=LogitsProcessorList([Clock()]))
        return out[0, 1:].tolist()

    def run_ours(row: list[int], n: int) -> list[int]:
        ids = np.array([row])
        mask = np.ones_like(ids)
        state = rt.model.start_decoder(rt.model.encode(ids, mask), mask)
        out = greedy_search(StepDecoder(rt.model), state, 1, start_id=c.decoder_start_token_id, eos_id=-1,
                            pad_id=c.pad_token_id, max_new_tokens=n, no_repeat_ngram_size=rt.no_repeat_ngram_size,
                            on_token=lambda step: stamps.append(time.perf_counter()))
        return out[0]

    def per_token(fn, row) -> tuple[list[int], float]:
        stamps.clear()
        toks = fn(row, tokens)
        return toks, (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3

    warm = _inputs(c.vocab_size, c.eos_token_id, source_len, 1000)
    per_token(run_ours, warm), per_token(run_hf, warm)
    ours_ms, hf_ms, same = [], [], True
    for i in range(requests):
        row = _inputs(c.vocab_size, c.eos_token_id, source_len, i)
        res = {}
        for name in (("ours", "hf") if i % 2 else ("hf", "ours")):
            res[name] = per_token(run_ours if name == "ours" else run_hf, row)
        ours_ms.append(res["ours"][1])
        hf_ms.append(res["hf"][1])
        same &= _same_until_eos(res["ours"][0], res["hf"][0], c.eos_token_id)
    ttft = {}
    for n in ttft_lengths:
        pairs = []
        for i in range(requests + 1):
            row = _inputs(c.vocab_size, c.eos_token_id, n, 500 + i)
            t = {}
            for name in (("ours", "hf") if i % 2 else ("hf", "ours")):
                t0 = time.perf_counter()
                (run_ours if name == "ours" else run_hf)(row, 1)
                t[name] = (time.perf_counter() - t0) * 1e3
            pairs.append((t["ours"], t["hf"]))
        ttft[str(n)] = pairs[1:]  # the first pair warms this length up
    rt.close()
    return {"ours_decode_ms": ours_ms, "hf_decode_ms": hf_ms, "same_tokens": same, "ttft_ms_pairs": ttft}


HF_PHASE = r"""
import copy, json, sys, time, statistics
import numpy as np, torch
from transformers import LogitsProcessor, LogitsProcessorList, SwitchTransformersForConditionalGeneration
def _inputs(vocab, eos, length, seed):  # as bench_decode._inputs: the same ids as ours
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, length - 1)] + [eos]
ckpt, threads, tokens, requests, source_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lengths = [int(x) for x in sys.argv[6].split(",") if x]
if threads > 0:
    torch.set_num_threads(threads)
t0 = time.perf_counter()
model = SwitchTransformersForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
load_s = time.perf_counter() - t0
c = model.config
cfg = copy.deepcopy(model.generation_config)
cfg.do_sample = False  # min_new_tokens: n steps like ours (eos_id=-1); it bans EOS, so tokens agree up to ours' first EOS
stamps = []
class Clock(LogitsProcessor):
    def __call__(self, input_ids, scores):
        stamps.append(time.perf_counter())
        return scores
def gen(row, n):
    stamps.clear()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([row]), generation_config=cfg, max_new_tokens=n, min_new_tokens=n,
                             logits_processor=LogitsProcessorList([Clock()]))
    return out[0, 1:].tolist()
gen(_inputs(c.vocab_size, c.eos_token_id, source_len, 1000), tokens)  # warm-up (weights are mapped lazily)
decode, first = [], None
for i in range(requests):
    toks = gen(_inputs(c.vocab_size, c.eos_token_id, source_len, i), tokens)
    first = first or toks
    decode.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3)
ttft = {}
for n in lengths:
    ms = []
    for i in range(requests + 1):
        row = _inputs(c.vocab_size, c.eos_token_id, n, 500 + i)
        t = time.perf_counter(); gen(row, 1); ms.append((time.perf_counter() - t) * 1e3)
    ttft[str(n)] = ms[1:]
print(json.dumps({"load_s": load_s, "decode_ms": decode, "tokens": first, "ttft_ms": ttft}))
"""


# -- orchestration -----------------------------------------------------------------------------------


def _child(args: list[str], tree: Path | None = None) -> dict:
    """Run one phase in a fresh process; ``tree``: a source tree whose swapmoe_edge it imports instead."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"bench_decode: child {' '.join(args[:4])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _me(phase: str, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--phase", phase, *extra]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--checkpoint", help="the HF checkpoint of the artifact: adds HF eager generate")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 0], help="thread counts (0: all cores)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--source-len", type=int, default=64)
    ap.add_argument("--ttft-lengths", type=int, nargs="*", default=[64, 512])
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--prepack-experts", choices=["auto", "on", "off"], help="RuntimeConfig.prepack_experts for ours (default: the runtime's)")
    ap.add_argument("--before", help="an artifact to run with --before-tree's code, side by side")
    ap.add_argument("--before-tree", help="source tree (holding swapmoe_edge/) for --before")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--hf-paired", action="store_true",
                    help="HF eager and ours in one process, alternating requests (needs memory for both)")
    ap.add_argument("--phase", choices=["bandwidth", "ours", "hf", "hfpair"], help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase == "bandwidth":
        print(json.dumps(bandwidth(a.threads[0])))
        return {}
    if a.phase == "hfpair":
        print(json.dumps(phase_hfpair(a.artifact, a.checkpoint, a.threads[0], a.tokens, a.requests, a.source_len,
                                      a.ttft_lengths)))
        return {}
    if a.phase == "ours":
        print(json.dumps(phase_ours(a.artifact, a.threads[0], a.tokens, a.requests, a.source_len, a.ttft_lengths, a.profile,
                                    a.prepack_experts)))
        return {}
    if not a.artifact:
        ap.error("give an artifact directory")
    from swapmoe_edge.lab.decode_floor import bytes_per_token
    from swapmoe_edge.artifact.manifest import load_manifest

    m = load_manifest(a.artifact)
    tb = bytes_per_token(m)
    limit = int(m.extra.get("max_source_tokens", 512))  # the runtime's input limit: HF gets the same inputs
    a.ttft_lengths = sorted({min(n, limit) for n in a.ttft_lengths})
    a.eos = m.config.eos_token_id
    common = ["--tokens", str(a.tokens), "--requests", str(a.requests), "--source-len", str(a.source_len),
              "--ttft-lengths", *map(str, a.ttft_lengths)]
    report: dict = {"artifact": str(a.artifact), "prepack_experts": a.prepack_experts, "bytes_per_token": tb.weights, "bytes_total": tb.total,
                    "ort_calls_per_token": tb.ort_calls, "cores": os.cpu_count(), "runs": {}}
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    for threads in a.threads:
        th = ["--threads", str(threads)]
        row: dict = {"bandwidth": _child(_me("bandwidth", *th))}
        pre = ["--prepack-experts", a.prepack_experts] if a.prepack_experts else []
        row["ours"] = _child(_me("ours", a.artifact, *th, *common, *pre))
        if threads == 1 and not a.no_profile:  # its own run: the timers add a little to every call
            row["profile"] = _child(_me("ours", a.artifact, *th, *common, *pre, "--profile"))
        if a.before:
            row["before"] = _child(_me("ours", a.before, *th, *common), Path(a.before_tree) if a.before_tree else None)
            row["ours_again"] = _child(_me("ours", a.artifact, *th, *common, *pre))  # A-B-A: drift shows
        if a.checkpoint and has_torch and a.hf_paired:
            row["hfpair"] = _child(_me("hfpair", a.artifact, "--checkpoint", a.checkpoint, *th, *common))
        elif a.checkpoint and has_torch:
            row["hf"] = _child([sys.executable, "-c", HF_PHASE, a.checkpoint, str(threads), str(a.tokens),
                                str(a.requests), str(a.source_len), ",".join(map(str, a.ttft_lengths))])
        row["summary"] = _summarise(row, tb.total, tb.cache_per_past_token, a)
        row["summary"]["ort_calls_per_token"] = tb.ort_calls
        row["summary"]["empty_call_share"] = tb.ort_calls * row["bandwidth"]["empty_call_us"] / 1e3 / row["summary"]["decode_ms"]
        report["runs"][str(threads)] = row
        _print_row(threads, row["summary"])
    if a.checkpoint and not has_torch:
        report["hf"] = "not measured: torch is not installed"
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return report


def _summarise(row: dict, weights: int, cache_per_token: int, a) -> dict:
    med = statistics.median
    bw = row["bandwidth"]
    ours = med(row["ours"]["decode_ms"])
    floor = weights / (bw["gbps_median"] * 1e9) * 1e3
    floor_best = weights / (bw["gbps_best"] * 1e3 * 1e6) * 1e3
    mean_past = a.tokens / 2
    s = {"decode_ms": ours, "decode_ms_min": min(row["ours"]["decode_ms"]), "floor_ms": floor,
         "floor_ms_best_bandwidth": floor_best, "ratio_to_floor": ours / floor,
         "ratio_best_to_best": min(row["ours"]["decode_ms"]) / floor_best,
         "gbps_median": bw["gbps_median"], "gbps_best": bw["gbps_best"], "empty_call_us": bw["empty_call_us"],
         "cache_share_of_bytes": cache_per_token * (mean_past + a.source_len) / weights,
         "ttft_ms": {k: med(v) for k, v in row["ours"]["ttft_ms"].items()}}
    if "paired" in row["ours"]:
        p = row["ours"]["paired"]
        tok, prb = p["token_ms"], p["probe_ms"]
        # token time / (weights / the bandwidth of the probe run right after it)
        ratios = [t / (weights * pm / p["probe_bytes"]) for t, pm in zip(tok, prb)]
        s.update(paired_decode_ms=med(tok), paired_gbps=p["probe_bytes"] / (med(prb) * 1e-3) / 1e9,
                 paired_ratio_to_floor=med(ratios), paired_ratio_p25_p75=[_pct(ratios, 25), _pct(ratios, 75)],
                 paired_tokens=len(tok))
    if "hfpair" in row:
        hp = row["hfpair"]
        s.update(hf_paired_decode_ms=med(hp["hf_decode_ms"]), ours_paired_decode_ms=med(hp["ours_decode_ms"]),
                 hf_over_ours_decode_paired=med([h / o for h, o in zip(hp["hf_decode_ms"], hp["ours_decode_ms"])]),
                 hf_over_ours_ttft_paired={k: med([h / o for o, h in v]) for k, v in hp["ttft_ms_pairs"].items()},
                 ttft_paired_ms={k: [med([o for o, _ in v]), med([h for _, h in v])] for k, v in hp["ttft_ms_pairs"].items()},
                 same_tokens_as_hf=hp["same_tokens"])
    if "hf" in row:
        hf = med(row["hf"]["decode_ms"])
        s.update(hf_decode_ms=hf, hf_over_ours_decode=hf / ours,
                 hf_ttft_ms={k: med(v) for k, v in row["hf"]["ttft_ms"].items()},
                 hf_over_ours_ttft={k: med(row["hf"]["ttft_ms"][k]) / med(v) for k, v in row["ours"]["ttft_ms"].items()},
                 same_tokens_as_hf=_same_until_eos(row["ours"]["tokens"], row["hf"]["tokens"], a.eos))
    if "before" in row:
        after = med(row["ours"]["decode_ms"] + row["ours_again"]["decode_ms"])
        s.update(before_decode_ms=med(row["before"]["decode_ms"]), after_decode_ms=after,
                 before_decode_ms_min=min(row["before"]["decode_ms"]),
                 after_decode_ms_min=min(row["ours"]["decode_ms"] + row["ours_again"]["decode_ms"]),
                 before_over_after=med(row["before"]["decode_ms"]) / after,
                 before_ttft_ms={k: med(v) for k, v in row["before"]["ttft_ms"].items()},
                 same_tokens_as_before=row["before"]["tokens"] == row["ours"]["tokens"])
    prof = row.get("profile", row["ours"])
    if "profile_ms_per_token" in prof:
        s["profile_ms_per_token"] = prof["profile_ms_per_token"]
        s["profile_calls_per_token"] = prof["profile_calls_per_token"]
    return s


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _same_until_eos(ours: list[int], hf: list[int], eos: int) -> bool:
    """HF ran with min_new_tokens (EOS banned) to time n steps: compare up to ours' first EOS."""
    k = ours.index(eos) if eos in ours else len(ours)
    return ours[:k] == hf[:k]


def _print_row(threads: int, s: dict) -> None:
    label = threads or f"all ({os.cpu_count()})"
    print(f"threads {label}: decode {s['decode_ms']:.2f} ms/token (min {s['decode_ms_min']:.2f}); "
          f"floor {s['floor_ms']:.2f} ms at {s['gbps_median']:.1f} GB/s (best {s['gbps_best']:.1f}); "
          f"ratio {s['ratio_to_floor']:.2f}x (best/best {s['ratio_best_to_best']:.2f}x); "
          f"TTFT {', '.join(f'{k}: {v:.1f} ms' for k, v in s['ttft_ms'].items())}", flush=True)
    if "paired_ratio_to_floor" in s:
        lo, hi = s["paired_ratio_p25_p75"]
        print(f"  paired with the probe ({s['paired_tokens']} tokens, each next to a probe run): decode "
              f"{s['paired_decode_ms']:.2f} ms/token, probe {s['paired_gbps']:.1f} GB/s; ratio to the floor "
              f"{s['paired_ratio_to_floor']:.2f}x (p25 {lo:.2f}, p75 {hi:.2f})", flush=True)
    print(f"  {s['ort_calls_per_token']} ORT calls/token x {s['empty_call_us']:.1f} us (an empty call) = "
          f"{s['empty_call_share']:.0%} of the token; caches are {s['cache_share_of_bytes']:.1%} of the weight bytes", flush=True)
    if "hf_decode_ms" in s:
        print(f"  HF eager: decode {s['hf_decode_ms']:.2f} ms/token ({s['hf_over_ours_decode']:.2f}x ours); TTFT "
              + ", ".join(f"{k}: {v:.1f} ms ({s['hf_over_ours_ttft'][k]:.2f}x ours)" for k, v in s["hf_ttft_ms"].items())
              + f"; same tokens: {s['same_tokens_as_hf']}", flush=True)
    if "hf_over_ours_decode_paired" in s:
        print(f"  HF eager, paired in one process: decode {s['hf_paired_decode_ms']:.2f} against ours "
              f"{s['ours_paired_decode_ms']:.2f} ms/token: HF/ours {s['hf_over_ours_decode_paired']:.2f}x; TTFT "
              + ", ".join(f"{k}: ours {v[0]:.1f} / HF {v[1]:.1f} ms ({s['hf_over_ours_ttft_paired'][k]:.2f}x)"
                          for k, v in s["ttft_paired_ms"].items())
              + f"; same tokens: {s['same_tokens_as_hf']}", flush=True)
    if "before_decode_ms" in s:
        print(f"  before: decode {s['before_decode_ms']:.2f} ms/token (min {s['before_decode_ms_min']:.2f}), "
              f"after {s['after_decode_ms']:.2f} (min {s['after_decode_ms_min']:.2f}): {s['before_over_after']:.2f}x; "
              f"TTFT before {', '.join(f'{k}: {v:.1f} ms' for k, v in s['before_ttft_ms'].items())}; "
              f"same tokens: {s['same_tokens_as_before']}", flush=True)
    if "profile_ms_per_token" in s:
        prof = s["profile_ms_per_token"]
        total = prof.get("decode() total", 0.0)
        parts = {k: v for k, v in prof.items() if k != "decode() total"}
        print(f"  profile of decode() ({total:.2f} ms/token; the search loop outside it is the rest of the token):")
        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            calls = s["profile_calls_per_token"].get(k, 0)
            print(f"    {k:28s} {v:7.3f} ms  ({calls:.1f} calls)")
        print(f"    {'python: layer loop, other':28s} {total - sum(parts.values()):7.3f} ms")


if __name__ == "__main__":
    main()
