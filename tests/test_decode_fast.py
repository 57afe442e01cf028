"""The fast decode path: fused layer graphs, one-token routing, the position-bias table, and
the bytes a token reads. Parity with HF is the contract; speed is measured by scripts/bench_decode.py."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from swapmoe_edge.lab.decode_floor import bytes_per_token  # noqa: E402
from swapmoe_edge.core.errors import InputError, ValidationError  # noqa: E402
from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.model.moe import dispatch, route, softmax  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402
from swapmoe_export.validate import validate_artifact  # noqa: E402

from tiny import hf_generate, save_tiny, tiny_model  # noqa: E402

OVERRIDES = dict(num_experts=8, num_layers=3, num_decoder_layers=3, num_sparse_encoder_layers=1,
                 num_sparse_decoder_layers=3)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(hf model, fused artifact, split artifact) of one tiny checkpoint."""
    root = tmp_path_factory.mktemp("fused")
    save_tiny(root / "ckpt", seed=31, **OVERRIDES)
    export_checkpoint(root / "ckpt", root / "fused", quiet=True)
    export_checkpoint(root / "ckpt", root / "split", quiet=True, fuse_layers=False)
    return tiny_model(seed=31, **OVERRIDES), root / "fused", root / "split", root / "ckpt"


def _rows(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 96, n)] + [1] for n in (11, 6, 9)]


def test_fused_layout_runs_each_layer_as_one_graph_and_was_validated(pair):
    _, fused, split, _ = pair
    m, old = load_manifest(fused), load_manifest(split)
    assert (m.schema_version, old.schema_version) == (2, 1)
    assert [sorted(lay.parts) for lay in m.stack_layers("decoder")] == [["cross_kv", "step"]] * 3
    assert [sorted(lay.parts) for lay in m.stack_layers("encoder")] == [["block"]] * 3
    # validation ran every block of the fused graphs against PyTorch (blocks + 2 logits checks)
    assert m.validation["passed"] and m.validation["compared"] == 6 + 2
    assert bytes_per_token(m).ort_calls < bytes_per_token(old).ort_calls


@pytest.mark.parametrize("num_beams", [1, 3])
def test_fused_and_split_layouts_both_reproduce_hf_generate(pair, num_beams):
    model, fused, split, _ = pair
    rows = _rows(num_beams)
    want = hf_generate(model, rows, 12, num_beams)
    one = [hf_generate(model, [row], 12, num_beams)[0] for row in rows]
    for art in (fused, split):
        with Runtime(art, RuntimeConfig(policy="full", budget="100%")) as rt:
            got = [r.token_ids for r in rt.generate(rows, max_new_tokens=12, num_beams=num_beams)]
            assert got == want, art.name
            # one row at a time: greedy takes the one-token routing and dispatch path
            assert [rt.generate([row], max_new_tokens=12, num_beams=num_beams)[0].token_ids for row in rows] == one


def test_layer_graphs_use_ort_fused_nodes_and_agree_with_the_standard_op_graphs(pair, tmp_path, monkeypatch):
    """Schema 2 layer graphs are built from ORT's fused nodes (fewer, larger nodes a token); the
    same layout from standard ONNX ops (CONTRIB_OPS=False) is still exported, validated, and
    gives the same tokens and (to float32 rounding) the same logits."""
    onnx = pytest.importorskip("onnx")
    import swapmoe_export.fused as fused

    model, art, _, ckpt = pair
    m = load_manifest(art)

    def ops(name: str) -> list[str]:
        return [n.op_type for n in onnx.load(str(m.path(m.subgraphs[name].file)), load_external_data=False).graph.node]

    for layer in m.stack_layers("decoder"):
        step = ops(layer.parts["step"])
        assert step.count("MultiHeadAttention") == 2 and "SkipSimplifiedLayerNormalization" in step, step
        assert "Softmax" not in step and "ReduceMean" not in step and len(step) <= 22, step
    for layer in m.stack_layers("encoder"):
        assert "MultiHeadAttention" in ops(layer.parts["block"])
    assert "MatMul" in ops("lm_head") and "Gemm" not in ops("lm_head")

    monkeypatch.setattr(fused, "CONTRIB_OPS", False)
    standard = export_checkpoint(ckpt, tmp_path / "standard", quiet=True)  # validated as well
    assert load_manifest(standard).validation["passed"]
    assert "MultiHeadAttention" not in [n.op_type for n in onnx.load(
        str(standard / load_manifest(standard).subgraphs[m.stack_layers("decoder")[0].parts["step"]].file),
        load_external_data=False).graph.node]
    rows = _rows(7)
    want = hf_generate(model, rows, 10, 1)
    ids = np.array([rows[0]])
    dec = np.array([[0, 5, 9, 17, 3]])
    logits = []
    for a in (art, standard):
        with Runtime(a, RuntimeConfig(policy="full", budget="100%")) as rt:
            assert [r.token_ids for r in rt.generate(rows, max_new_tokens=10)] == want
            logits.append(rt.model.forward(ids, np.ones_like(ids), dec))
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_a_wrong_fused_decoder_graph_fails_validation(pair, tmp_path):
    """The fused step graph is checked block by block: a checkpoint whose decoder differs is caught there."""
    _, fused, _, ckpt = pair
    other = save_tiny(tmp_path / "other", seed=32, **OVERRIDES)
    with pytest.raises(ValidationError) as info:
        validate_artifact(other, fused)
    assert any("decoder" in m or "dec." in m for m in info.value.mismatches)


def test_the_step_bias_table_equals_the_general_decoder_bias(pair):
    _, fused, _, _ = pair
    with Runtime(fused, RuntimeConfig(policy="full", budget="100%")) as rt:
        model = rt.model
        for p in (0, 1, 5, 63, 64, 200):  # 64 and 200 outgrow the first table
            q_pos, k_pos = np.arange(p, p + 1), np.arange(p + 1)
            want = model._position_bias("decoder", q_pos, k_pos)  # causal mask: all zeros for one token
            np.testing.assert_array_equal(model.decoder_bias(1, p), want)


def _route_reference(logits, capacity):
    """The general path (cumsum over T of one-hot choices), written out."""
    probs = softmax(logits.astype(np.float32))
    choice = probs.argmax(-1)
    priority = np.cumsum(np.eye(probs.shape[-1], dtype=np.int64)[choice], axis=1)
    keep = np.take_along_axis(priority, choice[..., None], -1)[..., 0] <= capacity
    gate = np.take_along_axis(probs, choice[..., None], -1)[..., 0]
    return choice, gate, keep


@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 1, 8), (2, 5, 8)])
def test_route_and_dispatch_fast_paths_agree_with_the_general_ones(shape):
    rng = np.random.default_rng(sum(shape))
    logits = rng.normal(size=shape).astype(np.float32)
    for capacity in (1, 2, 64):
        r = route(logits, capacity)
        choice, gate, keep = _route_reference(logits, capacity)
        np.testing.assert_array_equal(r.choice, choice)
        np.testing.assert_array_equal(r.gate, gate)
        np.testing.assert_array_equal(r.keep, keep)
    x = rng.normal(size=shape[:2] + (4,)).astype(np.float32)
    r = route(logits, 64)
    got = dispatch(r, x, lambda e, v: v * (e + 1))
    want = x * (r.choice[..., None] + 1).astype(np.float32) * r.gate[..., None]
    np.testing.assert_array_equal(got, want)


def _route_general(logits, capacity, allowed, renormalize):
    """route()'s arithmetic for any shape, written out (masks and renormalisation included)."""
    probs = softmax(logits.astype(np.float32))
    first = probs.argmax(-1)
    if allowed is None or allowed.all():
        choice = first
        gate = np.take_along_axis(probs, choice[..., None], -1)[..., 0]
    else:
        choice = np.where(allowed, probs, -1.0).argmax(-1)
        gate = np.take_along_axis(probs, choice[..., None], -1)[..., 0]
        if renormalize:
            gate = gate / probs[..., allowed].sum(-1)
    priority = np.cumsum(np.eye(probs.shape[-1], dtype=np.int64)[choice], axis=1)
    keep = np.take_along_axis(priority, choice[..., None], -1)[..., 0] <= capacity
    return dict(probs=probs, first_choice=first, choice=choice, gate=gate.astype(np.float32), keep=keep)


@pytest.mark.parametrize("experts", [8, 64])
def test_one_token_route_equals_the_general_arithmetic_with_masks_and_renormalisation(experts):
    """route() of one token takes its own path (fewer numpy calls); every field must equal the
    general arithmetic on the same [1, 1, E] input, bit for bit."""
    rng = np.random.default_rng(experts)
    for trial in range(20):
        one = rng.normal(size=(1, 1, experts)).astype(np.float32)
        allowed = rng.random(experts) < 0.5
        allowed[rng.integers(experts)] = True
        for mask in (None, np.ones(experts, bool), allowed):
            for renorm in (False, True):
                fast, want = route(one, 4, mask, renorm), _route_general(one, 4, mask, renorm)
                for field, value in want.items():
                    np.testing.assert_array_equal(getattr(fast, field), value, err_msg=field)
                    assert getattr(fast, field).shape == value.shape, field
    with pytest.raises(ValueError, match="no expert is allowed"):
        route(np.zeros((1, 1, experts), np.float32), 4, np.zeros(experts, bool))


def test_bytes_per_token_counts_each_decoder_weight_once(tmp_path):
    # Wide enough that counting any weight twice (the smallest: one layer's cross-attention
    # keys, 256 KiB) dwarfs the graphs' own structure.
    wide = dict(d_model=256, d_kv=32, num_heads=8, d_ff=512, num_decoder_layers=2, num_sparse_decoder_layers=1)
    save_tiny(tmp_path / "ckpt", seed=33, **wide)
    model = tiny_model(seed=33, **wide)
    sd = {k: v.numel() * 4 for k, v in model.state_dict().items()}
    want = 0
    for k, n in sd.items():
        if not k.startswith("decoder.block.") or "relative_attention_bias" in k:
            continue  # the position bias comes from a table made once
        if "EncDecAttention.k." in k or "EncDecAttention.v." in k:
            continue  # cross_kv: once per request
        if ".experts.expert_" in k and ".experts.expert_0." not in k:
            continue  # top-1: one expert a sparse layer
        want += n
    want += sd["shared.weight"] + sd["decoder.final_layer_norm.weight"] + model.config.d_model * 4  # LM head, one row
    for fuse in (True, False):
        art = export_checkpoint(tmp_path / "ckpt", tmp_path / f"art{fuse}", quiet=True, validate=False, fuse_layers=fuse)
        got = bytes_per_token(load_manifest(art)).total
        assert want <= got <= want + 64 * 1024, (fuse, got, want)  # the rest: graph structure, expert alignment


def test_prepacked_experts_give_hf_tokens_and_are_budgeted_by_measured_cost(pair):
    model, fused, _, _ = pair
    rows = _rows(7)
    with Runtime(fused, RuntimeConfig(policy="full", budget="100%", prepack_experts="on")) as rt:
        got = [r.token_ids for r in rt.generate(rows, max_new_tokens=12)]
        assert rt.prepacked and rt.generate(rows[:1], max_new_tokens=2)[0].stats["prepacked_experts"]
        block = next(iter(rt.manifest.experts.values())).nbytes
        assert all(cost >= block for cost in rt.expert_cost.values())
        assert rt.residents.nbytes == sum(rt.expert_cost[lk] * rt.manifest.config.num_experts for lk in rt.sparse)
    assert got == hf_generate(model, rows, 12)
    with Runtime(fused, RuntimeConfig(policy="swapmoe", budget="50%")) as rt:  # auto/off: the shared kernel
        assert not rt.prepacked


def test_prepacked_experts_refuse_quantised_experts_with_a_clear_error(tmp_path):
    save_tiny(tmp_path / "ckpt", seed=34)
    art = export_checkpoint(tmp_path / "ckpt", tmp_path / "art", quiet=True, validate=False, expert_dtype="int8")
    with pytest.raises(InputError, match="int8"):
        Runtime(art, RuntimeConfig(policy="full", budget="100%", prepack_experts="on"))
    with Runtime(art, RuntimeConfig(policy="full", budget="100%", prepack_experts="auto")) as rt:
        assert not rt.prepacked
