"""The device's install: `pip install swapmoe-edge` alone (no torch or transformers) runs
the quickstart, `swapmoe summarize "TEXT"`, with the embedded model, offline, on its first call."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_WHEEL_BYTES = 48 * 2**20  # the shipped checkpoints (switch-debian 21.5 MB and mixtral-debian 29.8 MB float16, ~44 MiB zipped) and the code
TEXT = ("GNOME Sudoku is a puzzle game for the GNOME desktop. It generates puzzles of four difficulty levels, "
        "checks your answers and keeps track of the time you take.")


def _offline_prefix() -> list[str]:
    """`unshare -rn`: run in a network namespace with no interfaces, where the kernel allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []


@pytest.mark.slow
def test_runtime_only_install_runs_the_quickstart_offline(tmp_path):
    # Build the wheel users get, from a clean copy of the tree (setuptools builds in place, and a
    # stale build/ folder could carry deleted modules into the wheel); pip's cache or index
    # supplies setuptools and the runtime's wheels.
    src = Path(shutil.copytree(REPO, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".venv", "build", "*.egg-info", ".git", "__pycache__", ".pytest_cache", "artifacts", "out", "tests", "docs")))
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("swapmoe_edge-*.whl")
    assert wheel.stat().st_size < MAX_WHEEL_BYTES, f"the wheel grew to {wheel.stat().st_size / 2**20:.1f} MiB"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, swapmoe = venv / "bin" / "python", venv / "bin" / "swapmoe"
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    # Outside the repository, so nothing is imported from the source tree.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "SWAPMOE", "XDG_"))}
    env.update(HOME=str(tmp_path / "home"), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    probe = ("import importlib.util as u, swapmoe_edge, swapmoe_export; "
             "print([m for m in ('torch', 'transformers', 'safetensors') if u.find_spec(m)]); "
             "print(swapmoe_edge.__file__)")
    r = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    found, where = r.stdout.splitlines()
    assert found == "[]", f"the runtime install pulled in {found}"
    assert where.startswith(str(venv))

    r = subprocess.run([*_offline_prefix(), str(swapmoe), "summarize", TEXT], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "first use: exporting the shipped model switch-debian" in r.stderr and "Traceback" not in r.stderr
    summary = r.stdout.strip()
    assert summary and len(summary.split()) <= 32, r.stdout
    assert any(w.lower() in summary.lower() for w in ("GNOME", "Sudoku", "puzzle")), summary
    cache = tmp_path / "home" / ".cache" / "swapmoe_edge"
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no partial export left

    # The second call reuses the export: nothing is written again.
    r = subprocess.run([str(swapmoe), "summarize", TEXT], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and "first use" not in r.stderr and r.stdout.strip() == summary
