"""Memory limits of the cgroups this process lives in (v1 and v2), read the way the kernel enforces them.

``psutil.virtual_memory().available`` is the host's: inside a 300 MiB container it reported
~22 GiB here, and a runtime that planned from it was OOM-killed. The kernel kills at the
tightest memory limit on the process's cgroup path, and that limit counts the page cache.
So the headroom of one cgroup is ``limit - (usage - reclaimable file cache)``, and the
process may grow by the smallest headroom on its path.

"Reclaimable" is the clean file cache that no process maps: ``inactive_file +
active_file - mapped_file - dirty - writeback`` (at least ``inactive_file``, which Docker's
``docker stats`` and Kubernetes' working set subtract). The kernel drops those pages
before it kills. Mapped pages are not counted: ONNX Runtime maps big initializers, and
they are in the process's RSS already. Unmapped *active* pages are counted because our
own start-up makes them: a file read twice (by a read-ahead thread and by ONNX Runtime)
is active, and leaving it out cost the embedded plan ~0.5 GiB of a 5 GiB box.

Everything takes the roots as arguments, so tests run on fixture trees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from swapmoe_edge.core.units import format_size

# cgroup v1 writes "no limit" as LONG_MAX rounded down to a page; anything this large is none.
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupMemory:
    """One cgroup on the process's path that has a memory limit."""

    path: str  # the cgroup's directory, e.g. /sys/fs/cgroup/memory/docker/abc
    version: int  # 1 or 2
    limit: int  # bytes: v1 memory.limit_in_bytes; v2 the lower of memory.max and memory.high
    usage: int  # bytes charged now, page cache included
    reclaimable: int  # clean unmapped file cache, which the kernel reclaims before it kills

    @property
    def headroom(self) -> int:
        """Bytes the cgroup's processes can still take before the kernel must kill."""
        return max(0, self.limit - max(0, self.usage - self.reclaimable))

    def describe(self) -> str:
        return f"cgroup v{self.version} {self.path} (limit {format_size(self.limit)})"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _read_stat(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    stat = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stat[parts[0]] = int(parts[1])
    return stat


def reclaimable(stat: dict[str, int], version: int) -> int:
    """Clean, unmapped file cache in a ``memory.stat`` (v1 hierarchical ``total_*`` keys when present)."""
    def get(*keys: str) -> int:
        return next((stat[k] for k in keys if k in stat), 0)

    if version == 1:
        inactive, active = get("total_inactive_file", "inactive_file"), get("total_active_file", "active_file")
        busy = get("total_mapped_file", "mapped_file") + get("total_dirty", "dirty") + get("total_writeback", "writeback")
    else:
        inactive, active = get("inactive_file"), get("active_file")
        busy = get("file_mapped") + get("file_dirty") + get("file_writeback")
    return max(inactive, inactive + active - busy)


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, super options) of every cgroup mount in ``mountinfo`` text."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        root, point = (f.replace("\\040", " ") for f in fields[3:5])
        out.append((rest[0], root, point, set(rest[2].split(","))))
    return out


def _cgroup_dirs(proc_cgroup: str, mountinfo: str, controller: str = "memory") -> list[tuple[int, Path, Path]]:
    """(version, leaf directory, mount point) for the v2 hierarchy and the v1 hierarchy of
    ``controller`` that this process is in."""
    mounts = _mounts(mountinfo)
    found = []
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            version, matches = 2, [m for m in mounts if m[0] == "cgroup2"]
        elif controller in controllers.split(","):
            version, matches = 1, [m for m in mounts if m[0] == "cgroup" and controller in m[3]]
        else:
            continue
        for _, root, point, _ in matches:
            # Without a cgroup namespace the mount's root may be the container's own cgroup
            # (/docker/abc) while /proc/self/cgroup names the full path: strip the root.
            rel = path
            if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
                rel = path[len(root):]
            leaf = Path(point) / rel.lstrip("/")
            if not leaf.is_dir():
                leaf = Path(point)  # a namespaced view whose path we cannot place: the mount's root is ours
            found.append((version, leaf, Path(point)))
            break
    return found


def _limit_of(version: int, d: Path) -> CgroupMemory | None:
    if version == 1:
        limit = _read_int(d / "memory.limit_in_bytes")
        if limit is None:
            return None
        usage = _read_int(d / "memory.usage_in_bytes") or 0
        free = reclaimable(_read_stat(d / "memory.stat"), 1)
    else:
        limits = [v for v in (_read_int(d / "memory.max"), _read_int(d / "memory.high")) if v is not None]
        if not limits:
            return None
        limit = min(limits)
        usage = _read_int(d / "memory.current") or 0
        free = reclaimable(_read_stat(d / "memory.stat"), 2)
    return CgroupMemory(str(d), version, limit, usage, free)


def memory_limits(proc: str | Path = "/proc/self") -> list[CgroupMemory]:
    """Every memory-limited cgroup on this process's path, leaf first, v1 and v2 alike.

    Walks from the process's own cgroup up to the hierarchy's root, because a parent's
    limit (a container's, a systemd slice's) binds its children too. Returns [] when no
    cgroup filesystem is mounted or nothing is limited.
    """
    out = []
    dirs = _self_dirs(proc, "memory")
    for version, leaf, point in dirs:
        d = leaf
        while True:
            found = _limit_of(version, d)
            if found is not None:
                out.append(found)
            if d == point or d.parent == d or point not in d.parents:
                break
            d = d.parent
    return out


def tightest(limits: list[CgroupMemory]) -> CgroupMemory | None:
    """The cgroup with the least headroom, or None."""
    return min(limits, key=lambda c: c.headroom, default=None)


def _self_dirs(proc: str | Path, controller: str) -> list[tuple[int, Path, Path]]:
    proc = Path(proc)
    try:
        return _cgroup_dirs((proc / "cgroup").read_text(), (proc / "mountinfo").read_text(), controller)
    except OSError:
        return []


def self_cgroup_dir(controller: str, proc: str | Path = "/proc/self") -> Path | None:
    """This process's directory in the v1 hierarchy of ``controller`` (``memory``, ``blkio``), or None."""
    return next((leaf for v, leaf, _ in _self_dirs(proc, controller) if v == 1), None)


def unified_dir(proc: str | Path = "/proc/self") -> Path | None:
    """This process's cgroup v2 directory, or None where there is no v2 hierarchy."""
    return next((leaf for v, leaf, _ in _self_dirs(proc, "memory") if v == 2), None)


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
