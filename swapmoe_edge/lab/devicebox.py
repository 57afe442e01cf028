"""The device box: a cgroup that makes a big dev machine behave like a small board.

A memory cgroup whose limit counts the page cache (so the artifact cannot hide in RAM)
and a block-I/O throttle on the artifact's disk (so flash reads take a device's time).
Both are plain kernel features; creating them needs root and the controllers mounted
(cgroup v1: ``memory`` and ``blkio``; v2: ``memory`` and ``io`` enabled in the subtree).

    with DeviceBox(memory_bytes=5 << 30, read_bps=250e6, artifact="art/") as box:
        proc = subprocess.Popen(cmd, preexec_fn=box.join)   # the child enters the box
        ...
        box.counters()   # bytes read from the disk, peak memory, OOM kills

Only cgroups this object creates are touched, only processes it starts enter them, and
``close()`` removes them (killing what is still inside: only our own children can be).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.core.units import format_size
from swapmoe_edge.system.cgroup import is_root, self_cgroup_dir, unified_dir


class BoxUnavailable(SwapMoEError):
    """The device box cannot be built on this machine (not root, or a controller is missing)."""


@dataclass(frozen=True)
class BoxCounters:
    read_bytes: int  # bytes this cgroup read from the artifact's disk (the kernel's count, not ours)
    peak_memory: int  # the cgroup's peak charge, page cache included
    oom_kills: int  # processes the kernel killed at the limit
    limit_hits: int  # times the charge reached the limit (reclaim was forced)


def block_device(path: str | Path) -> str:
    """``MAJ:MIN`` of the whole disk that holds ``path`` (throttles apply to disks, not partitions)."""
    st = os.stat(path)
    majmin = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sysdir = Path("/sys/dev/block") / majmin
    if not sysdir.exists():
        raise BoxUnavailable(
            f"{path} is on device {majmin}, which is not a block device (an overlay or network filesystem?); "
            "reads from it cannot be throttled. Put the artifact on a local disk, or run with --no-box.")
    if (sysdir / "partition").exists():  # a partition: throttle its disk
        return (sysdir.resolve().parent / "dev").read_text().strip()
    return majmin


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise BoxUnavailable(f"cannot write {value!r} to {path}: {e}") from e


class DeviceBox:
    """A memory limit and a read throttle for the processes started with ``preexec_fn=box.join``."""

    def __init__(self, memory_bytes: int | None, read_bps: float | None, artifact: str | Path, name: str | None = None,
                 cpu_shares: int | None = 8192):
        if not is_root():
            raise BoxUnavailable("the device box needs root (it creates cgroups); run as root, or pass --no-box "
                                 "to measure unconfined (the page cache then holds the artifact).")
        self.memory_bytes = memory_bytes
        self.read_bps = int(read_bps) if read_bps else None
        self.device = block_device(artifact)
        self.name = name or f"swapmoe-box-{os.getpid()}"
        self.dirs: list[Path] = []
        # cpu_shares: the box's weight against other processes (1024 is the default): on a shared
        # dev machine a device's cores are its own, so the box's processes get priority.
        self.cpu_shares = cpu_shares
        self.cpu: Path | None = None
        mem_v1, blk_v1 = self_cgroup_dir("memory"), self_cgroup_dir("blkio")
        if mem_v1 is not None and blk_v1 is not None:
            self.version = 1
            self.mem, self.blk = mem_v1 / self.name, blk_v1 / self.name
            cpu_v1 = self_cgroup_dir("cpu")
            self.cpu = cpu_v1 / self.name if cpu_v1 is not None and cpu_shares else None
        else:
            v2 = unified_dir()
            enabled = set((v2 / "cgroup.subtree_control").read_text().split()) if v2 else set()
            if v2 is None or not {"memory", "io"} <= enabled:
                raise BoxUnavailable(
                    "no usable cgroup controllers: need cgroup v1 'memory' and 'blkio' mounted, or cgroup v2 with "
                    f"'memory' and 'io' in {v2 or '/sys/fs/cgroup'}/cgroup.subtree_control "
                    f"(enabled: {' '.join(sorted(enabled)) or 'none'}). Pass --no-box to measure unconfined.")
            self.version = 2
            self.mem = self.blk = v2 / self.name
        self._create()

    def _groups(self) -> list[Path]:
        return list(dict.fromkeys(d for d in (self.mem, self.blk, self.cpu) if d is not None))

    def _create(self) -> None:
        for d in self._groups():
            try:
                d.mkdir()
            except FileExistsError:
                pass  # ours from an earlier, interrupted run (the name has our pid in it)
            except OSError as e:
                raise BoxUnavailable(f"cannot create cgroup {d}: {e}") from e
            self.dirs.append(d)
        self.set_limits(self.memory_bytes, self.read_bps)
        if self.cpu is not None:
            _write(self.cpu / "cpu.shares", str(self.cpu_shares))

    def set_limits(self, memory_bytes: int | None, read_bps: float | None) -> None:
        """Change the box's memory limit and read throttle (None: unlimited) between cells."""
        self.memory_bytes, self.read_bps = memory_bytes, int(read_bps) if read_bps else None
        if self.version == 1:
            _write(self.mem / "memory.limit_in_bytes", str(memory_bytes) if memory_bytes else "-1")
            _write(self.blk / "blkio.throttle.read_bps_device", f"{self.device} {self.read_bps or 0}")
        else:
            _write(self.mem / "memory.max", str(memory_bytes) if memory_bytes else "max")
            _write(self.mem / "memory.swap.max", "0") if (self.mem / "memory.swap.max").exists() else None
            _write(self.blk / "io.max", f"{self.device} rbps={self.read_bps or 'max'}")

    def reset_counters(self) -> BoxCounters:
        """Start a new cell's counts; returns the counts before the reset.

        v1 resets the kernel's peak and limit-hit counts; read bytes and OOM kills are
        counted from a saved base (``blkio.reset_stats`` no longer resets the throttle's
        byte counts on recent kernels). v2's ``memory.peak`` cannot be reset: use a fresh
        box per cell there for exact peaks.
        """
        before = self.counters()
        if self.version == 1:
            for f in ("memory.max_usage_in_bytes", "memory.failcnt"):
                try:
                    (self.mem / f).write_text("0")
                except OSError:
                    pass
        self._base = self._raw()
        return before

    _base = BoxCounters(0, 0, 0, 0)

    def _raw(self) -> BoxCounters:
        if self.version == 1:
            return BoxCounters(_io_bytes_v1(self.blk / "blkio.throttle.io_service_bytes", self.device),
                               _int(self.mem / "memory.max_usage_in_bytes"), _kv(self.mem / "memory.oom_control").get("oom_kill", 0),
                               _int(self.mem / "memory.failcnt"))
        events = _kv(self.mem / "memory.events")
        return BoxCounters(_io_bytes_v2(self.blk / "io.stat", self.device), _int(self.mem / "memory.peak"),
                           events.get("oom_kill", 0), events.get("max", 0))

    def counters(self) -> BoxCounters:
        """The kernel's counts since the last ``reset_counters`` (the peak: since the reset on v1)."""
        raw, b = self._raw(), self._base
        hits = raw.limit_hits if self.version == 1 else raw.limit_hits - b.limit_hits
        return BoxCounters(raw.read_bytes - b.read_bytes, raw.peak_memory, raw.oom_kills - b.oom_kills, hits)

    def join(self) -> None:
        """For ``preexec_fn``: move the calling (child) process into the box before it execs."""
        pid = str(os.getpid())
        for d in self._groups():
            (d / "cgroup.procs").write_text(pid)

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs:
            try:
                out |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return sorted(out)

    def close(self) -> None:
        """Kill what is left inside (our children only ever enter), then remove the cgroups."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for d in reversed(self.dirs):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)  # the kernel releases a cgroup shortly after its last task exits
        self.dirs = []

    def __enter__(self) -> "DeviceBox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        mem = format_size(self.memory_bytes) if self.memory_bytes else "no memory limit"
        flash = f"{self.read_bps / 1e6:g} MB/s" if self.read_bps else "unthrottled reads"
        cpu = f", cpu.shares {self.cpu_shares}" if self.cpu is not None else ""
        return f"cgroup v{self.version} box: {mem} (page cache counted), {flash} from {self.device}{cpu}"


def _int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _kv(path: Path) -> dict[str, int]:
    out = {}
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


def _io_bytes_v1(path: Path, device: str) -> int:
    """Bytes read from ``device`` in a v1 ``blkio.throttle.io_service_bytes`` file."""
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == device and parts[1] == "Read":
                return int(parts[2])
    except OSError:
        pass
    return 0


def _io_bytes_v2(path: Path, device: str) -> int:
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == device:
                return int(dict(p.split("=", 1) for p in parts[1:] if "=" in p).get("rbytes", 0))
    except OSError:
        pass
    return 0
