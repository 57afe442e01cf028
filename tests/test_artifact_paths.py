"""An artifact may only refer to files inside itself: manifest paths, the profile, the manifest itself and ONNX
external data (which the manifest must list too, so that its bytes were checked)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from swapmoe_edge.core.errors import ArtifactError  # noqa: E402
from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.artifact.onnx_refs import external_locations  # noqa: E402
from swapmoe_edge.model.sessions import DenseSessions, open_session, session_options  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_export import export_checkpoint, graphs  # noqa: E402

from tiny import save_tiny  # noqa: E402


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    return export_checkpoint(save_tiny(root / "ckpt", seed=8), root / "art", validate=False, quiet=True)


@pytest.fixture
def art(original, tmp_path):
    """A fresh copy per test, with a secret file beside it that no artifact may read."""
    copy = Path(shutil.copytree(original, tmp_path / "art", symlinks=True))
    (tmp_path / "secret.txt").write_text("not yours")
    return copy


def _edit_manifest(art: Path, edit) -> None:
    path = art / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _record(m: dict, art: Path, rel: str) -> None:
    """Give REL a correct size and hash, so only the path itself is wrong."""
    data = (art / rel).read_bytes() if (art / rel).exists() else b""
    m["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_the_exported_artifact_itself_loads(art):
    assert load_manifest(art, verify=True).tokenizer == "tokenizer.json"


def test_an_absolute_path_in_the_manifest_is_refused(art, tmp_path):
    secret = str(tmp_path / "secret.txt")

    def edit(m):
        m["tokenizer"] = secret
        m["files"][secret] = m["files"].pop("tokenizer.json")

    _edit_manifest(art, edit)
    with pytest.raises(ArtifactError, match="is an absolute path"):
        load_manifest(art)


def test_dotdot_in_the_manifest_is_refused(art):
    def edit(m):
        m["subgraphs"]["embed"]["file"] = "dense/../../secret.txt"
        m["files"]["dense/../../secret.txt"] = m["files"]["dense/embed.onnx"]  # listed, so only the path is wrong

    _edit_manifest(art, edit)
    with pytest.raises(ArtifactError, match=r"names 'dense/\.\./\.\./secret\.txt', which climbs out"):
        load_manifest(art)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_symlink_out_of_the_artifact_is_refused(art, tmp_path, what):
    if what == "file":
        (art / "tokenizer.json").unlink()
        os.symlink(tmp_path / "secret.txt", art / "tokenizer.json")
    else:
        shutil.move(art / "experts", tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", art / "experts")
    with pytest.raises(ArtifactError, match="outside the artifact"):
        load_manifest(art)


def test_a_symlink_that_stays_inside_the_artifact_is_fine(art):
    shutil.move(art / "tokenizer.json", art / "dense" / "tokenizer.json")
    os.symlink("dense/tokenizer.json", art / "tokenizer.json")
    assert load_manifest(art).tokenizer == "tokenizer.json"


def _graph_with_external_data(location: str):
    g = graphs.GraphBuilder("/embed")
    ids = g.input("input_ids", graphs.I64, ["B", "T"])
    w = g.weight("shared.weight", np.zeros((4, 8), np.float32), external={"location": location, "offset": 0})
    g.output(g.op("Gather", [w, ids], axis=0), "hidden", graphs.F32, ["B", "T", 8])
    return g.model().proto.SerializeToString()


@pytest.mark.parametrize("location", ["../secret.txt", "../../secret.txt", "/etc/hostname", "sub/../../../secret.txt"])
def test_onnx_external_data_outside_the_artifact_is_refused_before_onnx_runtime_reads_it(art, location):
    rel = "dense/embed.onnx"
    (art / rel).write_bytes(_graph_with_external_data(location))
    _edit_manifest(art, lambda m: _record(m, art, rel))
    manifest = load_manifest(art, verify=True)  # the manifest itself is fine; the ONNX file is not
    with pytest.raises(ArtifactError, match="external data"):
        DenseSessions(manifest).get("embed")


def test_onnx_external_data_through_a_symlink_out_is_refused(art, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 128)
    os.symlink(tmp_path / "weights.bin", art / "dense" / "w.bin")
    path = art / "dense" / "embed.onnx"
    path.write_bytes(_graph_with_external_data("w.bin"))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        open_session(path, session_options(1), root=art)


def test_external_data_inside_the_artifact_loads(art):
    path = art / "dense" / "embed.onnx"
    (art / "dense" / "w.bin").write_bytes(np.arange(32, dtype=np.float32).tobytes())
    path.write_bytes(_graph_with_external_data("w.bin"))
    out = open_session(path, session_options(1), root=art).run(None, {"input_ids": np.array([[1]], np.int64)})[0]
    assert out.ravel().tolist() == list(range(8, 16))


def test_external_locations_are_found_in_attributes_and_subgraphs_too():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def ext(name, loc):
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
        e = t.external_data.add()
        e.key, e.value = "location", loc
        return t

    const = helper.make_node("Constant", [], ["c"], value=ext("c", "../in_attribute.bin"))
    inner = helper.make_graph([helper.make_node("Constant", [], ["d"], value=ext("d", "/in_subgraph.bin"))], "then", [],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, [1])])
    branch = helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([const, branch], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [ext("w", "init.bin")])
    found = external_locations(helper.make_model(graph).SerializeToString())
    assert sorted(found) == ["../in_attribute.bin", "/in_subgraph.bin", "/in_subgraph.bin", "init.bin"]
    assert onnx  # the real package built these bytes


def test_a_profile_symlinked_out_of_the_artifact_is_refused(art, tmp_path):
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", art / "profile.json")
    with pytest.raises(ArtifactError, match="importance profile names 'profile.json', which resolves to .*outside the artifact"):
        Runtime(art, RuntimeConfig(policy="prune", threads=1))


def test_a_manifest_symlinked_out_of_the_artifact_is_refused(art, tmp_path):
    shutil.move(art / "manifest.json", tmp_path / "manifest.json")
    os.symlink(tmp_path / "manifest.json", art / "manifest.json")
    with pytest.raises(ArtifactError, match="manifest names 'manifest.json', which resolves to .*outside the artifact"):
        load_manifest(art)


def test_onnx_external_data_the_manifest_does_not_list_is_refused(art):
    (art / "dense" / "w.bin").write_bytes(np.arange(32, dtype=np.float32).tobytes())
    rel = "dense/embed.onnx"
    (art / rel).write_bytes(_graph_with_external_data("w.bin"))
    _edit_manifest(art, lambda m: _record(m, art, rel))  # the graph is listed; its data is not
    with pytest.raises(ArtifactError, match="reads external data from dense/w.bin, which the manifest does not list"):
        DenseSessions(load_manifest(art)).get("embed")
