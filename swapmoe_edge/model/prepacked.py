"""Resident experts as their own ONNX Runtime sessions, with weights prepacked for MLAS.

The shared expert kernel takes an expert's weights as inputs, so ONNX Runtime multiplies
them as they lie ([D, F] row-major); an expert's own subgraph (``experts/*.onnx``) holds
them as constants, which ORT repacks once at load into the layout its GEMM kernel
streams best. For one decoded token on this machine the packed form ran ~30% faster
(paired, 24 switch-base experts in a loop: 0.70x the kernel's time).

The price is paid at load: opening a session reads the expert and packs it, ~10x a plain
read, and each session keeps ~0.6 MiB of its own beside the packed weights. So it suits
the `full` policy (every expert loaded once, never swapped). Each expert's resident cost
is measured on the first one opened, not assumed (DESIGN: budget by measured cost).

int4 experts (``NbitsStore``) are sessions under every policy: their own graphs are two
``com.microsoft.MatMulNBits``, which ORT prepacks from the block the store read, handed over
in memory; the shared kernel would dequantise the whole expert on every call in standard ops
(~40 ms a token for a 768x3072 expert, against ~0.3 ms as a session; model/rungs.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import PurePath
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from swapmoe_edge.system import memory
from swapmoe_edge.core.keys import ExpertKey
from swapmoe_edge.model.sessions import open_session, session_options
from swapmoe_edge.artifact.store import ExpertStore, LoadedExpert


NBITS_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")  # where ORT ships MatMulNBits


class PrepackedStore:
    """An ExpertStore whose reads come back as prepacked sessions (``LoadedExpert.session``).

    The block is still read through the wrapped store first (sha256 check, byte counters);
    those arrays are dropped once the session holds its own packed copy.
    """

    def __init__(self, store: ExpertStore, threads: int | None, providers: list[str] | None = None):
        self.store = store
        self.manifest = store.manifest
        self.opts = session_options(threads)
        self.providers = providers
        self.cost: int | None = None  # measured resident bytes of one expert (set by measure_cost)

    def read(self, key: ExpertKey, own_mapping: bool = True) -> LoadedExpert:
        checked = self.store.read(key, own_mapping)  # verifies and counts; its arrays go at return
        graph = self.manifest.experts[key].graph.file  # its weights are the block's file, read again by ORT
        self.manifest.verify_file(graph)
        sess = open_session(self.manifest.path(graph), self.opts, self.providers, root=self.manifest.root,
                            listed=self.manifest.files)
        return replace(checked, feeds={}, session=sess, nbytes=self.cost or checked.nbytes)

    def measure_cost(self, key: ExpertKey) -> int:
        """RSS that one resident expert adds (packed weights + session), at least its block size."""
        memory.trim()
        before = memory.current_rss()
        expert = self.read(key)
        x = np.zeros((1, self.manifest.config.d_model), np.float32)
        expert.session.run(None, {"x": x})  # first run: any lazily made buffers
        memory.trim()
        grown = memory.current_rss() - before
        del expert
        self.cost = max(grown, self.manifest.experts[key].nbytes)
        return self.cost

    def __getattr__(self, name: str) -> Any:  # counters() and the rest, from the wrapped store
        return getattr(self.store, name)


class NbitsStore:
    """An ExpertStore whose reads of the artifact's own int4 experts come back as sessions of
    their own graphs (two MatMulNBits), built from the block read; ladder copies pass through."""

    def __init__(self, store: ExpertStore, threads: int | None, providers: list[str] | None = None):
        self.store = store
        self.manifest = store.manifest
        self.threads, self.providers = threads, providers
        self.cost: int | None = None  # measured resident bytes of one expert (measure_cost)
        self._graphs: dict[ExpertKey, bytes] = {}  # each expert's graph, read and checked once (~1 KB)

    def session(self, key: ExpertKey, block: np.ndarray) -> ort.InferenceSession:
        entry = self.manifest.experts[key]
        graph = self._graphs.get(key)
        if graph is None:
            graph = self.manifest.path(entry.graph.file).read_bytes()
            self.manifest.verify_file(entry.graph.file, graph)
            self._graphs[key] = graph
        opts = session_options(self.threads)
        # Two MatMulNBits and an activation: nothing to fuse, and every swap builds a session.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # the graph names its block by file name, beside it in experts/ (schema: experts/NAME.bin)
        opts.add_external_initializers_from_files_in_memory([PurePath(entry.weights_file).name], [block], [block.nbytes])
        return ort.InferenceSession(graph, sess_options=opts, providers=self.providers)

    def read(self, key: ExpertKey, own_mapping: bool = True, rung: str | None = None) -> LoadedExpert:
        if rung is not None:
            return self.store.read(key, own_mapping, rung=rung)
        checked = self.store.read(key, own_mapping)  # verifies and counts; ORT copies the block
        return replace(checked, feeds={}, block=None, session=self.session(key, checked.block),
                       nbytes=self.cost or checked.nbytes)

    def measure_cost(self) -> int:
        """Resident bytes one expert adds as a session, averaged over several (at least its block)."""
        key = next(iter(self.manifest.experts))
        raw = self.store.read(key)
        self.cost = session_bytes(lambda: self.session(key, raw.block), raw.nbytes)
        return self.cost

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def session_bytes(open_one: Callable[[], Any], nbytes: int) -> int:
    """What one more session from ``open_one()`` holds: heap in use where glibc reports it (RSS
    misses what reuses freed heap), else RSS, averaged over >= 4 MiB of sessions, at least ``nbytes``."""
    n = max(4, -(-(4 << 20) // max(nbytes, 1)))
    open_one()  # the first session's one-off state is not per expert
    reading = memory.heap_in_use if memory.heap_in_use() is not None else memory.current_rss
    memory.trim()
    before = reading()
    held = [open_one() for _ in range(n)]  # noqa: F841 (alive until measured)
    memory.trim()
    grown = int((reading() - before) / n)
    del held
    memory.trim()
    return max(grown, nbytes)
