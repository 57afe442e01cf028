"""Fitting experts into the live budget: the plan, the policy it drives, and the budget's moves.

This is where the runtime calls into residency: it builds the residency engine for the
configured policy over the resident set, with the first live budget, and passes the monitor's
budget moves on to it (the engine turns a budget into per-layer counts or the ladder's bytes).
"""

from __future__ import annotations

import numpy as np

from swapmoe_edge.artifact.manifest import Manifest
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.model.families import Family
from swapmoe_edge.residency.engine import Engine
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.residency.policies import make_policy
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.runtime.experts import Experts
from swapmoe_edge.system.budget import MemoryMonitor


class Fit:
    """The budget side of a runtime: baseline, cap, the monitor and its live budget, and the policy.

    ``budget_bytes`` and ``budget_source`` follow the monitor (``on_budget`` runs on its thread).
    """

    def __init__(self, manifest: Manifest, config: RuntimeConfig, sparse: tuple[LayerKey, ...],
                 norms: dict[LayerKey, np.ndarray], profile: Profile, experts: Experts, residents: ResidentSet,
                 baseline: int, cap: int | None, monitor: MemoryMonitor, family: Family | None = None):
        self.manifest, self.config, self.sparse, self.norms, self.profile = manifest, config, sparse, norms, profile
        self.store, self._kernel, self.expert_cost = experts.store, experts.kernel, experts.cost
        self.rungs, self.runners = experts.rungs, experts.runners
        self.residents, self.baseline, self.cap, self.monitor = residents, baseline, cap, monitor
        first = monitor.sample_once()
        self.budget_bytes, self.budget_source = first.budget, first.source
        # The residency engine running the configured policy; its limits follow the budget
        # (BudgetError, with the numbers, when the policy cannot serve it).
        self.policy: Engine = make_policy(config, residents, self.store, self._kernel,
                                          manifest.config.expert_capacity, norms, profile,
                                          expert_cost=self.expert_cost, budget=self.budget_bytes, baseline=baseline,
                                          rungs=self.rungs, runners=self.runners, family=family)

    def on_budget(self, budget: int) -> None:
        """Monitor thread: the live budget moved; the engine shrinks the residents now (growth is the policy's)."""
        self.budget_bytes = budget
        last = self.monitor.last_sample()
        self.budget_source = last.source if last is not None else self.budget_source
        self.policy.resize(budget)
