"""Lazy reading of a Hugging Face decoder-only top-k MoE checkpoint (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE), one tensor, or one expert's rows of a fused tensor, at a time.

Two expert layouts are read:
- per expert, as published: ``block_sparse_moe.experts.N.w1/w3/w2`` (Mixtral: gate, up, down)
  or ``mlp.experts.N.gate_proj/up_proj/down_proj``;
- fused 3-D tensors, as transformers 5 holds them in memory (and writes them when the state
  dict is saved as it is): ``mlp.experts.gate_up_proj`` [E, 2F, D] (gate rows first) and
  ``mlp.experts.down_proj`` [E, D, F]. One expert's rows are read from the file alone, so an
  expert never costs more memory than its own weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from swapmoe_edge.artifact.causal_config import ARCHITECTURES, QK_NORMS, CausalConfig
from swapmoe_edge.core.errors import CheckpointError

from .checkpoint import CheckpointReader, confined

ROPE_TYPES = ("default", None)


def architecture(raw: dict) -> str | None:
    """The config's decoder-only MoE class name, or None when it names none of ARCHITECTURES."""
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    for a in archs if isinstance(archs, list) else ():
        if a in ARCHITECTURES:
            return a
    return None


def read_causal_config(model_dir: Path) -> tuple[dict, CausalConfig]:
    """config.json of a decoder-only MoE checkpoint; CheckpointError when it is not one this exporter runs."""
    path = confined(Path(model_dir), "config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as UTF-8 JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object: it is not a model config.")
    gen = confined(Path(model_dir), "generation_config.json")
    gen_ids = {}
    if gen.is_file():  # generate takes its special ids from the generation config, where it names them
        try:
            gen_ids = {k: v for k, v in json.loads(gen.read_text(encoding="utf-8")).items()
                       if k in ("eos_token_id", "pad_token_id", "bos_token_id") and v is not None}
        except (ValueError, AttributeError):
            gen_ids = {}
    merged = {**raw, **gen_ids}
    arch = architecture(raw)
    if arch is None:
        raise CheckpointError(f"{path}: architectures={raw.get('architectures')} names none of {', '.join(ARCHITECTURES)}.")
    try:
        cfg = CausalConfig.from_hf_dict(arch, merged)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: a field {arch} needs is missing or not a number ({type(e).__name__}: {e}).") from e
    why = []
    if raw.get("hidden_act", "silu") != "silu":
        why.append(f"hidden_act {raw.get('hidden_act')!r} (the experts are SwiGLU: silu only)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) not in ROPE_TYPES:
        why.append(f"rope type {rope.get('rope_type', rope.get('type'))!r} (only the default rotary embedding)")
    sparse_step = int(raw.get("decoder_sparse_step") or 1)
    if raw.get("mlp_only_layers") or sparse_step != 1:
        why.append(f"dense MLP layers (mlp_only_layers {raw.get('mlp_only_layers')}, decoder_sparse_step {sparse_step}): "
                   "every layer must be sparse")
    if cfg.num_heads % cfg.num_kv_heads:
        why.append(f"{cfg.num_heads} heads over {cfg.num_kv_heads} key/value heads")
    if cfg.top_k < 1 or cfg.top_k > cfg.num_experts:
        why.append(f"top-{cfg.top_k} of {cfg.num_experts} experts")
    if cfg.head_dim % 2:
        why.append(f"odd head_dim {cfg.head_dim} (rotary positions rotate halves)")
    if len(set(raw.get("layer_types") or [])) > 1:
        why.append(f"layers of different attention kinds ({', '.join(sorted(set(raw['layer_types'])))})")
    assert cfg.qk_norm in QK_NORMS
    if why:
        raise CheckpointError(f"{path}: this {arch} cannot be exported: {'; '.join(why)}.")
    return raw, cfg


class CausalReader(CheckpointReader):
    """CheckpointReader plus the family's tensor names and one expert's SwiGLU weights."""

    def __init__(self, model_dir: Path, cfg: CausalConfig):
        super().__init__(model_dir)
        self.cfg = cfg
        self.moe = "block_sparse_moe" if self.has("model.layers.0.block_sparse_moe.gate.weight") else "mlp"

    def layer(self, i: int, name: str) -> np.ndarray:
        return self.get(f"model.layers.{i}.{name}")

    def maybe(self, name: str) -> np.ndarray | None:
        return self.get(name) if self.has(name) else None

    def router(self, i: int) -> np.ndarray:
        return self.layer(i, f"{self.moe}.gate.weight")  # [E, D]

    def row(self, name: str, index: int) -> np.ndarray:
        """``name[index]`` of a tensor stacked along its first axis, read alone."""
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint.")
        if self._kind != "safetensors":
            return np.ascontiguousarray(self._bin_state[name][index].float().numpy())
        f = self._safe(path)
        e = dict(f.entries[name])
        shape = list(e["shape"])
        begin, end = e["data_offsets"]
        per = (end - begin) // shape[0]
        e["shape"], e["data_offsets"] = shape[1:], [begin + index * per, begin + (index + 1) * per]
        f.entries[f"{name}#{index}"] = e
        try:
            arr = f.read(f"{name}#{index}")
        finally:
            del f.entries[f"{name}#{index}"]
        return np.ascontiguousarray(arr, dtype=np.float32)

    def expert(self, i: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Expert e of layer i as the artifact stores it: wi [D, 2F] (gate | up) and wo [F, D]."""
        base = f"model.layers.{i}.{self.moe}.experts"
        if self.has(f"{base}.gate_up_proj"):
            gate_up = self.row(f"{base}.gate_up_proj", e)  # [2F, D]
            down = self.row(f"{base}.down_proj", e)  # [D, F]
        elif self.moe == "block_sparse_moe":
            gate_up = np.concatenate([self.get(f"{base}.{e}.w1.weight"), self.get(f"{base}.{e}.w3.weight")], axis=0)
            down = self.get(f"{base}.{e}.w2.weight")
        else:
            gate_up = np.concatenate([self.get(f"{base}.{e}.gate_proj.weight"), self.get(f"{base}.{e}.up_proj.weight")], axis=0)
            down = self.get(f"{base}.{e}.down_proj.weight")
        f, d = self.cfg.moe_intermediate_size, self.cfg.hidden_size
        if gate_up.shape != (2 * f, d) or down.shape != (d, f):
            raise CheckpointError(f"{self.model_dir}: expert {e} of layer {i} has gate|up {list(gate_up.shape)} and down "
                                  f"{list(down.shape)}; config.json says [{2 * f}, {d}] and [{d}, {f}].")
        return np.ascontiguousarray(gate_up.T), np.ascontiguousarray(down.T)

    def attention(self, i: int) -> dict:
        """Layer i's attention weights in PyTorch layout, biases and q/k norms where the model has them."""
        p = f"model.layers.{i}.self_attn"
        w = {k: self.get(f"{p}.{k}_proj.weight") for k in "qkvo"}
        for k in "qkvo":
            w[f"{k}_bias"] = self.maybe(f"{p}.{k}_proj.bias")
        if self.cfg.qk_norm != "none":
            w["q_norm"], w["k_norm"] = self.get(f"{p}.q_norm.weight"), self.get(f"{p}.k_norm.weight")
        w["input_layernorm"] = self.layer(i, "input_layernorm.weight")
        w["post_attention_layernorm"] = self.layer(i, "post_attention_layernorm.weight")
        return w

    def shared_expert(self, i: int) -> dict | None:
        if not self.cfg.shared_expert_size:
            return None
        p = f"model.layers.{i}.mlp.shared_expert"
        return {"gate": self.get(f"{p}.gate_proj.weight"), "up": self.get(f"{p}.up_proj.weight"),
                "down": self.get(f"{p}.down_proj.weight"), "gate_weight": self.get(f"model.layers.{i}.mlp.shared_expert_gate.weight")}

    def embed(self) -> np.ndarray:
        return self.get("model.embed_tokens.weight")

    def lm_head(self) -> np.ndarray:
        return self.embed() if self.cfg.tie_word_embeddings or not self.has("lm_head.weight") else self.get("lm_head.weight")
