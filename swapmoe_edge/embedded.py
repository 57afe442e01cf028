"""The embedded default model: exported on first use into a per-user cache directory."""

from __future__ import annotations

from pathlib import Path

from .errors import ArtifactError


def default_artifact() -> Path:
    raise ArtifactError(
        "no --artifact given and this installation ships no embedded model yet "
        "(it is being trained; see README). Export a Switch Transformer with "
        "`swapmoe export MODEL_DIR -o DIR` and pass --artifact DIR."
    )
