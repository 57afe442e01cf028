"""The ``swapmoe`` command line: each verb is a thin shell over one library function."""

from __future__ import annotations

import json
import sys

import click

from .errors import SwapMoEError


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(package_name="swapmoe-edge")
def main() -> None:
    """Serve Switch Transformer MoE models inside a memory budget (SwapMoE)."""


@main.command("export")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=str), help="Artifact directory to write.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True, help="Storage type of the weights.")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Compare the split model with PyTorch before installing it.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def export_cmd(model_dir: str, output: str, dtype: str, validate: bool, quiet: bool) -> None:
    """Split a Hugging Face Switch Transformer checkpoint into an ONNX artifact."""
    try:
        from swapmoe_export import export_checkpoint
    except ImportError as e:
        _fail(SwapMoEError(f"export needs the export extra ({e}). Install torch==2.13.0, then pip install 'swapmoe-edge[export]'."))
    try:
        export_checkpoint(model_dir, output, dtype=dtype, validate=validate, quiet=quiet)
    except SwapMoEError as e:
        _fail(e)


@main.command("info")
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256 (reads the whole artifact).")
def info_cmd(artifact: str, as_json: bool, verify: bool) -> None:
    """Layers, experts and bytes of an artifact."""
    from .manifest import load_manifest

    try:
        summary = load_manifest(artifact, verify=verify).summary()
    except SwapMoEError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(summary))
        return
    gib = 2**30
    click.echo(f"artifact        {summary['artifact']}  (schema {summary['schema_version']}, {summary['dtype']})")
    click.echo(f"model           d_model {summary['d_model']}, d_ff {summary['d_ff']}, heads {summary['num_heads']}, vocab {summary['vocab_size']}")
    click.echo(f"layers          encoder {summary['encoder_layers']}, decoder {summary['decoder_layers']}; sparse: {', '.join(summary['sparse_layers'])}")
    click.echo(f"experts         {summary['experts_per_layer']} per sparse layer, {summary['experts_total']} in all, capacity {summary['expert_capacity']}")
    click.echo(f"dense bytes     {summary['dense_bytes']:,} ({summary['dense_bytes'] / gib:.3f} GiB)")
    click.echo(f"expert bytes    {summary['expert_bytes']:,} ({summary['expert_bytes'] / gib:.3f} GiB; {summary['bytes_per_expert']:,} each)")
    click.echo(f"tokenizer       {summary['tokenizer'] or 'none'}")
    click.echo(f"validated       {'yes' if summary['validated'] else 'no'}")
