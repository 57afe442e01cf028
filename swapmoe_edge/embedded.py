"""The embedded default model: a small Switch summariser shipped as a HF checkpoint.

On first use it is exported, like any user checkpoint, into a per-user cache directory
(``$SWAPMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/swapmoe_edge``, else
``~/.cache/swapmoe_edge``) and reused afterwards. Exporting needs the ``export`` extra
(torch); the README's set-up installs it. The checkpoint folder may carry ``profile.json``, the
importance profile measured on the corpus's validation split, which is copied into the export.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

from .errors import ArtifactError
from .importance import PROFILE_NAME
from .manifest import MANIFEST_NAME

EMBEDDED_NAME = "switch-debian"
EMBEDDED_DIR = Path(__file__).resolve().parent / "model_data" / EMBEDDED_NAME


def cache_root() -> Path:
    if os.environ.get("SWAPMOE_CACHE_DIR"):
        return Path(os.environ["SWAPMOE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "swapmoe_edge"


def _fingerprint(ckpt: Path) -> str:
    """Cheap identity of the shipped checkpoint: its config and weight files' sizes and heads."""
    h = hashlib.sha256()
    for p in sorted(ckpt.glob("*")):
        if p.suffix in (".json", ".safetensors"):
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 16))
    return h.hexdigest()[:12]


def default_artifact(ckpt: Path | None = None, quiet: bool = False) -> Path:
    """The exported embedded model, exporting it on the first call."""
    ckpt = Path(ckpt or EMBEDDED_DIR)
    if not (ckpt / "config.json").is_file():
        raise ArtifactError(
            f"no embedded model is shipped in this installation ({ckpt} is missing). "
            "Export a Switch Transformer with `swapmoe export MODEL_DIR -o DIR` and pass --artifact DIR."
        )
    out = cache_root() / f"{ckpt.name}-{_fingerprint(ckpt)}"
    if (out / MANIFEST_NAME).is_file():
        return out
    try:
        from swapmoe_export import export_checkpoint
    except ImportError as e:
        raise ArtifactError(
            f"the embedded model must be exported once into {out}, which needs the export extra ({e}). "
            "Install torch==2.13.0 then `pip install 'swapmoe-edge[export]'`, or pass --artifact DIR."
        ) from e
    if not quiet:
        print(f"[swapmoe] first use: exporting the embedded model into {out} (once)", file=sys.stderr, flush=True)
    art = export_checkpoint(ckpt, out, quiet=quiet)
    shipped = ckpt / PROFILE_NAME  # the importance profile measured on the validation split
    if shipped.is_file():
        tmp = art / (PROFILE_NAME + ".tmp")
        shutil.copyfile(shipped, tmp)
        os.replace(tmp, art / PROFILE_NAME)
    return art
