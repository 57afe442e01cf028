"""Measure policies where the model does not fit: cells (policy x budget x flash speed) in the device box.

    cells = run_cells(BenchPlan(artifact="art/", policies=("on-demand", "prune", "swapmoe"),
                                budgets=("4.7GiB",), flash_mbps=(250,), memory={"4.7GiB": 5.05 * 2**30}))

Each cell is a fresh process (bench_worker.py) started inside the box after the artifact's
pages were dropped from the cache, so it starts from flash like a device after boot. What a
cell reports comes from the kernel where it can (bytes read from the disk, the cgroup's peak
memory, OOM kills), from the runtime's stats otherwise (TTFT, decode, stall, exactness).
Also here: the memory-pressure run (a second process in the box takes memory in steps) and
the soak (thousands of requests, RSS and file/thread counts over time).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from swapmoe_edge.system import pagecache
from swapmoe_edge.core.units import format_size
from swapmoe_edge.lab.devicebox import DeviceBox
from swapmoe_edge.core.errors import InputError

Log = Callable[[str], None]


@dataclass(frozen=True)
class CellSpec:
    """What one worker process runs (serialised to bench_worker as JSON)."""

    artifact: str
    policy: str
    budget: str
    requests: int = 5
    source_len: int = 64
    max_new_tokens: int = 16
    docs: str | None = None  # JSONL/lines of documents; None: random token ids
    forced: bool = True  # random ids: feed a fixed, varied decoder sequence (routing varies as on text)
    threads: int | None = 1
    cold_start: str = "background"
    read_mode: str = "direct"
    device: str | None = None
    sample_period: float | None = None  # seconds between memory samples (pressure runs)
    duration_s: float | None = None  # serve requests until this much time has passed
    monitor_period_s: float = 0.25
    max_source_tokens: int | None = None
    baseline_cache: bool = True  # a device's second launch onwards (the first measures and stores it)
    fill_first: bool = True  # after the first (launch) request, wait for the start set before measuring the rest


@dataclass(frozen=True)
class BoxSetting:
    memory_bytes: int | None  # cgroup limit (page cache counted); None: unlimited
    flash_mbps: float | None  # read throttle on the artifact's disk; None: none


def drop_caches(artifact: str | Path, everything: bool = False) -> int:
    """Drop the artifact's pages (or, as root, the whole page cache); returns bytes still cached."""
    files = pagecache.files_under(artifact)
    if everything:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    pagecache.drop(files)
    return sum(pagecache.cached_bytes(f) for f in files)


def run_worker(spec: CellSpec, box: DeviceBox | None, timeout_s: float, log: Log,
               on_event: Callable[[dict, float], None] | None = None) -> dict:
    """Start one worker (in the box), collect its events and the kernel's counters.

    ``on_event(event, spawn_time)`` sees each event as it arrives (the pressure run starts
    its memory hog from there)."""
    payload = dict(asdict(spec), spawn_time=time.time())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "swapmoe_edge.lab.bench_worker", json.dumps(payload)]
    events: list[dict] = []
    at_ready = at_filled = None
    # stderr goes to a file, not a pipe: nobody reads it while the worker runs, and a long run's
    # warnings (one per truncated input) would fill a pipe and block the worker.
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                            preexec_fn=box.join if box else None)
    deadline = time.time() + timeout_s
    timed_out = False
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        events.append(ev)
        if on_event is not None:
            on_event(ev, payload["spawn_time"])
        if ev["event"] == "filled" and box:
            at_filled = box.counters()
        if ev["event"] == "ready":
            at_ready = box.counters() if box else None
            phases = ", ".join(f"{k} {v:.1f}" for k, v in ev.get("startup", {}).items())
            log(f"    ready after {ev['launch_s']:.1f} s (import {ev.get('import_s', 0):.1f}, {phases}; "
                f"budget {format_size(ev['budget'])}, {ev['source']})")
        elif ev["event"] == "request" and ev["request"] < 3:
            log(f"    request {ev['request']}: ttft {ev['ttft_ms']:.0f} ms, decode {ev['decode_ms_per_token']:.1f} ms/token")
        elif ev["event"] == "error":
            log(f"    request {ev['request']} failed: {ev['error']}")
        if time.time() > deadline:
            timed_out = True
            proc.kill()
            break
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    with err:
        err.seek(0)
        stderr = err.read()
    return {"events": events, "returncode": proc.returncode, "timed_out": timed_out, "stderr_tail": stderr[-2000:],
            "counters": asdict(box.counters()) if box else None,
            "counters_at_ready": asdict(at_ready) if at_ready else None,
            "counters_at_filled": asdict(at_filled) if at_filled else None}


def summarize_cell(spec: CellSpec, setting: BoxSetting, raw: dict) -> dict:
    """One row of the results table from a worker's events and the box's counters."""
    ev = raw["events"]
    ready = next((e for e in ev if e["event"] == "ready"), None)
    reqs = [e for e in ev if e["event"] == "request"]
    errors = [e for e in ev if e["event"] == "error"]
    warm = reqs[1:] or reqs  # the first request runs while a background cold start fills
    filled = next((e for e in ev if e["event"] == "filled"), None)
    med = lambda key, rows=warm: statistics.median(r[key] for r in rows) if rows else None  # noqa: E731
    c, c0 = raw["counters"], raw["counters_at_ready"]
    tokens = sum(r["steps"] for r in reqs)
    serve_read = (c["read_bytes"] - c0["read_bytes"]) if c and c0 else sum(r["bytes_read"] for r in reqs)
    row = {
        "policy": spec.policy, "budget": spec.budget,
        "flash_mbps": setting.flash_mbps, "memory_limit": setting.memory_bytes,
        "requests": spec.requests, "completed": len(reqs), "errors": len(errors),
        "returncode": raw["returncode"], "timed_out": raw["timed_out"],
        "oom_kills": c["oom_kills"] if c else None,
        "budget_bytes": ready["budget"] if ready else None, "budget_source": ready["source"] if ready else None,
        "launch_s": ready["launch_s"] if ready else None,
        "startup": dict(ready.get("startup", {}), import_s=ready.get("import_s")) if ready else None,
        "launch_to_first_token_s": reqs[0]["first_token_s"] if reqs else None,
        "first_ttft_ms": reqs[0]["ttft_ms"] if reqs else None,
        "fill_wait_s": filled["wait_s"] if filled else None, "filled_at_s": filled["t"] if filled else None,
        "ttft_ms": med("ttft_ms"), "decode_ms_per_token": med("decode_ms_per_token"),
        "stall_ms": med("stall_ms"), "exact": all(r["exact"] for r in reqs) if reqs else None,
        "first_choice_resident": med("first_choice_resident"),
        "startup_read_bytes": c0["read_bytes"] if c0 else None,
        "serve_read_bytes": serve_read, "read_bytes_per_token": serve_read / tokens if tokens else None,
        # requests 2..N alone, once the start set is in: what the policy reads per token at its budget
        "measured_read_bytes_per_token": _measured_read(raw, warm),
        "peak_memory": c["peak_memory"] if c else max((r["peak_rss"] for r in reqs), default=None),
        "peak_rss": max((r["peak_rss"] for r in reqs), default=None),
        "limit_hits": c["limit_hits"] if c else None,
    }
    if setting.memory_bytes and row["peak_memory"]:
        row["peak_over_limit"] = row["peak_memory"] / setting.memory_bytes
    fatal = next((e["error"] for e in ev if e["event"] == "fatal"), None)
    if fatal or (not reqs and raw["stderr_tail"]):
        row["failure"] = (fatal or raw["stderr_tail"].strip().splitlines()[-1])[:500]
    return row


def _measured_read(raw: dict, warm: list[dict]) -> float | None:
    tokens = sum(r["steps"] for r in warm)
    if not tokens:
        return None
    c, cf = raw.get("counters"), raw.get("counters_at_filled")
    if c and cf:
        return (c["read_bytes"] - cf["read_bytes"]) / tokens  # the kernel's count
    return sum(r["bytes_read"] for r in warm) / tokens  # unboxed: the runtime's own count


@dataclass(frozen=True)
class BenchPlan:
    artifact: str
    policies: tuple[str, ...] = ("on-demand", "prune", "swapmoe")
    budgets: tuple[str, ...] = ("50%",)
    flash_mbps: tuple[float | None, ...] = (250.0,)
    memory: dict[str, int | None] = field(default_factory=dict)  # budget -> cgroup limit
    requests: int = 5
    source_len: int = 64
    max_new_tokens: int = 16
    docs: str | None = None
    threads: int | None = 1
    read_mode: str = "direct"
    cold_start: str = "background"
    box: bool = True
    drop_all_caches: bool = False
    timeout_s: float = 1800.0
    fill_first: bool = True


def run_cells(plan: BenchPlan, log: Log = lambda s: print(s, file=sys.stderr, flush=True)) -> list[dict]:
    """Every (budget, flash, policy) cell of ``plan``, each a fresh process after a cache drop."""
    for b in plan.budgets:
        if plan.box and plan.memory.get(b, 0) is None:
            raise InputError(f"no memory limit for budget {b}: give --memory SIZE or --memory {b}=SIZE")
    rows = []
    box = None
    try:
        for budget in plan.budgets:
            for flash in plan.flash_mbps:
                setting = BoxSetting(plan.memory.get(budget) if plan.box else None, flash if plan.box else None)
                if plan.box:
                    if box is None:
                        box = DeviceBox(setting.memory_bytes, (flash or 0) * 1e6, plan.artifact)
                        log(f"[bench] {box.describe()}")
                    box.set_limits(setting.memory_bytes, (flash or 0) * 1e6)
                for policy in plan.policies:
                    spec = CellSpec(plan.artifact, policy, budget, plan.requests, plan.source_len, plan.max_new_tokens,
                                    plan.docs, True, plan.threads, plan.cold_start, plan.read_mode,
                                    fill_first=plan.fill_first)
                    left = drop_caches(plan.artifact, plan.drop_all_caches)
                    if box:
                        box.reset_counters()
                    log(f"[bench] {policy} at {budget}, flash {flash or 'unthrottled'} MB/s, limit "
                        f"{format_size(setting.memory_bytes) if setting.memory_bytes else 'none'} "
                        f"(artifact in cache after drop: {format_size(left)})")
                    raw = run_worker(spec, box, plan.timeout_s, log)
                    row = summarize_cell(spec, setting, raw)
                    row["cache_left_after_drop"] = left
                    rows.append(row)
                    log("    " + _one_line(row))
    finally:
        if box is not None:
            box.close()
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict], ref: str = "prune") -> None:
    """Decode and TTFT of each cell as a ratio to ``ref``'s cell of the same budget and flash speed."""
    for r in rows:
        base = next((b for b in rows if b["policy"] == ref and b["budget"] == r["budget"]
                     and b["flash_mbps"] == r["flash_mbps"] and b["decode_ms_per_token"]), None)
        if base and r["decode_ms_per_token"]:
            r[f"decode_vs_{ref}"] = r["decode_ms_per_token"] / base["decode_ms_per_token"]
            r[f"ttft_vs_{ref}"] = r["ttft_ms"] / base["ttft_ms"]
            r[f"first_ttft_vs_{ref}"] = r["first_ttft_ms"] / base["first_ttft_ms"]


def _one_line(r: dict) -> str:
    if not r["completed"]:
        return f"FAILED (exit {r['returncode']}, OOM kills {r['oom_kills']}): {r.get('failure', '')}"
    return (f"done {r['completed']}/{r['requests']}, OOM {r['oom_kills']}, launch->first token "
            f"{r['launch_to_first_token_s']:.1f} s, ttft {r['ttft_ms']:.0f} ms (first {r['first_ttft_ms']:.0f}), "
            f"decode {r['decode_ms_per_token']:.1f} ms/token, stall {r['stall_ms']:.0f} ms, "
            f"read {(r['read_bytes_per_token'] or 0) / 2**20:.1f} MiB/token, peak {format_size(r['peak_memory'] or 0)}")


# -- memory pressure and soak ------------------------------------------------------------------

HOG = r"""
import sys, time
step, n, interval, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
blocks = []
t0 = time.time()
for i in range(n):
    time.sleep(interval)
    b = bytearray(step)
    for j in range(0, step, 4096):  # touch every page: memory counts when it is used, not when asked for
        b[j] = 1
    blocks.append(b)
    print(f"{time.time() - t0:.3f} {len(blocks) * step}", flush=True)
time.sleep(hold)
"""


def run_pressure(spec: CellSpec, setting: BoxSetting, step_bytes: int, steps: int, interval_s: float,
                 log: Log = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Serve ``spec`` under ``auto`` in the box while a second process in it takes memory in steps."""
    drop_caches(spec.artifact)
    hold = 10.0
    with DeviceBox(setting.memory_bytes, (setting.flash_mbps or 0) * 1e6, spec.artifact) as box:
        box.reset_counters()
        log(f"[pressure] {box.describe()}; hog: {steps} x {format_size(step_bytes)} every {interval_s} s")
        hog: list[subprocess.Popen] = []
        t_hog: list[float] = []

        def start_hog(ev: dict, spawn_time: float) -> None:
            if ev["event"] == "request" and ev["request"] >= 2 and not hog:
                t_hog.append(time.time() - spawn_time)
                hog.append(subprocess.Popen([sys.executable, "-c", HOG, str(step_bytes), str(steps), str(interval_s), str(hold)],
                                            stdout=subprocess.PIPE, text=True, preexec_fn=box.join))
                log(f"[pressure] hog started at {t_hog[0]:.1f} s")

        raw = run_worker(spec, box, timeout_s=3600, log=log, on_event=start_hog)
        hog_steps = []
        if hog:
            hog[0].kill()
            out = hog[0].communicate()[0]
            hog_steps = [(t_hog[0] + float(a), int(b)) for a, b in (ln.split() for ln in out.splitlines() if ln.strip())]
    events, counters = raw["events"], raw["counters"]
    return {"spec": asdict(spec), "memory_limit": setting.memory_bytes, "flash_mbps": setting.flash_mbps,
            "hog_step_bytes": step_bytes, "hog_steps": hog_steps, "samples": [e for e in events if e["event"] == "sample"],
            "requests": [e for e in events if e["event"] == "request"], "errors": [e for e in events if e["event"] == "error"],
            "returncode": raw["returncode"], "oom_kills": counters["oom_kills"], "peak_memory": counters["peak_memory"],
            "stderr_tail": raw["stderr_tail"]}


def run_soak(spec: CellSpec, setting: BoxSetting, box: bool = True,
             log: Log = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """``spec.requests`` requests in one process: RSS, open files and threads of the first and last 200."""
    drop_caches(spec.artifact)
    b = DeviceBox(setting.memory_bytes, (setting.flash_mbps or 0) * 1e6, spec.artifact) if box else None
    try:
        if b:
            b.reset_counters()
            log(f"[soak] {b.describe()}; {spec.requests} requests")
        raw = run_worker(spec, b, timeout_s=4 * 3600, log=log)
    finally:
        if b:
            b.close()
    reqs = [e for e in raw["events"] if e["event"] == "request"]
    k = min(200, len(reqs) // 2)
    first, last = reqs[:k], reqs[-k:]
    med = lambda rows, key: statistics.median(r[key] for r in rows) if rows else None  # noqa: E731
    out = {"spec": asdict(spec), "memory_limit": setting.memory_bytes, "flash_mbps": setting.flash_mbps,
           "completed": len(reqs), "errors": [e for e in raw["events"] if e["event"] == "error"],
           "returncode": raw["returncode"], "counters": raw["counters"],
           "stderr_tail": next((e["error"] for e in raw["events"] if e["event"] == "fatal"), raw["stderr_tail"]),
           "rss_first": med(first, "rss"), "rss_last": med(last, "rss"),
           "fds_first": med(first, "fds"), "fds_last": med(last, "fds"),
           "threads_first": med(first, "threads"), "threads_last": med(last, "threads"),
           "rss_series": [r["rss"] for r in reqs], "window": k}
    if out["rss_first"]:
        out["rss_last_over_first"] = out["rss_last"] / out["rss_first"]
    return out


# -- reports --------------------------------------------------------------------------------------

COLUMNS = [("policy", "policy", "{}"), ("budget", "budget", "{}"), ("flash_mbps", "flash MB/s", "{:g}"),
           ("memory_limit", "limit", "size"), ("completed", "done", "{}"), ("oom_kills", "OOM", "{}"),
           ("launch_to_first_token_s", "launch→1st token s", "{:.1f}"), ("first_ttft_ms", "1st TTFT ms", "{:.0f}"),
           ("filled_at_s", "filled at s", "{:.1f}"),
           ("ttft_ms", "TTFT ms", "{:.0f}"), ("decode_ms_per_token", "decode ms/tok", "{:.1f}"),
           ("decode_vs_prune", "decode / prune", "{:.2f}"), ("ttft_vs_prune", "TTFT / prune", "{:.2f}"),
           ("stall_ms", "stall ms", "{:.0f}"), ("read_bytes_per_token", "read MiB/tok (fill incl.)", "mib"),
           ("measured_read_bytes_per_token", "read MiB/tok (measured reqs)", "mib"),
           ("peak_memory", "peak", "size"), ("peak_over_limit", "peak/limit", "{:.3f}"), ("exact", "exact", "{}"),
           ("cache_left_after_drop", "cached at start", "size")]


def markdown_table(rows: list[dict]) -> str:
    def cell(v, fmt):
        if v is None:
            return "-"
        if fmt == "size":
            return format_size(v)
        if fmt == "mib":
            return f"{v / 2**20:.1f}"
        return fmt.format(v)

    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(k), f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out: Path, title: str, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cells.json").write_text(json.dumps({"meta": meta, "cells": rows}, indent=1))
    (out / "cells.md").write_text(f"# {title}\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + markdown_table(rows))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        for budget in dict.fromkeys(r["budget"] for r in rows):
            pts = sorted(((r["flash_mbps"], r) for r in rows if r["policy"] == policy and r["budget"] == budget
                          and r["decode_ms_per_token"] and r["flash_mbps"]), key=lambda p: p[0])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1]["first_ttft_ms"] / 1e3 for p in pts], marker="o", label=f"{policy} {budget}")
            axes[1].plot(xs, [p[1]["decode_ms_per_token"] for p in pts], marker="o", label=f"{policy} {budget}")
    for ax, yl in zip(axes, ("first request TTFT (s)", "decode ms/token (median)")):
        ax.set_xscale("log")
        ax.set_xlabel("flash read MB/s (throttled)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "cells.png", dpi=110)
    plt.close(fig)


def plot_pressure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([x["t"] for x in s], [x["budget"] / 2**20 for x in s], label="live budget")
    ax.plot([x["t"] for x in s], [x["rss"] / 2**20 for x in s], label="runtime RSS")
    ax.plot([x["t"] for x in s], [x["resident_bytes"] / 2**20 for x in s], label="resident experts")
    if result["hog_steps"]:
        ax.step([0] + [t for t, _ in result["hog_steps"]], [0] + [b / 2**20 for _, b in result["hog_steps"]],
                where="post", label="other process")
    if result.get("memory_limit"):
        ax.axhline(result["memory_limit"] / 2**20, color="k", ls="--", lw=0.8, label="cgroup limit")
    ax.set_xlabel("seconds since launch")
    ax.set_ylabel("MiB")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
