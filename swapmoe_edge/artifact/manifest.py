"""The artifact contract: ``manifest.json`` read into frozen dataclasses.

The manifest is the only thing the runtime knows about a model. It never looks at
model code; names, shapes and files all come from here. The model's hyperparameters
are in model_config.py, path checks and hashing in files.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swapmoe_edge.artifact.files import check_inside, sha256_file
from swapmoe_edge.artifact.model_config import ModelConfig
from swapmoe_edge.artifact.schema import ITEMSIZE, check_manifest
from swapmoe_edge.core.errors import ArtifactError
from swapmoe_edge.core.keys import ExpertKey, LayerKey

# 1: a layer's dense parts are separate subgraphs (attn | self_attn, cross_attn; ffn | router).
# 2: one fused subgraph per layer, "block" (encoder) or "step" (decoder, beside cross_kv); the
#    runtime reads both.
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "swapmoe-artifact"
# Expert types stored with less precision than the float32 checkpoint; int4 is MatMulNBits'
# layout (two weights a byte, a float32 scale per 32 inputs of an output column).
LOSSY_EXPERT_DTYPES = ("float16", "int8", "int4")


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Subgraph:
    """One ONNX file and the tensor names it takes and gives."""

    name: str
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class TensorSlice:
    """A weight inside an expert's weight block: ``offset`` bytes from the block's start."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str
    role: str = ""  # the expert kernel's input it feeds: wi, wo, wi_scale, wo_scale
    # int4: wi/wo are uint8 [in, out/2] (two weights a byte), scales float16 [in/32, out]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class RungEntry:
    """One expert's low-bit copy on the precision ladder (export/ladder.py)."""

    weights_file: str
    nbytes: int
    tensors: tuple[TensorSlice, ...]


@dataclass(frozen=True)
class LadderRung:
    """A rung of the artifact's ladder: how its copies are laid out and run."""

    name: str  # "int4" | "int8"
    bits: int
    block: int
    session_graph: str  # template whose initializers are the copy's bytes, handed over in memory
    kernel: str  # subgraph name: the same computation in standard ops, weights as inputs
    data_name: str  # the external-data name the template uses for those bytes
    session_graph_level0: str | None = None  # the template at MatMulNBits accuracy level 0, where the default is not


@dataclass(frozen=True)
class ExpertEntry:
    key: ExpertKey
    graph: Subgraph
    weights_file: str
    nbytes: int  # size of the weight block on disk (tensors plus alignment padding)
    norm: float  # Frobenius norm of the expert's weights, ||E|| in SwapMoE's Eq. 1
    tensors: tuple[TensorSlice, ...]
    rungs: dict[str, RungEntry] = field(default_factory=dict)  # the precision ladder's copies, if exported


@dataclass(frozen=True)
class LayerEntry:
    """One transformer block: the names of its dense subgraphs and, if sparse, its experts."""

    key: LayerKey
    sparse: bool
    parts: dict[str, str]  # role -> subgraph name, e.g. {"attn": "enc.L00.attn", "router": ...}
    experts: tuple[ExpertKey, ...] = ()


@dataclass(frozen=True)
class Manifest:
    root: Path
    schema_version: int
    dtype: str
    expert_dtype: str
    config: ModelConfig
    tokenizer: str | None
    subgraphs: dict[str, Subgraph]
    layers: tuple[LayerEntry, ...]
    experts: dict[ExpertKey, ExpertEntry]
    files: dict[str, FileEntry]
    generation: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    ladder: dict[str, LadderRung] = field(default_factory=dict)  # rung name -> rung; empty: no ladder
    # The dense MatMul weights' type: ``dtype`` or, for MatMulNBits weights, int8/int4 with
    # ``dense_nbits`` {bits, block_size, accuracy_level, float_dtype} (lossy; ``dtype`` is then
    # the type of the embeddings, norms, position bias and router).
    dense_dtype: str = ""
    dense_nbits: dict[str, Any] | None = None
    # int4 experts' MatMulNBits settings {bits, block_size, accuracy_level} (0: float32
    # arithmetic; 4: int8 activations, as the experts' own graphs say)
    expert_nbits: dict[str, Any] | None = None

    def __post_init__(self):
        if not self.dense_dtype:
            object.__setattr__(self, "dense_dtype", self.dtype)

    # -- derived views -------------------------------------------------------------
    def layer(self, stack: str, index: int) -> LayerEntry:
        for entry in self.layers:
            if entry.key == LayerKey(stack, index):
                return entry
        raise KeyError(f"{stack} layer {index}")

    def stack_layers(self, stack: str) -> list[LayerEntry]:
        return [entry for entry in self.layers if entry.key.stack == stack]

    def sparse_layers(self) -> list[LayerEntry]:
        return [entry for entry in self.layers if entry.sparse]

    @property
    def expert_dtype_lossy(self) -> bool:
        """Whether the experts hold rounded or quantised weights (the output then differs from the checkpoint's)."""
        return self.expert_dtype in LOSSY_EXPERT_DTYPES

    @property
    def dense_dtype_lossy(self) -> bool:
        """Whether the dense weights are rounded or quantised (float16, int8, int4)."""
        return self.dense_dtype != "float32"

    @property
    def expert_bytes(self) -> int:
        return sum(e.nbytes for e in self.experts.values())

    def ladder_files(self) -> set[str]:
        """Every file of the precision ladder: the copies, each rung's session template and kernel."""
        files = {r.weights_file for e in self.experts.values() for r in e.rungs.values()}
        files |= {r.session_graph for r in self.ladder.values()}
        files |= {r.session_graph_level0 for r in self.ladder.values() if r.session_graph_level0}
        return files | {self.subgraphs[r.kernel].file for r in self.ladder.values() if r.kernel in self.subgraphs}

    @property
    def dense_bytes(self) -> int:
        expert_files = {e.weights_file for e in self.experts.values()} | {e.graph.file for e in self.experts.values()}
        expert_files |= self.ladder_files()
        return sum(f.size for p, f in self.files.items() if p not in expert_files)

    def rung_bytes(self, rung: str) -> int:
        """All experts' copies on ``rung``, in bytes."""
        return sum(e.rungs[rung].nbytes for e in self.experts.values())

    def path(self, rel: str) -> Path:
        """``root / rel``; every path the manifest names was checked at load to stay inside root."""
        return self.root / rel

    def verify_file(self, rel: str, data: bytes | None = None) -> None:
        """Check one file's size and sha256 against the manifest; raise ArtifactError if not."""
        entry = self.files.get(rel)
        if entry is None:
            raise ArtifactError(f"{self.root}: {rel} is not listed in {MANIFEST_NAME}")
        path = self.path(rel)
        if data is None:
            if not path.is_file():
                raise ArtifactError(
                    f"{path} is missing; the artifact is incomplete. Export it again."
                )
            data_hash = sha256_file(path)
            size = path.stat().st_size
        else:
            data_hash = hashlib.sha256(data).hexdigest()
            size = len(data)
        if size != entry.size or data_hash != entry.sha256:
            raise ArtifactError(
                f"{path} is corrupt: size {size} / sha256 {data_hash[:12]}… but the manifest "
                f"says size {entry.size} / sha256 {entry.sha256[:12]}…. Export the model again "
                "(or restore the file from a good copy)."
            )

    def summary(self) -> dict[str, Any]:
        """What ``swapmoe info`` shows."""
        c = self.config
        sparse = self.sparse_layers()
        return {
            "artifact": str(self.root),
            "schema_version": self.schema_version,
            "dtype": self.dtype,
            "dense_dtype": self.dense_dtype,
            "dense_nbits": self.dense_nbits,
            "expert_nbits": self.expert_nbits,
            "dense_parts": dense_parts(self),
            "expert_dtype": self.expert_dtype,
            "expert_dtype_lossy": self.expert_dtype_lossy,
            "d_model": c.d_model,
            "d_ff": c.d_ff,
            "num_heads": c.num_heads,
            "vocab_size": c.vocab_size,
            "encoder_layers": c.num_layers,
            "decoder_layers": c.num_decoder_layers,
            "sparse_layers": [e.key.name for e in sparse],
            "experts_per_layer": c.num_experts,
            "experts_total": len(self.experts),
            "expert_capacity": c.expert_capacity,
            "family": self.extra.get("family", "switch"),
            # experts a token goes to (Switch: 1, capacity-limited; decoder-only: the router's top k, no capacity)
            "top_k": int(self.extra.get("causal_config", {}).get("top_k", 1)),
            # the Hugging Face class it was exported from
            "architecture": str(self.extra.get("causal_config", {}).get("architecture",
                                                                       "SwitchTransformersForConditionalGeneration")),
            "dense_bytes": self.dense_bytes,
            "expert_bytes": self.expert_bytes,
            "bytes_per_expert": (self.expert_bytes // len(self.experts)) if self.experts else 0,
            "total_bytes": sum(f.size for f in self.files.values()),
            "tokenizer": self.tokenizer,
            "validated": bool(self.validation and self.validation.get("passed")),
            "ladder_bytes": sum(self.files[p].size for p in self.ladder_files() if p in self.files),
            # the precision ladder: each rung's copies of all experts, in bytes (lossy)
            "ladder": {name: {"bits": r.bits, "bytes": self.rung_bytes(name),
                              "share_of_expert_bytes": round(self.rung_bytes(name) / max(1, self.expert_bytes), 4)}
                       for name, r in self.ladder.items()},
        }


def dense_parts(m: Manifest) -> dict[str, int]:
    """The dense files' bytes by part: embeddings, position bias, the blocks by stack (encoder
    blocks; the decoder's cross-attention K/V, run once per request; the decoder steps), the
    final norms and LM head, and the expert kernels."""
    parts: dict[str, int] = {}
    seen: set[str] = set()

    def add(part: str, rel: str) -> None:
        for f in (rel, rel + ".data"):
            if f in m.files and f not in seen:
                seen.add(f)
                parts[part] = parts.get(part, 0) + m.files[f].size

    roles = {name: ("decoder cross K/V" if role == "cross_kv" else f"{entry.key.stack} blocks")
             for entry in m.layers for role, name in entry.parts.items()}
    for name, sg in sorted(m.subgraphs.items()):
        if name.endswith("embed"):
            part = "embeddings"
        elif name.endswith("position_bias"):
            part = "position bias"
        elif name == "lm_head":
            part = "lm head"
        else:
            part = roles.get(name, "other")
        add(part, sg.file)
    return parts


# -- reading -------------------------------------------------------------


def _check_paths(root: Path, raw: Any) -> None:
    """Every path in the manifest's ``files`` stays inside ``root`` (schema.py then checks that
    every path the manifest names anywhere is one of them)."""
    files = raw.get("files") if isinstance(raw, dict) else None
    dirs: dict = {}
    for rel in files if isinstance(files, dict) else ():
        check_inside(root, rel, f"{MANIFEST_NAME} 'files'", _dirs=dirs)


def _subgraph(name: str, d: dict[str, Any]) -> Subgraph:
    return Subgraph(name=name, file=d["file"], inputs=tuple(d["inputs"]), outputs=tuple(d["outputs"]))


def _slices(tensors: list[dict[str, Any]]) -> tuple[TensorSlice, ...]:
    return tuple(TensorSlice(t["name"], int(t["offset"]), tuple(t["shape"]), t["dtype"], t.get("role") or _role(t["name"]))
                 for t in tensors)


def _role(tensor_name: str) -> str:
    """Schema-1 manifests without roles: ``.../wi.weight`` feeds ``wi``."""
    leaf = tensor_name.rsplit("/", 1)[-1]
    return leaf.replace(".weight", "").replace(".scale", "_scale")


def load_manifest(root: str | os.PathLike, verify: bool = False) -> Manifest:
    """Read and check ``root/manifest.json`` (schema.py: every field and cross-reference; every
    path inside ``root``; every file present at its size). With ``verify``, hash every file too
    (slow for big models; the runtime checks dense files at load, verify.py, and experts on read)."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.exists():
        raise ArtifactError(f"artifact directory {root} does not exist. Run `swapmoe export` first.")
    if not path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST_NAME}: it is not an artifact, or its export did not finish. "
            "Run `swapmoe export MODEL_DIR -o DIR` again."
        )
    check_inside(root, MANIFEST_NAME, "the artifact's manifest")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and RecursionError's cousins included
        raise ArtifactError(f"{path} is not valid JSON ({str(e)[:200]}). Export the model again.") from e
    except RecursionError as e:
        raise ArtifactError(f"{path} is nested too deeply to be a manifest. Export the model again.") from e
    _check_paths(root, raw)
    check_manifest(raw, path, SCHEMA_VERSION, FORMAT_NAME)
    version = raw["schema_version"]
    try:  # schema.py checked every field read here; this only guards against a check that missed one
        subgraphs = {n: _subgraph(n, d) for n, d in raw["subgraphs"].items()}
        experts: dict[ExpertKey, ExpertEntry] = {}
        for d in raw["experts"]:
            key = ExpertKey(d["stack"], int(d["layer"]), int(d["expert"]))
            experts[key] = ExpertEntry(
                key=key,
                graph=_subgraph(key.name, d["graph"]),
                weights_file=d["weights_file"],
                nbytes=int(d["nbytes"]),
                norm=float(d["norm"]),
                tensors=_slices(d["tensors"]),
                rungs={name: RungEntry(r["weights_file"], int(r["nbytes"]), _slices(r["tensors"]))
                       for name, r in d.get("rungs", {}).items()},
            )
        layers = tuple(
            LayerEntry(
                key=LayerKey(d["stack"], int(d["layer"])),
                sparse=bool(d["sparse"]),
                parts=dict(d["parts"]),
                experts=tuple(ExpertKey(d["stack"], int(d["layer"]), int(i)) for i in d.get("experts", [])),
            )
            for d in raw["layers"]
        )
        files = {p: FileEntry(p, int(d["size"]), d["sha256"]) for p, d in raw["files"].items()}
        manifest = Manifest(
            root=root,
            schema_version=version,
            dtype=raw["dtype"],
            expert_dtype=raw.get("expert_dtype", raw["dtype"]),
            config=ModelConfig.from_dict(raw["config"]),
            tokenizer=raw.get("tokenizer"),
            subgraphs=subgraphs,
            layers=layers,
            experts=experts,
            files=files,
            generation=raw.get("generation", {}),
            validation=raw.get("validation"),
            extra=raw.get("extra", {}),
            dense_dtype=raw.get("dense_dtype", raw["dtype"]),
            dense_nbits=raw.get("dense_nbits"),
            expert_nbits=raw.get("expert_nbits"),
            ladder={name: LadderRung(name, int(r["bits"]), int(r["block"]), r["session_graph"], r["kernel"], r["data_name"],
                                     r.get("session_graph_level0"))
                    for name, r in raw.get("ladder", {}).items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{path} is malformed ({type(e).__name__}: {e}). Export the model again.") from e
    for rel, entry in files.items():
        p = root / rel
        try:
            st = p.stat()
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{p} is missing; the artifact is incomplete. Export the model again.")
        if st.st_size != entry.size:
            raise ArtifactError(
                f"{p} has {st.st_size} bytes, the manifest says {entry.size}: the file is "
                "truncated or replaced. Export the model again."
            )
    if verify:
        for rel in files:
            manifest.verify_file(rel)
    return manifest
