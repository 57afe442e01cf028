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

from swapmoe_edge.lab.evaluate import evaluate


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

    common = dict(limit=args.limit, batch_size=args.batch_size, threads=args.threads, quiet=True)
    full = evaluate(args.artifact, args.data, "full", "100%", keep_outputs=True, **common)
    print(f"{full['documents']} documents; full: ROUGE-2 {full['rouge2']:.4f}; "
          "same = share of summaries identical to full's tokens", flush=True)
    weights = [float(w) for w in args.decoder_weights.split(",")]
    decays = [float(d) for d in args.decays.split(",")]
    # (policy, decay as printed, RuntimeConfig fields besides the decoder weight)
    grid = [("prune", w, None, {}) for w in weights]
    grid += [("swapmoe", w, d, {"decay": d}) for w, d in itertools.product(weights, decays)]
    if args.static:
        grid += [("swapmoe", w, "static", {"swap_interval_s": 1e9}) for w in weights]
    rows = []
    for budget in args.budgets.split(","):
        for policy, weight, decay, config in grid:
            t0 = time.perf_counter()
            res = evaluate(args.artifact, args.data, policy, budget, reference_outputs=full["outputs"],
                           config={"decoder_weight": weight, **config}, **common)
            row = {"budget": budget, "policy": policy, "decoder_weight": weight, "decay": decay,
                   "same": res["fidelity"]["exact_match"], "fidelity_rouge2": res["fidelity"]["rouge2"],
                   "rouge2": res["rouge2"], "residents": res["resident_experts_per_layer"]}
            rows.append(row)
            print(f"{budget:>5} {policy:8s} decoder_weight {weight:4g} decay {decay if decay is not None else '-':>4} "
                  f"same {row['same']:.3f} fidelity ROUGE-2 {row['fidelity_rouge2']:.4f} ROUGE-2 {row['rouge2']:.4f} "
                  f"residents {row['residents']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"documents": full["documents"], "data": args.data, "rows": rows},
                                            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
