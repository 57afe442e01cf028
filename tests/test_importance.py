"""Eq. 1 importance, its online tracker, and the profile file."""

import json
import threading

import numpy as np
import pytest

from swapmoe_edge.core.errors import ArtifactError
from swapmoe_edge.residency.importance import ImportanceTracker, Profile
from swapmoe_edge.core.keys import parse_layer_name
from swapmoe_edge.core.keys import LayerKey

ENC = LayerKey("encoder", 1)
DEC = LayerKey("decoder", 5)


def softmax(logits):
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def tracker():
    return ImportanceTracker({ENC: np.array([1.0, 2.0, 4.0]), DEC: np.array([1.0, 1.0, 1.0, 1.0])})


def test_eq1_value_on_a_hand_computed_example():
    t = tracker()
    x_norm = np.array([2.0, 3.0, 1.0])
    probs = np.array([
        [0.7, 0.2, 0.1],  # -> expert 0: 2 * 0.7 * 1 = 1.4
        [0.1, 0.3, 0.6],  # -> expert 2: 3 * 0.6 * 4 = 7.2
        [0.5, 0.1, 0.4],  # -> expert 0: 1 * 0.5 * 1 = 0.5
    ])
    t.observe(ENC, x_norm, probs)
    imp, counts = t.snapshot_with_counts()
    np.testing.assert_allclose(imp[ENC], [1.9, 0.0, 7.2])
    np.testing.assert_allclose(counts[ENC], [2, 0, 1])
    np.testing.assert_allclose(imp[DEC], 0.0)


def test_masked_out_expert_still_earns_importance_from_the_unmasked_choice():
    # Expert 2 is not resident: the token loop masks it and routes to expert 1, but the
    # tracker sees the router's full distribution, so expert 2 is credited.
    t = tracker()
    logits = np.array([[0.0, 1.0, 3.0]])
    masked = logits.copy()
    masked[:, 2] = -np.inf
    assert softmax(masked).argmax() == 1
    t.observe(ENC, np.array([1.0]), softmax(logits))
    imp = t.snapshot()[ENC]
    assert imp[2] > 0 and imp[1] == 0 and imp[0] == 0


def test_invalid_tokens_are_ignored():
    t = tracker()
    probs = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])
    t.observe(ENC, np.array([1.0, 1.0]), probs, valid=np.array([True, False]))
    _, counts = t.snapshot_with_counts()
    np.testing.assert_allclose(counts[ENC], [1, 0, 0])


def test_observe_accepts_batch_by_sequence_shapes():
    t = tracker()
    probs = np.full((2, 3, 4), 0.1)
    probs[..., 3] = 0.7  # [B, T, E]
    t.observe(DEC, np.ones((2, 3)), probs, valid=np.ones((2, 3), bool))
    np.testing.assert_allclose(t.snapshot()[DEC], [0, 0, 0, 6 * 0.7])


def test_observe_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="router gives 4 experts"):
        tracker().observe(ENC, np.ones(2), np.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="token norms"):
        tracker().observe(ENC, np.ones(3), np.full((2, 3), 1 / 3))


def test_decay_makes_an_exponential_moving_average():
    t = tracker()
    one = np.array([[1.0, 0.0, 0.0]])
    t.observe(ENC, np.ones(1), one)
    t.decay(0.5)
    t.observe(ENC, np.ones(1), one)
    imp, counts = t.snapshot_with_counts()
    assert imp[ENC][0] == pytest.approx(1.5) and counts[ENC][0] == pytest.approx(1.5)
    with pytest.raises(ValueError):
        t.decay(1.5)


def test_snapshot_is_a_copy():
    t = tracker()
    snap = t.snapshot()
    snap[ENC][:] = 99
    assert t.snapshot()[ENC].sum() == 0


@pytest.mark.parametrize("later", [False, True], ids=["observe", "observe_later"])
def test_concurrent_observe_and_snapshot_lose_nothing(later):
    t = tracker()
    probs = np.tile([[0.0, 1.0, 0.0]], (10, 1))

    def work():
        for _ in range(200):
            if later:  # hidden states of norm 1, queued until a reader adds them up
                t.observe_later(ENC, np.full((10, 4), 0.5), probs)
            else:
                t.observe(ENC, np.ones(10), probs)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        t.snapshot()
    for th in threads:
        th.join()
    assert t.snapshot()[ENC][1] == pytest.approx(4 * 200 * 10 * 2.0)


def test_observe_later_adds_what_observe_adds_once_a_reader_looks():
    rng = np.random.default_rng(0)
    now, later = tracker(), tracker()
    for step in range(40):
        n = 1 if step % 3 else 70  # decode-sized calls are queued, a prefill-sized one is added at once
        hidden = rng.normal(size=(n, 1, 8))
        probs = softmax(rng.normal(size=(n, 1, 3)))
        valid = rng.random((n, 1)) < 0.8 if step % 2 else None
        now.observe(ENC, np.linalg.norm(hidden, axis=-1), probs, valid)
        later.observe_later(ENC, hidden, probs, valid)
    assert len(later._later) == sum(1 for step in range(40) if step % 3)  # queued, not yet added
    got, want = later.snapshot_with_counts(), now.snapshot_with_counts()
    np.testing.assert_allclose(got[0][ENC], want[0][ENC], rtol=1e-12)
    np.testing.assert_array_equal(got[1][ENC], want[1][ENC])
    assert not later._later


def test_observe_later_queue_is_bounded_and_decay_adds_it_first():
    t = tracker()
    probs = np.array([[0.0, 0.0, 0.0, 1.0]])
    for _ in range(t.LATER_MAX_CALLS + 5):
        t.observe_later(DEC, np.full((1, 4), 0.5), probs)  # ||x|| = 1
    assert len(t._later) < t.LATER_MAX_CALLS
    t.decay(0.5)  # the queued calls count before the decay
    assert t.snapshot()[DEC][3] == pytest.approx(0.5 * (t.LATER_MAX_CALLS + 5))
    wide = np.full((64, 8192), 1 / np.sqrt(8192))  # 4 MiB of hidden states a call, ||x|| = 1 each
    t.observe_later(DEC, wide, np.tile(probs, (64, 1)))
    assert not t._later and t._later_bytes == 0  # over the byte bound: added at once, nothing held


def test_profile_round_trips_through_json(tmp_path):
    t = tracker()
    t.observe(ENC, np.array([2.0]), np.array([[0.1, 0.2, 0.7]]))
    prof = Profile.from_tracker(t, meta={"texts": 3})
    path = prof.save(tmp_path)
    assert path.name == "profile.json"
    raw = json.loads(path.read_text())
    assert set(raw["layers"]) == {"enc.L01", "dec.L05"} and raw["schema_version"] == 1
    back = Profile.load(tmp_path)
    assert back.source == "online" and back.meta == {"texts": 3}
    for key in (ENC, DEC):
        np.testing.assert_array_equal(back.importance[key], prof.importance[key])
        np.testing.assert_array_equal(back.counts[key], prof.counts[key])


def test_profile_arrays_are_read_only():
    prof = Profile.from_norms({ENC: np.array([1.0, 2.0])})
    with pytest.raises(ValueError):
        prof.importance[ENC][0] = 5.0


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"format": "something-else"}',
        '{"format": "swapmoe-profile", "schema_version": 99, "layers": {}}',
        '{"format": "swapmoe-profile", "schema_version": 1}',
        '{"format": "swapmoe-profile", "schema_version": 1, "layers": {"xyz.L01": '
        '{"importance": [1], "counts": [1]}}}',
        '{"format": "swapmoe-profile", "schema_version": 1, "layers": {"enc.L01": '
        '{"importance": [1, 2], "counts": [1]}}}',
        '{"format": "swapmoe-profile", "schema_version": 1, "layers": {"enc.L01": '
        '{"importance": [-1], "counts": [1]}}}',
    ],
)
def test_corrupt_profile_raises_artifact_error_that_says_what_to_do(tmp_path, content):
    path = tmp_path / "profile.json"
    path.write_text(content)
    with pytest.raises(ArtifactError, match="swapmoe profile"):
        Profile.load(path)


def test_missing_profile_raises_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="no importance profile"):
        Profile.load(tmp_path / "profile.json")


def test_norm_fallback_orders_experts_like_the_pruning_baseline():
    prof = Profile.from_norms({ENC: np.array([1.0, 5.0, 3.0])})
    assert prof.source == "norms"
    assert list(np.argsort(-prof.importance[ENC])) == [1, 2, 0]
    np.testing.assert_array_equal(prof.counts[ENC], 0)


def test_profile_from_another_model_is_refused():
    prof = Profile.from_norms({ENC: np.ones(3)})
    prof.check_layers({ENC: 3})
    with pytest.raises(ArtifactError, match="does not match the model"):
        prof.check_layers({ENC: 8})


def test_tracker_can_start_from_a_profile():
    t = tracker()
    t.seed(Profile.from_norms({ENC: np.array([1.0, 2.0, 3.0])}), weight=0.5)
    np.testing.assert_allclose(t.snapshot()[ENC], [0.5, 1.0, 1.5])


def test_layer_names_parse_back_to_keys():
    assert parse_layer_name("dec.L05") == DEC and parse_layer_name(ENC.name) == ENC
    with pytest.raises(ValueError):
        parse_layer_name("decoder.5")
