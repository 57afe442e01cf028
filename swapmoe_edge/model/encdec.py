"""The encoder-decoder generation loop: pad the batch, encode it once, decode token by token.

A family whose model has ``encode``, ``start_decoder`` and ``decode`` (with a decoder state
that ``reorder`` selects rows of) generates through ``steps``. It is a generator of the
search's ``Step``s: the caller clocks the tokens, opens background I/O after the first one and
counts what it needs, and none of that is in here.
Shapes: B batch rows, S source tokens (padded), N = B x beams decoder rows, V vocabulary.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import numpy as np

from swapmoe_edge.model.generate import Decoding, Step, beam_steps, greedy_steps
from swapmoe_edge.model.split import MoEHook


class EncoderDecoder(Protocol):
    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, capture=None,
               hook: MoEHook | None = None) -> np.ndarray: ...

    def start_decoder(self, encoder_out: np.ndarray, attention_mask: np.ndarray): ...

    def decode(self, ids: np.ndarray, state, capture=None, hook: MoEHook | None = None) -> tuple[np.ndarray, object]: ...


class StepDecoder:
    """The model's decoder as the searches' step/reorder protocol (generate.StepDecoder)."""

    def __init__(self, model: EncoderDecoder, hook: MoEHook | None = None):
        self.model = model
        self.hook = hook

    def step(self, state, next_ids: np.ndarray):
        logits, state = self.model.decode(next_ids.reshape(-1, 1), state, hook=self.hook)  # [N, 1, V]
        return logits[:, -1, :], state

    def reorder(self, state, index: np.ndarray):
        return state.reorder(index)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id rows -> ids and attention mask [B, S], padded on the right."""
    b, s = len(rows), max(len(r) for r in rows)
    ids = np.full((b, s), pad_id, dtype=np.int64)
    mask = np.zeros((b, s), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def steps(model: EncoderDecoder, rows: Sequence[Sequence[int]], decoding: Decoding, *, start_id: int, eos_id: int,
          pad_id: int, hook: MoEHook | None = None) -> Iterator[Step]:
    """Generate for ``rows``: the encoder pass, then one ``Step`` per decoder step (greedy or beam)."""
    ids, mask = pad_rows(rows, pad_id)  # [B, S]
    state = model.start_decoder(model.encode(ids, mask, hook=hook), mask)
    common = dict(start_id=start_id, eos_id=eos_id, pad_id=pad_id, max_new_tokens=decoding.max_new_tokens,
                  no_repeat_ngram_size=decoding.no_repeat_ngram_size)
    if decoding.num_beams > 1:
        yield from beam_steps(StepDecoder(model, hook), state, len(rows), num_beams=decoding.num_beams, **common)
    else:
        yield from greedy_steps(StepDecoder(model, hook), state, len(rows), forced=decoding.forced, **common)
