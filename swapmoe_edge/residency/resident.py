"""The resident experts of every sparse layer ("virtual experts"), shared between threads.

Each layer's mapping is copy-on-write: writers (the swapper, the budget monitor) build a
new dict and publish it with one assignment, so the token loop always sees a complete,
consistent set and never a half-loaded expert. Eviction just unpublishes; the memory
goes when the last reader drops its reference.
"""

from __future__ import annotations

import threading
from types import MappingProxyType
from typing import Iterable, Mapping

import numpy as np

from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.artifact.store import LoadedExpert


class ResidentSet:
    def __init__(self, layers: Iterable[LayerKey], num_experts: int):
        self.num_experts = num_experts
        self._layers: dict[LayerKey, Mapping[int, LoadedExpert]] = {lk: MappingProxyType({}) for lk in layers}
        self._unavailable: set[ExpertKey] = set()
        self._lock = threading.Lock()

    # -- readers (token loop) ------------------------------------------------------------
    def layer(self, lk: LayerKey) -> Mapping[int, LoadedExpert]:
        return self._layers[lk]

    def allowed(self, lk: LayerKey, snapshot: Mapping[int, LoadedExpert] | None = None) -> np.ndarray:
        """[E] bool: which experts of the layer are resident (in ``snapshot`` when given)."""
        mask = np.zeros(self.num_experts, dtype=bool)
        mask[list(self._layers[lk] if snapshot is None else snapshot)] = True
        return mask

    def residents(self) -> dict[LayerKey, frozenset[int]]:
        return {lk: frozenset(m) for lk, m in self._layers.items()}

    def counts(self) -> dict[str, int]:
        return {lk.name: len(m) for lk, m in self._layers.items()}

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for m in self._layers.values() for e in m.values())

    def __contains__(self, key: ExpertKey) -> bool:
        return key.expert in self._layers[key.layer_key]

    # -- writers (swapper, monitor, on-demand loader) --------------------------------------
    def put(self, expert: LoadedExpert) -> None:
        lk = expert.key.layer_key
        with self._lock:
            new = dict(self._layers[lk])
            new[expert.key.expert] = expert
            self._layers[lk] = MappingProxyType(new)

    def drop(self, key: ExpertKey) -> bool:
        lk = key.layer_key
        with self._lock:
            if key.expert not in self._layers[lk]:
                return False
            new = dict(self._layers[lk])
            del new[key.expert]
            self._layers[lk] = MappingProxyType(new)
            return True

    def replace(self, admit: LoadedExpert, evict: ExpertKey | None) -> None:
        """Admit one expert and evict another in a single publish (the slot never goes empty)."""
        lk = admit.key.layer_key
        with self._lock:
            new = dict(self._layers[lk])
            if evict is not None:
                new.pop(evict.expert, None)
            new[admit.key.expert] = admit
            self._layers[lk] = MappingProxyType(new)

    # -- experts that failed to read ---------------------------------------------------------
    def mark_unavailable(self, key: ExpertKey) -> None:
        with self._lock:
            self._unavailable.add(key)

    def is_unavailable(self, key: ExpertKey) -> bool:
        return key in self._unavailable

    @property
    def unavailable(self) -> frozenset[ExpertKey]:
        return frozenset(self._unavailable)
