"""Expert weight types: what is stored, and the float32 weights it stands for.

Both quantised types are weight-only and lossy (the loss is measured, not assumed); the
shared expert kernel dequantises both with plain ONNX ops before a float32 MatMul, so that any
execution provider runs them. ``as_stored`` gives the float32 values each type's graph
computes; the PyTorch reference used by export validation runs those same weights.

int8: symmetric, one float32 scale per output column (``w ≈ q · scale``), dequantised as
Cast and Mul. A quarter of float32's bytes.

int4: ONNX Runtime's ``com.microsoft.MatMulNBits`` layout, the layout of the ladder's int4
rung (``quantize_nbits``: blocks of ``INT4_GROUP`` consecutive inputs per output column, a
float32 scale each, symmetric, ``w ≈ (n - 8) · scale``). The runtime opens each resident int4
expert as a session of its own whose weights ORT prepacks (model/prepacked.py), at accuracy
level 0 (``INT4_ACCURACY``: float32 arithmetic on the dequantised weights, so export checks it
against the same weights within float rounding). The float32 scales make it 0.625 bytes a
weight (6.4x fewer than float32); on Gaussian [768, 3072] weights the relative RMS error is
0.097 (int8: 0.0077).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXPERT_DTYPES = ("float32", "float16", "int8", "int4")
LOSSY = {"float32": False, "float16": True, "int8": True, "int4": True}
INT4_GROUP = 32  # inputs per scale of an int4 expert (MatMulNBits block_size)
INT4_ACCURACY = 0  # MatMulNBits accuracy level of an int4 expert's own graph
# role -> the leaf of a stored expert tensor's name (its graph initializer, the manifest's "name")
TENSOR_LEAF = {"wi": "wi.weight", "wi_scale": "wi.scale", "wo": "wo.weight", "wo_scale": "wo.scale"}


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


def as_stored(w_t: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values an expert weight ([in, out] layout) has once stored as ``dtype``."""
    if dtype == "int8":
        return dequantize_int8(*quantize_int8(w_t))
    if dtype == "int4":
        return dequantize_nbits(*quantize_nbits(w_t, 4, INT4_GROUP), 4, w_t.shape[0])
    return np.asarray(w_t, dtype=dtype).astype(np.float32)


# -- dense weights as MatMulNBits ---------------------------------------------------------------
# ``--dtype int8|int4``: every dense MatMul weight (attention, cross-attention, dense FFN, LM head)
# is stored in ONNX Runtime's com.microsoft.MatMulNBits layout, the layout of the ladder's rungs
# (ladder.py): q[N, K/block, block·bits/8] uint8, scale[N, K/block] float32, symmetric with the
# kernel's default zero point. Embeddings, norms, position bias and the router stay floating point:
# the router is E x D (8 x 768 at switch-base, 24 KB) and its argmax picks the expert, so a
# quantised router would move tokens to other experts to save nothing measurable.
#
# accuracy_level 4 makes the kernel quantise the activations too: each block of ``block`` inputs of
# a row to int8, symmetric, ``rint(x · (1 / s))`` with ``s = amax / 127``, then integer dot products.
# ``quantize_activations`` is that step in numpy, so that export validation can run PyTorch on what
# the kernel computes (measured: 3e-7..8e-7 relative, float32 rounding, against 5e-3 without it).
# Defaults measured by scripts/bench_nbits_kernels.py (docs/results/dense_lowbit/README.md).

DENSE_NBITS = {"int8": 8, "int4": 4}  # --dtype -> bits
DENSE_DTYPES = ("float32", "float16", *DENSE_NBITS)
BLOCK_SIZES = (16, 32, 64, 128)
ACCURACY_LEVELS = (0, 4)  # float32 compute, or int8 activations (levels 1-3 are float types on a CPU)
# int4: block 32 and an int8 LM head. On the embedded model (docs/results/dense_lowbit) block 64
# lost 0.0097 ROUGE-2 against float32 and block 32 0.0017; the int8 head cut the logits' KL to the
# float model by a third again, for 12 MB more a token at switch-base (26 against 14 MB).
# int8: block 64, as close to float32 as block 32 (-0.0003 ROUGE-2) and faster through the LM head.
DEFAULT_BLOCK = {"int8": 64, "int4": 32}
DEFAULT_ACCURACY = 4
DEFAULT_LM_HEAD = {"int8": "int8", "int4": "int8"}  # the LM head's width under each --dtype


@dataclass(frozen=True)
class DenseWeights:
    """How a dense subgraph stores its weights: ``storage`` for float tensors (embeddings, norms,
    position bias, router); ``bits`` None: MatMul weights in ``storage`` too, else MatMulNBits."""

    storage: str = "float32"
    bits: int | None = None
    block: int = 32
    accuracy_level: int = DEFAULT_ACCURACY
    lm_head_bits: int | None = None  # the LM head's own width (None: ``bits``)

    @property
    def name(self) -> str:
        """The --dtype it was made from."""
        return f"int{self.bits}" if self.bits else self.storage

    def manifest(self) -> dict | None:
        """The manifest's ``dense_nbits`` entry (None for float dense weights)."""
        if not self.bits:
            return None
        return {"bits": self.bits, "block_size": self.block, "accuracy_level": self.accuracy_level,
                "lm_head_bits": self.lm_head_bits or self.bits, "float_dtype": self.storage, "router": self.storage}


def dense_weights(dtype: str, block: int | None = None, accuracy_level: int | None = None, float_dtype: str = "float32",
                  lm_head: str | None = None) -> DenseWeights:
    """``--dtype`` (and ``--block-size``, ``--accuracy-level``) as a DenseWeights; ValueError for bad input."""
    if dtype not in DENSE_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DENSE_DTYPES)}, not {dtype!r}")
    if dtype not in DENSE_NBITS:
        if block is not None or accuracy_level is not None or lm_head is not None:
            raise ValueError(f"--block-size, --accuracy-level and --lm-head apply to --dtype int8 or int4, not {dtype}")
        return DenseWeights(storage=dtype)
    if float_dtype not in ("float32", "float16"):
        raise ValueError(f"the float part of an {dtype} model must be float32 or float16, not {float_dtype!r}")
    block = DEFAULT_BLOCK[dtype] if block is None else block
    level = DEFAULT_ACCURACY if accuracy_level is None else accuracy_level
    if block not in BLOCK_SIZES:
        raise ValueError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, not {block}")
    if level not in ACCURACY_LEVELS:
        raise ValueError(f"--accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))}, not {level}")
    head = DEFAULT_LM_HEAD[dtype] if lm_head is None else lm_head
    if head not in DENSE_NBITS or DENSE_NBITS[head] < DENSE_NBITS[dtype]:
        raise ValueError(f"--lm-head must be int8 or int4 and not narrower than --dtype {dtype}, not {head!r}")
    return DenseWeights(storage=float_dtype, bits=DENSE_NBITS[dtype], block=block, accuracy_level=level,
                        lm_head_bits=DENSE_NBITS[head])


def quantize_nbits(w: np.ndarray, bits: int, block: int, search_scale=None) -> tuple[np.ndarray, np.ndarray]:
    """w[K, N] float -> (q[N, ceil(K/block), block·bits/8] uint8, scale[N, ceil(K/block)] float32), the
    layout of ONNX Runtime's MatMulNBits: blocks of ``block`` consecutive inputs per output column
    (the last zero-padded), symmetric, ``n = q + 2^(bits-1)`` packed lowest bits first.

    The scale is amax / (2^(bits-1) - 1) per block, or ``search_scale(g, amax, bits)`` where given
    (the ladder's int2 rung searches it). The dense weights and the ladder's copies both quantise
    here; ladder.dequantize reads either back.
    """
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    kb = -(-k // block)
    padded = np.zeros((kb * block, n), np.float32)
    padded[:k] = w
    g = padded.T.reshape(n, kb, block)  # [N, K/B, B]
    qmax = (1 << (bits - 1)) - 1
    amax = np.abs(g).max(axis=-1)
    if not np.isfinite(amax / qmax).all():
        raise ValueError(f"a weight of magnitude {np.abs(w).max():.3g} cannot be quantised to {bits} bits")
    scale = search_scale(g, amax, bits) if search_scale is not None else (amax / qmax).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero block stores zeros
    q = (np.clip(np.rint(g / scale[..., None]), -(qmax + 1), qmax) + (qmax + 1)).astype(np.uint8)  # 0 .. 2^b - 1
    per = 8 // bits  # inputs a byte, the lowest bits first
    if per > 1:
        q = np.bitwise_or.reduce([q[..., j::per] << (j * bits) for j in range(per)], axis=0).astype(np.uint8)
    return np.ascontiguousarray(q), scale


def expert_nbits(accuracy_level: int) -> dict:
    """The manifest's ``expert_nbits`` entry of int4 experts at ``accuracy_level``."""
    return {"bits": 4, "block_size": INT4_GROUP, "accuracy_level": accuracy_level}


def dequantize_nbits(q: np.ndarray, scale: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The float32 w[K, N] that ``quantize_nbits``' (q, scale) stand for: (n - 2^(b-1)) * scale per block."""
    per = 8 // bits
    if per > 1:
        n = np.empty(q.shape[:2] + (q.shape[2] * per,), np.uint8)
        for j in range(per):
            n[..., j::per] = (q >> (j * bits)) & ((1 << bits) - 1)
    else:
        n = q
    w = (n.astype(np.float32) - np.float32(1 << (bits - 1))) * scale[..., None]  # [N, K/B, B]
    return np.ascontiguousarray(w.reshape(w.shape[0], -1)[:, :k].T)


def quantize_activations(x: np.ndarray, block: int) -> np.ndarray:
    """What MatMulNBits at accuracy_level 4 multiplies instead of x[..., K]: each block of ``block``
    inputs rounded to int8 steps of amax / 127 (the kernel's ``rint(x · (1 / s))``), in float32."""
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    kb = -(-k // block)
    pad = np.zeros(x.shape[:-1] + (kb * block,), np.float32)
    pad[..., :k] = x
    g = pad.reshape(x.shape[:-1] + (kb, block))
    s = (np.abs(g).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, np.float32(1) / s, np.float32(0)).astype(np.float32)
    return (np.rint(g * inv) * s).reshape(pad.shape)[..., :k]
