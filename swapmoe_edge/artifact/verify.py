"""Files checked against the manifest before their bytes are used, each hashed once per identity.

The runtime hands dense files (ONNX graphs, their external data, the tokenizer) to ONNX Runtime
and the tokenizer library, which would run on whatever bytes they find: a corrupt LM head gave
garbage summaries labelled exact, a flipped byte in a block gave NaN importance. So every dense
file's sha256 is compared with the manifest's before it is opened. Hashing a switch-base-64's
dense part on every launch would cost seconds on a device, so a good file's digest is remembered
(``HashCache``) by its identity: path, size, mtime, ctime and inode. Rewriting, replacing or
copying a file changes one of those, and ctime cannot be set back by a user, so only a change
that bypasses the file system (bit rot on flash) goes unseen until ``swapmoe info --verify``.
Experts are not hashed here: the expert store hashes each block as it reads it (store.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from swapmoe_edge.artifact.files import locked
from swapmoe_edge.artifact.manifest import Manifest
from swapmoe_edge.core.errors import ArtifactError

_CHUNK = 1 << 22
FIX = "Export the model again, or restore the file from a good copy."
MAX_ENTRIES = 50_000  # a cache that remembers more forgets the oldest


class FileCheckError(ArtifactError):
    """An artifact file failed its check: ``path``, ``why`` (what is wrong with it), and the fix."""

    def __init__(self, path: Path, why: str, fix: str = FIX):
        self.path, self.why = path, why
        super().__init__(f"{path} {why}. {fix}")


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class HashCache:
    """sha256 digests of files keyed by path and identity, kept in one JSON file (``path``; None:
    remembered in memory only). Reading tolerates a missing, corrupt or foreign file (it starts
    empty); writing merges with what other processes wrote meanwhile, under a lock, and replaces
    the file atomically, so concurrent launches never leave half a cache. Best effort: a
    read-only cache folder only means hashing again next time."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries = self._read()
        self._new: dict[str, dict] = {}

    def _read(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        return {k: v for k, v in raw.items() if _valid(k, v)} if isinstance(raw, dict) else {}

    def lookup(self, path: Path, st: os.stat_result) -> str | None:
        """The remembered digest of ``path`` if it still has the identity ``st``."""
        key = os.path.abspath(path)
        e = self._new.get(key) or self._entries.get(key)
        return e["sha256"] if e is not None and e["id"] == _identity(st) else None

    def remember(self, path: Path, st: os.stat_result, digest: str) -> None:
        self._new[os.path.abspath(path)] = {"id": _identity(st), "sha256": digest}

    def save(self) -> None:
        """Merge what this process hashed into the file (entries of files gone or changed are dropped)."""
        if self.path is None or not self._new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with locked(self.path.with_name(self.path.name + ".lock")):
                merged = {**self._read(), **self._new}
                merged = {k: v for k, v in merged.items() if _current(k, v)}
                if len(merged) > MAX_ENTRIES:
                    merged = dict(list(merged.items())[-MAX_ENTRIES:])
                tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
                tmp.write_text(json.dumps(merged))
                os.replace(tmp, self.path)
            self._entries, self._new = merged, {}
        except OSError:
            pass


def _valid(key, v) -> bool:
    return (isinstance(key, str) and isinstance(v, dict) and isinstance(v.get("sha256"), str)
            and isinstance(v.get("id"), list) and len(v["id"]) == 5 and all(type(i) is int for i in v["id"]))


def _current(path: str, v: dict) -> bool:
    try:
        return _identity(os.stat(path)) == v["id"]
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Checked:
    """What ``verify_files`` did: files and bytes it hashed, and files it knew already."""

    hashed_files: int
    hashed_bytes: int
    remembered_files: int


def verify_files(manifest: Manifest, rels: Iterable[str], cache: HashCache | None = None,
                 drop_pages: Iterable[str] = (), threads: int | None = None) -> Checked:
    """Check each of ``rels`` (paths in ``manifest.files``) against its size and sha256; raise
    ArtifactError naming the first bad file and the fix. ``cache``: skip files whose identity it
    remembers with the manifest's digest, and remember the ones hashed here. ``drop_pages``: files
    whose pages leave the page cache after hashing (read lazily later, they would only take
    memory). Files are hashed on ``threads`` threads (sha256 and reads release the GIL)."""
    todo, known = [], 0
    for rel in dict.fromkeys(rels):
        entry = manifest.files.get(rel)
        if entry is None:
            raise ArtifactError(f"{manifest.root}: {rel} is not listed in the manifest's 'files' (no sha256 to check it by). "
                                "Export the model again.")
        path = manifest.path(rel)
        st = _stat(path)
        if cache is not None and cache.lookup(path, st) == entry.sha256 and st.st_size == entry.size:
            known += 1
        else:
            todo.append((rel, path, st))
    drop = set(drop_pages)
    todo.sort(key=lambda t: -t[2].st_size)  # the largest first, so the threads finish together
    workers = max(1, min(len(todo), threads or min(4, os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers, thread_name_prefix="swapmoe-verify") as pool:
        digests = list(pool.map(lambda t: _hash(t[1], t[0] in drop), todo))
    for (rel, path, st), (digest, after) in zip(todo, digests):
        entry = manifest.files[rel]
        if digest != entry.sha256 or after.st_size != entry.size:
            raise FileCheckError(path, f"is corrupt: its sha256 is {digest[:12]}… ({after.st_size} bytes), the manifest "
                                       f"says {entry.sha256[:12]}… ({entry.size} bytes)")
        if cache is not None and _identity(after) == _identity(st):  # not changed while it was hashed
            cache.remember(path, st, digest)
    if cache is not None:
        cache.save()
    return Checked(len(todo), sum(t[2].st_size for t in todo), known)


def _stat(path: Path) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as e:
        raise FileCheckError(path, f"cannot be read ({e.strerror}); the artifact is incomplete") from e
    if not stat.S_ISREG(st.st_mode):
        raise FileCheckError(path, "is not a regular file; the artifact is damaged")
    return st


def _hash(path: Path, drop: bool) -> tuple[str, os.stat_result]:
    """(sha256, the file's stat after reading) of ``path``."""
    h = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
            if drop:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            after = os.fstat(f.fileno())
    except OSError as e:
        raise FileCheckError(path, f"cannot be read ({e.strerror})") from e
    return h.hexdigest(), after


def checked_at_load(manifest: Manifest) -> list[str]:
    """The files the runtime opens whole: every file but the experts' weight blocks (the store
    hashes each as it reads it) and their own graphs (opened only as sessions of their own, which check them)."""
    per_expert = {f for e in manifest.experts.values() for f in (e.weights_file, e.graph.file)}
    per_expert |= {r.weights_file for e in manifest.experts.values() for r in e.rungs.values()}
    return [rel for rel in manifest.files if rel not in per_expert]
