"""The files an ONNX model refers to (external data), read without the ``onnx`` package.

ONNX Runtime resolves an initializer's external-data ``location`` against the model's
folder and reads whatever it names, so an artifact copied from elsewhere could make the
runtime read any file on the machine. ``check_external_data`` walks the protobuf (every
place a tensor can sit: initializers, sparse initializers, node attributes, subgraphs,
functions) and refuses a location that leaves the artifact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Collection

from swapmoe_edge.artifact.files import check_inside
from swapmoe_edge.core.errors import ArtifactError

# Field numbers from onnx/onnx.proto.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_FUNCTION_NODE = 7
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE_INIT = 1, 5, 15
_NODE_ATTR = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL = 13


def _fields(buf: bytes):
    """(field number, payload) for every length-delimited field of one message; others skipped."""
    pos, end = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= end:
                raise ValueError("truncated varint")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    while pos < end:
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            varint()
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n = varint()
            if pos + n > end:
                raise ValueError("truncated field")
            yield num, buf[pos: pos + n]
            pos += n
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _tensor(buf: bytes, out: list[str]) -> None:
    for num, entry in _fields(buf):
        if num == _TENSOR_EXTERNAL:
            kv = dict(_fields(entry))
            if kv.get(1) == b"location":
                out.append(kv.get(2, b"").decode("utf-8", "replace"))


def _sparse(buf: bytes, out: list[str]) -> None:
    for num, t in _fields(buf):
        if num in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(t, out)


def _node(buf: bytes, out: list[str]) -> None:
    for num, attr in _fields(buf):
        if num != _NODE_ATTR:
            continue
        for anum, val in _fields(attr):
            if anum in (_ATTR_T, _ATTR_TENSORS):
                _tensor(val, out)
            elif anum in (_ATTR_G, _ATTR_GRAPHS):
                _graph(val, out)
            elif anum in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse(val, out)


def _graph(buf: bytes, out: list[str]) -> None:
    for num, val in _fields(buf):
        if num == _GRAPH_NODE:
            _node(val, out)
        elif num == _GRAPH_INIT:
            _tensor(val, out)
        elif num == _GRAPH_SPARSE_INIT:
            _sparse(val, out)


def external_locations(model: bytes) -> list[str]:
    """Every external-data ``location`` in a serialized ModelProto."""
    out: list[str] = []
    for num, val in _fields(model):
        if num == _MODEL_GRAPH:
            _graph(val, out)
        elif num == _MODEL_FUNCTIONS:
            for fnum, node in _fields(val):
                if fnum == _FUNCTION_NODE:
                    _node(node, out)
    return out


def check_external_data(model_path: Path, root: Path, listed: Collection[str] | None = None) -> None:
    """Raise ArtifactError if an external-data reference of ``model_path`` leaves ``root``, or
    (``listed``: the manifest's files) names a file the manifest does not list, whose bytes
    nothing would have checked."""
    try:
        locations = external_locations(model_path.read_bytes())
    except ValueError as e:
        raise ArtifactError(f"{model_path} is not a valid ONNX file ({e}). The artifact is corrupt; export it again.") from e
    for loc in sorted(set(locations)):
        path = check_inside(root, loc, f"{model_path.name}'s external data", base=model_path.parent)
        rel = Path(os.path.relpath(os.path.normpath(path), root)).as_posix()
        if listed is not None and rel not in listed:
            raise ArtifactError(f"{model_path} reads external data from {rel}, which the manifest does not list "
                                "(no sha256 to check it by). Export the model again.")
