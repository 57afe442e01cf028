"""The hindsight quality bound (hindsight.py): residents set per request from that request's own
routing, exact at full budget, and Policy.hold that it rests on."""

from __future__ import annotations

import numpy as np
import pytest

from swapmoe_edge.core.errors import InputError

from test_substitution import DEC, ENC, _policy

pytest.importorskip("torch")

from swapmoe_edge.lab import hindsight  # noqa: E402
from swapmoe_edge.residency.planner import top_experts  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402

from tiny import export_tiny, words  # noqa: E402


def test_hold_makes_a_layer_hold_exactly_the_given_experts():
    pol = _policy({ENC: 2, DEC: 3}, {})
    before, dec = set(pol.residents.layer(ENC)), set(pol.residents.layer(DEC))
    assert pol.hold(DEC, [3, 2]) == len({2, 3} - dec)  # reads only what is missing
    assert set(pol.residents.layer(DEC)) == {2, 3}
    assert set(pol.residents.layer(ENC)) == before  # other layers untouched
    assert pol.hold(DEC, [2, 3]) == 0  # nothing to read
    assert pol.hold(DEC, [0, 1, 2]) == 2 and set(pol.residents.layer(DEC)) == {0, 1, 2}
    with pytest.raises(ValueError, match="budget is 3"):
        pol.hold(DEC, [0, 1, 2, 3])
    with pytest.raises(ValueError):
        pol.hold(DEC, [])


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("hindsight"), seed=43, num_experts=8,
                       num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)


def _texts(n=6):
    rng = np.random.default_rng(5)
    return [words(rng.integers(3, 96, int(rng.integers(6, 20))).tolist()) for _ in range(n)]


def test_at_full_budget_both_bounds_give_full_s_summaries(art):
    texts = _texts()
    with Runtime(art, RuntimeConfig(policy="full", threads=1)) as rt:
        want = [r.summary for r in rt.summarize(texts, max_new_tokens=6)]
    for mode in hindsight.MODES:
        got = hindsight.bound_summaries(art, texts, "100%", mode, batch_size=4, max_new_tokens=6)
        assert got["summaries"] == want and got["requests"] >= 2


def test_hindsight_holds_each_request_s_own_most_important_experts(art, monkeypatch):
    texts = _texts()
    held: list[dict] = []
    real_generate = Runtime.generate

    def spying(self, ids, *a, **kw):  # what the swapmoe runtime holds when a request starts
        if self.config.policy == "swapmoe":
            held.append({lk: set(self.residents.layer(lk)) for lk in self.sparse})
        return real_generate(self, ids, *a, **kw)

    monkeypatch.setattr(Runtime, "generate", spying)
    got = hindsight.bound_summaries(art, texts, "50%", "hindsight", batch_size=1, max_new_tokens=6)
    assert got["requests"] == len(texts) == len(held) and got["reads"] > 0
    with Runtime(art, RuntimeConfig(policy="full", threads=1)) as full:
        for text, sets in zip(texts, held):  # one document per request here
            imp = full.profile_texts([text], 6, batch_size=1).importance
            for lk, resident in sets.items():
                k = len(resident)
                assert 0 < k < 8  # the budget bites: a real choice was made
                assert resident == set(top_experts(imp[lk], k))  # no measured substitutes here
    static = hindsight.bound_summaries(art, texts, "50%", "static", batch_size=1, max_new_tokens=6)
    assert static["reads"] == 0 and len(static["summaries"]) == len(texts)


def test_bad_mode_and_empty_input_are_refused(art):
    with pytest.raises(InputError, match="mode must be"):
        hindsight.bound_summaries(art, ["w3 w4"], "50%", "oracle")
    with pytest.raises(InputError, match="at least one document"):
        hindsight.bound_summaries(art, [], "50%")
