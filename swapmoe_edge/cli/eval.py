"""``swapmoe eval`` and ``swapmoe sweep``: thin shells over evaluate.evaluate and sweep.sweep."""

from __future__ import annotations

import json

import click

from swapmoe_edge.cli.common import COUNT, fail
from swapmoe_edge.cli.embedded import artifact_or_default
from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.lab.evaluate import evaluate, format_report, lead_baseline, require_eval_extra
from swapmoe_edge.lab.streams import ORDERS, parse_sections
from swapmoe_edge.lab.sweep import sweep
from swapmoe_edge.residency.policies import POLICIES

PLANNERS = ("importance", "uniform")


def deterministic_option(f):
    """--deterministic/--no-deterministic: swaps only at request boundaries (RuntimeConfig.deterministic)."""
    return click.option("--deterministic/--no-deterministic", default=None,
                        help="Swaps take effect only between requests, so outputs do not depend on the machine's "
                             "load (a memory-pressure shrink still acts at once; results say so). Default: the "
                             "policy's (on for swapmoe, off for ladder).")(f)


def stream_options(f):
    """--order, --sections, --exclude-sections, --profile: which documents, in what order, calibrated how."""
    for opt in reversed([
        click.option("--order", type=click.Choice(ORDERS), default="file", show_default=True,
                     help="Stream order: the file's, a fixed shuffle, or grouped by the documents' `section`."),
        click.option("--sections", default="", help="Serve only documents of these sections (comma-separated)."),
        click.option("--exclude-sections", default="", help="Leave out documents of these sections (comma-separated)."),
        click.option("--profile", "profile", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
                     help="Importance profile to use instead of the artifact's (see `swapmoe profile -o`)."),
    ]):
        f = opt(f)
    return f


def _split(values: tuple[str, ...], default: tuple[str, ...], allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """``--x a,b --x c`` -> ``(a, b, c)``; the default when none given."""
    out = tuple(v.strip() for raw in values for v in raw.split(",") if v.strip()) or default
    if allowed is not None:
        bad = [v for v in out if v not in allowed]
        if bad:
            raise click.BadParameter(f"{', '.join(bad)}: choose from {', '.join(allowed)}")
    return out


@click.command("eval")
@click.option("--artifact", type=click.Path(path_type=str), help="Artifact directory (default: the embedded model).")
@click.option("--data", required=True, type=click.Path(path_type=str), help="JSONL with `text` and `summary` fields.")
@click.option("--budget", default="auto", show_default=True, help="Whole-process bytes (4.7GiB), share of expert bytes (33%), or auto.")
@click.option("--policy", type=click.Choice(POLICIES), default="swapmoe", show_default=True)
@click.option("--planner", type=click.Choice(PLANNERS), default="importance", show_default=True)
@click.option("--limit", type=COUNT, default=None, help="Use the first N documents.")
@click.option("--max-new-tokens", type=COUNT, default=32, show_default=True)
@click.option("--num-beams", type=COUNT, default=None, help="Beam width (default: the model's generation config, 1 if it sets none).")
@click.option("--batch-size", type=COUNT, default=8, show_default=True, help="Documents generated together.")
@click.option("--threads", type=COUNT, default=None, help="ONNX Runtime threads (default: the device profile's).")
@deterministic_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with `lead_baseline`).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@stream_options
def eval_cmd(artifact, data, budget, policy, planner, limit, max_new_tokens, num_beams, batch_size, threads,
             deterministic, as_json, quiet, order, sections, exclude_sections, profile) -> None:
    """ROUGE of a policy at a budget on DATA, the lead-8 baseline, and fidelity to the full policy."""
    try:
        require_eval_extra()  # before the embedded model's first export or any generation
        res = evaluate(artifact_or_default(artifact), data, policy, budget, planner, limit=limit,
                       max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size, quiet=quiet,
                       order=order, sections=parse_sections(sections), exclude_sections=parse_sections(exclude_sections),
                       profile=profile, threads=threads, config={"deterministic": deterministic})
        base = lead_baseline(data, limit=limit, sections=parse_sections(sections),
                             exclude_sections=parse_sections(exclude_sections))
    except SwapMoEError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps({**res, "lead_baseline": base}))
    else:
        click.echo(format_report(res, base))


@click.command("sweep")
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str), help="JSONL with `text` and `summary` fields.")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=str), help="Output directory (resumable).")
@click.option("--budgets", multiple=True, help="Comma-separated or repeated  [default: 100%,75%,50%,33%,25%]")
@click.option("--policies", multiple=True, help="Comma-separated or repeated  [default: full,on-demand,prune,swapmoe]")
@click.option("--planners", multiple=True, help="Comma-separated or repeated  [default: importance,uniform]")
@click.option("--limit", type=COUNT, default=500, show_default=True, help="Use the first N documents.")
@click.option("--max-new-tokens", type=COUNT, default=32, show_default=True)
@click.option("--num-beams", type=COUNT, default=None, help="Beam width (default: the model's generation config, 1 if it sets none).")
@click.option("--batch-size", type=COUNT, default=8, show_default=True)
@click.option("--threads", type=COUNT, default=None, help="ONNX Runtime threads per cell.")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop a cell that runs longer than this (it is reported as failed; the others go on).")
@click.option("--no-plots", is_flag=True, help="Write the CSV and JSON only (no matplotlib needed).")
@deterministic_option
@click.option("--quiet", is_flag=True, help="No progress output.")
@stream_options
def sweep_cmd(artifact, data, out, budgets, policies, planners, limit, max_new_tokens, num_beams, batch_size, threads,
              timeout_s, no_plots, deterministic, quiet, order, sections, exclude_sections, profile) -> None:
    """Every policy x budget x planner on DATA, each in its own process: CSV, JSON and plots in OUT."""
    budgets = _split(budgets, ("100%", "75%", "50%", "33%", "25%"))
    policies = _split(policies, ("full", "on-demand", "prune", "swapmoe"), POLICIES)
    planners = _split(planners, PLANNERS, PLANNERS)
    try:
        res = sweep(artifact, data, out, budgets=budgets, policies=policies, planners=planners, limit=limit,
                    max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size, threads=threads,
                    timeout_s=timeout_s, plots=not no_plots, quiet=quiet, order=order, sections=parse_sections(sections),
                    exclude_sections=parse_sections(exclude_sections), profile=profile, deterministic=deterministic)
    except SwapMoEError as e:
        fail(e)
    if res["failed"]:
        click.echo(f"error: {len(res['failed'])} cell(s) failed: {', '.join(f['cell'] for f in res['failed'])}; "
                   "run the same command again to retry them.", err=True)
        raise SystemExit(1)
