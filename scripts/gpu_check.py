#!/usr/bin/env python3
"""The GPU check's worker: builds a synthetic model, runs the runtime on CUDA and on the CPU, writes JSON.

    python scripts/gpu_check.py run --out gpu.json [--shape switch-base-8] [--work DIR]
    python scripts/gpu_check.py run --out rehearsal.json --shape tiny --rehearsal   # no GPU: CPU stands in

``scripts/gpu_check.sh`` is the entry point (it finds or makes a Python with onnxruntime-gpu
and calls ``run``). ``run`` does, each step printed as it goes and the JSON rewritten after each:

1. a random-weight checkpoint (scripts/make_synthetic_checkpoint.py) exported with float16
   dense graphs, float16 experts and the int4 ladder (MatMulNBits copies);
2. a probe process: one of the artifact's graphs opened through the product's ``open_session``
   with the ``cuda-desktop`` profile's providers; CUDA must be the provider ORT actually took
   (ORT falls back to the CPU with only a warning). Its GPU memory is the CUDA context's cost;
3. cells, each a fresh process (``cell``) running ``Runtime`` with the real configuration:
   the ``cpu-x86_64`` profile for the CPU reference (full, ladder at the share), the
   ``cuda-desktop`` profile for the GPU (full, ladder, prune, on-demand at the share, and prune
   at a byte budget, which is what sets the CUDA arena's ``gpu_mem_limit``; the ladder with every
   expert as its int4 copy, and ``full`` on a second export whose dense part is int4 MatMulNBits,
   on both providers). Experts sit where
   ``expert_placement=auto`` puts them (on the GPU), except the ladder's, which the runtime holds
   on the host (its int4 copies run as MatMulNBits sessions on the CUDA provider). Each cell
   runs greedy requests (tokens and each sparse layer's router logits, compared with the CPU's)
   and timed requests with forced decoder ids (decode ms/token, TTFT: medians over requests 2..N);
4. while a GPU cell runs, the parent polls ``nvidia-smi`` for the child's GPU memory (per
   process; the whole GPU's use less its idle use where the process table is not visible) and
   checks it against the cell's budget.

Random weights: speed, memory and CPU/GPU agreement only, never quality.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("tiny", "switch-base-8")
CPU_DEVICE, GPU_DEVICE = "cpu-x86_64", "cuda-desktop"
CUDA = "CUDAExecutionProvider"
GPU_POLICIES = ("full", "ladder", "prune", "on-demand")


def say(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the child processes -----------------------------------------------------------------------
def _preload() -> str | None:
    """ORT >= 1.21 can load CUDA and cuDNN from the nvidia-* pip packages; the check asks for it only
    when the probe found that the CUDA provider does not come up without it."""
    if os.environ.get("GPU_CHECK_PRELOAD") != "1":
        return None
    import onnxruntime as ort  # deferred: the parent process never loads ORT

    try:
        ort.preload_dlls()
        return "preload_dlls"
    except Exception as e:  # an older ORT has no preload_dlls; a missing library is reported by the probe
        return f"preload_dlls failed: {e}"


def probe(artifact: str, device: str) -> None:
    """Open the artifact's smallest graph as the runtime would; report the providers ORT took, wait for the parent."""
    preload = _preload()
    import onnxruntime as ort  # deferred: the parent process never loads ORT

    from swapmoe_edge.artifact.manifest import load_manifest
    from swapmoe_edge.model.sessions import open_session, session_options
    from swapmoe_edge.system.devices import get_profile, provider_options, select_providers

    m = load_manifest(artifact)
    prof = get_profile(device)
    providers, messages = select_providers(prof)
    name = min(m.subgraphs, key=lambda n: m.path(m.subgraphs[n].file).stat().st_size)
    sess = open_session(m.path(m.subgraphs[name].file), session_options(), providers, provider_options(prof),
                        m.root, m.files)
    print(json.dumps({"event": "ready", "pid": os.getpid(), "onnxruntime": ort.__version__,
                      "available": ort.get_available_providers(), "asked": providers, "messages": messages,
                      "took": sess.get_providers(), "graph": name, "preload": preload}), flush=True)
    sys.stdin.read()  # the parent reads this process's GPU memory, then closes our stdin


def _medians(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows[1:] if r.get(key) is not None] or [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def cell(spec: dict) -> None:
    """One runtime configuration in its own process; one JSON line (``done``) on stdout at the end."""
    preload = _preload()
    import numpy as np

    from swapmoe_edge.model.split import observe
    from swapmoe_edge.runtime.config import RuntimeConfig
    from swapmoe_edge.runtime.facade import Runtime
    from swapmoe_edge.system import memory

    t0 = time.time()
    cfg = RuntimeConfig(policy=spec["policy"], budget=spec["budget"], device=spec["device"],
                        expert_placement=spec["placement"], cold_start="blocking", baseline_cache=False,
                        ladder_primary=spec.get("ladder_primary", True))
    rt = Runtime(spec["artifact"], cfg)
    launch_s = time.time() - t0
    vocab = rt.manifest.config.vocab_size
    rng = np.random.default_rng(spec["seed"])
    rows = [[int(t) for t in rng.integers(3, vocab, spec["source_len"])] + [1] for _ in range(spec["greedy"])]
    routing: list[list] = []
    current: list = []
    hook = observe(lambda layer, normed, logits, mask: current.append(
        (f"{layer.key.stack}.{layer.key.layer}", np.asarray(logits, dtype=np.float32).reshape(-1, logits.shape[-1]))))
    greedy = []
    for row in rows:  # one request each: a batch would pad, and the CPU reference runs the same rows alone
        current.clear()
        r = rt.generate([row], max_new_tokens=spec["tokens"], hook=hook)[0]
        greedy.append({"tokens": r.token_ids, "exact": r.exact})
        routing.append(list(current))
    np.savez_compressed(spec["routing_out"], **{f"r{i}_{j}_{k}": a for i, calls in enumerate(routing)
                                                 for j, (k, a) in enumerate(calls)})
    timed = []
    for i in range(spec["timed"]):
        src = [int(t) for t in np.random.default_rng(1000 + i).integers(3, vocab, spec["source_len"])] + [1]
        forced = [int(t) for t in np.random.default_rng(5000 + i).integers(3, vocab, spec["tokens"])]
        st = rt.generate([src], max_new_tokens=spec["tokens"], forced_ids=[forced])[0].stats
        timed.append({k: st[k] for k in ("ttft_ms", "decode_ms_per_token", "first_choice_resident", "stall_ms")})
    took = {}
    for name in rt.manifest.subgraphs:
        took[name] = rt.sessions.get(name).get_providers()[0]
    runners = {r: {"mode": run.mode, "modes": dict(run.modes)} for r, run in (rt.runners or {}).items()}
    dense = sum(rt.manifest.path(rel).stat().st_size for rel in rt.parts.dense_files)
    out = {"event": "done", "policy": spec["policy"], "budget": spec["budget"], "device": spec["device"],
           "artifact": spec["artifact"],
           "providers": list(rt.providers), "provider_options": rt.provider_options,
           "device_messages": list(rt.device_messages), "placement": rt.placement, "preload": preload,
           "graphs_on": {p: sum(1 for v in took.values() if v == p) for p in sorted(set(took.values()))},
           "rung_runners": runners, "launch_s": launch_s, "budget_bytes": rt.budget_bytes,
           "baseline_bytes": rt.baseline, "dense_file_bytes": dense, "resident_expert_bytes": rt.residents.nbytes,
           "residents_by_rung": rt.residents_by_rung(), "peak_rss_bytes": memory.peak_rss(),
           "resident_plan": {str(lk): {str(i): rung for i, rung in sorted(ex.items())}
                             for lk, ex in rt.residents.placement().items()},
           "greedy": greedy, "timed": timed,
           "decode_ms_per_token": _medians(timed, "decode_ms_per_token"), "ttft_ms": _medians(timed, "ttft_ms"),
           "first_choice_resident": _medians(timed, "first_choice_resident")}
    rt.close()
    print(json.dumps(out), flush=True)


# -- nvidia-smi --------------------------------------------------------------------------------
def _smi(args: list[str]) -> list[list[str]] | None:
    exe = os.environ.get("NVIDIA_SMI", "nvidia-smi")
    try:
        res = subprocess.run([exe, *args, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in res.stdout.splitlines() if line.strip()]


def gpu_info() -> dict | None:
    rows = _smi(["--query-gpu=name,driver_version,memory.total,memory.used"])
    if not rows:
        return None
    try:
        name, driver, total, used = rows[0][:4]
        return {"name": name, "driver": driver, "memory_total_mib": float(total), "memory_used_mib": float(used),
                "gpus": len(rows)}
    except ValueError:  # an nvidia-smi that answers otherwise: keep what it said
        return {"raw": rows[0], "gpus": len(rows)}


def process_mib(pid: int) -> float | None:
    for row in _smi(["--query-compute-apps=pid,used_memory"]) or []:
        if len(row) >= 2 and row[0] == str(pid):
            try:
                return float(row[1])
            except ValueError:
                return None
    return None


def used_mib() -> float | None:
    rows = _smi(["--query-gpu=memory.used"])
    try:
        return float(rows[0][0]) if rows else None
    except ValueError:
        return None


class GpuWatch:
    """Polls a child's GPU memory (and the whole GPU's) until stopped; keeps the peaks."""

    def __init__(self, pid: int, period_s: float = 0.3):
        self.pid, self.period_s = pid, period_s
        self.peak_process = self.peak_total = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            p, u = process_mib(self.pid), used_mib()
            if p is not None:
                self.peak_process = max(p, self.peak_process or 0.0)
            if u is not None:
                self.peak_total = max(u, self.peak_total or 0.0)
            if self._stop.wait(self.period_s):
                return

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_process_mib": self.peak_process, "peak_total_mib": self.peak_total}


# -- the parent --------------------------------------------------------------------------------
def _child(args: list[str], env: dict, watch: bool, timeout: float, stdin=subprocess.DEVNULL):
    idle = used_mib() if watch else None  # the whole GPU's use before the child: for when no per-process figure shows
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=stdin, text=True, env=env, cwd=REPO)
    w = GpuWatch(proc.pid) if watch else None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n(killed after {timeout:.0f} s)"
    mem = w.stop() if w else None
    if mem is not None:
        mem["idle_total_mib"] = idle
    last = next((json.loads(line) for line in reversed(out.splitlines()) if line.startswith("{")), None)
    return proc.returncode, last, err, mem


def _run_probe(artifact: Path, env: dict, device: str, rehearsal: bool) -> dict:
    idle = None if rehearsal else used_mib()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "probe", str(artifact), device],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    info, said = None, []
    for line in proc.stdout:  # ORT prints its fallback notices on stdout too
        if line.startswith('{"event": "ready"'):
            info = json.loads(line)
            break
        said.append(line)
    mib = None
    if info is not None and not rehearsal:
        time.sleep(1.0)
        samples = [process_mib(proc.pid) for _ in range(3)]
        mib = max((s for s in samples if s is not None), default=None)
        if mib is None and idle is not None:  # no process table: the whole GPU's use over its idle use
            now = used_mib()
            mib = now - idle if now is not None else None
    _, err = proc.communicate(input="", timeout=60)  # closes its stdin: the probe exits
    said = _plain("".join(said))
    err = _plain(err)
    if info is None:
        return {"ok": False, "device": device, "error": err[-3000:], "stdout": said[-2000:]}
    info.update(ok=(info["took"][0] == CUDA) or rehearsal, device=device, context_mib=mib, stderr=err[-2000:],
                stdout=said[-2000:])
    return info


def _plain(text: str) -> str:
    """ORT's log lines without their terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text).strip()


def _find_cuda(art: Path, env: dict, work: Path, rehearsal: bool, result: dict) -> dict:
    """The device profile the cells use: the shipped cuda-desktop profile if ORT takes CUDA with it;
    else a copy that lists only CUDA and the CPU (ORT's Python API drops to the CPU alone when any
    listed provider fails to load, TensorRT without its libraries included); each also with
    onnxruntime.preload_dlls(). Every try is recorded; a fallback is a problem the JSON names."""
    if rehearsal:
        return _run_probe(art, env, CPU_DEVICE, True)
    shipped = json.loads((REPO / "devices" / f"{GPU_DEVICE}.json").read_text())  # the profile the runtime ships
    plain = dict(shipped, name="cuda-desktop-cuda-only", providers=[CUDA, "CPUExecutionProvider"])
    plain_path = work / "cuda-desktop-cuda-only.json"
    plain_path.write_text(json.dumps(plain, indent=1))
    tries = []
    for device, preload in ((GPU_DEVICE, False), (GPU_DEVICE, True), (str(plain_path), False), (str(plain_path), True)):
        e = dict(env, GPU_CHECK_PRELOAD="1" if preload else "0")
        say(f"probe: one graph through open_session with {Path(device).stem}'s providers"
            + (", after onnxruntime.preload_dlls()" if preload else ""))
        pr = _run_probe(art, e, device, False)
        pr["preload_asked"] = preload
        tries.append(pr)
        say(f"  ORT took {pr.get('took') or pr.get('error', '')[-300:]}")
        if pr["ok"]:
            env["GPU_CHECK_PRELOAD"] = "1" if preload else "0"
            if device != GPU_DEVICE or preload:
                result["problems"].append(
                    f"the shipped {GPU_DEVICE} profile did not get CUDA as it is; the cells used "
                    f"{Path(device).stem}{' with preload_dlls()' if preload else ''} (see probe.tries)")
            pr["tries"] = tries
            return pr
    return {"ok": False, "tries": tries, "took": tries[-1].get("took"), "error": tries[-1].get("error")}


def _compare(ref: dict, other: dict, ref_routing: Path, other_routing: Path) -> dict:
    """Tokens per greedy request, and the router logits of the calls the two runs share in order."""
    import numpy as np

    same = [a["tokens"] == b["tokens"] for a, b in zip(ref["greedy"], other["greedy"])]
    first_diff = []
    for a, b in zip(ref["greedy"], other["greedy"]):
        ta, tb = a["tokens"], b["tokens"]
        first_diff.append(next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y),
                               None if len(ta) == len(tb) else min(len(ta), len(tb))))
    ra, rb = np.load(ref_routing), np.load(other_routing)
    agree = total = 0
    max_diff = 0.0
    for name in ra.files:
        if name not in rb.files or ra[name].shape != rb[name].shape:
            continue
        a, b = ra[name], rb[name]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        max_diff = max(max_diff, float(np.abs(a - b).max()))
    return {"requests": len(same), "same_tokens": sum(same), "first_difference": first_diff,
            "same_resident_plan": ref.get("resident_plan") == other.get("resident_plan"),
            "router_rows_compared": total, "router_top1_agreement": agree / total if total else None,
            "router_logits_max_abs_diff": max_diff}


def _build(shape: str, work: Path, env: dict, log: list) -> Path:
    ckpt, art = work / "ckpt", work / "art"
    if not (ckpt / "model.safetensors.index.json").is_file():
        cmd = [sys.executable, str(REPO / "scripts/make_synthetic_checkpoint.py"), "--shape", shape, "-o", str(ckpt),
               "--quiet"]
        say("checkpoint: " + " ".join(cmd))
        log.append(cmd)
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
    if not (art / "manifest.json").is_file():
        # float16 dense and experts, the int4 ladder; validation against PyTorch is the CPU suite's job
        cmd = [sys.executable, "-m", "swapmoe_edge", "export", str(ckpt), "-o", str(art), "--dtype", "float16",
               "--ladder", "int4", "--no-validate", "--quiet"]
        say("export: " + " ".join(cmd))
        log.append(cmd)
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return art


def _build_int4dense(work: Path, env: dict, log: list) -> Path:
    """The same checkpoint with every dense MatMul weight as int4 MatMulNBits (float16 experts, no ladder)."""
    art = work / "art-int4dense"
    if not (art / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "swapmoe_edge", "export", str(work / "ckpt"), "-o", str(art), "--dtype", "int4",
               "--expert-dtype", "float16", "--ladder", "none", "--no-validate", "--quiet"]
        say("export: " + " ".join(cmd))
        log.append(cmd)
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return art


def run(a: argparse.Namespace) -> int:
    t_start = time.time()
    deadline = t_start + a.time_limit
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(a.out).resolve()
    # The checkout runs as it is, installed or not: the exporter and the device profiles are the
    # packages swapmoe_export (export/) and swapmoe_devices (devices/), which links here provide.
    links = work / "pythonpath"
    links.mkdir(exist_ok=True)
    for name, folder in (("swapmoe_export", "export"), ("swapmoe_devices", "devices")):
        if not (links / name).exists():
            (links / name).symlink_to(REPO / folder, target_is_directory=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), str(links), os.environ.get("PYTHONPATH")) if p))
    gpu_device = CPU_DEVICE if a.rehearsal else GPU_DEVICE
    result: dict = {"what": "scripts/gpu_check.sh: the runtime on the CUDA execution provider against the CPU",
                    "rehearsal": a.rehearsal, "shape": a.shape, "gpu": None if a.rehearsal else gpu_info(),
                    "python": sys.version.split()[0], "share": a.share, "commands": [], "cells": {},
                    "comparisons": {}, "memory": {}, "problems": []}
    if a.rehearsal:
        result["note"] = "REHEARSAL on the CPU: the 'gpu' cells ran on the CPU provider; no GPU figure here"

    def save():
        result["elapsed_s"] = round(time.time() - t_start, 1)
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out_path)

    try:
        art = _build(a.shape, work, env, result["commands"])
    except subprocess.CalledProcessError as e:
        say(f"FAIL: {' '.join(map(str, e.cmd))} exited {e.returncode}")
        result["problems"].append(f"building the model failed: {' '.join(map(str, e.cmd))} exited {e.returncode}")
        save()
        return 1
    man = json.loads((art / "manifest.json").read_text())
    result["artifact"] = {"path": str(art), "dtype": man.get("dtype"), "expert_dtype": man.get("expert_dtype"),
                          "ladder": sorted(man.get("ladder") or {}),
                          "bytes": sum(p.stat().st_size for p in art.rglob("*") if p.is_file())}
    save()

    pr = _find_cuda(art, env, work, a.rehearsal, result)
    result["probe"] = pr
    save()
    if not pr["ok"]:
        said = " ".join(t.get("stderr", "") + t.get("error", "") for t in pr.get("tries", []))
        why = re.findall(r"Failed to load library \S+ with error: [^\n]+", said)
        say(f"FAIL: the CUDA execution provider is not usable here: ORT took {pr.get('took')}"
            + (f"; {why[-1]}" if why else ""))
        result["problems"].append("CUDA execution provider not usable")
        save()
        return 1
    gpu_device = pr["device"]
    say(f"probe: ORT {pr['onnxruntime']} took {pr['took']} (context {pr.get('context_mib')} MiB)")

    base = {"artifact": str(art), "seed": 7, "source_len": a.source_len, "tokens": a.tokens,
            "greedy": a.greedy, "timed": a.timed}
    tag = "cpu-standin" if a.rehearsal else "gpu"
    cells = {f"{tag}/{pol}": dict(policy=pol, budget="100%" if pol == "full" else a.share, device=gpu_device,
                                  placement="host" if pol == "ladder" else "auto") for pol in GPU_POLICIES}
    cells["cpu/full"] = dict(policy="full", budget="100%", device=CPU_DEVICE, placement="auto")
    cells["cpu/ladder"] = dict(policy="ladder", budget=a.share, device=CPU_DEVICE, placement="host")
    cells[f"{tag}/prune-bytes"] = dict(policy="prune", budget=None, device=gpu_device, placement="auto")
    # Every expert as its int4 copy (ladder_primary=False, the budget free memory allows): the same
    # resident plan on both providers, so the MatMulNBits kernels are compared like with like.
    for side, dev in ((tag, gpu_device), ("cpu", CPU_DEVICE)):
        # The dense part as int4 MatMulNBits too (export --dtype int4), full's experts on each provider.
        cells[f"{side}/full-int4dense"] = dict(policy="full", budget="100%", device=dev, placement="auto",
                                               artifact="int4dense")
        cells[f"{side}/ladder-int4"] = dict(policy="ladder", budget="auto", device=dev, placement="host",
                                           ladder_primary=False)
    # The GPU's cells first: when time runs short, they are what this check is for.
    order = [f"{tag}/full", "cpu/full", f"{tag}/ladder", "cpu/ladder", f"{tag}/prune", f"{tag}/on-demand",
             f"{tag}/prune-bytes", f"{tag}/ladder-int4", "cpu/ladder-int4", f"{tag}/full-int4dense",
             "cpu/full-int4dense"]
    plan = [(name, cells[name]) for name in order]
    failed = False
    int4dense: Path | None = None
    for name, extra in plan:
        left = deadline - time.time()
        if left < (90 if extra.get("artifact") == "int4dense" and int4dense is None else 20):
            say(f"SKIP {name}: the time limit is near")
            result["problems"].append(f"{name} skipped: time limit")
            failed = True
            continue
        if extra.get("artifact") == "int4dense":  # built on first use, after the cells the check is for
            if int4dense is None:
                try:
                    int4dense = _build_int4dense(work, env, result["commands"])
                except subprocess.CalledProcessError as e:
                    say(f"FAIL: {' '.join(map(str, e.cmd))} exited {e.returncode}")
                    result["problems"].append(f"the int4-dense export failed (exit {e.returncode})")
                    int4dense = False
            if not int4dense:
                continue
            extra = dict(extra, artifact=str(int4dense))
        if extra["budget"] is None:  # a byte budget: what sets the CUDA arena's gpu_mem_limit
            prev = result["cells"].get(f"{tag}/prune", {})
            if not prev.get("budget_bytes"):
                continue
            # The share cell's whole-process cap, 5% over: a new process's measured baseline varies a little.
            extra["budget"] = str(int(prev["budget_bytes"] * 1.05))
        spec = dict(base, **extra, routing_out=str(work / f"routing-{name.replace('/', '_')}.npz"))
        say(f"cell {name}: policy {extra['policy']}, budget {extra['budget']}, device {extra['device']}, "
            f"placement {extra['placement']}")
        rc, res, err, mem = _child(["cell", json.dumps(spec)], env, watch=not a.rehearsal and not name.startswith("cpu/"),
                                   timeout=min(left - 5, a.cell_timeout))
        if rc != 0 or res is None:
            say(f"FAIL {name} (exit {rc}): {err.strip()[-600:]}")
            result["cells"][name] = {"error": err.strip()[-3000:], "returncode": rc}
            result["problems"].append(f"{name} failed")
            failed = True
            save()
            continue
        res["gpu_memory"] = mem
        result["cells"][name] = res
        if name.startswith("gpu/"):
            off = {p: n for p, n in res["graphs_on"].items() if p != CUDA}
            if off:
                result["problems"].append(f"{name}: graphs whose session did not take CUDA: {off}")
            slow = {r: v["modes"] for r, v in res["rung_runners"].items() if "standard" in v["modes"].values()}
            if slow:
                result["problems"].append(f"{name}: rung copies on standard ops, not MatMulNBits: {slow}")
        say(f"  decode {res['decode_ms_per_token']:.2f} ms/token, TTFT {res['ttft_ms']:.1f} ms, graphs on "
            f"{res['graphs_on']}, residents {res['residents_by_rung']}")
        if mem is not None:
            result["memory"][name] = _budget_verdict(res, mem, pr.get("context_mib"))
            say(f"  GPU memory: {result['memory'][name]['summary']}")
        save()

    for ref, other in (("cpu/full", f"{tag}/full"), ("cpu/ladder", f"{tag}/ladder"),
                       ("cpu/ladder-int4", f"{tag}/ladder-int4"), ("cpu/full-int4dense", f"{tag}/full-int4dense")):
        r, o = result["cells"].get(ref), result["cells"].get(other)
        if r and o and "greedy" in r and "greedy" in o:
            c = _compare(r, o, work / f"routing-{ref.replace('/', '_')}.npz",
                         work / f"routing-{other.replace('/', '_')}.npz")
            result["comparisons"][f"{other} vs {ref}"] = c
            say(f"tokens {other} vs {ref}: {c['same_tokens']}/{c['requests']} requests the same; router top-1 "
                f"agreement {c['router_top1_agreement']}, max |logit diff| {c['router_logits_max_abs_diff']:.3g}")
    save()
    say(f"wrote {out_path} in {time.time() - t_start:.0f} s" + (" (with problems)" if failed else ""))
    return 1 if failed else 0


def _budget_verdict(res: dict, mem: dict, context_mib: float | None) -> dict:
    """The GPU memory a cell took beyond the CUDA context, against its budget."""
    mib = 2**20
    peak, source = mem.get("peak_process_mib"), "nvidia-smi per process"
    if peak is None and mem.get("peak_total_mib") is not None:
        peak, source = mem["peak_total_mib"] - (mem.get("idle_total_mib") or 0.0), \
            "nvidia-smi whole GPU over its use before the cell (process table not visible)"
    if peak is None:
        return {"summary": "nvidia-smi gave no reading", "holds": None}
    beyond = peak - (context_mib or 0.0)
    envelope = (res["dense_file_bytes"] + res["resident_expert_bytes"]) / mib
    holds = beyond <= res["budget_bytes"] / mib if res.get("budget_bytes") else None
    return {"peak_mib": peak, "source": source, "context_mib": context_mib, "beyond_context_mib": round(beyond, 1),
            "budget_mib": round(res["budget_bytes"] / mib, 1) if res.get("budget_bytes") else None,
            "gpu_mem_limit": (res.get("provider_options") or {}).get(CUDA, {}).get("gpu_mem_limit"),
            "dense_plus_resident_experts_mib": round(envelope, 1),
            "over_dense_plus_experts": round(beyond / envelope, 3) if envelope else None, "holds": holds,
            "summary": f"{beyond:.0f} MiB beyond the context ({source}); budget "
                       f"{res['budget_bytes'] / mib if res.get('budget_bytes') else float('nan'):.0f} MiB: "
                       f"{'holds' if holds else 'EXCEEDED' if holds is False else 'no budget'}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the whole check")
    r.add_argument("--out", required=True, help="JSON file to write")
    r.add_argument("--shape", choices=SHAPES, default="switch-base-8")
    r.add_argument("--work", required=True, help="folder for the checkpoint, artifact and routing logs")
    r.add_argument("--rehearsal", action="store_true", help="no GPU: run every cell on the CPU provider")
    r.add_argument("--share", default="33%", help="budget of the lossy cells (share of the expert bytes)")
    r.add_argument("--time-limit", type=float, default=420.0, help="seconds for the whole run")
    r.add_argument("--cell-timeout", type=float, default=150.0, help="seconds for one cell's process")
    r.add_argument("--source-len", type=int, default=64)
    r.add_argument("--tokens", type=int, default=16)
    r.add_argument("--greedy", type=int, default=3, help="greedy requests compared with the CPU")
    r.add_argument("--timed", type=int, default=5, help="timed requests (forced decoder ids); medians over 2..N")
    c = sub.add_parser("cell")
    c.add_argument("spec")
    pb = sub.add_parser("probe")
    pb.add_argument("artifact")
    pb.add_argument("device")
    a = p.parse_args(argv)
    if a.cmd == "cell":
        cell(json.loads(a.spec))
        return 0
    if a.cmd == "probe":
        probe(a.artifact, a.device)
        return 0
    if not a.out.endswith(".json"):
        p.error(f"--out must name a .json file, not {a.out!r}")
    if not a.share.endswith("%"):
        p.error(f"--share must be a percentage such as 33%, not {a.share!r}")
    for name in ("greedy", "timed", "tokens", "source_len"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
