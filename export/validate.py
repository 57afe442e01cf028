"""Check an exported artifact against the PyTorch model, block by block, without loading it whole.

The PyTorch reference (``reference.py``) runs in a child process and holds about one
expert's weights at a time. The split model runs in ONNX Runtime
with every expert, loading each layer's sessions only while that layer runs. Every
block output and the logits are compared; all mismatches are reported together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from swapmoe_edge.errors import ValidationError
from swapmoe_edge.manifest import LayerKey, load_manifest
from swapmoe_edge.model import SplitModel, full_moe
from swapmoe_edge.sessions import DenseSessions, open_session, session_options

from .reference import reference_forward_in_child

RTOL = ATOL = 1e-4


def _close(name: str, got: np.ndarray, ref: np.ndarray, mismatches: list[str]) -> float:
    diff = float(np.max(np.abs(got - ref))) if got.size else 0.0
    scale = max(1.0, float(np.sqrt(np.mean(ref.astype(np.float64) ** 2))))
    bad = ~np.isclose(got, ref, rtol=RTOL, atol=ATOL * scale)
    if got.shape != ref.shape:
        mismatches.append(f"{name}: shape {got.shape} != PyTorch {ref.shape}")
    elif bad.any():
        mismatches.append(f"{name}: {int(bad.sum())}/{bad.size} values differ, max |diff| {diff:.3e} (tolerance {ATOL * scale:.1e} + {RTOL:.0e}*|ref|)")
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


def artifact_forward(artifact: Path, ids, mask, dec):
    """Teacher-forced logits of the split model in ONNX Runtime, all experts, and block outputs."""
    manifest = load_manifest(artifact)
    sessions = DenseSessions(manifest)
    opts = session_options()

    def run_expert(key, x):
        entry = manifest.experts[key]
        return open_session(manifest.path(entry.graph.file), opts).run(None, {"x": x})[0]

    model = SplitModel(manifest, sessions, full_moe(run_expert, manifest.config.expert_capacity))
    outputs: dict[LayerKey, np.ndarray] = {}

    def capture(key: LayerKey, h: np.ndarray) -> None:
        outputs[key] = h.copy()
        # Each layer runs once in a teacher-forced pass: drop its sessions so that
        # validation holds about one block of the split model at a time.
        for part in manifest.layer(key.stack, key.layer).parts.values():
            sessions.release(part)

    logits = model.forward(ids, mask, dec, capture)
    return logits, outputs


def validate_artifact(model_dir: Path, artifact: Path, dtype: str = "float32", seed: int = 0) -> dict:
    """Compare the artifact with the HF model; raise ValidationError listing every mismatch."""
    manifest = load_manifest(artifact)
    c = manifest.config
    ids, mask, dec = sample_inputs(c.vocab_size, c.pad_token_id, c.decoder_start_token_id, seed)
    # The PyTorch side runs in a child process: torch alone takes ~350 MB of RSS, which
    # this process (writing and checking the artifact) then never pays.
    ref_logits, ref_blocks = reference_forward_in_child(Path(model_dir), ids, mask, dec, round_to=dtype)
    got_logits, got_blocks = artifact_forward(artifact, ids, mask, dec)
    mismatches: list[str] = []
    for key in sorted(ref_blocks):
        if key not in got_blocks:
            mismatches.append(f"{key}: no output from the split model")
            continue
        _close(f"{key} block output", got_blocks[key], ref_blocks[key], mismatches)
    max_diff = _close("logits", got_logits, ref_logits, mismatches)
    if mismatches:
        raise ValidationError(mismatches)
    return {
        "passed": True,
        "max_abs_diff": max_diff,
        "compared": len(ref_blocks) + 1,
        "inputs": {"batch": int(ids.shape[0]), "source_len": int(ids.shape[1]), "target_len": int(dec.shape[1]), "seed": seed},
        "rtol": RTOL,
        "atol": ATOL,
    }
