"""One ladder cell on a corpus with RuntimeConfig fields the sweep does not expose.

    python scripts/ladder_eval.py ARTIFACT --data test.jsonl --policy ladder --budget 10% \
        [--config '{"lowbit_kernel": "standard"}'] [--limit 1000] --out cell.json

`swapmoe sweep`'s cell (lab.evaluate.evaluate, one ORT thread, greedy, 32 new tokens,
batches of 8) with further config fields, e.g. the rung kernels (``lowbit_kernel``) or the
rungs used (``ladder_rungs``); the output JSON has the sweep cell's fields (ROUGE, experts
resident by rung, first-choice residency, decode, peak RSS) and the summaries, so that
scripts/ladder_tables.py can pair cells by document. Run each cell in its own process.
"""

from __future__ import annotations

import argparse
import json
import sys

from swapmoe_edge.lab.evaluate import evaluate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--data", required=True)
    ap.add_argument("--policy", default="ladder")
    ap.add_argument("--budget", required=True)
    ap.add_argument("--config", default="{}", help="further RuntimeConfig fields, as JSON")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    cfg = json.loads(a.config)
    r = evaluate(a.artifact, a.data, a.policy, a.budget, limit=a.limit, threads=a.threads, quiet=True, config=cfg,
                 compare_to_full=False, keep_outputs=True)
    r["config"] = cfg
    with open(a.out, "w") as f:
        json.dump(r, f)
    print(f"{a.policy} {a.budget} {cfg}: ROUGE-2 {r['rouge2']:.4f}, experts {r['resident_experts']} "
          f"{r.get('residents_by_rung')}, first choice resident {r['first_choice_resident']:.3f}, "
          f"decode {r['decode_ms_per_token']:.2f} ms/token, peak/budget {r['peak_rss_bytes'] / r['budget_bytes']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
