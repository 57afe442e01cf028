"""Every byte of an artifact is checked before it is used, and a bad artifact is one error line.

Experts that fail their check are routed around by approximate policies (the stats name the
files) and stop an exact one; dense files are checked at load, once per file identity; a
malformed manifest is an ArtifactError that says where; the embedded model's cache rebuilds
itself.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.artifact.verify import HashCache, checked_at_load, verify_files  # noqa: E402
from swapmoe_edge.cli.main import main  # noqa: E402
from swapmoe_edge.core.errors import ArtifactError  # noqa: E402
from swapmoe_edge.residency.limits import ExpertUnavailableError  # noqa: E402
from swapmoe_edge.runtime import baseline_cache, embedded  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402

from tiny import save_tiny  # noqa: E402

ROWS = [[5, 9, 13, 17, 21, 25, 29, 1], [40, 33, 26, 19, 12, 1]]
TEXT = "w5 w9 w13 w17 w21 w25 w29"
BROKEN = [f"experts/dec.L01.E0{e}.bin" for e in range(3)]  # three of the decoder layer's four experts


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    return export_checkpoint(save_tiny(root / "ckpt", seed=11), root / "art", validate=False, quiet=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWAPMOE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def art(original, tmp_path):
    return Path(shutil.copytree(original, tmp_path / "art"))


@pytest.fixture(scope="module")
def reference(original, tmp_path_factory):
    """The full policy's tokens on the intact artifact."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWAPMOE_CACHE_DIR", str(tmp_path_factory.mktemp("refcache")))
        with Runtime(original, RuntimeConfig(policy="full", threads=1)) as rt:
            return [r.token_ids for r in rt.generate(ROWS, max_new_tokens=8)]


def flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[min(offset, len(data) - 1)] ^= 0xFF
    path.write_bytes(bytes(data))


def one_error_line(r) -> str:
    """The CLI failed with exactly one line on stderr, and no traceback."""
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# -- experts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["swapmoe", "prune", "ladder"])
def test_corrupt_experts_are_routed_around_and_named_in_the_stats(art, reference, policy):
    for rel in BROKEN:
        flip(art / rel)
    with Runtime(art, RuntimeConfig(policy=policy, budget="100%", threads=1)) as rt:
        results = rt.generate(ROWS, max_new_tokens=8)
    for r, want in zip(results, reference):
        assert sorted(r.stats["unavailable_files"]) == sorted(str(art / rel) for rel in BROKEN)
        assert r.stats["unavailable_experts"] == ["dec.L01.E00", "dec.L01.E01", "dec.L01.E02"]
        assert not r.exact or r.token_ids == want  # "exact" only with full's tokens
    assert not all(r.exact for r in results)  # three of four experts gone: some token was rerouted


def test_the_stats_line_names_the_experts_and_files_routed_around(art):
    flip(art / BROKEN[0])
    r = CliRunner().invoke(main, ["summarize", "--artifact", str(art), "--budget", "100%", "--max-new-tokens", "4", TEXT])
    assert r.exit_code == 0, r.output
    assert f"unavailable dec.L01.E00 ({art / BROKEN[0]} failed its check" in r.stderr
    r = CliRunner().invoke(main, ["summarize", "--artifact", str(art), "--budget", "100%", "--json", TEXT])
    assert json.loads(r.stdout)["stats"]["unavailable_files"] == [str(art / BROKEN[0])]


@pytest.mark.parametrize("policy,budget", [("full", "auto"), ("on-demand", "100%"), ("on-demand", "50%")])
def test_an_exact_policy_stops_with_one_line_naming_the_file_and_the_fix(art, policy, budget):
    for e in range(4):  # whichever expert a token needs is corrupt
        flip(art / f"experts/dec.L01.E0{e}.bin")
    r = CliRunner().invoke(main, ["summarize", "--artifact", str(art), "--policy", policy, "--budget", budget, TEXT])
    line = one_error_line(r)
    assert "experts/dec.L01.E0" in line and "is corrupt" in line and f"The {policy} policy is exact" in line
    assert "export the model again" in line
    with pytest.raises(ExpertUnavailableError):
        with Runtime(art, RuntimeConfig(policy=policy, budget=budget, threads=1)) as rt:
            rt.generate(ROWS, max_new_tokens=8)


# -- dense files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rel,offset", [("dense/lm_head.onnx", -40), ("dense/enc.L00.block.onnx", -400),
                                        ("dense/embed.onnx", 200), ("tokenizer.json", 10),
                                        ("dense/rung_kernel.int4.onnx", -10)])
def test_a_corrupt_dense_file_stops_the_load_with_one_line(art, rel, offset):
    size = (art / rel).stat().st_size
    flip(art / rel, offset % size)
    with pytest.raises(ArtifactError, match=f"{art / rel} is corrupt: its sha256"):
        Runtime(art, RuntimeConfig(policy="full", threads=1))
    line = one_error_line(CliRunner().invoke(main, ["summarize", "--artifact", str(art), TEXT]))
    assert str(art / rel) in line and "Export the model again" in line


def test_dense_files_are_hashed_once_per_identity(art):
    cache = baseline_cache.hash_cache_path()
    m = load_manifest(art)
    dense = checked_at_load(m)
    assert "tokenizer.json" in dense and "dense/lm_head.onnx" in dense
    assert not any(rel.endswith(".bin") for rel in dense)  # experts are hashed as the store reads them
    first = verify_files(m, dense, HashCache(cache))
    assert first.hashed_files == len(dense) and first.remembered_files == 0
    again = verify_files(m, dense, HashCache(cache))
    assert again.hashed_files == 0 and again.remembered_files == len(dense)
    os.utime(art / "dense/lm_head.onnx")  # a new mtime (and ctime): hashed again
    assert verify_files(m, dense, HashCache(cache)).hashed_files == 1
    # The same bytes at another path, or after a copy (another inode), are hashed again too.
    copy = Path(shutil.copytree(art, art.parent / "copy"))
    assert verify_files(load_manifest(copy), dense, HashCache(cache)).hashed_files == len(dense)


def test_a_file_changed_in_place_after_it_was_remembered_is_caught(art):
    m = load_manifest(art)
    verify_files(m, checked_at_load(m), HashCache(baseline_cache.hash_cache_path()))
    flip(art / "dense/lm_head.onnx", 5000)
    with pytest.raises(ArtifactError, match="lm_head.onnx is corrupt"):
        Runtime(art, RuntimeConfig(policy="full", threads=1))


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe", b"[1, 2]", b'{"x": 1}', b'{"/a": {"id": "no", "sha256": 1}}',
                                     b"[" * 100000])
def test_a_corrupt_hash_cache_counts_as_empty_and_is_rewritten(art, garbage):
    path = baseline_cache.hash_cache_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(garbage)
    with Runtime(art, RuntimeConfig(policy="prune", threads=1)) as rt:
        assert rt.startup["verify_s"] >= 0
    assert len(json.loads(path.read_text())) == len(checked_at_load(load_manifest(art)))


def _verify_in_child(art: str, cache: str) -> int:
    m = load_manifest(art)
    return verify_files(m, checked_at_load(m), HashCache(Path(cache))).hashed_files


def test_concurrent_launches_merge_their_hashes(original, tmp_path):
    arts = [str(shutil.copytree(original, tmp_path / f"a{i}")) for i in range(4)]
    cache = tmp_path / "hashes.json"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(_verify_in_child, [(a, str(cache)) for a in arts])
    entries = json.loads(cache.read_text())
    n = len(checked_at_load(load_manifest(original)))
    assert len(entries) == 4 * n  # nobody's entries were lost to another's write
    assert not list(tmp_path.glob("hashes.json.tmp*"))


def test_verify_never_trusts_and_always_rehashes(art):
    flip(art / "dense/lm_head.onnx", 5000)
    with Runtime(art, RuntimeConfig(policy="prune", threads=1, verify="never")) as rt:  # trusted: it runs
        rt.generate(ROWS[:1], max_new_tokens=2)
    cache = baseline_cache.hash_cache_path()
    assert not cache.exists()  # "never" remembers nothing
    for _ in range(2):
        with pytest.raises(ArtifactError, match="is corrupt"):
            Runtime(art, RuntimeConfig(policy="prune", threads=1, verify="always"))
    assert not cache.exists()  # "always" neither


def test_the_baseline_cache_tolerates_a_corrupt_file(tmp_path):
    path = baseline_cache.cache_path()
    path.parent.mkdir(parents=True)
    for garbage in ("", "[]", '{"k": 5}', '{"k": {"baseline": "x", "rss_after_load": 1}}', '{"k": {"baseline": 1}}'):
        path.write_text(garbage)
        assert baseline_cache.lookup("k", 1) is None
    baseline_cache.store("k", 100, 50)
    assert baseline_cache.lookup("k", 50) == 100 and json.loads(path.read_text()) == {
        "k": {"baseline": 100, "rss_after_load": 50}}


# -- the embedded model's cache -----------------------------------------------------------------


@pytest.mark.parametrize("rel", ["dense/lm_head.onnx", "experts/enc.L01.E02.bin", "profile.json"])
def test_a_damaged_embedded_cache_is_rebuilt_with_a_note(tmp_path, capsys, rel):
    ckpt = save_tiny(tmp_path / embedded.EMBEDDED_NAME, seed=33)
    art = embedded.default_artifact(export_checkpoint, ckpt, quiet=True)
    if rel == "profile.json":  # a profile that leads out of the cache
        (tmp_path / "elsewhere.json").write_text("{}")
        os.symlink(tmp_path / "elsewhere.json", art / rel)
    else:
        flip(art / rel, 300)
    capsys.readouterr()
    again = embedded.default_artifact(export_checkpoint, ckpt, quiet=True)
    assert again == art
    err = capsys.readouterr().err
    assert f"the cache of the shipped model switch-debian, {art}, is rebuilt" in err and rel in err
    assert embedded.incomplete(art, ckpt) is None
    with Runtime(art, RuntimeConfig(policy="full", threads=1)) as rt:
        assert rt.generate(ROWS[:1], max_new_tokens=2)[0].exact


def test_the_embedded_cache_check_hashes_once(tmp_path):
    ckpt = save_tiny(tmp_path / embedded.EMBEDDED_NAME, seed=34)
    art = embedded.default_artifact(export_checkpoint, ckpt, quiet=True)
    assert embedded.incomplete(art, ckpt) is None
    m = load_manifest(art)
    assert verify_files(m, m.files, HashCache(baseline_cache.hash_cache_path())).hashed_files == 0


# -- malformed manifests ---------------------------------------------------------------------------


def _set(path: list, value):
    def edit(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


def _delete(path: list):
    def edit(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return edit


MALFORMED = {
    "a list": (lambda m: [], "must be a JSON object"),
    "a files entry deleted": (_delete(["files", "dense/lm_head.onnx"]), "'files' does not list"),
    "an expert's files entry deleted": (_delete(["files", "experts/dec.L01.E03.bin"]), "'files' does not list"),
    "a tensor offset of 10^12": (_set(["experts", 3, "tensors", 1, "offset"], 10**12), "lies at 8192"),
    "an offset inside the block": (_set(["experts", 3, "tensors", 1, "offset"], 0), "lies at 8192"),
    "two tensors swapped": (lambda m: m["experts"][1]["tensors"].reverse(), "not one of wi"),
    "a negative offset": (_set(["experts", 0, "tensors", 0, "offset"], -8), "outside 0.."),
    "a wrong shape": (_set(["experts", 0, "tensors", 0, "shape"], [32, 47]), "the kernel takes"),
    "an unknown dtype": (_set(["experts", 0, "tensors", 0, "dtype"], "float64"), "not one of"),
    "a tensor missing": (_delete(["experts", 0, "tensors", -1]), "kernel takes 2"),
    "a string for a size": (_set(["files", "tokenizer.json", "size"], "12"), "must be an integer"),
    "a boolean for a layer": (_set(["layers", 0, "layer"], True), "must be an integer"),
    "a NaN norm": (_set(["experts", 0, "norm"], float("nan")), "finite number"),
    "a huge d_model": (_set(["config", "d_model"], 10**30), "outside"),
    "no experts listed": (_set(["experts"], []), "lack"),
    "an expert listed twice": (lambda m: m["experts"].__setitem__(-1, m["experts"][0]), "listed twice"),
    "a layer missing": (_delete(["layers", -1]), "has no entry"),
    "a sparse layer's expert list short": (_set(["layers", 1, "experts"], [0, 1]), "must list experts"),
    "a part naming no subgraph": (_set(["layers", 0, "parts", "block"], "nowhere"), "is not a subgraph"),
    "a subgraph missing": (_delete(["subgraphs", "lm_head"]), "lacks what a Switch Transformer runs"),
    "a bad sha256": (_set(["files", "tokenizer.json", "sha256"], "xyz"), "64 lowercase hex"),
    "a newer schema": (_set(["schema_version"], 99), "newer than this runtime"),
    "an unknown family": (_set(["extra", "family"], "mamba"), "cannot run models of the 'mamba' family"),
    "an expert reading another's weights": (_set(["experts", 0, "weights_file"], "experts/enc.L01.E01.bin"),
                                            "not 'experts/enc.L01.E00.bin'"),
    "a layer running another layer's block": (_set(["layers", 0, "parts", "block"], "enc.L01.block"),
                                              "not this layer's 'enc.L00.block'"),
    "a subgraph on another's file": (_set(["subgraphs", "lm_head", "file"], "dense/enc.final_norm.onnx"),
                                     "not 'dense/lm_head.onnx'"),
    "a rung copy of another expert": (_set(["experts", 0, "rungs", "int4", "weights_file"], "experts/enc.L01.E01.int4.bin"),
                                      "not 'experts/enc.L01.E00.int4.bin'"),
    "a rung missing on one expert": (_delete(["experts", 2, "rungs", "int4"]), "the ladder's rungs"),
    "an out-of-range token id": (_set(["config", "eos_token_id"], 10**6), "outside"),
    "validation a list": (_set(["validation"], [1]), "must be a JSON object"),
    "max_source_tokens a string": (_set(["extra", "max_source_tokens"], "many"), "must be an integer"),
    "int4 settings on float experts": (_set(["expert_nbits"], {"bits": 4, "block_size": 32, "accuracy_level": 0}),
                                       "expert_nbits is set, but expert_dtype is float32"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_manifest_is_one_typed_error_that_says_where(art, case):
    edit, match = MALFORMED[case]
    path = art / "manifest.json"
    raw = json.loads(path.read_text())
    out = edit(raw)
    path.write_text(json.dumps(raw if out is None else out))
    with pytest.raises(ArtifactError, match=match):
        Runtime(art, RuntimeConfig(policy="full", threads=1))
    line = one_error_line(CliRunner().invoke(main, ["summarize", "--artifact", str(art), TEXT]))
    assert "manifest.json" in line or "family" in line


@pytest.mark.parametrize("text", ["", "{", "\xff", "[" * 100000, "null", '"string"', "1e999"])
def test_a_manifest_that_is_not_a_manifest_is_one_typed_error(art, text):
    (art / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match="manifest.json"):
        load_manifest(art)
