"""Fitting experts into the live budget: the plan, the policy it drives, and the budget's moves.

This is where the runtime calls into residency: it builds the residency engine for the
configured policy over the resident set, with the first live budget, and passes the monitor's
budget moves on to it (the engine turns a budget into per-layer counts or the ladder's bytes).
"""

from __future__ import annotations

import logging

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
from swapmoe_edge.core.units import MIB, format_size
from swapmoe_edge.system.budget import MemoryMonitor, MemorySample

log = logging.getLogger(__name__)

# RSS this far over the budget is noise (a sample between a free and the allocator's return of it)
OVER_TOLERANCE = 1 * MIB


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
        self.unaccounted = 0  # bytes of RSS over the budget found while serving, held off the experts since
        self.over_tolerance: float = OVER_TOLERANCE
        self._fixed_at: tuple[int, int] | None = None  # (RSS, expert bytes) when experts were last given up
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
        self.policy.resize(budget - self.unaccounted)

    def on_steady(self, sample: MemorySample) -> None:
        """Monitor thread, the budget unmoved: where the process's RSS is over the budget by more
        than OVER_TOLERANCE, memory the baseline and the residents' costs do not account for
        (allocator growth, buffers of a kind the start did not run) has grown; the experts give it
        up, and keep it given up (``unaccounted`` only grows, so the residents do not churn).
        Only under the user's cap: a budget from free memory already falls as the RSS grows. Not
        for a deterministic lossy runtime (swapmoe's default): its outputs would then depend on
        how the allocator grew; its stats show the peak against the budget instead."""
        if sample.source != "cap" or (self.policy.deterministic and not self.policy.exact):
            return
        over = sample.rss - self.budget_bytes
        beyond = sample.rss - self.baseline - self.residents.nbytes  # what neither the baseline nor the experts hold
        if not (over > self.over_tolerance and beyond > self.unaccounted):
            return
        if self._fixed_at is not None and sample.rss >= self._fixed_at[0] and self.residents.nbytes < self._fixed_at[1]:
            # the experts given up last time did not lower the RSS: giving up more would cost
            # quality for nothing (their memory stays in the allocator); say so once and stop
            log.warning("RSS %s stays over the budget %s although the experts gave up %s: not their memory; "
                        "no further experts are given up for it", format_size(sample.rss),
                        format_size(self.budget_bytes), format_size(self.unaccounted))
            self.over_tolerance = float("inf")
            return
        self.unaccounted = beyond  # the engine keeps a layer's last expert whatever this takes
        self._fixed_at = (sample.rss, self.residents.nbytes)
        log.warning("RSS %s is over the budget %s: %s the runtime does not account for; holding that much "
                    "fewer expert bytes from now on", format_size(sample.rss), format_size(self.budget_bytes),
                    format_size(self.unaccounted))
        self.policy.resize(self.budget_bytes - self.unaccounted)
