"""Export reads only the checkpoint's own files, checks the disk for the artifact it will
really write, names the file and the bytes when a write fails, and never deletes files an
old artifact's manifest does not list unless told to."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.artifact.model_config import ModelConfig  # noqa: E402
from swapmoe_edge.core.errors import CheckpointError, ExportError  # noqa: E402
from swapmoe_export import export_checkpoint, space, writer  # noqa: E402

from tiny import save_tiny, tiny_model, tiny_tokenizer  # noqa: E402


def _export(ckpt: Path, out: Path, **kw) -> Path:
    return export_checkpoint(ckpt, out, validate=False, quiet=True, **kw)


def _nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


# -- inputs stay inside the checkpoint -------------------------------------------------


@pytest.fixture(scope="module")
def ckpt_files(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("src") / "ckpt", seed=21)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "model.safetensors", "generation_config.json",
                                  "tokenizer_config.json"])
def test_a_file_symlinked_out_of_the_checkpoint_is_refused_with_one_line_naming_it(tmp_path, ckpt_files, name):
    ckpt = _copy(ckpt_files, tmp_path / "ckpt")
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    if (ckpt / name).exists():
        shutil.move(ckpt / name, outside)
    else:
        outside.write_text("{}")
    (ckpt / name).symlink_to(outside)
    with pytest.raises(CheckpointError) as err:
        _export(ckpt, tmp_path / "art")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{ckpt / name} is a symlink to {outside.resolve()}" in msg and "outside the checkpoint folder" in msg
    assert "cp --remove-destination" in msg  # what to do
    _nothing_written(tmp_path, tmp_path / "art")


def test_the_reported_case_a_tokenizer_linked_to_etc_passwd_is_refused(tmp_path, ckpt_files):
    ckpt = _copy(ckpt_files, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").symlink_to("/etc/passwd")
    r = subprocess.run([sys.executable, "-m", "swapmoe_edge", "export", str(ckpt), "-o", str(tmp_path / "art"), "--no-validate"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tokenizer.json is a symlink to /etc/passwd, outside the checkpoint folder" in r.stderr
    _nothing_written(tmp_path, tmp_path / "art")


def test_a_shard_named_outside_the_checkpoint_is_refused(tmp_path):
    model = tiny_model(seed=22)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    ckpt = tmp_path / "ckpt"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    shutil.move(ckpt / shard, tmp_path / shard)
    index["weight_map"] = {k: (f"../{v}" if v == shard else v) for k, v in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{shard} resolves to .*outside the checkpoint folder"):
        _export(ckpt, tmp_path / "art")
    _nothing_written(tmp_path, tmp_path / "art")


def test_symlinks_that_stay_inside_the_checkpoint_are_followed(tmp_path, ckpt_files):
    ckpt = _copy(ckpt_files, tmp_path / "ckpt")
    (ckpt / "real").mkdir()
    shutil.move(ckpt / "tokenizer.json", ckpt / "real" / "tok.json")
    (ckpt / "tokenizer.json").symlink_to("real/tok.json")
    art = _export(ckpt, tmp_path / "art")
    assert (art / "tokenizer.json").read_bytes() == (ckpt / "real" / "tok.json").read_bytes()


def test_a_hugging_face_hub_cache_snapshot_whose_files_link_to_its_blobs_exports(tmp_path, ckpt_files):
    """The hub cache keeps files in models--ORG--NAME/blobs and links them from snapshots/REV."""
    repo = tmp_path / "hub" / "models--org--tiny-switch"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(ckpt_files.iterdir())):
        shutil.copyfile(f, repo / "blobs" / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    art = _export(snap, tmp_path / "art")
    assert load_manifest(art, verify=True).tokenizer == "tokenizer.json"


def test_a_symlinked_checkpoint_folder_itself_is_fine(tmp_path, ckpt_files):
    (tmp_path / "link").symlink_to(ckpt_files)
    assert load_manifest(_export(tmp_path / "link", tmp_path / "art")).experts


# -- the disk the artifact really needs ------------------------------------------------


def _on_disk(art: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in art.rglob("*") if p.is_file())


MEDIUM = dict(vocab_size=256, d_model=128, d_ff=512, d_kv=32, num_heads=4, num_layers=4, num_decoder_layers=2,
              num_sparse_encoder_layers=2, num_experts=4)


@pytest.fixture(scope="module")
def fp16_ckpt(tmp_path_factory) -> Path:
    """A float16 checkpoint: its files are half the size of the float32 artifact made from it."""
    path = tmp_path_factory.mktemp("fp16") / "ckpt"
    tiny_model(seed=23, **MEDIUM).half().save_pretrained(path)
    tiny_tokenizer(MEDIUM["vocab_size"]).save(str(path / "tokenizer.json"))
    return path


@pytest.mark.parametrize("kw", [
    dict(),  # float32 experts and the int4 ladder, from a float16 source
    dict(dtype="float16", ladder_rungs=("int4", "int8")),
    dict(expert_dtype="int8", ladder_rungs=("int4",)),
    dict(expert_dtype="int4", ladder_rungs=()),
    dict(fuse_layers=False, ladder_rungs=()),
])
def test_the_size_estimate_covers_the_artifact_and_stays_close_to_it(tmp_path, fp16_ckpt, kw):
    from swapmoe_export.checkpoint import read_config

    art = _export(fp16_ckpt, tmp_path / "art", **kw)
    m = load_manifest(art)
    _, cfg = read_config(fp16_ckpt)
    rungs = tuple(m.ladder)
    est = space.artifact_bytes(cfg, m.dtype, m.expert_dtype, rungs,
                               side_bytes=(fp16_ckpt / "tokenizer.json").stat().st_size, fused=kw.get("fuse_layers", True))
    real = _on_disk(art)
    assert real <= est <= 1.3 * real, (real, est)
    for entry in m.experts.values():  # the expert blocks are exact, not estimated
        assert entry.nbytes == space.expert_block_bytes(cfg.d_model, cfg.d_ff, m.expert_dtype)


def test_the_rung_block_size_is_exact(tmp_path, fp16_ckpt):
    art = _export(fp16_ckpt, tmp_path / "art", ladder_rungs=("int4", "int8"))
    raw = json.loads((art / "manifest.json").read_text())
    for rung in ("int4", "int8"):
        assert {e["rungs"][rung]["nbytes"] for e in raw["experts"]} == {space.rung_block_bytes(MEDIUM["d_model"], MEDIUM["d_ff"], rung)}


Usage = namedtuple("Usage", "total used free")


def test_the_space_check_counts_float32_output_of_a_float16_checkpoint(tmp_path, fp16_ckpt, monkeypatch):
    """The old check took the source's bytes (float16) as the artifact's; the float32 artifact is twice that and more."""
    src = (fp16_ckpt / "model.safetensors").stat().st_size
    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: Usage(10**12, 0, int(src * 1.2)))
    with pytest.raises(ExportError) as err:
        _export(fp16_ckpt, tmp_path / "art")
    msg = str(err.value)
    assert f"not enough disk at {tmp_path}" in msg and f"{int(src * 1.2):,} bytes" in msg and "needs about" in msg
    need = int(msg.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert need > 2 * src
    _nothing_written(tmp_path, tmp_path / "art")


class _FullDisk:
    """A file whose writes fail with ENOSPC (no file name, as the kernel reports it) after ``room`` bytes."""

    left = 0

    def __init__(self, path, mode="r", *a, **kw):
        self._f = open(path, mode, *a, **kw)

    def write(self, data):
        n = memoryview(data).nbytes
        if n > _FullDisk.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.left -= n
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_a_full_disk_mid_export_names_the_file_and_the_bytes_and_keeps_the_old_artifact(tmp_path, ckpt_files, monkeypatch):
    old = _export(ckpt_files, tmp_path / "art")
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    _FullDisk.left = 100_000
    monkeypatch.setattr(writer, "open", _FullDisk, raising=False)
    with pytest.raises(ExportError) as err:
        _export(ckpt_files, tmp_path / "art")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"cannot write {tmp_path}/.art.partial-{os.getpid()}/" in msg and "no space left on the device" in msg
    assert "the artifact needs about" in msg and "were free at" in msg and "is as it was" in msg
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.")] == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
def test_on_a_small_filesystem_the_check_refuses_before_writing_and_a_real_enospc_is_one_line(tmp_path, fp16_ckpt, monkeypatch):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "3m"):
        pytest.skip("needs root and tmpfs to mount a small filesystem")
    try:
        with pytest.raises(ExportError, match=r"not enough disk at .*small: the artifact needs about"):
            _export(fp16_ckpt, small / "art")
        assert list(small.iterdir()) == []
        # A filesystem that reports more room than it has (or fills up meanwhile): the write's ENOSPC.
        real = shutil.disk_usage
        monkeypatch.setattr(space.shutil, "disk_usage", lambda p: real(p)._replace(free=10**12))
        with pytest.raises(ExportError, match=r"cannot write .*small/\.art\.partial-\d+/\S+: no space left on the device"):
            _export(fp16_ckpt, small / "art")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


# -- re-export never deletes the user's files ------------------------------------------


def test_reexport_refuses_an_artifact_holding_files_its_manifest_does_not_list(tmp_path, ckpt_files):
    art = _export(ckpt_files, tmp_path / "art")
    (art / "profile.json").write_text('{"mine": 1}')
    (art / "notes").mkdir()
    (art / "notes" / "todo.txt").write_text("keep")
    manifest = (art / "manifest.json").read_bytes()
    with pytest.raises(ExportError) as err:
        _export(ckpt_files, art)
    msg = str(err.value)
    assert "2 file(s) its manifest does not list" in msg and "notes/todo.txt, profile.json" in msg and "--force" in msg
    assert (art / "profile.json").read_text() == '{"mine": 1}' and (art / "notes" / "todo.txt").read_text() == "keep"
    assert (art / "manifest.json").read_bytes() == manifest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.")] == []


def test_force_replaces_it_and_says_what_it_removed(tmp_path, ckpt_files, capsys):
    art = _export(ckpt_files, tmp_path / "art")
    (art / "profile.json").write_text("{}")
    (art / "link").symlink_to(tmp_path)  # a link counts as a file and is not followed
    export_checkpoint(ckpt_files, art, validate=False, quiet=True, force=True)
    err = capsys.readouterr().err
    assert "--force" in err and "removes 2 file(s)" in err and "link, profile.json" in err
    assert not (art / "profile.json").exists() and not (art / "link").exists() and tmp_path.is_dir()
    assert load_manifest(art, verify=True).experts


def test_an_artifact_holding_only_its_own_files_is_replaced_without_force(tmp_path, ckpt_files, capsys):
    art = _export(ckpt_files, tmp_path / "art")
    _export(ckpt_files, art)
    assert capsys.readouterr().err == ""
    assert load_manifest(art, verify=True).experts


def test_the_cli_refuses_then_forces_and_its_help_says_so(tmp_path, ckpt_files):
    exe = [sys.executable, "-m", "swapmoe_edge", "export", str(ckpt_files), "-o", str(tmp_path / "art"), "--no-validate", "--quiet"]
    assert subprocess.run(exe, capture_output=True).returncode == 0
    (tmp_path / "art" / "profile.json").write_text("{}")
    r = subprocess.run(exe, capture_output=True, text=True)
    assert r.returncode == 2 and "profile.json" in r.stderr and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "art" / "profile.json").exists()
    r = subprocess.run([*exe, "--force"], capture_output=True, text=True)
    assert r.returncode == 0 and "removes 1 file(s)" in r.stderr and "profile.json" in r.stderr
    assert not (tmp_path / "art" / "profile.json").exists()
    r = subprocess.run([sys.executable, "-m", "swapmoe_edge", "export", "--help"], capture_output=True, text=True)
    assert "--force" in r.stdout and "manifest does not list" in r.stdout


def test_the_estimate_follows_the_config_not_the_source_files():
    cfg = ModelConfig.from_hf_dict(dict(vocab_size=100, d_model=64, d_ff=256, d_kv=16, num_heads=4, num_layers=2,
                                        num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                        num_experts=8))
    f32 = space.artifact_bytes(cfg, "float32", "float32")
    assert space.artifact_bytes(cfg, "float16", "float16") < f32
    ladder = space.artifact_bytes(cfg, "float32", "float32", ("int4",)) - f32  # 16 experts' copies, a template, a kernel
    assert 16 * space.rung_block_bytes(64, 256, "int4") <= ladder <= 16 * space.rung_block_bytes(64, 256, "int4") + 200_000
    assert space.expert_block_bytes(64, 256, "float32") == 2 * 64 * 256 * 4  # 64 KiB: already aligned
