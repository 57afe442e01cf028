"""The decoder predictor (predictor.py): fitting, the profile field, and swapmoe planning each
request's decoder layers from its encoder routing, in the policy and in the replay."""

from __future__ import annotations

import json

import numpy as np
import pytest

from swapmoe_edge.core.errors import ArtifactError, InputError
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.residency.planner import top_experts
from swapmoe_edge.residency.predictor import DecoderPredictor, fit
from swapmoe_edge.lab.replay import ReplayConfig, replay
from swapmoe_edge.runtime.facade import RuntimeConfig

from test_replay import make_trace
from test_substitution import _Store, swapmoe_engine

ENC, DEC = LayerKey("encoder", 1), LayerKey("decoder", 1)
E = 4


def _doc(topic: int, rng) -> dict:
    """A document of topic 0 or 1: its encoder uses expert topic (and some noise), its decoder
    experts 2 + topic and topic (the planted map the fit must find)."""
    enc = rng.random(E) * 0.2
    enc[topic] += 1.0
    dec = rng.random(E) * 0.05
    dec[2 + topic] += 1.0
    dec[topic] += 0.6
    return {ENC: enc, DEC: dec}


def _planted(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [_doc(i % 2, rng) for i in range(n)]


def test_fit_finds_a_planted_map_and_predicts_held_out_documents():
    p = fit(_planted(), ridge=0.1)
    assert p.inputs == (ENC,) and p.outputs == (DEC,) and p.documents == 40 and p.weights.shape == (E + 1, E)
    for doc in _planted(10, seed=1):
        topic = int(np.argmax(doc[ENC]))
        got = p.predict({ENC: doc[ENC]})[DEC]
        assert np.all(got >= 0)
        assert set(top_experts(got, 2)) == {2 + topic, topic}
    with pytest.raises(InputError, match="at least two"):
        fit(_planted(1))
    with pytest.raises(InputError, match="nothing to predict"):
        fit([{ENC: d[ENC]} for d in _planted(4)])


def test_profile_keeps_the_predictor_and_rejects_a_bad_one(tmp_path):
    imp = {ENC: np.ones(E), DEC: np.ones(E)}
    p = fit(_planted())
    prof = Profile(imp, dict(imp), meta={"texts": 1}, predictor=p)
    back = Profile.load(prof.save(tmp_path / "p.json"))
    assert back.predictor.inputs == (ENC,) and back.predictor.documents == 40
    assert np.allclose(back.predictor.weights, p.weights, atol=1e-6)
    with pytest.raises(ValueError, match="weights are"):
        DecoderPredictor((ENC,), (DEC,), E, np.zeros((E, E)))
    with pytest.raises(ValueError, match="predictor's layers"):
        Profile({ENC: np.ones(E)}, {ENC: np.ones(E)}, predictor=p)  # DEC is not profiled
    raw = json.loads((tmp_path / "p.json").read_text())
    raw["predictor"]["weights"] = [[1.0]]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="malformed"):
        Profile.load(tmp_path / "bad.json")


def _policy(predictor, max_swaps=1, wait=False):
    imp = {ENC: np.array([4.0, 3.0, 2.0, 1.0]), DEC: np.array([4.0, 3.0, 2.0, 1.0])}  # start: DEC holds 0, 1
    prof = Profile(imp, dict(imp), meta={"texts": 1}, predictor=predictor)
    # a strong prior (100 documents): without the predictor nothing moves
    return swapmoe_engine(prof, {ENC: 2, DEC: 2}, hysteresis=0.1, max_swaps_per_interval=max_swaps,
                          prior_documents=100.0, decoder_weight=1.0, predict_decoder="wait" if wait else "background")


def _call(pol, lk, expert, tokens):
    layer = type("L", (), {"key": lk})()
    logits = np.full((1, tokens, E), -5.0)
    logits[..., expert] = 5.0
    pol(layer, np.ones((1, tokens, 8)), logits, None)


def test_swapmoe_moves_the_decoder_toward_the_predicted_experts_at_once():
    pol = _policy(fit(_planted(), ridge=0.1))
    assert set(pol.residents.layer(DEC)) == {0, 1} and not pol.plan().moves
    _call(pol, ENC, 1, tokens=12)  # the encoder pass of a topic-1 document
    assert not pol.take_wake()  # nothing predicted before the decoder starts
    _call(pol, DEC, 0, tokens=1)  # its first decoder step
    assert pol.take_wake()
    moves = pol.plan().moves
    assert len(moves) == 1 and moves[0].key.layer_key == DEC  # 3 (predicted) replaces 0 (not predicted)
    assert (moves[0].key.expert, moves[0].evict.expert) == (3, 0)
    # the burst is for the new prediction only; the next plan is capped again (here: nothing left)
    for m in moves:
        left = pol.begin(m)
        assert pol.finish(left, _Store().read(left.key))
    pol.end_request()
    _call(pol, ENC, 0, tokens=12)  # a topic-0 document: decoder experts 0 and 2
    _call(pol, DEC, 0, tokens=1)
    _call(pol, DEC, 0, tokens=1)  # later steps do not predict again
    moves = pol.plan().moves  # two swaps at once, past max_swaps=1
    assert len(moves) == 2 and {m.key.expert for m in moves} == {0, 2} and {m.evict.expert for m in moves} == {1, 3}


def test_waiting_for_the_prediction_swaps_before_the_first_decoder_step():
    pol = _policy(fit(_planted(), ridge=0.1), wait=True)
    _call(pol, ENC, 1, tokens=12)  # topic 1: decoder experts 3 and 1
    _call(pol, DEC, 0, tokens=1)
    assert set(pol.residents.layer(DEC)) == {1, 3} and not pol.take_wake()  # done on this thread
    assert pol.counters.loads == 1 and pol.counters.swaps == 1 and pol.counters.stall_s > 0
    assert set(pol.residents.layer(ENC)) == {0, 1}  # other layers wait for the swapper


def test_replay_with_a_predictor_tracks_topics_the_prior_does_not():
    # requests alternate topics; each: an encoder event on expert `topic`, then 6 decoder steps on 2 + topic
    layers = ["enc.L01", "dec.L01"]
    events = []
    for req in range(12):
        topic = (req // 2) % 2
        events.append((req, 0, 0, [topic] * 8))
        events += [(req, 1, step, [2 + topic]) for step in range(1, 7)]
    t = make_trace(layers, events, E, token_ms=5.0, encoder_ms=5.0)
    imp = [[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 0.2, 0.1]]
    keys = [ENC, DEC]
    docs = _planted()
    plain = Profile({k: np.asarray(r) for k, r in zip(keys, imp)}, {k: np.asarray(r) for k, r in zip(keys, imp)},
                    meta={"texts": 1})
    with_p = Profile(plain.importance, plain.counts, meta={"texts": 1}, predictor=fit(docs, ridge=0.1))
    cfg = ReplayConfig(budget="50%", flash_mbps=1e6,
                       runtime=RuntimeConfig(policy="swapmoe", budget="100%", prior_documents=1e6))
    [a] = replay(t, ["swapmoe"], cfg, plain)
    [b] = replay(t, ["swapmoe"], replace_cfg(cfg, predict_decoder="background"), with_p)
    [w] = replay(t, ["swapmoe"], cfg, with_p)  # "wait", the default: the first decoder step already hits
    assert w.to_json()["decoder_hit_rate"] >= b.to_json()["decoder_hit_rate"]
    assert w.stall_s > 0 and w.loads > 0 and b.stall_s == 0  # wait's reads hold the token loop; background's do not
    dec_a, dec_b = a.to_json()["decoder_hit_rate"], b.to_json()["decoder_hit_rate"]
    assert dec_a == 0.0  # a prior worth a million documents keeps 0 and 1; the decoder wants 2 or 3
    assert dec_b > 0.6 and b.swaps > 0
    off = replace_cfg(cfg, predict_decoder="off")
    [c] = replay(t, ["swapmoe"], off, with_p)
    assert c.to_json()["decoder_hit_rate"] == 0.0  # the switch turns it off
    from dataclasses import replace

    big = replace(cfg, expert_bytes=19 << 20)  # "auto" does not hold the first token for switch-base reads
    [d] = replay(t, ["swapmoe"], big, with_p)
    assert d.to_json()["decoder_hit_rate"] == 0.0
    [e] = replay(t, ["swapmoe"], replace_cfg(big, predict_decoder="wait"), with_p)  # unless told to
    assert e.to_json()["decoder_hit_rate"] > 0.6


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, runtime=replace(cfg.runtime, **kw))


def test_a_bad_predict_mode_is_refused():
    with pytest.raises(InputError, match="predict_decoder must be one of auto, wait, background, off"):
        RuntimeConfig(predict_decoder="yes")


def test_the_swapper_stops_at_once_even_while_background_reads_are_closed():
    import time

    pol = _policy(fit(_planted(), ridge=0.1))
    pol.start()
    pol.background_io.clear()  # as during a request's prefill
    _call(pol, ENC, 1, tokens=12)
    _call(pol, DEC, 0, tokens=1)  # wakes the swapper, which waits for background reads to open
    time.sleep(0.05)
    t0 = time.perf_counter()
    pol.stop()
    assert time.perf_counter() - t0 < 0.9 and not pol.running


def test_experts_evicted_for_a_prediction_are_freed_before_the_next_is_read():
    import gc
    import weakref

    pol = _policy(fit(_planted(), ridge=0.1), wait=True)
    _call(pol, DEC, 0, tokens=1)  # a decoder call caches the layer's resident snapshot
    pol.end_request()
    held = [weakref.ref(x) for e, x in pol.residents.layer(DEC).items() if e == 0]  # 0 is not predicted for topic 1
    alive_at_read = []
    real_read = pol.store.read

    def read(key, own_mapping=True):
        gc.collect()
        alive_at_read.append(held[0]() is not None)
        return real_read(key, own_mapping)

    pol.store.read = read
    _call(pol, ENC, 1, tokens=12)
    _call(pol, DEC, 0, tokens=1)  # the burst: evict 0, read 3
    assert alive_at_read == [False]  # the evicted expert was gone when the new one was read
