"""Substitute or drop: what a top-k choice that is not resident should get, measured on quality.

    python docs/results/topk/absent.py ARTIFACT --data VALIDATION.jsonl [--limit 300]
        [--budgets 50% 33% 25%] [--policies swapmoe prune] [--threads 1] [--out absent.json]

One ``full`` run gives the reference summaries; then each policy and budget runs twice, with
``absent="substitute"`` (the best resident expert not already among the token's choices) and
``absent="drop"`` (the choice dropped, the rest renormalised), on the same documents. Reported
per cell: ROUGE-2 against the references of the data, same-as-full (greedy tokens equal to
full's), ROUGE-2 against full's summaries, first-choice residency, decode ms/token, and the paired
standard error of the ROUGE-2 difference drop - substitute. Choose on the validation split, never
on the test split.
"""

from __future__ import annotations

import argparse
import json
import sys

from swapmoe_edge.lab.evaluate import evaluate, paired_se, read_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--budgets", nargs="+", default=["50%", "33%", "25%"])
    ap.add_argument("--policies", nargs="+", default=["swapmoe", "prune"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="absent.json")
    a = ap.parse_args()
    common = dict(limit=a.limit, max_new_tokens=a.max_new_tokens, threads=a.threads, quiet=True, keep_outputs=True)
    full = evaluate(a.artifact, a.data, "full", "100%", **common)
    reference = full["outputs"]
    rows = [{"policy": "full", "budget": "100%", "absent": "-", "rouge2": full["rouge2"], "same_as_full": 1.0}]
    print(f"full: ROUGE-2 {full['rouge2']:.4f}", file=sys.stderr, flush=True)
    for policy in a.policies:
        for budget in a.budgets:
            cell = {}
            for absent in ("substitute", "drop"):
                res = evaluate(a.artifact, a.data, policy, budget, reference_outputs=reference,
                               config={"absent": absent}, **common)
                cell[absent] = res
                row = {"policy": policy, "budget": budget, "absent": absent, "rouge2": res["rouge2"],
                       "same_as_full": res["fidelity"]["exact_match"], "rouge2_vs_full": res["fidelity"]["rouge2"],
                       "first_choice_resident": res["first_choice_resident"],
                       "decode_ms_per_token": res["decode_ms_per_token"]}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            refs = [d["summary"] for d in read_pairs(a.data, a.limit)]
            rows[-1]["se_drop_minus_substitute"] = paired_se(refs, *[[o["summary"] for o in cell[x]["outputs"]]
                                                                      for x in ("substitute", "drop")])
    out = {"artifact": a.artifact, "data": a.data, "documents": a.limit, "threads": a.threads, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print("| policy | budget | absent | ROUGE-2 | same as full | ROUGE-2 vs full | first choice resident "
          "| decode ms/token | SE of drop - substitute |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        se = f"{r['se_drop_minus_substitute']:.4f}" if "se_drop_minus_substitute" in r else ""
        print(f"| {r['policy']} | {r['budget']} | {r['absent']} | {r['rouge2']:.4f} | {r['same_as_full']:.1%} | "
              f"{r.get('rouge2_vs_full', 1.0):.4f} | {r.get('first_choice_resident', 1.0):.3f} | "
              f"{r.get('decode_ms_per_token', float('nan')):.2f} | {se} |")


if __name__ == "__main__":
    main()
