"""The shipped models' artifacts: the one place that hands the exporter to the runtime, and
``swapmoe embedded`` (an artifact's path; ``--rebuild`` exports it again)."""

from __future__ import annotations

import click
import swapmoe_export  # cheap: the exporter (onnx) loads only when an export runs

from swapmoe_edge.cli.common import fail
from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.runtime.embedded import EMBEDDED_NAME, default_artifact, shipped_models


def _export(*args, **kwargs):
    return swapmoe_export.export_checkpoint(*args, **kwargs)


def embedded_artifact(quiet: bool = False, validate: bool = False, rebuild: bool = False, model: str | None = None) -> str:
    """A shipped model's artifact (``model``: its name; None: the default), exported into the cache on
    first use (or with ``rebuild``)."""
    return str(default_artifact(_export, quiet=quiet, validate=validate, rebuild=rebuild, model=model))


def artifact_or_default(artifact: str | None, quiet: bool = False, model: str | None = None) -> str:
    if artifact and model:
        raise click.UsageError("give --artifact or --model, not both")
    return artifact if artifact else embedded_artifact(quiet=quiet, model=model)


@click.command("embedded")
@click.option("--model", "model", default=None,
              help=f"Which shipped model: {', '.join(shipped_models())} (default {EMBEDDED_NAME}).")
@click.option("--rebuild", is_flag=True, help="Export the model into its cache again, even if the cache looks complete.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def embedded_cmd(model: str | None, rebuild: bool, quiet: bool) -> None:
    """Print the path of the embedded model's artifact, exporting it into the cache if needed."""
    try:
        click.echo(embedded_artifact(quiet=quiet, rebuild=rebuild, model=model))
    except SwapMoEError as e:
        fail(e)
