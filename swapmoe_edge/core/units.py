"""Byte sizes: ``parse_size("4.7GiB")`` and ``format_size(5046586572)``."""

from __future__ import annotations

import re

from swapmoe_edge.core.errors import BudgetError

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# Single letters and IEC suffixes are binary; SI suffixes ("GB") are decimal. A bare
# "G" means GiB because that is what `free -g`, Docker, and Java's -Xmx mean by it.
_UNITS = {
    "": 1, "b": 1,
    "k": KIB, "kib": KIB, "kb": 10**3,
    "m": MIB, "mib": MIB, "mb": 10**6,
    "g": GIB, "gib": GIB, "gb": 10**9,
    "t": TIB, "tib": TIB, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
SIZE_FORMS = (
    "a number of bytes with an optional unit: 123456, 512MiB, 4.7GiB, 2GB (decimal, 10^9), "
    "1.5G (single letters K/M/G/T are binary, like GiB)"
)


def parse_size(text: str) -> int:
    """Parse a byte size such as ``4.7GiB``, ``512MiB``, ``2GB`` or ``123456`` (floor to bytes).

    ``KiB/MiB/GiB/TiB`` and the bare letters ``K/M/G/T`` are powers of 1024;
    ``kB/MB/GB/TB`` are powers of 1000. Case does not matter.
    """
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise BudgetError(f"cannot read {text!r} as a size; use {SIZE_FORMS}.")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int | float) -> str:
    """``5046586572`` -> ``"4.70 GiB"``; for messages and logs."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"
