"""Expert weight types: what is stored, and the float32 weights it stands for.

int8: weight-only, symmetric, one float32 scale per output column (``w ≈ q · scale``), run
with ONNX ``DequantizeLinear`` (per-axis) before the MatMul: a quarter of float32's bytes,
so the same budget holds four times as many experts. Lossy; the loss is measured, not
assumed. Used by the exporter and by the PyTorch reference (which must run the same weights).
"""

from __future__ import annotations

import numpy as np

EXPERT_DTYPES = ("float32", "float16", "int8")


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w[in, out] float -> (q[in, out] int8, scale[out] float32), symmetric per output column."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=0)  # [out]
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What DequantizeLinear computes: q · scale in float32."""
    return q.astype(np.float32) * scale


def as_stored(w_t: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values an expert weight ([in, out] layout) has once stored as ``dtype``."""
    if dtype == "int8":
        return dequantize_int8(*quantize_int8(w_t))
    return np.asarray(w_t, dtype=dtype).astype(np.float32)
