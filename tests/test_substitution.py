"""Measured substitution loss: the planner's split by loss curves, the substitute a one-expert
layer keeps, their profile fields, and the measurement on a tiny model."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from swapmoe_edge.core.errors import ArtifactError, InputError
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.residency import loss_split
from swapmoe_edge.residency.limits import Limits
from swapmoe_edge.residency.loss_split import loss_envelope, plan_by_loss
from swapmoe_edge.residency.planner import plan_counts
from swapmoe_edge.residency.policies import make_policy
from swapmoe_edge.lab.replay import ReplayConfig, replay
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.runtime.facade import RuntimeConfig
from swapmoe_edge.artifact.store import LoadedExpert

from test_replay import make_trace

ENC, DEC = LayerKey("encoder", 1), LayerKey("decoder", 1)


def brute_force(curves, cost, capacity):
    layers = list(curves)
    best = None
    for ks in itertools.product(*[range(1, len(curves[k]) + 1) for k in layers]):
        if sum(n * cost[k] for n, k in zip(ks, layers)) > capacity:
            continue
        total = sum(loss_envelope(curves[k])[n - 1] for n, k in zip(ks, layers))
        if best is None or total < best - 1e-12:
            best = total
    return best


def test_split_by_loss_on_a_hand_made_case():
    # Encoder: one expert costs 0.5, two 0.1. Decoder: flat until all four are in.
    curves = {ENC: [0.5, 0.1, 0.05, 0.0], DEC: [0.2, 0.19, 0.18, 0.0]}
    cost = {ENC: 10, DEC: 10}
    # 4 slots: (1,3) 0.68, (2,2) 0.29, (3,1) 0.25 -> (3,1)
    assert plan_by_loss(curves, cost, 40) == {ENC: 3, DEC: 1}
    # 5 slots: (4,1) 0.20 beats (1,4) 0.50 and (2,3) 0.28: a non-convex curve needs the exact search
    assert plan_by_loss(curves, cost, 50) == {ENC: 4, DEC: 1}
    # plan_counts hands over to it; the decoder weight plays no part (the curves are the model's output)
    imp = {ENC: np.ones(4), DEC: np.ones(4)}
    assert plan_counts(imp, cost, 40, layer_weight={DEC: 8.0}, loss=curves) == {ENC: 3, DEC: 1}
    assert plan_counts(imp, cost, 40, layer_weight={DEC: 8.0}) == {ENC: 1, DEC: 3}
    assert plan_counts(imp, cost, 40, method="uniform", loss=curves) == {ENC: 2, DEC: 2}


def test_split_by_loss_equals_brute_force_and_fits():
    rng = np.random.default_rng(3)
    for case in range(40):
        n_layers, E = int(rng.integers(1, 4)), int(rng.integers(2, 6))
        layers = [LayerKey("encoder" if i % 2 else "decoder", i) for i in range(n_layers)]
        curves = {k: np.append(np.sort(rng.random(E - 1))[::-1] * rng.random() * 3, 0.0) for k in layers}
        if case % 3 == 0:  # noisy curves that rise somewhere
            curves = {k: np.append(rng.random(E - 1), 0.0) for k in layers}
        cost = {k: int(rng.choice([6, 9, 12])) for k in layers}
        capacity = sum(cost.values()) + int(rng.integers(0, sum(cost.values()) * E))
        counts = plan_by_loss(curves, cost, capacity, layers)
        assert all(1 <= counts[k] <= E for k in layers)
        assert sum(counts[k] * cost[k] for k in layers) <= capacity
        got = sum(loss_envelope(curves[k])[counts[k] - 1] for k in layers)
        assert got == pytest.approx(brute_force(curves, cost, capacity), abs=1e-12), case


def test_split_by_loss_with_sizes_of_no_useful_common_divisor_still_fits(monkeypatch):
    monkeypatch.setattr(loss_split, "MAX_PLAN_UNITS", 400)
    curves = {ENC: [0.5, 0.1, 0.05, 0.0], DEC: [0.2, 0.19, 0.18, 0.0]}
    cost = {ENC: 1009, DEC: 997}  # primes: one-byte units would be 4,000+ of them
    capacity = 4 * 1009 + 200  # four experts fit, five do not
    counts = loss_split.plan_by_loss(curves, cost, capacity)  # units of 11 bytes: widths 92 and 91
    assert sum(counts[k] * cost[k] for k in counts) <= capacity
    assert counts == {ENC: 3, DEC: 1}


def test_envelope_and_ties_hold_more_experts():
    assert loss_envelope(np.array([0.3, 0.35, 0.1, 0.0])).tolist() == [0.3, 0.3, 0.1, 0.0]
    with pytest.raises(ValueError):
        loss_envelope(np.array([0.1, -1.0]))
    # flat curves: every split has the same loss; the planner still fills the capacity
    flat = {ENC: [0.1, 0.1, 0.1], DEC: [0.1, 0.1, 0.1]}
    counts = plan_by_loss(flat, {ENC: 1, DEC: 1}, 5)
    assert sum(counts.values()) == 5


def _profile(loss=None, substitute=None):
    imp = {ENC: np.array([1.0, 4.0, 2.0, 3.0]), DEC: np.array([4.0, 3.0, 2.0, 1.0])}
    return Profile(imp, dict(imp), meta={"texts": 1}, loss=loss or {}, substitute=substitute or {})


def test_profile_round_trip_and_bad_fields(tmp_path):
    prof = _profile({ENC: [0.3, 0.2, 0.1, 0.0], DEC: [0.5, 0.2, 0.1, 0.0]}, {ENC: 2, DEC: 0})
    back = Profile.load(prof.save(tmp_path / "p.json"))
    assert back.substitute == {ENC: 2, DEC: 0}
    assert back.loss[DEC].tolist() == [0.5, 0.2, 0.1, 0.0]
    measured = Profile(prof.importance, prof.counts, loss=prof.loss, rung_loss={DEC: {"int4": 0.01, "int8": 0.001}})
    assert Profile.load(measured.save(tmp_path / "r.json")).rung_loss == {DEC: {"int4": 0.01, "int8": 0.001}}
    with pytest.raises(ValueError, match="rung loss"):
        Profile(prof.importance, prof.counts, rung_loss={DEC: {"int4": -1.0}})
    assert Profile.load(_profile().save(tmp_path / "plain.json")).loss == {}  # optional: old profiles load
    with pytest.raises(ValueError, match="substitute"):
        _profile(substitute={ENC: 4})
    with pytest.raises(ValueError, match="every layer"):
        _profile(loss={ENC: [0.3, 0.2, 0.1, 0.0]})
    raw = prof.to_json()
    raw["layers"]["enc.L01"]["substitute"] = "two"
    (tmp_path / "bad.json").write_text(__import__("json").dumps(raw))
    with pytest.raises(ArtifactError, match="malformed"):
        Profile.load(tmp_path / "bad.json")


class _Store:
    def read(self, key, own_mapping=True):
        return LoadedExpert(key, {}, 1)


def swapmoe_engine(profile, counts, store=None, **cfg):
    """The swapmoe engine over experts of one byte each, holding ``counts`` experts per layer."""
    config = RuntimeConfig(policy="swapmoe", **cfg)
    engine = make_policy(config, ResidentSet([ENC, DEC], 4), store or _Store(), lambda e, x: x, 64,
                         {ENC: np.ones(4), DEC: np.ones(4)}, profile, expert_cost={ENC: 1, DEC: 1},
                         budget=sum(counts.values()))
    engine.limits = Limits(counts=dict(counts))
    engine.warm()
    return engine


def _policy(counts, substitutes):
    prof = replace(_profile(), substitute=substitutes)
    return swapmoe_engine(prof, counts, hysteresis=0.0, max_swaps_per_interval=8, prior_documents=1.0)


def test_a_one_expert_layer_holds_its_substitute_and_never_swaps_it():
    pol = _policy({ENC: 1, DEC: 2}, {ENC: 2, DEC: 3})
    assert set(pol.residents.layer(ENC)) == {2}  # the substitute, not the most important (1)
    assert set(pol.residents.layer(DEC)) == {0, 1}  # a layer with two: importance; its substitute is unused
    # online evidence for expert 1 of the encoder, however strong, does not move the pinned layer
    probs = np.full((50, 4), 0.01)
    probs[:, 1] = 0.97
    pol.tracker.observe(ENC, np.ones(50), probs)
    assert all(m.key.layer_key != ENC for m in pol.plan().moves)
    # a budget that shrinks a layer to one expert keeps its substitute when it is resident
    pol.resize(2)  # bytes for one expert per layer
    assert pol.limits.counts == {ENC: 1, DEC: 1}
    assert set(pol.residents.layer(DEC)) == {0}  # 3 is not resident: the most important stays
    pol2 = _policy({ENC: 2, DEC: 2}, {ENC: 2})
    assert set(pol2.residents.layer(ENC)) == {1, 3}
    pol2.residents.put(LoadedExpert(ExpertKey("encoder", 1, 2), {}, 1))  # as if swapped in
    pol2.residents.drop(ExpertKey("encoder", 1, 3))
    pol2.resize(3)
    assert pol2.limits.counts == {ENC: 1, DEC: 2}
    assert set(pol2.residents.layer(ENC)) == {2}


def test_replay_static_and_swapmoe_use_the_measured_split_and_substitute():
    layers = ["enc.L01", "dec.L01"]
    events = [(r, 0, 0, [1, 1, 3, 0]) for r in range(6)] + [(r, 1, 1, [0]) for r in range(6)]
    t = make_trace(layers, events, E=4, token_ms=100.0)
    prof = _profile({ENC: [0.9, 0.1, 0.05, 0.0], DEC: [0.2, 0.19, 0.18, 0.0]}, {ENC: 3, DEC: 0})
    cfg = ReplayConfig(budget="50%", runtime=RuntimeConfig(policy="swapmoe", swap_interval_s=0.01))
    res = {r.policy: r for r in replay(t, ["static", "swapmoe", "prune"], cfg, prof)}
    # 4 slots by the curves: encoder 3, decoder 1 (the decoder weight 8 alone would give the decoder 3)
    assert res["static"].counts == res["swapmoe"].counts == {"enc.L01": 3, "dec.L01": 1}
    assert res["prune"].counts == {"enc.L01": 1, "dec.L01": 3}  # prune keeps the norm planner
    # the decoder holds one expert: its substitute 0 (the importance order would also pick 0)
    # encoder {1, 3, 2}: tokens 1, 1, 3 hit; decoder {0}: 1 of 1
    assert (res["static"].enc_hits, res["static"].dec_hits) == (18, 6)
    prof2 = _profile({ENC: [0.9, 0.1, 0.05, 0.0], DEC: [0.2, 0.19, 0.18, 0.0]}, {ENC: 3, DEC: 2})
    res2 = {r.policy: r for r in replay(t, ["static", "swapmoe"], cfg, prof2)}
    assert res2["static"].dec_hits == 0 == res2["swapmoe"].dec_hits  # pinned to 2: never swapped to 0


pytest.importorskip("torch")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from tiny import export_tiny

    return export_tiny(tmp_path_factory.mktemp("subst"), seed=5, num_experts=4,
                       num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)


def test_measure_loss_on_a_tiny_model(art):
    from swapmoe_edge.runtime.facade import Runtime
    from swapmoe_edge.lab.substitution import measure_loss

    from tiny import words

    rng = np.random.default_rng(1)
    texts = [words(rng.integers(3, 96, int(n)).tolist()) for n in (12, 7, 15, 9)]
    with Runtime(art, RuntimeConfig(policy="full", budget="100%", threads=1)) as rt:
        imp = {lk: np.arange(4, 0, -1, dtype=float) for lk in rt.sparse}
        loss, sub = measure_loss(rt, texts, imp, max_new_tokens=4, batch_size=3)
        assert set(loss) == set(sub) == set(rt.sparse)
        for lk in rt.sparse:
            assert loss[lk].shape == (4,) and loss[lk][-1] == 0.0 and np.all(loss[lk] >= 0)
            assert loss[lk][0] > 0  # one expert of four changes the output somewhere
        # the measurement leaves the model exact
        again = measure_loss(rt, texts, imp, max_new_tokens=4, batch_size=3)
        assert all(np.allclose(again[0][lk], loss[lk]) for lk in rt.sparse) and again[1] == sub
        prof = Profile(imp, imp, meta={"texts": len(texts)}, loss=loss, substitute=sub)
    with Runtime(art, RuntimeConfig(policy="swapmoe", budget="25%", threads=1, swap_interval_s=3600),
                 profile=prof) as rt:
        for lk in rt.sparse:  # 25% of 4 experts: one per layer, the measured substitute
            assert set(rt.residents.layer(lk)) == {sub[lk]}


def test_cli_profile_measure_loss(art, tmp_path):
    from click.testing import CliRunner

    from swapmoe_edge.cli.main import main

    from tiny import words

    rng = np.random.default_rng(2)
    data = tmp_path / "docs.txt"
    data.write_text("".join(words(rng.integers(3, 96, 10).tolist()) + "\n" for _ in range(3)))
    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["profile", str(art), "--data", str(data), "--max-new-tokens", "3",
                                  "--measure-loss", "-o", str(out)])
    assert r.exit_code == 0, r.output
    prof = Profile.load(out)
    assert set(prof.loss) == set(prof.substitute) == set(prof.importance) and "KL" in prof.meta["loss"]
    from swapmoe_edge.artifact.manifest import load_manifest

    rungs = set(load_manifest(art).ladder)  # with a ladder in the artifact: what each rung costs, every layer
    assert rungs and all(set(row) == rungs and min(row.values()) >= 0 for row in prof.rung_loss.values())
    assert set(prof.rung_loss) == set(prof.importance) and "rung" in prof.meta["rung_loss"]
    r = CliRunner().invoke(main, ["profile", str(art), "--data", str(data), "--max-new-tokens", "3", "-o", str(out)])
    assert r.exit_code == 0 and Profile.load(out).loss == {}  # without the flag: importance only, as before


def test_cli_profile_adds_parts_onto_an_existing_profile(art, tmp_path):
    """`--add` measures only the named parts and keeps the rest of the profile as it was."""
    from click.testing import CliRunner

    from swapmoe_edge.cli.main import main

    from tiny import words

    rng = np.random.default_rng(3)
    data = tmp_path / "docs.txt"
    data.write_text("".join(words(rng.integers(3, 96, 10).tolist()) + "\n" for _ in range(3)))
    out = tmp_path / "p.json"
    run = ["profile", str(art), "--data", str(data), "--max-new-tokens", "3", "-o", str(out)]
    r = CliRunner().invoke(main, [*run, "--add", "loss"])
    assert r.exit_code == 2 and "no importance profile at" in r.stderr  # nothing to add to yet
    assert CliRunner().invoke(main, run).exit_code == 0
    base = Profile.load(out)
    assert base.loss == {} and base.rung_loss == {} and base.predictor is None
    r = CliRunner().invoke(main, [*run, "--add", "rung-loss", "--limit", "2"])
    assert r.exit_code == 0, r.output
    ladder = Profile.load(out)
    assert set(ladder.rung_loss) == set(base.importance) and ladder.loss == {}
    assert all(np.array_equal(ladder.importance[k], base.importance[k]) for k in base.importance)
    assert ladder.meta["texts"] == base.meta["texts"] == 3
    assert ladder.meta["added"] == [{"parts": ["rung-loss"], "texts": 2}]
    r = CliRunner().invoke(main, [*run, "--add", "loss", "--add", "predictor"])
    assert r.exit_code == 0, r.output
    both = Profile.load(out)
    assert set(both.loss) == set(base.importance) and both.predictor is not None
    assert both.rung_loss == ladder.rung_loss  # kept
    assert [a["parts"] for a in both.meta["added"]] == [["rung-loss"], ["loss", "predictor"]]
    r = CliRunner().invoke(main, [*run, "--add", "loss", "--measure-loss"])
    assert r.exit_code == 2 and "instead of --measure-loss" in r.stderr


def test_adding_rung_losses_to_an_artifact_without_a_ladder_says_so(tmp_path):
    from swapmoe_edge.lab.calibrate import calibrate
    from swapmoe_export import export_checkpoint

    from tiny import save_tiny, words

    plain = export_checkpoint(save_tiny(tmp_path / "ckpt", seed=5), tmp_path / "art", validate=False, quiet=True,
                              ladder_rungs=())
    data = tmp_path / "docs.txt"
    data.write_text(words([5, 9, 13, 17]) + "\n")
    prof = calibrate(plain, data, max_new_tokens=2, budget="100%")
    with pytest.raises(InputError, match="no ladder on the host"):
        calibrate(plain, data, max_new_tokens=2, budget="100%", onto=prof, parts=["rung-loss"])
    with pytest.raises(InputError, match="choose what to add"):
        calibrate(plain, data, max_new_tokens=2, budget="100%", onto=prof, parts=[])
