"""Choose swapmoe's planner and swapper settings on the validation split (never the test split).

    python scripts/tune_swapmoe.py ARTIFACT --data /tmp/debcorpus/validation.jsonl --limit 400

For each budget, policy (prune, swapmoe), decoder weight (RuntimeConfig.decoder_weight) and,
for swapmoe, importance decay between requests, it generates greedy summaries of the same
documents and prints how often they equal the ``full`` policy's tokens, their ROUGE-2
against full's summaries (fidelity) and against the references. ``--static`` adds swapmoe
rows whose swapper never runs (the profile's residents throughout). Writes the table as
JSON with --json-out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swapmoe_edge.evaluate import read_pairs, rouge  # noqa: E402
from swapmoe_edge.runtime import Runtime, RuntimeConfig  # noqa: E402


def summaries(artifact: str, texts: list[str], batch: int, **config) -> tuple[list[list[int]], list[str], dict]:
    with Runtime(artifact, RuntimeConfig(**config)) as rt:
        results = [r for i in range(0, len(texts), batch) for r in rt.summarize(texts[i:i + batch])]
        residents = {str(k): len(v) for k, v in rt.policy.residents.residents().items()}
    return [r.token_ids for r in results], [r.summary for r in results], residents


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--data", required=True, help="validation JSONL (text, summary)")
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--budgets", default="50%,25%")
    p.add_argument("--decoder-weights", default="1,2,4,8")
    p.add_argument("--decays", default="0.5,0.9")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--static", action="store_true", help="also swapmoe without swaps")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)

    docs = read_pairs(args.data, args.limit)
    texts, refs = [d["text"] for d in docs], [d["summary"] for d in docs]
    ref_ids, ref_text, _ = summaries(args.artifact, texts, args.batch_size, policy="full", budget="100%",
                                     threads=args.threads)
    print(f"full: ROUGE-2 {rouge(refs, ref_text)['rouge2']:.4f}", flush=True)
    rows = []
    grid = [("prune", w, None) for w in map(float, args.decoder_weights.split(","))]
    grid += [("swapmoe", w, d) for w, d in itertools.product(map(float, args.decoder_weights.split(",")),
                                                             map(float, args.decays.split(",")))]
    if args.static:
        grid += [("swapmoe", w, "static") for w in map(float, args.decoder_weights.split(","))]
    print(f"{len(texts)} documents; same = share of summaries identical to full's tokens", flush=True)
    for budget in args.budgets.split(","):
        for policy, weight, decay in grid:
            t0 = time.perf_counter()
            extra = {"decay": decay} if isinstance(decay, float) else {}
            if decay == "static":
                extra = {"swap_interval_s": 1e9}
            ids, text, residents = summaries(args.artifact, texts, args.batch_size, policy=policy, budget=budget,
                                             decoder_weight=weight, threads=args.threads, **extra)
            same = sum(a == b for a, b in zip(ids, ref_ids)) / len(ids)
            fid = rouge(ref_text, text, identical_is_one=True)["rouge2"]
            r2 = rouge(refs, text)["rouge2"]
            row = {"budget": budget, "policy": policy, "decoder_weight": weight, "decay": decay, "same": same,
                   "fidelity_rouge2": fid, "rouge2": r2, "residents": residents}
            rows.append(row)
            print(f"{budget:>5} {policy:8s} decoder_weight {weight:4g} decay {decay if decay is not None else '-':>4} "
                  f"same {same:.3f} fidelity ROUGE-2 {fid:.4f} ROUGE-2 {r2:.4f} residents {residents} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"documents": len(texts), "data": args.data, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
