"""Export: parity of the ONNX split with PyTorch, the artifact contract, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from swapmoe_edge.core.errors import ArtifactError, CheckpointError, ExportError, ValidationError  # noqa: E402
from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.model.moe import route  # noqa: E402
from swapmoe_edge.model.sessions import open_session, session_options  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402
from swapmoe_export.validate import artifact_forward, sample_inputs, validate_artifact  # noqa: E402

from tiny import save_tiny, tiny_model  # noqa: E402

CONFIGS = {
    "4exp_step2": dict(num_experts=4),
    "8exp_all_sparse": dict(num_experts=8, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2),
    "16exp_deep_enc": dict(num_experts=16, num_layers=4, num_decoder_layers=2, num_sparse_encoder_layers=2),
    "dkv_x_heads_ne_dmodel": dict(d_kv=12, num_heads=3, num_decoder_layers=3, num_sparse_decoder_layers=3),
    "capacity_overflow": dict(num_experts=4, expert_capacity=2),
    "untied_gelu": dict(tie_word_embeddings=False, dense_act_fn="gelu_new"),
}


def _hf_logits(model, ids, mask, dec) -> np.ndarray:
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            decoder_input_ids=torch.from_numpy(dec),
        ).logits.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (hf model, artifact dir), each exported once per test module."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, overrides in CONFIGS.items():
        model = tiny_model(seed=1, **overrides)
        model.save_pretrained(root / name / "ckpt")
        export_checkpoint(root / name / "ckpt", root / name / "art", quiet=True)
        out[name] = (model, root / name / "art")
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_split_model_logits_match_pytorch_within_1e4(exported, name):
    model, art = exported[name]
    c = model.config
    ids, mask, dec = sample_inputs(c.vocab_size, c.pad_token_id, c.decoder_start_token_id, seed=3, batch=3, src=20, tgt=7)
    got, _ = artifact_forward(art, ids, mask, dec)
    ref = _hf_logits(model, ids, mask, dec)
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) < 1e-4


def test_capacity_overflow_case_really_drops_tokens(exported):
    """The overflow config must overflow, else the parity test above proves nothing about it."""
    model, art = exported["capacity_overflow"]
    c = model.config
    ids, mask, dec = sample_inputs(c.vocab_size, c.pad_token_id, c.decoder_start_token_id, seed=3, batch=3, src=20, tgt=7)
    captured = []
    with torch.no_grad():
        router = model.encoder.block[1].layer[1].mlp.router
        handle = router.register_forward_hook(lambda m, a, out: captured.append(out[2].numpy()))
        _hf_logits(model, ids, mask, dec)
        handle.remove()
    r = route(captured[0], c.expert_capacity)
    assert (~r.keep).sum() > 0


def test_every_expert_subgraph_runs_alone_and_matches_its_pytorch_expert(exported):
    model, art = exported["8exp_all_sparse"]
    manifest = load_manifest(art)
    x = np.random.default_rng(0).standard_normal((5, model.config.d_model)).astype(np.float32)
    opts = session_options()
    for key, entry in manifest.experts.items():
        stack = getattr(model, key.stack)
        ff = stack.block[key.layer].layer[-1]
        expert = ff.mlp.experts[f"expert_{key.expert}"]
        with torch.no_grad():
            ref = expert(torch.from_numpy(x)).numpy()
        got = open_session(manifest.path(entry.graph.file), opts).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_manifest_records_sizes_hashes_norms_and_aligned_expert_blocks(exported):
    model, art = exported["4exp_step2"]
    manifest = load_manifest(art, verify=True)  # re-hashes every file
    assert set(manifest.files) == {str(p.relative_to(art)) for p in art.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert len(manifest.experts) == 4 * 2
    for key, entry in manifest.experts.items():
        expert = getattr(model, key.stack).block[key.layer].layer[-1].mlp.experts[f"expert_{key.expert}"]
        norm = float(torch.sqrt(expert.wi.weight.pow(2).sum() + expert.wo.weight.pow(2).sum()))
        assert entry.norm == pytest.approx(norm, rel=1e-5)
        assert all(t.offset % 4096 == 0 for t in entry.tensors)
        assert entry.nbytes == (art / entry.weights_file).stat().st_size
        raw = (art / entry.weights_file).read_bytes()
        wi = entry.tensors[0]
        got = np.frombuffer(raw, np.float32, count=int(np.prod(wi.shape)), offset=wi.offset).reshape(wi.shape)
        np.testing.assert_array_equal(got, expert.wi.weight.detach().numpy().T)
    s = manifest.summary()
    graph_bytes = sum(manifest.files[e.graph.file].size for e in manifest.experts.values())
    assert s["expert_bytes"] + s["dense_bytes"] + graph_bytes + s["ladder_bytes"] == s["total_bytes"]
    assert s["ladder_bytes"] > s["ladder"]["int4"]["bytes"] > 0  # the copies, and the rung's two graphs
    assert manifest.validation["passed"]


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_sharded_safetensors_and_pytorch_bin_export_the_same_artifact(tmp_path, fmt):
    model = tiny_model(seed=2)
    if fmt == "sharded":
        model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
        assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    else:
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        model.config.save_pretrained(tmp_path / "ckpt")
        shutil.move(tmp_path / "pytorch_model.bin", tmp_path / "ckpt" / "pytorch_model.bin")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "art", quiet=True)
    c = model.config
    ids, mask, dec = sample_inputs(c.vocab_size, c.pad_token_id, c.decoder_start_token_id)
    got, _ = artifact_forward(tmp_path / "art", ids, mask, dec)
    assert np.max(np.abs(got - _hf_logits(model, ids, mask, dec))) < 1e-4


def test_float16_export_halves_expert_bytes_and_matches_fp16_rounded_weights(tmp_path):
    save_tiny(tmp_path / "ckpt", seed=4)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "a32", quiet=True)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "a16", dtype="float16", quiet=True)  # validates vs fp16-rounded torch
    m32, m16 = load_manifest(tmp_path / "a32"), load_manifest(tmp_path / "a16")
    e32 = sum(t.nbytes for e in m32.experts.values() for t in e.tensors)
    e16 = sum(t.nbytes for e in m16.experts.values() for t in e.tensors)
    assert e16 * 2 == e32
    assert m16.validation["passed"] and m16.dtype == "float16"
    # the float16 table is gathered, then its rows cast: a Cast of the whole table would be
    # folded by ONNX Runtime into a float32 copy of it at load
    ops = [n.op_type for n in onnx.load(str(m16.path("dense/embed.onnx")), load_external_data=False).graph.node]
    assert ops[:2] == ["Gather", "Cast"] and ops.count("Cast") == 1
    assert "Cast" not in [n.op_type for n in onnx.load(str(m32.path("dense/embed.onnx")), load_external_data=False).graph.node]


def test_float16_experts_stay_within_rounding_of_the_float32_model(tmp_path):
    """float16 experts against the float32 PyTorch model itself, not a rounded copy.

    Rounding a weight to float16 moves it by at most 2**-11 (4.9e-4) of its value; over the
    two matmuls of an expert and the sparse layers of both stacks the relative errors add
    up roughly as a random walk, so the logits should move by about 1e-3 of their RMS
    (0.14% measured on a random switch-base-8). 5e-3 leaves that margin and still fails a
    real defect: a transposed or mis-scaled expert moves the logits by tens of percent.
    """
    save_tiny(tmp_path / "ckpt", seed=4)
    model = tiny_model(seed=4)  # the same weights, in float32
    export_checkpoint(tmp_path / "ckpt", tmp_path / "a16", expert_dtype="float16", quiet=True)
    c = model.config
    ids, mask, dec = sample_inputs(c.vocab_size, c.pad_token_id, c.decoder_start_token_id)
    got, _ = artifact_forward(tmp_path / "a16", ids, mask, dec)
    want = _hf_logits(model, ids, mask, dec)
    rel = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want ** 2))
    assert 0 < rel < 5e-3, rel  # > 0: the experts really are float16
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def test_reexport_into_the_same_directory_replaces_the_artifact(tmp_path):
    save_tiny(tmp_path / "a", seed=5)
    save_tiny(tmp_path / "b", seed=6, num_experts=8)
    export_checkpoint(tmp_path / "a", tmp_path / "art", quiet=True, validate=False)
    export_checkpoint(tmp_path / "b", tmp_path / "art", quiet=True, validate=False)
    assert load_manifest(tmp_path / "art", verify=True).config.num_experts == 8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_validation_reports_every_mismatch_in_one_typed_error(tmp_path):
    save_tiny(tmp_path / "a", seed=7)
    save_tiny(tmp_path / "b", seed=8)
    export_checkpoint(tmp_path / "a", tmp_path / "art", quiet=True, validate=False)
    with pytest.raises(ValidationError) as info:
        validate_artifact(tmp_path / "b", tmp_path / "art")
    assert len(info.value.mismatches) > 1
    assert any("logits" in m for m in info.value.mismatches)


def test_validation_compares_every_expert_alone_and_names_a_wrong_one(tmp_path):
    """The block checks see only the experts their tokens reach; each expert is also run alone
    against the checkpoint's weights for it, so a wrong expert is named whatever the routing."""
    from safetensors.torch import load_file, save_file

    model = tiny_model(seed=7, num_experts=8, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)
    model.save_pretrained(tmp_path / "ck")
    art = export_checkpoint(tmp_path / "ck", tmp_path / "art", quiet=True, validate=False)
    report = validate_artifact(tmp_path / "ck", art)
    experts = list(load_manifest(art).experts)
    assert report["experts_compared"] == len(experts) == 32  # 4 sparse layers of 8
    assert 0 < report["expert_worst_share_of_bound"] <= 1
    key = next(k for k in reversed(experts) if k.stack == "decoder" and k.expert == 5)
    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    name = f"decoder.block.{key.layer}.layer.2.mlp.experts.expert_5.wo.weight"
    state[name] = state[name] * 1.01  # the checkpoint's expert differs from the artifact's
    save_file(state, str(tmp_path / "ck" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValidationError) as info:
        validate_artifact(tmp_path / "ck", art)
    assert any(m.startswith(f"expert {key.name}") for m in info.value.mismatches), info.value.mismatches


# -- bad input -------------------------------------------------------------------------


def _no_artifact_left(parent: Path, out: Path) -> None:
    assert not (out / "manifest.json").exists()
    assert [p for p in parent.iterdir() if ".partial-" in p.name] == []


def test_directory_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "art", quiet=True)
    _no_artifact_left(tmp_path, tmp_path / "art")


def test_config_of_another_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(CheckpointError, match="model_type='t5'.*exports Switch Transformers .* and the decoder-only "
                                              "MoE classes MixtralForCausalLM, .*OlmoeForCausalLM"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "art", quiet=True)
    _no_artifact_left(tmp_path, tmp_path / "art")


def test_truncated_safetensors_is_a_clear_error_and_leaves_no_artifact(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", seed=9)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        export_checkpoint(ckpt, tmp_path / "art", quiet=True)
    _no_artifact_left(tmp_path, tmp_path / "art")


def test_output_path_that_is_a_file_is_refused(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", seed=10)
    (tmp_path / "out").write_text("keep me")
    with pytest.raises(ExportError, match="existing file"):
        export_checkpoint(ckpt, tmp_path / "out", quiet=True)
    assert (tmp_path / "out").read_text() == "keep me"


def test_non_artifact_directory_is_never_overwritten(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", seed=11)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(ckpt, tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_truncated_artifact_file_is_caught_at_load(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", seed=12)
    export_checkpoint(ckpt, tmp_path / "art", quiet=True, validate=False)
    victim = next((tmp_path / "art" / "experts").glob("*.bin"))
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=victim.name):
        load_manifest(tmp_path / "art")


# -- CLI -------------------------------------------------------------------------------


def test_cli_export_and_info(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", seed=13)
    exe = [sys.executable, "-m", "swapmoe_edge"]
    r = subprocess.run([*exe, "export", str(ckpt), "-o", str(tmp_path / "art")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "[export" in r.stderr and "validated" in r.stderr
    r = subprocess.run([*exe, "info", str(tmp_path / "art"), "--json"], capture_output=True, text=True)
    info = json.loads(r.stdout)
    assert info["experts_total"] == 8 and info["validated"] is True
    assert (info["family"], info["top_k"], info["architecture"]) == ("switch", 1, "SwitchTransformersForConditionalGeneration")
    r = subprocess.run([*exe, "info", str(tmp_path / "art")], capture_output=True, text=True)
    assert f"top-1 routing, capacity {info['expert_capacity']}" in r.stdout
    assert f"layers          encoder {info['encoder_layers']}, decoder {info['decoder_layers']}; sparse: " in r.stdout
    r = subprocess.run([*exe, "export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_streamed_pytorch_reference_equals_the_whole_model(exported):
    """Validation trusts the one-module-at-a-time PyTorch run: it must equal the plain model."""
    from swapmoe_export.reference import streamed_hf_forward

    model, art = exported["untied_gelu"]
    c = model.config
    ids, mask, dec = sample_inputs(c.vocab_size, c.pad_token_id, c.decoder_start_token_id, seed=5)
    ckpt = art.parent / "ckpt"
    ref = streamed_hf_forward(ckpt, ids, mask, dec)
    np.testing.assert_array_equal(ref.logits, _hf_logits(model, ids, mask, dec))
    assert set(ref.block_in) == set(ref.block_out) and len(ref.block_out) == c.num_layers + c.num_decoder_layers


def test_int8_experts_validate_against_their_own_weights_and_take_about_a_quarter(tmp_path):
    """int8 is lossy: the artifact must run exactly the quantised weights the reference uses."""
    from swapmoe_export.quant import dequantize_int8, quantize_int8

    save_tiny(tmp_path / "ckpt", seed=14, d_model=64, d_ff=512, d_kv=16)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "f32", quiet=True)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "i8", expert_dtype="int8", quiet=True)  # raises on mismatch
    m32, m8 = load_manifest(tmp_path / "f32"), load_manifest(tmp_path / "i8", verify=True)
    assert m8.expert_dtype == "int8" and m8.dtype == "float32" and m8.validation["passed"]
    w32 = sum(t.nbytes for e in m32.experts.values() for t in e.tensors)
    w8 = sum(t.nbytes for e in m8.experts.values() for t in e.tensors)
    assert w8 < 0.27 * w32  # int8 weights plus one float32 scale per output column
    assert m8.expert_bytes < 0.3 * m32.expert_bytes
    w = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
    q, s = quantize_int8(w)
    assert q.dtype == np.int8 and np.abs(dequantize_int8(q, s) - w).max() <= s.max() / 2 + 1e-6


def test_int4_experts_are_matmulnbits_blocks_of_32_inputs_with_a_float32_scale():
    """Layout: q[N, K/32, 16] with n = q + 8, the lower input in the low nibble; scale[N, K/32]."""
    from swapmoe_export.ladder import int4_expert
    from swapmoe_export.quant import INT4_GROUP, as_stored

    rng = np.random.default_rng(1)
    wi, wo = rng.standard_normal((96, 10)).astype(np.float32), rng.standard_normal((10, 96)).astype(np.float32)
    wi[32:64, 3] = 0.0  # a zero block stores zeros
    parts, (di, do) = int4_expert(wi, wo)
    assert parts["wi"].dtype == np.uint8 and parts["wi"].shape == (10, 96 // INT4_GROUP, INT4_GROUP // 2)
    assert parts["wi_scale"].dtype == np.float32 and parts["wi_scale"].shape == (10, 3)
    assert parts["wo"].shape == (96, 1, 16) and parts["wo_scale"].shape == (96, 1)  # 10 inputs: one padded block
    lo, hi = parts["wi"] & 15, parts["wi"] >> 4
    n = np.stack([lo, hi], axis=-1).reshape(10, 96)  # [N, K], inputs in order
    q = n.astype(np.int16) - 8
    # symmetric: each block's largest weight lands on +-7 (or -8 just past it)
    amax_q = np.abs(q.reshape(10, 3, INT4_GROUP)).max(axis=2)
    assert set(np.unique(np.delete(amax_q, 3, axis=0))) <= {7, 8} and amax_q[3, 1] == 0
    step = np.repeat(parts["wi_scale"], INT4_GROUP, axis=1).T  # [96, 10]
    assert np.all(np.abs(di - wi) <= step / 2 + 1e-6) and np.all(di[32:64, 3] == 0)
    np.testing.assert_array_equal(as_stored(wi, "int4"), di)
    np.testing.assert_array_equal(as_stored(wo, "int4"), do)
    np.testing.assert_array_equal(q.T * step, di)


def test_int4_experts_validate_against_their_own_weights_and_take_about_a_seventh(tmp_path):
    """int4 is lossy: the artifact runs exactly the quantised weights the reference uses."""
    from swapmoe_edge.artifact.store import ExpertStore
    from swapmoe_export.quant import as_stored

    save_tiny(tmp_path / "ckpt", seed=14, d_model=64, d_ff=512, d_kv=16)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "f32", quiet=True, validate=False)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "i4", expert_dtype="int4", quiet=True)  # raises on mismatch
    m32, m4 = load_manifest(tmp_path / "f32"), load_manifest(tmp_path / "i4", verify=True)
    assert m4.expert_dtype == "int4" and m4.dtype == "float32" and m4.validation["passed"]
    assert m4.expert_dtype_lossy and m4.summary()["expert_dtype_lossy"] and not m32.expert_dtype_lossy
    assert json.loads((tmp_path / "i4" / "manifest.json").read_text())["expert_dtype_lossy"] is True
    w32 = sum(t.nbytes for e in m32.experts.values() for t in e.tensors)
    w4 = sum(t.nbytes for e in m4.experts.values() for t in e.tensors)
    assert w4 == pytest.approx(w32 * 0.625 / 4)  # half a byte a weight plus a float32 scale per 32
    assert all(e.nbytes == (tmp_path / "i4" / e.weights_file).stat().st_size for e in m4.experts.values())
    assert m4.expert_bytes < 0.17 * m32.expert_bytes  # the budget counts these bytes (alignment padding included)

    # The shared kernel, fed the bytes the store reads, computes act(x wi) wo on the as_stored weights.
    key = next(iter(m4.experts))
    model = tiny_model(seed=14, d_model=64, d_ff=512, d_kv=16)
    expert = getattr(model, key.stack).block[key.layer].layer[-1].mlp.experts[f"expert_{key.expert}"]
    wi = as_stored(expert.wi.weight.detach().numpy().T, "int4")
    wo = as_stored(expert.wo.weight.detach().numpy().T, "int4")
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    kernel = open_session(m4.path(m4.subgraphs["expert_kernel"].file), session_options())
    got = kernel.run(None, {"x": x, **ExpertStore(m4).read(key).feeds})[0]
    ref = np.maximum(x @ wi, 0) @ wo  # the tiny model's act is relu; sums differ in order only
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    alone = open_session(m4.path(m4.experts[key].graph.file), session_options()).run(None, {"x": x})[0]
    np.testing.assert_allclose(alone, got, rtol=1e-5, atol=1e-5 * np.abs(ref).max())  # ORT prepacks constant weights


def test_int4_experts_need_no_multiple_of_32(tmp_path):
    """MatMulNBits pads the last block of inputs: d_model 32, d_ff 48 export and validate as int4."""
    save_tiny(tmp_path / "ckpt", seed=3)  # d_model 32, d_ff 48
    export_checkpoint(tmp_path / "ckpt", tmp_path / "i4", expert_dtype="int4", quiet=True)  # raises on mismatch
    m = load_manifest(tmp_path / "i4", verify=True)
    assert m.validation["passed"] and m.expert_dtype == "int4"
    wo = next(t for t in next(iter(m.experts.values())).tensors if t.role == "wo")
    assert tuple(wo.shape) == (32, 2, 16)  # 48 inputs: a full block and a padded one


def test_the_pytorch_reference_in_a_child_process_gives_the_in_process_outputs(tmp_path, monkeypatch):
    from swapmoe_export import reference

    ckpt = save_tiny(tmp_path / "ckpt", seed=41)
    ids, mask, dec = sample_inputs(tiny_model(41).config.vocab_size, 0, 1)
    monkeypatch.setenv(reference.IN_PROCESS_ENV, "inprocess")
    here = reference.reference_forward_in_child(ckpt, ids, mask, dec)
    monkeypatch.delenv(reference.IN_PROCESS_ENV)
    child = reference.reference_forward_in_child(ckpt, ids, mask, dec)
    # the same computation; the child's torch may use more threads, so sums differ in rounding only
    close = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(child.logits, here.logits, **close)
    np.testing.assert_allclose(child.encoder_out, here.encoder_out, **close)
    for got, want in ((child.block_in, here.block_in), (child.block_out, here.block_out)):
        assert got.keys() == want.keys() and len(want) > 0
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5 * float(np.abs(want[k]).max()))
