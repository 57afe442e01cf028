"""``swapmoe trace record`` and ``swapmoe trace replay``: thin shells over trace.py and replay.py."""

from __future__ import annotations

import json
import sys

import click

from swapmoe_edge.cli.common import COUNT, POSITIVE, fail
from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.core.units import parse_size
from swapmoe_edge.lab.replay import BOUNDS, POLICIES, ReplayConfig, replay
from swapmoe_edge.lab.streams import ORDERS, parse_sections, read_stream
from swapmoe_edge.lab.trace import load_trace, record_trace
from swapmoe_edge.residency.importance import Profile


@click.group("trace")
def trace_group() -> None:
    """Record routing traces and replay residency policies on them (no model run)."""


@trace_group.command("record")
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str), help="Documents: one per line, or JSONL with `text`.")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=str), help="Trace file to write (.npz).")
@click.option("--limit", type=COUNT, default=None, help="Use the first N documents (after --sections).")
@click.option("--order", type=click.Choice(ORDERS), default="file", show_default=True, help="Stream order (see `swapmoe eval`).")
@click.option("--sections", default="", help="Only documents of these sections (comma-separated).")
@click.option("--exclude-sections", default="", help="Leave out documents of these sections.")
@click.option("--max-new-tokens", type=COUNT, default=32, show_default=True)
@click.option("--batch-size", type=COUNT, default=8, show_default=True)
@click.option("--threads", type=COUNT, default=1, show_default=True)
@click.option("--quiet", is_flag=True)
def record_cmd(artifact, data, out, limit, order, sections, exclude_sections, max_new_tokens, batch_size, threads, quiet) -> None:
    """Run ARTIFACT (policy full, greedy) over DATA and write every sparse layer's routing."""
    try:
        docs = read_stream(data, limit, order, parse_sections(sections), parse_sections(exclude_sections))
        t = record_trace(artifact, docs, out, max_new_tokens=max_new_tokens, batch_size=batch_size, threads=threads,
                         meta={"data": str(data), "order": order, "sections": list(parse_sections(sections)),
                               "exclude_sections": list(parse_sections(exclude_sections))}, quiet=quiet)
    except SwapMoEError as e:
        fail(e)
    click.echo(f"wrote {out}: {len(t.doc_id)} documents, {t.num_requests} requests, {t.ev_layer.size} layer calls, "
               f"{t.probs.shape[0]} tokens", err=True)


@trace_group.command("replay")
@click.argument("trace", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--budget", "budgets", multiple=True, help="Share of the expert bytes (50%) or bytes of experts; repeat or comma-separate  [default: 50%,33%,25%]")
@click.option("--policies", default=",".join(POLICIES),
              show_default=True, help="Comma-separated.")
@click.option("--flash-mbps", type=POSITIVE, default=250.0, show_default=True, help="Expert read speed, MB/s.")
@click.option("--token-ms", type=click.FloatRange(min=0), default=None, help="Decoder step time (default: measured while recording).")
@click.option("--encoder-ms", type=click.FloatRange(min=0), default=None, help="Encoder pass time (default: measured TTFT).")
@click.option("--expert-bytes", default=None, help="Price every expert at this size (e.g. 18MiB for switch-base's).")
@click.option("--profile", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Importance profile (default: the one the artifact had when recording).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per budget.")
def replay_cmd(trace, budgets, policies, flash_mbps, token_ms, encoder_ms, expert_bytes, profile, as_json) -> None:
    """Simulate residency policies on TRACE: first-choice hit rates, bytes read, stall; beside the optima."""
    budgets = tuple(b.strip() for raw in budgets for b in raw.split(",") if b.strip()) or ("50%", "33%", "25%")
    try:
        t = load_trace(trace)
        prof = Profile.load(profile) if profile else None
        size = parse_size(expert_bytes) if expert_bytes else None
        for budget in budgets:
            cfg = ReplayConfig(budget=budget, flash_mbps=flash_mbps, token_ms=token_ms, encoder_ms=encoder_ms,
                               expert_bytes=size)
            results = replay(t, [p.strip() for p in policies.split(",") if p.strip()], cfg, prof)
            if as_json:
                click.echo(json.dumps({"trace": trace, "budget": budget, "flash_mbps": flash_mbps,
                                       "results": [r.to_json() for r in results]}))
                continue
            each = f" ({t.top_k} choices each: hit rates count choices)" if t.top_k > 1 else ""
            click.echo(f"{trace}: budget {budget}, {t.probs.shape[0]} tokens{each}, flash {flash_mbps:g} MB/s")
            click.echo(f"  {'policy':11s} {'semantics':9s} {'hit':>6s} {'enc':>6s} {'dec':>6s} {'experts':>7s} "
                       f"{'MB read':>9s} {'stall s':>8s} {'swaps':>6s}")
            for r in results:
                j = r.to_json()
                tag = "  (bound)" if r.policy in BOUNDS else ""
                rate = lambda x, n: f"{x:6.3f}" if n else f"{'-':>6s}"  # noqa: E731  (a stack with no tokens)
                click.echo(f"  {r.policy:11s} {r.semantics:9s} {j['hit_rate']:6.3f} {rate(j['encoder_hit_rate'], r.enc_tokens)} "
                           f"{rate(j['decoder_hit_rate'], r.dec_tokens)} {j['resident_experts']:7d} {r.bytes_read / 1e6:9.1f} "
                           f"{r.stall_s:8.2f} {r.swaps:6d}{tag}")
    except SwapMoEError as e:
        fail(e)
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
