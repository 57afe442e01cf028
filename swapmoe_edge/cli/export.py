"""``swapmoe export``, ``swapmoe info`` and ``swapmoe ladder add``: write an artifact, describe it, extend it."""

from __future__ import annotations

import json
from pathlib import Path

import click
from swapmoe_export import export_checkpoint
from swapmoe_export.add_rungs import add_rungs

from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.cli.common import fail
from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.residency.importance import PROFILE_NAME


@click.command("export")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=str), help="Artifact directory to write.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "int8", "int4"]), default="float32", show_default=True,
              help="Type of the dense weights. int8/int4: every dense MatMul weight (attention, cross-attention, dense FFN, "
                   "LM head) stored for ONNX Runtime's MatMulNBits (lossy: weight-only, a float32 scale per --block-size "
                   "inputs; the router, embeddings, norms and position bias stay float32); experts default to the same type.")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128"]), default=None,
              help="int8/int4 dense: inputs per scale (default: int8 64, int4 32, chosen by measured quality and speed).")
@click.option("--lm-head", type=click.Choice(["int8", "int4"]), default=None,
              help="int8/int4 dense: the LM head's width (default int8: under --dtype int4 it keeps a third of the "
                   "logits' divergence from the float model away, for 1/14 of float32's head bytes more).")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default=None,
              help="int8/int4 dense: MatMulNBits' compute type. 4 (default): activations rounded to int8 per block, "
                   "integer dot products (int8 weights run 20x faster than at 0); 0: float32 activations.")
@click.option("--expert-dtype", type=click.Choice(["float32", "float16", "int8", "int4"]), default=None,
              help="Storage type of the experts (default: --dtype). float16: lossy, 1/2 the bytes. int8: weight-only, "
                   "per-column scales: lossy, 1/4 the bytes. int4: weight-only MatMulNBits, a float32 scale per 32 inputs: "
                   "lossy (more than int8), 1/6.4 the bytes.")
@click.option("--expert-accuracy-level", type=click.Choice(["0", "4"]), default=None,
              help="int4 experts: MatMulNBits' compute type. 0 (default): float32 arithmetic, a resident expert holds "
                   "its bytes; 4: activations rounded to int8 per block, faster decode (switch-base-8 with --dtype "
                   "int4: 0.30x float32's time against 0.37x), a resident expert holds ~1.4x its bytes.")
@click.option("--ladder", "ladder_", type=click.Choice(["auto", "int4", "int8", "int4,int8", "int2", "int2,int4", "int2,int4,int8", "none"]),
              default="auto", show_default=True,
              help="Low-bit copies of every expert for the `ladder` policy (lossy rungs below the experts' own type). "
                   "auto: int4 when the experts are float32 or float16. int4 adds ~1/7 of float32's expert bytes on disk, "
                   "int2 ~1/11 (for the smallest budgets; lossier).")
@click.option("--ladder-block", type=click.Choice(["16", "32", "64", "128"]), default=None,
              help="Inputs per scale in the ladder's copies (default 32). Larger: fewer bytes a copy, and a level-4 "
                   "session holds less (switch-base int4: 4.17 MB at 32, 2.85 MB at 128); quality measured in "
                   "docs/results/device_box_lowbit/.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Compare the split model with PyTorch before installing it: every block on PyTorch's own inputs, "
                   "token by token within a float32 rounding bound, and the logits end to end.")
@click.option("--force", is_flag=True,
              help="Replace an old artifact at -o even when it holds files its manifest does not list (a profile.json, "
                   "notes); they are deleted, and named. Without it such an artifact is left as it is.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def export_cmd(model_dir: str, output: str, dtype: str, block_size: str | None, lm_head: str | None, accuracy_level: str | None,
               expert_dtype: str | None, expert_accuracy_level: str | None,
               ladder_: str, ladder_block: str | None, validate: bool, force: bool, quiet: bool) -> None:
    """Split a Hugging Face MoE checkpoint (Switch Transformers; Mixtral, Qwen-MoE, OLMoE) into an ONNX artifact.

    Reads only files inside MODEL_DIR (a symlink that leads out is refused; a Hugging Face
    hub cache snapshot may point into its own blobs folder). Checks first that the output's
    filesystem has room for the artifact as written (output types and ladder copies
    included). An old artifact at -o is replaced only if it holds nothing but its own
    files (see --force); any other non-empty folder is never replaced.
    """
    rungs = None if ladder_ == "auto" else () if ladder_ == "none" else tuple(ladder_.split(","))
    try:
        export_checkpoint(model_dir, output, dtype=dtype, expert_dtype=expert_dtype, validate=validate, quiet=quiet,
                          ladder_rungs=rungs, force=force, block_size=None if block_size is None else int(block_size),
                          accuracy_level=None if accuracy_level is None else int(accuracy_level), lm_head=lm_head,
                          expert_accuracy_level=None if expert_accuracy_level is None else int(expert_accuracy_level),
                          ladder_block=None if ladder_block is None else int(ladder_block))
    except SwapMoEError as e:
        fail(e)


@click.command("info")
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256 (reads the whole artifact).")
def info_cmd(artifact: str, as_json: bool, verify: bool) -> None:
    """Layers, experts and bytes of an artifact."""
    try:
        summary = load_manifest(artifact, verify=verify).summary()
    except SwapMoEError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(summary))
        return
    gib = 2**30
    nb = summary["dense_nbits"]
    head = f", LM head int{nb['lm_head_bits']}" if nb and nb.get("lm_head_bits", nb["bits"]) != nb["bits"] else ""
    dense = (f"dense {summary['dense_dtype']} MatMulNBits (block {nb['block_size']}{head}, accuracy level {nb['accuracy_level']}, lossy), "
             f"the rest {summary['dtype']}") if nb else summary["dtype"]
    en = summary.get("expert_nbits")
    experts = f"{summary['expert_dtype']} MatMulNBits (accuracy level {en['accuracy_level']})" if en else summary["expert_dtype"]
    click.echo(f"artifact        {summary['artifact']}  (schema {summary['schema_version']}, {dense}, experts {experts}"
               f"{', lossy' if summary['expert_dtype_lossy'] else ''})")
    click.echo(f"model           d_model {summary['d_model']}, d_ff {summary['d_ff']}, heads {summary['num_heads']}, vocab {summary['vocab_size']}")
    stacks = (f"{summary['decoder_layers']}, decoder-only ({summary['architecture']})" if summary["family"] != "switch"
              else f"encoder {summary['encoder_layers']}, decoder {summary['decoder_layers']}")
    click.echo(f"layers          {stacks}; sparse: {', '.join(summary['sparse_layers'])}")
    routing = (f"top-{summary['top_k']} routing, no capacity" if summary["family"] != "switch"
               else f"top-1 routing, capacity {summary['expert_capacity']}")
    click.echo(f"experts         {summary['experts_per_layer']} per sparse layer, {summary['experts_total']} in all, {routing}")
    click.echo(f"dense bytes     {summary['dense_bytes']:,} ({summary['dense_bytes'] / gib:.3f} GiB)")
    click.echo("  by part       " + "; ".join(f"{part} {n:,}" for part, n in summary["dense_parts"].items()))
    click.echo(f"expert bytes    {summary['expert_bytes']:,} ({summary['expert_bytes'] / gib:.3f} GiB; {summary['bytes_per_expert']:,} each)")
    rungs = [f"{name} {r['bytes']:,} bytes ({r['share_of_expert_bytes']:.0%} of the experts', lossy)" for name, r in summary["ladder"].items()]
    click.echo(f"ladder          {'; '.join(rungs) or 'none (export again, or `swapmoe ladder add`, for the ladder policy)'}")
    click.echo(f"tokenizer       {summary['tokenizer'] or 'none'}")
    click.echo(f"validated       {'yes' if summary['validated'] else 'no'}")


@click.group("ladder")
def ladder_group() -> None:
    """The precision ladder: low-bit copies of every expert."""


@ladder_group.command("add")
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--rung", "rungs", multiple=True, type=click.Choice(["int2", "int4", "int8"]), default=("int4",), show_default=True,
              help="Rung to add (repeat for several).")
@click.option("--block", type=click.Choice(["16", "32", "64", "128"]), default=None,
              help="Inputs per scale in the copies (default 32). Larger: fewer bytes, and a level-4 session holds "
                   "less (switch-base int4: 4.17 MB at 32, 2.85 MB at 128).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def ladder_add_cmd(artifact: str, rungs: tuple[str, ...], block: str | None, quiet: bool) -> None:
    """Write low-bit copies of every expert into an artifact exported without them."""
    try:
        entries = add_rungs(artifact, tuple(rungs), quiet=quiet, block=None if block is None else int(block))
    except SwapMoEError as e:
        fail(e)
    except OSError as e:  # a read-only artifact, a full disk: the old manifest still stands
        fail(SwapMoEError(f"cannot write the ladder into {artifact}: {e}. The artifact is unchanged (its manifest "
                          "does not name the new files); free space or make it writable and run again."))
    if not quiet:
        click.echo(f"{artifact}: ladder rungs {', '.join(entries)}")
        if (Path(artifact) / PROFILE_NAME).is_file():  # priced by guesses until measured
            click.echo(f"measure what the rungs cost onto its profile: swapmoe profile {artifact} --data TEXTS --add rung-loss",
                       err=True)
