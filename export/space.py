"""The disk an export needs, from the config alone, and the error a failed write becomes.

The artifact's size follows from the model's shapes and the output types, not from the
checkpoint's files: a float16 checkpoint exported to float32 doubles, and the experts'
low-bit ladder copies come on top. Estimated per file and rounded up to the filesystem's
block, as the free space is counted.

Shapes: V vocab, D d_model, H heads, K d_kv, F d_ff, E experts, G the int4 group (32).
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import replace
from pathlib import Path

from swapmoe_edge.artifact.model_config import ModelConfig
from swapmoe_edge.core.errors import ExportError

from . import ladder, quant
from .writer import ALIGN

BLOCK = 4096  # a file takes whole filesystem blocks
GRAPH_BYTES = 16 << 10  # a graph's nodes, names and small constants, generously (measured: 0.4-5 KiB)
MANIFEST_BYTES_PER_FILE = 2 << 10  # the manifest's entry for a file, expert entries included (measured: ~0.6 KiB)
_WIDTH = {"float32": 4, "float16": 2}


def _blocks(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _packed(sizes: list[int]) -> int:
    """Bytes of a weight block holding arrays of ``sizes`` bytes, each at an ALIGN-ed offset (writer.write_blocks)."""
    pos = 0
    for n in sizes:
        pos += (-pos) % ALIGN + n
    return pos


def expert_block_bytes(d: int, f: int, expert_dtype: str) -> int:
    """The size of one expert's ``experts/NAME.bin`` (wi [D, F], wo [F, D] and their scales)."""
    if expert_dtype in _WIDTH:
        w = _WIDTH[expert_dtype]
        return _packed([d * f * w, f * d * w])
    if expert_dtype == "int8":
        return _packed([d * f, f * 4, f * d, d * 4])
    return _packed(nbits_sizes(d, f, 4) + nbits_sizes(f, d, 4))  # ladder.int4_expert


def nbits_sizes(k: int, n: int, bits: int, block: int = ladder.BLOCK) -> list[int]:
    """Bytes of a [K, N] weight's codes and float32 scales in the rungs' MatMulNBits layout."""
    kb = -(-k // block)
    return [n * kb * block * bits // 8, n * kb * 4]


def rung_block_bytes(d: int, f: int, rung: str, block: int = ladder.BLOCK) -> int:
    """The size of one expert's ladder copy ``experts/NAME.RUNG.bin`` (ladder.rung_arrays)."""
    bits = ladder.RUNGS[rung]
    return _packed(nbits_sizes(d, f, bits, block) + nbits_sizes(f, d, bits, block))


def matmul_bytes(k: int, n: int, dense: "str | quant.DenseWeights") -> int:
    """Bytes of a dense MatMul weight [K, N] as stored: floats, or MatMulNBits' blocks and float32 scales."""
    if isinstance(dense, str) or not dense.bits:
        return k * n * _WIDTH[dense if isinstance(dense, str) else dense.storage]
    kb = -(-k // dense.block)
    return n * kb * dense.block * dense.bits // 8 + n * kb * 4


def artifact_bytes(cfg: ModelConfig, dtype: "str | quant.DenseWeights", expert_dtype: str, rungs: tuple[str, ...] = (),
                   stack_tables: int = 0, side_bytes: int = 0, fused: bool = True, ladder_block: int = ladder.BLOCK) -> int:
    """Bytes on disk of the artifact export writes for ``cfg`` (an upper estimate, whole blocks).

    ``dtype``: the dense weights' type (a quant.DenseWeights for MatMulNBits dense weights).
    ``stack_tables``: per-stack embedding tables beside the shared one (untied checkpoints whose
    tables may differ); ``side_bytes``: files copied as they are (tokenizer.json).
    """
    v, d, h, k, f, e = cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_experts
    w = _WIDTH[dtype if isinstance(dtype, str) else dtype.storage]
    hk = h * k
    if not isinstance(dtype, str) and dtype.bits:  # a float-width upper estimate of a projection: its bytes / (d·hk)
        per = max(matmul_bytes(d, hk, dtype), matmul_bytes(hk, d, dtype)) / (d * hk)
        ffn_per = max(matmul_bytes(d, f, dtype), matmul_bytes(f, d, dtype)) / (d * f)
    else:
        per = ffn_per = w
    dense: list[int] = []  # weight bytes per dense graph (its .onnx and .onnx.data together)
    dense += [v * d * w] * (1 + stack_tables)  # embed (and per-stack tables)
    head = dtype if isinstance(dtype, str) or not dtype.bits else replace(dtype, bits=dtype.lm_head_bits or dtype.bits)
    dense += [matmul_bytes(d, v, head) + d * w, d * w]  # lm_head with the final decoder norm, the encoder's final norm
    dense += [cfg.relative_attention_num_buckets * h * w] * 2  # position bias, each stack
    for stack in ("encoder", "decoder"):
        for i in range(cfg.depth(stack)):
            proj = 4 * d * hk * per + d * w  # q, k, v, o and the norm
            if stack == "decoder":
                proj += 4 * d * hk * per + d * w + (2 * d * hk * per if not fused else 0)  # cross attention; split layout repeats k, v
            ffn = (e * d + (e if cfg.router_bias else 0) + d) * w if cfg.is_sparse(stack, i) else (2 * d * f * ffn_per + d * w)
            if stack == "decoder":  # cross_kv (the cross attention's k and v) and the step graph
                dense += [int(2 * d * hk * per), int(proj + ffn - 2 * d * hk * per)]
            else:
                dense.append(int(proj + ffn))
    files = [_blocks(n + GRAPH_BYTES) for n in dense]
    n_experts = e * len(cfg.sparse_layers())
    per_expert = _blocks(expert_block_bytes(d, f, expert_dtype)) + _blocks(GRAPH_BYTES)
    per_expert += sum(_blocks(rung_block_bytes(d, f, r, ladder_block)) for r in rungs)
    n_files = len(files) + n_experts * (2 + len(rungs)) + 3 * len(rungs) + 3
    total = sum(files) + n_experts * per_expert + len(rungs) * 3 * _blocks(GRAPH_BYTES)  # rung template, kernels
    total += _blocks(side_bytes) + _blocks(n_files * MANIFEST_BYTES_PER_FILE) + _blocks(GRAPH_BYTES)  # expert kernel
    return total


def check_space(where: Path, need: int) -> int:
    """Free bytes at ``where``; ExportError when fewer than ``need``."""
    free = shutil.disk_usage(where).free
    if free < need:
        raise ExportError(
            f"not enough disk at {where}: the artifact needs about {need:,} bytes ({need / 2**20:.1f} MiB), "
            f"{free:,} bytes ({free / 2**20:.1f} MiB) are free. Free space or export elsewhere (-o)."
        )
    return free


def write_error(e: OSError, out: Path, need: int, free: int | None) -> ExportError:
    """An OSError met while writing the artifact, as one line that names the file and the bytes."""
    what = "no space left on the device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    had = f"; {free:,} bytes ({free / 2**20:.1f} MiB) were free at {out.parent} when the export began" if free is not None else ""
    return ExportError(
        f"cannot write {e.filename or out}: {what} (the artifact needs about {need:,} bytes, {need / 2**20:.1f} MiB{had}). "
        f"Nothing was installed and {out} is as it was; free space or export elsewhere (-o)."
    )
