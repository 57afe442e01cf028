"""int8/int4 dense weights: MatMulNBits graphs at export, validation against the quantised PyTorch
model, the manifest and ``info``, every policy on such an artifact, the decode floor and budgets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.cli.main import main as cli
from swapmoe_edge.core.errors import ExportError
from swapmoe_edge.lab.decode_floor import bytes_per_token
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig
from swapmoe_edge.system.devices import list_profiles, profile_from_dict
from swapmoe_export import ladder, quant
from swapmoe_export.exporter import export_checkpoint

from tiny import save_tiny

# d_ff 512 as the ladder's tests: an int4 rung is then cheaper than a float32 expert session.
MODEL = dict(d_model=128, d_ff=512, d_kv=32, num_experts=8)
INPUTS = [[5, 6, 7, 8, 9, 10, 11, 12, 1], [13, 14, 15, 1], [20, 21, 22, 23, 24, 1]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("lowbit_ckpt"), seed=3, **MODEL)


@pytest.fixture(scope="module")
def float_art(ckpt, tmp_path_factory) -> Path:
    return export_checkpoint(ckpt, tmp_path_factory.mktemp("lowbit") / "f32", validate=False, quiet=True)


@pytest.fixture(scope="module")
def int4_art(ckpt, tmp_path_factory) -> Path:
    """int4 dense, float32 experts with their int4 ladder rung, validated against PyTorch."""
    return export_checkpoint(ckpt, tmp_path_factory.mktemp("lowbit") / "i4", dtype="int4", expert_dtype="float32", quiet=True)


def _cfg(**kw) -> RuntimeConfig:
    return RuntimeConfig(threads=1, read_mode="cached", **kw)


# -- the quantiser and the kernel -------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_dense_quantiser_is_the_ladders_at_its_block(bits):
    w = np.random.default_rng(bits).standard_normal((100, 24)).astype(np.float32)
    q, s = quant.quantize_nbits(w, bits, ladder.BLOCK)
    lq, ls = ladder.quantize(w, bits)
    assert np.array_equal(q, lq) and np.array_equal(s, ls)


@pytest.mark.parametrize("bits,block,level", [(4, 64, 4), (8, 32, 4), (4, 128, 0), (8, 64, 0)])
def test_matmulnbits_computes_the_dequantised_weights_on_rounded_activations(bits, block, level):
    """What validation's PyTorch side assumes of the kernel: the dequantised weights, and at
    accuracy level 4 the activations rounded per block (quant.quantize_activations), to float32
    rounding; the other level's assumption is off by far more (so the test can fail)."""
    rng = np.random.default_rng(0)
    k, n = 200, 96  # K not a multiple of the block: the last one is zero-padded
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, s = quant.quantize_nbits(w, bits, block)
    wd = ladder.dequantize(q, s, bits, k)
    node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, n])],
                          [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    rel = lambda ref: float(np.abs(y - ref).max() / np.abs(ref).max())  # noqa: E731
    assumed = quant.quantize_activations(x, block) if level == 4 else x
    other = x if level == 4 else quant.quantize_activations(x, block)
    assert rel(assumed.astype(np.float64) @ wd) < 1e-5 < 1e-3 < rel(other.astype(np.float64) @ wd)


def test_bad_settings_are_refused(ckpt, tmp_path):
    for kw, what in ((dict(dtype="int3"), "--dtype"), (dict(dtype="float32", block_size=32), "--block-size"),
                     (dict(dtype="int4", block_size=48), "--block-size"), (dict(dtype="int8", accuracy_level=2), "--accuracy-level"),
                     (dict(dtype="int8", lm_head="int4"), "--lm-head"), (dict(dtype="float16", lm_head="int8"), "--lm-head")):
        with pytest.raises(ExportError, match=what):
            export_checkpoint(ckpt, tmp_path / "x", validate=False, quiet=True, **kw)
        assert not (tmp_path / "x").exists()


# -- the artifact -------------------------------------------------------------------------------------

def test_every_dense_matmul_but_the_router_is_matmulnbits(int4_art):
    m = load_manifest(int4_art)
    assert (m.dtype, m.dense_dtype, m.expert_dtype) == ("float32", "int4", "float32") and m.dense_dtype_lossy
    assert m.dense_nbits == {"bits": 4, "block_size": quant.DEFAULT_BLOCK["int4"], "accuracy_level": 4, "lm_head_bits": 8,
                             "float_dtype": "float32", "router": "float32"}
    counts = {"MatMulNBits": 0, "router MatMul": 0, "other MatMul": 0}
    for name, sg in m.subgraphs.items():
        if name.startswith(("expert_kernel", "rung_kernel")):
            continue
        for node in onnx.load(str(m.path(sg.file)), load_external_data=False).graph.node:
            if node.op_type == "MatMulNBits":
                counts["MatMulNBits"] += 1
                assert dict((a.name, a.i) for a in node.attribute)["bits"] == (8 if name == "lm_head" else 4), name
            elif node.op_type in ("MatMul", "Gemm"):
                weight_like = any(i.endswith(".weight") for i in node.input)
                key = "router MatMul" if "router" in node.name else "other MatMul" if weight_like else None
                if key:
                    counts[key] += 1
    # per layer: q, k, v, o (decoder: qkv packed, o, cross q/o, cross k/v); dense FFN wi, wo; the LM head
    assert counts["other MatMul"] == 0 and counts["router MatMul"] == len(m.sparse_layers())
    assert counts["MatMulNBits"] >= 4 * 4 + 1


def test_validation_runs_the_quantised_model_and_reports_the_loss(int4_art):
    v = load_manifest(int4_art).validation
    assert v["passed"] and v["token_bound"]["worst_share_of_bound"] < 8
    q = v["quantisation_vs_float"]
    assert 0 < q["mean_abs_logit_diff"] <= q["max_abs_logit_diff"] and 0 <= q["top1_agreement"] <= 1


def test_info_shows_the_dense_type_and_bytes_per_part(int4_art, float_art):
    out = CliRunner().invoke(cli, ["info", str(int4_art)])
    assert out.exit_code == 0, out.output
    assert "dense int4 MatMulNBits (block 32, LM head int8, accuracy level 4, lossy)" in out.output and "by part" in out.output
    parts = {a: load_manifest(a).summary()["dense_parts"] for a in (int4_art, float_art)}
    assert parts[int4_art]["embeddings"] == parts[float_art]["embeddings"]  # stays float32
    for part in ("decoder blocks", "encoder blocks", "lm head"):
        assert parts[int4_art][part] < parts[float_art][part] / 3, part


def test_a_float_manifest_has_no_dense_nbits(float_art):
    m = load_manifest(float_art)
    raw = json.loads((float_art / "manifest.json").read_text())
    assert m.dense_dtype == "float32" and m.dense_nbits is None and "dense_nbits" not in raw


# -- serving --------------------------------------------------------------------------------------------

def test_every_policy_serves_an_int4_dense_artifact(int4_art):
    with Runtime(int4_art, _cfg(policy="full", budget="100%")) as rt:
        full = [r.token_ids for r in rt.generate(INPUTS, max_new_tokens=8)]
    assert all(full)
    for policy, budget in (("on-demand", "50%"), ("prune", "50%"), ("swapmoe", "50%"), ("ladder", "30%")):
        with Runtime(int4_art, _cfg(policy=policy, budget=budget)) as rt:
            got = [r.token_ids for r in rt.generate(INPUTS, max_new_tokens=8)]
        assert all(got), policy
        if policy == "on-demand":  # exact: every chosen expert is loaded
            assert got == full


def test_the_floor_counts_the_bytes_as_stored(int4_art, float_art):
    low, high = bytes_per_token(load_manifest(int4_art)), bytes_per_token(load_manifest(float_art))
    assert low.weights["expert (top-1)"] == high.weights["expert (top-1)"]  # float32 experts in both
    assert low.weights["lm_head"] < high.weights["lm_head"] / 3
    assert low.total < high.total and low.ort_calls == high.ort_calls


# -- device profiles -------------------------------------------------------------------------------------

def test_every_shipped_profile_says_which_dense_type_suits_it():
    for p in list_profiles():
        assert p.dense_dtype in quant.DENSE_DTYPES and len(p.dense_dtype_why) > 40, p.name
        assert p.to_json()["dense_dtype"] == p.dense_dtype
    d = list_profiles()[0].to_json()
    d.pop("dense_dtype"), d.pop("dense_dtype_why")
    assert profile_from_dict(d).dense_dtype == "float32"  # optional in a profile file
    with pytest.raises(Exception, match="dense_dtype"):
        profile_from_dict({**d, "dense_dtype": "int3"})


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_the_size_estimate_covers_a_low_bit_artifact(ckpt, tmp_path, dtype):
    from swapmoe_export import space
    from swapmoe_export.checkpoint import read_config

    art = export_checkpoint(ckpt, tmp_path / dtype, dtype=dtype, expert_dtype="float32", validate=False, quiet=True)
    m = load_manifest(art)
    _, cfg = read_config(ckpt)
    est = space.artifact_bytes(cfg, quant.dense_weights(dtype), "float32", tuple(m.ladder),
                               side_bytes=(ckpt / "tokenizer.json").stat().st_size)
    real = sum(-(-p.stat().st_size // space.BLOCK) * space.BLOCK for p in art.rglob("*") if p.is_file())
    assert real <= est <= 1.3 * real, (real, est)
    assert est < space.artifact_bytes(cfg, "float32", "float32", tuple(m.ladder), side_bytes=(ckpt / "tokenizer.json").stat().st_size)
