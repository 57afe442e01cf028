"""The artifact's files on disk: paths that must stay inside it, sha256 of a file, atomic JSON writes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from swapmoe_edge.core.errors import ArtifactError


def check_inside(root: Path, rel: Any, what: str, base: Path | None = None, _dirs: dict | None = None) -> Path:
    """``base / rel`` (base defaults to root), or ArtifactError if it leaves ``root``: an absolute
    path, a ``..`` component, or a symlink (anywhere on the way) that points outside.
    ``_dirs`` caches resolved folders across calls (thousands of experts share a few)."""
    base = root if base is None else base
    bad = None
    if not isinstance(rel, str) or not rel or "\0" in rel:
        bad = "is not a relative path"
    elif PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        bad = "is an absolute path"
    elif ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        bad = "climbs out with '..'"
    else:
        try:
            bad = _outside(root, base / rel, {} if _dirs is None else _dirs)
        except (OSError, ValueError, RuntimeError) as e:  # a name too long, undecodable, or a symlink loop
            bad = f"cannot be looked up ({getattr(e, 'strerror', None) or type(e).__name__})"
    if bad:
        raise ArtifactError(
            f"{root}: {what} names {repr(rel)[:160]}, which {bad}. An artifact may only refer to files inside "
            "its own directory; this one is damaged or was made to read other files. Export the model again."
        )
    return base / rel


def _outside(root: Path, path: Path, dirs: dict) -> str | None:
    """Why ``path`` lies outside ``root`` once its folders and a final symlink are resolved, or None."""
    if path.parent not in dirs:
        dirs[path.parent] = path.parent.resolve()
    target = dirs[path.parent] / path.name
    if target.is_symlink():
        target = target.resolve()
    if root not in dirs:
        dirs[root] = root.resolve()
    top = dirs[root]
    if target != top and top not in target.parents:
        return f"resolves to {target}, outside the artifact (a symlink out)"
    return None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on the file ``path`` (made if missing) for the life of the block; a
    process that dies releases it. For small shared caches that several processes update."""
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
        yield


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON next to ``path`` then rename over it, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
