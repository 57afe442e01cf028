"""Export of decoder-only top-k MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): tiny random
models of each family built in-process; both checkpoint layouts; each expert subgraph alone."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.core.errors import CheckpointError, ExportError  # noqa: E402
from swapmoe_edge.model.causal import causal_config  # noqa: E402
from swapmoe_edge.model.families import family_of  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402
from swapmoe_export.causal_export import export_causal  # noqa: E402

import causal_tiny as ct  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (HF model, checkpoint dir, artifact dir), exported through export_checkpoint with validation."""
    root = tmp_path_factory.mktemp("causal")
    out = {}
    for fam in ct.FAMILIES:
        model = ct.build(fam)
        ck = ct.save(model, root / f"ck-{fam}")
        out[fam] = (model, ck, export_checkpoint(ck, root / f"art-{fam}", quiet=True))
    return out


@pytest.mark.parametrize("family", list(ct.FAMILIES))
def test_each_family_exports_validated_with_its_decoder_config(exported, family):
    model, _, art = exported[family]
    m = load_manifest(art)
    assert m.validation["passed"] and m.validation["max_abs_diff"] < 1e-4
    assert m.extra["family"] == "causal" and m.extra["expert_act"] == "swiglu"
    assert m.extra["hf_architecture"] == type(model).__name__
    c = causal_config(m)
    assert (c.num_experts, c.top_k, c.num_layers) == (ct.EXPERTS, ct.TOP_K, ct.LAYERS)
    assert c.norm_topk_prob == (family in ("mixtral", "qwen3_moe"))
    assert c.shared_expert_size == (48 if family == "qwen2_moe" else 0)
    assert len(m.experts) == ct.EXPERTS * ct.LAYERS
    assert family_of(m).top_k == ct.TOP_K
    family_of(m).check(m)


def test_info_names_top_k_routing_without_a_capacity(exported):
    from click.testing import CliRunner

    from swapmoe_edge.cli.main import main as cli

    _, _, art = exported["qwen3_moe"]
    summary = load_manifest(art).summary()
    assert (summary["family"], summary["top_k"]) == ("causal", ct.TOP_K)
    out = CliRunner().invoke(cli, ["info", str(art)])
    assert out.exit_code == 0, out.output
    assert f"top-{ct.TOP_K} routing, no capacity" in out.output and str(summary["expert_capacity"]) not in out.output
    assert summary["architecture"] == "Qwen3MoeForCausalLM"
    assert f"layers          {ct.LAYERS}, decoder-only (Qwen3MoeForCausalLM); sparse: " in out.output


@pytest.mark.parametrize("family", list(ct.FAMILIES))
def test_every_expert_subgraph_alone_matches_the_torch_expert(exported, family):
    model, _, art = exported[family]
    m = load_manifest(art)
    x = np.random.default_rng(0).standard_normal((5, ct.HIDDEN)).astype(np.float32)
    for key, entry in m.experts.items():
        experts = model.model.layers[key.layer].mlp.experts
        with torch.no_grad():
            gate, up = torch.nn.functional.linear(torch.from_numpy(x), experts.gate_up_proj[key.expert]).chunk(2, dim=-1)
            ref = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, experts.down_proj[key.expert]).numpy()
        got = ort.InferenceSession(str(m.path(entry.graph.file))).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=key.name)


def test_fused_expert_tensors_export_the_same_experts(exported, tmp_path):
    model, _, art = exported["mixtral"]
    ck = ct.save(model, tmp_path / "fused", fused=True)
    names = json.loads((ck / "config.json").read_text())
    assert names["architectures"] == ["MixtralForCausalLM"]
    fused = export_causal(ck, tmp_path / "art", quiet=True, validate=False)
    a, b = load_manifest(art), load_manifest(fused)
    for key in a.experts:
        assert a.path(a.experts[key].weights_file).read_bytes() == b.path(b.experts[key].weights_file).read_bytes()


@pytest.mark.parametrize("expert_dtype", ["float16", "int8", "int4"])
def test_lossy_expert_storage_validates_against_the_rounded_model(exported, tmp_path, expert_dtype):
    _, ck, _ = exported["olmoe"]
    m = load_manifest(export_causal(ck, tmp_path / expert_dtype, expert_dtype=expert_dtype, quiet=True))
    assert m.expert_dtype == expert_dtype and m.expert_dtype_lossy and m.validation["passed"]
    assert m.expert_nbits == ({"bits": 4, "block_size": 32, "accuracy_level": 0} if expert_dtype == "int4" else None)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_int4_experts_at_accuracy_level_4_validate_and_reproduce_transformers_rounding_alike(exported, tmp_path, family):
    """--expert-accuracy-level 4 on a decoder-only family: the experts' MatMulNBits round their
    inputs to int8 per block of 32; export validates against transformers' expert loop rounding them
    alike, and `full` gives the tokens of that model (greedy, a left-padded batch)."""
    import copy

    import onnx

    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig
    from swapmoe_export.causal_validate import rounded_experts
    from swapmoe_export.quant import as_stored

    model, ck, _ = exported[family]
    art = export_checkpoint(ck, tmp_path / "a4", expert_dtype="int4", expert_accuracy_level=4, quiet=True)  # validates
    m = load_manifest(art, verify=True)
    assert m.expert_nbits == {"bits": 4, "block_size": 32, "accuracy_level": 4} and m.validation["passed"]
    graph = onnx.load(str(m.path(next(iter(m.experts.values())).graph.file)), load_external_data=False).graph
    levels = [a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    assert levels == [4, 4]
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for layer in rounded.model.layers:
            ex = layer.mlp.experts
            for p in (ex.gate_up_proj, ex.down_proj):  # [E, out, in]: each expert as the artifact stores it
                p.copy_(torch.stack([torch.from_numpy(as_stored(w.numpy().T, "int4").T.copy()) for w in p]))
    rounded.config._experts_implementation = rounded_experts(32)
    rows = ct.prompts()
    with Runtime(art, RuntimeConfig(policy="full")) as rt:
        got = [r.token_ids for r in rt.generate(rows, max_new_tokens=8)]
    want = ct.hf_greedy(rounded, rows, 8)
    assert got == want
    rounded.config._experts_implementation = "eager"
    assert ct.hf_greedy(rounded, rows, 8) != want  # the rounding shows in the tokens


def test_a_level_4_artifact_checked_against_unrounded_experts_fails_validation(exported, tmp_path):
    """The reference's rounding is what lets a level-4 artifact pass: told its experts run at level 0
    (the graphs still round), validation finds the experts and the blocks off."""
    from swapmoe_edge.core.errors import ValidationError
    from swapmoe_export.causal_validate import validate_causal

    _, ck, _ = exported["olmoe"]
    art = export_checkpoint(ck, tmp_path / "a4", expert_dtype="int4", expert_accuracy_level=4, quiet=True, validate=False)
    path = art / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["expert_nbits"]["accuracy_level"] = 0
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValidationError, match="block output"):
        validate_causal(ck, art, expert_dtype="int4")


def test_expert_accuracy_level_4_needs_int4_experts_on_decoder_only_families_too(exported, tmp_path):
    _, ck, _ = exported["olmoe"]
    with pytest.raises(ExportError, match="applies to int4 experts"):
        export_checkpoint(ck, tmp_path / "a4", expert_dtype="float16", expert_accuracy_level=4, quiet=True)
    assert not (tmp_path / "a4").exists()


def test_ladder_copies_at_block_64_export_and_serve(exported, tmp_path):
    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig

    _, ck, _ = exported["olmoe"]
    art = export_checkpoint(ck, tmp_path / "b64", ladder_rungs=("int4",), ladder_block=64, quiet=True)  # checks the rung
    m = load_manifest(art, verify=True)
    wi = next(t for t in next(iter(m.experts.values())).rungs["int4"].tensors if t.role == "wi")
    assert m.ladder["int4"].block == 64 and wi.shape[2] == 32
    with Runtime(art, RuntimeConfig(policy="ladder", ladder_primary=False, threads=1)) as rt:
        assert all(len(r.token_ids) > 0 for r in rt.generate([[5, 6, 7, 8], [9, 10]], max_new_tokens=4))


def test_float16_dense_weights_export_and_validate(exported, tmp_path):
    _, ck, _ = exported["qwen2_moe"]
    m = load_manifest(export_causal(ck, tmp_path / "f16", dtype="float16", quiet=True))
    assert (m.dtype, m.expert_dtype) == ("float16", "float16") and m.validation["passed"]


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, said", [
    ({"hidden_act": "gelu"}, "silu only"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope type"),
    ({"mlp_only_layers": [1]}, "every layer must be sparse"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "attention kinds"),
])
def test_unsupported_settings_are_refused_by_name(exported, tmp_path, changes, said):
    _, ck, _ = exported["qwen3_moe"]
    bad = _edit_config(ck, tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError, match=said):
        export_causal(bad, tmp_path / "out", quiet=True, validate=False)
    assert not (tmp_path / "out").exists()


def test_a_missing_expert_tensor_is_named(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    _, ck, _ = exported["mixtral"]
    bad = _edit_config(ck, tmp_path / "bad")
    state = load_file(str(bad / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts\.3\.w2"):
        export_causal(bad, tmp_path / "out", quiet=True, validate=False)


def test_prompt_template_comes_from_swapmoe_json(exported, tmp_path):
    _, ck, _ = exported["olmoe"]
    good = _edit_config(ck, tmp_path / "good")
    (good / "swapmoe.json").write_text(json.dumps({"prompt_template": "Describe: {document}\nSynopsis:"}))
    m = load_manifest(export_causal(good, tmp_path / "out", quiet=True, validate=False))
    assert m.extra["prompt_template"] == "Describe: {document}\nSynopsis:"
    (good / "swapmoe.json").write_text(json.dumps({"prompt_template": "no slot"}))
    with pytest.raises(CheckpointError, match="document"):
        export_causal(good, tmp_path / "out2", quiet=True, validate=False)


def test_ladder_without_swiglu_rungs_is_refused_not_written(exported, tmp_path, monkeypatch):
    from swapmoe_export import causal_export

    monkeypatch.setattr(causal_export, "swiglu_ladder", lambda: False)
    _, ck, _ = exported["olmoe"]
    with pytest.raises(ExportError, match="ladder"):
        export_causal(ck, tmp_path / "out", quiet=True, validate=False, ladder_rungs=("int4",))
    m = load_manifest(export_causal(ck, tmp_path / "out", quiet=True, validate=False))
    assert not m.ladder


def test_validation_names_the_wiring_when_the_artifact_is_another_models(exported, tmp_path):
    from swapmoe_edge.core.errors import ValidationError
    from swapmoe_export.causal_validate import validate_causal

    other = ct.save(ct.build("olmoe", seed=9), tmp_path / "other")
    with pytest.raises(ValidationError, match="wiring"):
        validate_causal(other, exported["olmoe"][2])


def test_validation_names_experts_whose_weight_blocks_were_swapped(exported, tmp_path):
    import shutil

    from swapmoe_edge.core.errors import ValidationError
    from swapmoe_export.causal_validate import validate_causal

    art = shutil.copytree(exported["qwen3_moe"][2], tmp_path / "art")
    m = load_manifest(art)
    a, b = (m.path(m.experts[k].weights_file) for k in sorted(m.experts)[2:4])
    block_a, block_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(block_b)
    b.write_bytes(block_a)
    with pytest.raises(ValidationError) as err:
        validate_causal(exported["qwen3_moe"][1], art)
    names = [k.name for k in sorted(m.experts)[2:4]]
    assert all(f"expert {n}" in str(err.value) for n in names)


def test_the_disk_estimate_covers_what_export_writes(exported, tmp_path):
    from swapmoe_export.causal_export import artifact_bytes

    _, ck, _ = exported["mixtral"]
    for expert_dtype in ("float32", "int8", "int4"):
        art = export_causal(ck, tmp_path / expert_dtype, expert_dtype=expert_dtype, quiet=True, validate=False,
                            ladder_rungs=() if expert_dtype == "int4" else None)
        m = load_manifest(art)
        written = sum(f.size for f in m.files.values())
        need = artifact_bytes(causal_config(m), "float32", expert_dtype, tuple(m.ladder))
        assert written <= need < 3 * written + (1 << 20)


@pytest.mark.parametrize("edit, said", [
    (lambda raw: raw["extra"]["causal_config"].update(num_experts=7), "num_experts"),
    (lambda raw: raw["extra"]["causal_config"].update(top_k=99), "top-99"),
    (lambda raw: raw["extra"].pop("causal_config"), "causal_config"),
    (lambda raw: raw["extra"].pop("expert_act"), "expert_act|wi"),
])
def test_a_manifest_whose_decoder_config_disagrees_is_refused_at_load(exported, tmp_path, edit, said):
    import shutil

    from swapmoe_edge.core.errors import ArtifactError
    from swapmoe_edge.runtime.config import RuntimeConfig
    from swapmoe_edge.runtime.load import load_model

    art = shutil.copytree(exported["mixtral"][2], tmp_path / "art")
    raw = json.loads((art / "manifest.json").read_text())
    edit(raw)
    (art / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=said):
        load_model(art, RuntimeConfig(policy="full", verify="never"))
