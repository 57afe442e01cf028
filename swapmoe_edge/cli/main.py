"""The ``swapmoe`` command line: each verb is a thin shell over one library function."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import click

from swapmoe_edge.cli.common import artifact_or_default as _artifact_or_default
from swapmoe_edge.cli.common import fail as _fail
from swapmoe_edge.core.errors import SwapMoEError


class _Main(click.Group):
    """The verbs' group: a file-system error (a path that is a file, not a folder; no permission;
    disk full) anywhere below ends in one error line, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as e:
            _fail(SwapMoEError(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)))


@click.group(cls=_Main)
@click.version_option(package_name="swapmoe-edge")
def main() -> None:
    """Serve Switch Transformer MoE models inside a memory budget (SwapMoE)."""


@main.command("export")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=str), help="Artifact directory to write.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True, help="Storage type of the weights.")
@click.option("--expert-dtype", type=click.Choice(["float32", "float16", "int8", "int4"]), default=None,
              help="Storage type of the experts (default: --dtype). float16: lossy, 1/2 the bytes. int8: weight-only, "
                   "per-column scales: lossy, 1/4 the bytes. int4: weight-only, a float16 scale per 32 input rows: "
                   "lossy (more than int8), 1/7 the bytes; needs d_model and d_ff multiples of 32.")
@click.option("--ladder", "ladder_", type=click.Choice(["auto", "int4", "int8", "int4,int8", "none"]), default="auto", show_default=True,
              help="Low-bit copies of every expert for the `ladder` policy (lossy rungs below the experts' own type). "
                   "auto: int4 when the experts are float32 or float16. int4 adds ~1/7 of float32's expert bytes on disk.")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Compare the split model with PyTorch before installing it.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def export_cmd(model_dir: str, output: str, dtype: str, expert_dtype: str | None, ladder_: str, validate: bool, quiet: bool) -> None:
    """Split a Hugging Face Switch Transformer checkpoint into an ONNX artifact."""
    try:
        from swapmoe_export import export_checkpoint
    except ImportError as e:
        _fail(SwapMoEError(f"the exporter cannot be imported ({e}); reinstall swapmoe-edge."))
    try:
        rungs = None if ladder_ == "auto" else () if ladder_ == "none" else tuple(ladder_.split(","))
        export_checkpoint(model_dir, output, dtype=dtype, expert_dtype=expert_dtype, validate=validate, quiet=quiet,
                          ladder_rungs=rungs)
    except SwapMoEError as e:
        _fail(e)


@main.command("info")
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256 (reads the whole artifact).")
def info_cmd(artifact: str, as_json: bool, verify: bool) -> None:
    """Layers, experts and bytes of an artifact."""
    from swapmoe_edge.artifact.manifest import load_manifest

    try:
        summary = load_manifest(artifact, verify=verify).summary()
    except SwapMoEError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(summary))
        return
    gib = 2**30
    click.echo(f"artifact        {summary['artifact']}  (schema {summary['schema_version']}, {summary['dtype']}, experts {summary['expert_dtype']}"
               f"{', lossy' if summary['expert_dtype_lossy'] else ''})")
    click.echo(f"model           d_model {summary['d_model']}, d_ff {summary['d_ff']}, heads {summary['num_heads']}, vocab {summary['vocab_size']}")
    click.echo(f"layers          encoder {summary['encoder_layers']}, decoder {summary['decoder_layers']}; sparse: {', '.join(summary['sparse_layers'])}")
    click.echo(f"experts         {summary['experts_per_layer']} per sparse layer, {summary['experts_total']} in all, capacity {summary['expert_capacity']}")
    click.echo(f"dense bytes     {summary['dense_bytes']:,} ({summary['dense_bytes'] / gib:.3f} GiB)")
    click.echo(f"expert bytes    {summary['expert_bytes']:,} ({summary['expert_bytes'] / gib:.3f} GiB; {summary['bytes_per_expert']:,} each)")
    rungs = [f"{name} {r['bytes']:,} bytes ({r['share_of_expert_bytes']:.0%} of the experts', lossy)" for name, r in summary["ladder"].items()]
    click.echo(f"ladder          {'; '.join(rungs) or 'none (export again, or `swapmoe ladder add`, for the ladder policy)'}")
    click.echo(f"tokenizer       {summary['tokenizer'] or 'none'}")
    click.echo(f"validated       {'yes' if summary['validated'] else 'no'}")


@main.group("data")
def data_group() -> None:
    """Build datasets."""


@data_group.command("debian")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Directory for train/validation/test.jsonl.")
@click.option("--lists-dir", default="/var/lib/apt/lists", show_default=True, help="Where apt keeps *_Translation-en files.")
def data_debian_cmd(output: str, lists_dir: str) -> None:
    """Debian package descriptions -> (document, synopsis) pairs, split by source package."""
    from swapmoe_edge.lab.corpus import build_debian_corpus

    try:
        counts = build_debian_corpus(output, lists_dir)
    except SwapMoEError as e:
        _fail(e)
    click.echo(json.dumps(counts))


def _read_inputs(texts: tuple[str, ...], file: str | None) -> list[str]:
    from swapmoe_edge.core.textio import read_documents

    if file and texts:
        raise click.UsageError("give TEXT arguments or --file, not both")
    if file:
        return [d["text"] for d in read_documents(file)]
    if not texts:
        raise click.UsageError("nothing to summarise: give TEXT arguments or --file F")
    return list(texts)


def _source(source: str) -> str:
    """Which limit set the budget, in the stats line's words."""
    return {"cap": "your cap", "machine": "free memory"}.get(source, source)


@main.command("summarize")
@click.argument("texts", nargs=-1)
@click.option("--artifact", type=click.Path(path_type=str), help="Artifact directory (default: the embedded model).")
@click.option("--file", "file", type=click.Path(path_type=str), help="One document per line, or JSONL with a `text` field.")
@click.option("--budget", default="auto", show_default=True, help="Whole-process bytes (4.7GiB), share of expert bytes (33%), or auto.")
@click.option("--policy", type=click.Choice(["full", "on-demand", "prune", "swapmoe", "ladder"]), default="swapmoe", show_default=True,
              help="ladder: every expert resident at int4 or full precision by importance (lossy; needs an artifact with a ladder).")
@click.option("--planner", type=click.Choice(["importance", "uniform"]), default="importance", show_default=True)
@click.option("--num-beams", type=int, default=1, show_default=True)
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Documents generated together.")
@click.option("--device", default=None, help="Device profile name or .json path (default: detected; see `swapmoe devices`).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input: summary, token_ids, exact, stats.")
@click.option("--cold-start", type=click.Choice(["blocking", "background"]), default="blocking", show_default=True,
              help="background: serve once the dense part and one expert per layer are in, fill the rest meanwhile "
                   "(faster first token on slow flash; lossy policies then route early tokens to fewer experts).")
@click.option("--quiet", is_flag=True, help="No progress or per-document statistics on stderr.")
def summarize_cmd(texts, artifact, file, budget, policy, planner, num_beams, max_new_tokens, batch_size, device, as_json,
                  cold_start, quiet) -> None:
    """Summarise TEXT arguments or the documents of --file inside a memory budget."""
    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig
    from swapmoe_edge.core.units import format_size
    from swapmoe_edge.core.progress import DocumentProgress, stderr_is_terminal

    try:
        docs = _read_inputs(texts, file)
        config = RuntimeConfig(policy=policy, budget=budget, planner=planner, device=device, cold_start=cold_start,
                               baseline_cache=True)
        with Runtime(_artifact_or_default(artifact, quiet), config) as rt:
            # Progress for --file on a terminal only: piped stderr stays machine-readable.
            progress = DocumentProgress(len(docs), enabled=bool(file) and not quiet and stderr_is_terminal())
            for i in range(0, len(docs), batch_size):
                for r in rt.summarize(docs[i: i + batch_size], max_new_tokens=max_new_tokens, num_beams=num_beams):
                    if as_json:
                        click.echo(json.dumps(r.to_json()))
                        continue
                    click.echo(r.summary)
                    if quiet:
                        continue
                    st = r.stats
                    click.echo(
                        f"[{st['policy']}, {'exact' if r.exact else 'approximate'}] budget {format_size(st['budget_bytes'])} "
                        f"({_source(st['budget_source'])}), "
                        f"peak RSS {format_size(st['peak_rss_bytes'])}, residents {sum(st['residents'].values())}, "
                        f"ttft {st['ttft_ms']:.0f} ms, decode {st['decode_ms_per_token']:.1f} ms/token, "
                        f"read {format_size(st['bytes_read'])}, swaps {st['swaps']}, stall {st['stall_ms']:.0f} ms, "
                        f"first choice resident {st['first_choice_resident']:.0%}"
                        + (f", residents by precision {st['residents_by_rung']}, low-bit tokens {st['low_precision_tokens']}"
                           if st["policy"] == "ladder" else ""),
                        err=True,
                    )
                progress.update(min(i + batch_size, len(docs)))
    except SwapMoEError as e:
        _fail(e)


@main.command("profile")
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str), help="Calibration documents: one per line, or JSONL with `text`.")
@click.option("--limit", type=int, default=256, show_default=True, help="Use at most this many documents.")
@click.option("--budget", default="auto", show_default=True, help="Budget for the profiling run (exact, on-demand).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--device", default=None, help="Device profile name or .json path (default: detected).")
@click.option("--sections", default="", help="Calibrate on documents of these sections only (comma-separated; JSONL `section`).")
@click.option("--exclude-sections", default="", help="Leave out documents of these sections (comma-separated).")
@click.option("--measure-loss", is_flag=True,
              help="Also measure, per layer, what keeping k experts costs the output (teacher-forced KL against "
                   "full's summaries) and the best single substitute; swapmoe then splits the budget by it. "
                   "With a ladder in the artifact, also what each low-bit rung costs (the ladder's planner "
                   "prices its rungs by it). One extra pass over the texts per layer and candidate set or rung.")
@click.option("--predict-decoder", is_flag=True,
              help="Also fit the decoder predictor: which decoder experts a request will want, from its encoder "
                   "routing (swapmoe plans each request's decoder layers by it). One more pass over the texts, "
                   "a document at a time.")
@click.option("-o", "--out", "out", default=None, type=click.Path(path_type=str),
              help="Where to write the profile  [default: ARTIFACT/profile.json]")
def profile_cmd(artifact, data, limit, budget, max_new_tokens, device, sections, exclude_sections, measure_loss,
                predict_decoder, out) -> None:
    """Write the importance profile (SwapMoE Eq. 1) of ARTIFACT over calibration texts."""
    from swapmoe_edge.runtime.facade import PROFILE_NAME, Runtime, RuntimeConfig
    from swapmoe_edge.lab.streams import parse_sections, select_sections
    from swapmoe_edge.core.textio import read_documents

    try:
        chosen = select_sections(read_documents(data), parse_sections(sections), parse_sections(exclude_sections),
                                 where=str(data))
        docs = [d["text"] for d in chosen][:limit]
        with Runtime(artifact, RuntimeConfig(policy="on-demand", budget=budget, device=device)) as rt, \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prof = rt.profile_texts(docs, max_new_tokens=max_new_tokens)
            if measure_loss:
                from swapmoe_edge.lab.substitution import LOSS_NOTE, measure_loss as measure

                loss, substitute = measure(rt, docs, prof.importance, max_new_tokens=max_new_tokens)
                prof = replace(prof, loss=loss, substitute=substitute, meta={**prof.meta, "loss": LOSS_NOTE})
                if rt.manifest.ladder and rt.placement == "host":  # what each low-bit rung costs: the ladder's qualities
                    from swapmoe_edge.model.rungs import rung_runners
                    from swapmoe_edge.lab.substitution import RUNG_LOSS_NOTE, measure_rung_loss

                    runners = rung_runners(rt.manifest, replace(rt.config, ladder_rungs="auto"), rt.sessions,
                                           rt.threads, list(rt.providers), rt.placement)
                    rung_loss = measure_rung_loss(rt, docs, runners, max_new_tokens=max_new_tokens)
                    prof = replace(prof, rung_loss=rung_loss, meta={**prof.meta, "rung_loss": RUNG_LOSS_NOTE})
            if predict_decoder:
                from swapmoe_edge.residency.predictor import PREDICTOR_NOTE, fit, per_document_importance

                seen = per_document_importance(rt, docs, max_new_tokens)
                prof = replace(prof, predictor=fit(seen), meta={**prof.meta, "predictor": PREDICTOR_NOTE})
        cut = [w for w in caught if "tokens; truncated" in str(w.message)]
        for w in caught:
            if w not in cut:
                click.echo(f"warning: {w.message}", err=True)
        if cut:  # one line instead of one warning per long document
            click.echo(f"{len(cut)} of {len(docs)} documents were truncated to the model's input limit", err=True)
        if sections or exclude_sections:
            prof = replace(prof, meta={**prof.meta, "sections": list(parse_sections(sections)),
                                       "exclude_sections": list(parse_sections(exclude_sections))})
        path = prof.save(Path(out) if out else Path(artifact) / PROFILE_NAME)
        click.echo(f"wrote {path} ({len(docs)} documents)", err=True)
    except SwapMoEError as e:
        _fail(e)


from swapmoe_edge.cli.eval import eval_cmd, sweep_cmd  # noqa: E402

main.add_command(eval_cmd)
main.add_command(sweep_cmd)

from swapmoe_edge.cli.devices import devices_cmd  # noqa: E402

main.add_command(devices_cmd)

from swapmoe_edge.cli.trace import trace_group  # noqa: E402

main.add_command(trace_group)

@main.group("ladder")
def ladder_group() -> None:
    """The precision ladder: low-bit copies of every expert."""


@ladder_group.command("add")
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--rung", "rungs", multiple=True, type=click.Choice(["int4", "int8"]), default=("int4",), show_default=True,
              help="Rung to add (repeat for several).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def ladder_add_cmd(artifact: str, rungs: tuple[str, ...], quiet: bool) -> None:
    """Write low-bit copies of every expert into an artifact exported without them."""
    from swapmoe_export.add_rungs import add_rungs

    try:
        entries = add_rungs(artifact, tuple(rungs), quiet=quiet)
    except SwapMoEError as e:
        _fail(e)
    except OSError as e:  # a read-only artifact, a full disk: the old manifest still stands
        _fail(SwapMoEError(f"cannot write the ladder into {artifact}: {e}. The artifact is unchanged (its manifest "
                           "does not name the new files); free space or make it writable and run again."))
    if not quiet:
        click.echo(f"{artifact}: ladder rungs {', '.join(entries)}")


from swapmoe_edge.cli.bench import bench_group  # noqa: E402

main.add_command(bench_group)
