"""What a device launch does differently: background cold start, read-ahead, cached baseline,
reads that keep experts out of the page cache, forced decoder ids for benchmarks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from swapmoe_edge.system import memory, pagecache  # noqa: E402
from swapmoe_edge.core.errors import InputError  # noqa: E402
from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_edge.artifact.store import ExpertStore  # noqa: E402

from tiny import export_tiny  # noqa: E402


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("devstart"), seed=41, num_experts=8,
                       num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)


ROWS = [[int(t) for t in np.random.default_rng(3).integers(3, 96, 11)] + [1], [5, 9, 17, 1]]


def test_background_cold_start_serves_with_one_expert_per_layer_then_fills_to_the_blocking_set(art):
    with Runtime(art, RuntimeConfig(policy="prune", budget="50%")) as rt:
        blocking = rt.residents.residents()
        want = [r.token_ids for r in rt.generate(ROWS, max_new_tokens=6)]
    with Runtime(art, RuntimeConfig(policy="prune", budget="50%", cold_start="background")) as rt:
        assert all(n >= 1 for n in rt.residents.counts().values())  # routable from the start
        rt.generate(ROWS[:1], max_new_tokens=2)  # the first request opens background I/O
        assert rt.wait_ready(timeout=30)
        assert rt.residents.residents() == blocking
        assert [r.token_ids for r in rt.generate(ROWS, max_new_tokens=6)] == want


def test_full_policy_never_starts_partial(art):
    with Runtime(art, RuntimeConfig(policy="full", cold_start="background")) as rt:
        assert all(n == 8 for n in rt.residents.counts().values())


def test_on_demand_background_start_stays_exact(art):
    with Runtime(art, RuntimeConfig(policy="full")) as rt:
        want = [r.token_ids for r in rt.generate(ROWS, max_new_tokens=6)]
    with Runtime(art, RuntimeConfig(policy="on-demand", budget="40%", cold_start="background")) as rt:
        got = rt.generate(ROWS, max_new_tokens=6)
        assert [r.token_ids for r in got] == want and all(r.exact for r in got)
        assert rt.wait_ready(timeout=30)
        assert [r.token_ids for r in rt.generate(ROWS, max_new_tokens=6)] == want


def test_baseline_cache_reused_by_the_next_launch_and_refused_by_a_bigger_process(art, tmp_path, monkeypatch):
    monkeypatch.setenv("SWAPMOE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = RuntimeConfig(policy="prune", budget="50%", baseline_cache=True, threads=1)
    with Runtime(art, cfg) as rt:
        measured = rt.baseline
        assert "baseline_cached" not in rt.startup
    assert (tmp_path / "cache" / "baselines.json").is_file()
    with Runtime(art, cfg) as rt:
        assert rt.startup.get("baseline_cached") and rt.baseline == measured
    real = memory.current_rss
    monkeypatch.setattr(memory, "current_rss", lambda: real() + (1 << 30))  # this process imported 1 GiB more
    with Runtime(art, cfg) as rt:
        assert "baseline_cached" not in rt.startup
    with Runtime(art, RuntimeConfig(policy="prune", budget="50%", baseline_cache=True, threads=2)) as rt:
        assert "baseline_cached" not in rt.startup  # another thread count is another key


def test_forced_decoder_ids_are_fed_instead_of_the_models_choice(art):
    forced = [[7, 8, 9, 10], [11, 12, 13, 14]]
    with Runtime(art, RuntimeConfig(policy="full")) as rt:
        got = rt.generate(ROWS, max_new_tokens=4, forced_ids=forced)
        assert [r.token_ids for r in got] == forced and got[0].stats["steps"] == 4
        with pytest.raises(InputError, match="at least max_new_tokens"):
            rt.generate(ROWS, max_new_tokens=5, forced_ids=forced)
        with pytest.raises(InputError, match="num_beams=1"):
            rt.generate(ROWS, max_new_tokens=4, num_beams=2, forced_ids=forced)


@pytest.mark.parametrize("mode", ["direct", "fadvise"])
def test_expert_reads_leave_nothing_in_the_page_cache_and_match_cached_reads(art, mode):
    m = load_manifest(art)
    keys = list(m.experts)[:4]
    files = [m.path(m.experts[k].weights_file) for k in keys]
    ref = {k: {n: a.copy() for n, a in ExpertStore(m, read_mode="cached").read(k).feeds.items()} for k in keys}
    pagecache.drop(files)
    store = ExpertStore(m, read_mode=mode)
    for k in keys:
        for own in (True, False):
            e = store.read(k, own_mapping=own)
            assert all(np.array_equal(e.feeds[n], ref[k][n]) for n in ref[k])
    if store.read_mode == mode:  # direct falls back to fadvise on filesystems without O_DIRECT
        assert sum(pagecache.cached_bytes(f) for f in files) == 0


def test_stats_say_which_limit_governs(art):
    with Runtime(art, RuntimeConfig(policy="prune", budget="50%")) as rt:
        assert rt.generate(ROWS[:1], max_new_tokens=2)[0].stats["budget_source"] == "cap"
