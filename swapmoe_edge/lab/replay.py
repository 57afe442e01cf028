"""Replay a routing trace (trace.py) under residency policies, fast and without the model.

Two semantics, as in the runtime:

- **exact** (the output is full's): a token whose expert is not resident waits while it is
  read. ``lru`` is the runtime's ``on-demand``; ``lfu`` evicts the least-used expert;
  ``belady`` evicts the one needed furthest in the future (offline, the optimum: no
  demand-loading policy with the same per-layer slots reads fewer experts).
- **masked** (lossy): a token whose expert is not resident goes to the best resident one.
  ``prune`` (largest ‖E‖) and ``static`` (the profile's most important experts, or its
  measured substitute in a layer that holds one) never change; ``swapmoe`` is the runtime's own policy object (policies.make_policy) fed the
  trace's router outputs, with its own planner and swapper decisions, and its swapper run on
  a simulated clock (with a decoder predictor in the profile, a request's first decoder
  event wakes it at once, as in the runtime). ``hindsight`` keeps the static policy's per-layer counts but the experts
  the trace's tokens chose most (what a perfect profile of this very stream would give). ``best-fixed`` is the offline optimum of fixed sets: the experts that
  the trace's tokens chose most, with the per-layer split that holds the most tokens in the
  same bytes; no fixed set (``prune``, ``static``) can beat it. A policy that swaps *can*,
  when the workload moves: that is what adaptation is for.

Clock: an encoder pass takes ``encoder_ms``, each decoder step ``token_ms`` (by default the
timings measured while recording), spread evenly over the sparse layers of the stack. The
swapper wakes every ``swap_interval_s`` (RuntimeConfig) and plans; each expert it admits
becomes resident ``expert_bytes / flash`` seconds later, and it plans again no sooner.
An exact policy's miss stalls the clock by the same read time, and so do the swaps swapmoe
makes on the token loop for a decoder prediction (``predict_decoder`` wait).

What a replay does not model: a lossy policy changes the hidden states and therefore the
later routing; the trace holds full's routing throughout.
Hit rates count tokens whose unmasked first choice was resident when their layer ran.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from swapmoe_edge.system.budget import parse_budget
from swapmoe_edge.core.errors import InputError
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.core.keys import parse_layer_name
from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.residency.planner import plan_counts, top_experts
from swapmoe_edge.residency.policies_old import make_policy
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.runtime.facade import RuntimeConfig
from swapmoe_edge.artifact.store import LoadedExpert
from swapmoe_edge.lab.trace import Trace

EXACT = ("lru", "lfu", "belady")
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
        self.first = trace.first_choice()  # [N]

    def capacity(self, policy: str) -> int:
        """Expert bytes the runtime's planner would get (runtime._plan, with the baseline left out)."""
        spec = parse_budget(self.cfg.budget)
        everything = sum(self.cost.values()) * self.E
        if spec.kind == "share":
            cap = int(np.floor(spec.share * everything))
        elif spec.kind == "bytes":
            cap = int(spec.nbytes)
        else:
            raise InputError("a replay needs a budget as a share of the experts (50%) or bytes of experts (4GiB), not auto")
        return max(cap, sum(self.cost.values()))

    def counts(self, policy: str) -> dict[LayerKey, int]:
        rc = self.cfg.runtime
        importance = self.norms if policy == "prune" else dict(self.profile.importance)
        loss = None if policy == "prune" else self.profile.loss  # as runtime._plan gives swapmoe
        return plan_counts(importance, self.cost, self.capacity(policy), method=rc.planner,
                           layer_weight=rc.layer_weights(self.keys), loss=loss)

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
    """Per layer [E]: how many of the trace's tokens chose each expert first."""
    chosen = {lk: np.zeros(r.E, np.int64) for lk in r.keys}
    for _, li, _, sl in r.t.events():
        chosen[r.keys[li]] += np.bincount(r.first[sl], minlength=r.E)
    return chosen


class _NullStore:
    """Expert reads that cost nothing here: the replay's clock prices them instead."""

    def __init__(self, cost: dict[LayerKey, int]):
        self.cost = cost
        self.largest_expert = max(cost.values(), default=0)
        self.on_loop: list[LayerKey] = []  # the layers of the reads since the replay last cleared it

    def read(self, key: ExpertKey, own_mapping: bool = True) -> LoadedExpert:
        self.on_loop.append(key.layer_key)
        return LoadedExpert(key, {}, self.cost[key.layer_key])


def _swapmoe(r: _Replay) -> ReplayResult:
    """The runtime's SwapMoEPolicy, fed the trace; its swapper's plan/apply on the simulated clock."""
    rc = replace(r.cfg.runtime, policy="swapmoe")
    counts = r.counts("swapmoe")
    residents = ResidentSet(r.keys, r.E)
    store = _NullStore(r.cost)
    pol = make_policy(rc, residents, store, lambda expert, x: np.zeros_like(x), 1 << 30, counts, r.norms, r.profile)
    pol.warm()
    layers = {lk: SimpleNamespace(key=lk, experts=[ExpertKey(lk.stack, lk.layer, e) for e in range(r.E)])
              for lk in r.keys}
    res = r.result("swapmoe", "masked", counts)
    now, wake = 0.0, rc.swap_interval_s
    pending: list[tuple[float, int, Any]] = []  # (ready time, seq, swap) reads in flight
    seq = 0
    last_request = 0
    for req, li, _, sl in r.t.events():
        lk = r.keys[li]
        if req != last_request:
            pol.end_request()
            last_request = req
        while pending and pending[0][0] <= now:  # reads that finished: publish them
            _, _, s = heapq.heappop(pending)
            if pol.apply(s, store.read(ExpertKey(s.layer.stack, s.layer.layer, s.admit))):
                res.swaps += 1
        if wake <= now and not pending:
            ready = now
            for s in pol.plan():
                s = pol.begin(s)
                if s is None:
                    continue
                ready += r.read_s[s.layer]
                res.loads += 1
                res.bytes_read += r.cost[s.layer]
                heapq.heappush(pending, (ready, seq, s))
                seq += 1
            wake = max(now + rc.swap_interval_s, ready)
        probs = r.t.probs[sl].astype(np.float32)  # n E
        x = r.t.x_norm[sl].astype(np.float32)  # n
        before = pol.counters.first_choice_resident
        store.on_loop.clear()  # what the call below reads, it reads on the token loop
        pol(layers[lk], x[None, :, None], np.log(np.maximum(probs, 1e-12))[None], None)
        r.tally(res, lk, x.size, pol.counters.first_choice_resident - before)
        if pol._wake.is_set():  # a decoder prediction wakes the swapper at once, as in the runtime
            pol._wake.clear()
            wake = now
        for read_lk in store.on_loop:  # a decoder prediction's swaps made on the token loop: stall
            res.loads += 1
            res.bytes_read += r.cost[read_lk]
            res.stall_s += r.read_s[read_lk]
            now += r.read_s[read_lk]
        now += r.event_s[lk]
    return res


# -- exact policies ----------------------------------------------------------------------------------


def _accesses(r: _Replay) -> dict[LayerKey, list[tuple[int, int]]]:
    """Per layer: (expert, tokens) in the order an exact policy reads them (np.unique per event)."""
    out: dict[LayerKey, list[tuple[int, int]]] = {lk: [] for lk in r.keys}
    for _, li, _, sl in r.t.events():
        experts, n = np.unique(r.first[sl], return_counts=True)
        out[r.keys[li]] += list(zip(experts.tolist(), n.tolist()))
    return out


def _exact(r: _Replay, name: str) -> ReplayResult:
    counts = r.counts("on-demand")
    res = r.result(name, "exact", counts)
    for lk, seq in _accesses(r).items():
        cap = max(1, counts[lk])
        cache: OrderedDict[int, None] = OrderedDict((e, None) for e in top_experts(r.profile.importance[lk], cap))
        freq = np.zeros(r.E, np.int64)
        if name == "belady":  # next use of each access, scanning backwards
            nxt, seen = [0] * len(seq), {}
            for i in range(len(seq) - 1, -1, -1):
                nxt[i] = seen.get(seq[i][0], len(seq))
                seen[seq[i][0]] = i
            upcoming = {}  # expert -> index of its next access, for residents
            for e in cache:
                upcoming[e] = next((i for i, (x, _) in enumerate(seq) if x == e), len(seq))
        for i, (e, n) in enumerate(seq):
            freq[e] += n
            hit = e in cache
            r.tally(res, lk, n, n if hit else 0)
            if hit:
                cache.move_to_end(e)
            else:
                if len(cache) >= cap:
                    if name == "lru":
                        victim = next(iter(cache))
                    elif name == "lfu":  # least tokens so far; ties: least recently used
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
        if name in EXACT:
            out.append(_exact(r, name))
        elif name == "swapmoe":
            out.append(_swapmoe(r))
        elif name == "best-fixed":
            sets, counts = best_fixed_sets(r, r.capacity("prune"))
            out.append(_fixed(r, name, sets, counts))
        elif name == "hindsight":
            counts = r.counts("static")
            chosen = _chosen(r)
            sets = {lk: frozenset(top_experts(chosen[lk].astype(np.float64), counts[lk])) for lk in r.keys}
            out.append(_fixed(r, name, sets, counts))
        else:
            counts = r.counts(name)
            order = r.norms if name == "prune" else r.profile.importance
            sets = {lk: frozenset(top_experts(order[lk], counts[lk])) for lk in r.keys}
            if name == "static":  # swapmoe's start set: a one-expert layer holds the measured substitute
                sets.update({lk: frozenset([e]) for lk, e in r.profile.substitute.items() if counts[lk] == 1})
            out.append(_fixed(r, name, sets, counts))
    return out
