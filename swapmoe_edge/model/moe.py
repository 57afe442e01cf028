"""Routing: top-1 with expert capacity (Switch), and top-k over the softmax (Mixtral, Qwen-MoE, OLMoE).

Pure numpy, no ONNX Runtime: the policies only change ``allowed`` (which experts a token
may go to) and what an absent choice gets; the arithmetic is the same for all of them.
Top-1 routings have [B, T] choices; top-k routings a trailing k axis ([B, T, k]), which
``dispatch`` sums over.
Shapes: B batch, T tokens, E experts, k choices per token, D d_model.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


ABSENT = ("substitute", "drop")  # what a top-k choice that is not allowed gets (route_topk)


class Routing(NamedTuple):  # a tuple, not a frozen dataclass: built for every sparse layer of every token
    probs: np.ndarray  # [B, T, E] softmax of the router logits (float32)
    first_choice: np.ndarray  # [B, T] (top-k: [B, T, k]) unmasked choices: what the full model would pick
    choice: np.ndarray  # like first_choice: expert actually used (== first_choice unless masked)
    gate: np.ndarray  # like first_choice: weight applied to the expert output (float32)
    keep: np.ndarray  # like first_choice, bool: processed (False: dropped by capacity or no allowed expert)


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
    absent: str = "substitute",
) -> Routing:
    """Route each token to one expert.

    ``allowed`` ([E] bool) masks experts that are not resident: a token whose first choice
    is masked goes to its best allowed expert (SwapMoE's virtual experts). The gate is the
    unmasked probability of the expert used, or with ``renormalize`` that probability
    divided by the allowed experts' total mass. ``absent="drop"``: a token whose first
    choice is masked is not processed instead (its FFN output is zero).

    Capacity: HF counts, per sequence, how many tokens chose each expert so far
    (cumsum over T, padding included) and drops tokens past ``capacity``; a dropped token's
    FFN output is zero, so the residual passes it through unchanged.
    """
    if absent != "substitute":
        return _dropping(route(logits, capacity, allowed, renormalize), absent)
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


def _dropping(r: Routing, absent: str) -> Routing:
    """``r`` with its rerouted tokens dropped (``absent="drop"`` for top-1)."""
    if absent not in ABSENT:
        raise ValueError(f"absent must be one of {', '.join(ABSENT)}, not {absent!r}")
    moved = r.choice != r.first_choice
    return r._replace(keep=r.keep & ~moved) if moved.any() else r


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest of ``probs`` [..., E] along the last axis, largest first: [..., k].

    torch.topk's order (Hugging Face's routers); among equal values the lower index comes
    first here, where torch's order is unspecified."""
    if k == 1:
        return probs.argmax(axis=-1)[..., None]
    return np.argsort(-probs, axis=-1, kind="stable")[..., :k]


def route_topk(
    logits: np.ndarray,
    k: int,
    allowed: np.ndarray | None = None,
    norm_topk_prob: bool = False,
    absent: str = "substitute",
    renormalize: bool = False,
) -> Routing:
    """Route each token to its top ``k`` experts of softmax(logits), as Hugging Face's Mixtral,
    Qwen2/3-MoE and OLMoE routers do (no capacity: no token is dropped).

    The gate of a choice is its probability, renormalised over the token's k choices with
    ``norm_topk_prob``. A choice that ``allowed`` ([E] bool) masks (not resident) is absent:
    - ``"substitute"`` (SwapMoE's masked routing, generalised): the token goes to its best
      allowed expert not already among its choices, at that expert's own probability (then
      the ``norm_topk_prob`` renormalisation over the k used). The k used are the token's
      top k allowed experts; its allowed first choices keep their slots. With ``renormalize``
      the probabilities are divided by the allowed experts' total mass first (as ``route``'s;
      no effect with ``norm_topk_prob``). With fewer than k allowed experts the slots left
      over are not kept.
    - ``"drop"``: the absent choice is dropped and the gates of the rest are scaled to the
      mass the k would have had (1 with ``norm_topk_prob``). A token none of whose choices is
      allowed goes to its best allowed expert alone, with that mass.
    Returns a Routing with [B, T, k] choices (``first_choice``: the unmasked top k, in HF's
    order; ties may order differently, see ``top_k``).
    """
    if absent not in ABSENT:
        raise ValueError(f"absent must be one of {', '.join(ABSENT)}, not {absent!r}")
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"route_topk(): k={k} choices of {num_experts} experts")
    if allowed is not None and not allowed.any():
        raise ValueError("route_topk(): no expert is allowed in this layer")
    if logits.size == num_experts:
        return _route_topk_one(logits, k, allowed, norm_topk_prob, absent, renormalize)
    return _route_topk_many(logits, k, allowed, norm_topk_prob, absent, renormalize)


def _route_topk_many(logits, k, allowed, norm_topk_prob, absent, renormalize) -> Routing:
    probs = softmax(logits.astype(np.float32))  # [B, T, E]
    first = top_k(probs, k)  # [B, T, k]
    first_p = np.take_along_axis(probs, first, axis=-1)  # [B, T, k]
    if allowed is None or allowed.all():
        choice, p, keep = first, first_p, np.ones(first.shape, dtype=bool)
    elif absent == "substitute":
        choice, keep = _substitutes(probs, first, allowed, k)
        p = np.where(keep, np.take_along_axis(probs, choice, axis=-1), np.float32(0))
        if renormalize:
            p = p / probs[..., allowed].sum(axis=-1, keepdims=True)
    else:
        choice, keep, p = _drop_absent(probs, first, first_p, allowed, norm_topk_prob)
    gate = p / p.sum(axis=-1, keepdims=True) if norm_topk_prob else p
    return Routing(probs=probs, first_choice=first, choice=choice, gate=gate.astype(np.float32), keep=keep)


def _substitutes(probs, first, allowed, k) -> tuple[np.ndarray, np.ndarray]:
    """Each token's choices with every absent one replaced by the next best allowed expert.

    An allowed first choice outranks every allowed expert outside the token's top k, so the
    allowed first choices are the top of the allowed ranking: the substitutes are the next
    ones in it, taken in order by the absent slots."""
    ok = allowed[first]  # [B, T, k]
    ranked = top_k(np.where(allowed, probs, np.float32(-1)), k)  # [B, T, k] the top k allowed
    n_ok = ok.sum(axis=-1, keepdims=True)  # [B, T, 1]
    slot = np.where(ok, 0, n_ok + np.cumsum(~ok, axis=-1) - 1)  # [B, T, k] the substitute an absent slot takes (< k)
    choice = np.where(ok, first, np.take_along_axis(ranked, slot, axis=-1))
    keep = ok | (slot < int(np.count_nonzero(allowed)))
    return choice, keep


def _route_topk_one(logits, k, allowed, norm_topk_prob, absent, renormalize) -> Routing:
    """``route_topk`` for a single token: the same float32 arithmetic on its one row (the same
    numpy reductions over the same lengths), the slots filled in Python: about half the numpy
    calls, which run cold after each expert's weights went through the caches."""
    row = logits.reshape(-1).astype(np.float32)  # [E]
    e = np.exp(row - row.max())
    probs = e / e.sum()
    first = np.argsort(-probs, kind="stable")[:k]  # [k] as top_k
    p = probs[first]
    choice, keep = first, np.ones(k, dtype=bool)
    ok = allowed[first] if allowed is not None else keep
    if not ok.all() and absent == "substitute":
        ranked = np.argsort(np.where(allowed, -probs, np.float32(1)), kind="stable")[:k].tolist()  # the top k allowed
        ch, kept, n_allowed, j = first.tolist(), ok.tolist(), int(np.count_nonzero(allowed)), int(ok.sum())
        for s in range(k):
            if not kept[s]:  # the next substitute in the allowed ranking
                ch[s], kept[s], j = ranked[j], j < n_allowed, j + 1
        choice, keep = np.array(ch), np.array(kept)
        p = np.where(keep, probs[choice], np.float32(0))
        if renormalize:
            p = p / probs[allowed].sum()
    elif not ok.all():  # drop
        choice, keep = first, ok
        p = np.where(ok, p, np.float32(0))
        if not ok.any():  # the best allowed expert alone
            best = int(np.where(allowed, probs, np.float32(-1)).argmax())
            choice, keep = first.copy(), ok.copy()
            choice[0], keep[0], p[0] = best, True, probs[best]
        if not norm_topk_prob:
            p = p * (probs[first].sum() / p.sum())
    gate = p / p.sum() if norm_topk_prob else p
    shape = (*logits.shape[:-1], k)
    return Routing(probs=probs.reshape(logits.shape), first_choice=first.reshape(shape), choice=choice.reshape(shape),
                   gate=gate.astype(np.float32).reshape(shape), keep=keep.reshape(shape))


def _drop_absent(probs, first, first_p, allowed, norm_topk_prob):
    ok = allowed[first]  # [B, T, k]
    choice, keep = first, ok
    p = np.where(ok, first_p, np.float32(0))
    none = ~ok.any(axis=-1)  # [B, T] tokens with no allowed choice: the best allowed expert alone
    if none.any():
        best = np.where(allowed, probs, np.float32(-1)).argmax(axis=-1)  # [B, T]
        choice, keep, p = choice.copy(), keep.copy(), p.copy()
        choice[none, 0], keep[none, 0] = best[none], True
        p[none, 0] = pick(probs, best)[none]
    if not norm_topk_prob:  # the k's mass over the kept (norm_topk_prob renormalises to 1 anyway)
        p = p * (first_p.sum(axis=-1, keepdims=True) / p.sum(axis=-1, keepdims=True))
    return choice, keep, p


def topk_router(k: int, norm_topk_prob: bool):
    """A family's ``route(logits, capacity, allowed=None, renormalize=False, absent=...)`` for
    top-``k`` routing without capacity (``capacity`` is ignored)."""

    def route_k(logits, capacity=None, allowed=None, renormalize=False, absent="substitute") -> Routing:
        return route_topk(logits, k, allowed, norm_topk_prob, absent, renormalize)

    return route_k


def dispatch(routing: Routing, normed: np.ndarray, run_expert) -> np.ndarray:
    """Gate-weighted expert outputs [B, T, D]; ``run_expert(e, x[N, D]) -> y[N, D]``. A top-k
    routing's k outputs are summed, expert by expert in index order (as HF's index_add_)."""
    if routing.choice.ndim == normed.ndim:  # [B, T, k]
        return _dispatch_k(routing, normed, run_expert)
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


def _dispatch_k(routing: Routing, normed: np.ndarray, run_expert) -> np.ndarray:
    out = np.zeros_like(normed)
    flat_x = normed.reshape(-1, normed.shape[-1])  # [N, D]
    flat_out = out.reshape(-1, out.shape[-1])
    n, k = flat_x.shape[0], routing.choice.shape[-1]
    choice = routing.choice.reshape(n, k)
    keep = routing.keep.reshape(n, k)
    gate = routing.gate.reshape(n, k)
    if n == 1:  # one token (decoding one row): its experts in index order, no gather or scatter
        ch, kept = choice[0].tolist(), keep[0].tolist()
        for s in sorted(range(k), key=ch.__getitem__):
            if kept[s]:
                flat_out += run_expert(ch[s], flat_x) * gate[0, s]
        return out
    flat_c = np.where(keep, choice, -1).reshape(-1)  # [N*k] each slot's expert (-1: not kept)
    order = np.argsort(flat_c, kind="stable")  # slots grouped by expert, in index order, tokens ascending
    experts = flat_c[order]
    start = int(np.searchsorted(experts, 0))
    if start == experts.size:
        return out
    bounds = np.flatnonzero(np.diff(experts[start:])) + 1
    flat_gate = gate.reshape(-1)
    for idx in np.split(order[start:], bounds):  # a token holds an expert in one slot at most
        rows = idx // k
        y = run_expert(int(flat_c[idx[0]]), np.ascontiguousarray(flat_x[rows]))
        flat_out[rows] += y * flat_gate[idx, None]
    return out
