"""The baseline: what the process holds with every dense part loaded and no expert resident.

The budget is for the whole process, so the experts get what the budget leaves above this.
It is measured once at start (or taken from an earlier process: baseline_cache.py).
"""

from __future__ import annotations

import os

import numpy as np

from swapmoe_edge.artifact.manifest import Manifest
from swapmoe_edge.core.errors import BudgetError
from swapmoe_edge.core.units import format_size
from swapmoe_edge.artifact.store import LoadedExpert
from swapmoe_edge.model.families import Family
from swapmoe_edge.model.sessions import DenseSessions
from swapmoe_edge.runtime import baseline_cache
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.runtime.experts import Experts
from swapmoe_edge.system import memory
from swapmoe_edge.system.budget import MemoryMonitor

# ONNX Runtime on the CPU folds each float16-to-float32 Cast of a dense weight into a float32
# copy at load: the OLMoE-1B-7B shape's float16 dense part held 2.06x its stored bytes
# (docs/results/causal/device_box.md). Other dense types are held at about their bytes, and so
# is the embedding table (its graph gathers float16 rows, then casts them).
FLOAT16_ON_CPU = 2.0


def measure(manifest: Manifest, config: RuntimeConfig, family: Family, sessions: DenseSessions,
            experts: Experts) -> int:
    """Peak RSS of a warm-up pass with every dense session loaded, experts excluded.

    The pass encodes one row of ``max_source_tokens`` tokens: generate() never runs more
    rows x beams x tokens at once (it chunks bigger batches), so the activations of any
    request fit in what this pass measured. With a 64-token warm-up, batches of eight
    300-token documents went 40% over budget on a 17M-parameter model.

    The pass runs the expert kernel too (on one zero expert), because its working
    buffers (packing, intermediates) are part of every request's peak: measured after
    the fact, RSS missed ~70 MB of them at switch-base size and peaks went 6% over budget.
    """
    entry = next(iter(manifest.experts.values()))
    dummy = LoadedExpert(entry.key, {t.role: np.zeros(t.shape, dtype=t.dtype) for t in entry.tensors}, entry.nbytes)
    dummy_bytes = sum(a.nbytes for a in dummy.feeds.values())
    if experts.device_kernel is not None:
        dummy = experts.device_kernel.place(dummy)

    # Low-bit copies run on the standard-op kernel dequantise on every call: its buffers are
    # part of every request's peak too (MatMulNBits sessions are measured per copy instead).
    standard = [(r, {t.role: np.zeros(t.shape, dtype=t.dtype) for t in entry.rungs[name].tensors})
                for name, r in experts.runners.items() if "standard" in r.modes.values()]

    def moe(layer, normed, logits, mask):
        flat = np.ascontiguousarray(normed.reshape(-1, normed.shape[-1]))  # [B*T, D]: every token through one expert
        for runner, feeds in standard:
            sessions.run(runner.info.kernel, {"x": flat, **feeds})
        return experts.kernel(dummy, flat).reshape(normed.shape) * 0

    warm = family.build(manifest, sessions, moe)
    # ORT memory-maps big external initializers; the embedding table's pages become
    # resident only as token ids touch them (60 MB on one random 64-token input at
    # switch-base size). Touch every row now, so that the baseline counts the table.
    family.touch_embeddings(warm)
    memory.reset_peak_rss()
    family.envelope_pass(warm, config.max_source_tokens)
    held = getattr(experts.store, "prefetched_bytes", 0)  # read ahead for the warm start: experts, not baseline
    peak = memory.peak_rss() - dummy_bytes - held
    dummy.feeds.clear()  # the zero expert is not part of the baseline
    memory.trim()
    base = max(peak, memory.current_rss() - held)
    return int(base * (1 + config.activation_margin))


def baseline(manifest: Manifest, config: RuntimeConfig, family: Family, sessions: DenseSessions, experts: Experts,
             threads: int | None, providers: list[str]) -> tuple[int, bool]:
    """(the baseline, whether it came from ``config.baseline_cache``): the one an earlier process
    measured with the same artifact and settings, else measured now (and remembered)."""
    if not config.baseline_cache:
        return measure(manifest, config, family, sessions, experts), False
    key = baseline_cache.cache_key(manifest.root / "manifest.json", tokens=config.max_source_tokens,
                                   threads=threads, providers=list(providers), placement=experts.placement,
                                   margin=config.activation_margin, cpus=os.cpu_count())
    rss = memory.current_rss() - getattr(experts.store, "prefetched_bytes", 0)
    cached = baseline_cache.lookup(key, rss)
    if cached is not None:
        return cached, True
    measured = measure(manifest, config, family, sessions, experts)
    baseline_cache.store(key, measured, rss)
    return measured, False


def predicted_dense_bytes(manifest: Manifest, dense_files: tuple[str, ...], providers: list[str]) -> int:
    """About what the dense part will hold once its sessions are loaded (a lower bound)."""
    on_cpu = not providers or providers[0] == "CPUExecutionProvider"
    doubled = on_cpu and manifest.dense_dtype == "float16"
    return int(sum(manifest.files[rel].size * (FLOAT16_ON_CPU if doubled and not is_embedding(rel) else 1)
                   for rel in dense_files))


def is_embedding(rel: str) -> bool:
    """Whether an artifact file belongs to an embedding table's graph (dense/embed.*, dense/enc.embed.*)."""
    return "embed" in rel.rsplit("/", 1)[-1].split(".")


def check_dense_fits(manifest: Manifest, dense_files: tuple[str, ...], providers: list[str], available_fn=None,
                     rss_fn=None) -> None:
    """BudgetError, with the numbers, where the dense part alone cannot fit in what this process
    can get (the cgroup's limit, free memory) before loading it, instead of the kernel killing the
    process part-way through the load. (A byte budget below it fails after the baseline is
    measured, with the exact figures.)"""
    if providers and providers[0] != "CPUExecutionProvider":
        return  # the dense weights go to the accelerator's memory
    need = predicted_dense_bytes(manifest, dense_files, providers)
    sample = MemoryMonitor(None, reserve=0, available_fn=available_fn, rss_fn=rss_fn).sample_once()
    short = sample.rss + need - sample.budget
    if short <= 0:
        return
    stored = sum(manifest.files[rel].size for rel in dense_files)
    folded = " (its float16 weights become float32 copies on the CPU)" if need > stored else ""
    raise BudgetError(
        f"the model's dense part needs about {format_size(need)} once loaded{folded}; with this process's "
        f"{format_size(sample.rss)} that is more than the {format_size(sample.budget)} it can hold "
        f"({sample.source}): short by {format_size(short)}. Raise the memory limit or free memory, or export "
        f"the model with smaller dense weights (swapmoe export ... --dtype int8 or int4).")
