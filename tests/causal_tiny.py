"""Tiny random decoder-only MoE checkpoints of each family, built in-process (no downloads).

Shared by the causal export and generation tests and scripts/check_families.py. Weights are
drawn with a wide initialiser so that logits and router choices are decisive (no near ties
that float32 rounding could flip).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, EXPERTS, TOP_K, FF = 96, 64, 2, 4, 2, 8, 2, 32
EOS, PAD = 3, 0

FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=EXPERTS, intermediate_size=FF, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=EXPERTS, moe_intermediate_size=FF, intermediate_size=FF, shared_expert_intermediate_size=48,
                       norm_topk_prob=False, qkv_bias=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=EXPERTS, moe_intermediate_size=FF, intermediate_size=FF, head_dim=16, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_experts=EXPERTS, intermediate_size=FF, norm_topk_prob=False)),
}


def build(family: str, seed: int = 0, std: float = 0.2, **overrides):
    """A tiny random HF model of ``family`` (eval mode), float32; ``overrides``: config fields."""
    import torch  # deferred: tests and scripts only
    import transformers  # deferred: tests and scripts only

    config_cls, model_cls, extra = FAMILIES[family]
    fields = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, num_experts_per_tok=TOP_K, initializer_range=std, eos_token_id=EOS,
                  pad_token_id=PAD, bos_token_id=1, tie_word_embeddings=False, max_position_embeddings=256)
    cfg = getattr(transformers, config_cls)(**{**fields, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a missing norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def save(model, path: Path, fused: bool = False) -> Path:
    """The checkpoint as save_pretrained writes it (per-expert tensors), or with the fused 3-D expert
    tensors transformers holds in memory (``fused``)."""
    path = Path(path)
    model.save_pretrained(path)
    if fused:
        from safetensors.torch import save_file  # deferred: tests and scripts only

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        (path / "model.safetensors").unlink()
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def hf_greedy(model, rows: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF generate, greedy, on left-padded ``rows``: each row's new tokens up to and with its EOS."""
    import torch  # deferred: tests and scripts only

    s = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (s - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (s - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=PAD, eos_token_id=EOS)
    result = []
    for row in out[:, s:].tolist():
        result.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return result


def prompts(seed: int = 1, n: int = 3) -> list[list[int]]:
    """Prompts of different lengths (so a batch of them is left-padded), no EOS or pad inside."""
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(4, VOCAB, size=5 + 3 * i)] for i in range(n)]
