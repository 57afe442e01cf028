"""Expert weight types: what is stored, and the float32 weights it stands for.

Both quantised types are weight-only and lossy (the loss is measured, not assumed), and
both are dequantised in the graph with plain ONNX ops before a float32 MatMul, so that any
execution provider runs them. ``as_stored`` gives the float32 values each type's graph
computes; the PyTorch reference used by export validation runs those same weights.

int8: symmetric, one float32 scale per output column (``w ≈ q · scale``), dequantised as
Cast and Mul. A quarter of float32's bytes.

int4: symmetric per group of ``INT4_GROUP`` consecutive input rows and output column
(``w ≈ (n - 8) · scale``, n in 0..15, q = n - 8 in -8..7 with scale = amax / 7), two
nibbles per byte along the output dimension (even column in the low nibble). Scales are
float16, not float32: at 32 weights per scale that is 0.5625 bytes per weight instead of
0.625 (7.1x fewer bytes than float32 instead of 6.4x), and it costs nothing measurable:
the weights are quantised against the rounded scale, so the rounding moves the grid by at
most 7 · 2^-11 of a step; on Gaussian [768, 3072] weights the relative RMS error is 0.09709
with either scale type (int8: 0.0077).
"""

from __future__ import annotations

import numpy as np

EXPERT_DTYPES = ("float32", "float16", "int8", "int4")
LOSSY = {"float32": False, "float16": True, "int8": True, "int4": True}
INT4_GROUP = 32


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w[in, out] float -> (q[in, out] int8, scale[out] float32), symmetric per output column."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=0)  # [out]
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What the graph's Cast and Mul compute: q · scale in float32."""
    return q.astype(np.float32) * scale


def int4_shape_error(n_in: int, n_out: int) -> str | None:
    """Why a weight [n_in, n_out] cannot be stored as int4, or None if it can."""
    why = []
    if n_in % INT4_GROUP:
        why.append(f"its input dim {n_in} is not a multiple of the group size {INT4_GROUP}")
    if n_out % 2:
        why.append(f"its output dim {n_out} is odd (two columns share a byte)")
    return " and ".join(why) or None


def quantize_int4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w[in, out] float -> (packed[in, out/2] uint8, scale[in/G, out] float16).

    Symmetric per (group of G input rows, output column); packed byte = n[even] | n[odd] << 4
    with n = q + 8.
    """
    w = np.asarray(w, dtype=np.float32)
    n_in, n_out = w.shape
    why = int4_shape_error(n_in, n_out)
    if why:
        raise ValueError(f"a [{n_in}, {n_out}] weight cannot be stored as int4: {why}")
    g = w.reshape(n_in // INT4_GROUP, INT4_GROUP, n_out)  # [in/G, G, out]
    scale = (np.abs(g).max(axis=1) / 7.0).astype(np.float16)  # [in/G, out]
    if not np.isfinite(scale).all():
        raise ValueError(f"a weight of magnitude {np.abs(w).max():.3g} overflows int4's float16 scales")
    # A zero group, or one so small its scale underflows float16, stores zeros.
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(g / scale.astype(np.float32)[:, None, :]), -8, 7).astype(np.int8)
    n = (q.reshape(n_in, n_out) + 8).astype(np.uint8)  # [in, out], 0..15
    packed = n[:, 0::2] | (n[:, 1::2] << 4)  # [in, out/2]
    return np.ascontiguousarray(packed), scale


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """packed[in, out/2] uint8 -> n[in, out] uint8 in 0..15 (the stored q + 8)."""
    n = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    n[:, 0::2] = packed & 15
    n[:, 1::2] = packed >> 4
    return n


def dequantize_int4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What the int4 graph computes, op for op: (float32(n) - 8) · float32(scale) per group."""
    n = unpack_int4(packed)
    n_in, n_out = n.shape
    q = n.astype(np.float32) - np.float32(8)
    w = q.reshape(n_in // INT4_GROUP, INT4_GROUP, n_out) * scale.astype(np.float32)[:, None, :]
    return w.reshape(n_in, n_out)


def as_stored(w_t: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values an expert weight ([in, out] layout) has once stored as ``dtype``."""
    if dtype == "int8":
        return dequantize_int8(*quantize_int8(w_t))
    if dtype == "int4":
        return dequantize_int4(*quantize_int4(w_t))
    return np.asarray(w_t, dtype=dtype).astype(np.float32)
