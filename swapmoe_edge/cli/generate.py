"""``swapmoe generate``: continue prompts inside a memory budget, streaming the tokens."""

from __future__ import annotations

import json

import click

from swapmoe_edge.cli.common import fail
from swapmoe_edge.cli.serve import open_runtime, read_inputs, serving_options, stats_line
from swapmoe_edge.core.errors import SwapMoEError


class _Stream:
    """Writes one prompt's greedy tokens to stdout as they come: the text decoded so far, less
    what is already out (a piece may complete a character only with the next one)."""

    def __init__(self, rt):
        self.rt, self.ids, self.shown = rt, [], ""

    def __call__(self, first_row: int, step) -> None:
        self.ids.append(int(step.tokens[0]))  # the end and the padding after it decode to nothing
        text = self.rt.decode(self.ids)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            click.echo(text[len(self.shown):], nl=False)
            self.shown = text

    def finish(self, text: str) -> None:
        """The rest of the final text (what a later piece changed is not taken back), then a newline."""
        click.echo(text[len(self.shown):] if text.startswith(self.shown) else "", nl=True)


def _why_empty(rt, empty: int, total: int) -> str:
    """One line for outputs that came back empty: the model ended the text at once."""
    line = f"note: {empty} of {total} outputs are empty: the model's first token ended the text."
    template = rt.prompt_template if rt.decoder_only else None
    if template:  # a summariser continues only prompts of the form it was trained on
        line += (f" This model was trained on prompts of the form {template!r}: `swapmoe summarize` writes them, "
                 "or end your prompt that way.")
    return line


@click.command("generate")
@click.argument("texts", nargs=-1)
@serving_options
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per prompt, once it is done: text, token_ids (the generated ids, without the "
                   "prompt), exact, stats.")
def generate_cmd(texts, artifact, model, file, budget, policy, planner, absent, num_beams, max_new_tokens, batch_size, device,
                 cold_start, deterministic, quiet, as_json) -> None:
    """Continue TEXT arguments or the lines of --file inside a memory budget, streaming tokens to stdout.

    A decoder-only model continues each prompt as the tokenizer makes it (no template; a prompt
    longer than the model's limit keeps its last tokens). An encoder-decoder model (Switch) reads
    each prompt as its encoder input, as `summarize` does. Greedy output streams one prompt at a
    time; with --num-beams above 1 or --json each output is written when its batch is done
    (--batch-size prompts together). Statistics go to stderr as `summarize` writes them.
    """
    try:
        prompts = read_inputs(texts, file, what="continue")
        with open_runtime(artifact, model, quiet, policy=policy, budget=budget, planner=planner, absent=absent,
                          device=device, cold_start=cold_start, deterministic=deterministic) as rt:
            stream = (num_beams or rt.default_num_beams) == 1 and not as_json
            size = 1 if stream else batch_size
            empty = 0
            for i in range(0, len(prompts), size):
                out = _Stream(rt) if stream else None
                for r in rt.generate_texts(prompts[i: i + size], max_new_tokens=max_new_tokens, num_beams=num_beams,
                                           on_step=out):
                    empty += not r.summary.strip()
                    if as_json:
                        click.echo(json.dumps({"text": r.summary, "token_ids": r.token_ids, "exact": r.exact,
                                               "stats": r.stats}))
                        continue
                    if out is not None:
                        out.finish(r.summary)
                    else:
                        click.echo(r.summary)
                    if not quiet:
                        click.echo(stats_line(r.stats, r.exact), err=True)
            if empty:
                click.echo(_why_empty(rt, empty, len(prompts)), err=True)
    except SwapMoEError as e:
        fail(e)
