"""Every script in scripts/ answers --help and imports the installed package, not a path it builds."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))
# What the development set-up installs and a runtime-only install lacks (the export and eval extras).
OPTIONAL = ("torch", "transformers", "safetensors", "rouge_score", "matplotlib")


def test_scripts_are_found():
    assert len(SCRIPTS) > 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_answers_help(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    missing = re.search(r"No module named '([\w.]+)'", proc.stderr)
    if proc.returncode != 0 and missing and missing.group(1).split(".")[0] in OPTIONAL:
        pytest.skip(f"{script.name} needs {missing.group(1)}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_does_not_touch_sys_path(script):
    assert not re.search(r"\bsys\.path\b", script.read_text()), f"{script.name} changes sys.path: import the installed package"
