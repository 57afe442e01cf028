"""ONNX Runtime sessions for the dense subgraphs of an artifact, created on first use."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Collection

import numpy as np
import onnxruntime as ort

from swapmoe_edge.core.errors import ArtifactError
from swapmoe_edge.artifact.manifest import Manifest, Subgraph
from swapmoe_edge.artifact.onnx_refs import check_external_data


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if threads != 1:
        # ORT's pool threads spin between ops by default. On an edge device whose cores are
        # shared (the swapper, other apps) they burn the cores the token needs: switch-base-8 at
        # two threads on this two-core shared machine decoded at 0.28x the time without
        # spinning (paired, median; docs/results/decode.md). One thread has no pool.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    # The CPU arena keeps freed blocks forever; with many small sessions it inflates RSS
    # far beyond what the weights need, which breaks a memory budget.
    opts.enable_cpu_mem_arena = False
    # Memory patterns are cached per input shape; the decoder's cache grows every step, so
    # they pile up (RSS grew ~70 MB over the first request at switch-base size).
    opts.enable_mem_pattern = False
    return opts


def open_session(path: Path, opts: ort.SessionOptions, providers: list[str] | None = None,
                 provider_options: dict[str, dict[str, str]] | None = None, root: Path | None = None,
                 listed: Collection[str] | None = None) -> ort.InferenceSession:
    """``provider_options``: per provider name (devices.provider_options), e.g. the CUDA arena limit.
    ``root``: the artifact folder that the model's external data must stay inside; ``listed``:
    the manifest's files, which must name that data too (so that it was verified)."""
    check_external_data(Path(path), Path(root) if root is not None else Path(path).parent, listed)
    names = providers or ["CPUExecutionProvider"]
    chosen = [(p, (provider_options or {}).get(p, {})) for p in names]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
    except Exception as e:  # ORT raises several untyped errors for bad files
        raise ArtifactError(f"ONNX Runtime cannot load {path}: {e}. The artifact is corrupt; export it again.") from e


class DenseSessions:
    """Lazily opened sessions keyed by subgraph name; ``release`` frees one again."""

    def __init__(self, manifest: Manifest, threads: int | None = None, providers: list[str] | None = None,
                 provider_options: dict[str, dict[str, str]] | None = None):
        self.manifest = manifest
        self.opts = session_options(threads)
        # The expert kernel runs every expert, and fp16/int8 experts are cast to float32 on
        # each call (~19 MB at switch-base size). Through malloc those blocks fragmented the
        # heap and RSS crept 5-10% over budget; ORT's arena reuses them instead, and the
        # warm-up pass that measures the baseline grows it to its working size.
        self.kernel_opts = session_options(threads)
        self.kernel_opts.enable_cpu_mem_arena = True
        self.providers = providers
        self.provider_options = provider_options or {}
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._outputs: dict[int, tuple[ort.InferenceSession, list[str]]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ort.InferenceSession:
        # Keyed by file: two names may share one subgraph (tied embeddings), loaded once.
        file = self.manifest.subgraphs[name].file
        sess = self._sessions.get(file)
        if sess is None:
            with self._lock:
                sess = self._sessions.get(file)
                if sess is None:
                    opts = self.kernel_opts if name == "expert_kernel" else self.opts
                    sess = open_session(self.manifest.path(file), opts, self.providers, self.provider_options, self.manifest.root,
                                        self.manifest.files)
                    self._sessions[file] = sess
        return sess

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        sess = self.get(name)
        # ORT lists the output names from its metadata on every run(None, ...); decoding calls
        # each layer's graph once a token, so the list is made once per session.
        names = self._outputs.get(id(sess))
        if names is None or names[0] is not sess:
            names = self._outputs[id(sess)] = (sess, [o.name for o in sess.get_outputs()])
        try:
            return sess.run(names[1], feeds)
        except Exception as e:  # ORT's untyped errors: a graph whose inputs or shapes are not the ones this model feeds
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise ArtifactError(f"ONNX Runtime cannot run subgraph {name} ({self.manifest.subgraphs[name].file}): "
                                f"{str(e)[:300]}. The artifact's graphs do not fit together; export the model again.") from e

    def release(self, name: str) -> None:
        with self._lock:
            sess = self._sessions.pop(self.manifest.subgraphs[name].file, None)
            if sess is not None:
                self._outputs.pop(id(sess), None)

    def load_all(self) -> None:
        for name in self.manifest.subgraphs:
            self.get(name)

    def subgraph(self, name: str) -> Subgraph:
        return self.manifest.subgraphs[name]
