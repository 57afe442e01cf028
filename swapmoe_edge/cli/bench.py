"""``swapmoe bench``: measure an artifact in the device box (bench.py does the work)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from swapmoe_edge.cli.common import COUNT, POSITIVE, fail
from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.core.textio import read_documents
from swapmoe_edge.core.units import parse_size
from swapmoe_edge.lab.bench import (BenchPlan, BoxSetting, CellSpec, plot_pressure, run_cells, run_pressure, run_soak,
                                    write_report)
from swapmoe_edge.system.devices import detect_profile, get_profile


def _memory_map(values: tuple[str, ...], budgets: tuple[str, ...], device: str | None) -> dict:
    """``--memory 5GiB`` (every budget) or ``--memory 4.7GiB=5.05GiB`` (one budget); default: the device profile's."""
    out: dict[str, int | None] = {}
    for v in values:
        if "=" in v:
            b, size = v.split("=", 1)
            out[b.strip()] = parse_size(size)
        else:
            out.update({b: parse_size(v) for b in budgets})
    missing = [b for b in budgets if b not in out]
    if missing:
        prof = get_profile(device) if device else detect_profile()
        if prof.memory_bytes is None:
            raise click.UsageError(
                f"no memory limit for budget(s) {', '.join(missing)} and the device profile {prof.name!r} has no "
                "memory size: give --memory SIZE (every budget) or --memory BUDGET=SIZE, or --device with a board profile.")
        out.update({b: prof.memory_bytes for b in missing})
    return out


def _flash(values: tuple[float, ...], device: str | None) -> tuple[float, ...]:
    if values:
        return values
    return ((get_profile(device) if device else detect_profile()).flash_read_mb_s,)


def _check_docs(ctx, param, value):
    """Read --docs now: a bad file is one usage error, not a failure inside every cell's worker."""
    if value is not None:
        try:
            read_documents(value)
        except SwapMoEError as e:
            raise click.BadParameter(str(e)) from e
    return value


_common = [
    click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=str)),
    click.option("--memory", "memory", multiple=True, help="Cgroup memory limit (page cache counted): SIZE for every budget, or BUDGET=SIZE. Default: the device profile's memory."),
    click.option("--flash-mbps", "flash", multiple=True, type=POSITIVE, help="Read throttle on the artifact's disk, MB/s (repeat for several). Default: the device profile's."),
    click.option("--device", default=None, help="Device profile (memory and flash defaults; see `swapmoe devices`)."),
    click.option("--threads", type=COUNT, default=1, show_default=True),
    click.option("--docs", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None, callback=_check_docs, help="Documents (lines or JSONL with `text`); default: random token ids with forced decoder ids."),
    click.option("--max-new-tokens", type=COUNT, default=16, show_default=True),
    click.option("--source-len", type=COUNT, default=64, show_default=True, help="Random inputs: tokens per request."),
    click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Results folder (JSON, markdown, plots)."),
]


def common(f):
    for d in reversed(_common):
        f = d(f)
    return f


@click.group("bench")
def bench_group() -> None:
    """Measure where the model does not fit: a cgroup box with the page cache counted and flash at device speed.

    Needs root and cgroup memory + blkio (v1) or memory + io (v2) controllers; every cell
    runs in a fresh process after the artifact's pages are dropped from the cache.
    """


@bench_group.command("cells")
@common
@click.option("--policies", default="on-demand,prune,swapmoe", show_default=True, help="Comma-separated.")
@click.option("--budgets", default="50%", show_default=True, help="Comma-separated budgets (bytes or shares).")
@click.option("--requests", type=COUNT, default=5, show_default=True)
@click.option("--read-mode", type=click.Choice(["direct", "fadvise", "cached"]), default="direct", show_default=True)
@click.option("--cold-start", type=click.Choice(["background", "blocking"]), default="background", show_default=True)
@click.option("--no-box", is_flag=True, help="Run unconfined (no cgroup; the page cache may hold the artifact).")
@click.option("--drop-all-caches", is_flag=True, help="Drop the whole page cache before each cell (root), not only the artifact's pages.")
@click.option("--fill-first/--no-fill-first", default=True, show_default=True,
              help="After the first request (the launch), wait until the start set is resident before the measured requests.")
def cells_cmd(artifact, memory, flash, device, threads, docs, max_new_tokens, source_len, out, policies, budgets,
              requests, read_mode, cold_start, no_box, drop_all_caches, fill_first) -> None:
    """Policies x budgets x flash speeds; TTFT, decode, stall, bytes read, peak memory, OOM kills."""
    try:
        budget_list = tuple(b.strip() for b in budgets.split(",") if b.strip())
        plan = BenchPlan(artifact, tuple(p.strip() for p in policies.split(",")), budget_list,
                         _flash(flash, device) if not no_box else (None,),
                         _memory_map(memory, budget_list, device) if not no_box else {}, requests, source_len,
                         max_new_tokens, docs, threads, read_mode, cold_start, not no_box, drop_all_caches,
                         fill_first=fill_first)
        rows = run_cells(plan)
        meta = {"artifact": artifact, "workload": docs or f"random ids, {source_len} tokens, forced decoder ids (fixed, varied)",
                "max_new_tokens": max_new_tokens, "requests per cell": requests, "threads": threads,
                "read_mode": read_mode, "cold_start": cold_start, "box": not no_box,
                "medians": "over requests 2..N; the first request is reported apart"
                + ("; requests 2..N start once the start set is resident" if fill_first else "; no wait for the fill")}
        write_report(rows, out, f"swapmoe bench: {Path(artifact).name}", meta)
        failed = [f"{r['policy']} {r['budget']} {r['flash_mbps']} MB/s" for r in rows if r["completed"] < r["requests"]]
        click.echo(json.dumps({"out": str(out), "cells": len(rows), "incomplete": failed}))
        if failed:  # a cell that did not finish is a result (in the table), but the run did not pass
            click.echo(f"error: {len(failed)} cell(s) did not complete every request: {', '.join(failed)}; see {out}/cells.md", err=True)
            raise SystemExit(1)
    except SwapMoEError as e:
        fail(e)


@bench_group.command("pressure")
@common
@click.option("--policy", default="swapmoe", show_default=True)
@click.option("--step", default="64MiB", show_default=True, help="Memory the other process takes at each step.")
@click.option("--steps", type=COUNT, default=6, show_default=True)
@click.option("--interval", type=click.FloatRange(min=0), default=3.0, show_default=True, help="Seconds between steps.")
@click.option("--duration", type=POSITIVE, default=40.0, show_default=True, help="Seconds of requests.")
def pressure_cmd(artifact, memory, flash, device, threads, docs, max_new_tokens, source_len, out, policy, step, steps,
                 interval, duration) -> None:
    """Serve under --budget auto while a second process in the box takes memory in steps."""
    try:
        mem = _memory_map(memory, ("auto",), device)["auto"]
        spec = CellSpec(artifact, policy, "auto", requests=10**6, source_len=source_len, max_new_tokens=max_new_tokens,
                        docs=docs, threads=threads, sample_period=0.1, duration_s=duration, device=device)
        result = run_pressure(spec, BoxSetting(mem, _flash(flash, device)[0]), parse_size(step), steps, interval)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pressure.json").write_text(json.dumps(result, indent=1))
        plot_pressure(result, out / "pressure.png")
        click.echo(json.dumps({k: result[k] for k in ("returncode", "oom_kills", "peak_memory", "memory_limit")}
                              | {"requests": len(result["requests"]), "errors": len(result["errors"])}))
    except SwapMoEError as e:
        fail(e)


@bench_group.command("soak")
@common
@click.option("--policy", default="swapmoe", show_default=True)
@click.option("--budget", default="33%", show_default=True)
@click.option("--requests", type=COUNT, default=2000, show_default=True)
@click.option("--no-box", is_flag=True)
def soak_cmd(artifact, memory, flash, device, threads, docs, max_new_tokens, source_len, out, policy, budget, requests, no_box) -> None:
    """Many requests in one process: RSS of the last 200 against the first 200, files and threads."""
    try:
        mem = _memory_map(memory, (budget,), device)[budget] if not no_box else None
        spec = CellSpec(artifact, policy, budget, requests=requests, source_len=source_len, max_new_tokens=max_new_tokens,
                        docs=docs, threads=threads, device=device)
        result = run_soak(spec, BoxSetting(mem, _flash(flash, device)[0] if not no_box else None), box=not no_box)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(result, indent=1))
        click.echo(json.dumps({k: v for k, v in result.items() if k not in ("rss_series", "spec", "stderr_tail")}))
        if result["returncode"] != 0 or result["completed"] < requests:
            click.echo(f"error: the soak worker stopped after {result['completed']} of {requests} requests "
                       f"(exit {result['returncode']}): {result['stderr_tail'][-800:]}", err=True)
            raise SystemExit(1)
    except SwapMoEError as e:
        fail(e)
