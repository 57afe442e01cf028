"""Top-k routing (model/moe.py): route_topk against a torch reference of Hugging Face's routers,
absent choices substituted or dropped, and dispatch summing a token's k expert outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swapmoe_edge.model import moe
from swapmoe_edge.model.moe import dispatch, route, route_topk, topk_router

SHAPES = [(8, 2), (64, 8), (60, 4), (5, 5)]  # (experts, k): Mixtral, OLMoE, Qwen2-MoE, every expert


def hf_route(logits: np.ndarray, k: int, norm_topk_prob: bool):
    """What HF's Mixtral/Qwen/OLMoE routers compute: softmax in float32, torch.topk, renormalised."""
    probs = torch.softmax(torch.from_numpy(logits).float(), dim=-1)
    value, index = torch.topk(probs, k, dim=-1)
    if norm_topk_prob:
        value = value / value.sum(dim=-1, keepdim=True)
    return index.numpy(), value.numpy()


def hf_moe(x: np.ndarray, index: np.ndarray, weight: np.ndarray, experts) -> np.ndarray:
    """HF's expert loop: each hit expert in index order, its gated output index_add_-ed to its tokens."""
    xt = torch.from_numpy(x.reshape(-1, x.shape[-1]))
    idx, w = torch.from_numpy(index.reshape(xt.shape[0], -1)), torch.from_numpy(weight.reshape(xt.shape[0], -1))
    out = torch.zeros_like(xt)
    for e in sorted(set(idx.flatten().tolist())):
        tok, pos = torch.where(idx == e)
        y = torch.from_numpy(experts(e, xt[tok].numpy())) * w[tok, pos, None]
        out.index_add_(0, tok, y)
    return out.numpy().reshape(x.shape)


def linear_experts(num_experts: int, d: int, seed: int = 0):
    w = np.random.default_rng(seed).normal(size=(num_experts, d, d)).astype(np.float32)
    return lambda e, x: np.maximum(x @ w[e], 0)


@pytest.mark.parametrize("num_experts,k", SHAPES)
@pytest.mark.parametrize("norm", [False, True])
def test_route_topk_matches_hf_choices_order_and_gates(num_experts, k, norm):
    logits = np.random.default_rng(num_experts + k).normal(size=(3, 7, num_experts)).astype(np.float32) * 3
    r = route_topk(logits, k, norm_topk_prob=norm)
    index, value = hf_route(logits, k, norm)
    assert r.first_choice.shape == r.choice.shape == r.gate.shape == r.keep.shape == (3, 7, k)
    np.testing.assert_array_equal(r.first_choice, index)  # HF's order: largest first
    np.testing.assert_array_equal(r.choice, index)
    assert r.keep.all() and r.gate.dtype == np.float32
    np.testing.assert_allclose(r.gate, value, rtol=1e-6, atol=1e-7)
    if norm:
        np.testing.assert_allclose(r.gate.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("num_experts,k", SHAPES[:3])
@pytest.mark.parametrize("tokens", [1, 9])
def test_dispatch_sums_the_k_gated_outputs_as_hf_does(num_experts, k, tokens):
    rng = np.random.default_rng(tokens)
    logits = rng.normal(size=(1, tokens, num_experts)).astype(np.float32)
    x = rng.normal(size=(1, tokens, 6)).astype(np.float32)
    experts = linear_experts(num_experts, 6)
    r = route_topk(logits, k, norm_topk_prob=True)
    index, value = hf_route(logits, k, True)
    out = dispatch(r, x, experts)
    np.testing.assert_allclose(out, hf_moe(x, index, value, experts), rtol=1e-5, atol=1e-6)


def test_route_topk_with_every_expert_allowed_is_the_unmasked_routing():
    logits = np.random.default_rng(1).normal(size=(2, 4, 16)).astype(np.float32)
    plain = route_topk(logits, 4, norm_topk_prob=True)
    for absent in ("substitute", "drop"):
        r = route_topk(logits, 4, np.ones(16, bool), norm_topk_prob=True, absent=absent)
        for a, b in zip(r, plain):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("num_experts,k", SHAPES[:3])
@pytest.mark.parametrize("norm", [False, True])
def test_substitute_takes_the_best_allowed_experts_never_twice(num_experts, k, norm):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(4, 6, num_experts)).astype(np.float32) * 2
    allowed = np.zeros(num_experts, bool)
    allowed[rng.choice(num_experts, size=max(k, num_experts // 3), replace=False)] = True
    r = route_topk(logits, k, allowed, norm_topk_prob=norm)
    probs = r.probs.reshape(-1, num_experts)
    for first, choice, gate, keep, p in zip(r.first_choice.reshape(-1, k), r.choice.reshape(-1, k),
                                            r.gate.reshape(-1, k), r.keep.reshape(-1, k), probs):
        assert keep.all() and allowed[choice].all()
        assert len(set(choice.tolist())) == k  # no expert twice
        best_allowed = [e for e in np.argsort(-p, kind="stable") if allowed[e]][:k]
        assert set(choice.tolist()) == set(best_allowed)
        kept_first = allowed[first]
        np.testing.assert_array_equal(choice[kept_first], first[kept_first])  # resident choices keep their slots
        want = p[choice] / p[choice].sum() if norm else p[choice]
        np.testing.assert_allclose(gate, want, rtol=1e-6)


def test_substitute_with_fewer_allowed_experts_than_k_keeps_those_only():
    logits = np.random.default_rng(3).normal(size=(2, 5, 8)).astype(np.float32)
    allowed = np.zeros(8, bool)
    allowed[[1, 6]] = True
    r = route_topk(logits, 4, allowed, norm_topk_prob=True)
    assert (r.keep.sum(-1) == 2).all()
    kept = np.where(r.keep, r.choice, -1)
    assert all(sorted(set(row) - {-1}) == [1, 6] for row in kept.reshape(-1, 4).tolist())
    np.testing.assert_allclose(np.where(r.keep, r.gate, 0).sum(-1), 1.0, rtol=1e-6)
    x = np.ones((2, 5, 3), np.float32)
    out = dispatch(r, x, lambda e, xs: np.full_like(xs, float(e)))
    assert np.isfinite(out).all()  # the slots not kept ran nothing


@pytest.mark.parametrize("norm", [False, True])
def test_drop_keeps_the_resident_choices_and_renormalises_them(norm):
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(3, 8, 32)).astype(np.float32) * 2
    allowed = rng.random(32) < 0.5
    r = route_topk(logits, 4, allowed, norm_topk_prob=norm, absent="drop")
    full = route_topk(logits, 4, norm_topk_prob=norm)
    some = allowed[r.first_choice].any(-1)  # tokens with a resident choice
    np.testing.assert_array_equal(r.choice[some], r.first_choice[some])
    np.testing.assert_array_equal(r.keep[some], allowed[r.first_choice][some])
    kept_gate = np.where(r.keep, r.gate, 0)
    np.testing.assert_allclose(kept_gate.sum(-1), full.gate.sum(-1), rtol=1e-5)  # the k's mass, over the rest
    p = np.take_along_axis(r.probs, r.first_choice, -1)
    ratio = np.where(r.keep, r.gate / p, np.nan)[some]  # the kept keep their proportions
    scale = np.broadcast_to(np.nanmax(ratio, -1, keepdims=True), ratio.shape)
    np.testing.assert_allclose(ratio[~np.isnan(ratio)], scale[~np.isnan(ratio)], rtol=1e-5)


def test_drop_sends_a_token_with_no_resident_choice_to_its_best_allowed_expert():
    logits = np.array([[[5.0, 4.0, 3.0, 0.0, -1.0]]], np.float32)
    r = route_topk(logits, 2, np.array([False, False, True, False, True]), norm_topk_prob=False, absent="drop")
    assert r.choice[0, 0, 0] == 2 and r.keep[0, 0].tolist() == [True, False]
    np.testing.assert_allclose(r.gate[0, 0, 0], r.probs[0, 0, :2].sum(), rtol=1e-6)


def test_route_topk_refuses_bad_arguments():
    logits = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="absent"):
        route_topk(logits, 2, absent="ignore")
    with pytest.raises(ValueError, match="k=5"):
        route_topk(logits, 5)
    with pytest.raises(ValueError, match="no expert is allowed"):
        route_topk(logits, 2, np.zeros(4, bool))


def test_topk_router_has_the_family_route_signature():
    logits = np.random.default_rng(2).normal(size=(1, 3, 8)).astype(np.float32)
    allowed = np.arange(8) % 2 == 0
    r = topk_router(2, True)(logits, 64, allowed, False, absent="drop")
    ref = route_topk(logits, 2, allowed, True, "drop")
    for a, b in zip(r, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("tokens", [1, 6])
def test_switch_route_keeps_its_shapes_and_drop_skips_rerouted_tokens(tokens):
    logits = np.random.default_rng(tokens).normal(size=(2, tokens, 8)).astype(np.float32)
    logits.reshape(-1, 8)[np.arange(2 * tokens), np.arange(2 * tokens) % 8] += 10  # token i's first choice: i % 8
    allowed = np.arange(8) < 1
    sub = route(logits, 64, allowed)
    drop = route(logits, 64, allowed, absent="drop")
    assert sub.choice.shape == drop.choice.shape == (2, tokens)
    moved = sub.choice != sub.first_choice
    assert moved.any() and (~moved).any()
    np.testing.assert_array_equal(drop.keep, sub.keep & ~moved)
    np.testing.assert_array_equal(drop.choice, sub.choice)
    with pytest.raises(ValueError, match="absent"):
        route(logits, 64, allowed, absent="nope")


@pytest.mark.parametrize("num_experts,k", SHAPES)
@pytest.mark.parametrize("absent", ["substitute", "drop"])
def test_one_token_route_topk_equals_the_general_arithmetic(num_experts, k, absent):
    """The single-token path gives bit for bit what the batched path gives that token."""
    rng = np.random.default_rng(num_experts * 10 + k)
    for trial in range(40):
        logits = (rng.normal(size=(1, 1, num_experts)) * 3).astype(np.float32)
        allowed = None if trial % 5 == 0 else rng.random(num_experts) < rng.choice([0.1, 0.3, 0.7])
        if allowed is not None and not allowed.any():
            allowed[rng.integers(num_experts)] = True
        if trial % 7 == 0 and allowed is not None:  # none of its choices allowed
            allowed = np.zeros(num_experts, bool)
            allowed[np.argsort(-logits[0, 0])[-1]] = True
        norm, renorm = bool(trial % 2), bool(trial % 3 == 0)
        fast = route_topk(logits, k, allowed, norm, absent, renorm)
        general = moe._route_topk_many(logits, k, allowed, norm, absent, renorm)  # the batched path, same input
        for field, a, b in zip(fast._fields, fast, general):
            assert a.shape == b.shape, field
            np.testing.assert_array_equal(a, b, err_msg=field)
