"""Fitting experts into the live budget: the plan, the policy it drives, and the budget's moves.

This is where the runtime calls into residency: it turns the budget into a plan (per-layer
expert counts, or the ladder's bytes), builds the policy over the resident set, and passes
the monitor's budget moves on to it.
"""

from __future__ import annotations

import logging

import numpy as np

from swapmoe_edge.artifact.manifest import Manifest
from swapmoe_edge.core.errors import BudgetError
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.core.units import format_size
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.residency.ladder_policy import LadderPolicy
from swapmoe_edge.residency.planner import plan_counts
from swapmoe_edge.residency.policies_old import Policy, make_policy
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.runtime.experts import Experts
from swapmoe_edge.system.budget import MemoryMonitor, check_fits

log = logging.getLogger(__name__)


class Fit:
    """The budget side of a runtime: baseline, cap, the monitor and its live budget, and the policy.

    ``budget_bytes`` and ``budget_source`` follow the monitor (``on_budget`` runs on its thread).
    """

    def __init__(self, manifest: Manifest, config: RuntimeConfig, sparse: tuple[LayerKey, ...],
                 norms: dict[LayerKey, np.ndarray], profile: Profile, experts: Experts, residents: ResidentSet,
                 baseline: int, cap: int | None, monitor: MemoryMonitor):
        self.manifest, self.config, self.sparse, self.norms, self.profile = manifest, config, sparse, norms, profile
        self.store, self._kernel, self.expert_cost = experts.store, experts.kernel, experts.cost
        self.rungs, self.runners = experts.rungs, experts.runners
        self.residents, self.baseline, self.cap, self.monitor = residents, baseline, cap, monitor
        first = monitor.sample_once()
        self.budget_bytes, self.budget_source = first.budget, first.source
        self.policy: Policy = self._make_policy(self._plan(self.budget_bytes, strict=True))

    def _ladder_capacity(self, budget: int, strict: bool) -> int:
        """Bytes for expert copies under ``budget``; strict: fail unless one lowest copy per layer fits."""
        lowest = [self.rungs[lk][0].cost for lk in self.sparse]
        if strict:
            return check_fits(budget, self.baseline, lowest)
        return max(budget - self.baseline, sum(lowest))

    def _plan(self, budget: int, strict: bool) -> dict[LayerKey, int]:
        E = self.manifest.config.num_experts
        if self.config.policy == "ladder":
            return {lk: 0 for lk in self.sparse}  # placed by bytes (LadderPolicy), not counts
        if self.config.policy == "full":
            need = self.baseline + sum(self.expert_cost[lk] * E for lk in self.sparse)
            if strict and budget < need:
                raise BudgetError(
                    f"the full policy keeps every expert resident: it needs {format_size(need)} "
                    f"(baseline {format_size(self.baseline)} + experts {format_size(need - self.baseline)}), "
                    f"the budget is {format_size(budget)}. Use another policy or a larger budget."
                )
            return {lk: E for lk in self.sparse}
        per_layer = [self.expert_cost[lk] for lk in self.sparse]
        # No room is kept for an expert in flight: swapmoe's swapper evicts before it reads
        # (SwapMoEPolicy.begin), so every approximate policy holds the same number of experts.
        if strict:
            capacity = check_fits(budget, self.baseline, per_layer)
        else:
            capacity = max(budget - self.baseline, sum(per_layer))  # never below one per layer
        importance = self.norms if self.config.policy == "prune" else dict(self.profile.importance)
        loss = self.profile.loss if self.config.policy == "swapmoe" else None  # measured curves: masked routing's
        return plan_counts(importance, self.expert_cost, capacity, method=self.config.planner,
                           layer_weight=self.config.layer_weights(self.sparse), loss=loss)

    def _make_policy(self, counts) -> Policy:
        ladder = None
        if self.config.policy == "ladder":
            ladder = dict(rungs=self.rungs, runners=self.runners,
                          capacity_bytes=self._ladder_capacity(self.budget_bytes, strict=True),
                          bytes_per_interval=self.config.max_swaps_per_interval * max(self.expert_cost.values()))
        return make_policy(self.config, self.residents, self.store, self._kernel, self.manifest.config.expert_capacity,
                           counts, self.norms, self.profile, ladder)

    def on_budget(self, budget: int) -> None:
        """Monitor thread: the live budget moved; shrink residents now (growth is lazy)."""
        self.budget_bytes = budget
        last = self.monitor.last_sample()
        self.budget_source = last.source if last is not None else self.budget_source
        if self.config.policy == "full":
            if budget < self.baseline + self.residents.nbytes:
                log.warning("full policy is over the live budget (%s); it cannot shrink", format_size(budget))
            return
        if isinstance(self.policy, LadderPolicy):
            self.policy.set_capacity(self._ladder_capacity(budget, strict=False))
            return
        self.policy.resize(self._plan(budget, strict=False))
