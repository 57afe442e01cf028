"""Check an exported artifact against the PyTorch model, block by block, without loading it whole.

The PyTorch reference (``reference.py``) runs in a child process and holds about one
expert's weights at a time. The split model runs in ONNX Runtime
with every expert, loading each layer's sessions only while that layer runs. Every
block output and the logits are compared; all mismatches are reported together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from swapmoe_edge.core.errors import ValidationError
from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.model.split import SplitModel, full_moe
from swapmoe_edge.model.sessions import DenseSessions, open_session, session_options

from .reference import Reference, reference_forward_in_child

RTOL = ATOL = 1e-4
E2E_TOL = 1e-2


def _close(name: str, got: np.ndarray, ref: np.ndarray, mismatches: list[str], tol: float = ATOL) -> float:
    if got.shape != ref.shape:
        mismatches.append(f"{name}: shape {got.shape} != PyTorch {ref.shape}")
        return float("inf")
    diff = float(np.max(np.abs(got - ref))) if got.size else 0.0
    scale = max(1.0, float(np.sqrt(np.mean(ref.astype(np.float64) ** 2))))
    bad = ~np.isclose(got, ref, rtol=tol, atol=tol * scale)
    if bad.any():
        mismatches.append(f"{name}: {int(bad.sum())}/{bad.size} values differ, max |diff| {diff:.3e} (tolerance {tol * scale:.1e} + {tol:.0e}*|ref|)")
    return diff


def sample_inputs(vocab: int, pad: int, start: int, seed: int = 0, batch: int = 2, src: int = 24, tgt: int = 8):
    """Random token ids with padding in the second row, so masks are exercised."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(batch, src), dtype=np.int64)
    mask = np.ones((batch, src), dtype=np.int64)
    if batch > 1:
        mask[1, src * 2 // 3:] = 0
        ids[1, src * 2 // 3:] = pad
    dec = rng.integers(2, vocab, size=(batch, tgt), dtype=np.int64)
    dec[:, 0] = start
    return ids, mask, dec


def _split_model(artifact: Path):
    """The split model with every expert, each run by its own standalone subgraph.

    Expert sessions are opened per call and dropped: validation holds no resident experts.
    """
    manifest = load_manifest(artifact)
    sessions = DenseSessions(manifest)
    opts = session_options()

    def run_expert(key, x):
        return open_session(manifest.path(manifest.experts[key].graph.file), opts).run(None, {"x": x})[0]

    return manifest, sessions, SplitModel(manifest, sessions, full_moe(run_expert, manifest.config.expert_capacity))


def artifact_forward(artifact: Path, ids, mask, dec):
    """Teacher-forced logits of the split model in ONNX Runtime, all experts, and block outputs."""
    manifest, sessions, model = _split_model(artifact)
    outputs: dict[LayerKey, np.ndarray] = {}

    def capture(key: LayerKey, h: np.ndarray) -> None:
        outputs[key] = h.copy()
        # Each layer runs once in a teacher-forced pass: drop its sessions so that
        # validation holds about one block of the split model at a time.
        for part in manifest.layer(key.stack, key.layer).parts.values():
            sessions.release(part)

    logits = model.forward(ids, mask, dec, capture)
    return logits, outputs


def artifact_blockwise(artifact: Path, ref: Reference, ids, mask, dec) -> tuple[dict[LayerKey, np.ndarray], np.ndarray]:
    """Each block of the split model run on the PyTorch block's own input; LM head on its last output."""
    _, sessions, model = _split_model(artifact)
    out: dict[LayerKey, np.ndarray] = {}
    enc_bias, enc_mask = model.encoder_bias(mask), mask.astype(bool)
    for layer in model.enc_layers:
        out[layer.key] = model.encoder_block(layer, ref.block_in[layer.key], enc_bias, enc_mask)
        for part in layer.parts.values():
            sessions.release(part)
    state = model.start_decoder(ref.encoder_out, mask)
    dec_bias = model.decoder_bias(dec.shape[1], 0)
    for i, layer in enumerate(model.dec_layers):
        out[layer.key] = model.decoder_block(i, layer, ref.block_in[layer.key], dec_bias, state)[0]
        for part in layer.parts.values():
            sessions.release(part)
    logits = sessions.run("lm_head", {"hidden": ref.block_out[model.dec_layers[-1].key]})[0]
    return out, logits


def validate_artifact(model_dir: Path, artifact: Path, dtype: str = "float32", seed: int = 0, expert_dtype: str | None = None) -> dict:
    """Compare the artifact with the HF model; raise ValidationError listing every mismatch.

    Two checks. Block by block: every block, and the LM head, on the PyTorch model's own
    inputs, within 1e-4 (relative to the tensor's RMS) — this pins each subgraph down
    without the drift of a deep stack. End to end: the split model run alone against the
    PyTorch logits, within E2E_TOL; float32 rounding grows with depth (a random 24-layer
    switch-base-64 drifts ~1e-3), so this check catches wiring errors, not rounding.
    """
    manifest = load_manifest(artifact)
    c = manifest.config
    ids, mask, dec = sample_inputs(c.vocab_size, c.pad_token_id, c.decoder_start_token_id, seed)
    # The PyTorch side runs in a child process: torch alone takes ~350 MB of RSS, which
    # this process (writing and checking the artifact) then never pays.
    ref = reference_forward_in_child(Path(model_dir), ids, mask, dec, round_to=dtype, expert_dtype=expert_dtype)
    got_blocks, got_logits = artifact_blockwise(artifact, ref, ids, mask, dec)
    mismatches: list[str] = []
    for key in sorted(ref.block_out):
        if key not in got_blocks:
            mismatches.append(f"{key}: no output from the split model")
            continue
        _close(f"{key} block output", got_blocks[key], ref.block_out[key], mismatches)
    max_diff = _close("logits (LM head on the PyTorch decoder output)", got_logits, ref.logits, mismatches)
    e2e_logits, _ = artifact_forward(artifact, ids, mask, dec)
    e2e_diff = _close("logits (split model end to end)", e2e_logits, ref.logits, mismatches, tol=E2E_TOL)
    if mismatches:
        raise ValidationError(mismatches)
    return {
        "passed": True,
        "max_abs_diff": max_diff,
        "end_to_end_max_abs_diff": e2e_diff,
        "compared": len(ref.block_out) + 2,
        "inputs": {"batch": int(ids.shape[0]), "source_len": int(ids.shape[1]), "target_len": int(dec.shape[1]), "seed": seed},
        "rtol": RTOL,
        "atol": ATOL,
        "end_to_end_tol": E2E_TOL,
    }
