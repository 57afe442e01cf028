"""The package's folders are its architecture: imports point down, modules stay small."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "swapmoe_edge"
OURS = ("swapmoe_edge", "swapmoe_export")
MAX_LINES = 450
# Imported inside functions on purpose: optional or heavy packages that a plain run must not pay for.
OPTIONAL = {"torch", "transformers", "matplotlib", "rouge_score", "safetensors", "onnx"}


def _modules(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py") if "model_data" not in p.parts)


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return layers


def test_every_subpackage_is_a_layer_of_the_contract():
    packages = {f"swapmoe_edge.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(_layers())


def test_imports_point_down_and_the_runtime_never_reaches_the_exporter():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (the test extra installs it)")
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _deferred(lines: list[str], node: ast.stmt) -> bool:
    """A third-party import kept inside a function says why on its line (``# deferred: ...``)."""
    return "# deferred:" in lines[node.lineno - 1]


def _local_imports(path: Path) -> list[str]:
    """Imports of our own modules made inside a function: a way round a circle."""
    found, text = [], path.read_text()
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and inner.level == 0:
                names = [inner.module or ""]
            elif isinstance(inner, ast.ImportFrom):
                names = ["." * inner.level + (inner.module or "")]
            elif isinstance(inner, ast.Import):
                names = [a.name for a in inner.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if name.startswith(".") or top in OURS:
                    found.append(f"{path.relative_to(ROOT)}:{inner.lineno} {name}")
                elif top not in OPTIONAL and top not in sys.stdlib_module_names and not _deferred(lines, inner):
                    found.append(f"{path.relative_to(ROOT)}:{inner.lineno} {name} (not an optional package)")
    return found


def test_function_local_imports_are_only_for_optional_packages():
    found = [hit for p in _modules(PACKAGE, ROOT / "export") for hit in _local_imports(p)]
    assert not found, "move these imports to the module's top:\n" + "\n".join(found)


def test_no_module_is_past_the_size_a_reader_takes_in_at_one_sitting():
    long = {str(p.relative_to(ROOT)): n for p in _modules(PACKAGE, ROOT / "export")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concept (over {MAX_LINES} lines): {long}"


def test_the_wheel_names_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= set(config["packages"]), f"add to pyproject.toml's packages: {sorted(found - set(config['packages']))}"
