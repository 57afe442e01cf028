"""The embedded model is exported once into the per-user cache and reused afterwards."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from swapmoe_edge.runtime import embedded  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402
from swapmoe_edge.core.errors import ArtifactError  # noqa: E402

from tiny import save_tiny  # noqa: E402


def test_first_use_exports_into_the_cache_and_later_uses_reuse_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWAPMOE_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = save_tiny(tmp_path / embedded.EMBEDDED_NAME, seed=30)
    first = embedded.default_artifact(export_checkpoint, ckpt)
    assert (first / "manifest.json").is_file() and first.parent == tmp_path / "cache"
    assert "first use: exporting" in capsys.readouterr().err
    stamp = (first / "manifest.json").stat().st_mtime_ns
    again = embedded.default_artifact(export_checkpoint, ckpt)
    assert again == first and (again / "manifest.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""


def test_missing_embedded_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SWAPMOE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ArtifactError, match="--artifact"):
        embedded.default_artifact(export_checkpoint, tmp_path / "nothing")


def test_a_shipped_importance_profile_is_copied_into_the_export(tmp_path, monkeypatch):
    monkeypatch.setenv("SWAPMOE_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = save_tiny(tmp_path / embedded.EMBEDDED_NAME, seed=31)
    (ckpt / "profile.json").write_text('{"marker": 1}\n')
    art = embedded.default_artifact(export_checkpoint, ckpt, quiet=True)
    assert (art / "profile.json").read_text() == '{"marker": 1}\n'
    assert not list(art.glob("*.tmp"))


def _first_use_script(cache: Path, ckpt: Path) -> list[str]:
    code = (
        "import sys; from pathlib import Path; from swapmoe_export import export_checkpoint; "
        "from swapmoe_edge.runtime import embedded; "
        f"print(embedded.default_artifact(export_checkpoint, Path({str(ckpt)!r})))"
    )
    return [sys.executable, "-c", code]


def _visible_exports_are_complete(cache: Path, ckpt: Path) -> list[Path]:
    visible = [p for p in cache.iterdir() if not p.name.startswith(".") and p.is_dir()] if cache.exists() else []
    for p in visible:
        assert embedded.incomplete(p, ckpt) is None, f"{p} became visible incomplete"
    return visible


def test_concurrent_first_uses_export_once_and_agree(tmp_path):
    cache = tmp_path / "cache"
    ckpt = save_tiny(tmp_path / embedded.EMBEDDED_NAME, seed=32)
    (ckpt / "profile.json").write_text('{"marker": 2}\n')
    env = dict(os.environ, SWAPMOE_CACHE_DIR=str(cache))
    procs = [subprocess.Popen(_first_use_script(cache, ckpt), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    assert sum("first use: exporting" in e for _, e in outs) == 1
    art = Path(paths.pop())
    assert (art / "profile.json").read_text() == '{"marker": 2}\n'
    assert _visible_exports_are_complete(cache, ckpt) == [art]


def test_a_first_use_killed_at_any_moment_leaves_nothing_visible_incomplete(tmp_path):
    cache = tmp_path / "cache"
    ckpt = save_tiny(tmp_path / embedded.EMBEDDED_NAME, seed=33)
    (ckpt / "profile.json").write_text('{"marker": 3}\n')
    env = dict(os.environ, SWAPMOE_CACHE_DIR=str(cache))
    t0 = time.monotonic()
    subprocess.run(_first_use_script(tmp_path / "timing", ckpt), check=True, capture_output=True,
                   env=dict(env, SWAPMOE_CACHE_DIR=str(tmp_path / "timing")))
    whole = time.monotonic() - t0
    rng = random.Random(7)
    for _ in range(20):
        if cache.exists():
            shutil.rmtree(cache)
        p = subprocess.Popen(_first_use_script(cache, ckpt), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, whole))
        p.send_signal(signal.SIGKILL)
        p.wait()
        _visible_exports_are_complete(cache, ckpt)
    # the next use after a kill completes the export, profile included
    r = subprocess.run(_first_use_script(cache, ckpt), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    art = Path(r.stdout.strip())
    assert embedded.incomplete(art, ckpt) is None
    assert (art / "profile.json").read_text() == '{"marker": 3}\n'
    assert not list(cache.glob(".*staging*")) and not list(cache.glob(".*partial*"))


def test_a_damaged_cache_is_rebuilt_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWAPMOE_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = save_tiny(tmp_path / embedded.EMBEDDED_NAME, seed=34)
    (ckpt / "profile.json").write_text('{"marker": 4}\n')
    art = embedded.default_artifact(export_checkpoint, ckpt, quiet=True)
    (art / "profile.json").unlink()  # as a first use killed between export and profile once left it
    again = embedded.default_artifact(export_checkpoint, ckpt, quiet=True)
    assert again == art and (art / "profile.json").read_text() == '{"marker": 4}\n'
    assert "is rebuilt" in capsys.readouterr().err
    (art / "manifest.json").write_text("{\"format\": ")  # cut short
    embedded.default_artifact(export_checkpoint, ckpt, quiet=True)
    assert embedded.incomplete(art, ckpt) is None
    stamp = (art / "manifest.json").stat().st_mtime_ns
    embedded.default_artifact(export_checkpoint, ckpt, quiet=True, rebuild=True)
    assert (art / "manifest.json").stat().st_mtime_ns != stamp


def test_first_use_leaves_no_hidden_lock_or_staging_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("SWAPMOE_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = save_tiny(tmp_path / embedded.EMBEDDED_NAME, seed=35)
    art = embedded.default_artifact(export_checkpoint, ckpt, quiet=True)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [art.name]


def test_the_embedded_verb_prints_the_cache_and_rebuilds_it_on_request(tmp_path):
    env = dict(os.environ, SWAPMOE_CACHE_DIR=str(tmp_path / "cache"))
    cli = [sys.executable, "-m", "swapmoe_edge", "embedded"]
    first = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    art = Path(first.stdout.strip())
    assert art.parent == tmp_path / "cache" and embedded.incomplete(art, embedded.EMBEDDED_DIR) is None
    stamp = (art / "manifest.json").stat().st_mtime_ns
    again = subprocess.run(cli + ["--rebuild", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == str(art), again.stderr
    assert (art / "manifest.json").stat().st_mtime_ns != stamp
