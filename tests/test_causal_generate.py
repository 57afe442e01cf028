"""Generation with decoder-only top-k MoE artifacts: tokens equal to Hugging Face ``generate``
(greedy, alone and in a left-padded batch; beam search), the routing and the masks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from swapmoe_edge.model.causal import attention_bias, pad_left, position_ids  # noqa: E402
from swapmoe_edge.model.moe import dispatch, route_topk  # noqa: E402
from swapmoe_edge.model.generate import Decoding, last_step  # noqa: E402
from swapmoe_edge.model.split import NEG  # noqa: E402
from swapmoe_edge.core.errors import InputError  # noqa: E402
from swapmoe_edge.runtime.config import RuntimeConfig  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime  # noqa: E402
from swapmoe_edge.runtime.requests import generation_beams, generation_settings  # noqa: E402
from swapmoe_edge.runtime.load import load_model  # noqa: E402
from swapmoe_export.causal_export import export_causal  # noqa: E402

import causal_tiny as ct  # noqa: E402

NEW = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (HF model, the artifact's ModelParts without a budget)."""
    root = tmp_path_factory.mktemp("causal-gen")
    out = {}
    for fam in ct.FAMILIES:
        model = ct.build(fam, seed=3)
        art = export_causal(ct.save(model, root / f"ck-{fam}"), root / f"art-{fam}", quiet=True, validate=False)
        out[fam] = (model, load_model(art, RuntimeConfig(policy="full", verify="never")))
    return out


def _generate(parts, rows, **kw):
    return last_step(parts.family.generate(parts.model, rows, Decoding(max_new_tokens=NEW, **kw)))


@pytest.mark.parametrize("family", list(ct.FAMILIES))
def test_greedy_tokens_equal_hf_generate_alone_and_in_a_left_padded_batch(models, family):
    model, parts = models[family]
    rows = ct.prompts()
    assert len({len(r) for r in rows}) == len(rows)  # the batch is padded
    alone = [ct.hf_greedy(model, [r], NEW)[0] for r in rows]
    assert [_generate(parts, [r])[0] for r in rows] == alone
    assert _generate(parts, rows) == ct.hf_greedy(model, rows, NEW)


@pytest.mark.parametrize("family", list(ct.FAMILIES))
def test_logits_of_a_left_padded_batch_match_hf_forward(models, family):
    model, parts = models[family]
    ids, mask = pad_left(ct.prompts(), ct.PAD)
    got = parts.model.forward(ids, mask)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(position_ids(mask, ids.shape[1]))).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(got[real] - ref[real]).max() < 1e-4


def test_beam_search_equals_hf_generate(models):
    model, parts = models["mixtral"]
    rows = ct.prompts(n=2)
    s = max(len(r) for r in rows)
    ids, mask = pad_left(rows, ct.PAD)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW,
                             do_sample=False, num_beams=3, pad_token_id=ct.PAD, eos_token_id=ct.EOS)
    ref = [row[: row.index(ct.EOS) + 1] if ct.EOS in row else row for row in out[:, s:].tolist()]
    assert _generate(parts, rows, num_beams=3) == ref


def test_beam_search_runs_each_prompt_once_and_the_head_on_its_last_position(models):
    """Beam search picks K copies of each row before the prompt runs: the prompt runs once a row,
    the LM head on its last position only, and the K rows of cache and logits come from that run."""
    _, parts = models["mixtral"]
    model = parts.model
    ids, mask = pad_left(ct.prompts(n=2), ct.PAD)
    seen = []
    run = model.sessions.run

    def spy(name, feeds):
        seen.append((name, {k: v.shape for k, v in feeds.items()}))
        return run(name, feeds)

    state = model.start(ids, mask).reorder(np.repeat(np.arange(2), 3))
    assert state.prompt.shape[0] == 2 and list(state.rows) == [0, 0, 0, 1, 1, 1]
    model.sessions.run = spy
    try:
        logits, state = model.step(state, None)
    finally:
        model.sessions.run = run
    assert {shape["input_ids"][0] for name, shape in seen if name == "embed"} == {2}  # each prompt row once
    assert [shape["hidden"] for name, shape in seen if name == "lm_head"] == [(2, 1, model.cfg.hidden_size)]
    assert logits.shape[0] == 6 and state.past_key[0].shape[0] == 6 and state.prompt is None
    full = model.forward(ids, mask)[:, -1]
    np.testing.assert_allclose(logits, full[[0, 0, 0, 1, 1, 1]], rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_a_row_that_ends_is_fed_pad_and_stops(models):
    model, parts = models["olmoe"]
    rows = ct.prompts()
    forced = np.full((len(rows), NEW), 7, dtype=np.int64)
    forced[1, 2] = ct.EOS
    got = _generate(parts, rows, forced=forced)
    assert got[1] == [7, 7, ct.EOS] and got[0] == [7] * NEW


def test_route_topk_follows_hf_order_and_renormalises():
    logits = np.array([[[0.1, 2.0, 1.0, -1.0]]], dtype=np.float32)
    r = route_topk(logits, 2, norm_topk_prob=False)
    assert r.first_choice.tolist() == [[[1, 2]]] and r.choice.tolist() == [[[1, 2]]]
    np.testing.assert_allclose(r.gate[0, 0], r.probs[0, 0, [1, 2]])
    r = route_topk(logits, 2, norm_topk_prob=True)
    np.testing.assert_allclose(r.gate.sum(-1), 1.0, rtol=1e-6)


def test_an_absent_choice_goes_to_the_best_allowed_expert_not_already_chosen():
    logits = np.array([[[0.1, 2.0, 1.0, -1.0], [3.0, 2.0, 1.0, 0.0]]], dtype=np.float32)
    allowed = np.array([True, False, True, True])
    r = route_topk(logits, 2, allowed)
    assert r.first_choice.tolist() == [[[1, 2], [0, 1]]]
    assert r.choice.tolist() == [[[0, 2], [0, 2]]]  # 1 is absent: the best allowed expert not chosen yet
    np.testing.assert_allclose(r.gate, np.take_along_axis(r.probs, r.choice, -1))


def test_dispatch_sums_the_gated_outputs_of_each_tokens_k_experts():
    normed = np.arange(6, dtype=np.float32).reshape(1, 3, 2)
    r = route_topk(np.random.default_rng(0).standard_normal((1, 3, 4)).astype(np.float32), 2)
    out = dispatch(r, normed, lambda e, x: x * (e + 1))
    want = normed * (r.gate * (r.choice + 1)).sum(-1, keepdims=True)
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_left_padding_positions_and_mask_are_hfs():
    ids, mask = pad_left([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask, 3).tolist() == [[0, 1, 2], [1, 1, 0]]
    bias = attention_bias(mask, 3)  # [B, 1, T, L]
    assert bias.shape == (2, 1, 3, 3)
    assert (bias[0, 0] == np.triu(np.full((3, 3), NEG), 1)).all()
    assert (bias[1, 0, 2] == [NEG, NEG, 0]).all()
    grown = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    assert position_ids(grown, 1).tolist() == [[3], [1]]
    assert (attention_bias(grown, 1, window=2)[0, 0, 0] == [NEG, NEG, 0, 0]).all()


def test_a_sliding_window_masks_keys_as_hf_does(tmp_path):
    model = ct.build("mixtral", seed=5, sliding_window=4)
    art = export_causal(ct.save(model, tmp_path / "ck"), tmp_path / "art", quiet=True)
    parts = load_model(art, RuntimeConfig(policy="full", verify="never"))
    assert parts.model.cfg.sliding_window == 4
    rows = ct.prompts()
    want = ct.hf_greedy(model, rows, NEW)
    assert want != ct.hf_greedy(ct.build("mixtral", seed=5), rows, NEW)  # the window changes the tokens
    assert _generate(parts, rows) == want


def test_an_empty_prompt_is_refused_with_a_typed_error(models):
    from swapmoe_edge.core.errors import InputError

    _, parts = models["olmoe"]
    with pytest.raises(InputError, match="at least one token"):
        _generate(parts, [[5, 6], []])


def test_greedy_bans_repeated_ngrams_over_prompt_and_new_tokens_as_hf(models):
    model, parts = models["qwen2_moe"]
    rows = ct.prompts()
    ids, mask = pad_left(rows, ct.PAD)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW,
                             do_sample=False, num_beams=1, pad_token_id=ct.PAD, eos_token_id=ct.EOS, no_repeat_ngram_size=1)
    want = [r[: r.index(ct.EOS) + 1] if ct.EOS in r else r for r in out[:, ids.shape[1]:].tolist()]
    assert want != ct.hf_greedy(model, rows, NEW)  # the ban changes the tokens
    assert _generate(parts, rows, no_repeat_ngram_size=1) == want


@pytest.mark.parametrize("family, overrides", [
    ("olmoe", {"clip_qkv": 0.3}),
    ("qwen3_moe", {"attention_bias": True, "num_key_value_heads": 1}),
    ("qwen2_moe", {"norm_topk_prob": True, "tie_word_embeddings": True}),
])
def test_config_variants_export_validated_and_generate_hfs_tokens(tmp_path, family, overrides):
    model = ct.build(family, seed=4, **overrides)
    if overrides.get("attention_bias"):  # biases start at zero: make them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.5)
    art = export_causal(ct.save(model, tmp_path / "ck"), tmp_path / "art", quiet=True)
    parts = load_model(art, RuntimeConfig(policy="full", verify="never"))
    rows = ct.prompts()
    assert _generate(parts, rows) == ct.hf_greedy(model, rows, NEW)


def _cut(row: list[int], eos: set[int]) -> list[int]:
    """A generated row up to and with its first EOS (any of ``eos``)."""
    return next((row[: i + 1] for i, t in enumerate(row) if t in eos), row)


def test_several_eos_ids_stop_greedy_and_beam_search_as_hf(models, tmp_path):
    model, _ = models["qwen3_moe"]
    rows = ct.prompts()
    free = ct.hf_greedy(model, rows, NEW)  # which tokens each row makes, ending at the config's EOS
    assert not any(ct.EOS in r[:-1] for r in free)
    extra = [free[0][2], free[1][4]]  # tokens the first two rows make mid-way: they must now end there
    eos = [ct.EOS, *dict.fromkeys(e for e in extra if e != ct.EOS)]
    assert len(eos) >= 2
    model.generation_config.eos_token_id = eos  # written to generation_config.json, which export reads
    try:
        art = export_causal(ct.save(model, tmp_path / "ck"), tmp_path / "art", quiet=True, validate=False)
    finally:
        model.generation_config.eos_token_id = ct.EOS
    parts = load_model(art, RuntimeConfig(policy="full", verify="never"))
    assert list(parts.model.cfg.eos_token_ids) == eos
    s = max(len(r) for r in rows)
    ids, mask = pad_left(rows, ct.PAD)
    for beams in (1, 3):
        with torch.no_grad():
            out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW,
                                 do_sample=False, num_beams=beams, pad_token_id=ct.PAD, eos_token_id=eos)
        ref = [_cut(row, set(eos)) for row in out[:, s:].tolist()]
        got = _generate(parts, rows, num_beams=beams)
        assert got == ref, beams
        if beams == 1:  # greedy's first row now stops at its first extra EOS, or earlier
            assert len(got[0]) <= 3 and got[0][-1] in eos


def test_a_request_without_num_beams_takes_the_checkpoints_beam_width(models, tmp_path):
    model, _ = models["mixtral"]
    rows = ct.prompts(n=2)
    model.generation_config.num_beams = 3  # written to generation_config.json, which export reads
    try:
        art = export_causal(ct.save(model, tmp_path / "ck"), tmp_path / "art", quiet=True, validate=False)
    finally:
        model.generation_config.num_beams = 1
    s = max(len(r) for r in rows)
    ids, mask = pad_left(rows, ct.PAD)
    with torch.no_grad():  # HF reads the same default from the same file
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW,
                             do_sample=False, num_beams=3, pad_token_id=ct.PAD, eos_token_id=ct.EOS)
    ref = [row[: row.index(ct.EOS) + 1] if ct.EOS in row else row for row in out[:, s:].tolist()]
    with Runtime(art, RuntimeConfig(policy="full", threads=1)) as rt:
        assert rt.default_num_beams == 3
        assert [r.token_ids for r in rt.generate(rows, max_new_tokens=NEW)] == ref
        assert [r.token_ids for r in rt.generate(rows, max_new_tokens=NEW, num_beams=1)] == ct.hf_greedy(model, rows, NEW)
    for bad in (0, 2.5):
        with pytest.raises(InputError, match="num_beams must be a positive integer"):
            generation_beams({"num_beams": bad})
        with pytest.raises(InputError, match="num_beams must be a positive integer"):
            generation_settings({"num_beams": bad})  # what load runs: refused before any request
