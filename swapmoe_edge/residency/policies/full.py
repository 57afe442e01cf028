"""``full``: every expert resident. The exact reference and the memory upper bound."""

from __future__ import annotations

import logging

from swapmoe_edge.core.errors import BudgetError
from swapmoe_edge.core.units import format_size
from swapmoe_edge.residency.limits import Limits
from swapmoe_edge.residency.policies.base import CountPolicy, register

log = logging.getLogger(__name__)


@register
class Full(CountPolicy):
    name, exact = "full", True
    fills_in_background = False  # routing would differ from full's until every expert is in
    holds_all = True

    def order(self, engine):
        return self.inputs.norms

    def limits(self, engine, capacity: int, strict: bool) -> Limits:
        E = engine.residents.num_experts
        need = sum(ladder[0].cost * E for ladder in self.inputs.ladders.values())
        if capacity < need:
            if strict:
                base = engine.baseline
                raise BudgetError(
                    f"the full policy keeps every expert resident: it needs {format_size(base + need)} "
                    f"(baseline {format_size(base)} + experts {format_size(need)}), "
                    f"the budget is {format_size(base + capacity)}. Use another policy or a larger budget.")
            log.warning("full policy is over the live budget (%s); it cannot shrink", format_size(engine.baseline + capacity))
        return Limits(counts={lk: E for lk in self.inputs.ladders})
