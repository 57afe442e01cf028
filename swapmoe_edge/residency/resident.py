"""The resident experts of every sparse layer ("virtual experts"), shared between threads.

Each layer is published as one immutable ``LayerView``: writers (the swapper, the budget
monitor, an on-demand read) build a new one and publish it with one assignment, so the token
loop always sees a complete, consistent set and never a half-loaded expert. A view carries its
masks (which experts are resident, which run a low-bit copy, which cannot be read), made once
when it is published instead of on every token; and it holds nothing once replaced, so an
evicted expert's memory goes when the last token that was running it is done.
"""

from __future__ import annotations

import threading
from types import MappingProxyType
from typing import Iterable, Mapping, NamedTuple

import numpy as np

from swapmoe_edge.artifact.store import LoadedExpert
from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.model.rungs import PRIMARY


class LayerView(NamedTuple):
    """One layer's residents as published: the experts and their [E] bool masks (read-only)."""

    experts: Mapping[int, LoadedExpert]
    allowed: np.ndarray  # resident
    low: np.ndarray | None  # resident as a low-bit copy (None: none is)
    unavailable: np.ndarray | None  # cannot be read (None: every expert can)


def _mask(n: int, experts: Iterable[int]) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[list(experts)] = True
    mask.flags.writeable = False
    return mask


class ResidentSet:
    def __init__(self, layers: Iterable[LayerKey], num_experts: int):
        self.num_experts = num_experts
        self._unavailable: set[ExpertKey] = set()
        self._unreadable: dict[ExpertKey, frozenset[str]] = {}  # rungs (PRIMARY: "") whose read failed
        self._lock = threading.Lock()
        self._views: dict[LayerKey, LayerView] = {}
        for lk in layers:
            self._publish(lk, {})

    def _publish(self, lk: LayerKey, experts: dict[int, LoadedExpert]) -> None:
        low = [e for e, x in experts.items() if x.rung is not None]
        bad = [k.expert for k in self._unavailable if k.layer_key == lk]
        self._views[lk] = LayerView(MappingProxyType(experts), _mask(self.num_experts, experts),
                                    _mask(self.num_experts, low) if low else None,
                                    _mask(self.num_experts, bad) if bad else None)

    # -- readers (token loop) ------------------------------------------------------------
    def view(self, lk: LayerKey) -> LayerView:
        """The layer as last published: one consistent snapshot of its experts and masks."""
        return self._views[lk]

    def layer(self, lk: LayerKey) -> Mapping[int, LoadedExpert]:
        return self._views[lk].experts

    def residents(self) -> dict[LayerKey, frozenset[int]]:
        return {lk: frozenset(v.experts) for lk, v in self._views.items()}

    def counts(self) -> dict[str, int]:
        return {lk.name: len(v.experts) for lk, v in self._views.items()}

    def placement(self) -> dict[LayerKey, dict[int, str]]:
        """Where every resident expert is: {layer: {expert: rung name}} (PRIMARY: the artifact's own)."""
        return {lk: {e: x.rung or PRIMARY for e, x in v.experts.items()} for lk, v in self._views.items()}

    @property
    def layers(self) -> tuple[LayerKey, ...]:
        return tuple(self._views)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for v in self._views.values() for e in v.experts.values())

    def __contains__(self, key: ExpertKey) -> bool:
        return key.expert in self._views[key.layer_key].experts

    # -- writers (swapper, monitor, on-demand loader) --------------------------------------
    def put(self, expert: LoadedExpert) -> None:
        """Publish ``expert`` (in place of another copy of it, if one is resident)."""
        self.replace(expert, None)

    def replace(self, admit: LoadedExpert, evict: ExpertKey | None) -> None:
        """Admit one expert and evict another in a single publish (the slot never goes empty)."""
        lk = admit.key.layer_key
        with self._lock:
            new = dict(self._views[lk].experts)
            if evict is not None:
                new.pop(evict.expert, None)
            new[admit.key.expert] = admit
            self._publish(lk, new)

    def drop(self, key: ExpertKey) -> bool:
        lk = key.layer_key
        with self._lock:
            if key.expert not in self._views[lk].experts:
                return False
            new = dict(self._views[lk].experts)
            del new[key.expert]
            self._publish(lk, new)
            return True

    # -- experts that failed to read ---------------------------------------------------------
    def mark_unavailable(self, key: ExpertKey) -> None:
        with self._lock:
            self._unavailable.add(key)
            self._publish(key.layer_key, dict(self._views[key.layer_key].experts))

    def is_unavailable(self, key: ExpertKey) -> bool:
        return key in self._unavailable

    def mark_unreadable(self, key: ExpertKey, rung: str) -> frozenset[str]:
        """Note that ``key``'s copy at ``rung`` cannot be read; returns every rung of it that cannot.
        The expert stays available while a policy can run another of its copies (mark_unavailable)."""
        with self._lock:
            bad = self._unreadable[key] = self._unreadable.get(key, frozenset()) | {rung}
            return bad

    def unreadable_rungs(self, key: ExpertKey) -> frozenset[str]:
        return self._unreadable.get(key, frozenset())

    @property
    def degraded(self) -> dict[ExpertKey, frozenset[str]]:
        """Experts still available with some copy unreadable: {expert: the rungs that cannot be read}."""
        with self._lock:
            return {k: r for k, r in self._unreadable.items() if k not in self._unavailable}

    @property
    def unavailable(self) -> frozenset[ExpertKey]:
        return frozenset(self._unavailable)
