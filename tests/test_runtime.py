"""The budgeted runtime: exactness, policies, swapping, budgets and bad input."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from swapmoe_edge.core.errors import ArtifactError, BudgetError, InputError  # noqa: E402
from swapmoe_edge.core.keys import ExpertKey, LayerKey
from swapmoe_edge.residency.limits import ExpertUnavailableError  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_edge.artifact.store import ExpertReadError, ExpertStore  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402

from tiny import hf_generate, tiny_model, tiny_tokenizer, words  # noqa: E402

CONFIGS = {
    "8exp_all_sparse": dict(num_experts=8, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2),
    "4exp_deeper": dict(num_experts=4, num_layers=4, num_decoder_layers=3, num_sparse_encoder_layers=2),  # HF generate breaks when the decoder is deeper
    "16exp_capacity": dict(num_experts=16, expert_capacity=3),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    out = {}
    for i, (name, overrides) in enumerate(CONFIGS.items()):
        model = tiny_model(seed=20 + i, **overrides)
        model.save_pretrained(root / name / "ckpt")
        tiny_tokenizer(model.config.vocab_size).save(str(root / name / "ckpt" / "tokenizer.json"))
        export_checkpoint(root / name / "ckpt", root / name / "art", quiet=True)
        out[name] = (model, root / name / "art")
    return out


def _rows(seed: int, lengths=(12, 7, 9), vocab: int = 96) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, n)] + [1] for n in lengths]


_hf_generate = hf_generate


def _run(art, rows, max_new_tokens=10, num_beams=1, **cfg) -> list:
    with Runtime(art, RuntimeConfig(**cfg)) as rt:
        return rt.generate(rows, max_new_tokens=max_new_tokens, num_beams=num_beams)


# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("num_beams", [1, 3])
def test_full_policy_reproduces_hf_generate_token_for_token(models, name, num_beams):
    model, art = models[name]
    for seed in (0, 1):
        rows = _rows(seed)
        want = _hf_generate(model, rows, 12, num_beams)
        got = [r.token_ids for r in _run(art, rows, 12, num_beams, policy="full")]
        assert got == want


@pytest.mark.parametrize("policy", ["on-demand", "swapmoe", "prune"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_any_policy_whose_budget_holds_every_expert_is_exact(models, policy, num_beams):
    model, art = models["8exp_all_sparse"]
    rows = _rows(2)
    results = _run(art, rows, 10, num_beams, policy=policy, budget="100%")
    assert [r.token_ids for r in results] == _hf_generate(model, rows, 10, num_beams)
    assert results[0].stats["first_choice_resident"] == 1.0


def test_on_demand_with_one_slot_per_layer_is_exact_and_counts_its_loads(models):
    model, art = models["8exp_all_sparse"]
    rt = Runtime(art, RuntimeConfig(policy="on-demand", budget="13%"))  # 13% of 8 experts: one per layer
    try:
        assert set(rt.residents.counts().values()) == {1}
        rows = _rows(3)
        results = rt.generate(rows, max_new_tokens=10)
        assert [r.token_ids for r in results] == _hf_generate(model, rows, 10)
        st = results[0].stats
        assert st["exact"] is True and st["loads"] > 0 and st["bytes_read"] > 0 and st["stall_ms"] > 0
        assert max(rt.residents.counts().values()) == 1
    finally:
        rt.close()


# -- swapmoe --------------------------------------------------------------------------------------


class SlowStore(ExpertStore):
    """Flash that takes ``delay`` seconds per expert; counts reads made on the calling thread."""

    def __init__(self, manifest, delay=0.0, fail=(), **kw):
        super().__init__(manifest, **kw)
        self.delay, self.fail = delay, set(fail)
        self.loop_thread: int | None = None
        self.reads_on_loop = 0

    def _read_bytes(self, key, own_mapping=True, rung=None):
        if threading.get_ident() == self.loop_thread:
            self.reads_on_loop += 1
        if key in self.fail:
            raise ExpertReadError(key, self.manifest.path(self.manifest.experts[key].weights_file), "injected I/O error")
        time.sleep(self.delay)
        return super()._read_bytes(key, own_mapping, rung)


def _runtime(art, store_kw=None, **cfg) -> Runtime:
    from swapmoe_edge.artifact.manifest import load_manifest

    store = SlowStore(load_manifest(art), **(store_kw or {}))
    rt = Runtime(art, RuntimeConfig(**cfg), store=store)
    store.loop_thread = threading.get_ident()
    return rt


def test_swapmoe_never_stalls_the_token_loop_while_flash_is_slow(models):
    _, art = models["8exp_all_sparse"]
    rt = _runtime(art, {"delay": 0.3}, policy="swapmoe", budget="25%", swap_interval_s=0.01)
    try:
        t0 = time.perf_counter()
        results = rt.generate(_rows(4), max_new_tokens=8)
        elapsed = time.perf_counter() - t0
        st = results[0].stats
        assert st["stall_ms"] == 0.0 and st["exact"] is False
        assert rt.store.reads_on_loop == 0  # the generating thread never touched flash
        assert elapsed < 0.3 * 3  # far less than the reads the swapper is doing meanwhile
    finally:
        rt.close()


def test_swapmoe_residents_never_exceed_the_per_layer_counts(models):
    _, art = models["8exp_all_sparse"]
    rt = _runtime(art, policy="swapmoe", budget="40%", swap_interval_s=0.005, max_swaps_per_interval=8, hysteresis=0.0)
    seen = []
    orig_replace, orig_put = rt.residents.replace, rt.residents.put

    def check(fn):
        def wrapped(*a, **kw):
            fn(*a, **kw)
            seen.append({k: v for k, v in rt.residents.counts().items()})
        return wrapped

    rt.residents.replace, rt.residents.put = check(orig_replace), check(orig_put)
    try:
        for seed in range(4):
            rt.generate(_rows(seed, (20, 20)), max_new_tokens=6)
            time.sleep(0.05)
        limits = {lk.name: n for lk, n in rt.policy.limits.counts.items()}
        assert seen, "the swapper did nothing: the test would prove nothing"
        for snap in seen:
            assert all(snap[k] <= limits[k] for k in snap)
        assert rt.residents.nbytes + rt.baseline <= rt.budget_bytes
    finally:
        rt.close()


def test_swapmoe_residents_follow_the_input(models):
    """Inputs that route to other experts bring those experts in (no waiting: swap_once by hand)."""
    _, art = models["8exp_all_sparse"]
    rt = _runtime(art, policy="swapmoe", budget="40%", swap_interval_s=3600, hysteresis=0.0, max_swaps_per_interval=16, decay=0.3)
    try:
        sets, before, after = [], [], []
        for lo, hi in ((3, 30), (60, 96)):
            rows = [[int(t) for t in np.random.default_rng(lo).integers(lo, hi, 24)] + [1]]
            for i in range(3):  # the moving average forgets the other input
                share = rt.generate(rows, max_new_tokens=4)[0].stats["first_choice_resident"]
                if i == 0:
                    before.append(share)
            rt.policy.swap_once()
            residents = rt.residents.residents()
            imp = rt.policy.tracker.snapshot()
            for lk, res in residents.items():  # the residents are now this input's most important experts
                if len(res) < 2:  # a layer's only expert is never evicted before its successor is read
                    continue
                top = set(np.argsort(-imp[lk], kind="stable")[: len(res)].tolist())
                assert res == top
            sets.append(residents)
            after.append(rt.generate(rows, max_new_tokens=4)[0].stats["first_choice_resident"])
        assert sets[0] != sets[1]
        # once the new input's experts are in, more of its first choices are served by residents
        assert after[1] > before[1]
    finally:
        rt.close()


def test_a_failed_expert_read_is_never_run_and_lossy_policies_report_it(models):
    _, art = models["8exp_all_sparse"]
    from swapmoe_edge.artifact.manifest import load_manifest

    bad = sorted(load_manifest(art).experts)[:8]  # every expert of the first sparse layer but one
    rt = _runtime(art, {"fail": bad[:7]}, policy="swapmoe", budget="100%")
    try:
        res = rt.generate(_rows(5), max_new_tokens=5)
        st = res[0].stats
        assert set(st["unavailable_experts"]) == {k.name for k in bad[:7]}
        assert rt.residents.counts()[bad[0].layer_key.name] == 1  # only the readable one serves the layer
        assert st["exact"] is False and len(res[0].token_ids) > 0
    finally:
        rt.close()


def test_exact_policies_fail_loudly_on_an_unreadable_expert(models):
    _, art = models["8exp_all_sparse"]
    from swapmoe_edge.artifact.manifest import load_manifest

    keys = sorted(load_manifest(art).experts)
    with pytest.raises(ExpertUnavailableError, match="injected I/O error"):
        _runtime(art, {"fail": keys[:1]}, policy="full")
    rt = _runtime(art, policy="on-demand", budget="13%")
    try:
        resident = {ExpertKey(lk.stack, lk.layer, e) for lk, es in rt.residents.residents().items() for e in es}
        rt.store.fail = set(keys) - resident  # the read fails mid-run, on the first miss
        with pytest.raises(ExpertUnavailableError, match="exact"):
            rt.generate(_rows(9, (30, 30)), max_new_tokens=10)
    finally:
        rt.close()


# -- budget -------------------------------------------------------------------------------------


def test_residents_shrink_within_one_monitor_period_when_memory_drops(models):
    _, art = models["8exp_all_sparse"]
    free = {"bytes": 8 << 30}
    rt = Runtime(art, RuntimeConfig(policy="swapmoe", budget="auto", monitor_period_s=0.05, reserve_bytes=0),
                 available_fn=lambda: free["bytes"])
    try:
        assert set(rt.residents.counts().values()) == {8}
        rt.generate(_rows(6), max_new_tokens=4)
        one = rt.expert_cost[next(iter(rt.expert_cost))]
        # another app takes memory: only the baseline plus two experts per layer are left
        from swapmoe_edge.system import memory

        free["bytes"] = rt.baseline + 2 * one * len(rt.sparse) - memory.current_rss()
        # a few monitor periods; on a loaded 2-core machine a thread can wait its turn for longer
        deadline = time.monotonic() + 1.0
        time.sleep(0.05 * 3)
        while sum(rt.residents.counts().values()) == 8 * len(rt.sparse) and time.monotonic() < deadline:
            time.sleep(0.05)
        total = sum(rt.residents.counts().values())
        assert total < 8 * len(rt.sparse)  # shrank
        assert total * one <= rt.budget_bytes - rt.baseline  # and fits what is left
        res = rt.generate(_rows(7), max_new_tokens=4)  # generation goes on
        assert len(res[0].token_ids) > 0
        assert res[0].stats["budget_bytes"] < rt.baseline + 3 * one * len(rt.sparse)
    finally:
        rt.close()


def test_a_budget_too_small_for_one_expert_per_layer_fails_with_the_numbers(models):
    _, art = models["8exp_all_sparse"]
    with pytest.raises(BudgetError) as info:
        Runtime(art, RuntimeConfig(policy="swapmoe", budget="10MiB"))
    msg = str(info.value)
    assert "10.00 MiB" in msg and "minimum" in msg and "short by" in msg
    assert "As a share" not in msg  # the user gave bytes
    with pytest.raises(BudgetError, match=r"As a share of the expert bytes \(1% of expert bytes asked\): at least (\d+)%") as info:
        Runtime(art, RuntimeConfig(policy="swapmoe", budget="1%"))
    least = int(re.search(r"at least (\d+)%", str(info.value)).group(1))
    with pytest.raises(BudgetError):
        Runtime(art, RuntimeConfig(policy="swapmoe", budget=f"{least - 1}%"))
    with Runtime(art, RuntimeConfig(policy="swapmoe", budget=f"{least}%")) as rt:  # the share it names serves
        assert rt.generate(_rows(1), max_new_tokens=2)[0].token_ids


def test_rss_over_the_users_cap_is_held_off_the_experts_and_said(models):
    """Memory the runtime does not account for (here: played as ``extra``) that takes the process
    over the user's cap: the experts give it up at the next steady sample, and keep it given up."""
    _, art = models["8exp_all_sparse"]
    held = {"rt": None, "extra": 0}

    def rss():  # the process as the runtime sees it, plus what it does not account for
        rt = held["rt"]
        return 0 if rt is None else rt.baseline + rt.residents.nbytes + held["extra"]

    with Runtime(art, RuntimeConfig(policy="prune", budget="100%", threads=1), available_fn=lambda: 1 << 40,
                 rss_fn=rss) as rt:
        held["rt"] = rt
        rt.parts.fit.over_tolerance = 0  # this model's experts are 14 KiB: far under the default's 1 MiB
        cap, one = rt.budget_bytes, max(rt.expert_cost.values())
        assert rt.budget_source == "cap"
        rt.monitor.sample_once()
        full_set = sum(rt.residents.counts().values())
        assert rt.parts.fit.unaccounted == 0  # at or under the cap: nothing to do
        held["extra"] = 3 * one + 12345
        rt.monitor.sample_once()
        assert rss() <= cap and rt.parts.fit.unaccounted >= 3 * one
        assert sum(rt.residents.counts().values()) <= full_set - 3
        held["extra"] = 0  # given back: the experts stay within what is left, no churn
        rt.monitor.sample_once()
        kept = rt.parts.fit.unaccounted
        assert kept >= 3 * one and rt.residents.nbytes <= cap - rt.baseline - kept
        r = rt.generate(_rows(1), max_new_tokens=2)[0]
        assert r.stats["unaccounted_bytes"] == kept
    stuck = {"rss": 0}
    with Runtime(art, RuntimeConfig(policy="prune", budget="100%", threads=1), available_fn=lambda: 1 << 40,
                 rss_fn=lambda: stuck["rss"]) as rt:  # an RSS that evicting experts does not lower
        rt.parts.fit.over_tolerance = 0
        stuck["rss"] = rt.budget_bytes + 3 * max(rt.expert_cost.values())
        rt.monitor.sample_once()
        first, held_now = rt.parts.fit.unaccounted, sum(rt.residents.counts().values())
        for _ in range(3):
            rt.monitor.sample_once()
        assert first > 0 and rt.parts.fit.unaccounted == first  # it gave up once, saw nothing freed, stopped
        assert sum(rt.residents.counts().values()) == held_now
    with Runtime(art, RuntimeConfig(policy="swapmoe", budget="100%", threads=1), available_fn=lambda: 1 << 40,
                 rss_fn=lambda: stuck["rss"]) as rt:  # deterministic: its residents do not follow its RSS
        assert rt.policy.deterministic
        rt.parts.fit.over_tolerance = 0
        stuck["rss"] = rt.budget_bytes + 3 * max(rt.expert_cost.values())
        rt.monitor.sample_once()
        assert rt.parts.fit.unaccounted == 0
    # A budget from free memory follows the RSS by itself: free memory under the reserve puts the
    # RSS over that budget, and the budget's own fall (not this correction) answers it.
    with Runtime(art, RuntimeConfig(policy="prune", budget="auto", threads=1, reserve_bytes=256 << 20),
                 available_fn=lambda: 128 << 20, rss_fn=lambda: 4 << 30) as rt:
        rt.parts.fit.over_tolerance = 0
        rt.monitor.sample_once()
        assert rt.budget_source == "machine" and rt.budget_bytes < 4 << 30 and rt.parts.fit.unaccounted == 0


def test_a_dense_part_bigger_than_free_memory_is_refused_before_it_loads(models, monkeypatch):
    """Free memory (or a cgroup) that cannot take the dense part: a BudgetError with the numbers
    before any session is built, not an OOM kill part-way through the load."""
    from swapmoe_edge.artifact.manifest import load_manifest
    from swapmoe_edge.model.sessions import DenseSessions
    from swapmoe_edge.runtime import baseline

    _, art = models["8exp_all_sparse"]
    m = load_manifest(art)
    dense = tuple(rel for rel in m.files if not rel.startswith("experts/"))
    need = baseline.predicted_dense_bytes(m, dense, ["CPUExecutionProvider"])
    assert need == sum(m.files[rel].size for rel in dense)  # float32 dense: about its bytes
    built = []
    monkeypatch.setattr(DenseSessions, "load_all", lambda self: built.append(self))
    rss = 300 << 20
    with pytest.raises(BudgetError) as info:
        Runtime(art, RuntimeConfig(policy="swapmoe", budget="auto"), available_fn=lambda: need // 2,
                rss_fn=lambda: rss)
    msg = str(info.value)
    assert "dense part needs about" in msg and "short by" in msg and "--dtype int8" in msg
    assert not built  # refused before loading
    assert baseline.predicted_dense_bytes(m, dense, ["CUDAExecutionProvider"]) == need
    object.__setattr__(m, "dense_dtype", "float16")  # ORT folds float16 weights into float32 copies on the CPU
    embedding = sum(m.files[rel].size for rel in dense if baseline.is_embedding(rel))
    assert embedding > 0 and baseline.is_embedding("dense/enc.embed.onnx") and not baseline.is_embedding("dense/lm_head.onnx")
    assert baseline.predicted_dense_bytes(m, dense, ["CPUExecutionProvider"]) == 2 * need - embedding  # rows cast after the gather


def test_full_policy_refuses_a_budget_that_cannot_hold_every_expert(models):
    _, art = models["8exp_all_sparse"]
    with pytest.raises(BudgetError, match="full policy"):
        Runtime(art, RuntimeConfig(policy="full", budget="50%"))


def test_share_budget_is_reported_as_whole_process_bytes(models):
    _, art = models["8exp_all_sparse"]
    res = _run(art, _rows(8), 3, policy="prune", budget="50%")
    st = res[0].stats
    assert st["budget_bytes"] >= st["baseline_bytes"] and st["resident_expert_bytes"] <= st["budget_bytes"] - st["baseline_bytes"]


# -- bad input --------------------------------------------------------------------------------------


def test_an_expert_file_whose_sha256_does_not_match_is_named_in_the_error(models, tmp_path):
    import shutil

    _, art = models["4exp_deeper"]
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    victim = next(p for p in (copy / "experts").glob("*.bin") if ".int" not in p.name)  # an expert, not a ladder copy
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    with pytest.raises(ExpertUnavailableError, match=victim.name):
        Runtime(copy, RuntimeConfig(policy="full"))


def test_text_inputs_empty_and_too_long(models):
    _, art = models["8exp_all_sparse"]
    with Runtime(art, RuntimeConfig(policy="full", max_source_tokens=16)) as rt:
        with pytest.raises(InputError, match="empty"):
            rt.summarize(["   "])
        with pytest.warns(UserWarning, match="truncated"):
            res = rt.summarize([words(range(3, 60))], max_new_tokens=3)
        assert res[0].stats["truncated_input"] is True
        short = rt.summarize([words([5, 6, 7])], max_new_tokens=3)[0]
        assert short.summary is not None and short.stats["truncated_input"] is False


def test_an_artifact_of_a_newer_schema_is_refused(models, tmp_path):
    import shutil

    _, art = models["4exp_deeper"]
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="schema version 99"):
        Runtime(copy)


# -- CLI -----------------------------------------------------------------------------------------


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "swapmoe_edge", *args], capture_output=True, text=True)


def test_cli_summarize_json_has_the_promised_fields(models, tmp_path):
    _, art = models["8exp_all_sparse"]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": words(r[:-1]), "summary": "x"}) for r in _rows(10)) + "\n")
    r = _cli("summarize", "--artifact", str(art), "--budget", "50%", "--policy", "swapmoe",
             "--max-new-tokens", "5", "--json", "--file", str(docs))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(lines) == 3
    for obj in lines:
        assert {"summary", "token_ids", "exact", "stats"} <= set(obj)
        assert obj["exact"] is False
        for k in ("ttft_ms", "decode_ms_per_token", "peak_rss_bytes", "budget_bytes", "bytes_read", "swaps",
                  "stall_ms", "first_choice_resident"):
            assert k in obj["stats"]
        assert obj["stats"]["budget_bytes"] > obj["stats"]["baseline_bytes"]


def test_cli_summarize_text_prints_summary_and_a_stats_line(models, tmp_path):
    _, art = models["8exp_all_sparse"]
    r = _cli("summarize", "--artifact", str(art), "--policy", "full", "--max-new-tokens", "4", "w5 w6 w7 w8")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1
    assert "[full, exact] budget" in r.stderr and "ms/token" in r.stderr
    bad = _cli("summarize", "--artifact", str(art), "")
    assert bad.returncode == 2 and "empty" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_profile_writes_a_profile_the_runtime_then_uses(models, tmp_path):
    import shutil

    _, art = models["4exp_deeper"]
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(words(r[:-1]) for r in _rows(11)) + "\n")
    r = _cli("profile", str(copy), "--data", str(data), "--max-new-tokens", "4", "--predict-decoder")
    assert r.returncode == 0, r.stderr
    prof = json.loads((copy / "profile.json").read_text())
    assert prof["source"] == "profile" and len(prof["layers"]) == 3  # enc.L01, enc.L03, dec.L01
    assert sum(sum(v["counts"]) for v in prof["layers"].values()) > 0
    assert prof["predictor"]["inputs"] == ["enc.L01", "enc.L03"] and prof["predictor"]["documents"] == 3  # one per line
    with Runtime(copy, RuntimeConfig(policy="swapmoe", budget="50%")) as rt:
        assert rt.profile.source == "profile" and rt.policy.policy.predictor is not None
        rt.generate(_rows(2), max_new_tokens=3)
        assert set(rt.policy.policy.predicted) == {LayerKey("decoder", 1)}  # the request's decoder was predicted
    with Runtime(copy, RuntimeConfig(policy="swapmoe", budget="50%", predict_decoder="off")) as rt:
        assert rt.policy.policy.predictor is None


def test_profile_runs_on_the_threads_it_is_given(models, tmp_path, monkeypatch):
    from swapmoe_edge.cli.main import main as cli
    from swapmoe_edge.lab import calibrate

    from click.testing import CliRunner

    _, art = models["4exp_deeper"]
    seen = []

    class Spy(Runtime):
        def __init__(self, artifact, config, **kw):
            seen.append(config.threads)
            super().__init__(artifact, config, **kw)

    monkeypatch.setattr(calibrate, "Runtime", Spy)
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(words(r[:-1]) for r in _rows(3)) + "\n")
    for extra, want in (([], None), (["--threads", "1"], 1)):
        r = CliRunner().invoke(cli, ["profile", str(art), "--data", str(data), "--max-new-tokens", "3",
                                     "-o", str(tmp_path / "p.json"), *extra])
        assert r.exit_code == 0, r.output
        assert seen[-1] == want
    assert CliRunner().invoke(cli, ["profile", str(art), "--data", str(data), "--threads", "0"]).exit_code == 2


def test_int8_experts_fit_more_residents_in_the_same_budget(tmp_path):
    model = tiny_model(seed=40, num_experts=16, d_model=64, d_ff=512, d_kv=16, num_sparse_encoder_layers=2,
                       num_sparse_decoder_layers=2)
    model.save_pretrained(tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "f32", quiet=True, validate=False)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "i8", expert_dtype="int8", quiet=True, validate=False)
    from swapmoe_edge.artifact.manifest import load_manifest

    # The same bytes for experts in both (a share is of each artifact's own expert bytes;
    # the baselines are measured per runtime, so a whole-process cap would compare those).
    room = 0.25 * load_manifest(tmp_path / "f32").expert_bytes
    share8 = 100 * room / load_manifest(tmp_path / "i8").expert_bytes
    with Runtime(tmp_path / "f32", RuntimeConfig(policy="prune", budget="25%")) as rt:
        n32 = sum(rt.residents.counts().values())
    with Runtime(tmp_path / "i8", RuntimeConfig(policy="prune", budget=f"{share8:.2f}%")) as rt:
        n8 = sum(rt.residents.counts().values())
        res = rt.generate(_rows(12), max_new_tokens=4)
    assert n8 >= 2 * n32 and len(res[0].token_ids) > 0


# -- activation envelope ------------------------------------------------------------------------
def test_chunks_keep_rows_times_width_within_the_envelope():
    from swapmoe_edge.runtime.requests import chunks as _chunks

    rows = [[1] * n for n in (3, 5, 2, 9, 1, 1, 4)]
    chunks = _chunks(rows, 10)
    assert [r for c in chunks for r in c] == rows  # order and content kept
    assert all(len(c) == 1 or len(c) * max(map(len, c)) <= 10 for c in chunks)
    assert [len(c) for c in chunks] == [2, 1, 1, 2, 1]  # 3,5 | 2 (2x9 > 10) | 9 | 1,1 (3x4 > 10) | 4
    assert _chunks([[1] * 20], 10) == [[[1] * 20]]


def test_a_batch_beyond_the_envelope_runs_in_chunks_with_the_same_tokens(models):
    model, art = models["8exp_all_sparse"]
    rows = _rows(21, lengths=(12, 7, 9, 11))
    want = _hf_generate(model, rows, 6, num_beams=2)
    with Runtime(art, RuntimeConfig(policy="full", max_source_tokens=24)) as rt:  # 24 // 2 beams: one row a chunk
        got = rt.generate(rows, max_new_tokens=6, num_beams=2)
        assert [r.token_ids for r in got] == want
        with pytest.raises(InputError, match="more than max_source_tokens"):
            rt.generate([[5] * 30], max_new_tokens=2)


@pytest.fixture(scope="module")
def int4_pair(tmp_path_factory):
    """One tiny model (dims multiples of 32) exported with float32 and int4 experts."""
    root = tmp_path_factory.mktemp("int4")
    model = tiny_model(seed=41, num_experts=16, d_model=64, d_ff=512, d_kv=16, num_sparse_encoder_layers=2,
                       num_sparse_decoder_layers=2)
    model.save_pretrained(root / "ckpt")
    export_checkpoint(root / "ckpt", root / "f32", quiet=True, validate=False)
    export_checkpoint(root / "ckpt", root / "i4", expert_dtype="int4", quiet=True, validate=False)
    return model, root / "f32", root / "i4"


@pytest.mark.parametrize("kernel", ["auto", "nbits"])
def test_int4_full_policy_reproduces_hf_generate_on_the_quantised_weights(int4_pair, kernel):
    """At full budget, int4 experts give what PyTorch gives with every expert weight replaced by
    as_stored: on the shared standard-op kernel (auto, for these tiny experts) and as MatMulNBits
    sessions of their own (nbits)."""
    from swapmoe_edge.model.prepacked import NbitsStore
    from swapmoe_export.quant import as_stored

    model, _, art = int4_pair
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.experts." in name:
                p.copy_(torch.from_numpy(as_stored(p.numpy().T, "int4").T.copy()))
    for seed in (0, 1):
        rows = _rows(seed)
        with Runtime(art, RuntimeConfig(policy="full", lowbit_kernel=kernel)) as rt:
            assert isinstance(rt.parts.experts.store, NbitsStore) == (kernel == "nbits")
            results = rt.generate(rows, max_new_tokens=10)
        assert [r.token_ids for r in results] == _hf_generate(model, rows, 10)
        # exact means "the checkpoint's tokens": quantised experts never promise that
        assert all(r.exact is False and r.stats["expert_dtype"] == "int4" for r in results)


def test_a_full_budget_holds_int4_experts_at_their_measured_session_cost(int4_pair):
    """As sessions of their own, int4 experts hold more than their blocks; "100%" is every expert
    at that measured cost, so full fits in it."""
    _, _, art = int4_pair
    with Runtime(art, RuntimeConfig(policy="full", budget="100%", lowbit_kernel="nbits")) as rt:
        cost = next(iter(rt.parts.experts.cost.values()))
        n = len(rt.manifest.experts)
        assert cost > rt.manifest.experts[next(iter(rt.manifest.experts))].nbytes  # ORT's state beside the packed copy
        assert rt.parts.fit.cap >= rt.parts.fit.baseline + n * cost
        assert sum(rt.residents.counts().values()) == n
        assert len(rt.generate(_rows(3), max_new_tokens=3)[0].token_ids) > 0


def test_int4_experts_fit_about_seven_times_the_residents_in_the_same_budget(int4_pair):
    from swapmoe_edge.artifact.manifest import load_manifest

    _, f32, i4 = int4_pair
    m32, m4 = load_manifest(f32), load_manifest(i4)
    assert 6.0 < m32.expert_bytes / m4.expert_bytes < 6.5  # 6.4: half a byte a weight and a float32 scale per 32
    room = 0.1 * m32.expert_bytes
    with Runtime(f32, RuntimeConfig(policy="prune", budget="10%")) as rt:
        n32 = sum(rt.residents.counts().values())
    with Runtime(i4, RuntimeConfig(policy="prune", budget=f"{100 * room / m4.expert_bytes:.2f}%")) as rt:
        n4 = sum(rt.residents.counts().values())
        res = rt.generate(_rows(12), max_new_tokens=4)
    assert n4 >= 6 * n32 and len(res[0].token_ids) > 0


def test_the_input_limit_defaults_to_the_tokenizers_model_max_length(tmp_path):
    import json as _json

    model = tiny_model(seed=44)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(_json.dumps({"model_max_length": 20}))
    art = export_checkpoint(tmp_path / "ckpt", tmp_path / "art", quiet=True, validate=False)
    with Runtime(art, RuntimeConfig(policy="full")) as rt:
        assert rt.config.max_source_tokens == 20
        with pytest.raises(InputError, match="more than max_source_tokens"):
            rt.generate([[5] * 21], max_new_tokens=2)
        assert rt.generate([[5] * 20], max_new_tokens=2)[0].exact is True
    with Runtime(art, RuntimeConfig(policy="full", max_source_tokens=64)) as rt:  # the caller's value wins
        assert rt.config.max_source_tokens == 64
    # HF's "no limit" (a huge number) leaves the default
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(_json.dumps({"model_max_length": int(1e30)}))
    art2 = export_checkpoint(tmp_path / "ckpt", tmp_path / "art2", quiet=True, validate=False)
    with Runtime(art2, RuntimeConfig(policy="full")) as rt:
        assert rt.config.max_source_tokens == 512


def test_the_checkpoints_no_repeat_ngram_size_is_applied_like_hf(tmp_path):
    model = tiny_model(seed=45, tie_word_embeddings=False)
    model.generation_config.no_repeat_ngram_size = 2
    model.save_pretrained(tmp_path / "ckpt")
    art = export_checkpoint(tmp_path / "ckpt", tmp_path / "art", quiet=True, validate=False)
    rows = _rows(5)
    with Runtime(art, RuntimeConfig(policy="full")) as rt:
        assert rt.no_repeat_ngram_size == 2
        for beams in (1, 3):
            assert [r.token_ids for r in rt.generate(rows, max_new_tokens=12, num_beams=beams)] == \
                _hf_generate(model, rows, 12, num_beams=beams)


def test_generation_settings_the_runtime_ignores_are_named_in_a_warning(tmp_path):
    model = tiny_model(seed=46)
    model.generation_config.repetition_penalty = 1.3
    model.save_pretrained(tmp_path / "ckpt")
    art = export_checkpoint(tmp_path / "ckpt", tmp_path / "art", quiet=True, validate=False)
    with pytest.warns(UserWarning, match="repetition_penalty"):
        Runtime(art, RuntimeConfig(policy="full")).close()


def test_an_approximate_policy_reports_exact_only_when_no_token_was_rerouted(models):
    model, art = models["8exp_all_sparse"]
    rows = _rows(7)
    with Runtime(art, RuntimeConfig(policy="swapmoe", budget="100%", swap_interval_s=3600)) as rt:
        res = rt.generate(rows, max_new_tokens=6)  # every expert resident: routing is full's
        assert all(r.exact for r in res) and [r.token_ids for r in res] == _hf_generate(model, rows, 6)
    with Runtime(art, RuntimeConfig(policy="prune", budget="25%")) as rt:
        res = rt.generate(rows, max_new_tokens=6)
        assert res[0].stats["first_choice_resident"] < 1.0 and not any(r.exact for r in res)


def test_decoder_weight_moves_resident_slots_to_the_decoder_and_reaches_the_swapper(models):
    _, art = models["8exp_all_sparse"]

    def per_stack(rt):
        counts = {"encoder": 0, "decoder": 0}
        for lk, n in rt.policy.limits.counts.items():
            counts[lk.stack] += n
        return counts

    with Runtime(art, RuntimeConfig(policy="swapmoe", budget="40%", decoder_weight=1.0)) as rt:
        even = per_stack(rt)
    with Runtime(art, RuntimeConfig(policy="swapmoe", budget="40%", decoder_weight=50.0)) as rt:
        heavy = per_stack(rt)
        assert {lk.stack: w for lk, w in rt.policy.policy.layer_weight.items()} == {"encoder": 1.0, "decoder": 50.0}
    assert sum(heavy.values()) == sum(even.values())  # the same budget, split differently
    assert heavy["decoder"] > even["decoder"] and heavy["encoder"] < even["encoder"]
    with pytest.raises(InputError, match="decoder_weight"):
        RuntimeConfig(decoder_weight=0.0)


def test_expert_buffers_live_in_their_own_mapping_so_eviction_frees_their_pages(models):
    import mmap

    from swapmoe_edge.artifact.manifest import load_manifest
    from swapmoe_edge.artifact.store import anonymous_buffer

    def owner(a):
        while isinstance(a, np.ndarray):
            a = a.base
        return a.obj if isinstance(a, memoryview) else a

    buf = anonymous_buffer(10_000)
    assert buf.shape == (10_000,) and buf.flags.writeable and not buf.any()
    assert isinstance(owner(buf), mmap.mmap)  # not malloc: unmapped when the last view goes
    _, art = models["8exp_all_sparse"]
    manifest = load_manifest(art)
    key = next(iter(manifest.experts))
    expert = ExpertStore(manifest).read(key)
    entry = manifest.experts[key]
    raw = manifest.path(entry.weights_file).read_bytes()[:entry.nbytes]
    base = owner(expert.wi)
    assert isinstance(base, mmap.mmap) and bytes(base[:entry.nbytes]) == raw


def test_int4_experts_at_accuracy_level_4_validate_and_reproduce_pytorch_rounding_alike(int4_pair, tmp_path):
    """--expert-accuracy-level 4: the experts' MatMulNBits round their inputs to int8 per block of
    32; export validates against PyTorch with the same rounding, and full reproduces that model."""
    import copy

    import torch

    from swapmoe_edge.artifact.manifest import load_manifest
    from swapmoe_export.reference import _EXPERT_LINEAR, _quantize_activations_hook
    from swapmoe_export.quant import as_stored

    model, _, _ = int4_pair
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    art = export_checkpoint(ckpt, tmp_path / "a4", expert_dtype="int4", expert_accuracy_level=4, quiet=True)  # validates
    m = load_manifest(art, verify=True)
    assert m.expert_nbits == {"bits": 4, "block_size": 32, "accuracy_level": 4} and m.validation["passed"]
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if ".mlp.experts." in name:
                p.copy_(torch.from_numpy(as_stored(p.numpy().T, "int4").T.copy()))
    for name, module in rounded.named_modules():
        if _EXPERT_LINEAR.search(name):
            module.register_forward_pre_hook(_quantize_activations_hook(32))
    rows = _rows(0)
    with Runtime(art, RuntimeConfig(policy="full")) as rt:  # auto: sessions even for experts this small
        got = [r.token_ids for r in rt.generate(rows, max_new_tokens=10)]
        level4_cost = next(iter(rt.parts.experts.cost.values()))
    assert got == hf_generate(rounded, rows, 10)
    with Runtime(int4_pair[2], RuntimeConfig(policy="full", lowbit_kernel="nbits")) as rt:
        assert level4_cost > next(iter(rt.parts.experts.cost.values()))  # int8 packing beside the int4 weights
    with pytest.raises(Exception, match="applies to int4 experts"):
        export_checkpoint(ckpt, tmp_path / "bad", expert_accuracy_level=4, quiet=True, validate=False)


def test_int4_experts_in_the_earlier_float16_scale_layout_ask_for_a_new_export(int4_pair, tmp_path):
    import shutil

    from swapmoe_edge.artifact.manifest import load_manifest

    art = shutil.copytree(int4_pair[2], tmp_path / "old")
    raw = json.loads((art / "manifest.json").read_text())
    for e in raw["experts"]:  # what an artifact of the earlier layout lists: float16 group scales
        e["tensors"][1]["dtype"] = "float16"
    (art / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="int4 in an earlier layout.*export the model again"):
        load_manifest(art)
