"""The device box (real cgroups when root; skipped otherwise), page-cache control and bench bookkeeping."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from swapmoe_edge.system import pagecache
from swapmoe_edge.lab.bench import BoxSetting, CellSpec, add_ratios, markdown_table, summarize_cell
from swapmoe_edge.core.units import MIB
from swapmoe_edge.lab.devicebox import BoxUnavailable, DeviceBox


def _box(tmp_path, memory, bps):
    try:
        return DeviceBox(memory, bps, tmp_path)
    except BoxUnavailable as e:
        pytest.skip(f"no device box here: {e}")


def test_box_throttles_reads_counts_them_and_cleans_up(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(40 * MIB))
    pagecache.drop([f])
    box = _box(tmp_path, 256 * MIB, 50e6)
    with box:
        box.reset_counters()
        r = subprocess.run([sys.executable, "-c", f"import time; t=time.time(); open({str(f)!r},'rb').read(); print(time.time()-t)"],
                           preexec_fn=box.join, capture_output=True, text=True, check=True)
        c = box.counters()
        pagecache.drop([f])
        box.reset_counters()  # a new cell counts from zero, not from the box's creation
        subprocess.run([sys.executable, "-c", f"open({str(f)!r},'rb').read()"], preexec_fn=box.join, check=True)
        again = box.counters()
        dirs = list(box.dirs)
    assert c.read_bytes >= 40 * MIB  # the kernel's count of what came off the disk
    assert 40 * MIB <= again.read_bytes < 60 * MIB
    assert float(r.stdout) > 0.5  # 40 MiB at 50 MB/s takes ~0.8 s; unthrottled it is a few ms
    assert c.oom_kills == 0 and 0 < c.peak_memory <= 256 * MIB
    assert not any(d.exists() for d in dirs)


def test_box_reports_an_oom_kill(tmp_path):
    box = _box(tmp_path, 64 * MIB, None)
    with box:
        box.reset_counters()
        r = subprocess.run([sys.executable, "-c", "b = bytearray(256 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"],
                           preexec_fn=box.join, capture_output=True)
        c = box.counters()
    assert r.returncode == -9 and c.oom_kills >= 1


def test_page_cache_drop_and_count(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(os.urandom(8 * MIB))
    f.read_bytes()
    assert pagecache.cached_bytes(f) > 4 * MIB  # just written and read: in the cache
    pagecache.drop([f])
    assert pagecache.cached_bytes(f) < 1 * MIB


def _events(ttfts, decodes, read=(0, 0)):
    ev = [{"event": "ready", "launch_s": 2.0, "budget": 10, "source": "cap"}]
    ev += [{"event": "request", "request": i, "first_token_s": 3.0 + i, "ttft_ms": t, "decode_ms_per_token": d,
            "steps": 4, "stall_ms": 0.0, "exact": False, "bytes_read": 0, "peak_rss": 100, "first_choice_resident": 0.5}
           for i, (t, d) in enumerate(zip(ttfts, decodes))]
    return {"events": ev, "returncode": 0, "timed_out": False, "stderr_tail": "",
            "counters": {"read_bytes": read[1], "peak_memory": 200, "oom_kills": 0, "limit_hits": 0},
            "counters_at_ready": {"read_bytes": read[0], "peak_memory": 0, "oom_kills": 0, "limit_hits": 0}}


def test_cell_summary_sets_the_cold_first_request_apart_and_uses_the_kernels_counts():
    spec = CellSpec("art", "prune", "50%", requests=3)
    row = summarize_cell(spec, BoxSetting(400, 250.0), _events([900, 100, 300], [50, 10, 30], read=(1000, 1000 + 12 * 1024)))
    assert row["first_ttft_ms"] == 900 and row["ttft_ms"] == 200 and row["decode_ms_per_token"] == 20
    assert row["launch_to_first_token_s"] == 3.0 and row["completed"] == 3
    assert row["serve_read_bytes"] == 12 * 1024 and row["read_bytes_per_token"] == 1024
    assert row["peak_over_limit"] == 0.5
    other = summarize_cell(CellSpec("art", "swapmoe", "50%", requests=3), BoxSetting(400, 250.0), _events([0, 400, 400], [0, 30, 30]))
    rows = [row, other]
    add_ratios(rows)
    assert other["decode_vs_prune"] == pytest.approx(1.5) and other["ttft_vs_prune"] == pytest.approx(2.0)
    table = markdown_table(rows)
    assert table.count("\n") == 4 and "| swapmoe | 50% | 250 |" in table


def test_a_killed_cell_keeps_what_it_did():
    raw = _events([500], [40])
    raw["returncode"], raw["counters"]["oom_kills"] = -9, 1
    row = summarize_cell(CellSpec("art", "on-demand", "50%", requests=5), BoxSetting(400, 80.0), raw)
    assert row["completed"] == 1 and row["oom_kills"] == 1 and row["returncode"] == -9


def test_a_cell_that_cannot_start_says_why():
    raw = {"events": [{"event": "fatal", "error": "memory budget 1.01 GiB cannot hold the model"}], "returncode": 2,
           "timed_out": False, "stderr_tail": "", "counters": None, "counters_at_ready": None}
    row = summarize_cell(CellSpec("art", "swapmoe", "1%", requests=2), BoxSetting(None, None), raw)
    assert row["completed"] == 0 and "cannot hold the model" in row["failure"]
