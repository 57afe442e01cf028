"""Greedy and beam search over a step decoder, token for token the same as Hugging Face ``generate``.

The search knows nothing about ONNX Runtime or caches: a ``StepDecoder`` turns one new token per row
into next-token logits and can select/repeat its rows. Each search is a generator of ``Step``s
(``greedy_steps``, ``beam_steps``): it yields once per decoder step and the caller does the rest
(clocks, counters, background I/O), as mlx-lm's ``generate_step``; ``greedy_search`` and
``beam_search`` run one to its end. The arithmetic mirrors transformers 5.24
(``GenerationMixin._sample`` with ``do_sample=False``, and ``_beam_search`` with its helpers) in
float32, so that equal logits give equal tokens. Only exact ties between float32 scores may resolve
differently: torch's CPU ``topk`` orders them as its partial sort happens to, we keep index order.

``no_repeat_ngram_size`` follows HF's ``NoRepeatNGramLogitsProcessor``: a token that would
complete an n-gram already in the row (decoder start token included) gets -inf, on the
logits for greedy and on the log-probabilities for beam search, where HF applies it.

B batch rows, K beams, V vocabulary, C = (1 + #EOS ids) K candidates per row (at least 2K), T max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence, Union

import numpy as np

from swapmoe_edge.core.errors import InputError

# HF's "impossible" score. Like HF we *add* it as a penalty (never assign it), so that scores
# that are already penalised keep their float32 rounding and order.
NEG = np.float32(-1.0e9)


class StepDecoder(Protocol):
    def step(self, state: object, next_ids: np.ndarray) -> tuple[np.ndarray, object]:
        """next_ids [N] int64 -> logits [N, V] for the next position, and the state grown by one token."""
        ...

    def reorder(self, state: object, index: np.ndarray) -> object:
        """Return the state with its rows selected/repeated by index [N']."""
        ...


OnToken = Callable[[int], None]
EosIds = Union[int, Sequence[int]]  # one EOS id, or several (any of them ends a row, as HF's list)


@dataclass(frozen=True)
class Decoding:
    """How one request decodes: the search and its settings.

    ``forced`` [B, >= max_new_tokens] (greedy only): tokens fed instead of the model's choices.
    """

    max_new_tokens: int
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    forced: np.ndarray | None = None


@dataclass(frozen=True)
class Step:
    """One decoder step, yielded once its tokens are chosen.

    ``tokens``: greedy [B] the token each row took (pad for rows already finished); beam [B*K]
    the tokens the live beams go on with. ``sequences``: on the last step only, the outputs.
    """

    index: int
    tokens: np.ndarray
    sequences: list[list[int]] | None = None


def last_step(steps: Iterator[Step], on_token: OnToken | None = None) -> list[list[int]]:
    """Run a search to its end (``on_token(step)`` after each step) and return its sequences."""
    step = None
    for step in steps:
        if on_token is not None:
            on_token(step.index)
    assert step is not None and step.sequences is not None, "a search ends with its sequences"
    return step.sequences


def ban_repeated_ngrams(seqs: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """-inf in ``scores`` [N, V] for each token that would repeat an n-gram of its row of ``seqs`` [N, L]."""
    if n <= 0 or seqs.shape[1] < n:
        return scores
    scores = scores.copy()
    length = seqs.shape[1]
    for r, row in enumerate(seqs):
        prefix = row[length + 1 - n:]  # the last n-1 tokens
        windows = np.lib.stride_tricks.sliding_window_view(row, n)  # [L-n+1, n]
        hits = (windows[:, :-1] == prefix).all(axis=1)
        banned = windows[hits, -1]
        scores[r, banned[banned < scores.shape[1]]] = -np.inf
    return scores


def greedy_search(
    decoder: StepDecoder, state: object, batch: int, *, start_id: int, eos_id: EosIds, pad_id: int,
    max_new_tokens: int, on_token: OnToken | None = None, no_repeat_ngram_size: int = 0,
    forced: np.ndarray | None = None,
) -> list[list[int]]:
    """Greedy decoding as HF ``generate(do_sample=False, num_beams=1)``: each row's tokens, EOS included.

    ``on_token(step)`` runs after each step (``greedy_steps`` yields the steps themselves).
    """
    return last_step(greedy_steps(decoder, state, batch, start_id=start_id, eos_id=eos_id, pad_id=pad_id,
                                  max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size,
                                  forced=forced), on_token)


def greedy_steps(
    decoder: StepDecoder, state: object, batch: int, *, start_id: int, eos_id: EosIds, pad_id: int,
    max_new_tokens: int, no_repeat_ngram_size: int = 0, forced: np.ndarray | None = None,
) -> Iterator[Step]:
    """Greedy decoding, one ``Step`` a decoder step; the last carries each row's tokens, EOS included.

    ``forced`` [B, >= max_new_tokens]: feed these tokens instead of the argmax (teacher
    forcing). Benchmarks on random-weight models use it so that decode routing varies as it
    does on real text; the logits are still computed, so the work per token is the same.
    """
    _check_common(batch, max_new_tokens)
    if forced is not None and (forced.ndim != 2 or forced.shape[0] != batch or forced.shape[1] < max_new_tokens):
        raise InputError(f"forced decoder ids must be [{batch}, >= {max_new_tokens}], got {forced.shape}")
    return _greedy(decoder, state, batch, start_id, eos_id, pad_id, max_new_tokens, no_repeat_ngram_size, forced)


def eos_array(eos_id: EosIds) -> np.ndarray:
    """One EOS id or several (HF's ``generation_config.eos_token_id`` list: any of them ends a row) as int64 [n]."""
    ids = np.asarray(list(eos_id) if isinstance(eos_id, (list, tuple)) else [eos_id], dtype=np.int64)
    if ids.ndim != 1:
        raise InputError(f"eos ids must be one id or a flat list of ids, got {eos_id!r}")
    return ids


def _greedy(decoder, state, batch, start_id, eos_id, pad_id, max_new_tokens, no_repeat_ngram_size, forced):
    eos = eos_array(eos_id)
    out: list[list[int]] = [[] for _ in range(batch)]
    unfinished = np.ones(batch, dtype=bool)  # [B]
    next_ids = np.full(batch, start_id, dtype=np.int64)  # [B]
    history = np.full((batch, 1), start_id, dtype=np.int64)  # [B, t+1]: HF's input_ids, pad after EOS
    for t in range(max_new_tokens):
        logits, state = decoder.step(state, next_ids)  # [B, V]
        logits = np.asarray(logits, dtype=np.float32)
        assert logits.ndim == 2 and logits.shape[0] == batch, logits.shape
        logits = ban_repeated_ngrams(history, logits, no_repeat_ngram_size)
        # Finished rows are fed pad, as HF does; their output is frozen.
        chosen = logits.argmax(-1) if forced is None else forced[:, t]  # [B]
        tokens = np.where(unfinished, chosen, pad_id).astype(np.int64)  # [B]
        for row in np.flatnonzero(unfinished):
            out[row].append(int(tokens[row]))
        unfinished &= ~np.isin(tokens, eos)
        if not unfinished.any() or t == max_new_tokens - 1:
            yield Step(t, tokens, out)
            return
        yield Step(t, tokens)
        next_ids = tokens
        history = np.concatenate([history, tokens[:, None]], axis=1)


def beam_search(
    decoder: StepDecoder, state: object, batch: int, *, num_beams: int, start_id: int, eos_id: EosIds,
    pad_id: int, max_new_tokens: int, length_penalty: float = 1.0, early_stopping: bool | str = False,
    num_return_sequences: int = 1, on_token: OnToken | None = None, no_repeat_ngram_size: int = 0,
) -> list[list[int]]:
    """Beam search as HF ``generate(do_sample=False, num_beams=K)``; see ``beam_steps``.

    ``on_token(step)`` runs after each step.
    """
    return last_step(beam_steps(decoder, state, batch, num_beams=num_beams, start_id=start_id, eos_id=eos_id,
                                pad_id=pad_id, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                                no_repeat_ngram_size=no_repeat_ngram_size), on_token)


def beam_steps(
    decoder: StepDecoder, state: object, batch: int, *, num_beams: int, start_id: int, eos_id: EosIds,
    pad_id: int, max_new_tokens: int, length_penalty: float = 1.0, early_stopping: bool | str = False,
    num_return_sequences: int = 1, no_repeat_ngram_size: int = 0,
) -> Iterator[Step]:
    """Beam search as HF ``generate(do_sample=False, num_beams=K)``, one ``Step`` a decoder step.

    The last step carries ``batch * num_return_sequences`` token lists (row-major, best first within a row, as in
    HF's ``sequences``), each without the start token and without padding; finished ones end with EOS.
    ``early_stopping`` is True, False or "never", with HF's meaning. ``pad_id`` is unused: live beams
    never contain EOS, so no row is ever fed pad (kept for symmetry with ``greedy_search``).
    """
    _check_common(batch, max_new_tokens)
    if num_beams < 2:
        raise InputError(f"beam_search needs num_beams >= 2, got {num_beams}; use greedy_search for 1 beam.")
    if not 1 <= num_return_sequences <= num_beams:
        raise InputError(
            f"num_return_sequences must be between 1 and num_beams={num_beams}, got {num_return_sequences}."
        )
    if early_stopping not in (True, False, "never"):
        raise InputError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")
    return _beam(decoder, state, batch, num_beams, start_id, eos_id, max_new_tokens, length_penalty, early_stopping,
                 num_return_sequences, no_repeat_ngram_size)


def _beam(decoder, state, batch, num_beams, start_id, eos_id, max_new_tokens, length_penalty, early_stopping,
          num_return_sequences, no_repeat_ngram_size):
    B, K, T = batch, num_beams, max_new_tokens
    eos = eos_array(eos_id)
    C = max(2, 1 + eos.size) * K  # HF keeps (1 + #EOS ids) * K candidates so that K live beams survive even if K end now
    rows = np.arange(B)[:, None]  # [B, 1] for fancy indexing along the beam axis

    live_seqs = np.full((B, K, T), -1, dtype=np.int64)  # tokens of the live beams, -1 = not yet
    live_scores = np.zeros((B, K), dtype=np.float32)  # summed log probs
    live_scores[:, 1:] = NEG  # all beams start equal: only beam 0 may expand at the first step
    done_seqs = np.full((B, K, T), -1, dtype=np.int64)  # best finished hypotheses, best first
    done_scores = np.full((B, K), NEG, dtype=np.float32)  # length-normalised
    done_real = np.zeros((B, K), dtype=bool)  # HF's is_sent_finished
    improvable = np.ones((B, 1), dtype=bool)  # HF's is_early_stop_heuristic_unsatisfied (sticky)

    state = decoder.reorder(state, np.repeat(np.arange(B), K))
    next_ids = np.full(B * K, start_id, dtype=np.int64)  # [B*K]
    for t in range(T):
        logits, state = decoder.step(state, next_ids)  # [B*K, V]
        logits = np.asarray(logits, dtype=np.float32)
        assert logits.ndim == 2 and logits.shape[0] == B * K, logits.shape
        V = logits.shape[1]
        if K > V:
            raise InputError(f"num_beams={K} exceeds the vocabulary size {V}; use at most {V} beams.")
        log_probs = _log_softmax(logits)  # [B*K, V]
        if no_repeat_ngram_size:
            history = np.concatenate([np.full((B * K, 1), start_id, dtype=np.int64),
                                      live_seqs[:, :, :t].reshape(B * K, t)], axis=1)  # HF's running sequences
            log_probs = ban_repeated_ngrams(history, log_probs, no_repeat_ngram_size)
        scores = log_probs.reshape(B, K, V) + live_scores[:, :, None]  # [B, K, V]

        # The best C continuations over all beams of a row.
        cand_scores, flat = _topk(scores.reshape(B, K * V), C)  # [B, C]
        cand_beam, cand_tok = np.divmod(flat, V)  # [B, C]
        cand_seqs = live_seqs[rows, cand_beam]  # [B, C, T] (a copy)
        cand_seqs[:, :, t] = cand_tok
        ends = np.isin(cand_tok, eos) | (t == T - 1)  # [B, C] EOS or max length: HF's stopping criteria

        # Live beams for the next step: the best K candidates that did not end.
        live_cand = cand_scores + _penalty(ends)  # [B, C]
        keep = _topk(live_cand, K)[1]  # [B, K]
        live_seqs, live_scores = cand_seqs[rows, keep], live_cand[rows, keep]  # [B, K, T], [B, K]
        live_beam = cand_beam[rows, keep]  # [B, K] the beam each live one grew from

        # Finished hypotheses: only the top K candidates may enter, scored by sum / length**penalty with
        # the start token not counted (HF's cur_len + 1 - decoder_prompt_len); none once the row cannot
        # improve, nor, with early_stopping=True, once it holds K.
        just_done = ends.copy()
        just_done[:, K:] = False
        final = cand_scores / np.float32((t + 1) ** length_penalty)  # [B, C]
        final = final + _penalty(done_real.all(-1, keepdims=True) & (early_stopping is True))
        final = final + _penalty(~improvable)
        final = final + _penalty(~just_done)
        merged = np.concatenate([done_scores, final], axis=1)  # [B, K + C]
        best = _topk(merged, K)[1]  # [B, K]
        done_seqs = np.concatenate([done_seqs, cand_seqs], axis=1)[rows, best]
        done_scores = merged[rows, best]
        done_real = np.concatenate([done_real, just_done], axis=1)[rows, best]

        # HF's stop rule: no row can improve, or (early_stopping=True) every row holds K hypotheses,
        # or every candidate ended (max length).
        improvable &= _can_improve(live_scores, done_scores, done_real, t + 1, T, length_penalty,
                                   early_stopping)
        next_ids = live_seqs[:, :, t].reshape(-1)  # [B*K]
        if not improvable.any() or (early_stopping is True and done_real.all()) or ends.all() or t == T - 1:
            chosen = done_seqs[:, :num_return_sequences].reshape(B * num_return_sequences, T)
            yield Step(t, next_ids, [[int(tok) for tok in seq if tok >= 0] for seq in chosen])
            return
        yield Step(t, next_ids)
        state = decoder.reorder(state, (live_beam + rows * K).reshape(-1))


def _can_improve(live_scores, done_scores, done_real, generated, max_new_tokens, length_penalty,
                 early_stopping):
    """HF's _check_early_stop_heuristic: can the best live beam still beat the worst finished one? [B, 1]"""
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = max_new_tokens  # a positive penalty favours the longest possible hypothesis
    else:
        best_length = generated
    best_live = live_scores[:, :1] / np.float32(best_length**length_penalty)  # [B, 1]
    worst_done = np.where(done_real, done_scores.min(axis=1, keepdims=True), NEG)  # [B, K]
    return (best_live > worst_done).any(axis=-1, keepdims=True)


def _penalty(mask: np.ndarray) -> np.ndarray:
    """HF's ``mask.to(float32) * -1e9``: NEG where mask, -0.0 elsewhere."""
    return mask.astype(np.float32) * NEG


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """float32 log_softmax over the last axis, in torch's CPU order: (x - max) - log(sum(exp(x - max)))."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float32))


def _topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """torch.topk along the last axis of a 2-D array: values best first, ties in index order."""
    n = x.shape[1]
    index = np.empty((x.shape[0], k), dtype=np.int64)
    for r, row in enumerate(x):
        # A cheap partition finds the k-th value; everything at least as good (ties too) is sorted.
        kth = np.partition(row, n - k)[n - k]
        pool = np.flatnonzero(row >= kth)
        index[r] = pool[np.argsort(-row[pool], kind="stable")[:k]]
    return np.take_along_axis(x, index, axis=1), index


def _check_common(batch: int, max_new_tokens: int) -> None:
    if batch < 1:
        raise InputError(f"batch must be at least 1, got {batch}.")
    if max_new_tokens < 1:
        # HF generate raises for max_new_tokens=0 too; an empty answer would hide a wrong setting.
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
