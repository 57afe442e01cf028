"""``swapmoe devices``: the shipped device profiles, this machine's marked with ``*``."""

from __future__ import annotations

import json
import sys

import click

from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.system.devices import list_profiles, match_profile, read_facts, select_providers


def _gib(n: int | None) -> str:
    return "host" if n is None else f"{n / 2**30:.1f} GiB"


@click.command("devices")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: profiles, detected, providers.")
def devices_cmd(as_json: bool) -> None:
    """List device profiles; mark the one detected here and say which providers it gets."""
    try:
        profiles = list_profiles()
        facts = read_facts()
        here = match_profile(facts, profiles)
        providers, messages = select_providers(here)
    except SwapMoEError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps({
            "detected": here.name,
            "facts": {"model": facts.model or None, "l4t": facts.l4t_version or facts.tegra_release,
                      "machine": facts.machine, "total_memory": facts.total_memory,
                      "nvidia_driver": facts.nvidia_driver},
            "providers": providers,
            "messages": messages,
            "profiles": [p.to_json() for p in profiles],
        }))
        return
    rows = [("", "name", "memory", "unified", "reserve", "flash MB/s", "experts", "dense", "providers")]
    for p in profiles:
        rows.append(("*" if p is here else "", p.name, _gib(p.memory_bytes), "yes" if p.unified_memory else "no",
                     _gib(p.reserve_bytes), f"{p.flash_read_mb_s:g}", p.expert_dtype, p.dense_dtype,
                     ", ".join(q.removesuffix("ExecutionProvider") for q in p.providers)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    seen = ", ".join(x for x in (
        f"device-tree '{facts.model}'" if facts.model else "no device-tree model",
        f"L4T {facts.l4t_version or facts.tegra_release or '(unreadable)'}" if facts.tegra_release is not None else "",
        facts.machine, f"{facts.total_memory / 2**30:.1f} GiB",
        "NVIDIA driver" if facts.nvidia_driver else "") if x)
    click.echo(f"\ndetected here: {here.name} ({seen}); to use another, give its name (or a profile .json path) as the device")
    click.echo(f"  providers here: {', '.join(providers)}")
    click.echo(f"  dense weights for this board: {here.dense_dtype} (swapmoe export --dtype {here.dense_dtype})"
               + (f": {here.dense_dtype_why}" if here.dense_dtype_why else ""))
    for msg in messages:
        click.echo(f"  warning: {msg}")
