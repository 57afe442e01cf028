"""``prune``: the paper's pruning baseline. A fixed set of the largest-norm experts, masked routing; lossy."""

from __future__ import annotations

from swapmoe_edge.core.keys import ExpertKey
from swapmoe_edge.residency.planner import top_experts
from swapmoe_edge.residency.policies.base import CountPolicy, register
from swapmoe_edge.residency.steps import Move, Round


@register
class Prune(CountPolicy):
    name, exact = "prune", False

    def __init__(self, inputs):
        super().__init__(inputs)
        self.renormalize = self.config.renormalize

    @classmethod
    def start_order(cls, norms, profile):
        return norms

    def planned_from(self):
        return self.inputs.norms

    def order(self, engine):
        return self.inputs.norms

    def refill(self, engine) -> Round:
        """A budget that grew takes the next-largest norms back at once."""
        return Round([Move(ExpertKey(lk.stack, lk.layer, e)) for lk, n in engine.limits.counts.items()
                      for e in top_experts(self.inputs.norms[lk], n)])
