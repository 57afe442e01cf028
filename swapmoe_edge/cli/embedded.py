"""The embedded model's artifact: the one place that hands the exporter to the runtime, and
``swapmoe embedded`` (its path; ``--rebuild`` exports it again)."""

from __future__ import annotations

import click
import swapmoe_export  # cheap: the exporter (onnx) loads only when an export runs

from swapmoe_edge.cli.common import fail
from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.runtime.embedded import default_artifact


def _export(*args, **kwargs):
    return swapmoe_export.export_checkpoint(*args, **kwargs)


def embedded_artifact(quiet: bool = False, validate: bool = False, rebuild: bool = False) -> str:
    """The embedded model's artifact, exported into the cache on first use (or with ``rebuild``)."""
    return str(default_artifact(_export, quiet=quiet, validate=validate, rebuild=rebuild))


def artifact_or_default(artifact: str | None, quiet: bool = False) -> str:
    return artifact if artifact else embedded_artifact(quiet=quiet)


@click.command("embedded")
@click.option("--rebuild", is_flag=True, help="Export the embedded model into its cache again, even if the cache looks complete.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def embedded_cmd(rebuild: bool, quiet: bool) -> None:
    """Print the path of the embedded model's artifact, exporting it into the cache if needed."""
    try:
        click.echo(embedded_artifact(quiet=quiet, rebuild=rebuild))
    except SwapMoEError as e:
        fail(e)
