"""Deterministic serving: swaps only at request boundaries, so timing never changes an output.

The swapper's timing is perturbed two ways: flash whose reads take a random time (a store that
sleeps), and a token loop that pauses at random sparse layers (a MoE hook that sleeps). Both are
seeded, so each run is one fixed perturbation.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.artifact.store import ExpertStore  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402

from tiny import export_tiny  # noqa: E402

# A swapper that swaps as often and as much as it can: any timing difference shows in the residents.
EAGER = dict(policy="swapmoe", budget="25%", swap_interval_s=0.001, max_swaps_per_interval=4, hysteresis=0.0,
             decay=0.3, threads=1)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("deterministic"), seed=43, num_experts=8,
                       num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)


def _requests(n: int = 10) -> list[list[list[int]]]:
    """``n`` requests of two rows each, inputs that route differently from request to request."""
    rng = np.random.default_rng(5)
    return [[[int(t) for t in rng.integers(3, 96, int(rng.integers(6, 20)))] + [1] for _ in range(2)]
            for _ in range(n)]


class JitteryStore(ExpertStore):
    """Flash whose every read takes a random time up to ``max_delay`` s (seeded), or that blocks
    background reads while ``gate`` is clear."""

    def __init__(self, manifest, max_delay: float = 0.0, seed: int = 0, gate: threading.Event | None = None, **kw):
        super().__init__(manifest, **kw)
        self.rng = random.Random(seed)
        self.max_delay, self.gate = max_delay, gate

    def _read_bytes(self, key, own_mapping=True, rung=None):
        if self.gate is not None:
            self.gate.wait(30)
        if self.max_delay:
            time.sleep(self.rng.uniform(0.0, self.max_delay))
        return super()._read_bytes(key, own_mapping, rung)


def _pauses(seed: int, max_pause: float):
    """A MoE hook that pauses the token loop at random sparse layers (up to ``max_pause`` s)."""
    rng = random.Random(seed)

    def hook(layer, normed, logits, mask, moe):
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0.0, max_pause))
        return moe(layer, normed, logits, mask)

    return hook


def _serve(art, store: ExpertStore, hook=None, gate: threading.Event | None = None, **cfg):
    """Every request's token ids and stats, run one after another on one runtime."""
    rt = Runtime(art, RuntimeConfig(**{**EAGER, **cfg}), store=store)
    if gate is not None:
        gate.clear()  # the start set is in; from here no background read finishes
    try:
        out = [rt.generate(rows, max_new_tokens=8, hook=hook) for rows in _requests()]
        return [[r.token_ids for r in res] for res in out], [res[0].stats for res in out], rt.policy.counters.snapshot()
    finally:
        if gate is not None:
            gate.set()
        rt.close()


def test_deterministic_outputs_do_not_depend_on_when_swaps_land(art):
    m = load_manifest(art)
    calm, calm_stats, calm_counts = _serve(art, JitteryStore(m), deterministic=True)
    shaken, shaken_stats, _ = _serve(art, JitteryStore(m, max_delay=0.03, seed=1), _pauses(2, 0.004), deterministic=True)
    assert calm_counts["swaps"] > 0  # the swapper did move experts: the runs had something to disagree on
    assert shaken == calm
    for st in calm_stats + shaken_stats:
        assert st["deterministic"] is True and st["nondeterminism"] == []
    assert sum(st["swaps"] for st in calm_stats) == calm_counts["swaps"]  # each boundary's swaps count in the next request
    assert max(st["boundary_wait_ms"] for st in shaken_stats) > 0


def test_without_it_the_same_inputs_give_other_outputs_when_the_swapper_is_slower(art):
    m = load_manifest(art)
    # Reads finish at once and the token loop pauses often: the swapper's moves land mid-request.
    eager, eager_stats, eager_counts = _serve(art, JitteryStore(m), _pauses(3, 0.002), deterministic=False)
    # The same runtime, but no background read finishes while the requests run.
    gate = threading.Event()
    gate.set()
    stuck, _, _ = _serve(art, JitteryStore(m, gate=gate), gate=gate, deterministic=False)
    assert eager_counts["swaps"] > 0
    assert stuck != eager
    assert all(st["deterministic"] is False for st in eager_stats)
    assert "deterministic is off" in eager_stats[0]["nondeterminism"][0]


def test_a_background_start_fill_is_waited_for_by_the_first_request(art):
    m = load_manifest(art)
    blocking, _, _ = _serve(art, JitteryStore(m), deterministic=True)
    background, stats, _ = _serve(art, JitteryStore(m, max_delay=0.02, seed=4), deterministic=True,
                                  cold_start="background")
    assert background == blocking and all(st["deterministic"] for st in stats)


def test_memory_pressure_still_shrinks_at_once_and_the_stats_say_so(art):
    rt = Runtime(art, RuntimeConfig(policy="prune", budget="50%", deterministic=True, threads=1))
    try:
        rows = _requests(1)[0]
        before = rt.generate(rows, max_new_tokens=4)[0].stats
        assert before["deterministic"] is True
        full_counts = rt.residents.counts()
        one = rt.expert_cost[next(iter(rt.expert_cost))]
        cap = rt.budget_bytes
        rt.parts.fit.on_budget(rt.baseline + one * len(rt.sparse))  # the monitor: another app took memory
        assert sum(rt.residents.counts().values()) == len(rt.sparse)  # shrank now, not at the boundary
        after = rt.generate(rows, max_new_tokens=4)[0].stats
        assert after["deterministic"] is False and "memory pressure" in after["nondeterminism"][0]
        rt.parts.fit.on_budget(cap)  # memory came back: growth waits for a request boundary
        assert sum(rt.residents.counts().values()) == len(rt.sparse)
        rt.generate(rows, max_new_tokens=4)
        assert rt.residents.counts() == full_counts
    finally:
        rt.close()


def test_policies_without_a_swapper_are_deterministic_anyway(art):
    for policy in ("full", "prune", "on-demand"):
        budget = "100%" if policy == "full" else "25%"
        with Runtime(art, RuntimeConfig(policy=policy, budget=budget, threads=1)) as rt:
            st = rt.generate(_requests(1)[0], max_new_tokens=4)[0].stats
        assert st["deterministic"] is True, policy


def test_by_default_swapmoe_is_deterministic_and_the_ladder_and_a_background_start_are_not():
    from swapmoe_edge.residency.engine import resolve_deterministic
    from swapmoe_edge.residency.policies import POLICIES

    def det(**cfg):
        c = RuntimeConfig(**cfg)
        return resolve_deterministic(c, POLICIES[c.policy])

    assert det(policy="swapmoe") is True
    assert det(policy="ladder") is False
    assert det(policy="swapmoe", cold_start="background") is False  # it asked to serve during the fill
    assert det(policy="swapmoe", predict_decoder="background") is False  # and to swap while decoding
    assert det(policy="ladder", deterministic=True) is True and det(policy="swapmoe", deterministic=False) is False
    assert det(policy="swapmoe", cold_start="background", deterministic=True) is True


def test_the_default_swapmoe_runtime_reports_deterministic_outputs(art):
    with Runtime(art, RuntimeConfig(policy="swapmoe", budget="25%", threads=1)) as rt:
        st = rt.generate(_requests(1)[0], max_new_tokens=4)[0].stats
    assert st["deterministic"] is True and st["nondeterminism"] == []
