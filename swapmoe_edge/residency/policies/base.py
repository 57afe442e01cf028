"""What a policy is: a routing rule and a source of targets, registered by name.

The engine (engine.py) calls a policy for two things. On the token loop, ``route``: what a
token whose expert is not resident gets (masked to the best resident, or waited for). Off it,
the targets: ``limits`` (what a budget lets it hold), ``start`` (the start set), ``moves`` (the
swapper's next round, for a policy that swaps), ``victims`` (who goes first when the budget
falls) and ``refill`` (what it takes back at once when the budget grows). Everything else (the
reads, evictions, threads, counters) is the engine's.

A new policy is a module in this package with a ``Policy`` subclass under ``@register``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from swapmoe_edge.artifact.manifest import LayerEntry
from swapmoe_edge.artifact.store import LoadedExpert
from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.model.rungs import Rung
from swapmoe_edge.residency.limits import Limits
from swapmoe_edge.residency.planner import plan_counts, top_experts
from swapmoe_edge.residency.steps import Move, Round, weakest_first

REGISTRY: dict[str, type["Policy"]] = {}


def register(cls: type["Policy"]) -> type["Policy"]:
    """Make ``cls`` the policy named ``cls.name`` (a class decorator)."""
    if cls.name in REGISTRY:
        raise ValueError(f"a policy named {cls.name!r} is registered already")
    REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Inputs:
    """What a policy plans from. ``config``: a RuntimeConfig (its knobs); ``ladders``: each layer's
    rungs, lowest first, with their resident costs (one rung, the artifact's experts, unless the
    policy uses the precision ladder); ``expert_cost``: one artifact expert's resident bytes."""

    config: Any
    norms: Mapping[LayerKey, np.ndarray]  # ||E|| per layer: prune's order, Eq. 1's factor
    profile: Any  # importance.Profile
    expert_cost: Mapping[LayerKey, int]
    ladders: Mapping[LayerKey, Sequence[Rung]]
    largest_expert: int = 0  # bytes of the store's largest expert


class Policy:
    """A routing rule plus a source of targets; see the module docstring. Class attributes are
    facts the runtime may ask of a policy by name before it builds one."""

    name = ""
    exact = True  # its output is full's
    fills_in_background = True  # a background start may route with part of the start set
    swaps = False  # it has a swapper: ``moves`` every ``interval_s``
    tracks = False  # it keeps online importance (the engine's tracker)
    uses_rungs = False  # it holds low-bit copies (the runtime builds their runners)
    holds_all = False  # it loads every expert once and never swaps
    renormalize = False  # masked routing renormalises the gate over the residents
    trim_every: int | None = None  # return freed heap to the system after this many bytes published
    # RuntimeConfig(deterministic=None) means this: swaps only at request boundaries where that was
    # measured to cost nothing (docs/results/deterministic). A policy without a swapper is
    # deterministic either way, unless it serves while a background start fill runs.
    deterministic_default = False
    interval_s = 0.1
    decay = 1.0

    def __init__(self, inputs: Inputs):
        self.inputs = inputs
        self.config = inputs.config
        self.layer_weight = inputs.config.layer_weights(list(inputs.norms))

    @classmethod
    def start_order(cls, norms, profile) -> Mapping[LayerKey, np.ndarray] | None:
        """The ranking of the artifact's experts the start set follows (a start-up read-ahead
        takes each layer's first), or None when it starts from low-bit copies."""
        return profile.importance

    # -- the routing rule ------------------------------------------------------------------------
    def route(self, engine, layer: LayerEntry, normed, logits, token_mask) -> np.ndarray:
        """The sparse layer's output: by default masked to the residents."""
        return engine.masked(layer, normed, logits, token_mask)[1]

    def expert(self, engine, layer: LayerEntry, e: int) -> LoadedExpert:
        """Expert ``e`` to run now: here, only a resident one."""
        return engine.residents.layer(layer.key)[e]

    # -- the targets --------------------------------------------------------------------------------
    def limits(self, engine, capacity: int, strict: bool) -> Limits:
        """What ``capacity`` bytes of experts let it hold (``strict``: at start, where a budget it
        cannot serve raises BudgetError)."""
        raise NotImplementedError

    def start(self, engine) -> Round:
        raise NotImplementedError

    def moves(self, engine) -> Round:
        """The swapper's next round (a policy that swaps)."""
        raise NotImplementedError

    def victims(self, engine) -> list[ExpertKey]:
        """Residents in the order they go when the budget falls, least valuable first."""
        return []

    def refill(self, engine) -> Round | None:
        """What to read at once after the budget moved (None: nothing; growth comes later)."""
        return None

    def rank(self, engine, importance: Mapping[LayerKey, np.ndarray]) -> Mapping[LayerKey, np.ndarray]:
        """``importance`` as this policy ranks experts by it."""
        return importance

    def end_request(self, engine) -> None:
        pass


class CountPolicy(Policy):
    """A policy that holds whole experts, as many per layer as the planner's split of the budget
    gives it (planner.plan_counts), ranked by ``order``."""

    def planned_from(self) -> Mapping[LayerKey, np.ndarray]:
        """The importance the budget's split follows."""
        return self.inputs.profile.importance

    def planned_loss(self) -> Mapping[LayerKey, np.ndarray] | None:
        """Measured loss curves the split minimises instead (None: importance)."""
        return None

    def order(self, engine) -> Mapping[LayerKey, np.ndarray]:
        """Each layer's ranking of its experts: the start set is the top of it."""
        return self.inputs.profile.importance

    def shrink_order(self, engine) -> Mapping[LayerKey, np.ndarray]:
        """Each layer's ranking when the budget falls: the weakest go first."""
        return self.order(engine)

    def limits(self, engine, capacity: int, strict: bool) -> Limits:
        cost = {lk: ladder[0].cost for lk, ladder in self.inputs.ladders.items()}
        return Limits(counts=plan_counts(dict(self.planned_from()), cost, capacity, method=self.config.planner,
                                         layer_weight=self.layer_weight, loss=self.planned_loss()))

    def start(self, engine) -> Round:
        """The top ``count`` experts of each layer, rank by rank across layers (a background start
        then holds every layer's best experts first)."""
        order = self.order(engine)
        ranked = {lk: top_experts(order[lk], n) for lk, n in engine.limits.counts.items()}
        depth = max(map(len, ranked.values()), default=0)
        return Round([Move(ExpertKey(lk.stack, lk.layer, top[r])) for r in range(depth)
                      for lk, top in ranked.items() if r < len(top)])

    def victims(self, engine) -> list[ExpertKey]:
        order = self.shrink_order(engine)
        return [ExpertKey(lk.stack, lk.layer, e) for lk in engine.residents.layers
                for e in weakest_first(engine.residents.layer(lk), order[lk])]
