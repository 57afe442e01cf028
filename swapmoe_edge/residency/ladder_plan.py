"""Where each expert sits on the precision ladder under a byte budget. Pure functions.

Every expert is at one rung or absent. A rung has a byte cost and a quality ``q`` in
(0, 1] (the artifact's own precision is 1). Covering an expert of planner value ``v``
(its share of its layer's importance times the layer's weight, as planner.py) at rung
``r`` is worth ``v · q(r)``; an absent expert is worth 0 (its tokens are rerouted).

The plan is greedy on value per byte: each layer first gets its most valuable expert at
the lowest rung (so every token has somewhere to go), then, step by step, the step with
the most value per byte that still fits: an absent expert onto the lowest rung, or a
present one a rung up. Low rungs cost a fraction of the full copy and keep most of its
quality, so the plan covers every expert at a low rung before it lifts the important
ones, which is the point of the ladder.
"""

from __future__ import annotations

import heapq
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from swapmoe_edge.core.units import format_size
from swapmoe_edge.core.errors import BudgetError
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.model.rungs import Rung
from swapmoe_edge.residency.planner import _weights, normalised, top_experts

Placement = dict[LayerKey, dict[int, str]]  # layer -> {expert: rung name}


def plan_ladder(
    importance: Mapping[LayerKey, np.ndarray],
    rungs: Sequence[Rung] | Mapping[LayerKey, Sequence[Rung]],
    capacity_bytes: int,
    layer_weight: Mapping[LayerKey, float] | None = None,
    current: Mapping[LayerKey, Mapping[int, str]] | None = None,
    hysteresis: float = 0.0,
    unavailable: frozenset = frozenset(),
    max_copies: Mapping[LayerKey, int] | None = None,
) -> Placement:
    """The (expert, rung) pairs to hold within ``capacity_bytes``; rungs lowest first, the
    same for every layer or per layer (a copy's cost may differ by stack: rungs.py).

    ``current`` with ``hysteresis``: an expert held now counts ``1 + hysteresis`` times its
    value, so near-equal experts do not trade places on every plan. ``unavailable``: (layer,
    expert) pairs that cannot be read; never planned. ``max_copies``: at most this many experts
    per layer (e.g. a split measured on the model's output, planner.plan_by_loss); the rest
    of the bytes then lift copies.
    """
    layers = list(importance)
    per_layer = rungs if isinstance(rungs, Mapping) else {lk: rungs for lk in layers}
    costs, quality = {}, {}
    for lk in layers:
        ladder = per_layer[lk]
        costs[lk] = [int(r.cost) for r in ladder]
        quality[lk] = [float(r.quality) for r in ladder]
        c, q = costs[lk], quality[lk]
        if not ladder or any(x <= 0 for x in c) or c != sorted(c) or q != sorted(q) or not all(0 < x <= 1 for x in q):
            raise ValueError(f"{lk}: rungs must go up in cost and quality (0 < q <= 1), got {list(ladder)}")
    weight = _weights(layers, layer_weight)
    value = {}
    for lk in layers:
        v = normalised(importance[lk]) * weight[lk]  # E
        held = (current or {}).get(lk, {})
        value[lk] = np.array([v[e] * (1 + hysteresis if e in held else 1.0) for e in range(v.size)])

    level: dict[tuple[LayerKey, int], int] = {}
    left = int(capacity_bytes)
    need = sum(costs[lk][0] for lk in layers)
    if need > left:
        lowest = per_layer[layers[0]][0].name or "full-precision"
        raise BudgetError(
            f"expert capacity {format_size(left)} cannot hold one {lowest} expert copy "
            f"for each of the {len(layers)} sparse layers ({format_size(need)}). Raise the budget by at least "
            f"{format_size(need - left)}.")
    heap: list[tuple[float, int, int, int, LayerKey]] = []  # (-value per byte, layer position, expert, to level, layer)

    def step(lk: LayerKey, to: int) -> tuple[float, int]:
        q, c = quality[lk], costs[lk]
        return q[to] - (q[to - 1] if to > 0 else 0.0), c[to] - (c[to - 1] if to > 0 else 0)

    def push(pos: int, lk: LayerKey, e: int, to: int) -> None:
        if to >= len(costs[lk]):
            return
        gain, extra = step(lk, to)
        heapq.heappush(heap, (-value[lk][e] * gain / max(extra, 1), pos, e, to, lk))

    for pos, lk in enumerate(layers):
        order = [e for e in np.argsort(-value[lk], kind="stable") if (lk, int(e)) not in unavailable]
        if not order:
            raise BudgetError(f"{lk}: every expert is unavailable (unreadable); cannot route.")
        first = int(order[0])
        level[(lk, first)] = 0
        left -= costs[lk][0]
        push(pos, lk, first, 1)
        for e in order[1:]:
            push(pos, lk, int(e), 0)
    held = {lk: 1 for lk in layers}
    while heap:
        _, pos, e, to, lk = heapq.heappop(heap)
        extra = step(lk, to)[1]
        if extra > left or (to == 0 and max_copies is not None and held[lk] >= max_copies.get(lk, held[lk] + 1)):
            continue  # this expert stays where it is; cheaper steps of others may still fit
        held[lk] += to == 0
        level[(lk, e)] = to
        left -= extra
        push(pos, lk, e, to + 1)
    plan: Placement = {lk: {} for lk in layers}
    for (lk, e), lv in level.items():
        plan[lk][e] = per_layer[lk][lv].name
    return plan


def placement_bytes(placement: Mapping[LayerKey, Mapping[int, str]],
                    rungs: Sequence[Rung] | Mapping[LayerKey, Sequence[Rung]]) -> int:
    per_layer = rungs if isinstance(rungs, Mapping) else {lk: rungs for lk in placement}
    return sum({r.name: r.cost for r in per_layer[lk]}[name] for lk, row in placement.items() for name in row.values())


def measured_quality(ladders: Mapping[LayerKey, Sequence[Rung]], importance: Mapping[LayerKey, np.ndarray],
                     loss: Mapping[LayerKey, np.ndarray], rung_loss: Mapping[LayerKey, Mapping[str, float]]
                     ) -> dict[LayerKey, list[Rung]]:
    """Each layer's rungs with qualities measured on the model's output where the profile has them.

    The value model of ``plan_ladder``: covering an expert of importance share ``v`` at rung
    ``r`` is worth ``v x q(r)``, so ``1 - q(r)`` is what the rung loses per unit of importance
    as a share of what absence loses. Both are measured (importance.Profile): ``rung_loss``
    is the loss with *all* of the layer's importance on the rung; absence per unit of
    importance is the loss of keeping the top half (``loss[E/2 - 1]``) over the importance
    share the other half carries. On the embedded model this gives int4 0.990-0.996 (per
    layer), where the fixed guess (0.97) made lifting a copy look 3-8x more worth its bytes
    than it is (docs/results/ladder.md).
    Rungs without a measurement keep theirs; qualities stay strictly increasing up the ladder.
    """
    out: dict[LayerKey, list[Rung]] = {}
    for lk, ladder in ladders.items():
        measured = rung_loss.get(lk, {})
        absent = None
        if lk in loss and lk in importance and measured:
            imp = np.asarray(importance[lk], np.float64)
            half = max(1, imp.size // 2)
            left = 1.0 - float(imp[list(top_experts(imp, half))].sum() / imp.sum()) if imp.sum() > 0 else 0.0
            if left > 0 and loss[lk][half - 1] > 0:
                absent = float(loss[lk][half - 1]) / left  # loss per unit of absent importance
        rungs, floor = [], 0.0
        for r in ladder:
            q = r.quality
            if absent is not None and r.name in measured:
                q = min(max(1.0 - measured[r.name] / absent, 1e-3), 1.0 - 1e-6)
            q = min(max(q, floor + 1e-9), 1.0)  # up the ladder, never down
            rungs.append(replace(r, quality=q))
            floor = q
        out[lk] = rungs
    return out
