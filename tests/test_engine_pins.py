"""The engine chooses what the policies it replaced chose: resident sets, tokens and summaries on
a tiny model, pinned from the code before the engine (full, on-demand and prune exactly; prune,
swapmoe and the ladder the same residents after the start, after swaps and after a falling budget)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.residency.importance import Profile  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_export.exporter import export_checkpoint  # noqa: E402

from tiny import save_tiny  # noqa: E402

MODEL = dict(num_experts=8, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)
INPUTS = [[5, 6, 7, 8, 9, 10, 11, 12, 1], [13, 14, 15, 1], [20, 21, 22, 23, 24, 30, 40, 50, 60, 1]]
TEXTS = ["w5 w9 w13 w40 w41 w77", "w90 w12 w3", "w33 w34 w35 w36 w50 w51 w52 w60"]

# Recorded with the policies as they were before the engine (Policy and LadderPolicy), by running
# each case below; residents as "layer=expert[/rung] ...".
PINS = {
    ('full', '100%', 'plain'): dict(
        counts={'enc.L00': 8, 'enc.L01': 8, 'dec.L00': 8, 'dec.L01': 8},
        warm='enc.L00=0,1,2,3,4,5,6,7 enc.L01=0,1,2,3,4,5,6,7 dec.L00=0,1,2,3,4,5,6,7 dec.L01=0,1,2,3,4,5,6,7',
        tokens=[[52, 52, 52, 52, 52, 52], [15, 15, 15, 15, 15, 15], [63, 63, 63, 63, 63, 63]],
        summaries=['w63 w63 w63 w63 w63 w63', 'w38 w38 w38 w38 w53 w53', 'w63 w63 w63 w63 w63 w63'],
    ),
    ('prune', '25%', 'plain'): dict(
        counts={'enc.L00': 1, 'enc.L01': 1, 'dec.L00': 4, 'dec.L01': 2},
        warm='enc.L00=6 enc.L01=1 dec.L00=0,2,5,6 dec.L01=3,7',
        shrunk='enc.L00=6 enc.L01=1 dec.L00=0 dec.L01=7',
        tokens=[[38, 38, 38, 38, 38, 38], [47, 47, 47, 47, 47, 47], [67, 67, 67, 67, 67, 67]],
        after_shrink_tokens=[[38, 38, 38, 38, 38, 38], [47, 47, 47, 47, 47, 47], [67, 67, 67, 67, 67, 67]],
        summaries=['w33 w33 w33 w33 w33 w33', 'w78 w78 w78 w78 w78 w78', 'w67 w67 w67 w67 w67 w67'],
    ),
    ('prune', '50%', 'plain'): dict(
        counts={'enc.L00': 1, 'enc.L01': 1, 'dec.L00': 7, 'dec.L01': 7},
        warm='enc.L00=6 enc.L01=1 dec.L00=0,1,2,4,5,6,7 dec.L01=0,2,3,4,5,6,7',
        shrunk='enc.L00=6 enc.L01=1 dec.L00=0,2,5,6 dec.L01=2,3,7',
        tokens=[[38, 38, 38, 38, 38, 38], [84, 84, 84, 84, 26, 26], [38, 38, 38, 38, 38, 38]],
        after_shrink_tokens=[[38, 38, 38, 38, 38, 38], [53, 53, 53, 53, 53, 53], [38, 38, 38, 38, 38, 38]],
        summaries=['w63 w63 w63 w63 w63 w63', 'w78 w78 w78 w78 w78 w78', 'w63 w63 w63 w63 w63 w63'],
    ),
    ('prune', '75%', 'plain'): dict(
        counts={'enc.L00': 4, 'enc.L01': 4, 'dec.L00': 8, 'dec.L01': 8},
        warm='enc.L00=0,4,6,7 enc.L01=1,2,4,6 dec.L00=0,1,2,3,4,5,6,7 dec.L01=0,1,2,3,4,5,6,7',
        shrunk='enc.L00=6 enc.L01=1 dec.L00=0,2,5,6 dec.L01=2,3,7',
        tokens=[[44, 44, 44, 44, 44, 44], [63, 63, 63, 63, 63, 63], [63, 63, 63, 63, 63, 63]],
        after_shrink_tokens=[[38, 38, 38, 38, 38, 38], [53, 53, 53, 53, 53, 53], [38, 38, 38, 38, 38, 38]],
        summaries=['w63 w63 w63 w63 w63 w63', 'w38 w38 w38 w38 w53 w53', 'w63 w63 w63 w63 w63 w63'],
    ),
    ('on-demand', '25%', 'plain'): dict(
        counts={'enc.L00': 1, 'enc.L01': 1, 'dec.L00': 3, 'dec.L01': 3},
        warm='enc.L00=4 enc.L01=1 dec.L00=1,4,6 dec.L01=2,3,5',
        shrunk='enc.L00=7 enc.L01=6 dec.L00=4 dec.L01=2',
        tokens=[[52, 52, 52, 52, 52, 52], [15, 15, 15, 15, 15, 15], [63, 63, 63, 63, 63, 63]],
        after_shrink_tokens=[[52, 52, 52, 52, 52, 52], [15, 15, 15, 15, 15, 15], [63, 63, 63, 63, 63, 63]],
        summaries=['w63 w63 w63 w63 w63 w63', 'w38 w38 w38 w38 w53 w53', 'w63 w63 w63 w63 w63 w63'],
    ),
    ('on-demand', '50%', 'plain'): dict(
        counts={'enc.L00': 3, 'enc.L01': 3, 'dec.L00': 6, 'dec.L01': 4},
        warm='enc.L00=1,4,6 enc.L01=0,1,2 dec.L00=0,1,3,4,6,7 dec.L01=2,3,5,7',
        shrunk='enc.L00=7 enc.L01=6 dec.L00=0,3,4,6 dec.L01=1,2,7',
        tokens=[[52, 52, 52, 52, 52, 52], [15, 15, 15, 15, 15, 15], [63, 63, 63, 63, 63, 63]],
        after_shrink_tokens=[[52, 52, 52, 52, 52, 52], [15, 15, 15, 15, 15, 15], [63, 63, 63, 63, 63, 63]],
        summaries=['w63 w63 w63 w63 w63 w63', 'w38 w38 w38 w38 w53 w53', 'w63 w63 w63 w63 w63 w63'],
    ),
    ('swapmoe', '25%', 'plain'): dict(
        counts={'enc.L00': 1, 'enc.L01': 1, 'dec.L00': 3, 'dec.L01': 3},
        warm='enc.L00=4 enc.L01=1 dec.L00=1,4,6 dec.L01=2,3,5',
        after_swaps='enc.L00=4 enc.L01=1 dec.L00=0,2,4 dec.L01=1,2,5',
        shrunk='enc.L00=4 enc.L01=1 dec.L00=4 dec.L01=2',
        tokens=[[60, 60, 60, 60, 60, 60], [84, 84, 84, 84, 84, 84], [38, 38, 38, 38, 38, 38]],
        after_shrink_tokens=[[60, 60, 60, 60, 60, 60], [84, 84, 84, 84, 84, 84], [38, 38, 38, 38, 38, 38]],
    ),
    ('swapmoe', '50%', 'plain'): dict(
        counts={'enc.L00': 3, 'enc.L01': 3, 'dec.L00': 6, 'dec.L01': 4},
        warm='enc.L00=1,4,6 enc.L01=0,1,2 dec.L00=0,1,3,4,6,7 dec.L01=2,3,5,7',
        after_swaps='enc.L00=3,4,6 enc.L01=1,2,6 dec.L00=0,1,2,3,4,6 dec.L01=2,3,5,7',
        shrunk='enc.L00=3 enc.L01=6 dec.L00=0,2,3,4 dec.L01=2,3,5',
        tokens=[[38, 38, 38, 38, 38, 38], [15, 15, 15, 15, 15, 15], [63, 63, 63, 63, 63, 63]],
        after_shrink_tokens=[[63, 63, 63, 63, 63, 63], [63, 63, 67, 67, 67, 67], [78, 78, 78, 78, 78, 78]],
    ),
    ('swapmoe', '75%', 'plain'): dict(
        counts={'enc.L00': 4, 'enc.L01': 6, 'dec.L00': 7, 'dec.L01': 7},
        warm='enc.L00=1,4,5,6 enc.L01=0,1,2,3,5,7 dec.L00=0,1,3,4,5,6,7 dec.L01=0,2,3,4,5,6,7',
        after_swaps='enc.L00=3,4,5,6 enc.L01=0,1,2,3,5,6 dec.L00=0,1,2,3,4,6,7 dec.L01=0,2,3,4,5,6,7',
        shrunk='enc.L00=3 enc.L01=6 dec.L00=0,2,3,4 dec.L01=2,5,7',
        tokens=[[63, 63, 63, 63, 63, 63], [53, 53, 53, 53, 53, 53], [38, 38, 38, 38, 38, 38]],
        after_shrink_tokens=[[63, 63, 63, 63, 63, 63], [63, 63, 67, 67, 67, 67], [78, 78, 78, 78, 78, 78]],
    ),
    ('ladder', '25%', 'plain'): dict(
        warm='enc.L00=4/int4 enc.L01=1/int4 dec.L00=0/int4,1/int4,4/int4,6/int4 dec.L01=2/int4,3/int4,5',
        after_swaps='enc.L00=4/int4 enc.L01=1/int4 dec.L00=0,1/int4,4,6/int4 dec.L01=2,5',
        shrunk='enc.L00=4/int4 enc.L01=1/int4 dec.L00=0,4 dec.L01=2',
        tokens=[[38, 38, 38, 38, 38, 38], [53, 53, 53, 53, 53, 53], [63, 63, 63, 63, 63, 63]],
        after_shrink_tokens=[[38, 38, 38, 38, 38, 38], [84, 84, 84, 84, 84, 84], [63, 63, 63, 63, 63, 63]],
    ),
    ('ladder', '50%', 'plain'): dict(
        warm='enc.L00=1/int4,4,6/int4 enc.L01=0/int4,1/int4,2/int4 dec.L00=0,1,3/int4,4,6,7/int4 dec.L01=2,3,5,6/int4,7',
        after_swaps='enc.L00=4,6/int4 enc.L01=1/int4,2/int4,6 dec.L00=0,1,2,3,4,6,7/int4 dec.L01=2,3,5,7',
        shrunk='enc.L00=4 enc.L01=1/int4,2/int4,6 dec.L00=0,2,3,4 dec.L01=2',
        tokens=[[38, 38, 38, 38, 38, 38], [15, 15, 15, 15, 15, 15], [63, 63, 63, 63, 63, 63]],
        after_shrink_tokens=[[78, 78, 78, 78, 78, 78], [53, 53, 53, 53, 53, 53], [63, 63, 63, 63, 63, 63]],
    ),
    ('swapmoe', '25%', 'measured'): dict(
        counts={'enc.L00': 1, 'enc.L01': 1, 'dec.L00': 1, 'dec.L01': 5},
        warm='enc.L00=1 enc.L01=6 dec.L00=4 dec.L01=2,3,5,6,7',
        after_swaps='enc.L00=1 enc.L01=6 dec.L00=4 dec.L01=1,2,4,5,7',
        shrunk='enc.L00=1 enc.L01=6 dec.L00=4 dec.L01=2',
        tokens=[[18, 18, 18, 18, 18, 18], [84, 84, 84, 84, 84, 84], [38, 38, 38, 38, 38, 38]],
        after_shrink_tokens=[[18, 18, 18, 18, 18, 18], [84, 84, 84, 84, 84, 84], [38, 38, 38, 38, 38, 38]],
    ),
    ('ladder', '25%', 'measured'): dict(
        warm='enc.L00=4 enc.L01=1 dec.L00=4 dec.L01=2,3,5,6,7',
        after_swaps='enc.L00=4 enc.L01=1 dec.L00=4 dec.L01=1,2,4,5,6',
        shrunk='enc.L00=4 enc.L01=1 dec.L00=4 dec.L01=2',
        tokens=[[60, 60, 60, 60, 60, 60], [84, 84, 84, 84, 84, 84], [38, 38, 38, 38, 38, 38]],
        after_shrink_tokens=[[60, 60, 60, 60, 60, 60], [84, 84, 84, 84, 84, 84], [38, 38, 38, 38, 38, 38]],
    ),
}


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("pins")
    return export_checkpoint(save_tiny(root / "ckpt", seed=7, **MODEL), root / "art", validate=False, quiet=True)


def _profiles(layers):
    E = MODEL["num_experts"]
    rng = np.random.default_rng(11)
    imp = {lk: rng.gamma(0.7, size=E) + 0.01 for lk in layers}
    plain = Profile(imp, {lk: np.ones(E) for lk in layers}, meta={"texts": 4})
    loss = {lk: np.append(np.sort(rng.random(E - 1))[::-1] * (1 + i), 0.0) for i, lk in enumerate(layers)}
    measured = Profile(imp, {lk: np.ones(E) for lk in layers}, meta={"texts": 4}, loss=loss,
                       substitute={lk: int(rng.integers(E)) for lk in layers})
    return {"plain": plain, "measured": measured}


def _residents(rt) -> str:
    return " ".join(f"{lk.name}=" + ",".join(f"{e}/{x.rung}" if x.rung else str(e)
                                             for e, x in sorted(rt.residents.layer(lk).items())) for lk in rt.sparse)


@pytest.mark.parametrize("case", list(PINS), ids=lambda c: "-".join(c))
def test_residents_tokens_and_summaries_are_those_of_the_policies_before_the_engine(art, case):
    policy, budget, prof = case
    pin = PINS[case]
    m = load_manifest(art)
    profile = _profiles([lay.key for lay in m.sparse_layers()])[prof]
    cfg = RuntimeConfig(policy=policy, budget=budget, threads=1, read_mode="cached", reserve_bytes=0,
                        swap_interval_s=3600, lowbit_kernel="standard",  # standard: a copy costs its bytes
                        on_demand_evict="recency")  # the rule on-demand's pins were taken under
    with Runtime(art, cfg, profile=profile) as rt:
        if "counts" in pin:
            assert {lk.name: n for lk, n in rt.policy.limits.counts.items()} == pin["counts"]
        assert _residents(rt) == pin["warm"]
        assert [r.token_ids for r in rt.generate(INPUTS, max_new_tokens=6)] == pin["tokens"]
        if "summaries" in pin:
            assert [r.summary for r in rt.summarize(TEXTS, max_new_tokens=6)] == pin["summaries"]
        if "after_swaps" in pin:
            for _ in range(3):
                rt.policy.swap_once()
            assert _residents(rt) == pin["after_swaps"]
        if "shrunk" in pin:
            rt.policy.resize(rt.baseline + int((0.3 if budget in ("50%", "75%") else 0.15) * m.expert_bytes))
            assert _residents(rt) == pin["shrunk"]
            assert [r.token_ids for r in rt.generate(INPUTS, max_new_tokens=6)] == pin["after_shrink_tokens"]
