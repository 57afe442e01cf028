"""Remember a measured baseline, so that a device's next launch skips the warm-up pass.

Measuring the baseline runs a full-length encoder pass and touches every embedding row:
on switch-base-64 from 250 MB/s flash that is ~2.5 s of a ~8 s launch, and the embedding
touch alone reads 200 MB that a first request does not need. The number depends on the
artifact, the input envelope, the thread count, the providers and the library versions,
so those are the key. A cached value is used only when the process is no bigger after
loading the dense sessions than the measuring process was at that point (a process that
imported more, e.g. torch, measures again).

The same folder keeps the digests of verified artifact files (``hash_cache_path``,
artifact/verify.py). Both files are read as untrusted: a corrupt or foreign one counts as
empty, and writers merge under a lock and replace the file atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy
import onnxruntime

from swapmoe_edge.artifact.files import locked

TOLERANCE = 1.05  # RSS after loading may exceed the measuring process's by this factor


def cache_dir() -> Path:
    """``$SWAPMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/swapmoe_edge``, else ``~/.cache/swapmoe_edge``."""
    return Path(os.environ.get("SWAPMOE_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                                    "swapmoe_edge"))


def cache_path() -> Path:
    return cache_dir() / "baselines.json"


def hash_cache_path() -> Path:
    """Where the digests of verified artifact files are remembered."""
    return cache_dir() / "file_hashes.json"


def cache_key(manifest_file: Path, **config) -> str:
    ident = {"manifest": hashlib.sha256(manifest_file.read_bytes()).hexdigest(), "ort": onnxruntime.__version__,
             "numpy": numpy.__version__, "python": sys.version.split()[0], "machine": platform.machine(), **config}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _entries(path: Path) -> dict:
    """The cache's well-formed entries (none if it is missing, unreadable or not ours)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, dict)
            and all(type(v.get(f)) is int and v[f] > 0 for f in ("baseline", "rss_after_load"))}


def lookup(key: str, rss_after_load: int) -> int | None:
    """The cached baseline for ``key``, or None (absent, unreadable, or this process is bigger)."""
    entry = _entries(cache_path()).get(key)
    if not entry or rss_after_load > entry["rss_after_load"] * TOLERANCE:
        return None
    return entry["baseline"]


def store(key: str, baseline: int, rss_after_load: int) -> None:
    """Record a measurement (best effort: a read-only home just means measuring every time)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.with_name(path.name + ".lock")):  # concurrent launches: each adds its entry
            data = _entries(path)
            data[key] = {"baseline": int(baseline), "rss_after_load": int(rss_after_load)}
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
    except OSError:
        pass
