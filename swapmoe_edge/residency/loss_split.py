"""Splitting a budget between layers by measured loss curves (a profile's ``loss``, substitution.py).

``loss[layer][k - 1]`` is the cost to the model's output of keeping only k experts of that layer
under masked routing. ``plan_by_loss`` finds the per-layer counts that minimise the summed loss
within the bytes; the planner (planner.py) takes them as each layer's most copies.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from swapmoe_edge.core.keys import LayerKey


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


# The ladder's split is planned in at most this many units of its capacity: its copies' measured
# costs share no useful divisor, and byte-exact units allocated ~65 MB of tables on every plan
# (the embedded model's peaks went 10-57% over budget).
CAP_UNITS = 4096


def copies_by_loss(loss: Mapping[LayerKey, np.ndarray], lowest: Mapping[LayerKey, int],
                   capacity_bytes: int) -> dict[LayerKey, int]:
    """How many copies each layer holds by ``loss``, each at its ``lowest`` rung's cost rounded
    up to a unit of ``capacity_bytes / CAP_UNITS`` (so the split still fits)."""
    unit = max(1, int(capacity_bytes) // CAP_UNITS)
    rounded = {lk: -(-int(c) // unit) * unit for lk, c in lowest.items()}
    return plan_by_loss(loss, rounded, capacity_bytes, list(lowest))
