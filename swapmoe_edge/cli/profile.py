"""``swapmoe profile``: write an artifact's importance profile (calibrate.py does the work)."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from swapmoe_edge.cli.common import COUNT, fail
from swapmoe_edge.core.errors import InputError, SwapMoEError
from swapmoe_edge.lab.calibrate import PARTS, calibrate
from swapmoe_edge.lab.streams import parse_sections
from swapmoe_edge.residency.importance import Profile


@click.command("profile")
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str), help="Calibration documents: one per line, or JSONL with `text`.")
@click.option("--limit", type=COUNT, default=256, show_default=True, help="Use at most this many documents.")
@click.option("--budget", default="auto", show_default=True, help="Budget for the profiling run (exact, on-demand).")
@click.option("--max-new-tokens", type=COUNT, default=32, show_default=True)
@click.option("--device", default=None, help="Device profile name or .json path (default: detected).")
@click.option("--threads", type=COUNT, default=None, help="ONNX Runtime threads (default: the device profile's).")
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
@click.option("--add", "add", multiple=True, type=click.Choice(PARTS),
              help="Keep the profile at --out (its importance and all else it holds) and measure only this onto it, "
                   "over --data: loss (the layers' loss curves), rung-loss (each ladder rung's cost, e.g. after "
                   "`swapmoe ladder add`), predictor. Repeat for more than one.")
@click.option("-o", "--out", "out", default=None, type=click.Path(path_type=str),
              help="Where to write the profile  [default: ARTIFACT/profile.json]")
def profile_cmd(artifact, data, limit, budget, max_new_tokens, device, threads, sections, exclude_sections, measure_loss,
                predict_decoder, add, out) -> None:
    """Write the importance profile of ARTIFACT over calibration texts (SwapMoE's equation 1)."""
    try:
        onto = None
        if add:
            if measure_loss or predict_decoder:
                raise InputError("--add measures parts onto an existing profile; name them there (--add loss "
                                 "--add rung-loss, --add predictor) instead of --measure-loss or --predict-decoder.")
            onto = Profile.load(Path(out) if out else Path(artifact))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prof = calibrate(artifact, data, limit=limit, sections=parse_sections(sections),
                             exclude_sections=parse_sections(exclude_sections), budget=budget, device=device,
                             max_new_tokens=max_new_tokens, with_loss=measure_loss, with_predictor=predict_decoder,
                             threads=threads, onto=onto, parts=add)
        texts = prof.meta["texts"]
        cut = [w for w in caught if "tokens; truncated" in str(w.message)]
        for w in caught:
            if w not in cut:
                click.echo(f"warning: {w.message}", err=True)
        if cut:  # one line instead of one warning per long document
            click.echo(f"{len(cut)} of {texts} documents were truncated to the model's input limit", err=True)
        path = prof.save(Path(out) if out else Path(artifact))  # a folder: its profile.json
        click.echo(f"wrote {path} ({texts} documents" + (f"; {', '.join(add)} measured now over {prof.meta['added'][-1]['texts']})"
                                                          if add else ")"), err=True)
    except SwapMoEError as e:
        fail(e)
