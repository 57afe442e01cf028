"""Progress lines for long runs on a terminal (stderr), silent otherwise."""

from __future__ import annotations

import sys
import time


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class DocumentProgress:
    """``[swapmoe] 16/100 documents (16%), 2.1 documents/s, about 40 s left``, one line per update."""

    def __init__(self, total: int, enabled: bool, stream=None, clock=time.monotonic):
        self.total, self.enabled = total, enabled
        self.stream = stream
        self.clock = clock
        self.t0 = clock()

    def update(self, done: int) -> str | None:
        if not self.enabled:
            return None
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = done / elapsed
        line = f"[swapmoe] {done}/{self.total} documents ({done / max(self.total, 1):.0%}), {rate:.1f} documents/s"
        if 0 < done < self.total and rate > 0:
            line += f", about {(self.total - done) / rate:.0f} s left"
        print(line, file=self.stream or sys.stderr, flush=True)
        return line
