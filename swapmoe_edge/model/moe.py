"""Top-1 routing with expert capacity, as Hugging Face's Switch router does at inference.

Pure numpy, no ONNX Runtime: the policies only change ``allowed`` (which experts a token
may go to); the arithmetic is the same for all of them.
Shapes: B batch, T tokens, E experts, D d_model.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Routing(NamedTuple):  # a tuple, not a frozen dataclass: built for every sparse layer of every token
    probs: np.ndarray  # [B, T, E] softmax of the router logits (float32)
    first_choice: np.ndarray  # [B, T] unmasked argmax: what the full model would pick
    choice: np.ndarray  # [B, T] expert actually used (== first_choice unless masked)
    gate: np.ndarray  # [B, T] weight applied to the expert output
    keep: np.ndarray  # [B, T] bool: token is processed (False: dropped by capacity or no allowed expert)


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def pick(a: np.ndarray, index: np.ndarray) -> np.ndarray:
    """a[..., index[...]] along the last axis: a [B, T, E], index [B, T] -> [B, T].

    Plain fancy indexing; ``np.take_along_axis`` gives the same values but builds index
    grids on every call, which cost more than the rest of a one-token route together.
    """
    flat = a.reshape(-1, a.shape[-1])
    return flat[np.arange(flat.shape[0]), index.reshape(-1)].reshape(index.shape)


def route(
    logits: np.ndarray,
    capacity: int,
    allowed: np.ndarray | None = None,
    renormalize: bool = False,
) -> Routing:
    """Route each token to one expert.

    ``allowed`` ([E] bool) masks experts that are not resident: a token whose first choice
    is masked goes to its best allowed expert (SwapMoE's virtual experts). The gate is the
    unmasked probability of the expert used, or with ``renormalize`` that probability
    divided by the allowed experts' total mass.

    Capacity: HF counts, per sequence, how many tokens chose each expert so far
    (cumsum over T, padding included) and drops tokens past ``capacity``; a dropped token's
    FFN output is zero, so the residual passes it through unchanged.
    """
    if logits.size == logits.shape[-1]:
        return _route_one(logits, capacity, allowed, renormalize)
    probs = softmax(logits.astype(np.float32))  # [B, T, E]
    first = probs.argmax(axis=-1)  # [B, T]
    if allowed is None or allowed.all():
        choice = first
        gate = pick(probs, choice)
    else:
        if not allowed.any():
            raise ValueError("route(): no expert is allowed in this layer")
        masked = np.where(allowed, probs, -1.0)
        choice = masked.argmax(axis=-1)
        gate = pick(probs, choice)
        if renormalize:
            gate = gate / probs[..., allowed].sum(axis=-1)
    if probs.shape[1] == 1:  # one token a row (decoding): it is its expert's first, never over capacity
        keep = np.full(choice.shape, capacity >= 1)
    else:
        e = probs.shape[-1]
        onehot = np.eye(e, dtype=np.int64)[choice]  # [B, T, E]
        priority = np.cumsum(onehot, axis=1)  # [B, T, E]
        keep = pick(priority, choice) <= capacity
    return Routing(probs=probs, first_choice=first, choice=choice, gate=gate.astype(np.float32), keep=keep)


def _route_one(logits: np.ndarray, capacity: int, allowed: np.ndarray | None, renormalize: bool) -> Routing:
    """``route`` for a single token, with the same float32 arithmetic on its one row and about
    half the numpy calls: after each expert's weights stream through the caches, every numpy
    call here runs cold and costs ~10 us (docs/results/decode.md)."""
    row = logits.reshape(-1).astype(np.float32)  # [E]
    e = np.exp(row - row.max())
    probs = e / e.sum()
    first = choice = int(probs.argmax())
    if allowed is not None and not allowed[first]:
        if not allowed.any():
            raise ValueError("route(): no expert is allowed in this layer")
        choice = int(np.where(allowed, probs, -1.0).argmax())
    gate = probs[choice]
    if renormalize and allowed is not None and not allowed.all():
        gate = gate / probs[allowed].sum()
    shape = logits.shape[:-1]
    first_arr = np.array(first).reshape(shape)
    choice_arr = first_arr if choice == first else np.array(choice).reshape(shape)
    return Routing(probs=probs.reshape(logits.shape), first_choice=first_arr, choice=choice_arr,
                   gate=np.array(gate, dtype=np.float32).reshape(shape), keep=np.array(capacity >= 1).reshape(shape))


def dispatch(routing: Routing, normed: np.ndarray, run_expert) -> np.ndarray:
    """Gate-weighted expert outputs [B, T, D]; ``run_expert(e, x[N, D]) -> y[N, D]``."""
    if routing.choice.size == 1:  # one token (greedy decoding of one row): no gather or scatter
        if not routing.keep.flat[0]:
            return np.zeros_like(normed)
        y = run_expert(int(routing.choice.flat[0]), normed.reshape(1, -1))
        return (y * routing.gate.reshape(1, 1)).reshape(normed.shape)
    out = np.zeros_like(normed)
    flat_x = normed.reshape(-1, normed.shape[-1])  # [B*T, D]
    flat_out = out.reshape(-1, out.shape[-1])
    choice = routing.choice.reshape(-1)
    keep = routing.keep.reshape(-1)
    gate = routing.gate.reshape(-1)
    for e in np.unique(choice[keep]):
        idx = np.nonzero(keep & (choice == e))[0]
        y = run_expert(int(e), np.ascontiguousarray(flat_x[idx]))
        flat_out[idx] = y * gate[idx, None]
    return out
