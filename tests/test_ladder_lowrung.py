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
    sess = ort.InferenceSession(str(tmp_path / ladder.template_rel(rung)), opts)
    kernel = ort.InferenceSession(str(tmp_path / f"dense/{ladder.kernel_name(rung)}.onnx"))
    assert np.abs(sess.run(None, {"x": x})[0] - want).max() < 1e-5 * scale
    assert np.abs(kernel.run(None, {"x": x, **parts})[0] - want).max() < 1e-5 * scale


def test_export_check_runs_swiglu_rungs_and_refuses_the_wrong_activation(tmp_path):
    from swapmoe_edge.core.errors import ExportError

    d, f = 64, 96
    _, _, entry = _write_swiglu_rung(tmp_path, d, f, "int4")
    info = ladder.ladder_entry("int4", ladder.template_rel("int4"), ladder.kernel_name("int4"))
    expert = {"stack": "decoder", "layer": 0, "expert": 0, "rungs": {"int4": entry}}
    assert ladder.check_rung(tmp_path, "int4", info, expert, d, "swiglu") < 1e-4
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
