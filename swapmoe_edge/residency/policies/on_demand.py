"""``on-demand``: exact. A token whose expert is not resident waits while it is read; each
layer keeps the experts its tokens chose most so far (``on_demand_evict="frequency"``, the
default), or its most recently used ones (``"recency"``: the classic baseline,
mixtral-offloading's). Which experts stay changes what is read, never the output.

Frequency is what a replay of the test streams measured as reading less: on the embedded
Switch model at 50% of the expert bytes, 9.0 GB against LRU's 14.1 GB over 1,000 documents
(Belady's optimum 8.0 GB), and on the decoder-only yardstick 6.5 against 12.2 GB (4.6)
(docs/results/streams/, docs/results/causal/replay.md).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.model.moe import dispatch
from swapmoe_edge.model.rungs import PRIMARY
from swapmoe_edge.residency.policies.base import CountPolicy, register

EVICT = ("frequency", "recency")


@register
class OnDemand(CountPolicy):
    name, exact = "on-demand", True

    def __init__(self, inputs):
        super().__init__(inputs)
        self.evict = self.config.on_demand_evict
        self._used: dict[LayerKey, OrderedDict[int, None]] = {lk: OrderedDict() for lk in inputs.ladders}
        # tokens (each of a top-k token's choices) routed to each expert so far, padding excluded
        self._chosen: dict[LayerKey, np.ndarray] = {lk: np.zeros(len(inputs.norms[lk]), np.int64) for lk in inputs.ladders}

    def route(self, engine, layer, normed, logits, token_mask):
        r = engine.route(logits)  # unmasked: every token gets its first choices
        first = engine.count(r, engine.residents.view(layer.key), token_mask)
        with engine.lock:
            chosen = self._chosen[layer.key]
            chosen += np.bincount(first.ravel(), minlength=chosen.size)
        return dispatch(r, normed, lambda e, x: engine.kernel(self.expert(engine, layer, e), x))

    def expert(self, engine, layer, e: int):
        """The resident copy, or (a miss) read now on the token loop, the weakest to keep going first."""
        lk = layer.key
        with engine.lock:  # the monitor may shrink this layer meanwhile
            expert = engine.residents.layer(lk).get(e)
            if expert is None:  # read into malloc memory: on the token loop, the cheaper fill
                expert = engine.load_now(layer.experts[e], PRIMARY, self._weakest(engine, lk), own_mapping=False)
            used = self._used[lk]
            used.pop(e, None)
            used[e] = None
        return expert

    def _weakest(self, engine, lk: LayerKey) -> list[ExpertKey]:
        """The layer's residents, the first to evict first: least recently used (one that never
        served a token before all), or under "frequency" the least chosen, ties by recency."""
        resident, used = engine.residents.layer(lk), self._used[lk]
        order = [e for e in resident if e not in used] + [e for e in used if e in resident]
        if self.evict == "frequency":
            chosen = self._chosen[lk]
            order.sort(key=lambda e: chosen[e])  # stable: recency breaks ties
        return [ExpertKey(lk.stack, lk.layer, e) for e in order]

    def victims(self, engine):
        with engine.lock:
            return [key for lk in engine.residents.layers for key in self._weakest(engine, lk)]
