"""Tiny random Switch Transformers built in-process, shared by the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

TINY_BASE = dict(
    vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
    num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=64,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, router_jitter_noise=0.0,
    dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)


def tiny_config(**overrides):
    from transformers import SwitchTransformersConfig

    return SwitchTransformersConfig(**{**TINY_BASE, **overrides})


def tiny_model(seed: int = 0, **overrides):
    import torch
    from transformers import SwitchTransformersForConditionalGeneration

    torch.manual_seed(seed)
    model = SwitchTransformersForConditionalGeneration(tiny_config(**overrides)).eval()
    # HF's init gives routers std 1 and makes logits tiny; spread the weights a bit so that
    # routing and generation are not degenerate (every token to one expert, one token forever).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(0.0, 2.0)
    return model


def save_tiny(path: Path, seed: int = 0, safe_serialization: bool = True, **overrides) -> Path:
    model = tiny_model(seed, **overrides)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    return path
