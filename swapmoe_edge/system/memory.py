"""Process memory readings: current RSS and the peak since the last reset (Linux VmHWM)."""

from __future__ import annotations

import ctypes
import gc
import os

import psutil

_PROC = psutil.Process()


def current_rss() -> int:
    return int(_PROC.memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``/proc/self/clear_refs`` = 5); False if unsupported."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak RSS since the last reset (VmHWM), or the current RSS where /proc has none."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return current_rss()


def trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not had back (glibc ``mallinfo2``: every arena plus mmapped
    chunks), or None where it is not available. Unlike RSS, it does not hide a new allocation
    that reuses freed heap, so it measures what an object costs in a long-running process."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return int(info.uordblks + info.hblkhd)
