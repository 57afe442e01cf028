"""What happens when a token's expert is not resident: the four policies of DESIGN.md.

Each policy is the ``moe`` callback of the split model for one sparse layer:
``moe(layer, normed[B,T,D], router_logits[B,T,E], token_mask) -> ffn_out[B,T,D]``.

| policy     | non-resident first choice            | output |
|------------|--------------------------------------|--------|
| full       | never happens (all resident)         | exact  |
| on-demand  | blocks, reads it (per-layer LRU)     | exact  |
| prune      | masked to the best resident (fixed)  | lossy  |
| swapmoe    | masked; a swapper thread brings the  | lossy  |
|            | important ones in the background     |        |
| ladder     | runs at the best resident precision; | lossy  |
|            | masked only when no copy is resident |        |
|            | (ladder_policy.py)                   |        |
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.residency.importance import ImportanceTracker, eq1
from swapmoe_edge.artifact.manifest import LayerEntry
from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.model.moe import dispatch, route
from swapmoe_edge.residency.predictor import PREDICT_WAIT_MAX_EXPERT_BYTES
from swapmoe_edge.residency.planner import Swap, plan_swaps, top_experts
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.artifact.store import ExpertReadError, ExpertStore, LoadedExpert

log = logging.getLogger(__name__)
POLICIES = ("full", "on-demand", "prune", "swapmoe", "ladder")
KernelFn = Callable[[LoadedExpert, np.ndarray], np.ndarray]


class ExpertUnavailableError(SwapMoEError):
    """An exact policy needed an expert that cannot be read."""


@dataclass
class Counters:
    """Running totals; the runtime takes differences around each request."""

    stall_s: float = 0.0  # time the token loop waited for expert reads
    loads: int = 0  # experts read by the token loop (on-demand misses)
    swaps: int = 0  # experts brought in by the background swapper
    evictions: int = 0
    routed: int = 0  # tokens routed in sparse layers (padding excluded)
    first_choice_resident: int = 0  # ... whose unmasked first choice was resident
    unavailable_hits: int = 0  # tokens whose first choice could not be read at all
    rerouted: int = 0  # tokens, padding included, sent away from their first choice (0: routing as full's)
    lowbit_tokens: int = 0  # tokens (padding excluded) that ran a low-bit copy of their expert (ladder)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return {k: v for k, v in self.__dict__.items() if k != "lock"}


class Policy:
    """Shared plumbing: the resident set, the store, the kernel and the counters."""

    name = ""
    exact = True

    def __init__(self, residents: ResidentSet, store: ExpertStore, kernel: KernelFn, capacity: int,
                 counts: dict[LayerKey, int], order: dict[LayerKey, np.ndarray], renormalize: bool = False):
        self.residents = residents
        self.store = store
        self.kernel = kernel
        self.capacity = capacity
        self.counts = dict(counts)
        self.order = order  # per layer: expert scores deciding who stays (importance or norm)
        self.renormalize = renormalize
        self.counters = Counters()
        self._resize_lock = threading.Lock()
        self._allowed_cache: dict[LayerKey, tuple] = {}
        self._filler: threading.Thread | None = None
        self._fill_stop = threading.Event()
        self._stop = threading.Event()  # the background thread of a policy that has one (swapper)
        self._thread: threading.Thread | None = None
        self.filled = threading.Event()
        # Closed while a request runs up to its first token (the encoder pass and the first
        # decoder step): the filler and the swapper wait. On a device the first request's
        # page faults on dense weights (mapped lazily by ONNX Runtime) would queue behind
        # background expert reads on the same flash, and a swap's read, hash and copy take
        # CPU and memory bandwidth from the prefill (swapmoe's TTFT on switch-base-8 was
        # 1.6-1.9x prune's at 50% in the box with swaps allowed during prefill).
        self.background_io = threading.Event()
        self.background_io.set()

    # -- lifecycle ------------------------------------------------------------------------
    def warm(self, background: bool = False) -> None:
        """Load the start set: the top ``count`` experts of each layer by ``order``.

        ``background``: load only each layer's best expert now and the rest on a filler
        thread (rank by rank across layers, at flash speed), so that a device serves its
        first request once the dense part and one expert per layer are in. Policies whose
        routing must not change while they fill (``full``) ignore it.
        """
        ranked = {lk: top_experts(self.order[lk], n) for lk, n in self.counts.items()}
        now = {lk: top[:1] for lk, top in ranked.items()} if background and self.fills_in_background else ranked
        for lk, experts in now.items():
            for e in experts:
                self._admit(ExpertKey(lk.stack, lk.layer, e))
        rest = [ExpertKey(lk.stack, lk.layer, top[r]) for r in range(max(map(len, ranked.values()), default=0))
                for lk, top in ranked.items() if r < len(top) and top[r] not in now[lk]]
        if rest:
            self._filler = threading.Thread(target=self._fill, args=(rest,), name="swapmoe-filler", daemon=True)
            self._filler.start()

    fills_in_background = True

    def _fill(self, keys: list[ExpertKey]) -> None:
        _lower_this_threads_priority()
        for key in keys:
            while not self.background_io.wait(0.05):
                if self._fill_stop.is_set():
                    return
            if self._fill_stop.is_set():
                return
            lk = key.layer_key
            if key in self.residents or len(self.residents.layer(lk)) >= self.counts.get(lk, 0):
                continue
            try:
                expert = self._read_off_loop(key)  # outside the lock: the token loop goes on
            except Exception:
                log.exception("filler: reading %s failed", key.name)
                continue
            if expert is None:
                continue
            with self._resize_lock:  # the budget may have shrunk or another thread admitted it meanwhile
                if key not in self.residents and len(self.residents.layer(lk)) < self.counts.get(lk, 0):
                    self.residents.put(expert)
                    self._admitted(key)
        self.filled.set()

    def _read_off_loop(self, key: ExpertKey) -> LoadedExpert | None:
        """Read ``key`` on a background thread; an unreadable expert is marked so (never planned again)."""
        try:
            return self.store.read(key)
        except ExpertReadError as e:
            log.warning("%s; marking it unavailable", e)
            self.residents.mark_unavailable(key)
            return None

    def _admitted(self, key: ExpertKey) -> None:
        """Hook: an expert became resident outside the token loop."""

    def wait_filled(self, timeout: float | None = None) -> bool:
        """Block until the background fill of the start set is done (True), or the timeout passes."""
        return self._filler is None or self.filled.wait(timeout)

    def start(self) -> None:
        """Start the policy's background thread (``_loop``), if it has one."""
        if hasattr(self, "_loop"):
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=f"swapmoe-{self.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._fill_stop.set()
        if self._filler is not None:
            self._filler.join(timeout=10)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def end_request(self) -> None:
        pass

    # -- budget ---------------------------------------------------------------------------
    def resize(self, counts: dict[LayerKey, int]) -> None:
        """New per-layer counts from the budget: shrink at once (weakest first); grow lazily."""
        with self._resize_lock:
            self.counts = dict(counts)
            for lk, n in counts.items():
                resident = list(self.residents.layer(lk))
                extra = len(resident) - n
                if extra > 0:
                    for e in sorted(resident, key=lambda e: (self.order[lk][e], -e))[:extra]:
                        if self.residents.drop(ExpertKey(lk.stack, lk.layer, e)):
                            with self.counters.lock:
                                self.counters.evictions += 1

    def hold(self, lk: LayerKey, experts) -> int:
        """Make ``experts`` exactly the residents of layer ``lk``, reading what is missing on the
        calling thread; returns how many were read. For bounds and tests (hindsight.py) with the
        policy's own thread stopped: nothing here waits for it."""
        want = {int(e) for e in experts}
        if not 0 < len(want) <= self.counts.get(lk, 0):
            raise ValueError(f"{lk}: {len(want)} experts to hold, the layer's budget is {self.counts.get(lk, 0)}")
        with self._resize_lock:
            for e in set(self.residents.layer(lk)) - want:
                self.residents.drop(ExpertKey(lk.stack, lk.layer, e))
        return sum(self._admit(ExpertKey(lk.stack, lk.layer, e)) is not None
                   for e in sorted(want - set(self.residents.layer(lk))))

    # -- helpers --------------------------------------------------------------------------
    def _admit(self, key: ExpertKey, own_mapping: bool = True) -> LoadedExpert | None:
        if self.residents.is_unavailable(key):
            return None
        try:
            expert = self.store.read(key, own_mapping)
        except ExpertReadError as e:
            log.warning("%s; marking it unavailable", e)
            self.residents.mark_unavailable(key)
            if self.exact:
                raise ExpertUnavailableError(f"{e}. The {self.name} policy is exact and cannot go on without it.") from e
            return None
        self.residents.put(expert)
        return expert

    def _count_routing(self, routing, allowed: np.ndarray, layer: LayerEntry, token_mask) -> None:
        first = routing.first_choice.ravel() if token_mask is None else routing.first_choice[token_mask]
        rerouted = routing.first_choice.size - int(np.count_nonzero(allowed[routing.first_choice]))
        hits = int(np.count_nonzero(allowed[first]))
        missing = 0
        if self.residents.unavailable:
            bad = np.array([self.residents.is_unavailable(k) for k in layer.experts])
            missing = int(bad[first].sum())
        with self.counters.lock:
            self.counters.routed += int(first.size)
            self.counters.first_choice_resident += hits
            self.counters.unavailable_hits += missing
            self.counters.rerouted += rerouted

    def _allowed(self, lk: LayerKey, snapshot) -> np.ndarray:
        """[E] bool of ``snapshot``'s experts, remembered while the layer holds the same experts.
        Read-only. The cache keeps their indices, not the snapshot: a snapshot would keep experts
        evicted since alive until the layer runs again (a decoder prediction's swaps took peak
        RSS 1.3% over the budget that way)."""
        cached = self._allowed_cache.get(lk)
        if cached is None or snapshot.keys() != cached[0]:
            cached = (frozenset(snapshot), self.residents.allowed(lk, snapshot))
            self._allowed_cache[lk] = cached
        return cached[1]

    def _masked_moe(self, layer: LayerEntry, normed, logits, token_mask):
        m = self.residents.layer(layer.key)  # one consistent snapshot for this layer
        allowed = self._allowed(layer.key, m)
        if not allowed.any():
            raise ExpertUnavailableError(f"{layer.key}: no expert is resident or readable; cannot route.")
        r = route(logits, self.capacity, allowed, self.renormalize)
        self._count_routing(r, allowed, layer, token_mask)
        return r, dispatch(r, normed, lambda e, x: self.kernel(m[e], x))


class FullPolicy(Policy):
    """Every expert resident: the exact reference and the memory upper bound."""

    name, exact = "full", True
    fills_in_background = False  # routing would differ from full's until every expert is in

    def __call__(self, layer, normed, logits, token_mask):
        return self._masked_moe(layer, normed, logits, token_mask)[1]


class PrunePolicy(Policy):
    """The paper's pruning baseline: a fixed set of the largest-norm experts; lossy."""

    name, exact = "prune", False

    def __call__(self, layer, normed, logits, token_mask):
        return self._masked_moe(layer, normed, logits, token_mask)[1]

    def resize(self, counts):
        super().resize(counts)
        for lk, n in counts.items():  # grows back with the next-largest norms
            for e in top_experts(self.order[lk], n):
                key = ExpertKey(lk.stack, lk.layer, e)
                if key not in self.residents and len(self.residents.layer(lk)) < n:
                    self._admit(key)


class OnDemandPolicy(Policy):
    """Exact: a miss blocks the token loop while the expert is read (per-layer LRU)."""

    name, exact = "on-demand", True

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._lru: dict[LayerKey, OrderedDict[int, None]] = {lk: OrderedDict() for lk in self.counts}

    def warm(self, background: bool = False) -> None:
        with self._resize_lock:
            super().warm(background)
            for lk in self.counts:
                for e in self.residents.layer(lk):
                    self._lru[lk].setdefault(e, None)

    def _admitted(self, key: ExpertKey) -> None:
        self._lru[key.layer_key][key.expert] = None  # least recently used: it has not served a token yet
        self._lru[key.layer_key].move_to_end(key.expert, last=False)

    def resize(self, counts):
        with self._resize_lock:
            self.counts = dict(counts)
            for lk, n in counts.items():
                while len(self.residents.layer(lk)) > n and self._lru[lk]:
                    self._evict_lru(lk)

    def _evict_lru(self, lk: LayerKey) -> None:
        e, _ = self._lru[lk].popitem(last=False)
        if self.residents.drop(ExpertKey(lk.stack, lk.layer, e)):
            with self.counters.lock:
                self.counters.evictions += 1

    def _get(self, layer: LayerEntry, e: int) -> LoadedExpert:
        lk = layer.key
        # The monitor thread may shrink this layer meanwhile: the LRU is shared with it.
        with self._resize_lock:
            expert = self.residents.layer(lk).get(e)
            if expert is not None:
                self._lru[lk].move_to_end(e, last=True)
                return expert
            t0 = time.perf_counter()
            while len(self.residents.layer(lk)) >= max(1, self.counts[lk]) and self._lru[lk]:
                self._evict_lru(lk)
            expert = self._admit(layer.experts[e], own_mapping=False)  # on the token loop: the cheaper fill
            self._lru[lk][e] = None
        with self.counters.lock:
            self.counters.stall_s += time.perf_counter() - t0
            self.counters.loads += 1
        return expert

    def __call__(self, layer, normed, logits, token_mask):
        r = route(logits, self.capacity)
        self._count_routing(r, self.residents.allowed(layer.key), layer, token_mask)
        return dispatch(r, normed, lambda e, x: self.kernel(self._get(layer, e), x))


class SwapMoEPolicy(Policy):
    """SwapMoE: masked routing to resident virtual experts; importance (Eq. 1) kept online
    and a background thread swaps experts in at a bounded rate, with hysteresis.

    ``substitutes`` (a measured profile's, substitution.py): a layer that holds one expert
    holds this one, and never swaps it. Every token of such a layer goes to its one expert,
    so what matters is how well that expert serves the others' tokens, which importance
    does not measure; and a layer's only resident cannot be swapped without a gap anyway.

    ``predictor`` (predictor.DecoderPredictor, from the profile): once a request's encoder
    pass is done, its encoder routing predicts which experts the request's decoder will want.
    From then on each decoder layer is planned from that prediction instead of the prior and
    the last documents. ``predict_wait``: the token loop makes every swap the prediction needs
    before the decoder's first step (reads counted as stall); else the swapper wakes at once
    and makes them all (not one per interval) once the first token is out, while the first
    tokens decode with the old sets.
    """

    name, exact = "swapmoe", False

    def __init__(self, *args, tracker: ImportanceTracker, interval_s: float = 0.05,
                 max_swaps_per_interval: int = 2, hysteresis: float = 0.1, decay: float = 0.5,
                 layer_weight: dict[LayerKey, float] | None = None, substitutes: dict[LayerKey, int] | None = None,
                 predictor=None, predict_wait: bool = True, **kw):
        super().__init__(*args, **kw)
        self.predict_wait = predict_wait
        self.substitutes = dict(substitutes or {})
        self.predictor = predictor
        self._request_encoder: dict[LayerKey, np.ndarray] = {}  # this request's Eq. 1 per encoder layer
        self._predicted_now = False  # this request's decoder prediction is made
        self._predicted: dict[LayerKey, np.ndarray] = {}  # the last request's, until the next one's
        self._burst = False  # a prediction the swapper has not planned for yet
        self._wake = threading.Event()
        self.layer_weight = layer_weight
        self.tracker = tracker
        self.interval_s = interval_s
        self.max_swaps = max_swaps_per_interval
        self.hysteresis = hysteresis
        self.decay = decay
        self.errors: list[str] = []

    def __call__(self, layer, normed, logits, token_mask):
        r, out = self._masked_moe(layer, normed, logits, token_mask)
        self.tracker.observe_later(layer.key, normed, r.probs, token_mask)  # ||x|| of Eq. 1: the experts' input
        if self.predictor is not None and not self._predicted_now:
            self._predict(layer.key, normed, r.probs, token_mask)
        return out

    def _predict(self, lk: LayerKey, normed, probs, token_mask) -> None:
        """Add up the encoder pass; at the request's first decoder layer, predict the decoder's experts."""
        if lk.stack == "encoder":
            if lk in self.predictor.inputs:
                value, _ = eq1(self.tracker.norms(lk), np.linalg.norm(normed, axis=-1), probs, token_mask)
                self._request_encoder[lk] = self._request_encoder.get(lk, 0.0) + value
            return
        if not self._request_encoder:
            return
        seen = {k: self._request_encoder.get(k, np.zeros(self.predictor.experts)) for k in self.predictor.inputs}
        self._predicted = self.predictor.predict(seen)
        self._predicted_now = True
        if not self.predict_wait:
            self._burst = True
            self._wake.set()
            return
        # The predicted swaps, here on the token loop, before the decoder's first step. Each is read
        # into a mapping of its own, as the swapper's are: read into malloc memory (on-demand's
        # cheaper fill) ~2.6 experts a request left the heap holding freed ones, and peak RSS went
        # 1.7-2.3% over the budget at 50 and 33% on the embedded model.
        t0 = time.perf_counter()
        read, _ = self._carry_out(self.plan(only=set(self._predicted)))
        with self.counters.lock:
            self.counters.loads += read
            self.counters.stall_s += time.perf_counter() - t0

    def end_request(self) -> None:
        self.tracker.decay(self.decay)
        self._request_encoder, self._predicted_now = {}, False

    def _pinned(self, importance: dict[LayerKey, np.ndarray], counts: dict[LayerKey, int]) -> dict[LayerKey, np.ndarray]:
        """``importance`` with each one-expert layer's substitute ranked first (a copy where changed)."""
        out = dict(importance)
        for lk, e in self.substitutes.items():
            if counts.get(lk) == 1 and lk in out:
                row = np.array(out[lk], dtype=np.float64)
                row[e] = max(float(row.max()), 0.0) * 2.0 + 1.0
                out[lk] = row
        return out

    def warm(self, background: bool = False) -> None:
        self.order = self._pinned(self.order, self.counts)
        super().warm(background)

    def resize(self, counts) -> None:
        # shrink by today's importance, not the start profile (a one-expert layer keeps its substitute)
        self.order = self._pinned(self.tracker.snapshot(), counts)
        super().resize(counts)

    # -- the swapper thread -------------------------------------------------------------------
    def _loop(self) -> None:
        _lower_this_threads_priority()
        while not self._stop.is_set():
            if self._wake.wait(self.interval_s):  # a prediction (or stop): it comes before the first token
                self._wake.clear()
                give_up = time.monotonic() + 1.0  # wait for background reads to open, or a stop
                while not (self._stop.is_set() or self.background_io.wait(0.02)) and time.monotonic() < give_up:
                    pass
            if self._stop.is_set():
                break
            try:
                self.swap_once()
            except Exception as e:  # the swapper must never take the runtime down
                log.exception("swapper failed")
                self.errors.append(repr(e))

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        super().stop()

    def plan(self, only: set[LayerKey] | None = None) -> list[Swap]:
        """The swapper's decision, a pure function of today's importance, residents and counts.

        The swapper thread and the trace replay (replay.py) both call this, so a replay
        simulates the runtime's own decisions. ``only``: every swap these layers need now
        (a decoder prediction's, made on the token loop); the rest wait for the swapper.
        """
        with self._resize_lock:
            counts = dict(self.counts)
            importance = self.tracker.snapshot()
            importance.update({lk: row.copy() for lk, row in self._predicted.items() if lk in importance})
            importance = self._pinned(importance, counts)
            for key in self.residents.unavailable:  # never plan to admit what cannot be read
                importance[key.layer_key][key.expert] = -1.0
            if only is None:
                burst, self._burst = self._burst, False  # a new prediction: every swap it needs, now
            swaps = plan_swaps(self.residents.residents(), importance, counts, self.hysteresis,
                               None if only is not None or burst else self.max_swaps, self.layer_weight)
        return swaps if only is None else [s for s in swaps if s.layer in only]

    def apply(self, s: Swap, expert: LoadedExpert | None) -> bool:
        """Carry out one planned swap with ``expert`` (already read; None for a pure eviction)."""
        evict = ExpertKey(s.layer.stack, s.layer.layer, s.evict) if s.evict is not None else None
        if expert is None:
            if evict is not None and self.residents.drop(evict):
                with self.counters.lock:
                    self.counters.evictions += 1
            return False
        with self._resize_lock:
            # The budget may have shrunk while we read; only then is the admit dropped.
            if evict is None and len(self.residents.layer(s.layer)) >= self.counts[s.layer]:
                return False
            self.residents.replace(expert, evict)
        with self.counters.lock:
            self.counters.swaps += 1
            self.counters.evictions += evict is not None
        return True

    def begin(self, s: Swap) -> Swap | None:
        """The part of a planned swap that comes before its read; returns what is left to
        ``apply`` once the expert is read, or None when nothing is to be read.

        A replacement evicts first: under masked routing a missing expert only sends its
        tokens to the next-best resident for the length of one read, so the budget needs no
        room for an expert in flight, and the policy holds as many experts as ``prune``. A
        layer's last resident is never evicted that way (its tokens would have nowhere to go).
        """
        if s.admit is None:
            self.apply(s, None)
            return None
        if self.residents.is_unavailable(ExpertKey(s.layer.stack, s.layer.layer, s.admit)):
            return None
        if s.evict is None:
            return s
        if len(self.residents.layer(s.layer)) < 2:
            return None
        self.apply(Swap(s.layer, None, s.evict), None)
        return Swap(s.layer, s.admit, None)

    def swap_once(self) -> int:
        """Plan against the current importance and carry out up to ``max_swaps`` admissions."""
        if not self.background_io.is_set():
            return 0
        return self._carry_out(self.plan())[1]

    def _carry_out(self, swaps: list[Swap]) -> tuple[int, int]:
        """Begin, read and apply ``swaps`` on this thread, until a stop; returns (experts read, admitted)."""
        read = done = 0
        for s in swaps:
            if self._stop.is_set():
                break
            s = self.begin(s)
            if s is None:
                continue
            expert = self._read_off_loop(ExpertKey(s.layer.stack, s.layer.layer, s.admit))  # outside every lock
            if expert is None:
                continue
            read += 1
            done += self.apply(s, expert)
        return read, done


def make_tracker(cfg, norms: dict[LayerKey, np.ndarray], profile) -> ImportanceTracker:
    """swapmoe's and the ladder's online importance: the calibrated profile as a prior worth
    ``cfg.prior_documents`` documents that never decays, or (None) as a seed that decays."""
    tracker = ImportanceTracker(norms)
    if getattr(cfg, "prior_documents", None) is None:
        tracker.seed(profile)
    else:
        tracker.set_prior(profile, cfg.prior_documents)
    return tracker


def make_policy(cfg, residents: ResidentSet, store: ExpertStore, kernel: KernelFn, capacity: int,
                counts: dict[LayerKey, int], norms: dict[LayerKey, np.ndarray], profile,
                ladder: dict | None = None) -> Policy:
    """The policy ``cfg.policy`` (a RuntimeConfig) over ``residents``; the runtime and the trace
    replay (replay.py) both build theirs here. ``ladder``: what only the runtime has for the
    ladder policy (its rungs, the rung runners, the byte capacity of its copies)."""
    args = (residents, store, kernel, capacity, counts)
    if cfg.policy == "full":
        return FullPolicy(*args, norms)
    if cfg.policy == "prune":
        return PrunePolicy(*args, norms, renormalize=cfg.renormalize)
    if cfg.policy == "on-demand":
        return OnDemandPolicy(*args, dict(profile.importance))
    common = dict(tracker=make_tracker(cfg, norms, profile), interval_s=cfg.swap_interval_s,
                  hysteresis=cfg.hysteresis, decay=cfg.decay, layer_weight=cfg.layer_weights(list(norms)))
    if cfg.policy == "ladder":
        if ladder is None:
            raise ValueError("the ladder policy needs the artifact's rungs and their runners (Runtime builds them)")
        from swapmoe_edge.residency.ladder_policy import LadderPolicy  # it builds on this module

        return LadderPolicy(residents, store, kernel, capacity, dict(profile.importance), **common, **ladder,
                            max_moves=cfg.max_swaps_per_interval, wait=cfg.ladder_wait,
                            loss=profile.loss if cfg.ladder_loss_split else None)
    mode = cfg.predict_decoder
    if mode == "auto":
        mode = "wait" if getattr(store, "largest_expert", 0) <= PREDICT_WAIT_MAX_EXPERT_BYTES else "off"
    return SwapMoEPolicy(*args, dict(profile.importance), renormalize=cfg.renormalize, **common,
                         max_swaps_per_interval=cfg.max_swaps_per_interval,
                         substitutes=dict(getattr(profile, "substitute", {}) or {}),
                         predictor=getattr(profile, "predictor", None) if mode != "off" else None,
                         predict_wait=mode == "wait")


def _lower_this_threads_priority(nice: int = 10) -> None:
    """Let the token loop preempt the swapper: on Linux a thread has its own nice value.

    Reading and hashing a switch-base expert takes ~20 ms of CPU; on a device whose cores
    are all busy with the token loop, that time otherwise comes out of decoding.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass
