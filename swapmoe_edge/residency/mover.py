"""How experts come and go: the reads, evictions and publishes that carry out a policy's moves
(steps.Move) within the limits. The engine (engine.py) is a Mover that also knows when.

Evict before read: a move's expert in the way goes before its replacement is read, so no room
is kept for an expert in flight. An unreadable expert is marked unavailable once and never
planned again; only an exact policy's reads on the caller's thread raise instead.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Mapping, Sequence

from swapmoe_edge.artifact.store import ExpertReadError, LoadedExpert
from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.model.rungs import PRIMARY, Rung
from swapmoe_edge.residency.limits import Counters, ExpertUnavailableError, Limits
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.residency.steps import Move, Round
from swapmoe_edge.system import memory

log = logging.getLogger(__name__)


class Mover:
    """Carries out moves over ``residents`` for ``policy``: ``ladders`` gives each layer's rungs with
    their resident costs, ``runners`` (rung name -> RungRunner) turns a read low-bit block into a
    copy that runs. ``lock`` guards every publish and eviction that must see the limits unchanged;
    reads run outside it."""

    def __init__(self, policy, residents: ResidentSet, store, ladders: Mapping[LayerKey, Sequence[Rung]],
                 runners: Mapping[str, object] | None = None):
        self.policy, self.residents, self.store = policy, residents, store
        self.ladders = {lk: list(r) for lk, r in ladders.items()}
        self.runners = dict(runners or {})
        self.limits = Limits()
        self.counters = Counters()
        self.failed: dict[tuple[ExpertKey, str], ExpertReadError] = {}  # (expert, rung) copies that failed a read, and why
        self.lock = threading.RLock()
        # Closed while a request runs up to its first token (the encoder pass and the first
        # decoder step): the filler and the swapper wait. On a device the first request's
        # page faults on dense weights (mapped lazily by ONNX Runtime) would queue behind
        # background expert reads on the same flash, and a swap's read, hash and copy take
        # CPU and memory bandwidth from the prefill (swapmoe's TTFT on switch-base-8 was
        # 1.6-1.9x prune's at 50% in the box with swaps allowed during prefill).
        self.background_io = threading.Event()
        self.background_io.set()
        self._stop = threading.Event()
        self._cost = {(lk, r.name): r.cost for lk, ladder in self.ladders.items() for r in ladder}
        self._untrimmed = 0  # bytes published since the heap was last trimmed

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def exact(self) -> bool:
        """Whether the policy's output is full's (it never reroutes a token)."""
        return self.policy.exact

    def load_now(self, key: ExpertKey, rung: str, room: list[ExpertKey], own_mapping: bool = True) -> LoadedExpert | None:
        """Read ``key`` at ``rung`` on the calling thread (the token loop waits: a load, and its
        stall), evicting from ``room`` first as the limits need; None when it does not fit or
        cannot be read (an exact policy raises instead)."""
        t0 = time.perf_counter()
        lk = key.layer_key
        expert = None
        try:
            with self.lock:
                if self._make_room(lk, self.cost(lk, rung), True, room, keep_last=not self.exact, loading=lk):
                    expert = self.read(key, rung, own_mapping, strict=True)
                    if expert is not None:
                        self.residents.put(expert)
        finally:
            self.counters.add(loads=expert is not None, stall_s=time.perf_counter() - t0)
        return expert

    def wake(self) -> None:
        """Plan at once rather than at the next interval; a mover without a swapper has none to wake."""

    def cost(self, lk: LayerKey, rung: str) -> int:
        """The resident bytes of one copy of an expert of ``lk`` at ``rung``."""
        return self._cost[(lk, rung)]

    def read(self, key: ExpertKey, rung: str = PRIMARY, own_mapping: bool = True, strict: bool = False) -> LoadedExpert | None:
        """Read ``key`` at ``rung``. A copy that cannot be read is marked so (never read again;
        ``failed`` keeps why, for the stats) and gives None, or, ``strict`` under an exact policy,
        ExpertUnavailableError: one line that names the file and the fix. The expert itself is
        marked unavailable (never planned again) once none of the policy's rungs of it can be read:
        the ladder holds an expert whose own file is corrupt at its intact low-bit copy."""
        try:
            if self.residents.is_unavailable(key) or rung in self.residents.unreadable_rungs(key):
                was = self.failed.get((key, rung)) or next((e for (k, _), e in self.failed.items() if k == key), None)
                raise ExpertReadError(key, was.path, f"{was.why}, as an earlier read found", was.fix) if was is not None else \
                    ExpertReadError(key, key.name, "marked unavailable by an earlier read")
            if rung != PRIMARY:
                return self.runners[rung].load(self.store.read(key, rung=rung))
            return self.store.read(key) if own_mapping else self.store.read(key, False)  # False: the cheaper fill
        except ExpertReadError as e:
            first = rung not in self.residents.unreadable_rungs(key)
            left: list[str] = []
            if first:
                self.failed.setdefault((key, rung), e)
                bad = self.residents.mark_unreadable(key, rung)
                left = [r.name for r in self.ladders.get(key.layer_key, ()) if r.name not in bad]
                if not left:
                    self.residents.mark_unavailable(key)
            if strict and self.exact:
                raise ExpertUnavailableError(
                    f"expert {key} ({e.path}) cannot be read: {e.why}. The {self.name} policy is exact and cannot go on "
                    f"without it: {e.fix[0].lower()}{e.fix[1:].rstrip('.')} (an approximate policy, swapmoe, prune or "
                    "ladder, routes around it).") from e
            if first and left:
                log.warning("%s This copy is marked unreadable: the expert runs at its other precisions (%s).", e,
                            ", ".join(r or "its own" for r in left))
                self.wake()  # plan now: the expert's readable copies take the place of this one
            elif first:
                log.warning("%s The expert is marked unavailable: its tokens go to the layer's other experts.", e)
            return None

    def evict(self, key: ExpertKey, keep_last: bool = False) -> bool:
        """Unpublish ``key`` (its memory goes with the last token running it); counted. ``keep_last``:
        not if it is its layer's last resident (that layer's tokens would have nowhere to go)."""
        if keep_last and len(self.residents.layer(key.layer_key)) <= 1:
            return False
        if self.residents.drop(key):
            self.counters.add(evictions=1)
            return True
        return False

    def fits(self, lk: LayerKey, need: int, adding: bool) -> bool:
        """Whether ``need`` more bytes (and, ``adding``, one more expert in ``lk``) stay within the limits."""
        lim = self.limits
        if adding and lim.counts is not None and len(self.residents.layer(lk)) >= lim.counts[lk]:
            return False
        return lim.capacity is None or self.residents.nbytes + need <= lim.capacity

    def _make_room(self, lk: LayerKey, need: int, adding: bool, room: list[ExpertKey], keep_last: bool = True,
                   loading: LayerKey | None = None) -> bool:
        while not self.fits(lk, need, adding) and room:
            key = room.pop(0)
            self.evict(key, keep_last=keep_last or key.layer_key != loading)
        return self.fits(lk, need, adding)

    def _over(self, lk: LayerKey) -> bool:
        lim = self.limits
        return ((lim.counts is not None and len(self.residents.layer(lk)) > lim.counts[lk])
                or (lim.capacity is not None and self.residents.nbytes > lim.capacity))

    def begin(self, m: Move, room: list[ExpertKey] | None = None) -> Move | None:
        """The part of a move that comes before its read; returns what is left to ``finish`` once
        the expert is read, or None when nothing is to be read.

        Evict before read: a replaced expert goes first, and an expert moving to another rung
        leaves its old copy, so no room is kept for an expert in flight; meanwhile its tokens go
        to the layer's other residents. A layer's last resident is never evicted that way: its
        copy moving rung, or (over the limits, when nothing else makes room) the expert ``room``
        lets go for a newcomer, is replaced in one publish instead (``m.evict`` of the move
        returned); a paired replacement in a one-expert layer is skipped. ``room``: residents to
        evict for room, least valuable first.
        """
        if m.rung is None:
            self.evict(m.key)
            return None
        if self.residents.is_unavailable(m.key) or m.rung in self.residents.unreadable_rungs(m.key):
            return None
        lk = m.key.layer_key
        if m.evict is not None:
            if len(self.residents.layer(lk)) < 2:
                return None
            self.evict(m.evict)
            m = Move(m.key, m.rung)
        held = self.residents.layer(lk).get(m.key.expert)
        if held is not None and (held.rung or PRIMARY) == m.rung:
            return None
        need = self.cost(lk, m.rung) - (held.nbytes if held is not None else 0)
        room = room if room is not None else []
        layer = self.residents.layer(lk)
        # Over the limits (the budget fell) with only layers' last residents left to evict, a
        # newcomer takes the place of its layer's one expert, or nothing would ever fit again.
        sole = next(iter(layer.values())) if held is None and len(layer) == 1 and self._over(lk) and \
            ExpertKey(lk.stack, lk.layer, next(iter(layer))) in room else None
        if not self._make_room(lk, need, held is None, room):
            if sole is None or self.residents.layer(lk).get(sole.key.expert) is not sole or \
                    need > sole.nbytes and not self.fits(lk, need - sole.nbytes, False):
                return None
            return Move(m.key, m.rung, sole.key)
        if held is not None and len(self.residents.layer(lk)) > 1:
            self.residents.drop(m.key)
        return m

    def finish(self, m: Move, expert: LoadedExpert) -> bool:
        """Publish ``expert``, read for ``m`` (what ``begin`` left: in place of ``m.evict``, if
        any), unless the limits fell meanwhile."""
        lk = m.key.layer_key
        with self.lock:
            layer = self.residents.layer(lk)
            held = layer.get(m.key.expert)
            gone = layer.get(m.evict.expert) if m.evict is not None else None
            alone = held is not None and len(layer) == 1  # a layer's last copy: replaced in one publish
            need = expert.nbytes - sum(x.nbytes for x in (held, gone) if x is not None)
            adding = held is None and gone is None
            if not alone and (need > 0 or adding) and not self.fits(lk, need, adding):
                return False  # a publish that adds neither bytes nor an expert always goes through
            self.residents.replace(expert, m.evict if gone is not None else None)
        if gone is not None:
            self.counters.add(evictions=1)
        if self.policy.trim_every:
            # Each session build leaves its transient buffers (the copy ORT takes of the bytes,
            # packing scratch) as free heap that glibc keeps: filling switch-base-64 at 4.7 GiB
            # went 0.9 GiB past the accounted copies; trimmed every 64 MiB, it stays at them.
            self._untrimmed += self._file_bytes(m, expert)
            if self._untrimmed >= self.policy.trim_every:
                memory.trim()
                self._untrimmed = 0
        return True

    def _file_bytes(self, m: Move, expert: LoadedExpert) -> int:
        """The bytes ``m`` read from flash (the artifact's; ``expert``'s own where there is none)."""
        manifest = getattr(self.store, "manifest", None)
        if manifest is None:
            return expert.nbytes
        entry = manifest.experts[m.key]
        return entry.nbytes if m.rung == PRIMARY else entry.rungs[m.rung].nbytes

    def carry_out(self, rnd: Round, how: str = "swap") -> tuple[int, int]:
        """Begin, read and finish ``rnd``'s moves on this thread; returns (experts read, published).

        ``how``: "swap" (the swapper: stops when a request closes ``background_io``; published
        experts count as swaps), "fill" (the start fill: waits for ``background_io``), "loop" (the
        token loop: reads count as loads and stall, published experts as swaps), "now" (the
        caller's thread, uncounted: warm, resize; an exact policy's failed read raises).
        """
        t0 = time.perf_counter()
        read = done = got = 0
        for m in rnd.moves:
            if how == "fill":
                while not self.background_io.wait(0.05) and not self._stop.is_set():
                    pass
            if how != "now" and self._stop.is_set() or how == "swap" and not self.background_io.is_set():
                break
            if (rnd.max_moves is not None and done >= rnd.max_moves) or (rnd.max_bytes is not None and got >= rnd.max_bytes):
                break
            left = self.begin(m, rnd.room)
            expert = self.read(left.key, left.rung, strict=how == "now") if left is not None else None
            read += expert is not None
            if expert is not None and self.finish(left, expert):
                done += 1
                got += self._file_bytes(left, expert) if rnd.max_bytes is not None else 0
            elif how != "now" and m.rung is not None and self.limits.capacity is not None and \
                    self.residents.nbytes + self.cost(m.key.layer_key, m.rung) > self.limits.capacity:
                break  # the bytes are full: nothing later fits either until the next plan
        if how in ("swap", "loop"):
            self.counters.add(swaps=done)
        if how == "loop" and read:
            self.counters.add(loads=read, stall_s=time.perf_counter() - t0)
        return read, done
