"""Memory limits of the process's cgroups (v1, v2, nested, unlimited) and the budget they give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swapmoe_edge.system.budget import MemoryMonitor, cgroup_reserve
from swapmoe_edge.core.units import MIB, GIB
from swapmoe_edge.system.cgroup import CgroupMemory, memory_limits, tightest

V1_UNLIMITED = "9223372036854771712"


def _proc(tmp: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    return proc


def _v1_group(d: Path, limit: str, usage: int, inactive_file: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(limit + "\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"cache 1\ninactive_file 7\ntotal_inactive_file {inactive_file}\ntotal_active_file 99\n"
                                   "total_mapped_file 120\ntotal_dirty 0\n")


def test_v1_nested_limits_are_all_found_and_the_tightest_headroom_wins(tmp_path):
    root = tmp_path / "memory"
    _v1_group(root, V1_UNLIMITED, 10 * GIB, 0)  # the hierarchy's root: no limit
    _v1_group(root / "docker", str(4 * GIB), 3 * GIB, 1 * GIB)  # headroom 4 - (3 - 1) = 2 GiB
    _v1_group(root / "docker" / "app", str(3 * GIB), 2900 * MIB, 100 * MIB)  # headroom 3 GiB - 2800 MiB
    proc = _proc(tmp_path, "5:memory:/docker/app\n4:cpu:/\n0::/\n",
                 f"35 31 0:32 / {root} rw,relatime - cgroup cgroup rw,memory\n")
    found = memory_limits(proc)
    assert [Path(c.path).name for c in found] == ["app", "docker"]
    assert all(c.version == 1 for c in found)
    t = tightest(found)
    assert Path(t.path).name == "app" and t.headroom == 3 * GIB - 2800 * MIB
    assert "cgroup v1" in t.describe() and "app" in t.describe()


def test_v1_mount_root_inside_a_container_is_stripped(tmp_path):
    # No cgroup namespace: /proc/self/cgroup names the host path, the mount's root is the container's cgroup.
    point = tmp_path / "memory"
    _v1_group(point, str(1536 * MIB), 500 * MIB, 0)
    proc = _proc(tmp_path, "4:memory:/docker/abc\n",
                 f"35 31 0:32 /docker/abc {point} rw - cgroup cgroup rw,memory\n")
    (found,) = memory_limits(proc)
    assert found.limit == 1536 * MIB and found.headroom == 1036 * MIB


def test_v2_limit_is_the_lower_of_max_and_high_and_counts_clean_unmapped_cache_free(tmp_path):
    root = tmp_path / "unified"
    leaf = root / "system.slice" / "app.service"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text(f"{2 * GIB}\n")
    (leaf / "memory.high").write_text("max\n")
    (leaf / "memory.current").write_text(f"{1 * GIB}\n")
    (leaf / "memory.stat").write_text(f"anon 100\nfile 400\ninactive_file {200 * MIB}\nactive_file {100 * MIB}\n"
                                      f"file_mapped {40 * MIB}\nfile_dirty {4 * MIB}\n")
    (root / "system.slice" / "memory.max").write_text("max\n")
    (root / "system.slice" / "memory.high").write_text(f"{1536 * MIB}\n")
    (root / "system.slice" / "memory.current").write_text(f"{1400 * MIB}\n")
    proc = _proc(tmp_path, "0::/system.slice/app.service\n", f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw\n")
    found = memory_limits(proc)
    assert [(Path(c.path).name, c.version, c.limit) for c in found] == [
        ("app.service", 2, 2 * GIB), ("system.slice", 2, 1536 * MIB)]
    assert found[0].reclaimable == (200 + 100 - 40 - 4) * MIB  # clean, unmapped file cache
    assert found[0].headroom == 2 * GIB - (1 * GIB - 256 * MIB)
    assert tightest(found).path.endswith("system.slice")  # 136 MiB of headroom beats 1.25 GiB


def test_reclaimable_is_never_below_inactive_file():
    from swapmoe_edge.system.cgroup import reclaimable

    assert reclaimable({"total_inactive_file": 50, "total_active_file": 10, "total_mapped_file": 40}, 1) == 50
    assert reclaimable({"inactive_file": 50, "active_file": 30, "file_mapped": 20}, 2) == 60


def test_unlimited_or_missing_hierarchies_give_no_limits(tmp_path):
    root = tmp_path / "memory"
    _v1_group(root, V1_UNLIMITED, 1, 0)
    proc = _proc(tmp_path, "4:memory:/\n0::/\n", f"35 31 0:32 / {root} rw - cgroup cgroup rw,memory\n")
    assert memory_limits(proc) == []
    assert memory_limits(tmp_path / "no-such-proc") == []


def test_monitor_takes_the_cgroup_headroom_over_the_hosts_free_memory_and_says_so():
    group = CgroupMemory("/sys/fs/cgroup/memory/box", 1, limit=1536 * MIB, usage=1000 * MIB, reclaimable=200 * MIB)
    mon = MemoryMonitor(None, reserve=1 * GIB, available_fn=lambda: 22 * GIB, rss_fn=lambda: 700 * MIB,
                        limits_fn=lambda: [group])
    s = mon.sample_once()
    reserve = cgroup_reserve(1 * GIB, 1536 * MIB)
    assert reserve == int(0.05 * 1536 * MIB)  # not the machine's 1 GiB: that would leave nothing of the container
    assert s.budget == 700 * MIB + (1536 - 800) * MIB - reserve
    assert s.budget < group.limit and "cgroup v1 /sys/fs/cgroup/memory/box" in s.source
    # a user cap below it governs, and says so; without cgroups the machine governs
    # RSS can hold pages charged elsewhere (shared libraries): the budget still stays under the limit
    big = MemoryMonitor(None, reserve=1 * GIB, available_fn=lambda: 22 * GIB, rss_fn=lambda: 1400 * MIB, limits_fn=lambda: [group]).sample_once()
    assert big.budget == 1536 * MIB - reserve
    assert MemoryMonitor(500 * MIB, available_fn=lambda: 22 * GIB, rss_fn=lambda: 0, limits_fn=lambda: [group]).sample_once().source == "cap"
    assert MemoryMonitor(None, available_fn=lambda: 2 * GIB, rss_fn=lambda: 0).sample_once().source == "machine"


def test_cgroup_reserve_bounds():
    assert cgroup_reserve(1 * GIB, 300 * MIB) == 32 * MIB  # the floor
    assert cgroup_reserve(16 * MIB, 300 * MIB) == 16 * MIB  # never above the machine's
    assert cgroup_reserve(1 * GIB, 8 * GIB) == int(0.05 * 8 * GIB)


CHILD = """
import json
from swapmoe_edge.system.budget import MemoryMonitor
s = MemoryMonitor(None, reserve=1 << 30).sample_once()
print(json.dumps({"budget": s.budget, "source": s.source}))
"""


def test_auto_budget_inside_a_real_cgroup_stays_under_its_limit(tmp_path):
    """Runs a child in a 300 MiB memory cgroup (root and the controllers needed; skipped otherwise)."""
    from swapmoe_edge.lab.devicebox import BoxUnavailable, DeviceBox

    try:
        box = DeviceBox(300 * MIB, None, tmp_path)
    except BoxUnavailable as e:
        pytest.skip(f"no device box here: {e}")
    with box:
        out = subprocess.run([sys.executable, "-c", CHILD], preexec_fn=box.join, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert 0 < got["budget"] <= 300 * MIB
    assert box.name in got["source"]
