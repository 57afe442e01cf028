"""Train the decoder-only yardstick: a small Mixtral-architecture MoE (top-2 routing) that
summarises Debian package descriptions as a prompt and its completion, from scratch, on CPU.

    python scripts/train_causal_summarizer.py --data /tmp/debcorpus -o /tmp/mixtral-debian
    python scripts/train_causal_summarizer.py --score /tmp/mixtral-debian --data /tmp/debcorpus --split test --limit 1000

--data holds train/validation.jsonl from swapmoe_edge.lab.corpus. The tokenizer is the
embedded Switch model's (trained on the same training split), without the closing </s> its
post-processor appends: a decoder-only prompt is tokenised as it is. A training sequence is

    prompt     = PROMPT_TEMPLATE with the document cut after its first --max-source-len tokens
    completion = the synopsis (cut to --max-target-len - 1 tokens) and </s>

and the loss is taken on the completion's tokens only. Writes a Hugging Face checkpoint
(MixtralForCausalLM, float16 safetensors, tokenizer, generation_config.json and
swapmoe.json with the prompt template) for the best validation ROUGE-2 seen (--num-beams). Data
loading, the learning-rate schedule, ROUGE and checkpoint keeping come from
train_summarizer.py, the Switch model's trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import train_summarizer as ts

PAD, EOS = ts.PAD, ts.EOS
PROMPT_TEMPLATE = "{document}\nSummary:"
SWITCH = Path(__file__).resolve().parent.parent / "swapmoe_edge/model_data/switch-debian"


# ---------------------------------------------------------------- data


def prompt_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer at ``path`` with its post-processor removed: no </s> after a prompt."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["post_processor"] = None
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.no_truncation()
    tok.no_padding()
    return tok


def render_prompt(tok: Tokenizer, document: str, max_source_len: int, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt text: the document cut after its first ``max_source_len`` tokens (at the
    last kept token's end in the original text), put into the template."""
    enc = tok.encode(document)
    if len(enc.ids) > max_source_len:
        document = document[:enc.offsets[max_source_len - 1][1]]
    return template.format(document=document)


def make_pairs(tok: Tokenizer, rows: list[dict], args) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row: prompt then completion; labels -100 over the prompt."""
    prompts = [p.ids for p in tok.encode_batch([render_prompt(tok, r["text"], args.max_source_len) for r in rows])]
    # The synopsis is encoded on its own: the byte-level pre-tokenizer's prefix space makes it
    # " synopsis", the same pieces it has after "Summary:" in one text.
    comps = [c.ids[:args.max_target_len - 1] + [EOS] for c in tok.encode_batch([r["summary"] for r in rows])]
    return [(p + c, [-100] * len(p) + c) for p, c in zip(prompts, comps)]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


# ---------------------------------------------------------------- model


def make_config(args, vocab_size: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=args.d_model, intermediate_size=args.d_ff,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.d_model // args.heads, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, router_aux_loss_coef=args.aux_loss,
        output_router_logits=False, tie_word_embeddings=False,
        pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS,
    )


def padded_bmm_experts(self, hidden, top_k_index, top_k_weights):
    """MixtralExperts' forward as two batched matmuls over [E, C, D] buffers (C: the busiest
    expert's token count), registered as the experts implementation "padded_bmm".

    transformers' "eager" loop indexes ``gate_up_proj[e]`` once per expert, and on CPU each
    such slice's backward writes a zero gradient the size of all experts (~70% of a training
    step at 32 experts); its "grouped_mm" fallback was as slow here. This path's backward is
    two batched matmuls and a gather. The same arithmetic, so the saved checkpoint serves
    with any implementation.
    """
    n, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    counts = torch.bincount(flat, minlength=self.num_experts)
    slot = torch.arange(n * k) - (torch.cumsum(counts, 0) - counts)[expert]
    token = order // k
    buf = hidden.new_zeros(self.num_experts, int(counts.max()), hidden.shape[-1])
    buf = buf.index_put((expert, slot), hidden[token])
    gate, up = torch.bmm(buf, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    out = torch.bmm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2))
    y = out[expert, slot] * top_k_weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(hidden).index_add_(0, token, y)


ALL_EXPERTS_FUNCTIONS["padded_bmm"] = padded_bmm_experts


def init_embeddings(model, path: Path, scale: float) -> None:
    """Start the token embeddings and the LM head from the Switch model's trained (tied)
    embedding, which uses the same tokenizer: the input side scaled by ``scale`` (it has std
    ~1.2, T5's scale, against Mixtral's 0.02 for everything else), the head by d_model**-0.5
    as the Switch decoder scales its output before the tied head."""
    from safetensors.torch import load_file
    shared = load_file(str(path))["shared.weight"].float()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(shared * scale)
        model.lm_head.weight.copy_(shared * shared.shape[1] ** -0.5)


def add_dropout(model, p: float) -> None:
    """Dropout on the embeddings and on each attention and MoE output before it joins the
    residual stream, as the Switch model has (Mixtral has attention dropout only). Forward
    hooks, so the saved checkpoint is a plain MixtralForCausalLM."""
    if p <= 0:
        return

    def drop(module, args, out):
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, module.training),) + out[1:]
        return F.dropout(out, p, module.training)

    model.model.embed_tokens.register_forward_hook(drop)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


def completion_loss(model, input_ids, mask, labels, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy on the completion tokens (the LM head runs on those positions only), the
    load-balancing loss over the real tokens, and their weighted sum."""
    out = model.model(input_ids=input_ids, attention_mask=mask, output_router_logits=True)
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(out.last_hidden_state[:, :-1][keep])
    ce = F.cross_entropy(logits.float(), target[keep])
    aux = load_balancing_loss_func(out.router_logits, args.experts, args.top_k, mask)
    return ce, aux, ce + args.aux_loss * aux


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def summarize(model, tok: Tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions of the prompts (left-padded batches of similar length), decoded."""
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    preds = [""] * len(prompts)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=model.generation_config,
                             max_new_tokens=max_new_tokens)
        for i, row in zip(idx, out[:, ids.shape[1]:].tolist()):
            preds[i] = tok.decode(row, skip_special_tokens=True).strip()
    model.train()
    return preds


def eval_and_save(model, tok, hf_tok, prompts, refs, args, step, start, best, log) -> float:
    t = time.time()
    preds = summarize(model, tok, prompts, args.max_target_len)
    score = ts.rouge2(preds, refs)
    entry = {"step": step, "minutes": round((time.time() - start) / 60, 2), "rouge2": round(score, 4),
             "distinct": round(len(set(preds)) / len(preds), 3)}
    log["evals"].append(entry)
    print(f"eval step {step}: ROUGE-2 {score:.3f}, distinct {entry['distinct']:.0%}, {time.time() - t:.0f}s; "
          f"e.g. {preds[:3]}", flush=True)
    if score > best:
        best = score
        log["best"] = entry
        ts.save_checkpoint(model, hf_tok, args.out, log)
        (args.out / "swapmoe.json").write_text(json.dumps({"prompt_template": PROMPT_TEMPLATE}, indent=2) + "\n")
        size = os.path.getsize(args.out / "model.safetensors") / 1e6
        print(f"saved best checkpoint ({size:.1f} MB model.safetensors) to {args.out}", flush=True)
    return best


def score(args) -> dict:
    """ROUGE F1 (stemmed) of the checkpoint at ``args.score`` (HF ``generate`` with its own
    generation config, or ``--score-beams``) and of lead-8 on the first ``--limit`` documents of ``--split``."""
    from rouge_score import rouge_scorer

    if args.shuffle or args.skip:  # the trainer's validation order (seeded shuffle), then a slice of it
        rows = ts.load_jsonl(args.data / f"{args.split}.jsonl")
        if args.shuffle:
            random.Random(args.seed).shuffle(rows)
        rows = rows[args.skip:][:args.limit]
    else:
        rows = ts.load_jsonl(args.data / f"{args.split}.jsonl", args.limit)
    tok = prompt_tokenizer(args.score / "tokenizer.json")
    model = MixtralForCausalLM.from_pretrained(args.score, dtype=torch.float32).eval()
    if args.score_beams:
        model.generation_config.num_beams = args.score_beams
    prompts = [tok.encode(render_prompt(tok, r["text"], args.max_source_len)).ids for r in rows]
    preds = summarize(model, tok, prompts, model.generation_config.max_new_tokens or args.max_target_len)
    lead = [" ".join(r["text"].split()[:8]) for r in rows]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = {"checkpoint": str(args.score), "split": args.split, "documents": len(rows),
           "num_beams": model.generation_config.num_beams, "shuffled": args.shuffle, "skipped": args.skip,
           "cut_inputs": sum(len(tok.encode(r["text"]).ids) > args.max_source_len for r in rows)}
    for name, texts in (("model", preds), ("lead8", lead)):
        scores = [scorer.score(r["summary"], t) for r, t in zip(rows, texts)]
        out[name] = {k: round(statistics.fmean(s[k].fmeasure for s in scores), 4) for k in ("rouge1", "rouge2", "rougeL")}
    out["examples"] = [{"reference": r["summary"], "model": p} for r, p in zip(rows[:5], preds)]
    return out


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train/validation.jsonl")
    p.add_argument("-o", "--out", type=Path, default=None, help="checkpoint folder to write")
    p.add_argument("--tokenizer", type=Path, default=SWITCH / "tokenizer.json", help="tokenizer.json to reuse")
    p.add_argument("--max-steps", type=int, default=50000)
    p.add_argument("--max-minutes", type=float, default=80.0, help="training-loop budget; 0 = none")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=300, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=800, help="steps between validation ROUGE-2")
    p.add_argument("--eval-docs", type=int, default=300)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training pairs")
    p.add_argument("--max-source-len", type=int, default=64, help="document tokens kept in the prompt")
    p.add_argument("--max-target-len", type=int, default=32, help="completion tokens, </s> included")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=256, help="hidden width of each SwiGLU expert")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4, help="decoder layers, every one sparse")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam width of validation and of the checkpoint's generation_config.json")
    p.add_argument("--aux-loss", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--dropout", type=float, default=0.1, help="embedding, attention and MoE output dropout")
    p.add_argument("--init-embeddings", type=Path, default=SWITCH / "model.safetensors",
                   help="safetensors with a shared.weight [vocab, d_model] to start the embeddings and head from; "
                        "'none' for a random start")
    p.add_argument("--embed-scale", type=float, default=0.1, help="factor on the copied input embeddings")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this checkpoint's weights (a run of this script) instead of a fresh model; "
                        "the optimizer, warm-up and schedule start afresh")
    p.add_argument("--experts-impl", default="padded_bmm", help="transformers experts implementation while training")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--score", type=Path, default=None,
                   help="instead of training: ROUGE of this checkpoint and lead-8 on --split (JSON on stdout)")
    p.add_argument("--split", default="test", help="with --score: the corpus file to score on")
    p.add_argument("--score-beams", type=int, default=None, help="with --score: beams (default: the checkpoint's)")
    p.add_argument("--shuffle", action="store_true", help="with --score: the documents in the trainer's shuffled order")
    p.add_argument("--skip", type=int, default=0, help="with --score: leave out the first N documents")
    args = p.parse_args(argv)
    if args.score is None and args.out is None:
        p.error("-o/--out is required when training")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.optimizer = "adamw"  # for ts.make_optimizer; Mixtral's uniform 0.02 initialisation suits AdamW
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.score is not None:
        print(json.dumps(score(args), indent=1))
        return 0
    train = ts.load_jsonl(args.data / "train.jsonl", args.limit)
    val = ts.load_jsonl(args.data / "validation.jsonl")
    random.Random(args.seed).shuffle(val)  # the same 300 validation documents as train_summarizer.py
    val = val[:args.eval_docs]
    t0 = time.time()
    tok = prompt_tokenizer(args.tokenizer)
    pairs = make_pairs(tok, train, args)
    prompts = [tok.encode(render_prompt(tok, r["text"], args.max_source_len)).ids for r in val]
    refs = [r["summary"] for r in val]
    print(f"{len(pairs)} training pairs, vocab {tok.get_vocab_size()}, tokenized in {time.time() - t0:.0f}s; "
          f"median sequence {statistics.median(len(s) for s, _ in pairs)} tokens, completion "
          f"{statistics.median(sum(t != -100 for t in lab) for _, lab in pairs)}", flush=True)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                     model_max_length=args.max_source_len, padding_side="left")

    if args.init_from is not None:
        model = MixtralForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        model = MixtralForCausalLM(make_config(args, tok.get_vocab_size()))
        if str(args.init_embeddings) != "none":
            init_embeddings(model, args.init_embeddings, args.embed_scale)
    model.set_experts_implementation(args.experts_impl)
    add_dropout(model, args.dropout)
    model.generation_config = GenerationConfig(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS,
                                               max_new_tokens=args.max_target_len, do_sample=False,
                                               num_beams=args.num_beams)
    split = ts.parameter_split(model)
    print(f"parameters: {split['total'] / 1e6:.2f}M total, {split['experts'] / 1e6:.2f}M in experts "
          f"({split['expert_share']:.0%}); ~{split['float16_mb']:.1f} MB in float16", flush=True)
    lead8 = ts.rouge2([" ".join(r["text"].split()[:8]) for r in val], refs)
    print(f"baseline: first 8 words of the document, ROUGE-2 {lead8:.3f} on {len(val)} validation docs", flush=True)

    opt = ts.make_optimizer(model, args)
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "prompt_template": PROMPT_TEMPLATE,
           "parameters": split, "lead8_rouge2": lead8, "evals": []}
    best, step, epoch, rng = -1.0, 0, 0, random.Random(args.seed)
    budget_s = args.max_minutes * 60 or float("inf")
    start = tick = time.time()
    model.train()
    while step < args.max_steps and time.time() - start < budget_s:
        epoch += 1
        for input_ids, mask, labels in ts.batches(pairs, args.batch_size, rng):
            progress = max(step / args.max_steps, (time.time() - start) / budget_s)
            if step >= args.max_steps or progress >= 1.0:
                break
            for group in opt.param_groups:
                group["lr"] = ts.lr_at(step, progress, args)
            ce, aux, loss = completion_loss(model, input_ids, mask, labels, args)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % args.log_every == 0:
                now = time.time()
                print(f"step {step} epoch {epoch} ce {ce.item():.3f} aux {aux.item():.3f} grad {grad_norm.item():.2f} "
                      f"lr {opt.param_groups[0]['lr']:.2e} {(now - tick) / args.log_every:.2f}s/step", flush=True)
                tick = now
            if step % args.eval_every == 0:
                best = eval_and_save(model, tok, hf_tok, prompts, refs, args, step, start, best, log)
                tick = time.time()
    if not log["evals"] or log["evals"][-1]["step"] != step:
        best = eval_and_save(model, tok, hf_tok, prompts, refs, args, step, start, best, log)
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min; best ROUGE-2 {best:.3f} "
          f"(lead-8 {lead8:.3f}); checkpoint in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
