"""The residency engine: one for every policy.

A policy (policies/) says what a token whose expert is not resident gets, and which experts
to hold (its limits under a budget, its start set, its swaps, its shrink order). The engine
carries that out over the resident set (resident.py) and the expert store, and owns
everything a policy would otherwise repeat: the start fill (now, or on a filler thread), the
swapper thread, evict-before-read, read-or-mark-unavailable, live resize, the counters, the
request boundary, and masked routing over a consistent snapshot of each layer.

The runtime's API (load.py, fit.py, facade.py):

    engine = make_policy(config, residents, store, kernel, tokens_per_expert, norms, profile,
                         expert_cost=..., budget=..., baseline=..., rungs=..., runners=..., family=...)
    engine.warm(background=False); engine.start()    # the start set; the swapper, if it swaps
    out = engine(layer, normed, logits, token_mask)   # SplitModel's moe callback
    engine.background_io.clear() ... .set()           # no background reads during a prefill
    engine.begin_request()                            # before each request (deterministic: waits for the boundary)
    engine.end_request()                              # after each request (importance decays)
    engine.resize(budget)                             # the monitor's live budget, any policy
    engine.counters.snapshot(); engine.exact; engine.wait_filled(t); engine.stop()

Tools: ``expert`` and ``masked_over`` (a measurement's own routing), ``hold`` and ``hold_best``
(residents set by hand, swapper stopped), and the swapper's steps one at a time on a simulated
clock (``plan``, ``begin``, ``finish``, ``take_wake``: replay.py).

Threads: the token loop calls the engine; the swapper and filler threads read experts and
publish them (mover.py: how a move is carried out); the budget monitor calls ``resize``. Every
publish and eviction that must see the limits unchanged runs under ``lock``; reads run outside
it, so the token loop never waits for the swapper's I/O.

Deterministic (``RuntimeConfig.deterministic``): swaps happen in one round at each request
boundary, never while a request runs, so a request's residents depend only on the requests
before it, not on when the swapper's reads land. ``end_request`` plans the round (no I/O) and,
when it has moves, hands it to the swapper thread (evict, read, publish: the budget holds no
expert in flight) and returns at once; ``begin_request`` waits for it, and for a background
start fill. Only the budget monitor still changes residents mid-request: a shrink is honoured
at once (memory safety first), and from then on the engine reports itself not deterministic
(``nondeterminism``); growth waits for a boundary.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from swapmoe_edge.artifact.manifest import LayerEntry
from swapmoe_edge.artifact.store import LoadedExpert
from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.model.families import DEFAULT, get_family
from swapmoe_edge.model.moe import Routing, dispatch
from swapmoe_edge.model.rungs import Rung
from swapmoe_edge.residency.importance import ImportanceTracker
from swapmoe_edge.residency.limits import ExpertUnavailableError, Limits
from swapmoe_edge.residency.mover import Mover
from swapmoe_edge.residency.planner import expert_capacity, top_experts
from swapmoe_edge.residency.resident import LayerView, ResidentSet
from swapmoe_edge.residency.steps import Round
from swapmoe_edge.system import memory

log = logging.getLogger(__name__)
DEFAULT_FAMILY = get_family(DEFAULT)  # Switch: top-1 with capacity
KernelFn = Callable[[LoadedExpert, np.ndarray], np.ndarray]  # (expert, x [N, D]) -> y [N, D]


class Engine(Mover):
    """Runs ``policy`` over ``residents``: see the module docstring. ``ladders``: each layer's rungs
    (one rung, the artifact's experts, for a whole-expert policy) with their resident costs;
    ``budget`` and ``baseline``: the whole-process budget and what is not experts (bytes), or an
    expert capacity and 0; ``runners``: rung name -> RungRunner, for low-bit copies; ``tracker``:
    online importance, for a policy that keeps it; ``family``: the model family (families.Family),
    whose ``route`` and ``top_k`` route every token (Switch's top-1 when none is given)."""

    def __init__(self, policy, residents: ResidentSet, store, kernel: KernelFn, tokens_per_expert: int,
                 ladders: Mapping[LayerKey, Sequence[Rung]], budget: int, baseline: int = 0,
                 runners: Mapping[str, object] | None = None, tracker: ImportanceTracker | None = None,
                 family=None):
        super().__init__(policy, residents, store, ladders, runners)
        self.family = family or DEFAULT_FAMILY
        self.top_k = self.family.top_k  # experts per token: a routing's trailing k axis when > 1
        self.absent = getattr(policy.config, "absent", "substitute")  # what a top-k choice not resident gets
        self.kernel = kernel
        self.tokens_per_expert = tokens_per_expert  # the model's expert capacity: tokens per expert and row
        self.baseline = int(baseline)
        self.tracker = tracker  # online importance (Eq. 1)
        self.errors: list[str] = []  # what the swapper caught (it never takes the runtime down)
        self.limits = self._limits(budget, strict=True)
        self.filled = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._filler: threading.Thread | None = None
        # Request boundaries (deterministic): a round is due; the last one is done.
        self.deterministic = resolve_deterministic(policy.config, type(policy))
        self._boundary = threading.Event()
        self._settled = threading.Event()
        self._settled.set()
        self._refill_due = False  # deterministic: growth after a budget move waits for the boundary
        self._due: list[tuple[Round, str]] = []  # deterministic: the rounds planned at the last boundary
        self._tainted: list[str] = []  # what made later outputs depend on timing (see nondeterminism)

    # -- the token loop -------------------------------------------------------------------------
    def __call__(self, layer: LayerEntry, normed: np.ndarray, logits: np.ndarray, token_mask) -> np.ndarray:
        """One sparse layer (SplitModel's ``moe``): normed [B, T, D], logits [B, T, E] -> [B, T, D]."""
        return self.policy.route(self, layer, normed, logits, token_mask)

    def masked(self, layer: LayerEntry, normed: np.ndarray, logits: np.ndarray, token_mask) -> tuple[Routing, np.ndarray]:
        """Route over the layer's residents (a token whose choice is not resident goes to the best
        one that is) and run them; counts the routing and feeds the importance tracker."""
        view = self.residents.view(layer.key)  # one consistent snapshot for this layer
        if not view.allowed.any():
            raise ExpertUnavailableError(f"{layer.key}: no expert is resident or readable; cannot route.")
        r, out = self._moe(normed, logits, view.allowed, view.experts.__getitem__)
        self.count(r, view, token_mask)
        if self.tracker is not None:
            self.tracker.observe_later(layer.key, normed, r.probs, token_mask)  # ||x|| of Eq. 1: the experts' input
        return r, out

    def masked_over(self, layer: LayerEntry, normed: np.ndarray, logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """The layer's output with only ``allowed`` ([E] bool) experts to route to, each run as
        ``expert`` gives it; uncounted. For measurements (substitution.py)."""
        return self._moe(normed, logits, allowed, lambda e: self.expert(layer, e))[1]

    def route(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> Routing:
        """The family's routing of ``logits`` over ``allowed`` experts (None: all), as the policy
        sets it (renormalised gates; what an absent top-k choice gets)."""
        if self.absent == "substitute":  # the family's route as the contract has it
            return self.family.route(logits, self.tokens_per_expert, allowed, self.policy.renormalize)
        return self.family.route(logits, self.tokens_per_expert, allowed, self.policy.renormalize, absent=self.absent)

    def _moe(self, normed, logits, allowed, expert_of) -> tuple[Routing, np.ndarray]:
        r = self.route(logits, allowed)
        return r, dispatch(r, normed, lambda e, x: self.kernel(expert_of(e), x))

    def count(self, r: Routing, view: LayerView, token_mask) -> np.ndarray:
        """Add one layer call's routing to the counters (``view``: the residents it ran on); returns
        the first choices it counted (padding excluded). A top-k routing counts each of a token's k
        choices: first-choice residency is the share of the k first choices resident."""
        first = r.first_choice.ravel() if token_mask is None else r.first_choice[token_mask]
        rerouted = r.first_choice.size - int(np.count_nonzero(view.allowed[r.first_choice]))
        hits = int(np.count_nonzero(view.allowed[first]))
        missing = int(view.unavailable[first].sum()) if view.unavailable is not None else 0
        low = 0
        if view.low is not None:
            ran = view.low[r.choice] & r.keep
            if token_mask is not None:
                mask = np.asarray(token_mask, bool)
                ran = ran & (mask if ran.ndim == mask.ndim else mask[..., None])
            low = int(np.count_nonzero(ran))
        with self.counters.lock:
            c = self.counters
            c.routed += int(first.size)
            c.first_choice_resident += hits
            c.unavailable_hits += missing
            c.rerouted += rerouted
            c.lowbit_tokens += low
        return first

    def expert(self, layer: LayerEntry, e: int) -> LoadedExpert:
        """Expert ``e`` of ``layer`` to run now: the resident copy, or what the policy does on a miss
        (an exact policy reads it). For tools that route on their own (substitution.py)."""
        return self.policy.expert(self, layer, e)

    # -- lifecycle ----------------------------------------------------------------------------------
    def warm(self, background: bool = False) -> None:
        """Load the policy's start set: all of it now, or (``background``) each layer's first
        expert now and the rest on a filler thread at flash speed, so that a device serves its
        first request once the dense part and one expert per layer are in. A policy whose routing
        must not change while it fills (``full``) loads everything now."""
        rnd = self.policy.start(self)
        now, rest, seen = [], [], set()
        for m in rnd.moves:
            first = m.key.layer_key not in seen
            seen.add(m.key.layer_key)
            (now if first or not (background and self.policy.fills_in_background) else rest).append(m)
        self.carry_out(Round(now, rnd.room), "now")
        if self.policy.trim_every:
            memory.trim()
        if not rest:
            self.filled.set()
            return
        self._filler = threading.Thread(target=self._fill, args=(Round(rest, rnd.room),), name="swapmoe-filler",
                                        daemon=True)
        self._filler.start()

    def _fill(self, rnd: Round) -> None:
        _lower_this_threads_priority()
        try:
            self.carry_out(rnd, "fill")
        except Exception as e:  # a failed fill must not take the runtime down either
            log.exception("filler failed")
            self.errors.append(repr(e))
        if not self._stop.is_set():
            self.filled.set()

    def wait_filled(self, timeout: float | None = None) -> bool:
        """Block until the start set is in (True), or ``timeout`` passes."""
        return self.filled.wait(timeout)

    def start(self) -> None:
        """Start the swapper thread, for a policy that swaps."""
        if self.policy.swaps and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=f"swapmoe-{self.name}", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the swapper thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop the filler and the swapper (a read in flight finishes first)."""
        self._stop.set()
        self._wake.set()
        self._boundary.set()
        for t in (self._filler, self._thread):
            if t is not None:
                t.join(timeout=10)
        self._thread = None

    def wake(self) -> None:
        """Have the swapper plan now instead of at its next interval (a new decoder prediction)."""
        self._wake.set()

    def take_wake(self) -> bool:
        """Whether ``wake`` was called since the last look (and clear it): a replay's swapper clock."""
        woken = self._wake.is_set()
        self._wake.clear()
        return woken

    def _loop(self) -> None:
        if self.deterministic:  # it runs only while no request does, and a request may be waiting for it
            return self._boundary_loop()
        _lower_this_threads_priority()
        while not self._stop.is_set():
            if self._wake.wait(self.policy.interval_s):  # a prediction (or a stop): it comes before the first token
                self._wake.clear()
                give_up = time.monotonic() + 1.0  # wait for background reads to open, or a stop
                while not (self._stop.is_set() or self.background_io.wait(0.02)) and time.monotonic() < give_up:
                    pass
            if self._stop.is_set():
                break
            if not self.filled.is_set():
                continue  # the start fill runs on its own thread; plans wait for it
            try:
                self.swap_once()
            except Exception as e:  # the swapper must never take the runtime down
                log.exception("swapper failed")
                self.errors.append(repr(e))

    def plan(self) -> Round:
        """The swapper's next round, from the policy: a pure function of importance, residents and limits."""
        return self.policy.moves(self)

    def swap_once(self) -> int:
        """One round of the swapper, on this thread; returns the experts published."""
        if not self.background_io.is_set():
            return 0
        return self.carry_out(self.plan(), "swap")[1]

    def end_request(self) -> None:
        """A request ended: online importance decays (an exponential moving average over requests);
        deterministic, the boundary's round starts (on the swapper thread; the next
        ``begin_request`` waits for it)."""
        if self.tracker is not None:
            self.tracker.decay(self.policy.decay)
        self.policy.end_request(self)
        if not self.deterministic or self._stop.is_set():  # stopped (hindsight): residents move only by hand
            return
        rounds = self._boundary_rounds()  # planned here (no I/O), so a boundary with nothing to read costs no wait
        if rounds and self.running:
            self._due = rounds
            self._settled.clear()
            self._boundary.set()
        elif rounds:  # a policy without a swapper (prune, taking back its room after a budget move)
            self._carry_out_all(rounds)

    def begin_request(self) -> float:
        """A request is about to run: deterministic, wait until the start set is in and the last
        boundary's round is done; returns the seconds waited. Otherwise returns at once (and
        notes a request that starts while a background start fill still runs)."""
        if not self.deterministic:
            if not self.filled.is_set() and not self._stop.is_set():
                self._taint("a request ran while the background start fill was reading experts")
            return 0.0
        t0 = time.perf_counter()
        while not (self.filled.wait(0.05) and self._settled.wait(0.05)) and not self._stop.is_set():
            pass
        return time.perf_counter() - t0

    def settle(self, timeout: float | None = None) -> bool:
        """Block until the last boundary's round is done (True), or ``timeout`` passes."""
        return self._settled.wait(timeout)

    def _boundary_loop(self) -> None:
        """The deterministic swapper: carries out what ``end_request`` planned, and nothing in between."""
        while not self._stop.is_set():
            if not self._boundary.wait(0.5):
                continue
            self._boundary.clear()
            rounds, self._due = self._due, []
            try:
                self._carry_out_all(rounds)
            except Exception as e:  # the swapper must never take the runtime down
                log.exception("swapper failed")
                self.errors.append(repr(e))
            finally:
                self._settled.set()
        self._settled.set()

    def _boundary_rounds(self) -> list[tuple[Round, str]]:
        """What waits for a request boundary, with how to carry each out: room taken back after a
        budget move (prune), then the policy's round; only rounds with something to do."""
        rounds = []
        if self._refill_due:
            self._refill_due = False
            refill = self.policy.refill(self)
            if refill is not None and refill.moves:
                rounds.append((refill, "now"))
        if self.policy.swaps and self.filled.is_set():
            rnd = self.plan()
            if rnd.moves:
                rounds.append((rnd, "swap"))
        return rounds

    def _carry_out_all(self, rounds: list[tuple[Round, str]]) -> None:
        for rnd, how in rounds:
            if self._stop.is_set():
                break
            self.carry_out(rnd, how)

    @property
    def nondeterminism(self) -> list[str]:
        """Why the same inputs need not give this runtime's outputs again (empty: they do, under any
        load): swaps at times the load decides, or an earlier event that timing decided."""
        why = [] if self.deterministic or not self.policy.swaps else \
            ["swaps land at token steps that depend on the load (deterministic is off)"]
        return why + self._tainted

    def _taint(self, why: str) -> None:
        if why not in self._tainted:
            self._tainted.append(why)

    # -- budget ---------------------------------------------------------------------------------------
    def _limits(self, budget: int, strict: bool) -> Limits:
        lowest = {lk: ladder[0].cost for lk, ladder in self.ladders.items()}
        capacity = expert_capacity(int(budget), self.baseline, lowest, strict, next(iter(self.ladders.values()))[0].name)
        return self.policy.limits(self, capacity, strict)

    def resize(self, budget: int) -> None:
        """The live budget (bytes; whole process, or experts when the baseline is 0) moved: new
        limits; what no longer fits goes at once, least valuable first (never a layer's last
        expert); growth is the policy's (prune at once, the swapper later, on-demand on a miss)."""
        with self.lock:
            limits = self._limits(budget, strict=False)
            if limits != self.limits:
                self._taint("memory pressure moved the budget's limits while serving")
            self.limits = limits
            if any(self._over(lk) for lk in self.residents.layers):
                for key in self.policy.victims(self):
                    if self._over(key.layer_key):
                        self.evict(key, keep_last=True)
        if self.deterministic:
            self._refill_due = True  # growth waits for the next request boundary
            return
        refill = self.policy.refill(self)
        if refill is not None:
            self.carry_out(refill, "now")

    def hold(self, lk: LayerKey, experts) -> int:
        """Make ``experts`` exactly the residents of layer ``lk``, reading what is missing on the
        calling thread; returns how many were read. For bounds and tests (hindsight.py) with the
        swapper stopped: nothing here waits for it."""
        want = {int(e) for e in experts}
        limit = self.limits.counts[lk] if self.limits.counts is not None else self.residents.num_experts
        if not 0 < len(want) <= limit:
            raise ValueError(f"{lk}: {len(want)} experts to hold, the layer's budget is {limit}")
        with self.lock:
            for e in set(self.residents.layer(lk)) - want:
                self.residents.drop(ExpertKey(lk.stack, lk.layer, e))
        read = 0
        for e in sorted(want - set(self.residents.layer(lk))):
            expert = self.read(ExpertKey(lk.stack, lk.layer, e), strict=True)
            if expert is not None:
                self.residents.put(expert)
                read += 1
        return read

    def hold_best(self, importance: Mapping[LayerKey, np.ndarray]) -> int:
        """Each layer holds the experts the policy ranks first by ``importance`` (as many as its
        count); returns how many were read."""
        counts = self.limits.counts or {lk: len(self.residents.layer(lk)) for lk in self.residents.layers}
        ranked = self.policy.rank(self, dict(importance))
        return sum(self.hold(lk, top_experts(ranked[lk], n)) for lk, n in counts.items())


def resolve_deterministic(config, policy_cls) -> bool:
    """Whether a runtime of ``config`` (a RuntimeConfig) swaps only at request boundaries: what
    ``config.deterministic`` says, or where it is None, the policy's default, which two settings
    that ask for the timed swapper turn off: a background cold start (serve while the start set
    is still being read) and ``predict_decoder="background"`` (swap in a request's predicted
    experts while it decodes; at a boundary they would serve the next request instead)."""
    asked = getattr(config, "deterministic", None)
    if asked is not None:
        return bool(asked)
    timed = getattr(config, "cold_start", "blocking") == "background" or \
        getattr(config, "predict_decoder", "auto") == "background"
    return bool(policy_cls.deterministic_default) and not timed


def _lower_this_threads_priority(nice: int = 10) -> None:
    """Let the token loop preempt background reads: on Linux a thread has its own nice value.

    Reading and hashing a switch-base expert takes ~20 ms of CPU; on a device whose cores
    are all busy with the token loop, that time otherwise comes out of decoding.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass
