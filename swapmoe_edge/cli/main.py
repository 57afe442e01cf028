"""The ``swapmoe`` command line: the group and its verbs, each a thin module over one library function.

A verb's module is imported when the verb runs, so that ``swapmoe --help`` (and a verb that
needs neither) does not pay for ONNX Runtime or the exporter; the listing below carries each
verb's one-line help for that reason (tests/test_cli.py checks it against the verbs' own).
"""

from __future__ import annotations

import importlib

import click

from swapmoe_edge.cli.common import fail
from swapmoe_edge.core.errors import SwapMoEError

# verb -> (module, command, the first paragraph of its help)
VERBS: dict[str, tuple[str, str, str]] = {
    "bench": ("swapmoe_edge.cli.bench", "bench_group",
              "Measure where the model does not fit: a cgroup box with the page cache counted and flash at device speed."),
    "data": ("swapmoe_edge.cli.data", "data_group", "Build datasets."),
    "devices": ("swapmoe_edge.cli.devices", "devices_cmd",
                "List device profiles; mark the one detected here and say which providers it gets."),
    "embedded": ("swapmoe_edge.cli.embedded", "embedded_cmd",
                 "Print the path of the embedded model's artifact, exporting it into the cache if needed."),
    "eval": ("swapmoe_edge.cli.eval", "eval_cmd",
             "ROUGE of a policy at a budget on DATA, the lead-8 baseline, and fidelity to the full policy."),
    "export": ("swapmoe_edge.cli.export", "export_cmd",
               "Split a Hugging Face MoE checkpoint (Switch Transformers; Mixtral, Qwen-MoE, OLMoE) into an ONNX artifact."),
    "generate": ("swapmoe_edge.cli.generate", "generate_cmd",
                 "Continue TEXT arguments or the lines of --file inside a memory budget, streaming tokens to stdout."),
    "info": ("swapmoe_edge.cli.export", "info_cmd", "Layers, experts and bytes of an artifact."),
    "ladder": ("swapmoe_edge.cli.export", "ladder_group", "The precision ladder: low-bit copies of every expert."),
    "profile": ("swapmoe_edge.cli.profile", "profile_cmd",
                "Write the importance profile of ARTIFACT over calibration texts (SwapMoE's equation 1)."),
    "summarize": ("swapmoe_edge.cli.serve", "summarize_cmd",
                  "Summarise TEXT arguments or the documents of --file inside a memory budget."),
    "sweep": ("swapmoe_edge.cli.eval", "sweep_cmd",
              "Every policy x budget x planner on DATA, each in its own process: CSV, JSON and plots in OUT."),
    "trace": ("swapmoe_edge.cli.trace", "trace_group",
              "Record routing traces and replay residency policies on them (no model run)."),
}


class _Main(click.Group):
    """The verbs' group: loads a verb's module when it runs, and turns a file-system error (a path
    that is a file, not a folder; no permission; disk full) anywhere below into one error line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(VERBS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in VERBS:
            return None
        module, attr, _ = VERBS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The listing click writes, from VERBS instead of the loaded verbs."""
        limit = formatter.width - 6 - max(len(name) for name in VERBS)
        with formatter.section("Commands"):
            formatter.write_dl([(name, click.Command(name, help=VERBS[name][2]).get_short_help_str(limit))
                                for name in sorted(VERBS)])

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as e:
            fail(SwapMoEError(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)))


@click.group(cls=_Main)
@click.version_option(package_name="swapmoe-edge")
def main() -> None:
    """Serve Mixture-of-Experts models (Switch Transformers; Mixtral, Qwen-MoE, OLMoE) inside a memory budget (SwapMoE)."""
