"""``on-demand``: exact. A token whose expert is not resident waits while it is read; each
layer keeps its most recently used experts (the classic baseline, mixtral-offloading's)."""

from __future__ import annotations

from collections import OrderedDict

from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.model.moe import dispatch
from swapmoe_edge.model.rungs import PRIMARY
from swapmoe_edge.residency.policies.base import CountPolicy, register


@register
class OnDemand(CountPolicy):
    name, exact = "on-demand", True

    def __init__(self, inputs):
        super().__init__(inputs)
        self._used: dict[LayerKey, OrderedDict[int, None]] = {lk: OrderedDict() for lk in inputs.ladders}

    def route(self, engine, layer, normed, logits, token_mask):
        r = engine.route(logits)  # unmasked: every token gets its first choices
        engine.count(r, engine.residents.view(layer.key), token_mask)
        return dispatch(r, normed, lambda e, x: engine.kernel(self.expert(engine, layer, e), x))

    def expert(self, engine, layer, e: int):
        """The resident copy, or (a miss) read now on the token loop, the least recently used going first."""
        lk = layer.key
        with engine.lock:  # the monitor may shrink this layer meanwhile
            expert = engine.residents.layer(lk).get(e)
            if expert is None:  # read into malloc memory: on the token loop, the cheaper fill
                expert = engine.load_now(layer.experts[e], PRIMARY, self._recency(engine, lk), own_mapping=False)
            used = self._used[lk]
            used.pop(e, None)
            used[e] = None
        return expert

    def _recency(self, engine, lk: LayerKey) -> list[ExpertKey]:
        """The layer's residents, least recently used first (one that never served a token: before all)."""
        resident, used = engine.residents.layer(lk), self._used[lk]
        order = [e for e in resident if e not in used] + [e for e in used if e in resident]
        return [ExpertKey(lk.stack, lk.layer, e) for e in order]

    def victims(self, engine):
        with engine.lock:
            return [key for lk in engine.residents.layers for key in self._recency(engine, lk)]
