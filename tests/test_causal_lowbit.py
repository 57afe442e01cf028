"""int8/int4 dense weights of decoder-only top-k models (MatMulNBits for q/k/v/o, the shared
expert and the LM head): every family exports and validates against PyTorch on the same
quantised weights, the quantisation's own loss is reported, greedy gives the tokens of HF's model
running those weights, and every policy serves the low-bit artifact."""

from __future__ import annotations

import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.core.errors import ExportError  # noqa: E402
from swapmoe_edge.model.generate import Decoding, last_step  # noqa: E402
from swapmoe_edge.residency.policies import POLICIES  # noqa: E402
from swapmoe_edge.runtime.config import RuntimeConfig  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime  # noqa: E402
from swapmoe_edge.runtime.load import load_model  # noqa: E402
from swapmoe_export.causal_export import export_causal  # noqa: E402
from swapmoe_export.causal_validate import NBITS_LINEAR, nbits_weight  # noqa: E402
from swapmoe_export.reference import _quantize_activations_hook  # noqa: E402

import causal_tiny as ct  # noqa: E402

NEW = 10


@pytest.fixture(scope="module")
def int8_models(tmp_path_factory):
    """family -> (HF model, checkpoint, int8-dense artifact with float32 experts, validated)."""
    root = tmp_path_factory.mktemp("causal-lowbit")
    out = {}
    for fam in ct.FAMILIES:
        model = ct.build(fam, seed=3)
        ck = ct.save(model, root / f"ck-{fam}")
        out[fam] = (model, ck, export_causal(ck, root / f"art-{fam}", dtype="int8", expert_dtype="float32", ladder_rungs=(),
                                             quiet=True))
    return out


def as_quantised(model, nbits: dict):
    """``model`` with the artifact's MatMulNBits weights dequantised and, at accuracy level 4, the
    kernel's int8 rounding of their inputs: what the artifact computes, in PyTorch."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if NBITS_LINEAR.search(name) or name == "lm_head":
                bits = nbits["lm_head_bits"] if name == "lm_head" else nbits["bits"]
                module.weight.copy_(torch.from_numpy(nbits_weight(module.weight.numpy(), bits, nbits["block_size"])))
                if nbits["accuracy_level"] == 4:
                    module.register_forward_pre_hook(_quantize_activations_hook(nbits["block_size"]))
    return model


def _ops(m, name: str) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in onnx.load(str(m.path(m.subgraphs[name].file)), load_external_data=False).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


@pytest.mark.parametrize("family", list(ct.FAMILIES))
def test_int8_dense_exports_validates_and_reports_its_loss(int8_models, family):
    _, _, art = int8_models[family]
    m = load_manifest(art)
    assert m.dense_nbits == {"bits": 8, "block_size": 64, "accuracy_level": 4, "lm_head_bits": 8, "float_dtype": "float32",
                             "router": "float32"}
    v = m.validation
    assert v["passed"] and v["block_worst_share_of_bound"] <= 1.0
    loss = v["quantisation_vs_float"]
    assert loss["max_abs_logit_diff"] > 0 and 0 <= loss["top1_agreement"] <= 1  # lossy, and measured
    step = _ops(m, "dec.L00.step")
    shared = 2 if family == "qwen2_moe" else 0  # the shared expert's gate|up and down
    assert step["MatMulNBits"] == 4 + shared  # q, k, v, o (+ shared): the router stays a float MatMul
    assert _ops(m, "lm_head")["MatMulNBits"] == 1 and "MatMulNBits" not in _ops(m, "embed")


@pytest.mark.parametrize("family", list(ct.FAMILIES))
def test_int8_dense_greedy_equals_hf_on_the_quantised_weights(int8_models, family):
    model, _, art = int8_models[family]
    parts = load_model(art, RuntimeConfig(policy="full", verify="never"))
    ref = as_quantised(ct.build(family, seed=3), parts.manifest.dense_nbits)
    rows = ct.prompts()
    got = last_step(parts.family.generate(parts.model, rows, Decoding(max_new_tokens=NEW)))
    assert got == ct.hf_greedy(ref, rows, NEW)


def test_int4_dense_with_int4_experts_and_a_ladder_validates_and_serves_every_policy(tmp_path):
    ck = ct.save(ct.build("qwen2_moe", seed=5), tmp_path / "ck")
    art = export_causal(ck, tmp_path / "art", dtype="int4", expert_dtype="float16", quiet=True)
    m = load_manifest(art)
    assert m.dense_nbits["bits"] == 4 and m.dense_nbits["lm_head_bits"] == 8 and m.dense_nbits["block_size"] == 32
    assert m.validation["passed"] and "int4" in m.ladder
    full = None
    for policy in ["full", *[p for p in POLICIES if p != "full"]]:
        with Runtime(art, RuntimeConfig(policy=policy, budget="100%" if policy == "full" else "25%", threads=1,
                                        verify="never", reserve_bytes=0)) as rt:
            results = rt.generate(ct.prompts(), max_new_tokens=6)
        tokens = [r.token_ids for r in results]
        assert all(len(t) >= 1 for t in tokens), policy
        full = full or tokens
        if POLICIES[policy].exact:
            assert tokens == full, policy


def test_block_size_accuracy_level_and_lm_head_are_honoured_and_checked(int8_models, tmp_path):
    _, ck, _ = int8_models["olmoe"]
    art = export_causal(ck, tmp_path / "a", dtype="int4", block_size=64, accuracy_level=0, lm_head="int4",
                        expert_dtype="float32", ladder_rungs=(), quiet=True)
    nb = load_manifest(art).dense_nbits
    assert (nb["bits"], nb["block_size"], nb["accuracy_level"], nb["lm_head_bits"]) == (4, 64, 0, 4)
    with pytest.raises(ExportError, match="--block-size"):
        export_causal(ck, tmp_path / "b", dtype="int8", block_size=48, quiet=True, validate=False)
    with pytest.raises(ExportError, match="apply to --dtype int8 or int4"):
        export_causal(ck, tmp_path / "c", dtype="float32", block_size=32, quiet=True, validate=False)


def test_validation_fails_when_the_reference_ignores_the_quantisation(int8_models, monkeypatch, tmp_path):
    from swapmoe_edge.core.errors import ValidationError
    from swapmoe_export import causal_validate

    _, ck, _ = int8_models["mixtral"]
    real = causal_validate.streamed_reference
    monkeypatch.setattr(causal_validate, "streamed_reference", lambda *a: real(*a[:6]))  # float weights
    with pytest.raises(ValidationError):
        export_causal(ck, tmp_path / "x", dtype="int4", expert_dtype="float32", ladder_rungs=(), quiet=True)
