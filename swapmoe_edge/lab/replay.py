"""Replay a routing trace (trace.py) under residency policies, fast and without the model.

The replay runs the runtime's own residency engine and policies (residency/policies, built by
``make_policy`` with the runtime's config and the trace's expert sizes), fed the trace's router
outputs; only the clock is simulated. Two semantics, as in the runtime:

- **exact** (the output is full's): a token whose expert is not resident waits while it is
  read. ``on-demand`` is the runtime's, as ``ReplayConfig.runtime`` configures it (its default
  evicts the layer's least chosen expert so far); ``lru`` is it with
  ``on_demand_evict="recency"``; ``lfu`` evicts
  the least-used expert instead (the rule ``on-demand`` has by default, kept here by the replay),
  and ``belady`` the one needed furthest in the future (offline, the optimum: no
  demand-loading policy with the same per-layer slots reads fewer experts). Both keep
  on-demand's slots and start set.
- **masked** (lossy): a token whose expert is not resident goes to the best resident one.
  ``prune`` and ``static`` (swapmoe's start set: the profile's most important experts, or its
  measured substitute in a layer that holds one) never change; ``swapmoe`` is the runtime's
  policy with its swapper's rounds on the simulated clock (with a decoder predictor in the
  profile, a request's first decoder event wakes it at once, as in the runtime). ``hindsight``
  keeps swapmoe's per-layer counts but the experts the trace's tokens chose most (what a
  perfect profile of this very stream would give). ``best-fixed`` is the offline optimum of
  fixed sets: the experts that the trace's tokens chose most, with the per-layer split that
  holds the most tokens in the same bytes; no fixed set (``prune``, ``static``) can beat it. A
  policy that swaps *can*, when the workload moves: that is what adaptation is for.

Clock: an encoder pass takes ``encoder_ms``, each decoder step ``token_ms`` (by default the
timings measured while recording), spread evenly over the sparse layers of the stack. The
swapper wakes every ``swap_interval_s`` (RuntimeConfig) and plans; each expert it admits
becomes resident ``expert_bytes / flash`` seconds later, and it plans again no sooner. A
deterministic runtime (RuntimeConfig.deterministic; swapmoe's default) swaps only between
requests: its round is read before the next request starts, which waits for it (not stall).
An exact policy's miss stalls the clock by the same read time, and so do the swaps swapmoe
makes on the token loop for a decoder prediction (``predict_decoder`` wait).

What a replay does not model: a lossy policy changes the hidden states and therefore the
later routing; the trace holds full's routing throughout.
Hit rates count tokens whose unmasked first choice was resident when their layer ran; for a
top-k model (the trace's ``top_k``), each of a token's k first choices counts, as the runtime's
first-choice residency does, and the engine routes with the model's own top-k router.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from swapmoe_edge.artifact.store import LoadedExpert
from swapmoe_edge.core.errors import InputError
from swapmoe_edge.core.keys import ExpertKey, LayerKey, parse_layer_name
from swapmoe_edge.lab.trace import Trace
from swapmoe_edge.residency.engine import Engine
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.residency.planner import expert_capacity, top_experts
from swapmoe_edge.residency.policies import make_policy
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.system.budget import parse_budget

EXACT = ("on-demand", "lru", "lfu", "belady")
MASKED = ("prune", "static", "swapmoe", "hindsight", "best-fixed")
POLICIES = EXACT + MASKED
BOUNDS = {"belady": "exact", "best-fixed": "masked, fixed sets"}


@dataclass(frozen=True)
class ReplayConfig:
    budget: str = "50%"  # share of the expert bytes (as the runtime's "50%"), or bytes of experts
    flash_mbps: float = 250.0  # read speed of the experts' storage (eMMC ~250, NVMe ~2000)
    token_ms: float | None = None  # decoder step time; None: the trace's
    encoder_ms: float | None = None  # encoder pass time; None: the trace's time to first token
    expert_bytes: int | None = None  # price every expert at this size (e.g. switch-base-64's); None: the trace's
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(policy="swapmoe", budget="100%"))


@dataclass
class ReplayResult:
    policy: str
    semantics: str
    counts: dict[str, int]
    tokens: int = 0
    hits: int = 0
    enc_tokens: int = 0
    enc_hits: int = 0
    dec_tokens: int = 0
    dec_hits: int = 0
    loads: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    swaps: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.tokens if self.tokens else 1.0

    def to_json(self) -> dict[str, Any]:
        rate = lambda h, n: h / n if n else 1.0  # noqa: E731
        return {"policy": self.policy, "semantics": self.semantics, "counts": self.counts,
                "resident_experts": sum(self.counts.values()), "tokens": self.tokens,
                "hit_rate": self.hit_rate, "encoder_hit_rate": rate(self.enc_hits, self.enc_tokens),
                "decoder_hit_rate": rate(self.dec_hits, self.dec_tokens), "loads": self.loads,
                "bytes_read": self.bytes_read, "stall_s": self.stall_s, "swaps": self.swaps}


class _Replay:
    """What every policy's replay shares: the trace, layer keys, costs, counts and the clock."""

    def __init__(self, trace: Trace, cfg: ReplayConfig, profile: Profile | None):
        self.t, self.cfg = trace, cfg
        self.keys = [parse_layer_name(n) for n in trace.layer_names]
        self.E = trace.num_experts
        self.norms = {lk: trace.norms[i].astype(np.float64) for i, lk in enumerate(self.keys)}
        self.profile = profile or trace.profile() or Profile.from_norms(self.norms)
        self.profile.check_layers({lk: self.E for lk in self.keys}, where="the replay's profile")
        size = cfg.expert_bytes
        self.cost = {lk: int(size if size else trace.expert_bytes[i]) for i, lk in enumerate(self.keys)}
        self.read_s = {lk: c / (cfg.flash_mbps * 1e6) for lk, c in self.cost.items()}
        self.token_s = (cfg.token_ms if cfg.token_ms is not None else trace.meta.get("token_ms", 2.0)) / 1e3
        self.encoder_s = (cfg.encoder_ms if cfg.encoder_ms is not None else trace.meta.get("ttft_ms", 10.0)) / 1e3
        n_enc = sum(lk.stack == "encoder" for lk in self.keys) or 1
        n_dec = sum(lk.stack == "decoder" for lk in self.keys) or 1
        self.event_s = {lk: (self.encoder_s / n_enc if lk.stack == "encoder" else self.token_s / n_dec) for lk in self.keys}
        self.first = trace.choices()  # [N, k]: each token's k first choices
        self.family = trace.family()

    def budget(self) -> int:
        """The expert bytes the runtime would hold (its budget with the baseline left out), never
        below one expert per layer."""
        cap = parse_budget(self.cfg.budget).process_cap(0, sum(self.cost.values()) * self.E)
        if cap is None:
            raise InputError("a replay needs a budget as a share of the experts (50%) or bytes of experts (4GiB), not auto")
        return expert_capacity(cap, 0, self.cost)

    def engine(self, policy: str, **runtime) -> tuple[Engine, "_NullStore"]:
        """The runtime's engine for ``policy`` (its config, ``runtime``'s fields changed, and the
        trace's expert sizes), its start set resident."""
        store = _NullStore(self.cost)
        eng = make_policy(replace(self.cfg.runtime, policy=policy, **runtime), ResidentSet(self.keys, self.E), store,
                          _no_kernel, 1 << 30, self.norms, self.profile, expert_cost=self.cost, budget=self.budget(),
                          family=self.family)
        eng.warm()
        return eng, store

    def result(self, policy: str, semantics: str, counts) -> ReplayResult:
        return ReplayResult(policy, semantics, {lk.name: int(n) for lk, n in counts.items()})

    def tally(self, res: ReplayResult, lk: LayerKey, n: int, hits: int) -> None:
        res.tokens += n
        res.hits += hits
        if lk.stack == "encoder":
            res.enc_tokens += n
            res.enc_hits += hits
        else:
            res.dec_tokens += n
            res.dec_hits += hits


# -- masked policies -----------------------------------------------------------------------------


def _fixed(r: _Replay, name: str, sets: dict[LayerKey, frozenset[int]], counts) -> ReplayResult:
    res = r.result(name, "masked", counts)
    for _, li, _, sl in r.t.events():
        lk = r.keys[li]
        first = r.first[sl]
        r.tally(res, lk, first.size, int(np.isin(first, list(sets[lk])).sum()))
    return res


def best_fixed_sets(r: _Replay, capacity: int) -> tuple[dict[LayerKey, frozenset[int]], dict[LayerKey, int]]:
    """The fixed sets holding the most first choices within ``capacity`` bytes (at least one per layer).

    Per layer, the best k experts are the k most chosen (sorted counts: a concave gain), so a
    greedy split by tokens gained per byte is optimal when every expert costs the same; the
    replay refuses unequal sizes rather than report a bound that might not be one.
    """
    if len(set(r.cost.values())) != 1:
        raise InputError("the best-fixed bound needs every expert to cost the same; price them with expert_bytes")
    chosen = _chosen(r)
    ranked = {lk: np.sort(c)[::-1] for lk, c in chosen.items()}
    slots = capacity // next(iter(r.cost.values()))
    counts = {lk: 1 for lk in r.keys}
    gains = [(-int(ranked[lk][1]) if r.E > 1 else 0, pos, lk) for pos, lk in enumerate(r.keys)]
    heapq.heapify(gains)
    for _ in range(max(0, slots - len(r.keys))):
        if not gains:
            break
        _, pos, lk = heapq.heappop(gains)
        counts[lk] += 1
        if counts[lk] < r.E:
            heapq.heappush(gains, (-int(ranked[lk][counts[lk]]), pos, lk))
    sets = {lk: frozenset(top_experts(chosen[lk].astype(np.float64), counts[lk])) for lk in r.keys}
    return sets, counts


def _chosen(r: _Replay) -> dict[LayerKey, np.ndarray]:
    """Per layer [E]: how many of the trace's tokens chose each expert first (top-k: among their k)."""
    chosen = {lk: np.zeros(r.E, np.int64) for lk in r.keys}
    for _, li, _, sl in r.t.events():
        chosen[r.keys[li]] += np.bincount(r.first[sl].ravel(), minlength=r.E)
    return chosen


def _no_kernel(expert: LoadedExpert, x: np.ndarray) -> np.ndarray:
    return np.zeros_like(x)


class _NullStore:
    """Expert reads that cost nothing here: the replay's clock prices them instead."""

    def __init__(self, cost: dict[LayerKey, int]):
        self.cost = cost
        self.largest_expert = max(cost.values(), default=0)
        self.on_loop: list[LayerKey] = []  # the layers of the reads since the replay last cleared it

    def read(self, key: ExpertKey, own_mapping: bool = True) -> LoadedExpert:
        self.on_loop.append(key.layer_key)
        return LoadedExpert(key, {}, self.cost[key.layer_key])


def _run(r: _Replay, name: str, semantics: str, policy: str, **runtime) -> ReplayResult:
    """The engine of ``policy`` (``runtime``: config fields) fed the trace's router outputs, event
    by event; a policy that swaps has its swapper's rounds run on the simulated clock."""
    eng, store = r.engine(policy, **runtime)
    res = r.result(name, semantics, eng.limits.counts)
    layers = {lk: SimpleNamespace(key=lk, experts=[ExpertKey(lk.stack, lk.layer, e) for e in range(r.E)])
              for lk in r.keys}
    interval = eng.policy.interval_s
    now, wake = 0.0, interval
    pending: list[tuple[float, int, Any]] = []  # (ready time, seq, move) reads in flight
    seq = 0
    last_request = 0
    for req, li, _, sl in r.t.events():
        lk = r.keys[li]
        if req != last_request:
            store.on_loop.clear()
            swaps = eng.counters.swaps
            eng.end_request()  # deterministic (no swapper thread here): the boundary's round, read now
            res.swaps += eng.counters.swaps - swaps
            for read_lk in store.on_loop:  # the next request waits for them
                res.loads += 1
                res.bytes_read += r.cost[read_lk]
                now += r.read_s[read_lk]
            last_request = req
        while pending and pending[0][0] <= now:  # reads that finished: publish them
            _, _, m = heapq.heappop(pending)
            res.swaps += eng.finish(m, store.read(m.key))
        if eng.policy.swaps and not eng.deterministic and wake <= now and not pending:
            ready = now
            rnd = eng.plan()
            for m in rnd.moves:
                m = eng.begin(m, rnd.room)
                if m is None:
                    continue
                ready += r.read_s[m.key.layer_key]
                res.loads += 1
                res.bytes_read += r.cost[m.key.layer_key]
                heapq.heappush(pending, (ready, seq, m))
                seq += 1
            wake = max(now + interval, ready)
        probs = r.t.probs[sl].astype(np.float32)  # n E
        x = r.t.x_norm[sl].astype(np.float32)  # n
        before, routed = eng.counters.first_choice_resident, eng.counters.routed
        store.on_loop.clear()  # what the call below reads, it reads on the token loop
        eng(layers[lk], x[None, :, None], np.log(np.maximum(probs, 1e-12))[None], None)
        r.tally(res, lk, eng.counters.routed - routed, eng.counters.first_choice_resident - before)  # k a token
        if eng.take_wake():  # a decoder prediction wakes the swapper at once, as in the runtime
            wake = now
        for read_lk in store.on_loop:  # misses, and a decoder prediction's swaps, read on the token loop: stall
            res.loads += 1
            res.bytes_read += r.cost[read_lk]
            res.stall_s += r.read_s[read_lk]
            now += r.read_s[read_lk]
        now += r.event_s[lk]
    return res


# -- offline bounds of exact policies ------------------------------------------------------------------


def _accesses(r: _Replay) -> dict[LayerKey, list[list[tuple[int, int]]]]:
    """Per layer and event: (expert, tokens) in the order an exact policy reads them (np.unique)."""
    out: dict[LayerKey, list[list[tuple[int, int]]]] = {lk: [] for lk in r.keys}
    for _, li, _, sl in r.t.events():
        experts, n = np.unique(r.first[sl].ravel(), return_counts=True)
        out[r.keys[li]].append(list(zip(experts.tolist(), n.tolist())))
    return out


def _evicting(r: _Replay, name: str) -> ReplayResult:
    """``lfu`` or ``belady``: on-demand's slots and start set, another choice of whom to evict.
    A token hits when its expert was resident as its layer began (as the runtime counts)."""
    eng, _ = r.engine("on-demand")
    counts = eng.limits.counts
    res = r.result(name, "exact", counts)
    for lk, events in _accesses(r).items():
        seq = [a for ev in events for a in ev]
        cache: OrderedDict[int, None] = OrderedDict((e, None) for e in eng.residents.layer(lk))
        freq = np.zeros(r.E, np.int64)
        if name == "belady":  # next use of each access, scanning backwards
            nxt, seen = [0] * len(seq), {}
            for i in range(len(seq) - 1, -1, -1):
                nxt[i] = seen.get(seq[i][0], len(seq))
                seen[seq[i][0]] = i
            upcoming = {e: next((i for i, (x, _) in enumerate(seq) if x == e), len(seq)) for e in cache}
        i = 0
        for ev in events:
            r.tally(res, lk, sum(n for _, n in ev), sum(n for e, n in ev if e in cache))
            for e, n in ev:
                freq[e] += n
                if e in cache:
                    cache.move_to_end(e)
                else:
                    if len(cache) >= counts[lk]:
                        if name == "lfu":  # least tokens so far; ties: least recently used
                            victim = min(cache, key=lambda x: freq[x])
                        else:
                            victim = max(cache, key=lambda x: upcoming[x])
                        del cache[victim]
                    cache[e] = None
                    res.loads += 1
                    res.bytes_read += r.cost[lk]
                    res.stall_s += r.read_s[lk]
                if name == "belady":
                    upcoming[e] = nxt[i]
                i += 1
    return res


# -- entry point ---------------------------------------------------------------------------------------


def replay(trace: Trace, policies: Sequence[str] = POLICIES, cfg: ReplayConfig = ReplayConfig(),
           profile: Profile | None = None) -> list[ReplayResult]:
    """Replay ``trace`` under each of ``policies`` at ``cfg.budget``; one result each."""
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise InputError(f"unknown replay policy {', '.join(bad)}; choose from {', '.join(POLICIES)}")
    r = _Replay(trace, cfg, profile)
    out = []
    for name in policies:
        if name == "on-demand":  # the runtime's, as configured (its default: the least chosen goes)
            out.append(_run(r, name, "exact", "on-demand"))
        elif name == "lru":  # the runtime's on-demand with its recency eviction
            out.append(_run(r, name, "exact", "on-demand", on_demand_evict="recency"))
        elif name in EXACT:
            out.append(_evicting(r, name))
        elif name == "swapmoe":
            out.append(_run(r, name, "masked", "swapmoe"))
        elif name == "best-fixed":
            sets, counts = best_fixed_sets(r, r.budget())
            out.append(_fixed(r, name, sets, counts))
        else:  # prune, static (swapmoe's start set), hindsight (swapmoe's counts, the trace's favourites)
            eng, _ = r.engine("prune" if name == "prune" else "swapmoe")
            sets, counts = eng.residents.residents(), eng.limits.counts
            if name == "hindsight":
                chosen = _chosen(r)
                sets = {lk: frozenset(top_experts(chosen[lk].astype(np.float64), counts[lk])) for lk in r.keys}
            out.append(_fixed(r, name, sets, counts))
    return out
