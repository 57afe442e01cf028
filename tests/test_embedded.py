"""The embedded model is exported once into the per-user cache and reused afterwards."""

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
