"""How to get from the resident set to a target, step by step. Pure functions of numbers.

A ``Move`` is one step the engine carries out (engine.py): read an expert at a rung, after
evicting the one it replaces; or only evict. A ``Round`` is what a policy hands the engine at
once: moves in the order to run them, the residents it may evict to make room, and its rate.

Two sources of moves, one per way of budgeting:

- ``plan_swaps``: per-layer counts stay fixed; a better expert replaces a weaker resident (with
  hysteresis), ranked by value across layers, at most ``max_swaps`` a round (swapmoe).
- ``toward``: the planner's placement (planner.plan) is the target; drops and moves by value
  (the ladder, and every policy's start fill).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.model.rungs import PRIMARY
from swapmoe_edge.residency.planner import Ladders, top_experts, values


@dataclass(frozen=True)
class Move:
    """Read ``key`` at ``rung`` after evicting ``evict`` (if any); ``rung`` None: only evict ``key``."""

    key: ExpertKey
    rung: str | None = PRIMARY
    evict: ExpertKey | None = None


@dataclass
class Round:
    """Moves to carry out together; ``room``: residents to evict, least valuable first, when a move
    needs room (as much as it needs, never a layer's last); at most ``max_moves`` reads and about
    ``max_bytes`` read (None: no limit)."""

    moves: list[Move]
    room: list[ExpertKey] = field(default_factory=list)
    max_moves: int | None = None
    max_bytes: int | None = None


@dataclass(frozen=True)
class Swap:
    """One step of ``plan_swaps``: load ``admit`` then drop ``evict`` (either may be None)."""

    layer: LayerKey
    admit: int | None
    evict: int | None

    @property
    def kind(self) -> str:
        if self.admit is None:
            return "evict"
        return "admit" if self.evict is None else "replace"

    def move(self) -> Move:
        lk = self.layer
        if self.admit is None:
            return Move(ExpertKey(lk.stack, lk.layer, self.evict), None)
        evict = ExpertKey(lk.stack, lk.layer, self.evict) if self.evict is not None else None
        return Move(ExpertKey(lk.stack, lk.layer, self.admit), PRIMARY, evict)


def plan_swaps(
    residents: Mapping[LayerKey, frozenset[int]],
    importance: Mapping[LayerKey, np.ndarray],
    counts: Mapping[LayerKey, int],
    hysteresis: float = 0.1,
    max_swaps: int | None = None,
    layer_weight: Mapping[LayerKey, float] | None = None,
    unavailable: frozenset[ExpertKey] = frozenset(),
) -> list[Swap]:
    """The swaps that move the resident sets toward the plan, in the order to run them.

    1. Shrink: a layer over its count evicts its weakest residents. These come first
       and are never cut by ``max_swaps`` (a falling budget must be honoured).
    2. Grow: a layer under its count admits its best non-residents.
    3. Replace: the best non-resident replaces the weakest resident when its importance
       exceeds it by the factor ``1 + hysteresis`` (so near-equal experts do not flap);
       then the second best against the second weakest, and so on.

    Steps 2 and 3 are sorted by value (planner.values: the admitted expert's, or what a
    replacement gains) and at most ``max_swaps`` of them are kept. Each swap stands alone: any
    prefix of the list keeps every layer within its count. ``unavailable`` experts (they cannot
    be read) are never admitted.
    """
    if hysteresis < 0:
        raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
    value = values(importance, layer_weight)
    shrink: list[Swap] = []
    ranked: list[tuple[float, int, int, Swap]] = []  # (-value, layer position, admit, swap)
    for pos, key in enumerate(importance):
        row = np.asarray(importance[key], dtype=np.float64)  # E
        resident = frozenset(residents.get(key, frozenset()))
        count = int(counts[key])
        if not 0 <= count <= row.size:
            raise ValueError(f"{key}: count {count} is outside 0..{row.size}")
        if any(not 0 <= i < row.size for i in resident):
            raise ValueError(f"{key}: resident experts {sorted(resident)} outside 0..{row.size - 1}")

        order = top_experts(row, row.size)  # strongest first, ties to the lower index
        inside = [i for i in reversed(order) if i in resident]  # weakest first
        outside = [i for i in order if i not in resident and ExpertKey(key.stack, key.layer, i) not in unavailable]

        n_evict = max(0, len(inside) - count)
        shrink += [Swap(key, None, i) for i in inside[:n_evict]]
        inside = inside[n_evict:]

        n_admit = max(0, count - len(inside))
        for i in outside[:n_admit]:
            ranked.append((-value[key][i], pos, i, Swap(key, i, None)))
        outside = outside[n_admit:]

        for new, old in zip(outside, inside):
            if not row[new] > row[old] * (1.0 + hysteresis):
                break
            ranked.append((-(value[key][new] - value[key][old]), pos, new, Swap(key, new, old)))

    ranked.sort(key=lambda t: t[:3])
    if max_swaps is not None:
        ranked = ranked[: max(0, max_swaps)]
    return shrink + [t[3] for t in ranked]


def toward(have: Mapping[LayerKey, Mapping[int, str]], want: Mapping[LayerKey, Mapping[int, str]],
           value: Mapping[LayerKey, np.ndarray], ladders: Ladders) -> tuple[list[ExpertKey], list[Move]]:
    """How to get from ``have`` to ``want`` (placements: {layer: {expert: rung}}): the residents
    to drop, least valuable first, and the copies to read: moves down first (they free room),
    then moves up and admissions, most valuable first."""
    drops, down, up = [], [], []
    for lk, target in want.items():
        rank = {r.name: i for i, r in enumerate(ladders[lk])}
        held = have.get(lk, {})
        v = value[lk]
        for e in held:
            if e not in target:
                drops.append((v[e], lk.stack, lk.layer, e))
            elif rank[target[e]] < rank[held[e]]:
                down.append(Move(ExpertKey(lk.stack, lk.layer, e), target[e]))
        for e, rung in target.items():
            if e not in held or rank[rung] > rank[held[e]]:
                up.append((-v[e], lk.stack, lk.layer, e, rung))
    drops.sort()
    up.sort()
    return ([ExpertKey(s, lay, e) for _, s, lay, e in drops],
            down + [Move(ExpertKey(s, lay, e), rung) for _, s, lay, e, rung in up])


def weakest_first(resident, row: np.ndarray) -> list[int]:
    """``resident`` experts ordered for eviction by ``row`` (importance or norms): weakest first,
    the higher index first among equals."""
    return sorted(resident, key=lambda e: (row[e], -e))

