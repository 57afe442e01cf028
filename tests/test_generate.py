"""Greedy and beam search give, token for token, what Hugging Face ``generate`` gives.

The reference decoder below drives the tiny torch model through HF's own KV cache, one token per
call, exactly as ``generate`` does, so both sides see bitwise-equal logits and any difference is
the search's. (Re-running the whole prefix each step would be simpler but differs by ~1e-6 in the
logits, enough to flip a near-tie in beam search.)
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from swapmoe_edge.core.errors import InputError
from swapmoe_edge.model.generate import _log_softmax, _topk, beam_search, greedy_search

torch = pytest.importorskip("torch")
from transformers.modeling_outputs import (  # noqa: E402
    MoEModelOutputWithPastAndCrossAttentions as EncoderOutput,
)

from tiny import tiny_model  # noqa: E402

START, PAD = 0, 0  # tiny models' decoder_start_token_id and pad_token_id
MAX_NEW = 12


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls on busy shared cores: torch's thread pool made these tests ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TorchStepDecoder:
    """StepDecoder over a HF Switch model; state = (encoder hidden [N, S, D], mask [N, S], HF cache)."""

    def __init__(self, model):
        self.model = model
        self.fed: list[np.ndarray] = []  # next_ids of every step, to check what finished rows get

    @torch.no_grad()
    def start(self, input_ids, attention_mask):
        encoder = self.model.get_encoder()
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, attention_mask, None

    @torch.no_grad()
    def step(self, state, next_ids):
        hidden, mask, cache = state
        self.fed.append(next_ids.copy())
        out = self.model(
            encoder_outputs=EncoderOutput(last_hidden_state=hidden), attention_mask=mask,
            decoder_input_ids=torch.from_numpy(next_ids)[:, None], cache=cache, use_cache=True,
        )
        return out.logits[:, -1].float().numpy(), (hidden, mask, out.cache)

    def reorder(self, state, index):
        hidden, mask, cache = state
        index = torch.from_numpy(np.asarray(index, dtype=np.int64))
        if cache is not None:
            cache.reorder_cache(index)  # in place, as generate does
        return hidden[index], mask[index], cache


@functools.lru_cache(maxsize=None)
def model_and_inputs(seed: int, batch: int, eos_bias: float):
    """A tiny model, a padded batch, and an EOS id the model really emits.

    EOS is row 0's third greedy token; ``eos_bias`` is then added to its logit (through an lm_head
    bias) so that beams end at many different steps and the finished-hypothesis logic has work to do.
    """
    model = tiny_model(seed, tie_word_embeddings=False)  # untied: a tied head mostly repeats its input
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 96, (batch, 7), generator=gen)
    for row in range(1, batch):
        ids[row, 7 - 2 * row :] = PAD  # rows of different lengths
    mask = (ids != PAD).long()
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    eos = int(plain[0, 3])
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = eos_bias
    model.lm_head.bias = torch.nn.Parameter(bias)
    return model, ids, mask, eos


def hf_outputs(model, ids, mask, eos, **kwargs) -> list[list[int]]:
    seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=eos, **kwargs)
    out = []
    for row in seqs.tolist():
        assert row[0] == START
        row = row[1:]
        out.append(row[: row.index(eos) + 1] if eos in row else row)  # drop the fill after EOS
    return out


@functools.lru_cache(maxsize=None)
def compare(case, num_beams, max_new_tokens, early_stopping=False, length_penalty=1.0, num_return=1, ngram=0):
    """(ours, HF's, decoder steps we ran, eos) for one case; cached so the coverage test can reuse it."""
    model, ids, mask, eos = model_and_inputs(*case)
    batch = ids.shape[0]
    decoder = TorchStepDecoder(model)
    steps = []
    common = dict(start_id=START, eos_id=eos, pad_id=PAD, max_new_tokens=max_new_tokens,
                  on_token=steps.append, no_repeat_ngram_size=ngram)
    if num_beams == 1:
        ours = greedy_search(decoder, decoder.start(ids, mask), batch, **common)
    else:
        ours = beam_search(
            decoder, decoder.start(ids, mask), batch, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=early_stopping, num_return_sequences=num_return, **common,
        )
    hf_steps = []
    hook = model.decoder.register_forward_hook(lambda *_: hf_steps.append(1))
    try:
        theirs = hf_outputs(
            model, ids, mask, eos, max_new_tokens=max_new_tokens, num_beams=num_beams,
            early_stopping=early_stopping, length_penalty=length_penalty, num_return_sequences=num_return,
            no_repeat_ngram_size=ngram,
        )
    finally:
        hook.remove()
    assert steps == list(range(len(hf_steps)))  # as many decoder steps as HF, on_token once per step
    return ours, theirs, len(steps), eos


# (seed, batch, eos_bias)
CASES = [(0, 1, 0.0), (1, 2, 6.0), (2, 3, 5.0), (3, 3, 6.0), (4, 2, 4.0), (5, 3, 0.0)]
BEAM_CASES = [
    (case, k, n, es) for case in CASES for k in (2, 4) for n in (1, MAX_NEW) for es in (False, True)
]


@pytest.mark.parametrize("max_new_tokens", [1, MAX_NEW])
@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_hf_generate(case, max_new_tokens):
    ours, theirs, _, eos = compare(case, 1, max_new_tokens)
    assert ours == theirs
    if max_new_tokens == MAX_NEW:
        assert ours[0][-1] == eos  # the chosen EOS really ends row 0


@pytest.mark.parametrize("case,num_beams,max_new_tokens,early_stopping", BEAM_CASES)
def test_beam_search_matches_hf_generate(case, num_beams, max_new_tokens, early_stopping):
    ours, theirs, _, _ = compare(case, num_beams, max_new_tokens, early_stopping)
    assert ours == theirs


@pytest.mark.parametrize(
    "num_beams,length_penalty,early_stopping,num_return",
    [(4, 0.6, False, 1), (4, 2.0, False, 2), (4, 1.0, True, 2), (4, 2.0, True, 1), (4, -1.0, True, 1),
     (4, 1.5, "never", 3), (2, 1.5, "never", 1), (4, 0.0, "never", 4)],
)
# (4, 3, 3.0): with early_stopping=True a full row keeps meeting better EOS candidates that HF refuses.
@pytest.mark.parametrize("case", [CASES[2], CASES[3], (4, 3, 3.0)])
def test_beam_search_options_match_hf_generate(case, num_beams, length_penalty, early_stopping, num_return):
    ours, theirs, _, _ = compare(case, num_beams, MAX_NEW, early_stopping, length_penalty, num_return)
    assert len(ours) == case[1] * num_return
    assert ours == theirs


NGRAM_CASES = [(case, k, n) for case in (CASES[0], CASES[2], CASES[5]) for k in (1, 3) for n in (1, 2, 3)]


@pytest.mark.parametrize("case,num_beams,ngram", NGRAM_CASES)
def test_no_repeat_ngram_size_matches_hf_generate(case, num_beams, ngram):
    ours, theirs, _, _ = compare(case, num_beams, MAX_NEW, ngram=ngram)
    assert ours == theirs


def test_no_repeat_ngram_comparisons_really_ban_something():
    changed = sum(compare(case, k, MAX_NEW, ngram=n)[0] != compare(case, k, MAX_NEW)[0] for case, k, n in NGRAM_CASES)
    assert changed >= len(NGRAM_CASES) // 2  # most cases would repeat an n-gram without the ban


def test_ban_repeated_ngrams_bans_what_would_complete_a_seen_ngram():
    from swapmoe_edge.model.generate import ban_repeated_ngrams

    seqs = np.array([[0, 5, 6, 7, 5, 6], [0, 1, 2, 3, 4, 5]])
    out = ban_repeated_ngrams(seqs, np.zeros((2, 10), dtype=np.float32), 3)
    assert np.flatnonzero(np.isinf(out[0])).tolist() == [7]  # "5 6" was followed by 7
    assert not np.isinf(out[1]).any()
    assert ban_repeated_ngrams(seqs[:, :2], out, 3) is out  # shorter than n: nothing to ban


def test_hf_comparisons_exercise_eos_max_length_and_early_stop():
    """Not vacuous: beams end by EOS at many lengths, others at the limit; searches stop early both ways."""
    results = {(case, k, es): compare(case, k, MAX_NEW, es) for case, k, n, es in BEAM_CASES if n == MAX_NEW}
    hyps = [(h, eos) for ours, _, _, eos in results.values() for h in ours]
    assert len({len(h) for h, eos in hyps if h[-1] == eos and len(h) < MAX_NEW}) >= 5
    assert sum(len(h) == MAX_NEW and h[-1] != eos for h, eos in hyps) >= 5
    steps = {key: result[2] for key, result in results.items()}
    assert any(n < MAX_NEW for (_, _, es), n in steps.items() if es is True)  # all rows hold K hypotheses
    assert any(n < MAX_NEW for (_, _, es), n in steps.items() if es is False)  # no row can improve


def test_greedy_feeds_pad_to_finished_rows():
    ours, _, steps, eos = compare(CASES[2], 1, MAX_NEW)
    model, ids, mask, _ = model_and_inputs(*CASES[2])
    decoder = TorchStepDecoder(model)
    state = decoder.start(ids, mask)
    greedy_search(decoder, state, 3, start_id=START, eos_id=eos, pad_id=77, max_new_tokens=MAX_NEW)
    fed = np.stack(decoder.fed)  # [steps, B]
    assert (fed[0] == START).all()
    assert any(toks[-1] == eos and len(toks) < steps for toks in ours)
    for row, toks in enumerate(ours):
        assert fed[1 : len(toks) + 1, row].tolist() == toks[: steps - 1]  # each token is fed back
        assert (fed[len(toks) + 1 :, row] == 77).all()  # then pad, once the row has ended


# --- the search on its own, with scripted logits instead of a model ---


class ScriptedDecoder:
    """Logits from a fixed table [steps, N, V]; the state counts steps and reorders are recorded."""

    def __init__(self, table):
        self.table = np.asarray(table, dtype=np.float32)
        self.reorders: list[list[int]] = []

    def step(self, state, next_ids):
        return self.table[state], state + 1

    def reorder(self, state, index):
        self.reorders.append(list(index))
        return state


def test_greedy_stops_when_all_rows_finished_and_freezes_them():
    V = 5
    table = np.zeros((4, 2, V))
    table[0, 0, 1] = table[0, 1, 3] = 1  # row 0: EOS (=1) at once; row 1: token 3
    table[1, :, 1] = 1  # row 1 ends at step 1; row 0's logits are ignored
    ticks = []
    out = greedy_search(ScriptedDecoder(table), 0, 2, start_id=0, eos_id=1, pad_id=0, max_new_tokens=4,
                        on_token=ticks.append)
    assert out == [[1], [3, 1]]
    assert ticks == [0, 1]


def test_max_new_tokens_zero_is_an_input_error():
    for search, extra in ((greedy_search, {}), (beam_search, {"num_beams": 2})):
        with pytest.raises(InputError, match="max_new_tokens must be at least 1, got 0"):
            search(ScriptedDecoder(np.zeros((1, 2, 4))), 0, 1, start_id=0, eos_id=1, pad_id=0,
                   max_new_tokens=0, **extra)


def test_more_beams_than_vocabulary_is_an_input_error():
    with pytest.raises(InputError, match="num_beams=5 exceeds the vocabulary size 4"):
        beam_search(ScriptedDecoder(np.zeros((1, 5, 4))), 0, 1, num_beams=5, start_id=0, eos_id=1, pad_id=0,
                    max_new_tokens=1)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"num_beams": 1}, "use greedy_search"), ({"num_beams": 2, "num_return_sequences": 3}, "between 1 and"),
     ({"num_beams": 2, "early_stopping": "sometimes"}, "early_stopping")],
)
def test_bad_beam_options_are_input_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        beam_search(ScriptedDecoder(np.zeros((1, 2, 4))), 0, 1, start_id=0, eos_id=1, pad_id=0,
                    max_new_tokens=1, **kwargs)


def test_beam_search_expands_rows_then_reorders_by_flat_beam_index():
    decoder = ScriptedDecoder(np.random.default_rng(0).standard_normal((3, 4, 6)))
    beam_search(decoder, 0, 2, num_beams=2, start_id=0, eos_id=99, pad_id=0, max_new_tokens=3)
    assert decoder.reorders[0] == [0, 0, 1, 1]
    assert len(decoder.reorders) == 3  # none after the last step
    for index in decoder.reorders[1:]:
        assert all(i // 2 == row for row, i in zip([0, 0, 1, 1], index))  # beams stay in their batch row


def test_topk_agrees_with_torch_and_orders_ties_by_index():
    x = np.random.default_rng(1).standard_normal((3, 500)).astype(np.float32)
    values, index = _topk(x, 8)
    t_values, t_index = torch.topk(torch.from_numpy(x), 8)
    assert np.array_equal(values, t_values.numpy()) and np.array_equal(index, t_index.numpy())
    ties = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, -1e9, -1e9]], dtype=np.float32)
    assert _topk(ties, 5)[1].tolist() == [[1, 2, 4, 3, 0]]


def test_log_softmax_is_within_an_ulp_of_torch():
    x = (np.random.default_rng(2).standard_normal((16, 96)) * 4).astype(np.float32)
    expected = torch.log_softmax(torch.from_numpy(x), -1).numpy()
    np.testing.assert_allclose(_log_softmax(x), expected, rtol=0, atol=4e-6)
