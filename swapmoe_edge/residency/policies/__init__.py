"""The policies, one module each, found by name: ``POLICIES[name]`` is the class, and
``make_policy`` builds one and the residency engine that runs it.

| policy     | on a non-resident first choice                          | output |
|------------|---------------------------------------------------------|--------|
| full       | never happens (all resident)                            | exact  |
| on-demand  | waits while it is read (each layer keeps its most       | exact  |
|            | recently used experts)                                  |        |
| prune      | masked to the best resident (largest norms, fixed)      | lossy  |
| swapmoe    | masked; the swapper brings important ones in            | lossy  |
| ladder     | runs at the best resident precision; masked only when   | lossy  |
|            | no copy is resident                                     |        |
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

import numpy as np

from swapmoe_edge.core.errors import InputError
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.model.rungs import Rung
from swapmoe_edge.residency.engine import Engine, KernelFn
from swapmoe_edge.residency.importance import ImportanceTracker
from swapmoe_edge.residency.planner import one_rung
from swapmoe_edge.residency.policies import full, on_demand, prune, swapmoe, ladder  # noqa: F401, I001 (they register, in this order)
from swapmoe_edge.residency.policies.base import REGISTRY, Inputs, Policy
from swapmoe_edge.residency.resident import ResidentSet

POLICIES: Mapping[str, type[Policy]] = MappingProxyType(REGISTRY)  # name -> class, in registration order


def policy_class(name: str) -> type[Policy]:
    """The policy registered as ``name`` (InputError naming the others if none is)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise InputError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None


def make_tracker(cfg, norms: Mapping[LayerKey, np.ndarray], profile, top_k: int = 1) -> ImportanceTracker:
    """Online importance (Eq. 1 over each token's ``top_k`` choices): the calibrated profile as a
    prior worth ``cfg.prior_documents`` documents that never decays, or (None) as a seed that decays."""
    tracker = ImportanceTracker(norms, top_k)
    if getattr(cfg, "prior_documents", None) is None:
        tracker.seed(profile)
    else:
        tracker.set_prior(profile, cfg.prior_documents)
    return tracker


def make_policy(cfg, residents: ResidentSet, store, kernel: KernelFn, tokens_per_expert: int,
                norms: Mapping[LayerKey, np.ndarray], profile, *, expert_cost: Mapping[LayerKey, int], budget: int,
                baseline: int = 0, rungs: Mapping[LayerKey, list[Rung]] | None = None,
                runners: Mapping[str, object] | None = None, family=None) -> Engine:
    """The engine running the policy ``cfg.policy`` (a RuntimeConfig) over ``residents``, its limits
    set for ``budget`` (bytes, whole process) over ``baseline`` (BudgetError, with the numbers,
    when it cannot serve them). The runtime and the trace replay (replay.py, with a budget of
    expert bytes and no baseline) both build theirs here. ``rungs`` and ``runners``: each
    layer's precision ladder and the runners of its low-bit copies, for a policy that uses them.
    ``family``: the model's (families.Family): its router routes every token (None: Switch's)."""
    cls = policy_class(cfg.policy)
    if cls.uses_rungs and not rungs:
        raise ValueError(f"the {cls.name} policy needs the artifact's rungs and their runners (the runtime builds them)")
    ladders = rungs if cls.uses_rungs else one_rung(expert_cost)
    inputs = Inputs(cfg, norms, profile, dict(expert_cost), ladders, getattr(store, "largest_expert", 0))
    top_k = family.top_k if family is not None else 1
    tracker = make_tracker(cfg, norms, profile, top_k) if cls.tracks else None
    return Engine(cls(inputs), residents, store, kernel, tokens_per_expert, ladders, budget, baseline, runners, tracker,
                  family)
