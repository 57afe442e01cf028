"""Lazy, tensor-by-tensor reading of a Hugging Face Switch Transformer checkpoint.

Supports ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``
and ``pytorch_model.bin`` (memory-mapped). The whole model is never in memory: each
``get`` reads one tensor.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from swapmoe_edge.core.errors import CheckpointError
from swapmoe_edge.artifact.causal_config import ARCHITECTURES
from swapmoe_edge.artifact.model_config import ModelConfig

SUPPORTED_ACTS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh")


def checkpoint_root(model_dir: Path) -> Path:
    """The folder every file export reads must resolve into: the checkpoint folder itself, or,
    for a snapshot of the Hugging Face hub cache (``models--ORG--NAME/snapshots/REV``, whose
    files are symlinks to ``../../blobs/HASH``), that model's cache folder."""
    root = Path(model_dir).resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent
    return root


def confined(model_dir: Path, name: str) -> Path:
    """``model_dir / name``, or CheckpointError when it resolves outside the checkpoint folder
    (a symlink out, an absolute path, a ``..``): export copies what it reads into the artifact,
    so a link to /etc/passwd named tokenizer.json would ship that file."""
    path = Path(model_dir) / name
    root = checkpoint_root(model_dir)
    target = Path(os.path.realpath(path))  # follows every link on the way, dangling ones too
    if target != root and root not in target.parents:
        how = f"is a symlink to {target}" if path.is_symlink() else f"resolves to {target}"
        raise CheckpointError(
            f"{path} {how}, outside the checkpoint folder {root}; export reads only files inside it. "
            f"If you trust that file, copy it into the folder in place of the link (cp --remove-destination "
            f"{target} {path}); otherwise remove the link."
        )
    return path


def read_config(model_dir: Path) -> tuple[dict, ModelConfig]:
    """Read and check ``config.json``; raise CheckpointError if it is not a usable Switch model."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory. Pass a Hugging Face checkpoint directory.")
    path = confined(model_dir, "config.json")
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} has no config.json: it is not a Hugging Face checkpoint directory. "
            "Pass the directory that holds config.json and the weights."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # UnicodeDecodeError included
        raise CheckpointError(f"{path} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object: it is not a model config.")
    model_type = raw.get("model_type")
    if model_type != "switch_transformers":
        archs = raw.get("architectures")
        raise CheckpointError(
            f"{path} describes model_type={model_type!r} (architectures={archs}); swapmoe exports "
            "Switch Transformers (model_type 'switch_transformers', SwitchTransformersForConditionalGeneration) "
            f"and the decoder-only MoE classes {', '.join(ARCHITECTURES)} (named in `architectures`)."
        )
    try:
        config = ModelConfig.from_hf_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: a size or id field is not a number ({e}).") from e
    if config.dense_act_fn not in SUPPORTED_ACTS:
        raise CheckpointError(
            f"{path}: dense_act_fn={config.dense_act_fn!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ACTS)})."
        )
    nb, md = config.relative_attention_num_buckets, config.relative_attention_max_distance
    if nb < 4 or md <= nb // 2:
        raise CheckpointError(
            f"{path}: relative_attention_num_buckets {nb} and relative_attention_max_distance {md} are not a "
            "usable T5 setting (needs at least 4 buckets and a max distance above half of them; "
            "transformers' own bucket function overflows otherwise)."
        )
    if config.num_experts < 1 or not config.sparse_layers():
        raise CheckpointError(f"{path}: the model has no sparse (MoE) layer; nothing to swap.")
    return raw, config


_ROUTER = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.mlp\.router\.classifier\.weight")


def ff_prefix(stack: str, layer: int) -> str:
    """The checkpoint's name prefix of a Switch block's feed-forward sublayer (the decoder's is
    its third, after cross-attention)."""
    return f"{stack}.block.{layer}.layer.{2 if stack == 'decoder' else 1}"


def check_sparse_layers(model_dir: Path, config: ModelConfig, tensor_names) -> None:
    """Raise CheckpointError unless the sparse layers config.json implies (by transformers' rule)
    are exactly the layers whose router weights the checkpoint holds."""
    found: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
    for name in tensor_names:
        m = _ROUTER.fullmatch(name)
        if m:
            found[m.group(1)].add(int(m.group(2)))
    wrong = []
    for stack in ("encoder", "decoder"):
        want = {i for i in range(config.depth(stack)) if config.is_sparse(stack, i)}
        if want != found[stack]:
            step = config.encoder_sparse_step if stack == "encoder" else config.decoder_sparse_step
            wrong.append(
                f"{stack}: config.json gives {stack}_sparse_step {step} over {config.depth(stack)} layers, "
                f"so sparse layers {sorted(want)}, but the checkpoint has router weights in layers {sorted(found[stack])}"
            )
    if wrong:
        raise CheckpointError(
            f"{model_dir}: config.json and the checkpoint's tensors disagree on which layers are sparse "
            f"(transformers' rule: a saved *_sparse_step wins, else num_layers // num_sparse_*_layers):\n  "
            + "\n  ".join(wrong)
            + "\nFix config.json (encoder_sparse_step / decoder_sparse_step) to match the weights."
        )


class CheckpointReader:
    """Maps tensor names to files and reads one tensor at a time as float32/float16 numpy."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._where: dict[str, Path] = {}
        self._kind = ""
        self._bin_state = None
        self._open: dict[Path, object] = {}
        single = confined(self.model_dir, "model.safetensors")
        index = confined(self.model_dir, "model.safetensors.index.json")
        binfile = confined(self.model_dir, "pytorch_model.bin")
        if index.is_file():
            self._kind = "safetensors"
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
            if not isinstance(weight_map, dict) or not all(isinstance(s, str) and s for s in weight_map.values()):
                raise CheckpointError(f"{index} is not a valid safetensors index: weight_map must map names to shard files.")
            shards: dict[str, Path] = {}
            for name, shard in weight_map.items():
                if shard not in shards:
                    shards[shard] = confined(self.model_dir, shard)
                    if not shards[shard].is_file():
                        raise CheckpointError(f"{index} names shard {shard}, which is missing from {self.model_dir}.")
                self._where[name] = shards[shard]
        elif single.is_file():
            self._kind = "safetensors"
            for name in self._safe(single).keys():
                self._where[name] = single
        elif binfile.is_file():
            self._kind = "bin"
            self._bin_state = self._load_bin(binfile)
            for name in self._bin_state:
                self._where[name] = binfile
        else:
            raise CheckpointError(
                f"{self.model_dir} has no weights: expected model.safetensors, "
                "model.safetensors.index.json with shards, or pytorch_model.bin."
            )

    # safetensors: parse the header ourselves and read each tensor with a plain read.
    # (safe_open memory-maps the file; every page touched then counts in this process's
    # RSS, and reading a whole checkpoint that way makes RSS as big as the checkpoint.)
    def _safe(self, path: Path) -> "_SafetensorsFile":
        handle = self._open.get(path)
        if handle is None:
            handle = _SafetensorsFile(path)
            self._open[path] = handle
        return handle

    @staticmethod
    def _load_bin(path: Path):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - export extra always has torch
            raise CheckpointError("reading pytorch_model.bin needs torch: pip install 'swapmoe-edge[export]'") from e
        try:
            # mmap keeps tensors on disk until touched; needs the zip format of torch >= 1.6.
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} cannot be loaded lazily ({e}); the file is corrupt or in an old format.") from e

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        """One tensor as a numpy array (float32, or its stored float16/bfloat16 widened to float32)."""
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint.")
        try:
            if self._kind == "safetensors":
                arr = self._safe(path).read(name)
            else:
                t = self._bin_state[name]
                arr = t.float().numpy() if t.dtype != t.new_empty(0).float().dtype else t.numpy()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"{path}: reading tensor {name!r} failed ({e}); the file is truncated or corrupt."
            ) from e
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        return np.ascontiguousarray(arr)

    def get_first(self, *names: str) -> np.ndarray:
        for n in names:
            if self.has(n):
                return self.get(n)
        raise CheckpointError(f"{self.model_dir}: none of the tensors {names} is in the checkpoint.")

    def source_files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def close(self) -> None:
        self._open.clear()
        self._bin_state = None


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


class _SafetensorsFile:
    """Minimal safetensors reader: 8-byte header length, JSON header, raw little-endian data."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit in a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"{path} cannot be read as safetensors ({e}); the file is truncated or corrupt. "
                "Download or copy the checkpoint again."
            ) from e
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.base + end > size:
            raise CheckpointError(
                f"{path} is truncated or corrupt: its header needs {self.base + end} bytes, the file has {size}. "
                "Download or copy the checkpoint again."
            )

    def keys(self):
        return self.entries.keys()

    def read(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] == "BF16":
            raw = self._read(e, np.uint16)
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if e["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}.")
        return self._read(e, _ST_DTYPES[e["dtype"]])

    def _read(self, e: dict, dtype) -> np.ndarray:
        begin, end = e["data_offsets"]
        out = np.empty(tuple(e["shape"]), dtype=dtype)
        if out.nbytes != end - begin:
            raise CheckpointError(f"{self.path}: a tensor's byte range does not match its shape; the file is corrupt.")
        with open(self.path, "rb") as f:
            f.seek(self.base + begin)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise CheckpointError(f"{self.path}: short read; the file is truncated.")
        return out
