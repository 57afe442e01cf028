"""The embedded model's artifact: the one place that hands the exporter to the runtime."""

from __future__ import annotations

from swapmoe_export import export_checkpoint

from swapmoe_edge.runtime.embedded import default_artifact


def embedded_artifact(quiet: bool = False, validate: bool = False) -> str:
    """The embedded model's artifact, exported into the cache on first use."""
    return str(default_artifact(export_checkpoint, quiet=quiet, validate=validate))


def artifact_or_default(artifact: str | None, quiet: bool = False) -> str:
    return artifact if artifact else embedded_artifact(quiet=quiet)
