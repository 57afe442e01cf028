"""Ladder rungs for SwiGLU experts (decoder-only families): the session template and the
standard-op kernel compute silu(x wi_gate) * (x wi_up) @ wo on the dequantised weights."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from swapmoe_export import ladder
from swapmoe_export.writer import ArtifactWriter


def _silu_glu(x: np.ndarray, wi: np.ndarray, wo: np.ndarray) -> np.ndarray:
    f = wo.shape[0]
    gate, up = x @ wi[:, :f], x @ wi[:, f:]
    return (gate / (1 + np.exp(-gate)) * up) @ wo


def _write_swiglu_rung(root, d: int, f: int, rung: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    wi = rng.standard_normal((d, 2 * f)).astype(np.float32)  # gate | up
    wo = rng.standard_normal((f, d)).astype(np.float32)
    writer = ArtifactWriter(root)
    entry = ladder.write_rung(writer, "decoder.L00.E00", "/t", wi, wo, rung)
    writer.write_bytes(ladder.template_rel(rung), ladder.session_template(d, f, "swiglu", rung, entry))
    writer.write_onnx(f"dense/{ladder.kernel_name(rung)}.onnx", ladder.kernel_graph(d, f, "swiglu", rung))
    return wi, wo, entry


@pytest.mark.parametrize("rung,d,f", [("int4", 64, 96), ("int4", 40, 24), ("int8", 64, 32), ("int2", 64, 96), ("int2", 40, 24)])
def test_swiglu_rung_matches_its_dequantised_float_expert(tmp_path, rung, d, f):
    wi, wo, entry = _write_swiglu_rung(tmp_path, d, f, rung)
    bits = ladder.RUNGS[rung]
    parts = ladder.rung_arrays(wi, wo, rung)
    assert parts["wi"].shape[0] == 2 * f and parts["wo"].shape[0] == d  # MatMulNBits' N: gate | up, then D
    dwi = ladder.dequantize(parts["wi"], parts["wi_scale"], bits, d)
    dwo = ladder.dequantize(parts["wo"], parts["wo_scale"], bits, f)
    x = np.random.default_rng(1).standard_normal((7, d)).astype(np.float32)
    want = _silu_glu(x, dwi, dwo)
    # the quantised expert is near the float one, and far from gate and up swapped (the order is pinned)
    full, swapped = _silu_glu(x, wi, wo), _silu_glu(x, np.concatenate([wi[:, f:], wi[:, :f]], 1), wo)
    scale = np.abs(full).max()
    assert np.abs(want - full).max() < 0.5 * np.abs(swapped - full).max()

    block = np.fromfile(tmp_path / entry["weights_file"], dtype=np.uint8)
    opts = ort.SessionOptions()
    opts.add_external_initializers_from_files_in_memory([ladder.RUNG_DATA], [block], [block.nbytes])
    exact = ort.InferenceSession(ladder.session_template(d, f, "swiglu", rung, entry, accuracy_level=0), opts)
    kernel = ort.InferenceSession(str(tmp_path / f"dense/{ladder.kernel_name(rung)}.onnx"))
    assert np.abs(exact.run(None, {"x": x})[0] - want).max() < 1e-5 * scale
    assert np.abs(kernel.run(None, {"x": x, **parts})[0] - want).max() < 1e-5 * scale
    # the template export writes: level 4 rounds the activations to int8 per block, ~1% of the output
    written = ort.InferenceSession(str(tmp_path / ladder.template_rel(rung)), opts)
    level = ladder.template_accuracy(tmp_path / ladder.template_rel(rung))
    assert level == (0 if rung == "int4" else 4)  # small int4 copies keep level 0; int2 and int8 run fast only at 4
    err = np.abs(written.run(None, {"x": x})[0] - want).max() / scale
    assert (1e-6 < err < 0.03) if level == 4 else err < 1e-5


def test_export_check_runs_swiglu_rungs_and_refuses_the_wrong_activation(tmp_path):
    from swapmoe_edge.core.errors import ExportError

    d, f = 64, 96
    _, _, entry = _write_swiglu_rung(tmp_path, d, f, "int4")
    info = ladder.ladder_entry("int4", ladder.template_rel("int4"), ladder.kernel_name("int4"))
    expert = {"stack": "decoder", "layer": 0, "expert": 0, "rungs": {"int4": entry}}
    assert ladder.check_rung(tmp_path, "int4", info, expert, d, "swiglu") < ladder.ACTIVATION_ROUNDING
    with pytest.raises(ExportError, match="not a relu expert"):  # read as relu, wi is twice wo's inputs
        ladder.check_rung(tmp_path, "int4", info, expert, d, "relu")


def test_int2_searches_each_blocks_scale_and_packs_four_inputs_a_byte():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((96, 40)).astype(np.float32)  # K not a multiple of the block
    q, scale = ladder.quantize(w, 2)
    assert q.shape == (40, 3, ladder.BLOCK // 4) and scale.shape == (40, 3)
    back = ladder.dequantize(q, scale, 2, 96)
    err = np.linalg.norm(back - w) / np.linalg.norm(w)
    # the plain symmetric rule (s = amax, levels -2..1) on the same blocks
    g = np.zeros((96, 40), np.float32)
    g[:96] = w
    blocks = g.T.reshape(40, 3, ladder.BLOCK)
    s0 = np.abs(blocks).max(-1, keepdims=True)
    plain = (np.clip(np.rint(blocks / s0), -2, 1) * s0).reshape(40, 96).T
    assert err < 0.7 * np.linalg.norm(plain - w) / np.linalg.norm(w)
    assert 0.25 < err < 0.45  # four levels: a third of the weights' RMS, not less (a wrong packing is ~1)
    assert (scale < 0).any() and (scale > 0).any()  # the sign puts level -2 on the heavier tail
    # every value decodes to a level of its block
    levels = back.T.reshape(40, 3, ladder.BLOCK)[:, :2] / scale[:, :2, None]
    assert np.allclose(levels, np.rint(levels)) and levels.min() >= -2 and levels.max() <= 1


def test_an_int2_rung_sits_below_int4_and_float():
    assert ladder.rung_error("int2", "float16") is None and ladder.rung_error("int2", "int4") is None
    assert "not below" in ladder.rung_error("int4", "int4")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from swapmoe_export.exporter import export_checkpoint

    from tiny import save_tiny

    root = tmp_path_factory.mktemp("lowrung")
    ckpt = save_tiny(root / "ckpt", seed=3, d_model=128, d_ff=512, d_kv=32, num_experts=4)
    return export_checkpoint(ckpt, root / "art", validate=False, quiet=True, ladder_rungs=("int2", "int4"))


def test_retemplate_rewrites_the_accuracy_level_and_leaves_a_hard_linked_twin_alone(art, tmp_path):
    import os
    import shutil

    from swapmoe_edge.artifact.manifest import load_manifest
    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig
    from swapmoe_export.add_rungs import retemplate

    art = shutil.copytree(art, tmp_path / "art", copy_function=os.link)  # the fixture's files stay level 4
    tmpl = {r: art / ladder.template_rel(r) for r in ("int2", "int4")}
    assert {r: ladder.template_accuracy(p) for r, p in tmpl.items()} == {"int2": 4, "int4": 0}
    assert ladder.default_accuracy("int4", 768, 3072, "relu") == 4  # a switch-base copy (2.4 MB) gets level 4
    twin = tmp_path / "twin"
    shutil.copytree(art, twin, copy_function=os.link)
    assert retemplate(art, 0) == {"int2": 0, "int4": 0}
    assert retemplate(art) == {"int2": 4, "int4": 0} and retemplate(art, 0) == {"int2": 0, "int4": 0}
    load_manifest(art, verify=True)  # the manifest lists the new templates' hashes
    load_manifest(twin, verify=True)
    assert ladder.template_accuracy(twin / ladder.template_rel("int2")) == 4
    ids = [[5, 6, 7, 8, 9, 1], [13, 14, 15, 1]]
    cfg = RuntimeConfig(policy="ladder", ladder_primary=False, ladder_rungs="int2", lowbit_kernel="nbits", threads=1)
    with Runtime(art, cfg) as a, Runtime(twin, cfg) as b:
        out_a = [r.token_ids for r in a.generate(ids, max_new_tokens=6)]
        out_b = [r.token_ids for r in b.generate(ids, max_new_tokens=6)]
        assert a.residents_by_rung() == b.residents_by_rung() == {"int2": 8}
    assert len(out_a) == len(out_b) == 2  # both levels serve (their tokens may differ by the activations' rounding)


def test_large_encoder_copies_keep_the_fast_kernel_even_when_their_session_costs_more(art, monkeypatch):
    """The standard-op kernel dequantises a copy on every call (~40 ms for a switch-base expert
    against ~0.2 ms as a session), so only small copies trade speed for their session's overhead."""
    from swapmoe_edge.model import rungs
    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig

    cfg = RuntimeConfig(policy="ladder", ladder_rungs="int4", budget="50%", threads=1, read_mode="cached")
    with Runtime(art, cfg) as rt:
        assert rt.runners["int4"].modes == {"encoder": "standard", "decoder": "nbits"}  # small: bytes count more
    monkeypatch.setattr(rungs, "STANDARD_MAX_BYTES", 0)  # as if these copies were large
    with Runtime(art, cfg) as rt:
        runner = rt.runners["int4"]
        assert runner.modes == {"encoder": "nbits", "decoder": "nbits"}
        assert runner.costs["encoder"] == runner.costs["decoder"] > rt.manifest.rung_bytes("int4") // 16


def test_a_budget_short_of_sessions_runs_small_decoder_copies_on_the_standard_kernel(art):
    """Coverage before speed: where the first budget cannot hold every expert's lowest copy as a
    session (each costs its copy plus ONNX Runtime's per-session state), ``auto`` runs the small
    decoder copies dequantising too, and the same budget holds more of them."""
    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig

    ids = [[5, 6, 7, 8, 9, 1], [13, 14, 15, 1]]
    held = {}
    for kernel in ("auto", "nbits"):
        cfg = RuntimeConfig(policy="ladder", ladder_primary=False, ladder_rungs="int4", budget="12%", threads=1,
                            read_mode="cached", lowbit_kernel=kernel)
        with Runtime(art, cfg) as rt:
            runner = rt.runners["int4"]
            lowest = {lk: ladder[0].cost for lk, ladder in rt.rungs.items()}
            assert rt.generate(ids, max_new_tokens=4)  # it serves
            rt.policy.settle()
            held[kernel] = rt.residents_by_rung().get("int4", 0)
            if kernel == "auto":
                assert runner.modes == {"encoder": "standard", "decoder": "standard"}
                assert set(lowest.values()) == {runner.nbytes}  # priced as stored
            else:
                assert runner.modes["decoder"] == "nbits" and runner.costs["decoder"] > runner.nbytes
    assert held["auto"] > held["nbits"]
    cfg = RuntimeConfig(policy="ladder", ladder_primary=False, ladder_rungs="int4", budget="100%", threads=1,
                        read_mode="cached")
    with Runtime(art, cfg) as rt:  # every copy fits as a session: the decoder keeps the fast kernel
        assert rt.runners["int4"].modes == {"encoder": "standard", "decoder": "nbits"}


def test_an_int4_rung_at_level_4_opens_at_level_0_where_the_budget_cannot_hold_every_copy(art, tmp_path):
    """A level-4 session packs an int4 copy into more bytes than a level-0 one; where the first
    budget cannot hold every expert's copy at the level-4 cost, the runtime takes the level-0
    template export wrote beside it, and at a budget that holds them all it keeps level 4."""
    import os
    import shutil

    from swapmoe_edge.artifact.manifest import load_manifest
    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig
    from swapmoe_export.add_rungs import retemplate

    art = shutil.copytree(art, tmp_path / "art", copy_function=os.link)
    assert retemplate(art, 4) == {"int2": 4, "int4": 4}
    m = load_manifest(art, verify=True)
    assert m.ladder["int4"].session_graph_level0 == ladder.level0_rel("int4") and m.ladder["int2"].session_graph_level0 is None
    assert ladder.template_accuracy(art / ladder.level0_rel("int4")) == 0
    ids = [[5, 6, 7, 8, 9, 1], [13, 14, 15, 1]]
    cfg = dict(policy="ladder", ladder_rungs="int4", threads=1)
    with Runtime(art, RuntimeConfig(budget="100%", **cfg)) as rt:
        runner = rt.runners["int4"]
        assert runner.level0_costs and not runner.on_level0  # everything fits: the fast template
        full_budget_costs = dict(runner.costs)
    cheaper = sum(runner.level0_costs.values()) < sum(full_budget_costs.values())
    with Runtime(art, RuntimeConfig(budget="12%", **cfg)) as rt:  # ~6 of the 8 copies
        runner = rt.runners["int4"]
        assert runner.on_level0 == cheaper  # as measured on this machine
        if cheaper:  # each stack at its level-0 session's cost, or on the standard kernel (small copies: sessions_short)
            assert all(runner.costs[s] == (runner.nbytes if runner.modes[s] == "standard" else runner.level0_costs[s])
                       for s in runner.costs)
        assert all(len(r.token_ids) > 0 for r in rt.generate(ids, max_new_tokens=4))
    assert retemplate(art, 0) == {"int2": 0, "int4": 0}  # no level-0 twin of a level-0 template
    assert not (art / ladder.level0_rel("int4")).exists() and load_manifest(art, verify=True).ladder["int4"].session_graph_level0 is None


def test_levels_short_switches_only_rungs_that_save_bytes_and_only_when_copies_do_not_fit():
    from swapmoe_edge.core.keys import LayerKey
    from swapmoe_edge.model.rungs import Rung, levels_short

    class Runner:
        def __init__(self, cheaper):
            self.cheaper = cheaper

        def cheaper_at_level0(self):
            return self.cheaper

    ladders = {LayerKey("encoder", 1): [Rung("int4", 10, 0.97)], LayerKey("decoder", 1): [Rung("int4", 10, 0.97)]}
    runners = {"int4": Runner(True), "int2": Runner(False)}
    assert levels_short(runners, ladders, capacity=80, num_experts=4) == []  # 2 layers x 4 x 10 fit
    assert levels_short(runners, ladders, capacity=79, num_experts=4) == ["int4"]
