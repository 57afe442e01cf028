"""Per-layer resident counts under a byte budget, and the swaps toward them."""

import numpy as np
import pytest

from swapmoe_edge.core.errors import BudgetError
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.residency.planner import covered_mass, initial_residents, plan_counts, top_experts
from swapmoe_edge.residency.steps import Swap, plan_swaps

E0, E1 = LayerKey("encoder", 1), LayerKey("encoder", 3)
D1, D3 = LayerKey("decoder", 1), LayerKey("decoder", 3)

SKEWED = np.array([90.0, 2, 2, 2, 1, 1, 1, 1])  # one expert holds 90% of the mass
FLAT = np.ones(8)


def total_bytes(counts, expert_bytes):
    return sum(counts[k] * expert_bytes[k] for k in counts)


@pytest.mark.parametrize("method", ["importance", "uniform"])
@pytest.mark.parametrize("capacity", [400, 555, 1000, 2000, 10_000])
def test_plan_respects_byte_limit_min_one_and_max_e(method, capacity):
    rng = np.random.default_rng(0)
    imp = {k: rng.random(8) ** 3 for k in (E0, E1, D1, D3)}
    nbytes = {E0: 100, E1: 100, D1: 80, D3: 120}
    counts = plan_counts(imp, nbytes, capacity, method=method)
    assert list(counts) == [E0, E1, D1, D3]
    assert total_bytes(counts, nbytes) <= capacity
    assert all(1 <= c <= 8 for c in counts.values())


@pytest.mark.parametrize("method", ["importance", "uniform"])
def test_plan_uses_all_experts_when_everything_fits(method):
    imp = {E0: SKEWED, D1: FLAT}
    assert plan_counts(imp, {E0: 10, D1: 10}, 10_000, method=method) == {E0: 8, D1: 8}


def test_plan_refuses_a_capacity_below_one_expert_per_layer_and_states_the_numbers():
    with pytest.raises(BudgetError, match=r"199 bytes.*2 sparse layers.*200 bytes"):
        plan_counts({E0: FLAT, D1: FLAT}, {E0: 100, D1: 100}, 199)


def test_uniform_gives_equal_counts_and_leftovers_in_layer_order():
    imp = {E0: FLAT, E1: FLAT, D1: FLAT}
    nbytes = {E0: 10, E1: 10, D1: 10}
    assert plan_counts(imp, nbytes, 90, method="uniform") == {E0: 3, E1: 3, D1: 3}
    assert plan_counts(imp, nbytes, 110, method="uniform") == {E0: 4, E1: 4, D1: 3}


def test_importance_plan_gives_more_slots_to_the_flat_layer_than_the_skewed_one():
    # The skewed layer's top expert already covers 90% of its mass; each further slot
    # adds ~2%. Every slot in the flat layer adds 12.5%, so the flat layer needs them.
    imp = {E0: SKEWED, D1: FLAT}
    nbytes = {E0: 10, D1: 10}
    counts = plan_counts(imp, nbytes, 80, method="importance")
    assert counts[D1] > counts[E0]
    assert counts == {E0: 1, D1: 7}


def test_importance_plan_covers_at_least_the_mass_of_uniform_on_a_skewed_example():
    imp = {E0: SKEWED, E1: FLAT, D1: np.array([40.0, 30, 20, 5, 3, 1, 1, 0])}
    nbytes = {E0: 10, E1: 10, D1: 10}
    for capacity in range(30, 250, 10):
        smart = plan_counts(imp, nbytes, capacity, method="importance")
        plain = plan_counts(imp, nbytes, capacity, method="uniform")
        assert covered_mass(imp, smart) >= covered_mass(imp, plain) - 1e-12
    smart = plan_counts(imp, nbytes, 120, method="importance")
    plain = plan_counts(imp, nbytes, 120, method="uniform")
    assert covered_mass(imp, smart) > covered_mass(imp, plain) + 0.1


def test_layer_weight_moves_slots_to_the_decoder():
    imp = {E0: FLAT, D1: FLAT}
    nbytes = {E0: 10, D1: 10}
    assert plan_counts(imp, nbytes, 80) == {E0: 4, D1: 4}  # equal gains alternate
    weighted = plan_counts(imp, nbytes, 80, layer_weight={E0: 1.0, D1: 20.0})
    assert weighted == {E0: 1, D1: 7}


def test_importance_plan_accounts_for_bytes_per_expert():
    imp = {E0: FLAT, D1: FLAT}
    counts = plan_counts(imp, {E0: 10, D1: 40}, 130)  # share per byte 4x better in E0
    assert counts == {E0: 8, D1: 1}


def test_plan_is_deterministic_and_all_zero_importance_counts_as_uniform():
    imp = {E0: np.zeros(4), D1: np.zeros(4)}
    a = plan_counts(imp, {E0: 1, D1: 1}, 5)
    assert a == plan_counts(imp, {E0: 1, D1: 1}, 5) == {E0: 3, D1: 2}


def test_top_experts_breaks_ties_by_lower_index():
    assert top_experts(np.array([1.0, 3.0, 3.0, 2.0, 3.0]), 3) == (1, 2, 4)
    assert top_experts(np.array([1.0, 3.0]), 0) == ()


def test_initial_residents_are_the_top_experts():
    assert initial_residents({E0: SKEWED}, {E0: 2}) == {E0: frozenset({0, 1})}


def test_shrink_evictions_come_first_and_are_never_bounded_away():
    imp = {E0: np.array([8.0, 7, 6, 5, 1, 0]), D1: np.array([1.0, 2, 3, 100, 0, 0])}
    residents = {E0: frozenset({0, 1, 2, 3}), D1: frozenset({0, 1})}
    swaps = plan_swaps(residents, imp, {E0: 2, D1: 2}, hysteresis=0.1, max_swaps=1)
    assert swaps[:2] == [Swap(E0, None, 3), Swap(E0, None, 2)]  # weakest first
    assert swaps[2:] == [Swap(D1, 3, 0)]  # only one bounded swap: the most valuable
    assert [s.kind for s in swaps] == ["evict", "evict", "replace"]


def test_growing_budget_admits_the_best_non_residents():
    imp = {E0: np.array([1.0, 5, 3, 4])}
    swaps = plan_swaps({E0: frozenset({1})}, imp, {E0: 3}, hysteresis=0.5, max_swaps=None)
    assert swaps == [Swap(E0, 3, None), Swap(E0, 2, None)]


def test_hysteresis_prevents_flapping_between_near_equal_experts():
    residents = {E0: frozenset({0})}
    counts = {E0: 1}
    # Expert 1 edges ahead, then expert 0 does, and back: no swap either way.
    for row in ([1.00, 1.05], [1.05, 1.00], [1.00, 1.08]):
        assert plan_swaps(residents, {E0: np.array(row)}, counts, hysteresis=0.1, max_swaps=None) == []
    # A clear winner gets in.
    assert plan_swaps(residents, {E0: np.array([1.0, 1.2])}, counts, 0.1, None) == [Swap(E0, 1, 0)]


def test_replacements_pair_best_outsiders_with_weakest_residents():
    imp = {E0: np.array([1.0, 2, 10, 9, 3, 0])}
    swaps = plan_swaps({E0: frozenset({0, 1, 4})}, imp, {E0: 3}, hysteresis=0.1, max_swaps=None)
    assert swaps == [Swap(E0, 2, 0), Swap(E0, 3, 1)]  # outsider 5 (=0) does not beat resident 4 (=3)


def test_swaps_are_ranked_by_value_across_layers():
    imp = {E0: np.array([1.0, 2.0]), D1: np.array([1.0, 9.0])}
    residents = {E0: frozenset({0}), D1: frozenset({0})}
    swaps = plan_swaps(residents, imp, {E0: 1, D1: 1}, hysteresis=0.0, max_swaps=None)
    assert swaps == [Swap(D1, 1, 0), Swap(E0, 1, 0)]
    weighted = plan_swaps(residents, imp, {E0: 1, D1: 1}, 0.0, None, layer_weight={E0: 10.0})
    assert weighted[0] == Swap(E0, 1, 0)


def test_plan_swaps_reaches_the_target_and_then_is_stable():
    rng = np.random.default_rng(1)
    imp = {k: rng.random(8) for k in (E0, D1)}
    counts = {E0: 3, D1: 5}
    residents = {E0: frozenset(range(8)), D1: frozenset({7})}
    for _ in range(20):
        swaps = plan_swaps(residents, imp, counts, hysteresis=0.0, max_swaps=2)
        if not swaps:
            break
        for s in swaps:
            cur = set(residents[s.layer])
            cur.discard(s.evict)
            if s.admit is not None:
                cur.add(s.admit)
            residents[s.layer] = frozenset(cur)
        assert all(len(residents[k]) <= counts[k] for k in counts)
    assert residents == initial_residents(imp, counts)
