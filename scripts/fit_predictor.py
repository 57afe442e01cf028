"""Fit swapmoe's decoder predictor (swapmoe_edge/predictor.py) and report how well it predicts.

    python scripts/fit_predictor.py ARTIFACT --data validation.jsonl [--limit 512] \
        [--sections S1,S2] [--check validation.jsonl --check-skip 512 --check-limit 1000] [--write PROFILE]

Runs each calibration document alone under ``full``, fits the ridge regression from its
encoder importance shares to its decoder shares, and, with ``--check``, prints per decoder
layer and expert count how much of held-out documents' decoder importance the k experts it
predicts cover, beside the calibrated prior's k and the document's own k in hindsight.
``--write``: add the predictor to that profile (e.g. the artifact's profile.json) without
profiling the rest again (`swapmoe profile --predict-decoder` does all of it at once).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swapmoe_edge.lab.evaluate import read_pairs  # noqa: E402
from swapmoe_edge.residency.importance import Profile  # noqa: E402
from swapmoe_edge.residency.planner import top_experts  # noqa: E402
from swapmoe_edge.residency.predictor import PREDICTOR_NOTE, fit, per_document_importance  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402


def _progress(label):
    return lambda n, t: print(f"{label}: {n}/{t}", file=sys.stderr, flush=True) if n % 100 == 0 or n == t else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--sections", default="", help="calibrate on documents of these sections only (comma-separated)")
    ap.add_argument("--ridge", type=float, default=1.0)
    ap.add_argument("--check", type=Path, help="held-out documents to score the predictor on")
    ap.add_argument("--check-skip", type=int, default=0)
    ap.add_argument("--check-limit", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", type=Path, help="profile file to add the predictor to")
    a = ap.parse_args()

    warnings.filterwarnings("ignore", message=r"input \d+ has \d+ tokens; truncated")
    with Runtime(a.artifact, RuntimeConfig(policy="full", threads=a.threads)) as rt:
        sections = tuple(x for x in a.sections.split(",") if x)
        texts = [d["text"] for d in read_pairs(a.data, a.limit, sections=sections)]
        predictor = fit(per_document_importance(rt, texts, progress=_progress("fit")), a.ridge)
        print(f"fitted on {predictor.documents} documents: {len(predictor.inputs)} encoder -> "
              f"{len(predictor.outputs)} decoder layers of {predictor.experts} experts")
        if a.check:
            held = read_pairs(a.check, a.check_skip + a.check_limit)[a.check_skip:]
            seen = per_document_importance(rt, [d["text"] for d in held], progress=_progress("check"))
            prior = rt.profile.importance
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
    if a.write:
        prof = Profile.load(a.write)
        prof = replace(prof, predictor=predictor, meta={**prof.meta, "predictor": PREDICTOR_NOTE,
                                                        "predictor_documents": predictor.documents})
        print(f"wrote the predictor into {prof.save(a.write)}")


if __name__ == "__main__":
    main()
