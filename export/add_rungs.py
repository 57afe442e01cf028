"""Add precision-ladder rungs to an artifact that was exported without them.

Reads each expert's own weights from the artifact (float32 or float16 experts), writes
its low-bit copies beside it, the rung's template and kernel, and then the manifest, in
one atomic rename: a run that stops half-way leaves the old manifest, which does not
name the new files, so the artifact stays as it was. Copies made from float16 experts
quantise the rounded weights (an export from the checkpoint quantises the originals).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from swapmoe_edge.core.errors import ArtifactError, ExportError
from swapmoe_edge.artifact.files import write_json_atomic
from swapmoe_edge.artifact.manifest import MANIFEST_NAME, load_manifest

from . import graphs, ladder, options
from .writer import ArtifactWriter


def add_rungs(artifact: str | Path, rungs: tuple[str, ...] = ("int4",), quiet: bool = False, stream=None,
              block: int | None = None) -> dict:
    """Write ``rungs`` for every expert of ``artifact`` (``block`` inputs a scale; None: ladder.BLOCK);
    return the manifest's new ``ladder`` entry."""
    block = options.ladder_block(block, rungs)
    root = Path(artifact)
    m = load_manifest(root)  # checks the artifact before anything is written
    for rung in rungs:
        why = ladder.rung_error(rung, m.expert_dtype)
        if rung in m.ladder:  # its files would be rewritten under the manifest's old hashes
            why = (f"it has one already (block {m.ladder[rung].block}); to write it again at another block, "
                   f"export the model again with --ladder-block")
        if why:
            raise ExportError(f"cannot add the {rung} rung to {root}: {why}.")
    raw = json.loads((root / MANIFEST_NAME).read_text())
    writer = ArtifactWriter(root)
    by_key = {(d["stack"], int(d["layer"]), int(d["expert"])): d for d in raw["experts"]}
    t0, n = time.perf_counter(), len(m.experts)
    for i, (key, entry) in enumerate(m.experts.items()):
        views = _weights(m, entry)
        d = by_key[(key.stack, key.layer, key.expert)]
        scope = entry.tensors[0].name.rsplit("/", 1)[0]
        d.setdefault("rungs", {}).update({r: ladder.write_rung(writer, key.name, scope, views["wi"], views["wo"], r, block)
                                          for r in rungs})
        if not quiet and (i + 1 == n or (i + 1) % max(1, n // 10) == 0):
            print(f"[ladder] {i + 1}/{n} experts, {time.perf_counter() - t0:.0f}s", file=stream or sys.stderr, flush=True)
    c, act = m.config, _expert_act(m)
    entries = raw.setdefault("ladder", {})
    for rung in rungs:
        entries[rung] = ladder.write_templates(writer, c.d_model, c.d_ff, act, rung, raw["experts"][0]["rungs"][rung])
        rel = f"dense/{ladder.kernel_name(rung)}.onnx"
        writer.write_onnx(rel, ladder.kernel_graph(c.d_model, c.d_ff, act, rung, entries[rung]["block"]))
        ins, outs = graphs.IO["rung_kernel"]
        raw["subgraphs"][ladder.kernel_name(rung)] = {"file": rel, "inputs": list(ins), "outputs": list(outs)}
        ladder.check_rung(root, rung, entries[rung], raw["experts"][0], c.d_model, act)
    raw["files"].update(writer.files)
    write_json_atomic(root / MANIFEST_NAME, raw)
    return entries


def retemplate(artifact: str | Path, accuracy_level: int | None = None) -> dict[str, int]:
    """Write every rung's session template again at ``accuracy_level`` (None: the exporter's
    default, ladder.default_accuracy); the copies are unchanged. For artifacts exported with
    an older level (0 everywhere before level 4 was measured faster at prefill). Returns
    rung -> level.

    Each template is written to a new file (never through an existing one, which may be a
    hard link into another artifact) and the manifest replaced atomically at the end.
    """
    root = Path(artifact)
    m = load_manifest(root)
    if not m.ladder:
        raise ExportError(f"{root} has no precision ladder to rewrite")
    raw = json.loads((root / MANIFEST_NAME).read_text())
    writer = ArtifactWriter(root)
    c, act = m.config, _expert_act(m)
    first = raw["experts"][0]
    levels, stale = {}, []
    for rung, info in raw["ladder"].items():
        old_alt = info.get("session_graph_level0")
        entry = ladder.write_templates(writer, c.d_model, c.d_ff, act, rung, first["rungs"][rung], accuracy_level, ".new")
        for rel in (entry["session_graph"], entry.get("session_graph_level0")):
            if rel:
                (root / f"{rel}.new").replace(root / rel)  # a new inode: a hard-linked old template elsewhere stays as it was
                writer.files[rel] = writer.files.pop(f"{rel}.new")
        if old_alt and not entry.get("session_graph_level0"):
            raw["files"].pop(old_alt, None)
            stale.append(root / old_alt)
        raw["ladder"][rung] = entry
        ladder.check_rung(root, rung, entry, first, c.d_model, act)
        levels[rung] = ladder.template_accuracy(root / entry["session_graph"])
    raw["files"].update(writer.files)
    write_json_atomic(root / MANIFEST_NAME, raw)
    for path in stale:  # once the manifest no longer lists it
        path.unlink(missing_ok=True)
    return levels


def _expert_act(m) -> str:
    """The activation the rung templates compute: SwiGLU where the manifest says so."""
    return m.extra.get("expert_act") or m.config.dense_act_fn


def _weights(m, entry) -> dict[str, np.ndarray]:
    """An expert's wi[D, F] and wo[F, D] as float32, read from its weight block."""
    if m.expert_dtype not in ("float32", "float16"):
        raise ArtifactError(f"{m.root}: rungs are made from float experts, these are {m.expert_dtype}")
    blob = np.fromfile(m.path(entry.weights_file), dtype=np.uint8)
    out = {}
    for t in entry.tensors:
        dt = np.dtype(t.dtype)
        out[t.role] = blob[t.offset: t.offset + t.nbytes].view(dt).reshape(t.shape).astype(np.float32)
    return out
