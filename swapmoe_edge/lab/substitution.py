"""Measured substitution loss: what keeping only some experts of one layer costs the output.

Under masked routing a token whose expert is not resident goes to the best resident one,
with that expert's (small) gate. How much that changes the summary depends on the layer and
on which experts stay, and neither Eq. 1 importance nor first-choice hit rates measure it:
on the embedded model, a layer that keeps one expert does better with the largest-norm
expert than with the most important one (docs/results/streams/README.md). So measure it.

For calibration texts, the full model's greedy summaries are the targets; every candidate
resident set of one layer (all other layers exact) is run teacher-forced on them, and its
loss is the mean KL(full || masked) of the next-token distributions over the summaries'
tokens. Per layer this gives:

- ``substitute``: the single expert with the least loss (the one a one-expert layer keeps);
- ``loss[k - 1]``: the loss of keeping k experts: the substitute for k = 1, the k most
  important (the profile's order, as swapmoe starts) for k >= 2, 0 for k = E. Counts
  between measured ones (``counts``) are interpolated linearly.

Cost: one teacher-forced pass over the texts per candidate (E singles plus the counts, per
layer); the reference is computed once per batch. The runtime must be exact (``full``, or
``on-demand`` at any budget, whose misses read the experts).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.residency.planner import top_experts

LOSS_NOTE = "mean teacher-forced KL(full || masked) per summary token, over full's greedy summaries of the texts"


def default_counts(num_experts: int) -> list[int]:
    """Counts to measure: every one up to 16 experts, else 2, 3, 4, 6, 8, 12, ... (x1.5 steps)."""
    if num_experts <= 16:
        return list(range(2, num_experts))
    out, k = [], 2
    while k < num_experts:
        out.append(k)
        k = max(k + 1, int(round(k * 1.5)))
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class _Batch:
    """One batch of texts padded for a teacher-forced pass over the full model's summaries."""

    def __init__(self, ids: Sequence[Sequence[int]], outs: Sequence[Sequence[int]], start_id: int, pad_id: int):
        b, s, t = len(ids), max(map(len, ids)), max(1, max(map(len, outs)))
        self.ids = np.full((b, s), pad_id, np.int64)
        self.mask = np.zeros((b, s), np.int64)
        self.dec = np.full((b, t), pad_id, np.int64)
        self.valid = np.zeros((b, t), bool)
        for i, (row, out) in enumerate(zip(ids, outs)):
            self.ids[i, : len(row)], self.mask[i, : len(row)] = row, 1
            self.dec[i, 0] = start_id
            self.dec[i, 1: len(out)] = out[:-1]
            self.valid[i, : max(1, len(out))] = True

    def logits(self, model, hook=None) -> np.ndarray:
        """Teacher-forced logits [B, T, V] of the summaries' tokens."""
        return model.forward(self.ids, self.mask, self.dec, hook=hook)


class _PromptBatch:
    """The same for a decoder-only model: each prompt followed by its summary, left-padded, and
    the logits at the positions that predict the summary's tokens."""

    def __init__(self, ids: Sequence[Sequence[int]], outs: Sequence[Sequence[int]], pad_id: int):
        rows = [list(row) + list(out[:-1]) for row, out in zip(ids, outs)]
        b, s, t = len(rows), max(map(len, rows)), max(1, max(map(len, outs)))
        self.ids = np.full((b, s), pad_id, np.int64)
        self.mask = np.zeros((b, s), np.int64)
        self.at = np.full((b, t), s - 1, np.int64)  # position whose logits predict summary token j
        self.valid = np.zeros((b, t), bool)
        for i, (row, prompt, out) in enumerate(zip(rows, ids, outs)):
            self.ids[i, s - len(row):], self.mask[i, s - len(row):] = row, 1
            first = s - len(row) + len(prompt) - 1  # the prompt's last position predicts the first new token
            self.at[i, : len(out)] = first + np.arange(len(out))
            self.valid[i, : len(out)] = True

    def logits(self, model, hook=None) -> np.ndarray:
        full = model.forward(self.ids, self.mask, hook=hook)  # [B, S, V]
        return full[np.arange(full.shape[0])[:, None], self.at]  # [B, T, V]


def _mean_kl(rt, texts: Sequence[str], hooks: Sequence[Callable], max_new_tokens: int, batch_size: int,
             progress: Callable[[int, int], None] | None) -> np.ndarray:
    """For each MoE ``hook`` (split.MoEHook, handed the runtime's exact MoE): the mean KL(full ||
    with it) of the next-token distribution per summary token, teacher-forced on full's greedy summaries."""
    c = rt.manifest.config
    total, tokens = np.zeros(len(hooks)), 0
    n_batches = (len(texts) + batch_size - 1) // batch_size
    for bi in range(n_batches):
        chunk = list(texts[bi * batch_size: (bi + 1) * batch_size])
        ids, _ = rt.encode_measured(chunk)  # what profile_texts ran
        outs = [r.token_ids for r in rt.generate(ids, max_new_tokens=max_new_tokens)]
        b = (_PromptBatch(ids, outs, c.pad_token_id) if rt.family.kind == "decoder-only"
             else _Batch(ids, outs, c.decoder_start_token_id, c.pad_token_id))
        ref = _log_softmax(b.logits(rt.model))  # [B, T, V]
        p_ref = np.exp(ref)
        for j, hook in enumerate(hooks):
            lp = _log_softmax(b.logits(rt.model, hook))
            total[j] += float((p_ref * (ref - lp)).sum(axis=-1)[b.valid].sum())  # KL [B, T] over real tokens
        tokens += int(b.valid.sum())
        if progress is not None:
            progress(bi + 1, n_batches)
    return np.maximum(total / max(tokens, 1), 0.0)  # a KL; float rounding can dip below 0


def measure_loss(rt, texts: Sequence[str], importance: Mapping[LayerKey, np.ndarray], max_new_tokens: int = 32,
                 batch_size: int = 8, counts: Sequence[int] | None = None,
                 progress: Callable[[int, int], None] | None = None
                 ) -> tuple[dict[LayerKey, np.ndarray], dict[LayerKey, int]]:
    """(loss [E] per layer, substitute per layer) of the runtime ``rt``'s model on ``texts``.

    ``rt`` is a Runtime with an exact policy; ``importance`` orders the k >= 2 sets.
    """
    if not rt.policy.exact:
        raise ValueError(f"measuring substitution loss needs an exact policy (full or on-demand), not {rt.policy.name}")
    c = rt.manifest.config
    layers = list(rt.sparse)
    E = int(c.num_experts)
    ks = sorted({int(k) for k in (counts if counts is not None else default_counts(E)) if 2 <= int(k) < E})
    sets: list[tuple[LayerKey, str, tuple[int, ...]]] = []
    for lk in layers:
        sets += [(lk, "single", (e,)) for e in range(E)]
        sets += [(lk, "top", top_experts(importance[lk], k)) for k in ks]
    def masked(lk: LayerKey, keep: tuple[int, ...]):
        allowed = np.zeros(E, bool)
        allowed[list(keep)] = True

        def moe(layer, normed, logits, token_mask, exact):
            if layer.key != lk:
                return exact(layer, normed, logits, token_mask)
            # the engine's masked routing over ``keep``; an exact policy has (or reads) every expert
            return rt.policy.masked_over(layer, normed, logits, allowed)
        return moe

    mean = _mean_kl(rt, texts, [masked(lk, keep) for lk, _, keep in sets], max_new_tokens, batch_size, progress)
    loss, substitute = {}, {}
    for lk in layers:
        singles = np.array([mean[j] for j, (k, kind, _) in enumerate(sets) if k == lk and kind == "single"])
        sub = int(np.argmin(singles))  # ties: the lower index
        measured = {1: float(singles[sub]), E: 0.0}
        measured.update({len(keep): float(mean[j]) for j, (k, kind, keep) in enumerate(sets) if k == lk and kind == "top"})
        xs = sorted(measured)
        loss[lk] = np.interp(np.arange(1, E + 1), xs, [measured[x] for x in xs])
        substitute[lk] = sub
    return loss, substitute


RUNG_LOSS_NOTE = ("mean teacher-forced KL(full || every expert of one layer on the rung) per summary token, "
                  "over full's greedy summaries of the texts")


def measure_rung_loss(rt, texts: Sequence[str], runners: Mapping[str, object], max_new_tokens: int = 32,
                      batch_size: int = 8, progress: Callable[[int, int], None] | None = None
                      ) -> dict[LayerKey, dict[str, float]]:
    """Per layer and rung: what running every expert of that layer on the rung costs the output
    (the other layers exact), as ``measure_loss`` measures absent experts.

    ``rt`` is a Runtime with an exact policy; ``runners`` (rungs.rung_runners) run the copies.
    A copy is read the first time a token routes to it and kept for the run: at most the
    ladder's bytes.
    """
    if not rt.policy.exact:
        raise ValueError(f"measuring rung loss needs an exact policy (full or on-demand), not {rt.policy.name}")
    c = rt.manifest.config
    cases = [(rung, lk) for rung in runners for lk in rt.sparse]
    copies: dict[tuple[str, ExpertKey], object] = {}

    def run(rung: str, key: ExpertKey, x: np.ndarray) -> np.ndarray:
        if (rung, key) not in copies:
            copies[(rung, key)] = runners[rung].load(rt.store.read(key, rung=rung))
        return runners[rung].run(copies[(rung, key)], x)

    def on_rung(rung: str, lk: LayerKey):
        low = rt.family.exact_moe(lambda key, x: run(rung, key, x), c.expert_capacity)  # the family's own MoE

        def moe(layer, normed, logits, token_mask, exact):
            return (low if layer.key == lk else exact)(layer, normed, logits, token_mask)
        return moe

    mean = _mean_kl(rt, texts, [on_rung(rung, lk) for rung, lk in cases], max_new_tokens, batch_size, progress)
    out: dict[LayerKey, dict[str, float]] = {lk: {} for lk in rt.sparse}
    for j, (rung, lk) in enumerate(cases):
        out[lk][rung] = float(mean[j])
    return out
