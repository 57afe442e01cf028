"""``swapmoe summarize``: serve documents inside a memory budget (the Runtime does the work);
the options and output that ``swapmoe generate`` shares with it."""

from __future__ import annotations

import json

import click

from swapmoe_edge.cli.common import COUNT, fail
from swapmoe_edge.cli.embedded import artifact_or_default
from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.core.progress import DocumentProgress, stderr_is_terminal
from swapmoe_edge.core.textio import read_documents
from swapmoe_edge.core.units import format_size
from swapmoe_edge.runtime.embedded import EMBEDDED_NAME, shipped_models
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def read_inputs(texts: tuple[str, ...], file: str | None, what: str = "summarise") -> list[str]:
    if file and texts:
        raise click.UsageError("give TEXT arguments or --file, not both")
    if file:
        return [d["text"] for d in read_documents(file)]
    if not texts:
        raise click.UsageError(f"nothing to {what}: give TEXT arguments or --file F")
    return list(texts)


def _source(source: str) -> str:
    """Which limit set the budget, in the stats line's words."""
    return {"cap": "your cap", "machine": "free memory"}.get(source, source)


def stats_line(st: dict, exact: bool) -> str:
    line = (f"[{st['policy']}, {'exact' if exact else 'approximate'}] budget {format_size(st['budget_bytes'])} "
            f"({_source(st['budget_source'])}), "
            f"peak RSS {format_size(st['peak_rss_bytes'])}, residents {sum(st['residents'].values())}, "
            f"ttft {st['ttft_ms']:.0f} ms, decode {st['decode_ms_per_token']:.1f} ms/token, "
            f"read {format_size(st['bytes_read'])}, swaps {st['swaps']}, stall {st['stall_ms']:.0f} ms, "
            f"first choice resident {st['first_choice_resident']:.0%}")
    if st["policy"] == "ladder":
        line += f", residents by precision {st['residents_by_rung']}, low-bit tokens {st['low_precision_tokens']}"
    if st.get("unavailable_files"):  # a read failed its sha256 or I/O: tokens went to the layer's other experts
        held = [f"{name} without its {'/'.join(bad)} copy" for name, bad in (st.get("degraded_experts") or {}).items()]
        gone = [f"unavailable {' '.join(st['unavailable_experts'])}"] if st["unavailable_experts"] else []
        line += (f", {'; '.join(gone + held)} ({' '.join(st['unavailable_files'])} failed "
                 "its check: export the model again or restore the file)")
    # whether the same inputs give this output again under any load, and if not, why
    line += ", deterministic" if st.get("deterministic") else f", not deterministic ({'; '.join(st.get('nondeterminism') or ['?'])})"
    return line


def serving_options(fn):
    """The options that ``summarize`` and ``generate`` share: where the model comes from, the
    budget and policy, decoding, and output."""
    options = [
        click.option("--artifact", type=click.Path(path_type=str), help="Artifact directory (default: a shipped model, see --model)."),
        click.option("--model", "model", default=None,
                     help=f"A shipped model, exported into the cache on first use: {', '.join(shipped_models())} "
                          f"(default {EMBEDDED_NAME}). Not with --artifact."),
        click.option("--file", "file", type=click.Path(path_type=str), help="One document per line, or JSONL with a `text` field."),
        click.option("--budget", default="auto", show_default=True, help="Whole-process bytes (4.7GiB), share of expert bytes (33%), or auto."),
        click.option("--policy", type=click.Choice(["full", "on-demand", "prune", "swapmoe", "ladder"]), default="swapmoe",
                     show_default=True,
                     help="ladder: every expert resident at one of its precisions (its own, or a low-bit copy: int8, "
                          "int4, int2) by importance (lossy; needs an artifact with a ladder)."),
        click.option("--planner", type=click.Choice(["importance", "uniform"]), default="importance", show_default=True),
        click.option("--absent", type=click.Choice(["substitute", "drop"]), default="substitute", show_default=True,
                     help="Top-k models under a lossy policy: a token's choice whose expert is not resident goes to the "
                          "best resident expert it did not choose (substitute), or is dropped and the others' weights "
                          "renormalised (drop)."),
        click.option("--num-beams", type=COUNT, default=None,
                     help="Beam width (default: the model's generation config, 1 if it sets none)."),
        click.option("--max-new-tokens", type=COUNT, default=32, show_default=True),
        click.option("--batch-size", type=COUNT, default=8, show_default=True, help="Inputs generated together."),
        click.option("--device", default=None, help="Device profile name or .json path (default: detected; see `swapmoe devices`)."),
        click.option("--cold-start", type=click.Choice(["blocking", "background"]), default="blocking", show_default=True,
                     help="background: serve once the dense part and one expert per layer are in, fill the rest meanwhile "
                          "(faster first token on slow flash; lossy policies then route early tokens to fewer experts)."),
        click.option("--deterministic/--no-deterministic", default=None,
                     help="Swaps take effect only between requests, so the same inputs and --batch-size give the same "
                          "outputs under any load (a memory-pressure shrink still acts at once; the stats say so). "
                          "Default: on for swapmoe (unless --cold-start background), off for ladder."),
        click.option("--quiet", is_flag=True, help="No progress or per-input statistics on stderr."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def open_runtime(artifact: str | None, model: str | None, quiet: bool, **config) -> Runtime:
    """The Runtime of ``--artifact`` or ``--model`` (a shipped model, exported on first use)."""
    return Runtime(artifact_or_default(artifact, quiet, model=model), RuntimeConfig(baseline_cache=True, **config))


@click.command("summarize")
@click.argument("texts", nargs=-1)
@serving_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input: summary, token_ids, exact, stats.")
def summarize_cmd(texts, artifact, model, file, budget, policy, planner, absent, num_beams, max_new_tokens, batch_size, device,
                  cold_start, deterministic, quiet, as_json) -> None:
    """Summarise TEXT arguments or the documents of --file inside a memory budget.

    A decoder-only model reads each document through the prompt template its artifact records
    (exported from the checkpoint's swapmoe.json); one without a template is refused.
    """
    try:
        docs = read_inputs(texts, file)
        with open_runtime(artifact, model, quiet, policy=policy, budget=budget, planner=planner, absent=absent,
                          device=device, cold_start=cold_start, deterministic=deterministic) as rt:
            # Progress for --file on a terminal only: piped stderr stays machine-readable.
            progress = DocumentProgress(len(docs), enabled=bool(file) and not quiet and stderr_is_terminal())
            for i in range(0, len(docs), batch_size):
                for r in rt.summarize(docs[i: i + batch_size], max_new_tokens=max_new_tokens, num_beams=num_beams):
                    if as_json:
                        click.echo(json.dumps(r.to_json()))
                    else:
                        click.echo(r.summary)
                        if not quiet:
                            click.echo(stats_line(r.stats, r.exact), err=True)
                progress.update(min(i + batch_size, len(docs)))
    except SwapMoEError as e:
        fail(e)
