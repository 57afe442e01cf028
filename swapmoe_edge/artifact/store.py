"""Experts on flash: read one expert's weight block with plain reads, verify it, count it.

An expert is held in memory as two numpy arrays that view one buffer read straight from
its ``experts/*.bin`` file; the shared expert-kernel session runs any of them.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from swapmoe_edge.core.errors import ArtifactError
from swapmoe_edge.artifact.manifest import Manifest
from swapmoe_edge.core.keys import ExpertKey

log = logging.getLogger(__name__)
READ_MODES = ("fadvise", "direct", "cached")
_ALIGN = 4096  # O_DIRECT wants buffer address, length and file offset aligned to the block size
# Experts are read in pieces of this size. A throttled disk (a device's flash, or the device
# box's cgroup throttle) serves requests in order, so a page fault of the token loop (an
# embedding row ONNX Runtime maps lazily) waits behind whatever background reads have
# queued: a whole 18 MiB expert is 236 ms at 80 MB/s, one MiB is 13 ms.
READ_CHUNK = 1 << 20
_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}


FIX = "Export the model again, or restore the file from a good copy."


class ExpertReadError(ArtifactError):
    """An expert's weights could not be read (I/O error, truncated or corrupt file): ``why`` says
    what happened to ``path``, ``fix`` what to do."""

    def __init__(self, key: ExpertKey, path, why: str, fix: str = FIX):
        self.key, self.path, self.why, self.fix = key, path, why, fix
        super().__init__(f"expert {key} ({path}) cannot be read: {why}. {fix}")


@dataclass(frozen=True)
class LoadedExpert:
    """A fully read expert. Only complete ones exist: a half-read expert is never built."""

    key: ExpertKey
    feeds: dict[str, np.ndarray]  # the expert kernel's weight inputs: wi[D, F], wo[F, D] (+ int8/int4 scales)
    nbytes: int
    session: Any = None  # prepacked.py / rungs.py: the expert's own session (then feeds is empty)
    rung: str | None = None  # the precision ladder's low-bit copy it is (None: the artifact's own experts)
    block: np.ndarray | None = field(default=None, repr=False)  # the read block ``feeds`` view (sessions are built from it)

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

    ``read_mode`` decides whether an expert also stays in the page cache after it is read:
    on a device the cache is charged to the same memory (a cgroup limit counts it) and
    an expert held twice, once in our buffer and once in the cache, costs the budget
    double until the kernel reclaims it. ``"fadvise"`` (this class's default; the runtime's,
    ``RuntimeConfig.read_mode``, is ``"direct"``) reads through the cache
    and drops the file's pages at once (``POSIX_FADV_DONTNEED``); ``"direct"`` reads with
    ``O_DIRECT`` and never fills the cache (falls back to fadvise where the filesystem
    refuses it, e.g. tmpfs); ``"cached"`` leaves the pages to the kernel (what a dev box
    whose RAM holds the artifact wants: a re-read is a memory copy).
    """

    def __init__(self, manifest: Manifest, verify: str = "first", read_mode: str = "fadvise"):
        if verify not in ("first", "always", "never"):
            raise ValueError(f"verify must be first, always or never, not {verify!r}")
        if read_mode not in READ_MODES:
            raise ValueError(f"read_mode must be one of {', '.join(READ_MODES)}, not {read_mode!r}")
        self.manifest = manifest
        self.verify = verify
        self.read_mode = read_mode
        self._verified: set[ExpertKey] = set()
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.reads = 0
        self.read_seconds = 0.0
        self._prefetched: dict[ExpertKey, LoadedExpert] = {}
        self.largest_expert = max((e.nbytes for e in manifest.experts.values()), default=0)

    def prefetch(self, key: ExpertKey) -> None:
        """Read ``key`` now and hand it to the next ``read(key)`` (start-up read-ahead)."""
        expert = self.read(key)
        with self._lock:
            self._prefetched[key] = expert

    def drop_prefetched(self) -> int:
        """Forget read-ahead experts nobody took; return their bytes (freed with the last view)."""
        with self._lock:
            n = sum(e.nbytes for e in self._prefetched.values())
            self._prefetched.clear()
        return n

    @property
    def prefetched_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._prefetched.values())

    def _block(self, key: ExpertKey, rung: str | None):
        """The manifest entry of the block to read: the expert's own, or its copy on ``rung``."""
        entry = self.manifest.experts[key]
        return entry if rung is None else entry.rungs[rung]

    def _read_bytes(self, key: ExpertKey, own_mapping: bool = True, rung: str | None = None) -> np.ndarray:
        """The raw weight block (a hook for tests that inject slow or failing flash)."""
        entry = self._block(key, rung)
        path = self.manifest.path(entry.weights_file)
        if self.read_mode == "direct":
            try:
                return self._read_direct(key, path, entry.nbytes, own_mapping)
            except _DirectUnsupported as e:
                log.warning("O_DIRECT reads are not possible for %s (%s); reading through the page cache and dropping it "
                            "(read_mode fadvise) from now on", path, e)
                self.read_mode = "fadvise"
        buf = anonymous_buffer(entry.nbytes) if own_mapping else np.empty(entry.nbytes, dtype=np.uint8)
        try:
            with open(path, "rb", buffering=0) as f:
                view, got = memoryview(buf), 0
                while got < entry.nbytes:
                    n = f.readinto(view[got: got + READ_CHUNK])
                    if not n:
                        break
                    got += n
                if self.read_mode == "fadvise":
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise ExpertReadError(key, path, e.strerror or str(e)) from e
        if got != entry.nbytes:
            raise _truncated(key, path, got, entry.nbytes)
        return buf

    def _read_direct(self, key: ExpertKey, path, nbytes: int, own_mapping: bool) -> np.ndarray:
        """The block read with O_DIRECT into an aligned buffer (rounded up to 4 KiB, viewed to ``nbytes``)."""
        padded = -(-nbytes // _ALIGN) * _ALIGN
        # An anonymous mapping is page-aligned; a malloc block is aligned by hand inside a larger one.
        if own_mapping:
            whole = anonymous_buffer(padded)
        else:
            raw = np.empty(padded + _ALIGN, dtype=np.uint8)
            start = (-raw.ctypes.data) % _ALIGN
            whole = raw[start: start + padded]
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError as e:
            if e.errno == 22:  # EINVAL: this filesystem has no direct I/O
                raise _DirectUnsupported(str(e)) from e
            raise ExpertReadError(key, path, e.strerror or str(e)) from e
        got = 0
        try:
            view = memoryview(whole)
            while got < padded:
                n = os.preadv(fd, [view[got: got + READ_CHUNK]], got)
                if n == 0:
                    break
                got += n
        except OSError as e:
            if e.errno == 22 and got == 0:
                raise _DirectUnsupported(str(e)) from e
            raise ExpertReadError(key, path, e.strerror or str(e)) from e
        finally:
            os.close(fd)
        if got < nbytes:
            raise _truncated(key, path, got, nbytes)
        return whole[:nbytes]

    def read(self, key: ExpertKey, own_mapping: bool = True, rung: str | None = None) -> LoadedExpert:
        """Read, verify and count one expert.

        ``own_mapping``: hold it in an anonymous mapping of its own (see anonymous_buffer),
        for experts that stay resident a while and leave when the swapper or the budget
        evicts them. ``False`` takes malloc memory, about 3x cheaper to fill (18 MiB: 3 ms
        against 10 ms from the page cache: no page faults or zeroing on reused heap), for
        the on-demand policy's reads on the token loop, which the next load reuses.

        ``rung``: read the expert's low-bit copy on the precision ladder instead (ladder.py).
        """
        if rung is None:
            with self._lock:
                ready = self._prefetched.pop(key, None)
            if ready is not None:
                return ready
        entry = self._block(key, rung)
        t0 = time.perf_counter()
        buf = self._read_bytes(key, own_mapping, rung)
        if self.verify == "always" or (self.verify == "first" and (key, rung) not in self._verified):
            digest = hashlib.sha256(buf).hexdigest()
            expected = self.manifest.files[entry.weights_file].sha256
            if digest != expected:
                raise ExpertReadError(key, self.manifest.path(entry.weights_file),
                                      f"sha256 {digest[:12]}… is not the manifest's {expected[:12]}…; the file is corrupt")
            with self._lock:
                self._verified.add((key, rung))
        feeds = {t.role: _view(buf, t.offset, t.shape, t.dtype) for t in entry.tensors}
        with self._lock:
            self.bytes_read += entry.nbytes
            self.reads += 1
            self.read_seconds += time.perf_counter() - t0
        return LoadedExpert(key, feeds, entry.nbytes, rung=rung, block=buf)

    def counters(self) -> dict[str, float]:
        with self._lock:
            return {"bytes_read": self.bytes_read, "reads": self.reads, "read_seconds": self.read_seconds}


class StartupPrefetch:
    """A thread that reads ahead what a launch needs: the dense files (into the page cache,
    for ONNX Runtime to find there), then the given experts (into the store)."""

    def __init__(self, store: ExpertStore, dense_files: list, experts: list[ExpertKey]):
        self.dense_done = threading.Event()
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(store, dense_files, experts),
                                        name="swapmoe-prefetch", daemon=True)
        self._thread.start()

    def _run(self, store: ExpertStore, dense_files: list, experts: list[ExpertKey]) -> None:
        chunk = bytearray(8 << 20)
        try:
            for path in dense_files:
                try:
                    with open(path, "rb", buffering=0) as f:
                        while f.readinto(chunk):
                            pass
                except OSError as e:  # ORT will report a missing file itself
                    self.errors.append(str(e))
        finally:
            self.dense_done.set()
        for key in experts:
            try:
                store.prefetch(key)
            except Exception as e:  # the warm start reads it again and reports the error there
                self.errors.append(f"{key}: {e}")

    def join(self) -> None:
        self._thread.join()


class _DirectUnsupported(Exception):
    pass


def _truncated(key: ExpertKey, path, got: int, nbytes: int) -> ExpertReadError:
    return ExpertReadError(key, path, f"read {got} of {nbytes} bytes; the file is truncated")


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
