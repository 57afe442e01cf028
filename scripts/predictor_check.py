"""How well a profile's decoder predictor predicts, on held-out documents.

    swapmoe profile ART --data CORPUS/validation.jsonl --limit 512 --predict-decoder -o profile.json
    python scripts/predictor_check.py ART --profile profile.json --data CORPUS/validation.jsonl \
        --skip 512 --limit 1000

Runs each held-out document alone under ``full`` and prints, per decoder layer and expert
count k, how much of the document's decoder importance (SwapMoE Eq. 1) the k experts the
predictor names cover, beside the profile's prior k and the document's own k in hindsight.
Leave out (``--skip``) the documents the predictor was fitted on.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from swapmoe_edge.lab.evaluate import read_pairs
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.residency.planner import top_experts
from swapmoe_edge.residency.predictor import per_document_importance
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="JSONL with `text`")
    ap.add_argument("--profile", type=Path, help="profile with a predictor (default: the artifact's)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N documents (those fitted on)")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    warnings.filterwarnings("ignore", message=r"input \d+ has \d+ tokens; truncated")
    profile = Profile.load(a.profile) if a.profile else None
    with Runtime(a.artifact, RuntimeConfig(policy="full", threads=a.threads), profile=profile) as rt:
        predictor, prior = rt.profile.predictor, rt.profile.importance
        if predictor is None:
            sys.exit("the profile has no decoder predictor: fit one with `swapmoe profile --predict-decoder`")
        held = read_pairs(a.data, a.skip + a.limit)[a.skip:]
        seen = per_document_importance(rt, [d["text"] for d in held], progress=lambda n, t: print(
            f"{n}/{t}", file=sys.stderr, flush=True) if n % 100 == 0 or n == t else None)
    print(f"predictor fitted on {predictor.documents} documents; {len(seen)} held-out documents", file=sys.stderr)
    guesses = [predictor.predict(doc) for doc in seen]
    print("| layer | k | prior's k | predicted k | the document's own k |")
    print("|---|---|---|---|---|")
    for lk in predictor.outputs:
        for k in sorted({max(1, predictor.experts * f // 16) for f in (4, 6, 7, 8, 10)}):
            cover = {"prior": 0.0, "predicted": 0.0, "own": 0.0}
            total = 0.0
            for doc, guess in zip(seen, guesses):
                own = np.asarray(doc[lk])
                for name, score in (("prior", prior[lk]), ("predicted", guess[lk]), ("own", own)):
                    cover[name] += float(own[list(top_experts(score, k))].sum())
                total += float(own.sum())
            print(f"| {lk.name} | {k} | " + " | ".join(f"{cover[n] / total:.3f}" for n in cover) + " |")


if __name__ == "__main__":
    main()
