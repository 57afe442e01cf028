"""Every policy serving a tiny decoder-only top-k artifact through the whole runtime (load, the
engine, the family's router): exact policies give full's tokens at the smallest budget, the
lossy ones run within it, the counters count each token's k choices, and a profile's Eq. 1
counts every choice."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from swapmoe_edge.core.errors import InputError  # noqa: E402
from swapmoe_edge.lab.calibrate import calibrate  # noqa: E402
from swapmoe_edge.lab.substitution import _PromptBatch  # noqa: E402
from swapmoe_edge.lab.trace import record_trace  # noqa: E402
from swapmoe_edge.residency.policies import POLICIES  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_export.causal_export import export_causal  # noqa: E402

import causal_tiny as ct  # noqa: E402

NEW = 8
SMALLEST = "25%"  # 2 of 8 experts a layer: as many as a token's k


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("topk-runtime")
    return export_causal(ct.save(ct.build("qwen2_moe", seed=5), root / "ck"), root / "art", quiet=True, validate=False)


def run(artifact, policy: str, budget: str, **cfg):
    with Runtime(artifact, RuntimeConfig(policy=policy, budget=budget, threads=1, verify="never", reserve_bytes=0,
                                         **cfg)) as rt:
        assert rt.family.top_k == ct.TOP_K and rt.policy.top_k == ct.TOP_K
        results = rt.generate(ct.prompts(), max_new_tokens=NEW)
        return [r.token_ids for r in results], results[0].stats, rt.residents.counts()


@pytest.fixture(scope="module")
def full(artifact):
    return run(artifact, "full", "100%")


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
def test_every_policy_serves_a_top_k_model_at_the_smallest_budget(artifact, full, policy):
    tokens, stats, counts = run(artifact, policy, SMALLEST)
    assert all(len(t) >= 1 for t in tokens)
    assert 0.0 <= stats["first_choice_resident"] <= 1.0
    if policy != "ladder":
        assert max(counts.values()) <= 2 or policy == "on-demand"
    if POLICIES[policy].exact:
        assert tokens == full[0] and stats["exact"]


def test_full_counts_every_first_choice_resident(full):
    assert full[1]["first_choice_resident"] == 1.0 and full[1]["exact"]


@pytest.mark.parametrize("absent", ["substitute", "drop"])
def test_masked_policies_take_the_configured_rule_for_absent_choices(artifact, absent):
    _, stats, _ = run(artifact, "prune", SMALLEST, absent=absent)
    assert stats["first_choice_resident"] < 1.0 and not stats["exact"]


def test_a_profile_counts_each_tokens_k_choices(artifact):
    seen = {"tokens": 0}

    def count(layer, normed, logits, mask, moe):  # the first sparse layer's tokens, padding excluded
        if layer.key.layer == 0:
            seen["tokens"] += int(np.size(mask) and np.count_nonzero(mask)) if mask is not None else logits.shape[0] * logits.shape[1]
        return moe(layer, normed, logits, mask)

    with Runtime(artifact, RuntimeConfig(policy="on-demand", budget="100%", threads=1, verify="never"),
                 moe_hook=count) as rt:
        rt.encode_texts = lambda texts: ([ct.prompts()[0]] * len(texts), [False] * len(texts))  # no tokenizer here
        prof = rt.profile_texts(["one text"], max_new_tokens=NEW)
    first = rt.sparse[0]
    assert seen["tokens"] > 0 and prof.counts[first].sum() == seen["tokens"] * ct.TOP_K


def test_a_trace_of_a_top_k_model_records_every_token_and_replays_its_k_choices(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from swapmoe_edge.lab.replay import POLICIES as REPLAYED, ReplayConfig, replay
    from swapmoe_edge.lab.trace import load_trace

    ck = ct.save(ct.build("mixtral", seed=6), tmp_path / "ck")
    tok = Tokenizer(models.WordLevel({"<pad>": ct.PAD, "<unk>": 2, "</s>": ct.EOS,
                                      **{f"w{i}": i for i in range(4, ct.VOCAB)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(ck / "tokenizer.json"))
    art = export_causal(ck, tmp_path / "art", quiet=True, validate=False)
    docs = [{"text": " ".join(f"w{i}" for i in p)} for p in ct.prompts(seed=9, n=5)]
    t = record_trace(art, docs, tmp_path / "t.npz", max_new_tokens=6, batch_size=2)
    back = load_trace(tmp_path / "t.npz")
    assert back.top_k == ct.TOP_K and back.meta["routing"]["family"] == "causal"
    assert back.choices().shape == (back.probs.shape[0], ct.TOP_K)
    with Runtime(art, RuntimeConfig(policy="full", budget="100%", threads=1)) as rt:
        prompts = [rt.encode_texts([d["text"]])[0][0] for d in docs]
        outs = [len(r.token_ids) for r in rt.generate(prompts, max_new_tokens=6, num_beams=1)]
    lay = np.repeat(back.ev_layer, np.diff(back.ev_offset))
    for li in range(len(back.layer_names)):  # the prompt at step 1, then each generated token but the last
        for doc, (prompt, gen) in enumerate(zip(prompts, outs)):
            assert ((lay == li) & (back.tok_doc == doc)).sum() == len(prompt) + gen - 1
    res = {r.policy: r for r in replay(back, REPLAYED, ReplayConfig(budget="50%"))}
    assert all(r.tokens == back.probs.shape[0] * ct.TOP_K for r in res.values())  # each token's k choices
    assert res["belady"].loads <= res["lru"].loads and res["hindsight"].hits >= res["static"].hits
    assert all(res[n].hits <= res["best-fixed"].hits for n in ("prune", "static", "hindsight"))
    full = {r.policy: r for r in replay(back, ["lru", "static"], ReplayConfig(budget="100%"))}
    assert full["lru"].hit_rate == full["static"].hit_rate == 1.0 and full["lru"].loads == 0
    from click.testing import CliRunner

    from swapmoe_edge.cli.main import main

    r = CliRunner().invoke(main, ["trace", "replay", str(tmp_path / "t.npz"), "--budget", "50%", "--policies", "lru"])
    assert r.exit_code == 0, r.output
    assert f"({ct.TOP_K} choices each: hit rates count choices)" in r.output
    assert f"{res['lru'].hit_rate:6.3f}      -" in r.output  # no encoder: its column says so


def test_a_decoder_predictor_is_refused_for_a_decoder_only_model_before_any_pass(artifact, tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n')
    with pytest.raises(InputError, match="no encoder routing"):
        calibrate(artifact, data, with_predictor=True, budget="100%")


def test_teacher_forcing_a_decoder_only_model_predicts_its_own_greedy_tokens(artifact):
    with Runtime(artifact, RuntimeConfig(policy="full", budget="100%", threads=1, verify="never", reserve_bytes=0)) as rt:
        prompts = ct.prompts()
        outs = [r.token_ids for r in rt.generate(prompts, max_new_tokens=NEW)]
        b = _PromptBatch(prompts, outs, rt.manifest.config.pad_token_id)
        picked = b.logits(rt.model).argmax(axis=-1)  # [B, T]
    assert b.valid.sum() == sum(map(len, outs)) > 0
    assert [list(row[v]) for row, v in zip(picked, b.valid)] == [list(o) for o in outs]


def test_measured_substitution_loss_of_a_decoder_only_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    ck = ct.save(ct.build("mixtral", seed=4), tmp_path / "ck")
    tok = Tokenizer(models.WordLevel({"<pad>": ct.PAD, "<unk>": 2, "</s>": ct.EOS,
                                      **{f"w{i}": i for i in range(4, ct.VOCAB)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(ck / "tokenizer.json"))
    (ck / "swapmoe.json").write_text('{"prompt_template": "{document} w9"}')
    art = export_causal(ck, tmp_path / "art", quiet=True, validate=False)
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "w5 w6 w7 w8"}\n{"text": "w11 w12"}\n{"text": "w20 w21 w22"}\n')
    prof = calibrate(art, data, with_loss=True, budget="100%", max_new_tokens=6)
    assert set(prof.loss) == set(prof.importance) and prof.loss
    for lk, loss in prof.loss.items():
        assert loss.shape == (ct.EXPERTS,) and np.isfinite(loss).all() and loss.min() >= 0 and loss[-1] == 0
        assert 0 <= prof.substitute[lk] < ct.EXPERTS
    assert max(float(loss[0]) for loss in prof.loss.values()) > 0  # one expert a layer changes something
