"""The ``ladder`` policy: every expert resident at one precision or not at all.

The planner (ladder_plan.py) places (expert, rung) pairs under the byte budget by
importance; a token runs its first choice at whatever rung that expert is resident;
only a token whose first choice has no resident copy is rerouted to the best resident
expert (as ``swapmoe`` does). A background thread moves experts up and down the ladder
as importance (SwapMoE's Eq. 1, kept online as for ``swapmoe``) and the budget move; the
token loop never waits for it.

A move unpublishes the expert's old copy before it reads the new one (like swapmoe's
evict-before-read): no room is kept for a copy in flight, and the layer's other experts
serve its tokens meanwhile. A layer's last resident is replaced in one publish instead.

``wait=True`` (the user asks for routing as the full model's): a token whose first choice
has no resident copy waits while the token loop reads that expert's lowest copy, evicting
the layer's least important residents to make room (as ``on-demand`` does); no token is
rerouted, and results are exact where no token ran a low-bit copy either.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

import numpy as np

from swapmoe_edge.system import memory
from swapmoe_edge.residency.importance import ImportanceTracker
from swapmoe_edge.residency.ladder_plan import Placement, plan_ladder
from swapmoe_edge.model.rungs import PRIMARY, Rung
from swapmoe_edge.residency.planner import normalised, plan_by_loss
from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.residency.policies_old import Policy, _lower_this_threads_priority
from swapmoe_edge.artifact.store import ExpertReadError, LoadedExpert

log = logging.getLogger(__name__)
TRIM_EVERY = 64 << 20
CAP_UNITS = 4096


class LadderPolicy(Policy):
    name, exact = "ladder", False

    def __init__(self, residents, store, kernel, capacity: int, order, *, tracker: ImportanceTracker,
                 rungs: Mapping[LayerKey, list[Rung]], runners: Mapping[str, object], capacity_bytes: int,
                 layer_weight: dict[LayerKey, float] | None = None, interval_s: float = 0.1,
                 bytes_per_interval: int = 1, max_moves: int = 1, hysteresis: float = 0.1, decay: float = 0.8,
                 wait: bool = False, loss: Mapping[LayerKey, np.ndarray] | None = None):
        super().__init__(residents, store, kernel, capacity, {lk: 0 for lk in order}, order)
        self.tracker = tracker
        self.rungs = {lk: list(r) for lk, r in rungs.items()}  # per layer, lowest first; PRIMARY (if used) last
        self.runners = dict(runners)  # rung name -> RungRunner (PRIMARY has none)
        self.capacity_bytes = int(capacity_bytes)
        self.layer_weight = layer_weight
        self.interval_s = interval_s
        self.bytes_per_interval = max(1, int(bytes_per_interval))
        self.max_moves = max(1, int(max_moves))
        self._untrimmed = 0  # bytes moved since the heap was last trimmed
        self.hysteresis = hysteresis
        self.decay = decay
        self.wait = wait
        self.loss = dict(loss or {})  # measured loss curves (importance.Profile.loss): they split the copies
        self._caps_for: tuple[int, dict[LayerKey, int] | None] = (-1, None)
        self._cost = {(lk, r.name): r.cost for lk, ladder in self.rungs.items() for r in ladder}
        self._low_cache: dict[LayerKey, tuple] = {}
        self.errors: list[str] = []
        self._moves_left = 0  # copies the last swap_once's plan still wanted

    # -- the token loop ------------------------------------------------------------------
    def __call__(self, layer, normed, logits, token_mask):
        if self.wait:
            self._load_missing(layer, logits)
        snapshot = self.residents.layer(layer.key)
        r, out = self._masked_moe(layer, normed, logits, token_mask)
        low = self._low(layer.key, snapshot)
        ran_low = low[r.choice] & r.keep
        if token_mask is not None:
            ran_low = ran_low & token_mask.astype(bool)
        n_low = int(np.count_nonzero(ran_low))
        if n_low:
            with self.counters.lock:
                self.counters.lowbit_tokens += n_low
        self.tracker.observe_later(layer.key, normed, r.probs, token_mask)
        return out

    def _load_missing(self, layer, logits) -> None:
        """``wait``: read the lowest copy of every first choice (padding included, as routing and
        capacity count it) that has none resident, on the token loop; counted as stall."""
        lk = layer.key
        first = np.unique(logits.argmax(axis=-1))  # the softmax's argmax: the unmasked first choices
        missing = [int(e) for e in first if int(e) not in self.residents.layer(lk)
                   and not self.residents.is_unavailable(layer.experts[int(e)])]
        if not missing:
            return
        t0 = time.perf_counter()
        lowest = self.rungs[lk][0]
        keep = {int(x) for x in first}
        loaded = 0
        with self._resize_lock:
            victims = self._victims(lk, keep)
            for e in missing:
                while self.residents.nbytes + lowest.cost > self.capacity_bytes and victims:
                    self._drop(victims.pop(0))
                if self.residents.nbytes + lowest.cost > self.capacity_bytes:
                    break  # nothing left to evict: the rest are rerouted (the result says it is not exact)
                expert = self._read(layer.experts[e], lowest.name)
                if expert is not None:
                    self.residents.put(expert)
                    loaded += 1
        with self.counters.lock:
            self.counters.stall_s += time.perf_counter() - t0
            self.counters.loads += loaded

    def _victims(self, lk: LayerKey, keep: set[int]) -> list[ExpertKey]:
        """Residents to evict for a waited-for read, least valuable first: this layer's others
        before any other layer's (planner value: layer weight times importance share)."""
        out = []
        for other, value in self._values().items():
            for e in self.residents.layer(other):
                if other == lk and e in keep:
                    continue
                out.append((other != lk, value[e], other.stack, other.layer, e))
        out.sort()
        return [ExpertKey(s, lay, e) for _, _, s, lay, e in out]

    def _values(self) -> dict[LayerKey, np.ndarray]:
        """Each expert's planner value today: its layer's weight times its share of the layer's importance."""
        return {lk: (self.layer_weight or {}).get(lk, 1.0) * normalised(row) for lk, row in self.tracker.snapshot().items()}

    def _low(self, lk: LayerKey, snapshot) -> np.ndarray:
        """[E] bool: which experts of ``snapshot`` are low-bit copies (cached per snapshot object)."""
        cached = self._low_cache.get(lk)
        if cached is None or cached[0] is not snapshot:
            low = np.zeros(self.residents.num_experts, dtype=bool)
            for e, ex in snapshot.items():
                low[e] = ex.rung is not None
            cached = (snapshot, low)
            self._low_cache[lk] = cached
        return cached[1]

    def end_request(self) -> None:
        self.tracker.decay(self.decay)

    # -- placement ----------------------------------------------------------------------
    def placement(self) -> Placement:
        """Where every resident expert is now: {layer: {expert: rung}}."""
        return {lk: {e: ex.rung or PRIMARY for e, ex in self.residents.layer(lk).items()} for lk in self.order}

    def target(self) -> Placement:
        importance = self.tracker.snapshot()
        unavailable = frozenset((k.layer_key, k.expert) for k in self.residents.unavailable)
        return plan_ladder(importance, self.rungs, self.capacity_bytes, self.layer_weight, self.placement(),
                           self.hysteresis, unavailable, max_copies=self._caps())

    def _caps(self) -> dict[LayerKey, int] | None:
        """How many copies each layer holds, by the measured loss of keeping k experts (None: no
        curves). Planned in at most ``CAP_UNITS`` units of the capacity (copy costs rounded up, so
        it still fits): the copies' measured costs share no useful divisor, and byte-exact
        planning allocated ~65 MB of tables on every plan (the embedded model's peaks went 10-57%
        over budget). Kept until the capacity moves."""
        if not self.loss:
            return None
        if self._caps_for[0] != self.capacity_bytes:
            unit = max(1, self.capacity_bytes // CAP_UNITS)
            lowest = {lk: -(-ladder[0].cost // unit) * unit for lk, ladder in self.rungs.items()}
            self._caps_for = (self.capacity_bytes, plan_by_loss(self.loss, lowest, self.capacity_bytes, list(self.rungs)))
        return self._caps_for[1]

    def steps(self, target: Placement) -> tuple[list[ExpertKey], list[tuple[ExpertKey, str]]]:
        """How to get from here to ``target``: the experts to drop (least valuable first) and the
        copies to read (moves down first, as they free room, then moves up and admissions by value)."""
        values = self._values()
        drops, down, up = [], [], []
        for lk, want in target.items():
            rank = {r.name: i for i, r in enumerate(self.rungs[lk])}
            have = {e: ex.rung or PRIMARY for e, ex in self.residents.layer(lk).items()}
            value = values[lk]
            for e in have:
                if e not in want:
                    drops.append((value[e], lk.stack, lk.layer, e))
                elif rank[want[e]] < rank[have[e]]:
                    down.append((ExpertKey(lk.stack, lk.layer, e), want[e]))
            for e, rung in want.items():
                if e not in have or rank[rung] > rank[have[e]]:
                    up.append((-value[e], lk.stack, lk.layer, e, rung))
        drops.sort()
        up.sort()
        return ([ExpertKey(s, lay, e) for _, s, lay, e in drops],
                down + [(ExpertKey(s, lay, e), rung) for _, s, lay, e, rung in up])

    # -- moving experts ---------------------------------------------------------------------
    def _read(self, key: ExpertKey, rung: str) -> LoadedExpert | None:
        """Read ``key`` at ``rung`` off the token loop; an unreadable copy marks the expert unavailable."""
        try:
            if rung == PRIMARY:
                return self.store.read(key)
            return self.runners[rung].load(self.store.read(key, rung=rung))
        except ExpertReadError as e:
            log.warning("%s; marking it unavailable", e)
            self.residents.mark_unavailable(key)
            return None

    def _drop(self, key: ExpertKey) -> bool:
        """Evict ``key`` unless it is its layer's last resident (its tokens would have nowhere to go)."""
        if len(self.residents.layer(key.layer_key)) > 1 and self.residents.drop(key):
            with self.counters.lock:
                self.counters.evictions += 1
            return True
        return False

    def _move(self, key: ExpertKey, rung: str, drops: list[ExpertKey]) -> int:
        """Put ``key`` on ``rung``, evicting from ``drops`` (in order) only as much as that needs;
        return the bytes read (0: it does not fit yet, or the read failed)."""
        lk = key.layer_key
        held = self.residents.layer(lk).get(key.expert)
        need = self._cost[(lk, rung)] - (held.nbytes if held is not None else 0)
        while self.residents.nbytes + need > self.capacity_bytes and drops:
            self._drop(drops.pop(0))
        if self.residents.nbytes + need > self.capacity_bytes:
            return 0  # the budget fell since the plan; the next plan says what fits
        alone = held is not None and len(self.residents.layer(lk)) == 1
        if held is not None and not alone:
            self.residents.drop(key)  # evict before read: its tokens go to the layer's others meanwhile
        expert = self._read(key, rung)
        if expert is None:
            return 0
        with self._resize_lock:
            if self.residents.nbytes - (held.nbytes if alone else 0) + expert.nbytes > self.capacity_bytes and not alone:
                return 0  # the budget fell during the read
            self.residents.put(expert)  # replaces a layer's last copy in one publish
        with self.counters.lock:
            self.counters.swaps += 1
        entry = self.store.manifest.experts[key]
        got = entry.nbytes if rung == PRIMARY else entry.rungs[rung].nbytes
        self._untrimmed += got
        if self._untrimmed >= TRIM_EVERY:
            # Each session build leaves its transient buffers (the copy ORT takes of the bytes,
            # packing scratch) as free heap that glibc keeps: filling switch-base-64 at 4.7 GiB
            # went 0.9 GiB past the accounted copies; trimmed every 64 MiB, it stays at them.
            memory.trim()
            self._untrimmed = 0
        return got

    def swap_once(self, limit_bytes: int | None = None) -> int:
        """Plan against today's importance and budget; read copies up to ``limit_bytes`` and
        ``max_moves`` (at least one); ``limit_bytes`` given: no move limit (the start fill)."""
        if not self.background_io.is_set():
            return 0
        limit = self.bytes_per_interval if limit_bytes is None else limit_bytes
        # Each copy also costs a session build (MatMulNBits prepacking: ~10-20 ms of CPU for a
        # switch-base expert), so the steady rate is counted in copies as well as bytes.
        moves_limit = self.max_moves if limit_bytes is None else 1 << 30
        drops, moves = self.steps(self.target())
        done = read = 0
        self._moves_left = len(moves)
        for key, rung in moves:
            # A request's prefill closes the gate: a copy's read and session build would take
            # flash and CPU from it (as for swapmoe's swapper, Policy.background_io).
            if self._stop.is_set() or read >= limit or done >= moves_limit or not self.background_io.is_set():
                break
            got = self._move(key, rung, drops)
            if got == 0 and self.residents.nbytes + self._cost[(key.layer_key, rung)] > self.capacity_bytes:
                break  # nothing later fits either until the next plan
            read += got
            done += got > 0
        self._moves_left -= done
        return done

    # -- lifecycle --------------------------------------------------------------------------
    def warm(self, background: bool = False) -> None:
        """Place the start plan: all of it now, or (``background``) each layer's first copy now
        and the rest on the swapper thread without its rate limit."""
        drops, moves = self.steps(self.target())
        seen: set[LayerKey] = set()
        for key, rung in moves:
            if background and key.layer_key in seen:
                continue
            seen.add(key.layer_key)
            self._move(key, rung, drops)
        memory.trim()
        if not background:
            self.filled.set()

    def wait_filled(self, timeout: float | None = None) -> bool:
        return self.filled.wait(timeout)

    def _loop(self) -> None:
        _lower_this_threads_priority()
        idle = 0
        while not self._stop.wait(0 if not self.filled.is_set() else self.interval_s):
            try:
                if not self.filled.is_set():  # the start fill: no rate limit
                    if self.background_io.wait(0.05):
                        idle = 0 if self.swap_once(limit_bytes=1 << 62) else idle + 1
                        if idle >= 3 or not self._moves_left:
                            self.filled.set()  # at the plan, or nothing more fits
                else:
                    self.swap_once()
            except Exception as e:  # the swapper must never take the runtime down
                log.exception("ladder swapper failed")
                self.errors.append(repr(e))

    # -- budget -----------------------------------------------------------------------------
    def set_capacity(self, capacity_bytes: int) -> None:
        """The live budget moved: drop what no longer fits at once (least valuable first, copies
        the new plan puts lower included); the swapper refills lower rungs."""
        with self._resize_lock:
            self.capacity_bytes = int(capacity_bytes)
        if self.residents.nbytes <= self.capacity_bytes:
            return
        drops, moves = self.steps(self.target())
        lowered = [key for key, _ in moves if key in self.residents]
        for key in drops + lowered:
            if self.residents.nbytes <= self.capacity_bytes:
                break
            self._drop(key)

    def resize(self, counts) -> None:  # count-based budgets do not apply to the ladder
        raise AssertionError("the ladder is resized by bytes: set_capacity()")
