"""The model's hyperparameters, as the manifest records them (read from a Hugging Face config at export)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from swapmoe_edge.core.keys import STACKS, LayerKey


@dataclass(frozen=True)
class ModelConfig:
    """The subset of a Hugging Face ``SwitchTransformersConfig`` the split model needs."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    num_layers: int
    num_decoder_layers: int
    num_experts: int
    encoder_sparse_step: int
    decoder_sparse_step: int
    expert_capacity: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    dense_act_fn: str
    tie_word_embeddings: bool
    router_bias: bool
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Read a HF ``config.json`` dict, deriving sparse steps exactly as transformers does."""
        num_layers = int(cfg.get("num_layers", 12))
        # transformers: a missing key takes the class default (12), an explicit null means "as the encoder".
        num_dec = cfg.get("num_decoder_layers", 12)
        num_dec = num_layers if num_dec is None else int(num_dec)

        def step(n_layers: int, n_sparse: Any, saved: Any) -> int:
            # SwitchTransformersConfig.__post_init__ (5.x; __init__ in 4.x) derives the step from
            # num_sparse_*_layers (default 3), then sets the remaining saved keys, so a saved
            # *_sparse_step overrides the derived one. The checkpoint's router tensors are
            # checked against the result at export (swapmoe_export.checkpoint).
            if saved is not None:
                return int(saved)
            n_sparse = 3 if n_sparse is None else int(n_sparse)
            return n_layers // n_sparse if n_sparse > 0 else n_layers

        eos = cfg.get("eos_token_id", 1)
        if isinstance(eos, list):
            eos = eos[0]
        pad = cfg.get("pad_token_id", 0)
        pad = 0 if pad is None else int(pad)
        start = cfg.get("decoder_start_token_id")
        return cls(
            vocab_size=int(cfg.get("vocab_size", 32128)),
            d_model=int(cfg.get("d_model", 768)),
            d_kv=int(cfg.get("d_kv", 64)),
            d_ff=int(cfg.get("d_ff", 2048)),
            num_heads=int(cfg.get("num_heads", 12)),
            num_layers=num_layers,
            num_decoder_layers=num_dec,
            num_experts=int(cfg.get("num_experts", 8)),
            encoder_sparse_step=step(
                num_layers, cfg.get("num_sparse_encoder_layers"), cfg.get("encoder_sparse_step")
            ),
            decoder_sparse_step=step(
                num_dec, cfg.get("num_sparse_decoder_layers"), cfg.get("decoder_sparse_step")
            ),
            expert_capacity=int(cfg.get("expert_capacity", 64)),
            relative_attention_num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(cfg.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
            dense_act_fn=str(cfg.get("dense_act_fn", "relu")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            router_bias=bool(cfg.get("router_bias", False)),
            pad_token_id=pad,
            eos_token_id=int(1 if eos is None else eos),
            decoder_start_token_id=int(pad if start is None else start),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def depth(self, stack: str) -> int:
        return self.num_layers if stack == "encoder" else self.num_decoder_layers

    def is_sparse(self, stack: str, layer: int) -> bool:
        """HF's rule: ``i % step == 1 or step == 1`` (and no sparse layer when step <= 0)."""
        step = self.encoder_sparse_step if stack == "encoder" else self.decoder_sparse_step
        return (layer % step == 1 or step == 1) if step > 0 else False

    def sparse_layers(self) -> list[LayerKey]:
        return [
            LayerKey(s, i) for s in STACKS for i in range(self.depth(s)) if self.is_sparse(s, i)
        ]


def config_to_dict(c: ModelConfig) -> dict[str, Any]:
    return asdict(c)
