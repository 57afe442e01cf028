"""The residency engine with every policy, on experts that cost a few bytes and run nothing:
the registry, the counters, live resize, and the one planner's one-rung case."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from swapmoe_edge.artifact.store import ExpertReadError, LoadedExpert
from swapmoe_edge.core.errors import BudgetError, InputError
from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.model.rungs import PRIMARY, Rung
from swapmoe_edge.residency import planner
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.residency.limits import ExpertUnavailableError
from swapmoe_edge.residency.policies import POLICIES, make_policy, policy_class
from swapmoe_edge.residency.policies.base import REGISTRY, Policy, register
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.runtime.config import RuntimeConfig

ENC, DEC = LayerKey("encoder", 1), LayerKey("decoder", 1)
E, COST, LOW = 4, 10, 3  # experts per layer; bytes of an expert, of its int4 copy
LADDER = [Rung("int4", LOW, 0.97), Rung(PRIMARY, COST, 1.0)]


class Store:
    """Reads that always work (but for ``broken`` experts) and count themselves."""

    def __init__(self):
        self.reads: list[tuple[ExpertKey, str | None]] = []
        self.broken: set[ExpertKey] = set()
        self.largest_expert = COST

    def read(self, key, own_mapping=True, rung=None):
        if key in self.broken:
            raise ExpertReadError(key, key.name, "injected I/O error")
        self.reads.append((key, rung))
        return LoadedExpert(key, {}, LOW if rung else COST, rung=rung)


class Runner:  # a low-bit copy runs as it was read
    def load(self, expert):
        return expert


def profile():
    imp = {ENC: np.array([1.0, 4.0, 2.0, 3.0]), DEC: np.array([4.0, 3.0, 2.0, 1.0])}
    return Profile(imp, dict(imp), meta={"texts": 1})


def engine(policy: str, budget: int, store: Store | None = None, **cfg):
    config = RuntimeConfig(policy=policy, decoder_weight=1.0, swap_interval_s=3600, **cfg)
    eng = make_policy(config, ResidentSet([ENC, DEC], E), store or Store(), lambda e, x: x, 64,
                      {ENC: np.ones(E), DEC: np.ones(E)}, profile(), expert_cost={ENC: COST, DEC: COST},
                      budget=budget, rungs={ENC: LADDER, DEC: LADDER}, runners={"int4": Runner()})
    eng.warm()
    return eng


def layer(lk: LayerKey):
    return SimpleNamespace(key=lk, experts=[ExpertKey(lk.stack, lk.layer, e) for e in range(E)])


def call(eng, lk: LayerKey, choices: list[int], mask=None):
    """Run one layer call whose tokens' first choices are ``choices``."""
    logits = np.full((1, len(choices), E), -5.0, np.float32)
    logits[0, np.arange(len(choices)), choices] = 5.0
    return eng(layer(lk), np.ones((1, len(choices), 8), np.float32), logits, mask)


def within_limits(eng) -> bool:
    lim, res = eng.limits, eng.residents
    counts_ok = lim.counts is None or all(len(res.layer(lk)) <= lim.counts[lk] for lk in res.layers)
    bytes_ok = lim.capacity is None or res.nbytes <= lim.capacity
    return counts_ok and bytes_ok and all(len(res.layer(lk)) >= 1 for lk in res.layers)


# -- the registry ---------------------------------------------------------------------------------

def test_the_policies_are_registered_by_name_and_the_config_checks_against_the_registry():
    assert list(POLICIES) == ["full", "on-demand", "prune", "swapmoe", "ladder"]
    assert all(POLICIES[name].name == name for name in POLICIES)
    with pytest.raises(InputError, match="unknown policy 'lru'; choose one of full, on-demand, prune, swapmoe, ladder"):
        RuntimeConfig(policy="lru")
    with pytest.raises(InputError, match="unknown policy"):
        policy_class("lru")
    # what the runtime asks of a policy by name, before it builds one
    assert [n for n, c in POLICIES.items() if c.exact] == ["full", "on-demand"]
    assert [n for n, c in POLICIES.items() if c.swaps] == ["swapmoe", "ladder"]
    assert [n for n, c in POLICIES.items() if c.uses_rungs] == ["ladder"]
    assert [n for n, c in POLICIES.items() if c.holds_all] == ["full"]
    assert policy_class("prune").start_order({ENC: "norms"}, profile()) == {ENC: "norms"}
    assert policy_class("ladder").start_order({ENC: "norms"}, profile()) is None


def test_a_new_policy_is_one_registered_class_and_the_engine_runs_it():
    class Nothing(POLICIES["prune"]):
        """prune's targets, and every token routed as if nothing but its first choice's layer-mate 0 were there."""

        name = "test-zero"

        def route(self, engine, layer, normed, logits, token_mask):
            allowed = np.zeros(E, bool)
            allowed[0] = True
            return engine.masked_over(layer, normed, logits, allowed)

    with pytest.raises(ValueError, match="registered already"):
        register(type("Again", (Policy,), {"name": "prune"}))
    register(Nothing)
    try:
        assert "test-zero" in POLICIES and RuntimeConfig(policy="test-zero").policy == "test-zero"
        eng = engine("test-zero", 4 * COST)
        assert eng.name == "test-zero" and within_limits(eng)
        assert call(eng, DEC, [3]).shape == (1, 1, 8)
    finally:
        del REGISTRY["test-zero"]


# -- counters ---------------------------------------------------------------------------------------

def test_the_engine_counts_loads_stalls_evictions_and_routing_once_for_every_policy():
    store = Store()
    eng = engine("on-demand", 2 * COST, store)  # one slot per layer: every other expert is a miss
    assert eng.limits.counts == {ENC: 1, DEC: 1} and set(eng.residents.layer(DEC)) == {0}
    call(eng, DEC, [2, 2, 0])  # experts run in index order: 0 hits, then 2 misses (read; 0 goes)
    call(eng, DEC, [0])  # and 0 is read back
    c = eng.counters.snapshot()
    assert (c["loads"], c["evictions"], c["routed"], c["first_choice_resident"], c["rerouted"]) == (2, 2, 4, 1, 3)
    assert c["stall_s"] > 0 and c["swaps"] == 0
    assert [k.expert for k, _ in store.reads[-2:]] == [2, 0] and set(eng.residents.layer(DEC)) == {0}

    eng = engine("prune", 4 * COST)
    mask = np.array([[True, True, False]])
    assert set(eng.residents.layer(ENC)) == {0, 1}  # the largest norms: all equal here, the first ones
    call(eng, ENC, [1, 3, 3], mask)  # padding (the last token) is not routed, but it is rerouted
    c = eng.counters.snapshot()
    assert (c["routed"], c["first_choice_resident"], c["rerouted"], c["loads"]) == (2, 1, 2, 0)

    store = Store()
    store.broken.add(ExpertKey("decoder", 1, 2))
    eng = engine("swapmoe", 4 * COST, store)
    call(eng, DEC, [2, 2])  # its first choice cannot be read: counted, and rerouted
    assert eng.counters.unavailable_hits == 0  # not known to be unreadable until a read fails
    eng.limits = replace(eng.limits, counts={ENC: 1, DEC: 3})
    eng.tracker.observe(DEC, np.ones(50), np.eye(E)[[2] * 50])  # 2 is now the most important ...
    eng.swap_once()  # ... but its read fails, and it is never planned again (one admission a round)
    assert eng.residents.is_unavailable(ExpertKey("decoder", 1, 2)) and eng.counters.swaps == 0
    eng.swap_once()
    assert eng.counters.swaps == 1 and set(eng.residents.layer(DEC)) == {0, 1, 3}  # the next best instead
    assert eng.counters.evictions == 1 and set(eng.residents.layer(ENC)) == {1}  # the encoder's shrink
    call(eng, DEC, [2, 2])
    assert eng.counters.unavailable_hits == 2

    eng = engine("ladder", 2 * COST)  # 20 bytes: the plan holds int4 copies of three experts a layer
    assert eng.residents.placement()[DEC] == {0: "int4", 1: "int4", 2: "int4"}
    call(eng, DEC, [0, 1, 3], np.array([[True, True, False]]))  # 3 goes to a copy too, but it is padding
    c = eng.counters.snapshot()
    assert (c["lowbit_tokens"], c["rerouted"], c["routed"]) == (2, 1, 2)


@pytest.mark.parametrize("rule,kept", [("frequency", {1, 2}), ("recency", {0, 2})])
def test_on_demand_evicts_the_least_chosen_or_the_least_recent(rule, kept):
    eng = engine("on-demand", 4 * COST, on_demand_evict=rule)
    assert eng.limits.counts[DEC] == 2 and set(eng.residents.layer(DEC)) == {0, 1}
    call(eng, DEC, [1, 1, 1])  # 1 chosen three times ...
    call(eng, DEC, [0])  # ... 0 once, and last
    call(eng, DEC, [2])  # a miss: frequency lets 0 go, recency 1
    assert set(eng.residents.layer(DEC)) == kept
    with pytest.raises(InputError, match="on_demand_evict must be one of frequency, recency, not 'random'"):
        RuntimeConfig(on_demand_evict="random")


def test_an_exact_policy_raises_on_an_unreadable_expert_and_a_lossy_one_goes_on():
    store = Store()
    store.broken.add(ExpertKey("decoder", 1, 1))
    with pytest.raises(ExpertUnavailableError, match="injected I/O error.*exact"):
        engine("full", 8 * COST, store)
    eng = engine("on-demand", 2 * COST, store)
    with pytest.raises(ExpertUnavailableError, match="on-demand policy is exact"):
        call(eng, DEC, [1])
    with pytest.raises(ExpertUnavailableError, match="earlier read"):  # and again, now that it is known
        call(eng, DEC, [1])
    eng = engine("prune", 8 * COST, store)
    assert ExpertKey("decoder", 1, 1) not in eng.residents and call(eng, DEC, [1]).shape == (1, 1, 8)


# -- live resize, for every policy ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["on-demand", "prune", "swapmoe", "ladder"])
def test_resize_shrinks_at_once_and_grows_back_for_every_policy(name):
    eng = engine(name, 8 * COST)
    full = eng.residents.nbytes
    assert within_limits(eng)
    eng.resize(3 * COST)
    assert within_limits(eng) and eng.residents.nbytes <= 3 * COST < full
    eng.resize(COST)  # below one expert per layer: the floor holds, and nothing empties a layer
    for _ in range(4 if name == "ladder" else 0):  # the ladder's last copies move down on the swapper
        eng.swap_once()
    assert within_limits(eng) and eng.residents.nbytes <= 2 * COST
    eng.resize(8 * COST)
    for _ in range(20):  # growth is the policy's: prune at once, the swapper's rounds, on-demand's misses
        eng.swap_once() if POLICIES[name].swaps else call(eng, DEC, list(range(E)))
    assert within_limits(eng) and eng.residents.nbytes > 2 * COST
    assert eng.counters.evictions > 0


def test_resize_under_the_ladder_moves_copies_down_and_back_up():
    eng = engine("ladder", 8 * COST)
    assert eng.residents.placement() == {lk: {e: PRIMARY for e in range(E)} for lk in (ENC, DEC)}
    eng.resize(4 * COST)
    assert eng.limits.capacity == 4 * COST and eng.residents.nbytes <= 4 * COST
    for _ in range(40):
        eng.swap_once()
    placed = eng.residents.placement()
    assert eng.residents.nbytes <= 4 * COST and "int4" in {r for row in placed.values() for r in row.values()}
    assert sum(map(len, placed.values())) > 4  # more experts than 4 whole ones: low-bit copies
    eng.resize(8 * COST)
    for _ in range(40):
        eng.swap_once()
    assert eng.residents.placement() == {lk: {e: PRIMARY for e in range(E)} for lk in (ENC, DEC)}


def test_full_cannot_shrink_and_says_so(caplog):
    with pytest.raises(BudgetError, match="full policy keeps every expert resident"):
        engine("full", 7 * COST)
    eng = engine("full", 8 * COST)
    with caplog.at_level(logging.WARNING):
        eng.resize(4 * COST)
    assert "cannot shrink" in caplog.text and eng.residents.nbytes == 8 * COST


def test_a_budget_below_one_expert_per_layer_fails_at_start_with_the_numbers():
    with pytest.raises(BudgetError, match=r"19 bytes.*one expert for each of the 2 sparse layers.*20 bytes"):
        engine("prune", 2 * COST - 1)
    with pytest.raises(BudgetError, match="one int4 expert copy for each"):
        engine("ladder", 2 * LOW - 1)


# -- fill, hold, threads ---------------------------------------------------------------------------

def test_a_background_fill_holds_each_layers_first_expert_at_once_and_the_rest_later():
    config = RuntimeConfig(policy="prune", decoder_weight=1.0)
    eng = make_policy(config, ResidentSet([ENC, DEC], E), Store(), lambda e, x: x, 64, {ENC: np.ones(E), DEC: np.ones(E)},
                      profile(), expert_cost={ENC: COST, DEC: COST}, budget=6 * COST)
    eng.background_io.clear()  # as during a first request's prefill: the filler waits
    eng.warm(background=True)
    assert eng.residents.counts() == {"enc.L01": 1, "dec.L01": 1} and not eng.wait_filled(0.1)
    eng.background_io.set()
    assert eng.wait_filled(10) and eng.residents.counts() == {"enc.L01": 3, "dec.L01": 3}
    eng.stop()


def test_hold_best_ranks_as_the_policy_does():
    prof = replace(profile(), substitute={ENC: 0})
    config = RuntimeConfig(policy="swapmoe", decoder_weight=1.0)
    eng = make_policy(config, ResidentSet([ENC, DEC], E), Store(), lambda e, x: x, 64, {ENC: np.ones(E), DEC: np.ones(E)},
                      prof, expert_cost={ENC: COST, DEC: COST}, budget=3 * COST)
    eng.warm()
    assert eng.limits.counts == {ENC: 2, DEC: 1}
    seen = {ENC: np.array([0.0, 1.0, 5.0, 2.0]), DEC: np.array([0.0, 0.0, 1.0, 9.0])}
    assert eng.hold_best(seen) >= 1
    assert eng.residents.residents() == {ENC: frozenset({2, 3}), DEC: frozenset({3})}
    eng.resize(2 * COST)  # the encoder holds one: its substitute now ranks first
    eng.hold_best(seen)
    assert eng.residents.residents()[ENC] == frozenset({0})


def test_counts_planning_is_the_one_rung_case_of_the_byte_planner():
    rng = np.random.default_rng(0)
    for _ in range(200):
        imp = {k: rng.gamma(0.5, size=6) for k in (ENC, DEC, LayerKey("decoder", 3))}
        cost = {k: int(rng.choice([10, 13, 20])) for k in imp}
        capacity = sum(cost.values()) + int(rng.integers(0, 150))
        counts = planner.plan_counts(imp, cost, capacity, layer_weight={DEC: 8.0})
        placed = planner.plan(imp, planner.one_rung(cost), capacity, layer_weight={DEC: 8.0})
        assert counts == {k: len(row) for k, row in placed.items()}
        assert all(set(row) == set(planner.top_experts(imp[k], counts[k])) for k, row in placed.items())
