"""The package's top: load, Runtime and RuntimeConfig; parts, hooks, families and step generators."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from swapmoe_edge import Runtime, RuntimeConfig, load, load_model  # noqa: E402
from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.core.errors import ArtifactError  # noqa: E402
from swapmoe_edge.model.families import family_of, get_family  # noqa: E402
from swapmoe_edge.model.generate import Decoding  # noqa: E402
from swapmoe_edge.model.split import observe  # noqa: E402

from tiny import export_tiny, hf_generate, tiny_model, words  # noqa: E402

SEED, SHAPE = 51, dict(num_experts=8, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("api"), seed=SEED, **SHAPE)


def _rows(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 96, n)] + [1] for n in (10, 6)]


def test_the_package_top_loads_an_artifact_and_summarises(art):
    model = tiny_model(seed=SEED, **SHAPE)
    rows = _rows(0)
    want = hf_generate(model, rows, 6)
    with Runtime(art, RuntimeConfig(policy="full")) as rt:
        results = rt.summarize([words(r[:-1]) for r in rows], max_new_tokens=6)
    assert [r.token_ids for r in results] == want
    assert all(r.exact and isinstance(r.summary, str) and r.stats["steps"] >= 1 for r in results)

    parts = load(art, RuntimeConfig(policy="swapmoe", budget="50%"))  # the parts a Runtime is made of
    with Runtime(parts) as rt:
        assert rt.parts is parts and rt.policy is parts.policy and rt.baseline == parts.fit.baseline
        res = rt.summarize([words(rows[0][:-1])], max_new_tokens=4)[0]
        assert res.stats["budget_bytes"] >= res.stats["baseline_bytes"] > 0 and res.stats["policy"] == "swapmoe"


def test_importing_the_package_leaves_the_runtime_unloaded_until_a_name_is_used():
    code = ("import sys, swapmoe_edge\n"
            "assert not {'onnxruntime', 'numpy', 'swapmoe_edge.runtime'} & set(sys.modules), sorted(sys.modules)\n"
            "from swapmoe_edge import RuntimeConfig, load\n"
            "assert 'onnxruntime' in sys.modules and RuntimeConfig().policy == 'swapmoe'\n"
            "assert {'Runtime', 'load', 'load_model'} <= set(dir(swapmoe_edge))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        __import__("swapmoe_edge").nothing


def test_load_model_runs_the_model_with_no_budget_and_no_thread(art):
    model = tiny_model(seed=SEED, **SHAPE)
    rows = _rows(1)
    threads = threading.active_count()
    parts = load_model(art, RuntimeConfig(threads=1))
    assert threading.active_count() == threads and not hasattr(parts, "fit")
    steps = list(parts.family.generate(parts.model, rows, Decoding(max_new_tokens=8)))
    assert [s.index for s in steps] == list(range(len(steps)))  # one step a token, the caller sees each
    assert all(s.sequences is None for s in steps[:-1]) and steps[-1].sequences == hf_generate(model, rows, 8)
    assert threading.active_count() == threads


def test_a_moe_hook_observes_or_replaces_the_experts_without_touching_the_model(art):
    rows = _rows(2)
    with Runtime(art, RuntimeConfig(policy="full")) as rt:
        moe = rt.model.moe
        plain = [r.token_ids for r in rt.generate(rows, max_new_tokens=5)]
        seen: list = []
        watched = rt.generate(rows, max_new_tokens=5, hook=observe(lambda layer, *_: seen.append(layer.key)))
        assert [r.token_ids for r in watched] == plain  # observing changes nothing
        steps = watched[0].stats["steps"]
        for lk in rt.sparse:  # an encoder layer once a request, a decoder layer once a token
            assert seen.count(lk) == (1 if lk.stack == "encoder" else steps)
        zero = rt.generate(rows, max_new_tokens=5, hook=lambda layer, normed, logits, mask, moe: normed * 0)
        assert zero[0].stats["steps"] >= 1 and rt.model.moe is moe  # replaced for that call only
        assert [r.token_ids for r in rt.generate(rows, max_new_tokens=5)] == plain


def test_the_manifest_names_the_family_and_an_unknown_one_is_refused(art):
    family = family_of(load_manifest(art))
    assert (family.name, family.kind, family.top_k) == ("switch", "encoder-decoder", 1)
    with pytest.raises(ArtifactError, match="knows: switch"):
        get_family("mixtral")
