"""The artifact's files: each written once, its size and sha256 recorded for the manifest.

Weights are written straight from numpy, each array at a 4 KiB boundary: an expert's
weights make one contiguous block (``experts/NAME.bin``) that the runtime streams with
plain reads, and a dense subgraph's big weights go to ``dense/NAME.onnx.data``.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from swapmoe_edge.artifact.files import write_json_atomic
from swapmoe_edge.artifact.manifest import MANIFEST_NAME

from .builder import BuiltGraph, point_at

ALIGN = 4096  # expert tensors start on page boundaries so plain reads can land in place


class ArtifactWriter:
    """Writes files under a root, recording each file's size and sha256 for the manifest."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, dict[str, Any]] = {}

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        with _naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        self.files[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def write_onnx(self, rel: str, built: BuiltGraph) -> None:
        """Write a subgraph; its big weights go to ``REL.data``, straight from numpy."""
        if built.blobs:
            data_rel = rel + ".data"
            offsets = self.write_blocks(data_rel, [arr for _, arr in built.blobs])
            where = {name: (off, arr.nbytes) for (name, arr), off in zip(built.blobs, offsets)}
            for t in built.proto.graph.initializer:
                if t.name in where:
                    point_at(t, Path(data_rel).name, *where[t.name])
        self.write_bytes(rel, built.proto.SerializeToString())

    def write_blocks(self, rel: str, arrays: list[np.ndarray]) -> list[int]:
        """Write arrays back to back, each at an ALIGN-ed offset; return the offsets."""
        path = self.root / rel
        h = hashlib.sha256()
        offsets, pos = [], 0
        with _naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                for arr in arrays:
                    pad = (-pos) % ALIGN
                    if pad:
                        f.write(b"\0" * pad)
                        h.update(b"\0" * pad)
                        pos += pad
                    offsets.append(pos)
                    buf = memoryview(np.ascontiguousarray(arr)).cast("B")
                    f.write(buf)
                    h.update(buf)
                    pos += arr.nbytes
        self.files[rel] = {"size": pos, "sha256": h.hexdigest()}
        return offsets


@contextlib.contextmanager
def _naming(path: Path):
    """An OSError from a write (ENOSPC comes from write() or close(), without a file name) names ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def write_manifest(tmp: Path, manifest: dict) -> None:
    """The manifest into the staging folder (atomically); an OSError names the file."""
    try:
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(tmp / MANIFEST_NAME)) from e
        raise
