"""One bench cell, run as its own process (inside the device box when there is one).

    python -m swapmoe_edge.lab.bench_worker '{"artifact": ..., "policy": ..., ...}'

Writes one JSON object a line on stdout as it goes (``ready``, ``request``, ``sample``,
``done``), so that the parent keeps what a cell did even when the kernel kills it.
The parent (bench.py) owns the spec's keys; see ``bench.CellSpec``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np

from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.core.textio import read_documents
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.runtime.facade import Runtime
from swapmoe_edge.system import memory


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def _inputs(spec: dict, rt) -> tuple[list, list | None, bool]:
    """The workload: (rows of token ids or texts, forced decoder rows or None, is_text)."""
    n = min(spec["requests"], 512)  # a pool that requests cycle through (pressure runs ask for "unbounded")
    if spec.get("docs"):
        docs = [d["text"] for d in read_documents(spec["docs"])]
        if not docs:
            raise SystemExit(f"no documents in {spec['docs']}")
        return [docs[i % len(docs)] for i in range(n)], None, True
    vocab = rt.manifest.config.vocab_size
    rows = [[int(t) for t in np.random.default_rng(1000 + i).integers(3, vocab, spec["source_len"])] + [1]
            for i in range(n)]
    forced = None
    if spec.get("forced", True):
        # Random weights generate one token over and over, so decode would keep routing to the
        # same experts; a fixed, varied id sequence per request makes it route as text does.
        forced = [[int(t) for t in np.random.default_rng(5000 + i).integers(3, vocab, spec["max_new_tokens"])]
                  for i in range(n)]
    return rows, forced, False


def _sampler(rt, stop: threading.Event, period: float, t0: float) -> None:
    while not stop.wait(period):
        s = rt.monitor.last_sample()
        _emit({"event": "sample", "t": time.time() - t0, "budget": s.budget if s else None,
               "source": s.source if s else None, "rss": memory.current_rss(),
               "residents": sum(rt.residents.counts().values()), "resident_bytes": rt.residents.nbytes})


def main(spec: dict) -> None:
    t_spawn = spec.get("spawn_time", time.time())
    t_imported = time.time()  # this module's imports (the runtime's) ran before main: spawn to here
    cfg = RuntimeConfig(policy=spec["policy"], budget=spec["budget"], threads=spec.get("threads"),
                        cold_start=spec.get("cold_start", "background"), read_mode=spec.get("read_mode", "direct"),
                        device=spec.get("device"), monitor_period_s=spec.get("monitor_period_s", 0.25),
                        max_source_tokens=spec.get("max_source_tokens"), baseline_cache=spec.get("baseline_cache", True))
    try:
        rt = Runtime(spec["artifact"], cfg)
    except SwapMoEError as e:  # e.g. a budget too small for this box: one clear line, not a traceback
        _emit({"event": "fatal", "error": str(e)})
        sys.exit(2)
    _emit({"event": "ready", "launch_s": time.time() - t_spawn, "budget": rt.budget_bytes, "source": rt.budget_source,
           "baseline": rt.baseline, "residents": sum(rt.residents.counts().values()), "startup": rt.startup,
           "import_s": t_imported - t_spawn})
    rows, forced, is_text = _inputs(spec, rt)
    stop = threading.Event()
    sampler = None
    if spec.get("sample_period"):
        sampler = threading.Thread(target=_sampler, args=(rt, stop, spec["sample_period"], t_spawn), daemon=True)
        sampler.start()
    deadline = time.time() + spec["duration_s"] if spec.get("duration_s") else None
    i = 0
    while i < spec["requests"] or deadline is not None:  # requests cycle through the input pool
        if deadline is not None and time.time() > deadline:
            break
        k = i % len(rows)
        t_req = time.time()
        try:
            if is_text:
                r = rt.summarize([rows[k]], max_new_tokens=spec["max_new_tokens"])[0]
            else:
                r = rt.generate([rows[k]], max_new_tokens=spec["max_new_tokens"],
                                forced_ids=None if forced is None else [forced[k]])[0]
        except Exception as e:  # a failed request is a result too: count it, go on
            _emit({"event": "error", "request": i, "error": f"{type(e).__name__}: {e}"})
            i += 1
            continue
        st = r.stats
        if i == 0 and spec.get("fill_first", True):
            # The first request measured the launch; the others measure the policy at its
            # budget, so let a background cold start finish filling the start set first.
            t_fill = time.time()
            rt.wait_ready(timeout=3600)
            _emit({"event": "filled", "wait_s": time.time() - t_fill, "t": time.time() - t_spawn,
                   "residents": sum(rt.residents.counts().values())})
        _emit({"event": "request", "request": i, "t": t_req - t_spawn,
               "first_token_s": t_req - t_spawn + st["ttft_ms"] / 1e3,
               "ttft_ms": st["ttft_ms"], "decode_ms_per_token": st["decode_ms_per_token"], "steps": st["steps"],
               "stall_ms": st["stall_ms"], "exact": r.exact, "bytes_read": st["bytes_read"], "loads": st["loads"],
               "swaps": st["swaps"], "peak_rss": st["peak_rss_bytes"], "rss": memory.current_rss(),
               "budget": st["budget_bytes"], "source": st["budget_source"],
               "residents": sum(st["residents"].values()), "first_choice_resident": st["first_choice_resident"],
               "fds": _open_fds(), "threads": threading.active_count(),
               "summary": r.summary if is_text else None})
        i += 1
    stop.set()
    if sampler is not None:
        sampler.join()
    rt.close()
    _emit({"event": "done", "requests": i, "wall_s": time.time() - t_spawn})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
