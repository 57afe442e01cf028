"""The runtime imports and runs without torch or transformers; below the CLI it needs neither onnx nor the exporter."""

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "safetensors", "onnx", "swapmoe_export"):
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def test_runtime_modules_import_with_torch_and_transformers_blocked():
    code = BLOCKER + textwrap.dedent(
        """
        import pkgutil, importlib, swapmoe_edge
        names = [m.name for m in pkgutil.walk_packages(swapmoe_edge.__path__, "swapmoe_edge.")
                 if not m.name.endswith("__main__") and not m.name.startswith("swapmoe_edge.cli")]
        for name in names:
            importlib.import_module(name)
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print("imported", len(names))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("imported")


def test_blocker_really_blocks_torch():
    r = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "blocked for this test" in r.stderr


def test_export_needs_no_torch_and_validation_says_what_it_needs(tmp_path):
    blocker = BLOCKER.replace(', "onnx", "swapmoe_export"', '')
    code = blocker + textwrap.dedent(
        f"""
        from swapmoe_edge.runtime.embedded import EMBEDDED_DIR
        from swapmoe_edge.core.errors import ExportError
        from swapmoe_edge.artifact.manifest import load_manifest
        from swapmoe_export import export_checkpoint
        art = export_checkpoint(EMBEDDED_DIR, {str(tmp_path / "art")!r}, validate=False, quiet=True)
        print(len(load_manifest(art, verify=True).experts))
        try:
            export_checkpoint(EMBEDDED_DIR, {str(tmp_path / "art2")!r}, quiet=True)
        except ExportError as e:
            print(e)
        for name in ("torch", "transformers", "safetensors"):
            assert name not in sys.modules, name
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    n_experts, message = r.stdout.splitlines()[:2]
    assert int(n_experts) > 0
    assert "needs torch and transformers" in message and "--no-validate" in message


def test_summarize_loads_the_exporter_only_when_it_exports():
    # onnx and the exporter's graph code are ~20 MB of a process that only serves
    code = textwrap.dedent(
        """
        import sys
        import swapmoe_edge.cli.serve, swapmoe_edge.cli.embedded
        from swapmoe_edge import Runtime
        Runtime  # resolves the runtime
        loaded = [m for m in ("onnx", "swapmoe_export.exporter", "swapmoe_export.builder") if m in sys.modules]
        print(loaded)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
