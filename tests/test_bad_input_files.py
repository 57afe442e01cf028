"""Every verb's file options, fed a binary file: a clear error naming the file, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from swapmoe_edge.cli import serve as serve_mod  # noqa: E402
from swapmoe_edge.cli.main import main  # noqa: E402
from swapmoe_edge.core.errors import InputError  # noqa: E402
from swapmoe_edge.core.textio import read_documents  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402

from tiny import save_tiny, words  # noqa: E402

# The first 3 KB of a binary: an ELF-like header, then every byte value (not UTF-8 text).
BINARY = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 12


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    ckpt = save_tiny(root / "ckpt", seed=9)
    art = export_checkpoint(ckpt, root / "art", validate=False, quiet=True)
    (root / "binary.dat").write_bytes(BINARY)
    return root, ckpt, art


def _binary_copy(src: Path, dst: Path, name: str) -> Path:
    """SRC copied to DST with its file NAME replaced by binary bytes."""
    shutil.copytree(src, dst)
    (dst / name).write_bytes(BINARY)
    return dst


def _cases(root: Path, ckpt: Path, art: Path, tmp: Path):
    b = str(root / "binary.dat")
    lists = {}
    for suffix in ("", ".gz", ".xz", ".lz4"):
        lists[suffix] = tmp / f"lists{suffix}"
        lists[suffix].mkdir()
        (lists[suffix] / f"deb.debian.org_debian_dists_sid_main_i18n_Translation-en{suffix}").write_bytes(BINARY)
    good_lists = tmp / "good_lists"
    good_lists.mkdir()
    (good_lists / "deb.debian.org_debian_dists_sid_main_i18n_Translation-en").write_text(
        "Package: frob\nDescription-md5: 0\nDescription-en: tool that frobnicates widgets\n"
        " frob reads widgets from standard input and frobnicates them quickly and well.\n\n")
    return {
        "summarize --file": ["summarize", "--artifact", str(art), "--file", b],
        "summarize --device": ["summarize", "--artifact", str(art), "--device", b, "w5 w6"],
        "profile --data": ["profile", str(art), "--data", b],
        "eval --data": ["eval", "--artifact", str(art), "--data", b],
        "sweep --data": ["sweep", str(art), "--data", b, "-o", str(tmp / "sweep")],
        "export MODEL_DIR (config.json)": ["export", str(_binary_copy(ckpt, tmp / "c1", "config.json")), "-o", str(tmp / "a1")],
        "export MODEL_DIR (weights)": ["export", str(_binary_copy(ckpt, tmp / "c2", "model.safetensors")), "-o", str(tmp / "a2")],
        "export MODEL_DIR (generation_config.json)": [
            "export", "--no-validate", str(_binary_copy(ckpt, tmp / "c3", "generation_config.json")), "-o", str(tmp / "a3")],
        "info ARTIFACT (manifest.json)": ["info", str(_binary_copy(art, tmp / "a4", "manifest.json"))],
        "summarize --artifact (profile.json)": [
            "summarize", "--artifact", str(_binary_copy(art, tmp / "a5", "profile.json")), "w5 w6"],
        **{f"data debian --lists-dir ({s or 'plain'})": ["data", "debian", "--lists-dir", str(d), "-o", str(tmp / "corpus")]
           for s, d in lists.items()},
        "data debian -o onto a binary file": ["data", "debian", "--lists-dir", str(good_lists), "-o", b],
        "export -o onto a binary file": ["export", str(ckpt), "-o", b],
        "sweep -o onto a binary file": ["sweep", str(art), "--data", str(_pairs(tmp)), "-o", b],
        "summarize --artifact a binary file": ["summarize", "--artifact", b, "w5 w6"],
        "eval --artifact a binary file": ["eval", "--artifact", b, "--data", str(_pairs(tmp))],
        "info a binary file": ["info", b],
        "profile a binary file": ["profile", b, "--data", str(_pairs(tmp))],
        "sweep a binary file": ["sweep", b, "--data", str(_pairs(tmp)), "-o", str(tmp / "sweep2")],
        # bench: every case fails before a cgroup box would be made.
        "bench cells --docs": ["bench", "cells", str(art), "--no-box", "--docs", b, "-o", str(tmp / "bench"),
                               "--requests", "1", "--policies", "prune", "--budgets", "50%"],
        "bench soak --docs": ["bench", "soak", str(art), "--no-box", "--docs", b, "-o", str(tmp / "soak"), "--requests", "1"],
        "bench pressure --docs": ["bench", "pressure", str(art), "--docs", b, "-o", str(tmp / "pressure")],
        "bench cells --device": ["bench", "cells", str(art), "--device", b, "-o", str(tmp / "bench2")],
        "bench pressure --device": ["bench", "pressure", str(art), "--device", b, "-o", str(tmp / "bench3")],
        "bench soak --device": ["bench", "soak", str(art), "--device", b, "-o", str(tmp / "bench4")],
        **{f"bench {v} a binary file": ["bench", v, b, "-o", str(tmp / f"{v}5")] for v in ("cells", "pressure", "soak")},
        **{f"bench {v} -o onto a binary file": ["bench", v, str(art), "--no-box", "-o", b] if v != "pressure"
           else ["bench", v, str(art), "-o", b] for v in ("cells", "pressure", "soak")},
        "profile -o into a binary file's folder": ["profile", str(art), "--data", str(_pairs(tmp)), "-o", b + "/p.json"],
        "eval --profile": ["eval", "--artifact", str(art), "--data", str(_pairs(tmp)), "--profile", b],
        "sweep --profile": ["sweep", str(art), "--data", str(_pairs(tmp)), "--profile", b, "-o", str(tmp / "sweep3")],
        "trace record --data": ["trace", "record", str(art), "--data", b, "-o", str(tmp / "t.npz")],
        "trace record a binary file": ["trace", "record", b, "--data", str(_pairs(tmp)), "-o", str(tmp / "t.npz")],
        "trace record -o into a binary file's folder": ["trace", "record", str(art), "--data", str(_pairs(tmp)),
                                                        "--max-new-tokens", "2", "-o", b + "/t.npz"],
        "trace replay a binary file": ["trace", "replay", b],
        "trace replay --profile": ["trace", "replay", str(_trace(art, tmp)), "--profile", b],
        "ladder add a binary file": ["ladder", "add", b],
        "ladder add ARTIFACT (manifest.json)": ["ladder", "add", str(_binary_copy(art, tmp / "a6", "manifest.json"))],
    }


def _trace(art: Path, tmp: Path) -> Path:
    from swapmoe_edge.lab.trace import record_trace

    return record_trace(art, [{"text": "w5 w6 w7"}], tmp / "good.npz", max_new_tokens=2) and tmp / "good.npz"


def _pairs(tmp: Path) -> Path:
    f = tmp / "pairs.jsonl"
    f.write_text('{"text": "w5 w6 w7", "summary": "w5"}\n')
    return f


CASES = ["summarize --file", "summarize --device", "profile --data", "eval --data", "sweep --data",
         "export MODEL_DIR (config.json)", "export MODEL_DIR (weights)", "export MODEL_DIR (generation_config.json)",
         "info ARTIFACT (manifest.json)", "summarize --artifact (profile.json)",
         "data debian --lists-dir (plain)", "data debian --lists-dir (.gz)", "data debian --lists-dir (.xz)",
         "data debian --lists-dir (.lz4)", "data debian -o onto a binary file", "export -o onto a binary file",
         "sweep -o onto a binary file", "summarize --artifact a binary file", "eval --artifact a binary file",
         "info a binary file", "profile a binary file", "sweep a binary file",
         "bench cells --docs", "bench soak --docs", "bench pressure --docs", "bench cells --device", "bench pressure --device",
         "bench soak --device", *(f"bench {v} a binary file" for v in ("cells", "pressure", "soak")),
         *(f"bench {v} -o onto a binary file" for v in ("cells", "pressure", "soak")),
         "profile -o into a binary file's folder", "eval --profile", "sweep --profile", "trace record --data",
         "trace record a binary file", "trace record -o into a binary file's folder", "trace replay a binary file",
         "trace replay --profile", "ladder add a binary file", "ladder add ARTIFACT (manifest.json)"]

# Every file or folder option of every verb, and the cases above that feed it a binary file.
COVERED = {
    ("export", "model_dir"): "export MODEL_DIR (config.json)", ("export", "output"): "export -o onto a binary file",
    ("info", "artifact"): "info a binary file", ("data debian", "output"): "data debian -o onto a binary file",
    ("data debian", "lists_dir"): "data debian --lists-dir (plain)",
    ("summarize", "artifact"): "summarize --artifact a binary file", ("summarize", "file"): "summarize --file",
    ("summarize", "device"): "summarize --device",
    ("profile", "artifact"): "profile a binary file", ("profile", "data"): "profile --data",
    ("profile", "device"): "summarize --device",  # the same loader
    ("eval", "artifact"): "eval --artifact a binary file", ("eval", "data"): "eval --data",
    ("sweep", "artifact"): "sweep a binary file", ("sweep", "data"): "sweep --data", ("sweep", "out"): "sweep -o onto a binary file",
    **{(f"bench {v}", "artifact"): f"bench {v} a binary file" for v in ("cells", "pressure", "soak")},
    **{(f"bench {v}", "out"): f"bench {v} -o onto a binary file" for v in ("cells", "pressure", "soak")},
    **{(f"bench {v}", "device"): f"bench {v} --device" for v in ("cells", "pressure", "soak")},
    ("bench cells", "docs"): "bench cells --docs", ("bench soak", "docs"): "bench soak --docs",
    ("bench pressure", "docs"): "bench pressure --docs",
    ("profile", "out"): "profile -o into a binary file's folder",
    ("eval", "profile"): "eval --profile", ("sweep", "profile"): "sweep --profile",
    ("trace record", "artifact"): "trace record a binary file", ("trace record", "data"): "trace record --data",
    ("trace record", "out"): "trace record -o into a binary file's folder",
    ("trace replay", "trace"): "trace replay a binary file", ("trace replay", "profile"): "trace replay --profile",
    ("ladder add", "artifact"): "ladder add a binary file",
}
FILE_LIKE = {"device", "lists_dir"}  # plain-string options that name a file or folder


def _file_options(group, prefix=""):
    import click

    for name, cmd in group.commands.items():
        full = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            yield from _file_options(cmd, full + " ")
            continue
        for p in cmd.params:
            if isinstance(p.type, click.Path) or p.name in FILE_LIKE:
                yield full, p.name


def test_every_file_option_of_every_verb_has_a_binary_input_case():
    missing = sorted(set(_file_options(main)) - set(COVERED))
    assert not missing, f"add a binary-file case for {missing}"
    assert set(COVERED.values()) <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_binary_file_options_give_an_error_message_not_a_traceback(env, tmp_path, case):
    root, ckpt, art = env
    args = _cases(root, ckpt, art, tmp_path)[case]
    r = CliRunner().invoke(main, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{case}: {r.exception!r}\n{r.output}"
    assert "Traceback" not in r.output
    assert r.exit_code != 0 and "error" in r.output.lower(), f"{case}: exit {r.exit_code}\n{r.output}"


def test_the_error_names_file_line_and_column(tmp_path):
    f = tmp_path / "docs.txt"
    f.write_bytes("first document\nsecond \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"docs\.txt:2 \(column 8\) is not UTF-8 text \(byte 0xe9\).*iconv"):
        read_documents(f)
    f.write_bytes(b"ok\nhas a \0 NUL\n")
    with pytest.raises(InputError, match=r"docs\.txt:2 \(column 7\) holds a NUL byte"):
        read_documents(f)


def test_a_utf8_bom_is_accepted(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "w5 w6"}\n')
    assert read_documents(f) == [{"text": "w5 w6"}]


def _summarize_file(env, tmp_path, monkeypatch, terminal: bool, *extra):
    _, _, art = env
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(words([5 + i, 6 + i, 7]) for i in range(5)) + "\n")
    monkeypatch.setattr(serve_mod, "stderr_is_terminal", lambda: terminal)
    return CliRunner().invoke(main, ["summarize", "--artifact", str(art), "--file", str(docs), "--batch-size", "2",
                                     "--max-new-tokens", "4", *extra])


def test_summarize_file_shows_progress_on_a_terminal(env, tmp_path, monkeypatch):
    r = _summarize_file(env, tmp_path, monkeypatch, True)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[swapmoe] ")]
    assert [ln.split(" documents")[0] for ln in lines] == ["[swapmoe] 2/5", "[swapmoe] 4/5", "[swapmoe] 5/5"]
    assert "documents/s" in lines[0] and "s left" in lines[0]
    assert len(r.stdout.splitlines()) == 5  # the summaries alone on stdout


@pytest.mark.parametrize("terminal,extra", [(False, ()), (True, ("--quiet",))])
def test_summarize_file_is_silent_when_piped_or_quiet(env, tmp_path, monkeypatch, terminal, extra):
    r = _summarize_file(env, tmp_path, monkeypatch, terminal, *extra)
    assert r.exit_code == 0, r.output
    assert "[swapmoe] " not in r.stderr
    if extra:
        assert r.stderr == ""
