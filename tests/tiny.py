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
        # A zero pad/start embedding (tied: pad logit 0) keeps greedy output from being all pad.
        model.shared.weight[0].zero_()
    return model


def tiny_tokenizer(vocab_size: int = TINY_BASE["vocab_size"]):
    """A word-level tokenizer over "w3".."w{V-1}" with T5's <pad>=0, </s>=1, <unk>=2; appends </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return tok


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def save_tiny(path: Path, seed: int = 0, safe_serialization: bool = True, **overrides) -> Path:
    model = tiny_model(seed, **overrides)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    tiny_tokenizer(model.config.vocab_size).save(str(path / "tokenizer.json"))
    return path


def hf_generate(model, rows, max_new_tokens: int, num_beams: int = 1) -> list[list[int]]:
    """HF ``generate`` on token-id rows (padded here), each output cut as our runtime returns it:
    no decoder start token, up to and including the first EOS, no padding."""
    import torch

    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             num_beams=num_beams, do_sample=False)
    eos, pad = model.generation_config.eos_token_id, model.config.pad_token_id
    result = []
    for row in out.tolist():
        row = row[1:]  # the decoder start token
        if eos in row:  # HF fills finished rows (beam search: with EOS)
            row = row[: row.index(eos) + 1]
        while row and row[-1] == pad:
            row.pop()
        result.append(row)
    return result


def export_tiny(root: Path, seed: int = 0, **overrides) -> Path:
    """A tiny model saved into ``root/ckpt`` and exported (validated) into ``root/art``; the artifact."""
    from swapmoe_export import export_checkpoint

    return export_checkpoint(save_tiny(root / "ckpt", seed=seed, **overrides), root / "art", quiet=True)
