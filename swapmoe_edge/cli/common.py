"""What the verbs share: one error line instead of a traceback, and the default artifact."""

from __future__ import annotations

import sys
from typing import NoReturn

import click
from swapmoe_export import export_checkpoint

from swapmoe_edge.runtime.embedded import default_artifact


def fail(e: Exception) -> NoReturn:
    """Print ``error: ...`` on stderr and exit with status 2."""
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


def embedded_artifact(quiet: bool = False, validate: bool = False) -> str:
    """The embedded model's artifact, exported into the cache on first use."""
    return str(default_artifact(export_checkpoint, quiet=quiet, validate=validate))


def artifact_or_default(artifact: str | None, quiet: bool = False) -> str:
    return artifact if artifact else embedded_artifact(quiet=quiet)
