"""The artifact's files on disk: paths that must stay inside it, sha256 of a file, atomic JSON writes."""

from __future__ import annotations

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
        dirs = {} if _dirs is None else _dirs
        path = base / rel
        if path.parent not in dirs:
            dirs[path.parent] = path.parent.resolve()
        target = dirs[path.parent] / path.name
        if target.is_symlink():
            target = target.resolve()
        if root not in dirs:
            dirs[root] = root.resolve()
        top = dirs[root]
        if target != top and top not in target.parents:
            bad = f"resolves to {target}, outside the artifact (a symlink out)"
    if bad:
        raise ArtifactError(
            f"{root}: {what} names {rel!r}, which {bad}. An artifact may only refer to files inside "
            "its own directory; this one is damaged or was made to read other files. Export the model again."
        )
    return base / rel


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON next to ``path`` then rename over it, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
