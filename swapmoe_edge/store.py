"""Experts on flash: read one expert's weight block with plain reads, verify it, count it.

An expert is held in memory as two numpy arrays that view one buffer read straight from
its ``experts/*.bin`` file; the shared expert-kernel session runs any of them.
"""

from __future__ import annotations

import hashlib
import mmap
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ArtifactError
from .manifest import ExpertKey, Manifest

_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}


class ExpertReadError(ArtifactError):
    """An expert's weights could not be read (I/O error, truncated or corrupt file)."""

    def __init__(self, key: ExpertKey, path, why: str):
        self.key, self.path = key, path
        super().__init__(f"expert {key} ({path}) cannot be read: {why}")


@dataclass(frozen=True)
class LoadedExpert:
    """A fully read expert. Only complete ones exist: a half-read expert is never built."""

    key: ExpertKey
    feeds: dict[str, np.ndarray]  # the expert kernel's weight inputs: wi[D, F], wo[F, D] (+ int8/int4 scales)
    nbytes: int
    session: Any = None  # prepacked.py: the expert's own session (then feeds is empty)

    @property
    def wi(self) -> np.ndarray:
        return self.feeds["wi"]

    @property
    def wo(self) -> np.ndarray:
        return self.feeds["wo"]


class ExpertStore:
    """Reads experts from the artifact. Thread-safe; counts bytes, reads and read time.

    ``verify="first"`` checks an expert's sha256 the first time this process reads it
    (a corrupt file is named in the error); ``"always"`` on every read; ``"never"``.
    """

    def __init__(self, manifest: Manifest, verify: str = "first"):
        if verify not in ("first", "always", "never"):
            raise ValueError(f"verify must be first, always or never, not {verify!r}")
        self.manifest = manifest
        self.verify = verify
        self._verified: set[ExpertKey] = set()
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.reads = 0
        self.read_seconds = 0.0

    def _read_bytes(self, key: ExpertKey, own_mapping: bool = True) -> np.ndarray:
        """The raw weight block (a hook for tests that inject slow or failing flash)."""
        entry = self.manifest.experts[key]
        path = self.manifest.path(entry.weights_file)
        buf = anonymous_buffer(entry.nbytes) if own_mapping else np.empty(entry.nbytes, dtype=np.uint8)
        try:
            with open(path, "rb", buffering=0) as f:
                got = f.readinto(memoryview(buf))
        except OSError as e:
            raise ExpertReadError(key, path, str(e)) from e
        if got != entry.nbytes:
            raise ExpertReadError(key, path, f"read {got} of {entry.nbytes} bytes; the file is truncated. Export the model again.")
        return buf

    def read(self, key: ExpertKey, own_mapping: bool = True) -> LoadedExpert:
        """Read, verify and count one expert.

        ``own_mapping``: hold it in an anonymous mapping of its own (see anonymous_buffer),
        for experts that stay resident a while and leave when the swapper or the budget
        evicts them. ``False`` takes malloc memory, about 3x cheaper to fill (18 MiB: 3 ms
        against 10 ms from the page cache: no page faults or zeroing on reused heap), for
        the on-demand policy's reads on the token loop, which the next load reuses.
        """
        entry = self.manifest.experts[key]
        t0 = time.perf_counter()
        buf = self._read_bytes(key, own_mapping)
        if self.verify == "always" or (self.verify == "first" and key not in self._verified):
            digest = hashlib.sha256(buf).hexdigest()
            expected = self.manifest.files[entry.weights_file].sha256
            if digest != expected:
                raise ExpertReadError(
                    key, self.manifest.path(entry.weights_file),
                    f"sha256 {digest[:12]}… does not match the manifest's {expected[:12]}…; the file is corrupt. "
                    "Export the model again or restore the file.",
                )
            with self._lock:
                self._verified.add(key)
        feeds = {t.role: _view(buf, t.offset, t.shape, t.dtype) for t in entry.tensors}
        with self._lock:
            self.bytes_read += entry.nbytes
            self.reads += 1
            self.read_seconds += time.perf_counter() - t0
        return LoadedExpert(key, feeds, entry.nbytes)

    def counters(self) -> dict[str, float]:
        with self._lock:
            return {"bytes_read": self.bytes_read, "reads": self.reads, "read_seconds": self.read_seconds}


def anonymous_buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of zeroed memory in a mapping of its own, freed to the OS with its last view.

    From malloc (``np.empty``), an evicted expert's pages stayed in the heap of the thread
    that read it: after the first free of a large block glibc raises its mmap threshold,
    so later expert-sized blocks came from the swapper thread's arena, and as the swapper
    turned experts over RSS crept 2-5% past the budget on the embedded model.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)  # one fault, not one a page
    return np.frombuffer(mmap.mmap(-1, max(1, nbytes), flags=flags), dtype=np.uint8)[:nbytes]


def _view(buf: np.ndarray, offset: int, shape, dtype: str) -> np.ndarray:
    dt = np.dtype(_DTYPES[dtype])
    count = int(np.prod(shape))
    return buf[offset: offset + count * dt.itemsize].view(dt).reshape(shape)
