"""``swapmoe``: the paper. Masked routing to the resident "virtual experts"; importance (Eq. 1)
kept online, and the swapper brings more important experts in at a bounded rate, with
hysteresis (steps.plan_swaps), within per-layer counts from the planner.

``substitutes`` (a measured profile's, substitution.py): a layer that holds one expert holds
this one, and never swaps it. Every token of such a layer goes to its one expert, so what
matters is how well that expert serves the others' tokens, which importance does not
measure; and a layer's only resident cannot be swapped without a gap anyway.

``predictor`` (predictor.DecoderPredictor, from the profile): once a request's encoder pass is
done, its encoder routing predicts which experts the request's decoder will want. From then
on each decoder layer is planned from that prediction instead of the prior and the last
documents. ``predict_decoder="wait"``: the token loop makes every swap the prediction needs
before the decoder's first step (reads counted as stall); "background": the swapper wakes at
once and makes them all (not one per interval) once the first token is out, while the first
tokens decode with the old sets.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.residency.importance import eq1
from swapmoe_edge.residency.policies.base import CountPolicy, register
from swapmoe_edge.residency.predictor import PREDICT_WAIT_MAX_EXPERT_BYTES
from swapmoe_edge.residency.steps import Round, plan_swaps


@register
class SwapMoE(CountPolicy):
    name, exact = "swapmoe", False
    swaps = tracks = True
    deterministic_default = True  # same quality, no decode cost, ~0.2 ms a request at its boundary

    def __init__(self, inputs):
        super().__init__(inputs)
        cfg, profile = self.config, inputs.profile
        self.renormalize = cfg.renormalize
        self.interval_s, self.max_swaps = cfg.swap_interval_s, cfg.max_swaps_per_interval
        self.hysteresis, self.decay = cfg.hysteresis, cfg.decay
        self.substitutes = dict(getattr(profile, "substitute", {}) or {})
        mode = cfg.predict_decoder
        if mode == "auto":
            mode = "wait" if inputs.largest_expert <= PREDICT_WAIT_MAX_EXPERT_BYTES else "off"
        self.predictor = getattr(profile, "predictor", None) if mode != "off" else None
        self.predict_wait = mode == "wait"
        self.predicted: dict[LayerKey, np.ndarray] = {}  # the last request's decoder prediction, until the next one's
        self._request_encoder: dict[LayerKey, np.ndarray] = {}  # this request's Eq. 1 per encoder layer
        self._predicted_now = False  # this request's decoder prediction is made
        self._burst = False  # a prediction the swapper has not planned for yet

    def planned_loss(self):
        return self.inputs.profile.loss  # measured curves: masked routing's

    def order(self, engine):
        return self.pinned(self.inputs.profile.importance, engine.limits.counts)

    def shrink_order(self, engine):
        return self.pinned(engine.tracker.snapshot(), engine.limits.counts)  # today's importance, not the start's

    def rank(self, engine, importance):
        return self.pinned(importance, engine.limits.counts)

    def pinned(self, importance: Mapping[LayerKey, np.ndarray], counts: Mapping[LayerKey, int]) -> dict[LayerKey, np.ndarray]:
        """``importance`` with each one-expert layer's substitute ranked first (a copy where changed)."""
        out = dict(importance)
        for lk, e in self.substitutes.items():
            if counts.get(lk) == 1 and lk in out:
                row = np.array(out[lk], dtype=np.float64)
                row[e] = max(float(row.max()), 0.0) * 2.0 + 1.0
                out[lk] = row
        return out

    # -- the token loop ----------------------------------------------------------------------------
    def route(self, engine, layer, normed, logits, token_mask):
        r, out = engine.masked(layer, normed, logits, token_mask)
        if self.predictor is not None and not self._predicted_now:
            self._predict(engine, layer.key, normed, r.probs, token_mask)
        return out

    def _predict(self, engine, lk: LayerKey, normed, probs, token_mask) -> None:
        """Add up the encoder pass; at the request's first decoder layer, predict the decoder's experts."""
        if lk.stack == "encoder":
            if lk in self.predictor.inputs:
                value, _ = eq1(engine.tracker.norms(lk), np.linalg.norm(normed, axis=-1), probs, token_mask,
                               engine.top_k)
                self._request_encoder[lk] = self._request_encoder.get(lk, 0.0) + value
            return
        if not self._request_encoder:
            return
        seen = {k: self._request_encoder.get(k, np.zeros(self.predictor.experts)) for k in self.predictor.inputs}
        self.predicted = self.predictor.predict(seen)
        self._predicted_now = True
        if not self.predict_wait:
            self._burst = True
            engine.wake()
            return
        # The predicted swaps, here on the token loop, before the decoder's first step. Each is read
        # into a mapping of its own, as the swapper's are: read into malloc memory (on-demand's
        # cheaper fill) ~2.6 experts a request left the heap holding freed ones, and peak RSS went
        # 1.7-2.3% over the budget at 50 and 33% on the embedded model.
        engine.carry_out(self.round(engine, only=set(self.predicted)), "loop")

    def end_request(self, engine) -> None:
        self._request_encoder, self._predicted_now = {}, False

    # -- the swapper -------------------------------------------------------------------------------
    def moves(self, engine) -> Round:
        return self.round(engine)

    def round(self, engine, only: set[LayerKey] | None = None) -> Round:
        """The swapper's decision, a pure function of today's importance, residents and counts
        (the swapper thread and the trace replay, replay.py, both run it). ``only``: every swap
        these layers need now (a decoder prediction's, made on the token loop); the rest wait for
        the swapper."""
        with engine.lock:
            counts = dict(engine.limits.counts)
            importance = engine.tracker.snapshot()
            importance.update({lk: row.copy() for lk, row in self.predicted.items() if lk in importance})
            importance = self.pinned(importance, counts)
            burst = False
            if only is None:
                burst, self._burst = self._burst, False  # a new prediction: every swap it needs, now
            swaps = plan_swaps(engine.residents.residents(), importance, counts, self.hysteresis,
                               None if only is not None or burst else self.max_swaps, self.layer_weight,
                               unavailable=engine.residents.unavailable)
        return Round([s.move() for s in swaps if only is None or s.layer in only])
