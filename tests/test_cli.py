"""The command line's shell: verbs load when they run, and a bad number is one usage error, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from swapmoe_edge.cli.main import VERBS, main


def _commands(group: click.Group = main, path: tuple[str, ...] = ()):
    """(path, command) for every command below ``group``, groups included."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield path + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))


def _options(kind: type[click.ParamType]):
    return [pytest.param(path, opt, id=" ".join(path) + " " + opt.opts[-1])
            for path, cmd in _commands() for opt in cmd.params
            if isinstance(opt, click.Option) and isinstance(opt.type, kind)]


def test_every_verb_loads_as_the_command_of_its_name():
    ctx = click.Context(main)
    for name in VERBS:
        assert main.get_command(ctx, name).name == name
    assert main.get_command(ctx, "no-such-verb") is None


@pytest.mark.parametrize("limit", [20, 45, 72, 200])
def test_the_verb_listing_is_the_help_click_would_write_from_the_loaded_verbs(limit):
    ctx = click.Context(main)
    for name, (_, _, listed) in VERBS.items():
        loaded = main.get_command(ctx, name).get_short_help_str(limit)
        assert click.Command(name, help=listed).get_short_help_str(limit) == loaded, name


def test_help_loads_neither_onnx_runtime_nor_the_exporter():
    code = ("import sys\nfrom swapmoe_edge.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('onnxruntime', 'swapmoe_export', 'onnx', 'swapmoe_edge.runtime') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Commands:" in r.stdout and "summarize" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("path,opt", _options(click.types.IntParamType))
@pytest.mark.parametrize("value", ["0", "-1"])
def test_every_count_below_one_is_a_usage_error(path, opt, value):
    assert isinstance(opt.type, click.IntRange) and opt.type.min == 1, "counts take COUNT (cli/common.py)"
    r = CliRunner().invoke(main, [*path, opt.opts[-1], value])
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{opt.opts[-1]}'" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("path,opt", _options(click.types.FloatParamType))
def test_every_negative_speed_or_time_is_a_usage_error(path, opt):
    assert isinstance(opt.type, click.FloatRange) and opt.type.min == 0
    for value in ["-1"] + (["0"] if opt.type.min_open else []):
        r = CliRunner().invoke(main, [*path, opt.opts[-1], value])
        assert r.exit_code == 2, r.output
        assert f"Invalid value for '{opt.opts[-1]}'" in r.output


def test_summarize_with_a_batch_size_below_one_says_so_in_one_line():
    for value in ("0", "-1"):
        r = CliRunner().invoke(main, ["summarize", "--batch-size", value, "some text"])
        assert r.exit_code == 2
        errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
        assert errors == [f"Error: Invalid value for '--batch-size': {value} is not in the range x>=1."]


def test_sweep_refuses_negative_threads_before_it_runs_a_cell(tmp_path):
    r = CliRunner().invoke(main, ["sweep", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "-o",
                                  str(tmp_path / "out"), "--threads", "-1"])
    assert r.exit_code == 2 and "Invalid value for '--threads'" in r.output
    assert not (tmp_path / "out").exists()


def test_sweep_passes_its_cell_timeout_and_no_plots_to_the_sweep(tmp_path, monkeypatch):
    from swapmoe_edge.cli import eval as eval_cli

    seen = {}
    monkeypatch.setattr(eval_cli, "sweep", lambda *a, **kw: seen.update(kw) or {"failed": [], "cells": []})
    args = ["sweep", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "out"), "--quiet"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert seen["timeout_s"] is None and seen["plots"] is True
    assert CliRunner().invoke(main, [*args, "--timeout-s", "90", "--no-plots"]).exit_code == 0
    assert seen["timeout_s"] == 90 and seen["plots"] is False
    r = CliRunner().invoke(main, [*args, "--timeout-s", "0"])
    assert r.exit_code == 2 and "--timeout-s" in r.output
