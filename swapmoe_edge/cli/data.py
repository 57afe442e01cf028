"""``swapmoe data``: build datasets (corpus.py does the work)."""

from __future__ import annotations

import json

import click

from swapmoe_edge.cli.common import fail
from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.lab.corpus import build_debian_corpus


@click.group("data")
def data_group() -> None:
    """Build datasets."""


@data_group.command("debian")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Directory for train/validation/test.jsonl.")
@click.option("--lists-dir", default="/var/lib/apt/lists", show_default=True, help="Where apt keeps *_Translation-en files.")
def data_debian_cmd(output: str, lists_dir: str) -> None:
    """Debian package descriptions -> (document, synopsis) pairs, split by source package."""
    try:
        counts = build_debian_corpus(output, lists_dir)
    except SwapMoEError as e:
        fail(e)
    click.echo(json.dumps(counts))
