"""Every policy with a top-k family: the residency engine routes through the family's router
(a fake top-k family here: synthetic logits, experts that are tiny in-memory matrices), counts
each token's k choices, and keeps Eq. 1 importance over them."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from swapmoe_edge.artifact.store import LoadedExpert
from swapmoe_edge.core.errors import InputError
from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.lab import replay as replay_mod
from swapmoe_edge.model.moe import dispatch, route_topk, topk_router
from swapmoe_edge.model.rungs import PRIMARY, Rung
from swapmoe_edge.residency.importance import ImportanceTracker, Profile, eq1
from swapmoe_edge.residency.policies import POLICIES, make_policy
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.runtime.config import RuntimeConfig

L0, L1 = LayerKey("decoder", 0), LayerKey("decoder", 1)
E, D, COST, LOW = 16, 6, 10, 3
LADDER = [Rung("int4", LOW, 0.97), Rung(PRIMARY, COST, 1.0)]
WEIGHTS = np.random.default_rng(0).normal(size=(2, E, D, D)).astype(np.float32)  # [layer, expert, D, D]


def family(k: int, norm: bool = True):
    """What the engine asks of a family: its top-k router and k."""
    return SimpleNamespace(name="fake-topk", top_k=k, route=topk_router(k, norm))


class Store:
    """Experts as [D, D] matrices (a low-bit copy: the same matrix), every read recorded."""

    def __init__(self):
        self.reads: list[ExpertKey] = []
        self.largest_expert = COST

    def read(self, key, own_mapping=True, rung=None):
        self.reads.append(key)
        return LoadedExpert(key, {"w": WEIGHTS[key.layer, key.expert]}, LOW if rung else COST, rung=rung)


class Runner:
    def load(self, expert):
        return expert


def kernel(ran: list | None = None):
    def run(expert, x):
        if ran is not None:
            ran.append(expert.key)
        return np.tanh(x @ expert.feeds["w"])

    return run


def exact(layer_index: int, normed, logits, k: int, norm: bool = True):
    """The layer's output with every expert there (what full computes)."""
    return dispatch(route_topk(logits, k, norm_topk_prob=norm), normed,
                    lambda e, x: np.tanh(x @ WEIGHTS[layer_index, e]))


def profile():
    imp = {L0: np.linspace(1, 2, E), L1: np.linspace(2, 1, E)}
    return Profile(imp, dict(imp), meta={"texts": 1})


def engine(policy: str, budget: int, k: int, store=None, ran=None, **cfg):
    config = RuntimeConfig(policy=policy, swap_interval_s=3600, **cfg)
    eng = make_policy(config, ResidentSet([L0, L1], E), store or Store(), kernel(ran), 64,
                      {L0: np.ones(E), L1: np.ones(E)}, profile(), expert_cost={L0: COST, L1: COST},
                      budget=budget, rungs={L0: LADDER, L1: LADDER}, runners={"int4": Runner()}, family=family(k))
    eng.warm()
    return eng


def layer(lk: LayerKey):
    return SimpleNamespace(key=lk, experts=[ExpertKey(lk.stack, lk.layer, e) for e in range(E)])


def batch(tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(2, tokens, D)).astype(np.float32),
            (rng.normal(size=(2, tokens, E)) * 2).astype(np.float32))


@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_runs_a_top_k_family_at_a_small_budget(policy, k):
    budget = 2 * E * COST if policy == "full" else 2 * 4 * COST  # 4 experts a layer (fewer than k=8)
    ran: list[ExpertKey] = []
    eng = engine(policy, budget, k, ran=ran)
    assert eng.top_k == k
    for tokens, seed in [(5, 0), (1, 1), (1, 2)]:  # a prefill, then decode steps
        normed, logits = batch(tokens, seed)
        for i, lk in enumerate((L0, L1)):
            ran.clear()
            out = eng(layer(lk), normed, logits, None)
            assert out.shape == normed.shape and np.isfinite(out).all()
            want = exact(i, normed, logits, k)
            if POLICIES[policy].exact:
                np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
            elif policy in ("prune", "swapmoe"):  # masked: only residents ran
                assert set(ran) <= {ExpertKey(lk.stack, lk.layer, e) for e in eng.residents.layer(lk)}
    c = eng.counters
    assert c.routed == 2 * (5 + 1 + 1) * 2 * k  # every token's k choices, both layers
    assert 0 < c.first_choice_resident <= c.routed
    assert (c.rerouted == 0) == (policy == "full")  # on-demand counts misses, then reads them
    eng.stop()


def test_full_and_substitute_agree_when_every_choice_is_resident():
    normed, logits = batch(4)
    eng = engine("prune", 2 * E * COST, 2)  # a budget for every expert: nothing masked
    np.testing.assert_array_equal(eng(layer(L0), normed, logits, None), exact(0, normed, logits, 2))


@pytest.mark.parametrize("k", [2, 8])
def test_masked_routing_substitutes_or_drops_as_configured(k):
    normed, logits = batch(6, seed=3)
    sub = engine("prune", 2 * 4 * COST, k)
    drop = engine("prune", 2 * 4 * COST, k, absent="drop")
    assert drop.absent == "drop" and sub.absent == "substitute"
    allowed = sub.residents.view(L0).allowed
    r_sub, r_drop = sub.route(logits, allowed), drop.route(logits, allowed)
    assert allowed[r_sub.choice[r_sub.keep]].all() and allowed[r_drop.choice[r_drop.keep]].all()
    assert (r_sub.keep.sum(-1) == min(k, 4)).all()  # as many as it has residents for
    assert (r_drop.keep.sum(-1) <= r_sub.keep.sum(-1)).all()
    out_sub, out_drop = sub(layer(L0), normed, logits, None), drop(layer(L0), normed, logits, None)
    assert not np.allclose(out_sub, out_drop)
    np.testing.assert_allclose(out_drop, dispatch(r_drop, normed, lambda e, x: np.tanh(x @ WEIGHTS[0, e])), rtol=1e-6)
    with pytest.raises(InputError, match="absent must be"):
        RuntimeConfig(absent="skip")


def test_counters_count_the_share_of_the_k_first_choices_resident_and_honour_the_token_mask():
    eng = engine("prune", 2 * 4 * COST, 2)
    resident = sorted(eng.residents.layer(L0))
    logits = np.full((1, 2, E), -5.0, np.float32)
    other = [e for e in range(E) if e not in resident]
    logits[0, 0, [resident[0], other[0]]] = [5.0, 4.0]  # one of its two choices resident
    logits[0, 1, [other[1], other[2]]] = [5.0, 4.0]  # none: padding, masked out below
    eng(layer(L0), np.ones((1, 2, D), np.float32), logits, np.array([[True, False]]))
    c = eng.counters
    assert (c.routed, c.first_choice_resident, c.rerouted) == (2, 1, 3)  # rerouted counts padding, as for top-1


def test_the_ladder_counts_low_bit_choices_of_unmasked_tokens_only():
    eng = engine("ladder", 2 * E * LOW, 2, ladder_primary=False)  # every expert as a low-bit copy
    normed, logits = batch(3)
    eng(layer(L1), normed[:1], logits[:1], np.array([[True, True, False]]))
    assert eng.counters.lowbit_tokens == 2 * 2  # two tokens' two choices


def test_ladder_wait_reads_every_one_of_the_k_first_choices():
    store = Store()
    eng = engine("ladder", 2 * 4 * LOW, 2, store=store, ladder_wait=True, ladder_primary=False)
    normed, logits = batch(1, seed=5)
    first = set(route_topk(logits[:1], 2).first_choice.ravel().tolist())
    eng(layer(L0), normed[:1], logits[:1], None)
    assert first <= set(eng.residents.layer(L0)) and eng.counters.rerouted == 0


def test_eq1_sums_over_each_tokens_k_choices_at_their_softmax_probability():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(E), size=7)  # [N, E]
    x_norm, norms = rng.random(7) + 0.5, rng.random(E) + 0.5
    value, count = eq1(norms, x_norm, probs, None, top_k=3)
    want, want_count = np.zeros(E), np.zeros(E)
    for n in range(7):
        for e in np.argsort(-probs[n])[:3]:
            want[e] += x_norm[n] * probs[n, e] * norms[e]
            want_count[e] += 1
    np.testing.assert_allclose(value, want)
    np.testing.assert_array_equal(count, want_count)
    one, _ = eq1(norms, x_norm, probs)
    top = probs.argmax(1)
    np.testing.assert_allclose(one, np.bincount(top, x_norm * probs[np.arange(7), top] * norms[top], E))
    tracker = ImportanceTracker({L0: norms}, top_k=3)
    tracker.observe(L0, x_norm, probs)
    np.testing.assert_allclose(tracker.snapshot()[L0], want)
    with pytest.raises(ValueError, match="top_k 17 of 16"):
        ImportanceTracker({L0: norms}, top_k=17)


def test_the_engines_tracker_keeps_importance_over_the_k_choices():
    eng = engine("swapmoe", 2 * 8 * COST, 2, prior_documents=None, decay=1.0)
    before = eng.tracker.snapshot()[L0]
    normed, logits = batch(1, seed=6)
    eng(layer(L0), normed[:1], logits[:1], None)
    gained = eng.tracker.snapshot()[L0] - before
    first = route_topk(logits[:1], 2).first_choice.ravel()
    assert set(np.flatnonzero(gained > 0).tolist()) == set(first.tolist())


def test_without_a_family_the_engine_routes_as_switch_top_1():
    config = RuntimeConfig(policy="full", swap_interval_s=3600)
    eng = make_policy(config, ResidentSet([L0], E), Store(), kernel(), 64, {L0: np.ones(E)}, profile(),
                      expert_cost={L0: COST}, budget=E * COST)
    eng.warm()
    assert eng.family.name == "switch" and eng.top_k == 1
    normed, logits = batch(3)
    r = eng.route(logits)
    assert r.choice.shape == (2, 3)
    assert eng(layer(L0), normed, logits, None).shape == normed.shape


def test_a_top_k_profile_round_trips_through_the_tracker():
    tracker = ImportanceTracker({L0: np.ones(E)}, top_k=2)
    _, logits = batch(4)
    tracker.observe(L0, np.ones(8), route_topk(logits, 2).probs.reshape(-1, E))
    prof = Profile.from_tracker(tracker, {"texts": 1})
    assert prof.counts[L0].sum() == 8 * 2
    assert replace(prof, source="profile").importance[L0].sum() > 0
