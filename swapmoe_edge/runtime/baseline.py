"""The baseline: what the process holds with every dense part loaded and no expert resident.

The budget is for the whole process, so the experts get what the budget leaves above this.
It is measured once at start (or taken from an earlier process: baseline_cache.py).
"""

from __future__ import annotations

import os

import numpy as np

from swapmoe_edge.artifact.manifest import Manifest
from swapmoe_edge.artifact.store import LoadedExpert
from swapmoe_edge.model.families import Family
from swapmoe_edge.model.sessions import DenseSessions
from swapmoe_edge.runtime import baseline_cache
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.runtime.experts import Experts
from swapmoe_edge.system import memory


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
