"""Which experts to keep resident: per-layer counts under a byte budget, and the swaps to get there.

Pure functions of numbers (no ONNX Runtime, no threads), so the swapper and the tests
call them alike. "Layer order" is the iteration order of the ``importance`` mapping
(the runtime passes manifest order: encoder, then decoder); every tie goes to the
earlier layer, then to the lower expert index, so a plan is deterministic.

Importance is compared *within* a layer as a share of that layer's mass (each row
normalised to sum 1; an all-zero row counts as uniform), and *across* layers through
``layer_weight`` (e.g. expected tokens: the decoder runs once per token, the encoder
once per request).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from swapmoe_edge.core.units import format_size
from swapmoe_edge.core.errors import BudgetError
from swapmoe_edge.core.keys import LayerKey

METHODS = ("importance", "uniform")


@dataclass(frozen=True)
class Swap:
    """One step for the swapper: load ``admit`` then drop ``evict`` (either may be None)."""

    layer: LayerKey
    admit: int | None
    evict: int | None

    @property
    def kind(self) -> str:
        if self.admit is None:
            return "evict"
        return "admit" if self.evict is None else "replace"


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


def _weights(layers: list[LayerKey], layer_weight: Mapping[LayerKey, float] | None) -> dict[LayerKey, float]:
    w = {k: float((layer_weight or {}).get(k, 1.0)) for k in layers}
    bad = {str(k): v for k, v in w.items() if not (v >= 0 and np.isfinite(v))}
    if bad:
        raise ValueError(f"layer weights must be finite and >= 0, got {bad}")
    return w


def covered_mass(
    importance: Mapping[LayerKey, np.ndarray],
    counts: Mapping[LayerKey, int],
    layer_weight: Mapping[LayerKey, float] | None = None,
) -> float:
    """Σ_layers weight · (share of the layer's importance held by its top ``count`` experts).

    The objective the importance planner maximises; use it to compare plans.
    """
    w = _weights(list(importance), layer_weight)
    total = 0.0
    for key, row in importance.items():
        shares = normalised(row)
        total += w[key] * float(shares[list(top_experts(shares, counts[key]))].sum())
    return total


def plan_counts(
    importance: Mapping[LayerKey, np.ndarray],
    expert_bytes: Mapping[LayerKey, int],
    capacity_bytes: int,
    method: str = "importance",
    layer_weight: Mapping[LayerKey, float] | None = None,
    loss: Mapping[LayerKey, np.ndarray] | None = None,
) -> dict[LayerKey, int]:
    """How many experts each sparse layer keeps resident within ``capacity_bytes``.

    Every layer gets at least 1 and at most E; the total cost Σ count·expert_bytes stays
    within the capacity. ``expert_bytes[layer]`` is the (measured) cost of one expert.

    - ``uniform``: round-robin in layer order, one expert per layer per round, while it
      fits. With equal expert sizes that is the same count everywhere, and the leftover
      slots go to the earliest layers.
    - ``importance``: greedy; each next slot goes to the layer whose next-best expert
      adds the most ``layer_weight · share / byte`` (ties: fewer slots, then layer
      order). Shares fall along a layer, so a layer whose mass is concentrated in one
      expert needs few slots and a flat layer gets more.
      With ``loss`` (a profile's measured curves, substitution.py: ``loss[layer][k - 1]``
      is the cost to the model's output of keeping k experts of that layer), the split
      minimises the summed loss instead (``plan_by_loss``); ``layer_weight`` is then not
      used, since the curves are measured on the model's output, where every layer meets.
    """
    if method not in METHODS:
        raise ValueError(f"unknown planning method {method!r}; use one of {METHODS}")
    layers = list(importance)
    if set(layers) != set(expert_bytes):
        raise ValueError(
            f"importance covers layers {sorted(map(str, importance))} but expert_bytes covers "
            f"{sorted(map(str, expert_bytes))}"
        )
    cost = {k: int(expert_bytes[k]) for k in layers}
    if any(c <= 0 for c in cost.values()):
        raise ValueError(f"expert byte costs must be positive, got { {str(k): c for k, c in cost.items()} }")
    shares = {k: normalised(importance[k]) for k in layers}
    weight = _weights(layers, layer_weight)

    minimum = sum(cost.values())
    if minimum > capacity_bytes:
        raise BudgetError(
            f"expert capacity {format_size(capacity_bytes)} ({capacity_bytes} bytes) cannot hold one "
            f"expert for each of the {len(layers)} sparse layers, which needs {format_size(minimum)} "
            f"({minimum} bytes). Raise the budget by at least {format_size(minimum - capacity_bytes)}."
        )
    counts = {k: 1 for k in layers}
    left = int(capacity_bytes) - minimum

    if method == "uniform":
        grew = True
        while grew:
            grew = False
            for k in layers:
                if counts[k] < shares[k].size and cost[k] <= left:
                    counts[k] += 1
                    left -= cost[k]
                    grew = True
        return counts

    if loss:
        return plan_by_loss(loss, cost, capacity_bytes, layers)

    ranked = {k: np.sort(shares[k])[::-1] for k in layers}  # E, descending
    while True:
        # On equal gain, the layer with fewer slots first, then the earlier layer: equal
        # flat layers then alternate instead of the first one taking every slot.
        open_ = [
            (-weight[k] * float(ranked[k][counts[k]]) / cost[k], counts[k], pos, k)
            for pos, k in enumerate(layers)
            if counts[k] < ranked[k].size and cost[k] <= left
        ]
        if not open_:
            return counts
        best = min(open_)[3]
        counts[best] += 1
        left -= cost[best]


def loss_envelope(row: np.ndarray) -> np.ndarray:
    """A measured loss curve made non-increasing (running minimum): more slots never cost more.

    Measured on a finite sample, a curve can rise by noise (or because the top-k set is not
    the best k-set); the planner then takes the better smaller set's loss as the bound.
    """
    row = np.asarray(row, dtype=np.float64)
    if row.ndim != 1 or row.size == 0 or not np.all(np.isfinite(row)) or np.any(row < 0):
        raise ValueError(f"a loss curve must be a non-empty 1-D array of finite values >= 0, got {row!r}")
    return np.minimum.accumulate(row)


MAX_PLAN_UNITS = 1 << 20


def plan_by_loss(
    loss: Mapping[LayerKey, np.ndarray],
    cost: Mapping[LayerKey, int],
    capacity_bytes: int,
    layers: list[LayerKey] | None = None,
) -> dict[LayerKey, int]:
    """Per-layer counts (1..E) within ``capacity_bytes`` that minimise Σ loss[layer][count - 1].

    Exact, by dynamic programming over the capacity in units of the experts' common byte
    divisor (one unit per expert when all cost the same); when that divisor would make more
    than ``MAX_PLAN_UNITS`` units, in coarser units with sizes rounded up (still within the
    capacity, optimal up to that rounding). Curves go through
    ``loss_envelope``. Ties go to the plan that holds more bytes, then to the earlier
    layer holding more. The caller checks that one expert per layer fits.
    """
    layers = list(loss) if layers is None else layers
    if set(layers) != set(loss):
        raise ValueError(f"loss curves cover layers {sorted(map(str, loss))}, the plan has {sorted(map(str, layers))}")
    curves = {k: loss_envelope(loss[k]) for k in layers}
    unit = 0
    for k in layers:
        unit = int(np.gcd(unit, int(cost[k])))
    if int(capacity_bytes) // unit > MAX_PLAN_UNITS:  # sizes with a tiny common divisor: coarser units,
        unit = -(-int(capacity_bytes) // MAX_PLAN_UNITS)  # each expert's width rounded up, so plans still fit
    slots = int(capacity_bytes) // unit
    width = {k: -(-int(cost[k]) // unit) for k in layers}
    inf = np.inf
    # best[s]: least summed loss of the layers so far in exactly s units; pick[i][s]: layer i's count there
    best = np.full(slots + 1, inf)
    best[0] = 0.0
    picks: list[np.ndarray] = []
    for k in layers:
        new = np.full(slots + 1, inf)
        pick = np.zeros(slots + 1, dtype=np.int64)
        for n in range(curves[k].size, 0, -1):  # more experts first: on equal loss the bigger count stays
            w = n * width[k]
            if w > slots:
                continue
            cand = np.full(slots + 1, inf)
            cand[w:] = best[: slots + 1 - w] + curves[k][n - 1]
            better = cand < new
            new[better], pick[better] = cand[better], n
        best = new
        picks.append(pick)
    finite = np.isfinite(best)
    if not finite.any():
        raise ValueError("no plan with one expert per layer fits the capacity")
    target = np.min(best[finite])
    s = int(np.nonzero(finite & (best <= target))[0].max())  # least loss, then the most bytes held
    counts: dict[LayerKey, int] = {}
    for i in range(len(layers) - 1, -1, -1):
        n = int(picks[i][s])
        counts[layers[i]] = n
        s -= n * width[layers[i]]
    return {k: counts[k] for k in layers}


def initial_residents(
    importance: Mapping[LayerKey, np.ndarray], counts: Mapping[LayerKey, int]
) -> dict[LayerKey, frozenset[int]]:
    """The start set: the top ``count`` experts of each layer."""
    return {k: frozenset(top_experts(importance[k], counts[k])) for k in importance}


def plan_swaps(
    residents: Mapping[LayerKey, frozenset[int]],
    importance: Mapping[LayerKey, np.ndarray],
    counts: Mapping[LayerKey, int],
    hysteresis: float = 0.1,
    max_swaps: int | None = None,
    layer_weight: Mapping[LayerKey, float] | None = None,
) -> list[Swap]:
    """The swaps that move the resident sets toward the plan, in the order to run them.

    1. Shrink: a layer over its count evicts its weakest residents. These come first
       and are never cut by ``max_swaps`` (a falling budget must be honoured).
    2. Grow: a layer under its count admits its best non-residents.
    3. Replace: the best non-resident replaces the weakest resident when its importance
       exceeds it by the factor ``1 + hysteresis`` (so near-equal experts do not flap);
       then the second best against the second weakest, and so on.

    Steps 2 and 3 are sorted by value (``layer_weight`` × gained share) and at most
    ``max_swaps`` of them are kept. Each swap stands alone: any prefix of the list keeps
    every layer within its count.
    """
    if hysteresis < 0:
        raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
    layers = list(importance)
    weight = _weights(layers, layer_weight)
    shrink: list[Swap] = []
    ranked: list[tuple[float, int, int, Swap]] = []  # (-value, layer position, admit, swap)
    for pos, key in enumerate(layers):
        row = np.asarray(importance[key], dtype=np.float64)  # E
        shares = normalised(row)
        resident = frozenset(residents.get(key, frozenset()))
        count = int(counts[key])
        if not 0 <= count <= row.size:
            raise ValueError(f"{key}: count {count} is outside 0..{row.size}")
        if any(not 0 <= i < row.size for i in resident):
            raise ValueError(f"{key}: resident experts {sorted(resident)} outside 0..{row.size - 1}")

        order = top_experts(row, row.size)  # strongest first, ties to the lower index
        inside = [i for i in reversed(order) if i in resident]  # weakest first
        outside = [i for i in order if i not in resident]  # strongest first

        n_evict = max(0, len(inside) - count)
        shrink += [Swap(key, None, i) for i in inside[:n_evict]]
        inside = inside[n_evict:]

        n_admit = max(0, count - len(inside))
        for i in outside[:n_admit]:
            ranked.append((-weight[key] * shares[i], pos, i, Swap(key, i, None)))
        outside = outside[n_admit:]

        for new, old in zip(outside, inside):
            if not row[new] > row[old] * (1.0 + hysteresis):
                break
            ranked.append((-weight[key] * (shares[new] - shares[old]), pos, new, Swap(key, new, old)))

    ranked.sort(key=lambda t: t[:3])
    if max_swaps is not None:
        ranked = ranked[: max(0, max_swaps)]
    return shrink + [t[3] for t in ranked]
