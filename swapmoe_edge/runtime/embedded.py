"""The embedded default model: a small Switch summariser shipped as a HF checkpoint.

On first use it is exported, like any user checkpoint, into a per-user cache directory
(``$SWAPMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/swapmoe_edge``, else
``~/.cache/swapmoe_edge``) and reused afterwards. The export needs neither torch nor onnx
(``swapmoe_export`` writes ONNX with numpy alone), so the runtime-only install runs the
embedded model offline on its first call. It is not validated against PyTorch there (that
needs torch); CI exports the shipped checkpoint the same way, validates it, and checks
its summaries token for token against Hugging Face ``generate`` (tests/test_shipped_model.py).
The checkpoint folder may carry ``profile.json``, the importance profile measured on the
corpus's validation split, which is copied into the export.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from swapmoe_edge.core.errors import ArtifactError
from swapmoe_edge.residency.importance import PROFILE_NAME
from swapmoe_edge.artifact.manifest import MANIFEST_NAME, SCHEMA_VERSION

Exporter = Callable[..., Path]
EMBEDDED_NAME = "switch-debian"
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "model_data" / EMBEDDED_NAME


def cache_root() -> Path:
    if os.environ.get("SWAPMOE_CACHE_DIR"):
        return Path(os.environ["SWAPMOE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "swapmoe_edge"


def _fingerprint(ckpt: Path) -> str:
    """Cheap identity of the shipped checkpoint: its config and weight files' sizes and heads."""
    # A new artifact schema, or export's default precision ladder, exports again.
    h = hashlib.sha256(f"schema {SCHEMA_VERSION} ladder int4".encode())
    for p in sorted(ckpt.glob("*")):
        if p.suffix in (".json", ".safetensors"):
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 16))
    return h.hexdigest()[:12]


def default_artifact(export: Exporter, ckpt: Path | None = None, quiet: bool = False,
                     validate: bool = False) -> Path:
    """The exported embedded model, exported with ``export`` on the first call.

    ``export(checkpoint, out, quiet=, validate=)`` is ``swapmoe_export.export_checkpoint``;
    the caller passes it because the runtime never imports the exporter. ``validate``
    needs torch.
    """
    ckpt = Path(ckpt or EMBEDDED_DIR)
    if not (ckpt / "config.json").is_file():
        raise ArtifactError(
            f"no embedded model is shipped in this installation ({ckpt} is missing). "
            "Export a Switch Transformer with `swapmoe export MODEL_DIR -o DIR` and pass --artifact DIR."
        )
    out = cache_root() / f"{ckpt.name}-{_fingerprint(ckpt)}"
    if (out / MANIFEST_NAME).is_file():
        return out
    if not quiet:
        print(f"[swapmoe] first use: exporting the embedded model into {out} (once)", file=sys.stderr, flush=True)
    try:
        art = export(ckpt, out, quiet=quiet, validate=validate)
    except OSError as e:
        raise ArtifactError(
            f"cannot write the embedded model's export into {out} ({e.strerror or e}). "
            "Set SWAPMOE_CACHE_DIR to a writable folder, or pass --artifact DIR."
        ) from e
    shipped = ckpt / PROFILE_NAME  # the importance profile measured on the validation split
    if shipped.is_file():
        tmp = art / (PROFILE_NAME + ".tmp")
        shutil.copyfile(shipped, tmp)
        os.replace(tmp, art / PROFILE_NAME)
    return art
