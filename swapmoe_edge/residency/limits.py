"""The residency engine's bookkeeping: the limits it holds the residents to, its counters, its error."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Mapping

from swapmoe_edge.core.errors import SwapMoEError
from swapmoe_edge.core.keys import LayerKey


class ExpertUnavailableError(SwapMoEError):
    """An exact policy needed an expert that cannot be read."""


@dataclass
class Counters:
    """Running totals; the runtime takes differences around each request."""

    stall_s: float = 0.0  # time the token loop waited for expert reads
    loads: int = 0  # experts read on the token loop (on-demand misses, predicted swaps, ladder waits)
    swaps: int = 0  # experts the swapper published
    evictions: int = 0
    # Top-k routing counts choices: a token is k routed choices, each "first choice" one of its
    # unmasked top k (first-choice residency: the share of them resident).
    routed: int = 0  # tokens routed in sparse layers (padding excluded)
    first_choice_resident: int = 0  # ... whose unmasked first choice was resident
    unavailable_hits: int = 0  # tokens whose first choice could not be read at all
    rerouted: int = 0  # tokens, padding included, sent away from (or, dropped: without) their first choice (0: as full's)
    lowbit_tokens: int = 0  # tokens (padding excluded) that ran a low-bit copy of their expert
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: float) -> None:
        with self.lock:
            for name, n in amounts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return {k: v for k, v in self.__dict__.items() if k != "lock"}


@dataclass(frozen=True)
class Limits:
    """What the residents may hold: at most ``counts[layer]`` experts in a layer, and ``capacity``
    bytes in all; None: that limit does not apply (whole-expert policies count, the ladder weighs)."""

    counts: Mapping[LayerKey, int] | None = None
    capacity: int | None = None
