"""Recording a routing trace from a tiny model: tokens, padding, request boundaries, and a replay."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from swapmoe_edge.lab.replay import POLICIES, ReplayConfig, replay  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_edge.lab.trace import load_trace, record_trace  # noqa: E402

from tiny import export_tiny, words  # noqa: E402

LENGTHS = (14, 9, 20, 11, 16)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("trace"), seed=41, num_experts=8,
                       num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)


def _docs():
    rng = np.random.default_rng(7)
    return [{"id": f"d{i}", "section": "net" if i % 2 else "games", "text": words(rng.integers(3, 96, n).tolist())}
            for i, n in enumerate(LENGTHS)]


def test_trace_counts_every_real_token_once_and_no_padding(art, tmp_path):
    docs = _docs()
    t = record_trace(art, docs, tmp_path / "t.npz", max_new_tokens=5, batch_size=2)
    back = load_trace(tmp_path / "t.npz")
    assert back.doc_id == tuple(d["id"] for d in docs) and back.doc_section[:2] == ("games", "net")
    with Runtime(art, RuntimeConfig(policy="full", budget="100%", threads=1)) as rt:
        outs = [len(r.token_ids) for r in rt.summarize([d["text"] for d in docs], max_new_tokens=5)]
    lay = np.repeat(t.ev_layer, np.diff(t.ev_offset))
    step = np.repeat(t.ev_step, np.diff(t.ev_offset))
    for li, name in enumerate(t.layer_names):
        for doc, (n, gen) in enumerate(zip(LENGTHS, outs)):
            mine = (lay == li) & (t.tok_doc == doc)
            if name.startswith("enc"):
                assert mine.sum() == n + 1  # its words and </s>; the batch's padding is left out
            else:  # one token per decoder step up to and including its EOS
                assert sorted(step[mine].tolist()) == list(range(1, gen + 1))
    assert np.allclose(t.probs.astype(np.float32).sum(axis=1), 1.0, atol=1e-2)
    assert t.num_requests >= 3 and t.meta["token_ms"] > 0  # 5 documents in batches of 2
    # every policy replays it, and the hindsight set is at least as good as the static one
    res = {r.policy: r for r in replay(back, POLICIES, ReplayConfig(budget="50%"))}
    assert res["hindsight"].hits >= res["static"].hits and res["belady"].loads <= res["lru"].loads
    assert all(r.tokens == t.probs.shape[0] for r in res.values())


def test_cli_record_then_replay_json(art, tmp_path):
    from click.testing import CliRunner

    from swapmoe_edge.cli.main import main

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    out = tmp_path / "g.npz"
    r = CliRunner().invoke(main, ["trace", "record", str(art), "--data", str(data), "-o", str(out), "--order", "grouped",
                                  "--max-new-tokens", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_trace(out).doc_section == ("games", "games", "games", "net", "net")
    r = CliRunner().invoke(main, ["trace", "replay", str(out), "--budget", "50%", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output.strip().splitlines()[-1])["results"]
    assert {x["policy"] for x in rows} == set(POLICIES)


@pytest.mark.parametrize("policy", ["prune", "swapmoe"])
def test_replay_gives_each_layer_the_runtimes_slot_count(art, tmp_path, policy):
    t = record_trace(art, _docs()[:2], tmp_path / "t.npz", max_new_tokens=2)
    with Runtime(art, RuntimeConfig(policy=policy, budget="40%", threads=1)) as rt:
        want = {lk.name: n for lk, n in rt.policy.limits.counts.items()}
    got = replay(t, [policy], ReplayConfig(budget="40%"))[0].counts
    assert got == want
