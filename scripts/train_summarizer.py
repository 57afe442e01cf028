"""Train the embedded default model: a small Switch Transformer that summarises Debian
package descriptions (long description -> synopsis), from scratch, on CPU or one GPU.

    python scripts/train_summarizer.py --data /tmp/debcorpus -o /tmp/switch-debian

--data holds train/validation.jsonl from swapmoe_edge.lab.corpus (built there if missing).
Writes a Hugging Face checkpoint (config.json, model.safetensors in float16, tokenizer.json
+ tokenizer_config.json, generation_config.json) for the best validation ROUGE-2 seen.
The learning rate warms up linearly and follows a cosine down to 10% over whichever budget
binds first, --max-steps or --max-minutes (use --max-minutes 0 for a bit-reproducible run).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from rouge_score import rouge_scorer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (GenerationConfig, PreTrainedTokenizerFast, SwitchTransformersConfig,
                          SwitchTransformersForConditionalGeneration)

from swapmoe_edge.core.errors import InputError
from swapmoe_edge.lab.corpus import build_debian_corpus

PAD, EOS, UNK, COPY = 0, 1, 2, 3
SPECIALS = ["<pad>", "</s>", "<unk>"]  # their ids are PAD, EOS, UNK: the trainer adds them first
# With --copy-fraction, <copy> (id COPY) opens the inputs of the auxiliary copy task;
# summarisation inputs are plain text. Without it the vocabulary has no <copy>.
COPY_TOKEN = "<copy>"


# ---------------------------------------------------------------- data and tokenizer


def load_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def train_tokenizer(texts: list[str], vocab_size: int, copy_task: bool = False) -> Tokenizer:
    """Byte-level BPE: any text encodes (no <unk> in practice); </s> closes each sequence."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])  # drop the prefix space
    specials = SPECIALS + [COPY_TOKEN] * copy_task
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    assert [tok.token_to_id(t) for t in specials] == [PAD, EOS, UNK, COPY][:len(specials)]
    return tok


def encode(tok: Tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    tok.enable_truncation(max_len)  # truncation keeps room for the closing </s>
    ids = [e.ids for e in tok.encode_batch(texts)]
    tok.no_truncation()  # not saved into tokenizer.json: serving decides how to truncate
    return ids


def batches(pairs: list[tuple[list[int], list[int]]], batch_size: int, rng: random.Random):
    """One epoch of (input_ids, attention_mask, labels) batches of similar source length."""
    order = list(range(len(pairs)))
    rng.shuffle(order)
    pool = batch_size * 50  # sort within pools: little padding, still a random epoch
    groups = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i:i + pool], key=lambda j: len(pairs[j][0]))
        groups += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(groups)
    for group in groups:
        src, tgt = zip(*(pairs[j] for j in group))
        input_ids, mask = pad(src, PAD)
        labels, _ = pad(tgt, -100)
        yield input_ids, mask, labels


def copy_pairs(tok: Tokenizer, train: list[dict], args, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """Auxiliary task: "<copy> TEXT" -> the text's first --copy-words words.

    Trained from scratch on ~55k pairs, the summariser learned synopsis templates but
    hardly ever copied a name from its input. Copying the opening words is easy to learn
    and exercises the same cross-attention path; the task token keeps it apart from
    summarisation, whose inputs carry none.
    """
    rows = rng.sample(train, int(args.copy_fraction * len(train)))
    src = encode(tok, [r["text"] for r in rows], args.max_source_len - 1)
    tgt = encode(tok, [" ".join(r["text"].split()[:args.copy_words]) for r in rows], args.max_target_len)
    return [([COPY] + s, t) for s, t in zip(src, tgt)]


def span_pairs(tok: Tokenizer, train: list[dict], src: list[list[int]], args,
               rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """Self-supervised pre-training pairs: TEXT -> a random run of 2-8 consecutive words of it.

    Two thirds of a synopsis's words and a third of its word pairs appear in the opening of
    its description, so the summariser has to copy; trained from scratch on ~55k pairs it
    learned the synopsis templates long before it copied names. Which run is the target is
    left open, so the first target token is a guess among the input's words, but every
    later one follows from the input: the pairs teach the decoder to continue copying from
    wherever it started (any position, not only the opening), and the summarisation phase
    then only has to learn where to start. ``--span-copy-words`` bounds where runs start.
    """
    out = []
    for row, ids in zip(train, src):
        words = row["text"].split()[:args.span_copy_words]
        for _ in range(args.span_copy_per_doc):
            n = rng.randint(min(2, len(words)), min(8, len(words)))
            start = rng.randrange(len(words) - n + 1)
            out.append((ids, " ".join(words[start:start + n])))
    tgt = encode(tok, [t for _, t in out], args.max_target_len)
    return [(s, t) for (s, _), t in zip(out, tgt)]


def pad(seqs, value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)  # B S
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, (ids != value).long()


# ---------------------------------------------------------------- model


def make_config(args, vocab_size: int) -> SwitchTransformersConfig:
    return SwitchTransformersConfig(
        vocab_size=vocab_size, d_model=args.d_model, d_kv=args.d_model // args.heads, num_heads=args.heads,
        d_ff=args.d_ff, num_layers=args.layers, num_decoder_layers=args.layers,
        num_sparse_encoder_layers=args.layers // 2, num_sparse_decoder_layers=args.layers // 2,
        num_experts=args.experts,
        # capacity is counted per sequence; above any length we train or serve, no token is dropped
        expert_capacity=512,
        router_aux_loss_coef=0.01, router_z_loss_coef=0.001, dropout_rate=args.dropout, dense_act_fn="relu",
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, tie_word_embeddings=True,
    )


def init_switch_weights(model, config: SwitchTransformersConfig, router_scale: float) -> None:
    """Re-initialise the routers and experts after HF's own initialisation.

    HF draws router weights with std 1.0: with RMS-normalised inputs the router logits then
    have std ~sqrt(d_model) (~14 at d_model 192), the softmax is saturated, the router gets
    almost no gradient and routing stays where the random draw put it (the z-loss alone adds
    ~1 nat to the loss). The Switch paper (Fedus et al. 2021, sec. 2.4) draws weights from a
    truncated normal with std sqrt(s / fan_in) and recommends s = 0.1; we do that for the
    routers. Expert output projections get d_ff**-0.5 like the dense FFN's, instead of HF's
    d_model**-0.5.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("router.classifier"):
                std = math.sqrt(router_scale / config.d_model)
                torch.nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            elif ".experts.expert_" in name and name.endswith(".wo"):
                torch.nn.init.normal_(module.weight, std=config.d_ff ** -0.5)


def parameter_split(model) -> dict:
    """Parameter counts, with tied tensors counted once."""
    seen, total, experts = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        experts += p.numel() if ".experts." in name else 0
    return {"total": total, "experts": experts, "dense": total - experts,
            "expert_share": experts / total, "float16_mb": total * 2 / 1e6}


def make_optimizer(model, args) -> torch.optim.Optimizer:
    """AdamW, or Adafactor with updates relative to each tensor's scale (T5's own optimizer).

    T5-style initialisation gives tensors very different scales: embeddings std 1.0, query
    projections (d_model * d_kv)**-0.5 (0.016 at d_model 128). AdamW's steps are the same
    size for all of them, so at lr 3e-3 a query matrix moves ~20% a step while an embedding
    moves 0.3%. Adafactor with ``scale_parameter`` scales each step by the tensor's RMS,
    as T5 was trained (Raffel et al. 2020; Shazeer and Stern 2018).
    """
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(model.parameters(), lr=args.lr, scale_parameter=True, relative_step=False,
                         warmup_init=False, clip_threshold=1.0)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.98), eps=1e-8)


def lr_at(step: int, progress: float, args) -> float:
    """Linear warm-up over args.warmup steps, times a cosine from 1 to 0.1 over the budget."""
    warm = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
    return args.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, tok: Tokenizer, eval_src: list[list[int]], refs: list[str], device, batch_size=64) -> dict:
    """Greedy summaries of the validation documents: ROUGE-2 F1 and how many are distinct."""
    model.eval()
    order = sorted(range(len(eval_src)), key=lambda i: len(eval_src[i]))
    preds = [""] * len(order)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        input_ids, mask = pad([eval_src[i] for i in idx], PAD)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             generation_config=model.generation_config)
        for i, ids in zip(idx, out.tolist()):
            preds[i] = tok.decode(ids, skip_special_tokens=True).strip()
    model.train()
    return {"rouge2": rouge2(preds, refs), "distinct": len(set(preds)) / max(1, len(preds)),
            "examples": preds[:3]}


def rouge2(preds: list[str], refs: list[str]) -> float:
    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    return statistics.fmean(scorer.score(r, p)["rouge2"].fmeasure for p, r in zip(preds, refs))


def save_checkpoint(model, hf_tok: PreTrainedTokenizerFast, out: Path, log: dict) -> None:
    """Write the HF checkpoint (float16 weights) to a temporary folder, then swap it into place."""
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    copy.deepcopy(model).to("cpu", torch.float16).save_pretrained(tmp)
    hf_tok.save_pretrained(tmp)
    # Readable by older transformers too, which know neither TokenizersBackend nor tokenizer.json alone.
    config_path = tmp / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps(dict(zip(("pad_token", "eos_token", "unk_token"),
                                                                     SPECIALS)), indent=2) + "\n")
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train/validation.jsonl")
    p.add_argument("-o", "--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--max-minutes", type=float, default=100.0, help="training-loop budget; 0 = none")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate; default 1e-2 for Adafactor (relative to each tensor's RMS), 1e-3 for AdamW")
    p.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adafactor",
                   help="adafactor: T5's optimizer, far better here (see make_optimizer); adamw: the old default")
    p.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=500, help="steps between validation ROUGE-2")
    p.add_argument("--eval-docs", type=int, default=300)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training pairs")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-source-len", type=int, default=128)
    p.add_argument("--max-target-len", type=int, default=32)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--d-ff", type=int, default=512, help="hidden width of each expert and dense FFN")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--layers", type=int, default=4, help="per stack; every 2nd layer is sparse")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--copy-fraction", type=float, default=0.0,
                   help="extra '<copy> text -> first words' pairs, as a fraction of the training pairs")
    p.add_argument("--copy-words", type=int, default=12)
    p.add_argument("--span-copy-minutes", type=float, default=0.0,
                   help="first train this many minutes on 'TEXT -> a run of its words' pairs only")
    p.add_argument("--span-copy-fraction", type=float, default=0.0,
                   help="after that, mix in this many span pairs per summarisation pair")
    p.add_argument("--span-copy-per-doc", type=int, default=2, help="span pairs drawn per training document")
    p.add_argument("--span-copy-words", type=int, default=40, help="spans start among the first N words")
    p.add_argument("--router-init-scale", type=float, default=0.1,
                   help="router weights: truncated normal, std sqrt(scale / d_model) (Switch paper: 0.1)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is faster on a contended machine")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-2 if args.optimizer == "adafactor" else 1e-3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (args.data / "train.jsonl").exists():
        print(f"no corpus in {args.data}: building it from /var/lib/apt/lists", flush=True)
        print(build_debian_corpus(args.data), flush=True)

    train = load_jsonl(args.data / "train.jsonl", args.limit)
    val = load_jsonl(args.data / "validation.jsonl")
    if not train or not val:
        raise InputError(f"{args.data}: train.jsonl or validation.jsonl is empty; rebuild the corpus "
                         "with swapmoe_edge.lab.corpus.build_debian_corpus.")
    random.Random(args.seed).shuffle(val)
    val = val[:args.eval_docs]
    t0 = time.time()
    tok = train_tokenizer([r["text"] for r in train] + [r["summary"] for r in train], args.vocab_size, args.copy_fraction > 0)
    pairs = list(zip(encode(tok, [r["text"] for r in train], args.max_source_len),
                     encode(tok, [r["summary"] for r in train], args.max_target_len)))
    if args.copy_fraction > 0:
        pairs += copy_pairs(tok, train, args, random.Random(args.seed + 1))
    spans = []
    if args.span_copy_minutes > 0 or args.span_copy_fraction > 0:
        spans = span_pairs(tok, train, [s for s, _ in pairs[:len(train)]], args, random.Random(args.seed + 2))
        print(f"{len(spans)} span-copy pairs; {args.span_copy_minutes:g} min on them alone, then "
              f"{args.span_copy_fraction:g} per summarisation pair", flush=True)
    eval_src = encode(tok, [r["text"] for r in val], args.max_source_len)
    refs = [r["summary"] for r in val]
    print(f"{len(pairs)} training pairs, vocab {tok.get_vocab_size()}, tokenized in {time.time() - t0:.0f}s; "
          f"median source/target tokens {statistics.median(len(s) for s, _ in pairs)}/"
          f"{statistics.median(len(t) for _, t in pairs)}", flush=True)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                     unk_token="<unk>", model_max_length=args.max_source_len)

    config = make_config(args, tok.get_vocab_size())
    model = SwitchTransformersForConditionalGeneration(config)
    init_switch_weights(model, config, args.router_init_scale)
    model.to(device)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=args.max_target_len,
        do_sample=False, num_beams=1)
    split = parameter_split(model)
    print(f"parameters: {split['total'] / 1e6:.2f}M total, {split['experts'] / 1e6:.2f}M in experts "
          f"({split['expert_share']:.0%}), {split['dense'] / 1e6:.2f}M dense; "
          f"~{split['float16_mb']:.1f} MB in float16", flush=True)
    lead8 = rouge2([" ".join(r["text"].split()[:8]) for r in val], refs)
    print(f"baseline: first 8 words of the document, ROUGE-2 {lead8:.3f} on {len(val)} validation docs")

    opt = make_optimizer(model, args)
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "parameters": split,
           "lead8_rouge2": lead8, "evals": []}
    best, step, epoch, rng = -1.0, 0, 0, random.Random(args.seed)
    budget_s = args.max_minutes * 60 or float("inf")
    start = tick = time.time()
    model.train()
    pretrain_s = args.span_copy_minutes * 60
    mixed = pairs + rng.sample(spans, min(len(spans), int(args.span_copy_fraction * len(pairs))))
    while step < args.max_steps and time.time() - start < budget_s:
        epoch += 1
        pretraining = time.time() - start < pretrain_s
        for input_ids, mask, labels in batches(spans if pretraining else mixed, args.batch_size, rng):
            if pretraining and time.time() - start >= pretrain_s:
                print(f"step {step}: span-copy pre-training done; summarisation from here", flush=True)
                break
            progress = max(step / args.max_steps, (time.time() - start) / budget_s)
            if step >= args.max_steps or progress >= 1.0:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, progress, args)
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        labels=labels.to(device), output_router_logits=True)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % args.log_every == 0:
                now = time.time()
                aux = out.encoder_aux_loss + out.decoder_aux_loss
                z = out.encoder_z_loss + out.decoder_z_loss
                ce = out.loss - model.config.router_aux_loss_coef * aux - model.config.router_z_loss_coef * z
                print(f"step {step} epoch {epoch} ce {ce.item():.3f} aux {aux.item():.3f} z {z.item():.2f} "
                      f"grad {grad_norm.item():.2f} lr {opt.param_groups[0]['lr']:.2e} "
                      f"{(now - tick) / args.log_every:.2f}s/step", flush=True)
                tick = now
            if step % args.eval_every == 0 and pretraining:
                # Scored, never kept: the checkpoint must be a summariser, not a span copier.
                evaluate_only(model, tok, eval_src, refs, device, step, start)
                tick = time.time()
            elif step % args.eval_every == 0:
                best = eval_and_save(model, tok, hf_tok, eval_src, refs, device, args, step, start, best, log)
                tick = time.time()
    if not log["evals"] or log["evals"][-1]["step"] != step:
        best = eval_and_save(model, tok, hf_tok, eval_src, refs, device, args, step, start, best, log)
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min; best ROUGE-2 {best:.3f} "
          f"(lead-8 {lead8:.3f}); checkpoint in {args.out}")
    return 0


def evaluate_only(model, tok, eval_src, refs, device, step, start) -> None:
    res = evaluate(model, tok, eval_src, refs, device)
    print(f"eval step {step} (span-copy phase, not kept): ROUGE-2 {res['rouge2']:.3f}, "
          f"distinct {res['distinct']:.0%}; e.g. {res['examples']}", flush=True)


def eval_and_save(model, tok, hf_tok, eval_src, refs, device, args, step, start, best, log) -> float:
    t = time.time()
    res = evaluate(model, tok, eval_src, refs, device)
    entry = {"step": step, "minutes": round((time.time() - start) / 60, 2), "rouge2": round(res["rouge2"], 4),
             "distinct": round(res["distinct"], 3)}
    log["evals"].append(entry)
    # A collapsed model answers every input with one generic summary: distinct drops toward 0.
    print(f"eval step {step}: ROUGE-2 {res['rouge2']:.3f}, distinct summaries {res['distinct']:.0%}, "
          f"{time.time() - t:.0f}s; e.g. {res['examples']}", flush=True)
    if res["rouge2"] > best:
        best = res["rouge2"]
        log["best"] = entry
        save_checkpoint(model, hf_tok, args.out, log)
        size = os.path.getsize(args.out / "model.safetensors") / 1e6
        print(f"saved best checkpoint ({size:.1f} MB model.safetensors) to {args.out}", flush=True)
    return best


if __name__ == "__main__":
    sys.exit(main())
