"""The memory budget: parse what the user asked for, check it fits, follow free memory live.

Three numbers meet here (all bytes, all whole-process):

- the *cap* the user gave (``4.7GiB``, ``33%`` of the expert bytes, or ``auto``);
- the *baseline*: what the process holds with no expert resident (dense subgraphs,
  KV cache, ONNX Runtime arenas, buffers). It is always resident;
- the *live budget*: ``min(cap, rss + available - reserve)``, which the monitor keeps
  current so that the runtime shrinks its resident experts when another app takes memory.
  ``available`` is the tightest of the machine's free memory and the headroom of every
  memory cgroup on the process's path (cgroup.py): in a container the kernel kills at the
  container's limit, whatever the host has free.

What is left for experts is ``live budget - baseline``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil

from swapmoe_edge.core.errors import BudgetError
from swapmoe_edge.core.units import MIB, SIZE_FORMS, format_size, parse_size
from swapmoe_edge.system.cgroup import memory_limits, tightest

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BudgetSpec:
    """What the user asked for. ``kind`` is ``"bytes"``, ``"share"`` or ``"auto"``.

    ``bytes``: a whole-process cap. ``share``: the fraction (0, 1] of the *expert* bytes
    that may be resident on top of the always-resident baseline. ``auto``: no cap, follow
    free memory only.
    """

    kind: str
    nbytes: int | None = None
    share: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "bytes":
            if self.nbytes is None or self.nbytes <= 0:
                raise BudgetError(f"a byte budget must be positive, got {self.nbytes!r}.")
        elif self.kind == "share":
            if self.share is None or not (0.0 < self.share <= 1.0):
                raise BudgetError(
                    f"a share budget must be in (0%, 100%], got {self.share!r}; "
                    "0% would leave no expert resident."
                )
        elif self.kind != "auto":
            raise BudgetError(f"unknown budget kind {self.kind!r}: use bytes, share or auto.")

    def process_cap(self, baseline_bytes: int, expert_bytes: int) -> int | None:
        """The whole-process cap in bytes, or ``None`` for auto (derive from free memory)."""
        if self.kind == "bytes":
            return self.nbytes
        if self.kind == "share":
            return int(baseline_bytes) + int(math.floor(self.share * int(expert_bytes)))
        return None

    def __str__(self) -> str:
        if self.kind == "bytes":
            return format_size(self.nbytes)
        if self.kind == "share":
            return f"{self.share * 100:g}% of expert bytes"
        return "auto"


def parse_budget(text: str) -> BudgetSpec:
    """``"4.7GiB"`` -> bytes cap, ``"33%"`` -> share of expert bytes, ``"auto"`` -> no cap."""
    s = str(text).strip()
    if s.lower() == "auto":
        return BudgetSpec("auto")
    if s.endswith("%"):
        try:
            pct = float(s[:-1])
        except ValueError:
            pct = math.nan
        if not (0.0 < pct <= 100.0):
            raise BudgetError(
                f"budget {text!r}: a share must be a percentage in (0%, 100%], e.g. 33%."
            )
        return BudgetSpec("share", share=pct / 100.0)
    try:
        n = parse_size(s)
    except BudgetError:
        raise BudgetError(
            f"cannot read budget {text!r}; use 'auto', a share of the expert bytes such as "
            f"'33%', or {SIZE_FORMS}."
        ) from None
    if n <= 0:
        raise BudgetError(f"budget {text!r} is zero bytes; give a positive size such as 4GiB.")
    return BudgetSpec("bytes", nbytes=n)


def _available_bytes() -> int:
    return int(psutil.virtual_memory().available)


# In a cgroup the "rest of the system" is outside the limit, so a machine-sized reserve (the
# x86 profile keeps 1 GiB) would leave nothing of a 1.5 GiB container. What must stay free
# inside it: an expert's pages in the page cache between a read and its fadvise (one
# switch-base expert, 18 MiB), allocator slack and Python's own growth.
CGROUP_RESERVE_FRACTION = 0.05
CGROUP_RESERVE_MIN = 32 * MIB


def cgroup_reserve(machine_reserve: int, limit: int) -> int:
    """The reserve when a cgroup limit governs: 5% of the limit (at least 32 MiB), never above the machine's."""
    return min(int(machine_reserve), max(CGROUP_RESERVE_MIN, int(CGROUP_RESERVE_FRACTION * limit)))


@dataclass(frozen=True)
class MemorySample:
    """One reading of the monitor: the inputs and the live budget they give.

    ``source`` says which limit governs: ``"cap"`` (the user's), ``"machine"`` (free
    memory), or a cgroup's description (its path and limit).
    """

    time: float
    available: int
    rss: int
    budget: int
    source: str = "machine"


class MemoryMonitor:
    """Keep the live budget ``min(cap, rss + available - reserve)`` current in a daemon thread.

    ``on_change(budget)`` runs (on the monitor thread, or the caller's for
    ``sample_once``) at the first sample and whenever the budget has moved by more
    than ``threshold_bytes`` since the last value reported; slow drifts therefore add
    up and are reported too. ``on_steady(sample)`` runs after every other sample (the
    budget unmoved): where the process's own RSS can be held against the budget.
    ``available_fn`` and ``rss_fn`` are injectable so tests can play another app taking memory; ``limits_fn`` returns the memory cgroups on the
    process's path (default: read them, unless ``available_fn`` is injected).
    """

    def __init__(
        self,
        cap: int | None,
        reserve: int = 0,
        period_s: float = 0.5,
        on_change: Callable[[int], None] | None = None,
        available_fn: Callable[[], int] | None = None,
        rss_fn: Callable[[], int] | None = None,
        threshold_bytes: int = 4 * MIB,
        limits_fn: Callable[[], list] | None = None,
    ) -> None:
        if period_s <= 0:
            raise BudgetError(f"monitor period must be positive, got {period_s} s.")
        self.cap = cap
        self.reserve = int(reserve)
        self.period_s = float(period_s)
        self.threshold_bytes = int(threshold_bytes)
        self.on_change = on_change
        self.on_steady: Callable[[MemorySample], None] | None = None
        if limits_fn is None and available_fn is None:
            limits_fn = memory_limits
        self._limits_fn = limits_fn or (lambda: [])
        self._available_fn = available_fn or _available_bytes
        if rss_fn is None:
            proc = psutil.Process()
            rss_fn = lambda: int(proc.memory_info().rss)  # noqa: E731
        self._rss_fn = rss_fn
        self._lock = threading.Lock()
        self._last: MemorySample | None = None
        self._reported: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample_once(self) -> MemorySample:
        """Read memory now, update the live budget, and report it if it moved enough."""
        available, rss = int(self._available_fn()), int(self._rss_fn())
        budget, source = max(0, rss + available - self.reserve), "machine"
        group = tightest(self._limits_fn())
        if group is not None:
            # RSS also counts shared-library pages charged to whichever cgroup read them first,
            # so rss + headroom can exceed the limit itself; the limit bounds the budget too.
            in_group = max(0, min(rss + group.headroom, group.limit) - cgroup_reserve(self.reserve, group.limit))
            if in_group < budget:
                budget, source, available = in_group, group.describe(), min(available, group.headroom)
        if self.cap is not None and self.cap <= budget:
            budget, source = int(self.cap), "cap"
        sample = MemorySample(time.monotonic(), available, rss, budget, source)
        with self._lock:
            self._last = sample
            changed = self._reported is None or abs(budget - self._reported) > self.threshold_bytes
            if changed:
                self._reported = budget
        if changed and self.on_change is not None:
            self.on_change(budget)
        elif not changed and self.on_steady is not None:
            self.on_steady(sample)
        return sample

    def current(self) -> int:
        """The live budget in bytes (samples once if the monitor has not run yet)."""
        with self._lock:
            last = self._last
        return (last or self.sample_once()).budget

    def last_sample(self) -> MemorySample | None:
        with self._lock:
            return self._last

    def start(self) -> "MemoryMonitor":
        """Sample (and report) once on the caller's thread, then keep sampling in the background."""
        if self._thread is not None:
            return self
        self._stop.clear()
        self.sample_once()
        self._thread = threading.Thread(target=self._run, name="swapmoe-memory-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread and join it; it wakes at once, not at the end of its period."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else self.period_s + 5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.sample_once()
            except Exception:  # a bad reading or callback must not kill the monitor for good
                log.exception("memory monitor: sampling failed; will retry next period")

    def __enter__(self) -> "MemoryMonitor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
