"""The precision ladder: low-bit copies at export, their kernels, the planner and the ladder policy."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from swapmoe_edge.cli.main import main
from swapmoe_edge.cli.serve import stats_line
from swapmoe_edge.core.errors import BudgetError, InputError
from swapmoe_edge.residency import planner
from swapmoe_edge.residency.planner import measured_quality, placement_bytes
from swapmoe_edge.model.rungs import PRIMARY, Rung
from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig
from swapmoe_edge.artifact.store import ExpertStore
from swapmoe_export import ladder
from swapmoe_export.add_rungs import add_rungs
from swapmoe_export.exporter import export_checkpoint

from tiny import save_tiny

# d_ff 512: an int4 copy's session costs clearly less than a float32 expert (with d_ff 48,
# ORT's per-session state outweighs the weights and the runtime drops the rung as dominated).
LADDER_MODEL = dict(d_model=128, d_ff=512, d_kv=32, num_experts=8)
INPUTS = [[5, 6, 7, 8, 9, 10, 11, 12, 1], [13, 14, 15, 1], [20, 21, 22, 23, 24, 1]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ladder_ckpt"), seed=3, **LADDER_MODEL)


@pytest.fixture(scope="module")
def art(ckpt, tmp_path_factory) -> Path:
    return export_checkpoint(ckpt, tmp_path_factory.mktemp("ladder") / "art", validate=False, quiet=True)


def _cfg(**kw) -> RuntimeConfig:
    return RuntimeConfig(threads=1, read_mode="cached", **kw)


# -- the low-bit copies and their kernels ------------------------------------------------------

@pytest.mark.parametrize("rung,k,n", [("int4", 128, 512), ("int4", 40, 24), ("int8", 48, 32)])
def test_both_kernels_compute_the_dequantised_weights(tmp_path, rung, k, n):
    """MatMulNBits (session template, bytes in memory) and the standard-op kernel agree with
    numpy on the dequantised weights, also when K is not a multiple of the block."""
    rng = np.random.default_rng(0)
    wi, wo = rng.standard_normal((k, n)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)

    class Writer:
        files: dict = {}

        def write_blocks(self, rel, arrays):
            from swapmoe_export.exporter import ArtifactWriter

            w = ArtifactWriter(tmp_path)
            offs = w.write_blocks(rel, arrays)
            self.files.update(w.files)
            return offs

    entry = ladder.write_rung(Writer(), "enc.L01.E00", "/t", wi, wo, rung)
    bits = ladder.RUNGS[rung]
    parts = ladder.rung_arrays(wi, wo, rung)
    x = rng.standard_normal((5, k)).astype(np.float32)
    want = np.maximum(x @ ladder.dequantize(parts["wi"], parts["wi_scale"], bits, k), 0) @ \
        ladder.dequantize(parts["wo"], parts["wo_scale"], bits, n)

    block = np.fromfile(tmp_path / entry["weights_file"], dtype=np.uint8)
    opts = ort.SessionOptions()
    opts.add_external_initializers_from_files_in_memory([ladder.RUNG_DATA], [block], [block.nbytes])
    sess = ort.InferenceSession(ladder.session_template(k, n, "relu", rung, entry, accuracy_level=0), opts)  # exact
    block[:] = 0  # ORT holds its own copy: the runtime drops the read buffer once the session exists
    kernel = ort.InferenceSession(ladder.kernel_graph(k, n, "relu", rung).proto.SerializeToString())
    scale = np.abs(want).max()
    assert np.abs(sess.run(None, {"x": x})[0] - want).max() < 1e-5 * scale
    assert np.abs(kernel.run(None, {"x": x, **parts})[0] - want).max() < 1e-5 * scale
    # and the quantisation itself is what its bits allow (a broken packing is far off)
    err = np.linalg.norm(ladder.dequantize(parts["wi"], parts["wi_scale"], bits, k) - wi) / np.linalg.norm(wi)
    assert err < (0.12 if bits == 4 else 0.01)


def test_export_lists_every_copy_with_its_checksum(art):
    m = load_manifest(art, verify=True)
    assert list(m.ladder) == ["int4"]
    assert all("int4" in e.rungs for e in m.experts.values())
    assert all(m.files[e.rungs["int4"].weights_file].sha256 for e in m.experts.values())
    summary = m.summary()["ladder"]["int4"]
    assert summary["bytes"] == m.rung_bytes("int4") and 0 < summary["share_of_expert_bytes"] < 0.5
    # rung files are not dense bytes (the budget's dense part is unchanged by the ladder)
    assert m.dense_bytes == sum(f.size for p, f in m.files.items() if not p.startswith("experts/")
                                and p != f"dense/{ladder.kernel_name('int4')}.onnx")


def test_ladder_add_writes_what_export_writes(ckpt, art, tmp_path):
    bare = export_checkpoint(ckpt, tmp_path / "bare", validate=False, quiet=True, ladder_rungs=())
    assert not load_manifest(bare).ladder
    (bare / "profile.json").write_text("{}")  # a profile there: the command says how to price the new rung
    r = CliRunner().invoke(main, ["ladder", "add", str(bare), "--rung", "int4"])
    assert r.exit_code == 0, r.output
    assert f"swapmoe profile {bare} --data TEXTS --add rung-loss" in r.stderr
    m, ref = load_manifest(bare, verify=True), load_manifest(art)
    for key, e in m.experts.items():
        assert (bare / e.rungs["int4"].weights_file).read_bytes() == (art / ref.experts[key].rungs["int4"].weights_file).read_bytes()


@pytest.mark.parametrize("block", [16, 64, 128])
def test_larger_ladder_blocks_export_add_and_serve_with_both_kernels(ckpt, tmp_path, block):
    """--ladder-block: the copies carry fewer scales, the manifest and the kernels say the block,
    and the ladder serves on MatMulNBits sessions and on the standard-op kernel alike."""
    art = export_checkpoint(ckpt, tmp_path / "a", quiet=True, ladder_block=block)  # export checks the rung
    m = load_manifest(art, verify=True)
    e = next(iter(m.experts.values())).rungs["int4"]
    wi = next(t for t in e.tensors if t.role == "wi")
    assert m.ladder["int4"].block == block and wi.shape[2] == block // 2
    from swapmoe_export import space

    assert e.nbytes == space.rung_block_bytes(m.config.d_model, m.config.d_ff, "int4", block)  # the disk estimate's
    bare = export_checkpoint(ckpt, tmp_path / "bare", validate=False, quiet=True, ladder_rungs=())
    add_rungs(bare, ("int4",), quiet=True, block=block)
    from swapmoe_edge.core.errors import ExportError

    before = (bare / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match=f"has one already \\(block {block}\\)"):
        add_rungs(bare, ("int4",), quiet=True, block=32)
    assert (bare / "manifest.json").read_bytes() == before
    for key, x in load_manifest(bare, verify=True).experts.items():
        assert (bare / x.rungs["int4"].weights_file).read_bytes() == (art / m.experts[key].rungs["int4"].weights_file).read_bytes()
    rows = [[5, 6, 7, 8, 9, 1], [13, 14, 15, 1]]
    outs = {}
    for kernel in ("nbits", "standard"):
        cfg = RuntimeConfig(policy="ladder", ladder_primary=False, lowbit_kernel=kernel, threads=1)
        with Runtime(art, cfg) as rt:
            outs[kernel] = [r.token_ids for r in rt.generate(rows, max_new_tokens=6)]
    assert outs["nbits"] == outs["standard"]  # small copies: both kernels at level 0, float32 arithmetic


def test_a_ladder_block_is_one_matmulnbits_runs_and_needs_copies(ckpt, tmp_path):
    from swapmoe_edge.core.errors import ExportError

    with pytest.raises(ExportError, match="must be one of 16, 32, 64, 128"):
        export_checkpoint(ckpt, tmp_path / "x", validate=False, quiet=True, ladder_block=48)
    with pytest.raises(ExportError, match="writes none"):
        export_checkpoint(ckpt, tmp_path / "y", validate=False, quiet=True, ladder_rungs=(), ladder_block=64)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_rung_must_sit_below_the_experts(ckpt, tmp_path):
    from swapmoe_edge.core.errors import ExportError

    with pytest.raises(ExportError, match="not below"):
        export_checkpoint(ckpt, tmp_path / "x", validate=False, quiet=True, expert_dtype="int8", ladder_rungs=("int8",))


def test_an_artifact_without_a_ladder_still_serves_and_says_what_the_ladder_needs(art, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(art, old)
    raw = json.loads((old / "manifest.json").read_text())
    raw.pop("ladder")
    for e in raw["experts"]:
        e.pop("rungs")
    (old / "manifest.json").write_text(json.dumps(raw))
    with Runtime(old, _cfg(policy="swapmoe", budget="50%")) as rt:
        assert rt.generate(INPUTS[:1], max_new_tokens=4)[0].token_ids
    with pytest.raises(InputError, match="no precision ladder.*ladder add"):
        Runtime(old, _cfg(policy="ladder", budget="50%"))


def test_int4_experts_without_a_ladder_are_told_the_export_that_gives_them_one(ckpt, tmp_path):
    """Rungs sit below the experts' type and are made from float experts: an int4 artifact is
    pointed at --ladder int2 (or float experts), not at `ladder add`, which cannot; that export serves."""
    plain = export_checkpoint(ckpt, tmp_path / "i4", dtype="int4", validate=False, quiet=True)
    assert not load_manifest(plain).ladder
    with pytest.raises(InputError, match="experts are int4.*cannot: export the model again with --ladder int2"):
        Runtime(plain, _cfg(policy="ladder", budget="50%"))
    low = export_checkpoint(ckpt, tmp_path / "i4i2", dtype="int4", ladder_rungs=("int2",), validate=False, quiet=True)
    with Runtime(low, _cfg(policy="ladder", budget="40%")) as rt:
        res = rt.generate(INPUTS[:1], max_new_tokens=4)[0]
        assert rt.residents_by_rung().get("int2", 0) > 0 and res.stats["low_precision_tokens"] > 0


# -- the planner -------------------------------------------------------------------------------

def _layers(n_layers=3, experts=8, seed=0, flat=False):
    rng = np.random.default_rng(seed)
    draw = (lambda: rng.uniform(0.5, 1.5, size=experts)) if flat else (lambda: rng.gamma(0.5, size=experts))
    return {LayerKey("encoder" if i % 2 else "decoder", i): draw() for i in range(n_layers)}


def test_plan_never_exceeds_the_capacity_and_keeps_a_copy_in_every_layer():
    rungs = [Rung("int4", 30, 0.97), Rung(PRIMARY, 100, 1.0)]
    for seed in range(30):
        imp = _layers(seed=seed)
        for capacity in (90, 150, 400, 1000, 5000):
            plan = planner.plan(imp, rungs, capacity)
            assert placement_bytes(plan, rungs) <= capacity
            assert all(len(row) >= 1 for row in plan.values())


def test_plan_covers_every_expert_low_before_lifting_any_when_the_low_rung_is_nearly_as_good():
    imp = _layers(flat=True)  # no expert is nearly worthless (one would rather lift a strong one than hold it)
    rungs = [Rung("int4", 30, 0.97), Rung(PRIMARY, 100, 1.0)]
    plan = planner.plan(imp, rungs, 30 * 24 + 70)  # room for all 24 low copies and one lift
    assert sum(len(r) for r in plan.values()) == 24
    lifted = [(lk, e) for lk, row in plan.items() for e, r in row.items() if r == PRIMARY]
    assert len(lifted) == 1
    lk, e = lifted[0]
    shares = {k: v / v.sum() for k, v in imp.items()}
    assert shares[lk][e] == max(s.max() for s in shares.values())  # the most valuable expert is lifted
    full = planner.plan(imp, rungs, 100 * 24)
    assert all(r == PRIMARY for row in full.values() for r in row.values())


def test_plan_skips_unreadable_experts_and_says_when_nothing_fits():
    imp = _layers()
    rungs = [Rung("int4", 30, 0.97), Rung(PRIMARY, 100, 1.0)]
    lk = next(iter(imp))
    best = int(np.argmax(imp[lk]))
    plan = planner.plan(imp, rungs, 10_000, unavailable=frozenset({(lk, best)}))
    assert best not in plan[lk]
    with pytest.raises(BudgetError, match="cannot hold one int4"):
        planner.plan(imp, rungs, 30 * 3 - 1)


def test_plan_holds_an_expert_only_at_the_rungs_it_can_read():
    """rung_range: an expert whose int4 copy is corrupt enters at its float file, whole cost;
    one whose float file is corrupt stays at int4; the budget holds and no layer loses its cover."""
    rungs = [Rung("int4", 30, 0.97), Rung(PRIMARY, 100, 1.0)]
    for seed in range(20):
        imp = _layers(seed=seed)
        lk = next(iter(imp))
        order = [int(e) for e in np.argsort(-imp[lk], kind="stable")]
        ranges = {(lk, order[0]): (1, 1), (lk, order[1]): (0, 0)}
        for capacity in (90, 160, 400, 1000, 5000):
            plan = planner.plan(imp, rungs, capacity, rung_range=ranges)
            assert placement_bytes(plan, rungs) <= capacity and all(plan[k] for k in imp)
            assert plan[lk].get(order[0], PRIMARY) == PRIMARY and plan[lk].get(order[1], "int4") == "int4"
        everything = planner.plan(imp, rungs, 10_000, rung_range=ranges)
        assert everything[lk][order[0]] == PRIMARY and everything[lk][order[1]] == "int4"
        assert len(everything[lk]) == 8
        # the dear expert's cover, when it does not fit, does not keep the rest of its layer out
        one = {lk: imp[lk]}
        tight = planner.plan(one, rungs, 30 + 50, rung_range=ranges)  # its best cheap cover, then 50 bytes
        assert order[0] not in tight[lk] and len(tight[lk]) == 2


def test_plan_keeps_a_measured_split_and_lifts_copies_with_the_rest():
    imp = _layers(flat=True)
    rungs = [Rung("int4", 30, 0.97), Rung(PRIMARY, 100, 1.0)]
    caps = {lk: n for lk, n in zip(imp, (2, 5, 3))}
    plan = planner.plan(imp, rungs, 10_000, max_copies=caps)
    assert {lk: len(row) for lk, row in plan.items()} == caps
    assert all(r == PRIMARY for row in plan.values() for r in row.values())  # the room left lifts every copy
    tight = planner.plan(imp, rungs, 30 * 10, max_copies=caps)
    assert {lk: len(row) for lk, row in tight.items()} == caps and placement_bytes(tight, rungs) == 300


def test_measured_quality_prices_a_rung_by_its_loss_against_absence():
    lk = LayerKey("decoder", 1)
    ladder = [Rung("int4", 30, 0.97), Rung("int8", 55, 0.995), Rung(PRIMARY, 100, 1.0)]
    imp = {lk: np.array([4.0, 3.0, 2.0, 1.0])}  # the top half carries 0.7: absence of the rest (0.3) ...
    loss = {lk: np.array([0.5, 0.3, 0.1, 0.0])}  # ... loses 0.3 with two of four kept: 1.0 per unit of importance
    got = measured_quality({lk: ladder}, imp, loss, {lk: {"int4": 0.02}})[lk]
    assert [r.name for r in got] == ["int4", "int8", PRIMARY] and [r.cost for r in got] == [30, 55, 100]
    assert got[0].quality == pytest.approx(0.98) and got[1].quality == 0.995 and got[2].quality == 1.0  # int8 unmeasured
    free = measured_quality({lk: ladder}, imp, loss, {lk: {"int4": 0.0, "int8": 0.0}})[lk]
    assert free[0].quality < free[1].quality < free[2].quality == 1.0  # never down the ladder, the original on top
    assert measured_quality({lk: ladder}, imp, {}, {lk: {"int4": 0.02}})[lk] == ladder  # no curves: the guesses


def test_measured_quality_decides_between_lifting_and_covering():
    lk = LayerKey("decoder", 1)
    imp = {lk: np.array([0.99, 0.01])}
    guess = [Rung("int4", 1, 0.97), Rung(PRIMARY, 3, 1.0)]
    assert planner.plan(imp, guess, 3) == {lk: {0: PRIMARY}}  # 0.99 x 0.03 / 2 bytes beats 0.01 x 0.97 / 1 byte
    measured = [Rung("int4", 1, 0.999), Rung(PRIMARY, 3, 1.0)]
    assert planner.plan(imp, measured, 3) == {lk: {0: "int4", 1: "int4"}}  # a lift worth little: cover instead


def test_measure_rung_loss_on_a_tiny_model_and_the_runtime_uses_it(art):
    from swapmoe_edge.residency.importance import Profile
    from swapmoe_edge.model.rungs import rung_runners
    from swapmoe_edge.lab.substitution import measure_rung_loss

    from tiny import words

    rng = np.random.default_rng(4)
    texts = [words(rng.integers(3, 96, int(n)).tolist()) for n in (11, 6, 14)]
    with Runtime(art, _cfg(policy="full", budget="100%")) as rt:
        runners = rung_runners(rt.manifest, rt.config, rt.sessions, 1, list(rt.providers), rt.placement)
        got = measure_rung_loss(rt, texts, runners, max_new_tokens=4, batch_size=2)
        assert set(got) == set(rt.sparse) and all(set(row) == {"int4"} for row in got.values())
        assert all(row["int4"] > 0 for row in got.values())  # int4 weights move the output somewhere
        again = measure_rung_loss(rt, texts, runners, max_new_tokens=4, batch_size=2)
        assert all(again[lk] == pytest.approx(got[lk]) for lk in got)  # the measurement leaves the model exact
        imp = {lk: np.asarray(v) for lk, v in rt.profile.importance.items()}
    E = len(next(iter(imp.values())))
    prof = Profile(imp, {lk: np.ones(E) for lk in imp}, loss={lk: np.linspace(1.0, 0.0, E) for lk in imp},
                   rung_loss=got)
    with Runtime(art, _cfg(policy="ladder", budget="50%", swap_interval_s=1000), profile=prof) as rt:
        for lk in rt.sparse:
            q = {r.name: r.quality for r in rt.rungs[lk]}
            assert q["int4"] != 0.97 and 0 < q["int4"] < q[PRIMARY] == 1.0  # measured, not the guess


def test_plan_hysteresis_keeps_a_held_expert_against_a_slightly_better_one():
    lk = LayerKey("decoder", 1)
    imp = {lk: np.array([1.0, 1.05, 0.0, 0.0])}
    rungs = [Rung(PRIMARY, 100, 1.0)]
    assert planner.plan(imp, rungs, 100) == {lk: {1: PRIMARY}}
    assert planner.plan(imp, rungs, 100, current={lk: {0: PRIMARY}}, hysteresis=0.1) == {lk: {0: PRIMARY}}


# -- the policy --------------------------------------------------------------------------------

def test_ladder_at_full_budget_gives_full_tokens_and_says_exact(art):
    with Runtime(art, _cfg(policy="full", budget="100%")) as rt:
        ref = rt.generate(INPUTS, max_new_tokens=8)
    with Runtime(art, _cfg(policy="ladder", budget="100%")) as rt:
        got = rt.generate(INPUTS, max_new_tokens=8)
        assert rt.residents_by_rung() == {"float32": 16}
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert all(r.exact and r.stats["low_precision_tokens"] == 0 for r in got)


def test_low_bit_tokens_are_counted_and_never_called_exact(art):
    with Runtime(art, _cfg(policy="ladder", budget="100%", ladder_primary=False)) as rt:
        res = rt.generate(INPUTS, max_new_tokens=8)
        assert rt.residents_by_rung() == {"int4": 16}
        assert rt.runners["int4"].mode == "nbits"
    assert all(not r.exact for r in res) and res[0].stats["low_precision_tokens"] > 0
    with Runtime(art, _cfg(policy="ladder", budget="100%", ladder_primary=False, lowbit_kernel="standard")) as rt:
        std = rt.generate(INPUTS, max_new_tokens=8)
        assert rt.runners["int4"].mode == "standard"
    assert [r.token_ids for r in std] == [r.token_ids for r in res]  # both kernels compute the same copies


def test_ladder_holds_more_experts_than_prune_in_the_same_bytes(art):
    with Runtime(art, _cfg(policy="prune", budget="30%")) as rt:
        pruned = sum(rt.residents.counts().values())
    with Runtime(art, _cfg(policy="ladder", budget="30%")) as rt:
        held = sum(rt.residents.counts().values())
        assert rt.residents.nbytes <= rt.policy.limits.capacity
        assert rt.generate(INPUTS[:1], max_new_tokens=4)[0].token_ids
    assert held > pruned


class _GatedStore(ExpertStore):
    """Rung reads wait on ``gate`` (a slow flash), or fail for ``broken`` experts."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()
        self.broken: set = set()

    def _read_bytes(self, key, own_mapping=True, rung=None):
        if rung is not None and not self.gate.is_set():
            self.waiting.set()
            self.gate.wait(10)
        if key in self.broken and rung is not None:
            from swapmoe_edge.artifact.store import ExpertReadError

            raise ExpertReadError(key, "x", "injected I/O error")
        return super()._read_bytes(key, own_mapping, rung)


def test_a_copy_being_read_is_never_run_and_tokens_go_on(art):
    m = load_manifest(art)
    store = _GatedStore(m, read_mode="cached")
    # swap_interval_s: the swapper thread sleeps; the test drives swap_once by hand
    with Runtime(art, _cfg(policy="ladder", budget="100%", ladder_primary=False, swap_interval_s=1000), store=store) as rt:
        pol = rt.policy
        lk = rt.sparse[0]
        key = m.layer(lk.stack, lk.layer).experts[int(next(iter(rt.residents.layer(lk))))]
        store.gate.clear()
        pol.resize(rt.budget_bytes)  # unchanged budget: nothing to drop
        pol.residents.drop(key)  # the plan now wants it back: its read will wait at the gate
        t = threading.Thread(target=pol.swap_once)
        t.start()
        assert store.waiting.wait(10)
        assert key not in rt.residents  # half-read: not published, so no token can run it
        res = rt.generate(INPUTS[:1], max_new_tokens=4)  # the token loop does not wait for the read
        assert res[0].token_ids
        store.gate.set()
        t.join(10)
        assert key in rt.residents
        ex = rt.residents.layer(lk)[key.expert]  # published complete: a session, or every array of the copy
        assert ex.rung == "int4" and (ex.session is not None or set(ex.feeds) == {"wi", "wi_scale", "wo", "wo_scale"})


def test_an_unreadable_copy_marks_the_expert_and_serving_goes_on(art):
    m = load_manifest(art)
    store = _GatedStore(m, read_mode="cached")
    lk = m.sparse_layers()[0].key
    bad = m.layer(lk.stack, lk.layer).experts[0]
    store.broken.add(bad)
    with Runtime(art, _cfg(policy="ladder", budget="100%", ladder_primary=False), store=store) as rt:
        assert bad not in rt.residents and rt.residents.is_unavailable(bad)
        assert rt.generate(INPUTS, max_new_tokens=4)[0].token_ids


def test_a_falling_budget_is_honoured_at_once(art):
    with Runtime(art, _cfg(policy="ladder", budget="100%", swap_interval_s=1000)) as rt:
        pol = rt.policy
        before = rt.residents.nbytes
        pol.resize(rt.baseline + before // 3)
        assert pol.limits.capacity == before // 3
        assert rt.residents.nbytes <= before // 3
        assert all(len(rt.residents.layer(lk)) >= 1 for lk in rt.sparse)
        for _ in range(50):  # the swapper refills lower rungs within the new capacity
            pol.swap_once()
        assert rt.residents.nbytes <= before // 3
        assert "int4" in rt.residents_by_rung()
        assert rt.generate(INPUTS[:1], max_new_tokens=4)[0].token_ids


def test_small_encoder_copies_skip_the_session_overhead(art):
    """ORT keeps ~25-50 KiB per session: for experts this small an int4 session costs well over its
    bytes, so encoder copies (run once a request) use the standard kernel and cost their bytes;
    decoder copies (run every token) keep the fast kernel."""
    with Runtime(art, _cfg(policy="ladder", budget="50%")) as rt:
        runner = rt.runners["int4"]
        block = rt.manifest.experts[next(iter(rt.manifest.experts))].rungs["int4"].nbytes
        assert runner.modes == {"encoder": "standard", "decoder": "nbits"}
        assert runner.costs["encoder"] == block < runner.costs["decoder"]
        enc = [lk for lk in rt.sparse if lk.stack == "encoder"][0]
        assert rt.rungs[enc][0].cost == block


def test_waiting_for_missing_experts_routes_as_full(art):
    """ladder_wait: no token is rerouted (first choices are waited for), so a small budget of int4
    copies gives the tokens of every expert resident as an int4 copy; the reads count as stall."""
    with Runtime(art, _cfg(policy="ladder", budget="100%", ladder_primary=False)) as rt:
        ref = rt.generate(INPUTS, max_new_tokens=8)
        assert sum(rt.residents.counts().values()) == 16
    with Runtime(art, _cfg(policy="ladder", budget="15%", ladder_primary=False, ladder_wait=True, swap_interval_s=1000)) as rt:
        assert sum(rt.residents.counts().values()) < 16
        got = rt.generate(INPUTS, max_new_tokens=8)
        assert rt.residents.nbytes <= rt.policy.limits.capacity
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert sum(r.stats["loads"] for r in got) > 0 and all(r.stats["stall_ms"] > 0 for r in got[:1])


def test_measured_loss_curves_split_the_ladders_copies(art):
    """A profile whose curves say the decoder layer loses nothing with one expert and the
    encoder layer loses until it holds all: the ladder gives the copies to the encoder, where
    the importance split (decoder weight 8) gives them to the decoder."""
    from swapmoe_edge.residency.importance import Profile

    with Runtime(art, _cfg(policy="ladder", budget="12%", swap_interval_s=1000)) as rt:
        imp = {lk: np.asarray(v) for lk, v in rt.profile.importance.items()}
        enc, dec = [lk for lk in rt.sparse if lk.stack == "encoder"][0], [lk for lk in rt.sparse if lk.stack == "decoder"][0]
        plain = rt.residents.counts()
    E = len(imp[enc])
    loss = {enc: np.linspace(1.0, 0.0, E), dec: np.zeros(E)}
    prof = Profile(imp, {lk: np.ones(E) for lk in imp}, loss=loss)
    with Runtime(art, _cfg(policy="ladder", budget="12%", swap_interval_s=1000), profile=prof) as rt:
        split = rt.residents.counts()
        cap, enc_cost, dec_cost = rt.policy.limits.capacity, rt.rungs[enc][0].cost, rt.rungs[dec][0].cost
        assert split[enc.name] == min(E, (cap - dec_cost) // enc_cost)  # every byte the encoder can use
        assert enc_cost * split[enc.name] + dec_cost * split[dec.name] <= cap  # the decoder has what is left
        assert rt.residents.nbytes <= cap
    assert split[enc.name] > plain[enc.name]
    with Runtime(art, _cfg(policy="ladder", budget="12%", swap_interval_s=1000, ladder_loss_split=False), profile=prof) as rt:
        assert rt.residents.counts() == plain  # the importance split, as without curves


def test_a_background_start_holds_no_read_ahead_expert_uncounted(art):
    """The start-up read-ahead fetches each layer's best full-precision expert for the policies
    that start from it; the ladder starts from low-bit copies, so none may stay held outside
    the resident set (they would be memory the budget does not see)."""
    with Runtime(art, _cfg(policy="ladder", budget="50%", cold_start="background")) as rt:
        assert rt.wait_ready(30)
        assert rt.store.prefetched_bytes == 0
        assert rt.generate(INPUTS[:1], max_new_tokens=4)[0].token_ids


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_expert_whose_own_file_is_corrupt_runs_at_its_intact_low_bit_copy(art, tmp_path):
    """The ladder holds an expert whose float file fails its check at the int4 copy (the stats
    name it, and the file); an expert with both copies corrupt is routed around, as prune does
    for any corrupt file."""
    bad = shutil.copytree(art, tmp_path / "art")
    dec = sorted(p.name[: -len(".bin")] for p in (bad / "experts").glob("dec.L*.E0[0-3].bin"))
    assert len(dec) == 4, dec
    for name in dec:
        _flip(bad / "experts" / f"{name}.bin")
    _flip(bad / "experts" / f"{dec[3]}.int4.bin")  # this one has no readable copy left
    with Runtime(bad, _cfg(policy="ladder", budget="100%")) as rt:
        give_up = time.monotonic() + 60  # a failed read wakes the swapper, which places the int4 copies
        while rt.residents_by_rung().get("int4", 0) < 3 and time.monotonic() < give_up:
            time.sleep(0.05)
        assert rt.residents_by_rung() == {"float32": 12, "int4": 3}
        res = rt.generate(INPUTS, max_new_tokens=8)
    st = res[-1].stats
    assert st["unavailable_experts"] == [dec[3]]
    assert st["degraded_experts"] == {name: ["float32"] for name in dec[:3]}
    assert sorted(st["unavailable_files"]) == sorted(
        [str(bad / "experts" / f"{n}.bin") for n in dec] + [str(bad / "experts" / f"{dec[3]}.int4.bin")])
    assert all(not r.exact for r in res) and sum(r.stats["low_precision_tokens"] for r in res) > 0
    line = stats_line(st, False)
    assert f"unavailable {dec[3]}; {dec[0]} without its float32 copy; {dec[1]} without its float32 copy" in line
    assert "failed its check: export the model again or restore the file" in line
    with Runtime(bad, _cfg(policy="prune", budget="100%")) as rt:
        st = rt.generate(INPUTS, max_new_tokens=8)[-1].stats
    assert st["unavailable_experts"] == dec and st["degraded_experts"] == {}


def test_an_expert_whose_low_bit_copy_is_corrupt_is_held_at_its_float_file(art, tmp_path):
    """The mirror case: the int4 copies of a layer's experts fail their check, their float files
    are intact. The ladder never holds those experts at int4 again, and none is unavailable."""
    bad = shutil.copytree(art, tmp_path / "art")
    m = load_manifest(bad)
    lk = next(lay.key for lay in m.sparse_layers() if lay.key.stack == "decoder")
    broken = [k for k in m.experts if k.layer_key == lk]
    for key in broken:
        _flip(bad / m.experts[key].rungs["int4"].weights_file)
    with Runtime(bad, _cfg(policy="ladder", budget="30%", ladder_wait=True)) as rt:
        give_up = time.monotonic() + 60
        while not rt.residents.degraded and time.monotonic() < give_up:  # the start fill read some
            time.sleep(0.05)
        res = rt.generate(INPUTS, max_new_tokens=8)
        held = rt.residents.placement()[lk]
        degraded = set(rt.residents.degraded)
    st = res[-1].stats
    assert degraded and degraded <= set(broken) and st["unavailable_experts"] == []
    assert all(rung == PRIMARY for rung in held.values()), held  # never the corrupt copy
    assert held  # the layer is still served, at full precision
    assert all(v == ["int4"] for v in st["degraded_experts"].values())
    assert set(st["unavailable_files"]) <= {str(bad / m.experts[k].rungs["int4"].weights_file) for k in broken}

