"""A decoder-only top-k MoE model's hyperparameters, as the manifest records them
(``extra["causal_config"]``; read from a Hugging Face config at export).

One dataclass serves Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE: they differ in a few switches
(attention biases, q/k norms, a shared expert, whether the top-k gates are renormalised).
The manifest's ``config`` block keeps the Switch-shaped fields every artifact has
(``switch_view``), so that code reading only expert sizes and counts serves both families.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# HF class name -> how its config names things and which switches it sets.
ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
QK_NORMS = ("none", "head", "full")  # none; per head over head_dim (Qwen3-MoE); over the whole projection (OLMoE)
NO_CAPACITY = 1 << 30  # decoder-only routers drop no token


@dataclass(frozen=True)
class CausalConfig:
    architecture: str  # the HF class name
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_intermediate_size: int  # F of one routed expert
    num_experts: int
    top_k: int
    norm_topk_prob: bool  # renormalise the k gates to sum to 1
    shared_expert_size: int  # 0: none; else the gated shared expert's F (Qwen2-MoE)
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    qk_norm: str  # one of QK_NORMS
    clip_qkv: float | None
    sliding_window: int | None  # keys further back than this are masked (Mixtral's, where set)
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int  # what finished rows are fed (the first EOS where the config names no pad)

    @classmethod
    def from_hf_dict(cls, arch: str, cfg: dict[str, Any]) -> "CausalConfig":
        """Read a HF ``config.json`` dict of one of ARCHITECTURES (ValueError on a missing or bad field)."""
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or hidden // heads
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
        pad = cfg.get("pad_token_id")
        mixtral = arch == "MixtralForCausalLM"
        window = cfg.get("sliding_window")  # Mixtral's and Qwen3-MoE's masks use it whenever it is set
        if arch == "Qwen2MoeForCausalLM":  # per layer (layer_types); a mix of kinds is refused at export
            types = cfg.get("layer_types") or []
            window = window if types and all(t == "sliding_attention" for t in types) else None
        if arch == "OlmoeForCausalLM":
            window = None
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            moe_intermediate_size=int(cfg["intermediate_size"] if mixtral else cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
            num_experts=int(cfg.get("num_local_experts") if mixtral else cfg.get("num_experts", cfg.get("num_local_experts"))),
            top_k=int(cfg["num_experts_per_tok"]),
            norm_topk_prob=True if mixtral else bool(cfg.get("norm_topk_prob", False)),
            shared_expert_size=int(cfg.get("shared_expert_intermediate_size") or 0) if arch == "Qwen2MoeForCausalLM" else 0,
            rope_theta=float(theta),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            qkv_bias=bool(cfg.get("qkv_bias", True)) if arch == "Qwen2MoeForCausalLM" else bool(cfg.get("attention_bias", False)),
            o_bias=bool(cfg.get("attention_bias", False)) if arch in ("Qwen3MoeForCausalLM", "OlmoeForCausalLM") else False,
            qk_norm={"Qwen3MoeForCausalLM": "head", "OlmoeForCausalLM": "full"}.get(arch, "none"),
            clip_qkv=float(cfg["clip_qkv"]) if arch == "OlmoeForCausalLM" and cfg.get("clip_qkv") is not None else None,
            sliding_window=int(window) if window else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
            eos_token_ids=eos_ids,
            pad_token_id=int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CausalConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids", ()))
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @property
    def eos_token_id(self) -> int:
        """The EOS that ends a generated row (the first where the config lists several; -1: none)."""
        return self.eos_token_ids[0] if self.eos_token_ids else -1

    def switch_view(self) -> dict[str, Any]:
        """The manifest's ``config`` block: the fields every artifact has, with this model's sizes
        (no encoder; every decoder layer sparse; the experts' F as d_ff; no capacity)."""
        eos = self.eos_token_id if 0 <= self.eos_token_id < self.vocab_size else 0
        return {
            "vocab_size": self.vocab_size, "d_model": self.hidden_size, "d_kv": self.head_dim,
            "d_ff": self.moe_intermediate_size, "num_heads": self.num_heads, "num_layers": 0,
            "num_decoder_layers": self.num_layers, "num_experts": self.num_experts, "encoder_sparse_step": 0,
            "decoder_sparse_step": 1, "expert_capacity": NO_CAPACITY, "relative_attention_num_buckets": 1,
            "relative_attention_max_distance": 1, "layer_norm_epsilon": self.rms_norm_eps, "dense_act_fn": "silu",
            "tie_word_embeddings": self.tie_word_embeddings, "router_bias": False,
            "pad_token_id": self.pad_token_id if 0 <= self.pad_token_id < self.vocab_size else 0,
            "eos_token_id": eos, "decoder_start_token_id": eos,
        }
