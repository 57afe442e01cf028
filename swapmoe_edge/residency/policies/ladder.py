"""``ladder``: every expert resident at one precision or not at all.

The planner (planner.plan) places (expert, rung) pairs under the byte budget by importance; a
token runs its first choice at whatever rung that expert is resident; only a token whose first
choice has no resident copy is rerouted to the best resident expert (as ``swapmoe`` does). The
swapper moves experts up and down the ladder as importance (SwapMoE's Eq. 1, kept online as
for ``swapmoe``) and the budget move; the token loop never waits for it. A move unpublishes the
expert's old copy before it reads the new one (the engine's evict-before-read).

``ladder_wait`` (the user asks for routing as the full model's): a token whose first choice has
no resident copy waits while the token loop reads that expert's lowest copy, evicting the
least valuable residents (this layer's others first) to make room, as ``on-demand`` does; no
token is rerouted, and results are exact where no token ran a low-bit copy either.
"""

from __future__ import annotations

import numpy as np

from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.model.moe import softmax, top_k
from swapmoe_edge.residency.limits import Limits
from swapmoe_edge.residency.loss_split import copies_by_loss
from swapmoe_edge.residency.planner import Placement, plan, values
from swapmoe_edge.residency.policies.base import Policy, register
from swapmoe_edge.residency.steps import Round, toward


@register
class Ladder(Policy):
    name, exact = "ladder", False
    swaps = tracks = uses_rungs = True
    trim_every = 64 << 20
    # Off by default: a round at every request boundary made ~15x the swaps of the timed swapper on
    # the embedded model (each a low-bit session built), ~1 ms a request of boundary waits and
    # slower first tokens on the new sessions, for the same quality (docs/results/deterministic).
    deterministic_default = False

    def __init__(self, inputs):
        super().__init__(inputs)
        cfg = self.config
        self.ladders = {lk: list(r) for lk, r in inputs.ladders.items()}  # per layer, lowest first
        self.interval_s, self.hysteresis, self.decay = cfg.swap_interval_s, cfg.hysteresis, cfg.decay
        # Each copy also costs a session build (MatMulNBits prepacking: ~10-20 ms of CPU for a
        # switch-base expert), so the steady rate is counted in copies as well as bytes.
        self.max_moves = max(1, cfg.max_swaps_per_interval)
        self.bytes_per_interval = max(1, cfg.max_swaps_per_interval * max(inputs.expert_cost.values()))
        self.wait = cfg.ladder_wait
        self.loss = dict(inputs.profile.loss or {}) if cfg.ladder_loss_split else {}  # measured curves split the copies
        self._caps: tuple[int, dict[LayerKey, int] | None] = (-1, None)

    @classmethod
    def start_order(cls, norms, profile):
        return None  # the ladder starts from low-bit copies

    # -- the token loop ----------------------------------------------------------------------------
    def route(self, engine, layer, normed, logits, token_mask):
        if self.wait:
            self._load_missing(engine, layer, logits)
        return engine.masked(layer, normed, logits, token_mask)[1]

    def _load_missing(self, engine, layer, logits) -> None:
        """Read the lowest copy of every first choice (padding included, as routing and capacity
        count it) that has none resident, on the token loop."""
        lk = layer.key
        first = np.unique(top_k(softmax(logits.astype(np.float32)), engine.top_k))  # the unmasked first choices
        missing = [int(e) for e in first if int(e) not in engine.residents.layer(lk)
                   and not engine.residents.is_unavailable(layer.experts[int(e)])]
        if not missing:
            return
        with engine.lock:
            room = self._victims(engine, lk, {int(x) for x in first})
            for e in missing:
                lowest = self._lowest_readable(engine, layer.experts[e])
                if lowest is None:
                    continue
                if engine.load_now(layer.experts[e], lowest.name, room) is None and not engine.fits(lk, lowest.cost, True):
                    break  # nothing left to evict: the rest are rerouted (the result says it is not exact)

    def _victims(self, engine, lk: LayerKey, keep: set[int]) -> list[ExpertKey]:
        """Residents to evict for a waited-for read, least valuable first: this layer's others
        before any other layer's."""
        out = []
        for other, value in values(engine.tracker.snapshot(), self.layer_weight).items():
            for e in engine.residents.layer(other):
                if other != lk or e not in keep:
                    out.append((other != lk, value[e], other.stack, other.layer, e))
        out.sort()
        return [ExpertKey(s, lay, e) for _, _, s, lay, e in out]

    # -- the targets -------------------------------------------------------------------------------
    def limits(self, engine, capacity: int, strict: bool) -> Limits:
        return Limits(capacity=capacity)

    def target(self, engine) -> tuple[Placement, dict]:
        """The plan for today's importance and budget, and the values it weighed."""
        importance = engine.tracker.snapshot()
        unavailable, ranges = self._unreadable(engine.residents)
        capacity = engine.limits.capacity
        want = plan(importance, self.ladders, capacity, self.layer_weight, engine.residents.placement(),
                    self.hysteresis, unavailable, max_copies=self._copies(capacity), rung_range=ranges)
        return want, values(importance, self.layer_weight)

    def _unreadable(self, residents) -> tuple[frozenset, dict[tuple[LayerKey, int], tuple[int, int]]]:
        """The (layer, expert) pairs the plan must leave out, and for each expert with an unreadable
        copy the rungs it may be held at: from its lowest readable rung up to the next unreadable one."""
        out = {(k.layer_key, k.expert) for k in residents.unavailable}
        ranges = {}
        for key, bad in residents.degraded.items():
            span = self._readable(key, bad)
            if span is None:
                out.add((key.layer_key, key.expert))
            else:
                ranges[(key.layer_key, key.expert)] = span
        return frozenset(out), ranges

    def _readable(self, key: ExpertKey, bad: frozenset[str]) -> tuple[int, int] | None:
        """The rung indices ``key`` may be held at, its copies at ``bad`` unreadable: from its lowest
        readable rung up to the next unreadable one (None: none can be read)."""
        names = [r.name for r in self.ladders[key.layer_key]]
        ok = [i for i, name in enumerate(names) if name not in bad]
        if not ok:
            return None
        top = ok[0]
        while top + 1 < len(names) and names[top + 1] not in bad:
            top += 1
        return ok[0], top

    def _lowest_readable(self, engine, key: ExpertKey):
        """The expert's lowest rung whose copy can be read (None: none can)."""
        span = self._readable(key, engine.residents.unreadable_rungs(key))
        return None if span is None else self.ladders[key.layer_key][span[0]]

    def _copies(self, capacity: int) -> dict[LayerKey, int] | None:
        """How many copies each layer holds, by the measured loss of keeping k experts (None: no
        curves); kept until the capacity moves."""
        if not self.loss:
            return None
        if self._caps[0] != capacity:
            lowest = {lk: ladder[0].cost for lk, ladder in self.ladders.items()}
            self._caps = (capacity, copies_by_loss(self.loss, lowest, capacity))
        return self._caps[1]

    def _round(self, engine, **rate) -> Round:
        want, value = self.target(engine)
        drops, moves = toward(engine.residents.placement(), want, value, self.ladders)
        return Round(moves, drops, **rate)

    def start(self, engine) -> Round:
        return self._round(engine)

    def moves(self, engine) -> Round:
        return self._round(engine, max_moves=self.max_moves, max_bytes=self.bytes_per_interval)

    def victims(self, engine) -> list[ExpertKey]:
        """What the plan for the new budget drops, then the copies it moves (lower, or elsewhere)."""
        rnd = self._round(engine)
        return rnd.room + [m.key for m in rnd.moves if m.key in engine.residents]
