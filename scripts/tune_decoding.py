"""Choose the embedded model's decoding settings on the validation split (never the test split).

    python scripts/tune_decoding.py CKPT --data /tmp/debcorpus/validation.jsonl [--write]

Scores greedy summaries from Hugging Face ``generate`` for each ``no_repeat_ngram_size`` in
--ngrams (0 = off) with ROUGE-1/2/L, prints a table, and with --write stores the best
setting by ROUGE-2 in CKPT/generation_config.json, where HF and this runtime both read it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rouge_score import rouge_scorer
from tokenizers import Tokenizer
from transformers import SwitchTransformersForConditionalGeneration


def summaries(model, tok: Tokenizer, texts: list[str], max_len: int, ngram: int, batch: int = 64) -> list[str]:
    tok.enable_truncation(max_len)
    rows = [e.ids for e in tok.encode_batch(texts)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = [""] * len(rows)
    for k in range(0, len(order), batch):
        idx = order[k:k + batch]
        width = max(len(rows[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            ids[j, :len(rows[i])] = torch.tensor(rows[i])
            mask[j, :len(rows[i])] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                 no_repeat_ngram_size=ngram)
        for i, seq in zip(idx, gen.tolist()):
            out[i] = tok.decode(seq, skip_special_tokens=True).strip()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="validation.jsonl of the corpus")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--ngrams", default="0,2,3,4")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="store the best setting in generation_config.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    docs = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = docs[:args.limit]
    model = SwitchTransformersForConditionalGeneration.from_pretrained(args.ckpt, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(args.ckpt / "tokenizer.json"))
    max_len = json.loads((args.ckpt / "tokenizer_config.json").read_text()).get("model_max_length", 512)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    results = {}
    print(f"{len(docs)} validation documents, inputs cut at {max_len} tokens", flush=True)
    for n in (int(x) for x in args.ngrams.split(",")):
        t0 = time.time()
        preds = summaries(model, tok, [d["text"] for d in docs], max_len, n)
        scores = [scorer.score(d["summary"], p) for d, p in zip(docs, preds)]
        results[n] = {k: statistics.fmean(s[k].fmeasure for s in scores) for k in ("rouge1", "rouge2", "rougeL")}
        print(f"no_repeat_ngram_size {n}: ROUGE-1 {results[n]['rouge1']:.4f} ROUGE-2 {results[n]['rouge2']:.4f} "
              f"ROUGE-L {results[n]['rougeL']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    best = max(results, key=lambda n: results[n]["rouge2"])
    print(f"best by validation ROUGE-2: no_repeat_ngram_size {best}")
    if args.write:
        path = args.ckpt / "generation_config.json"
        cfg = json.loads(path.read_text())
        if best:
            cfg["no_repeat_ngram_size"] = best
        else:
            cfg.pop("no_repeat_ngram_size", None)
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
