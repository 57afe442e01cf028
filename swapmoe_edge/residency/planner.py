"""Which experts to hold, at which precision, under a byte budget: the one planner. Pure functions.

``plan(importance, ladders, capacity)`` places (expert, rung) pairs; a policy that holds whole
experts only is the one-rung case, and its per-layer counts (``plan_counts``) are the sizes of
that plan's rows. Every policy's budget goes through ``expert_capacity`` (at least one copy per
sparse layer, or a BudgetError with the numbers).

"Layer order" is the iteration order of the ``importance`` mapping (the runtime passes manifest
order: encoder, then decoder). Importance is compared *within* a layer as a share of that
layer's mass (each row normalised to sum 1; an all-zero row counts as uniform), and *across*
layers through ``layer_weight`` (the decoder runs once per token, the encoder once per
request): an expert's value is its layer's weight times its share (``values``).

The plan is greedy on value per byte: each layer first gets its most valuable expert at the
lowest rung (so every token has somewhere to go), then, step by step, the step with the most
value per byte that still fits: an absent expert onto the lowest rung (value x quality), or a
present one a rung up (value x the quality it gains). Ties go to the layer holding fewer
copies, then to the earlier layer, then to the lower expert, so a plan is deterministic and
equal layers take turns. Low rungs cost a fraction of the full copy and keep most of its
quality, so the plan covers every expert at a low rung before it lifts the important ones.
"""

from __future__ import annotations

import heapq
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from swapmoe_edge.core.errors import BudgetError
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.core.units import format_size
from swapmoe_edge.model.rungs import PRIMARY, Rung
from swapmoe_edge.residency.loss_split import plan_by_loss

METHODS = ("importance", "uniform")
Placement = dict[LayerKey, dict[int, str]]  # layer -> {expert: rung name}
Ladders = Mapping[LayerKey, Sequence[Rung]]  # each layer's rungs, lowest first


def normalised(importance_row: np.ndarray) -> np.ndarray:
    """A layer's importance as shares summing to 1 (uniform when the row is all zero)."""
    row = np.asarray(importance_row, dtype=np.float64)  # E
    if row.ndim != 1 or row.size == 0 or not np.all(np.isfinite(row)) or np.any(row < 0):
        raise ValueError(f"importance must be a non-empty 1-D array of finite values >= 0, got {row!r}")
    total = row.sum()
    return row / total if total > 0 else np.full(row.size, 1.0 / row.size)


def top_experts(importance_row: np.ndarray, count: int) -> tuple[int, ...]:
    """The ``count`` most important experts, strongest first; ties go to the lower index."""
    row = np.asarray(importance_row, dtype=np.float64)
    order = np.argsort(-row, kind="stable")  # stable: equal values keep index order
    return tuple(int(i) for i in order[: max(0, count)])


def weights(layers, layer_weight: Mapping[LayerKey, float] | None) -> dict[LayerKey, float]:
    """Each layer's planner weight (1 where ``layer_weight`` says nothing); finite and >= 0."""
    w = {k: float((layer_weight or {}).get(k, 1.0)) for k in layers}
    bad = {str(k): v for k, v in w.items() if not (v >= 0 and np.isfinite(v))}
    if bad:
        raise ValueError(f"layer weights must be finite and >= 0, got {bad}")
    return w


def values(importance: Mapping[LayerKey, np.ndarray],
           layer_weight: Mapping[LayerKey, float] | None = None) -> dict[LayerKey, np.ndarray]:
    """The value rule: each expert's worth [E] is its layer's weight times its share of the layer's importance."""
    w = weights(importance, layer_weight)
    return {lk: normalised(row) * w[lk] for lk, row in importance.items()}


def one_rung(cost: Mapping[LayerKey, int]) -> dict[LayerKey, list[Rung]]:
    """The ladder of a policy that holds the artifact's experts only: one rung, one cost per layer."""
    return {lk: [Rung(PRIMARY, int(c), 1.0)] for lk, c in cost.items()}


def expert_capacity(budget: int, baseline: int, lowest: Mapping[LayerKey, int], strict: bool = False,
                    rung: str = "") -> int:
    """Bytes for experts under a whole-process ``budget`` over ``baseline``: never below one
    ``lowest`` copy per sparse layer. ``strict`` (at start): a budget that cannot hold that
    raises BudgetError with the numbers instead; later (a falling budget) the floor holds."""
    need = sum(int(c) for c in lowest.values())
    if strict and budget - baseline < need:
        copy = f"{rung} expert copy" if rung else "expert"
        short = need - (budget - baseline)
        if baseline:
            err = BudgetError(
                f"memory budget {format_size(budget)} ({budget} bytes) cannot hold the model: the dense part and "
                f"runtime baseline take {format_size(baseline)} ({baseline} bytes) and one {copy} for each of the "
                f"{len(lowest)} sparse layers takes {format_size(need)} ({need} bytes), so the minimum is "
                f"{format_size(baseline + need)} ({baseline + need} bytes); short by {format_size(short)} ({short} "
                f"bytes). Raise the budget to at least {format_size(baseline + need)}, or free memory on the device.")
            err.minimum = baseline + need  # for a caller that can say it in the user's own terms (a share)
            raise err
        raise BudgetError(
            f"expert capacity {format_size(budget)} ({budget} bytes) cannot hold one {copy} for each of the "
            f"{len(lowest)} sparse layers, which needs {format_size(need)} ({need} bytes). Raise the budget by at "
            f"least {format_size(short)}.")
    return max(int(budget) - int(baseline), need)


def _check_ladders(layers, ladders: Ladders) -> None:
    for lk in layers:
        c, q = [int(r.cost) for r in ladders[lk]], [float(r.quality) for r in ladders[lk]]
        if not c or any(x <= 0 for x in c) or c != sorted(c) or q != sorted(q) or not all(0 < x <= 1 for x in q):
            raise ValueError(f"{lk}: rungs must go up in cost and quality (0 < q <= 1, cost > 0), got {list(ladders[lk])}")


def plan(
    importance: Mapping[LayerKey, np.ndarray],
    ladders: Sequence[Rung] | Ladders,
    capacity_bytes: int,
    layer_weight: Mapping[LayerKey, float] | None = None,
    current: Mapping[LayerKey, Mapping[int, str]] | None = None,
    hysteresis: float = 0.0,
    unavailable: frozenset = frozenset(),
    max_copies: Mapping[LayerKey, int] | None = None,
    rung_range: Mapping[tuple[LayerKey, int], tuple[int, int]] | None = None,
) -> Placement:
    """The (expert, rung) pairs to hold within ``capacity_bytes``; ``ladders``: the same rungs for
    every layer or per layer (a copy's cost may differ by stack: rungs.py), lowest first.

    ``current`` with ``hysteresis``: an expert held now counts ``1 + hysteresis`` times its
    value, so near-equal experts do not trade places on every plan. ``unavailable``: (layer,
    expert) pairs that cannot be read; never planned. ``max_copies``: at most this many experts
    per layer (a split measured on the model's output, loss_split.plan_by_loss, or the uniform
    split); the rest of the bytes then lift copies. ``rung_range``: (layer, expert) -> the lowest
    and highest rung index it may be held at (its copies outside cannot be read); it enters at
    the lowest, at that rung's whole cost and quality.
    """
    layers = list(importance)
    per_layer = ladders if isinstance(ladders, Mapping) else {lk: ladders for lk in layers}
    _check_ladders(layers, per_layer)
    costs = {lk: [int(r.cost) for r in per_layer[lk]] for lk in layers}
    quality = {lk: [float(r.quality) for r in per_layer[lk]] for lk in layers}
    value = values(importance, layer_weight)
    for lk, held in (current or {}).items():
        if lk in value and held:
            value[lk] = value[lk].copy()
            value[lk][list(held)] *= 1 + hysteresis
    ranges = rung_range or {}

    def bottom(lk: LayerKey, e: int) -> int:
        return ranges.get((lk, e), (0, 0))[0]

    def top(lk: LayerKey, e: int) -> int:
        return ranges.get((lk, e), (0, len(costs[lk]) - 1))[1]

    orders: dict[LayerKey, list[int]] = {}
    for lk in layers:  # each layer's experts by value, less those that cannot be read
        orders[lk] = [int(e) for e in np.argsort(-value[lk], kind="stable") if (lk, int(e)) not in unavailable]
        if not orders[lk]:
            raise BudgetError(f"{lk}: every expert is unavailable (unreadable); cannot route.")
    # each layer's guaranteed cover: its best expert that enters at the lowest rung (else its best)
    firsts = {lk: next((e for e in orders[lk] if bottom(lk, e) == 0), orders[lk][0]) for lk in layers}
    expert_capacity(int(capacity_bytes), 0, {lk: costs[lk][bottom(lk, firsts[lk])] for lk in layers}, strict=True,
                    rung=per_layer[layers[0]][0].name if layers else "")
    left = int(capacity_bytes)

    def step(lk: LayerKey, e: int, to: int) -> tuple[float, int]:
        q, c = quality[lk], costs[lk]
        below = to > bottom(lk, e)  # a lift from the rung below, or the expert's entry at its lowest
        return q[to] - (q[to - 1] if below else 0.0), c[to] - (c[to - 1] if below else 0)

    # (-value per byte, copies the layer held at the push, layer position, expert, to level, layer)
    heap: list[tuple[float, int, int, int, int, LayerKey]] = []

    def push(pos: int, lk: LayerKey, e: int, to: int) -> None:
        if to <= top(lk, e):
            gain, extra = step(lk, e, to)
            heapq.heappush(heap, (-value[lk][e] * gain / max(extra, 1), held[lk], pos, e, to, lk))

    def next_cover(pos: int, lk: LayerKey) -> None:
        if absent[lk]:  # a layer's next cover waits in the heap one at a time
            e = absent[lk].pop()
            push(pos, lk, e, bottom(lk, e))

    level: dict[tuple[LayerKey, int], int] = {}
    absent: dict[LayerKey, list[int]] = {}  # each layer's experts not yet planned, most valuable last
    held = {lk: 1 for lk in layers}
    for pos, lk in enumerate(layers):
        first = firsts[lk]
        level[(lk, first)] = bottom(lk, first)
        left -= costs[lk][bottom(lk, first)]
        absent[lk] = [e for e in orders[lk] if e != first][::-1]
        push(pos, lk, first, bottom(lk, first) + 1)
        next_cover(pos, lk)
    while heap:
        _, _, pos, e, to, lk = heapq.heappop(heap)
        extra = step(lk, e, to)[1]
        cover = to == bottom(lk, e)
        if cover and max_copies is not None and held[lk] >= max_copies.get(lk, held[lk] + 1):
            continue  # the layer holds its share of copies
        if extra > left:
            if cover and to > 0:  # a dearer cover than the rest: the layer's next may still fit
                next_cover(pos, lk)
            continue  # a cover that does not fit: neither does the layer's next (bytes only fall)
        level[(lk, e)] = to
        left -= extra
        if cover:
            held[lk] += 1
            next_cover(pos, lk)
        push(pos, lk, e, to + 1)
    out: Placement = {lk: {} for lk in layers}
    for (lk, e), lv in level.items():
        out[lk][e] = per_layer[lk][lv].name
    return out


def uniform_counts(cost: Mapping[LayerKey, int], experts: Mapping[LayerKey, int], capacity_bytes: int) -> dict[LayerKey, int]:
    """Round-robin in layer order, one expert per layer per round, while it fits: with equal
    expert sizes the same count everywhere, and the leftover slots go to the earliest layers."""
    counts = {k: 1 for k in cost}
    left = int(capacity_bytes) - sum(cost.values())
    grew = True
    while grew:
        grew = False
        for k in cost:
            if counts[k] < experts[k] and cost[k] <= left:
                counts[k] += 1
                left -= cost[k]
                grew = True
    return counts


def plan_counts(
    importance: Mapping[LayerKey, np.ndarray],
    expert_bytes: Mapping[LayerKey, int],
    capacity_bytes: int,
    method: str = "importance",
    layer_weight: Mapping[LayerKey, float] | None = None,
    loss: Mapping[LayerKey, np.ndarray] | None = None,
) -> dict[LayerKey, int]:
    """How many experts each sparse layer keeps resident within ``capacity_bytes``: the row
    sizes of the one-rung ``plan``. Every layer gets at least 1 and at most E.

    - ``importance``: the plan's greedy split (value per byte; ``layer_weight``). A layer whose
      mass sits in one expert needs few slots and a flat layer gets more. With ``loss`` (a
      profile's measured curves, substitution.py: ``loss[layer][k - 1]`` is the cost to the
      model's output of keeping k experts of that layer), the split minimises the summed loss
      instead (loss_split.plan_by_loss); ``layer_weight`` is then not used, since the curves are
      measured on the model's output, where every layer meets.
    - ``uniform``: the same count everywhere (``uniform_counts``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown planning method {method!r}; use one of {METHODS}")
    layers = list(importance)
    if set(layers) != set(expert_bytes):
        raise ValueError(f"importance covers layers {sorted(map(str, importance))} but expert_bytes covers "
                         f"{sorted(map(str, expert_bytes))}")
    cost = {k: int(expert_bytes[k]) for k in layers}
    if any(c <= 0 for c in cost.values()):
        raise ValueError(f"expert byte costs must be positive, got { {str(k): c for k, c in cost.items()} }")
    expert_capacity(int(capacity_bytes), 0, cost, strict=True)
    caps = None
    if method == "uniform":
        caps = uniform_counts(cost, {k: np.size(importance[k]) for k in layers}, capacity_bytes)
    elif loss:
        caps = plan_by_loss(loss, cost, capacity_bytes, layers)
    placed = plan(importance, one_rung(cost), capacity_bytes, layer_weight, max_copies=caps)
    return {k: len(placed[k]) for k in layers}


def covered_mass(
    importance: Mapping[LayerKey, np.ndarray],
    counts: Mapping[LayerKey, int],
    layer_weight: Mapping[LayerKey, float] | None = None,
) -> float:
    """Σ_layers weight · (share of the layer's importance held by its top ``count`` experts):
    the objective of the importance split; use it to compare plans."""
    return sum(float(row[list(top_experts(row, counts[key]))].sum()) for key, row in values(importance, layer_weight).items())


def initial_residents(importance: Mapping[LayerKey, np.ndarray],
                      counts: Mapping[LayerKey, int]) -> dict[LayerKey, frozenset[int]]:
    """The start set: the top ``count`` experts of each layer."""
    return {k: frozenset(top_experts(importance[k], counts[k])) for k in importance}


def placement_bytes(placement: Mapping[LayerKey, Mapping[int, str]], ladders: Sequence[Rung] | Ladders) -> int:
    """What ``placement`` holds, in bytes."""
    per_layer = ladders if isinstance(ladders, Mapping) else {lk: ladders for lk in placement}
    return sum({r.name: r.cost for r in per_layer[lk]}[name] for lk, row in placement.items() for name in row.values())


def measured_quality(ladders: Mapping[LayerKey, Sequence[Rung]], importance: Mapping[LayerKey, np.ndarray],
                     loss: Mapping[LayerKey, np.ndarray], rung_loss: Mapping[LayerKey, Mapping[str, float]]
                     ) -> dict[LayerKey, list[Rung]]:
    """Each layer's rungs with qualities measured on the model's output where the profile has them.

    The value model of ``plan``: covering an expert of importance share ``v`` at rung
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
