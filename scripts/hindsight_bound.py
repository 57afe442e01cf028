"""Quality bounds for swapmoe's choice of residents (swapmoe_edge/lab/hindsight.py) beside a sweep's
prune and swapmoe cells of the same stream.

    python scripts/hindsight_bound.py ART --data CORPUS/test.jsonl --order shuffled \
        --budgets 50%,33%,25% --sweep WORK/sweep-shuffled -o OUT

Writes OUT/{mode}__{budget}.json (summaries, requests, counts) once per cell (an existing
file is reused, so an interrupted run resumes) and prints, per budget, reference ROUGE-2 and
same-as-full of prune, swapmoe, static and hindsight, each against prune with the standard
error of the difference paired by document.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from swapmoe_edge.lab.evaluate import read_pairs, scorer as rouge_scorer
from swapmoe_edge.lab.hindsight import MODES, bound_summaries
from swapmoe_edge.residency.importance import Profile


def _cell(sweep: Path | None, policy: str, budget: str) -> list[str] | None:
    if sweep is None:
        return None
    name = "full__100pct.json" if policy == "full" else f"{policy}__{budget.replace('%', 'pct')}__importance.json"
    path = sweep / "cells" / name
    return [o["summary"] for o in json.loads(path.read_text())["outputs"]] if path.is_file() else None


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    return mean, se


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--data", required=True)
    ap.add_argument("--order", default="shuffled")
    ap.add_argument("--exclude-sections", default="", help="comma-separated, as `swapmoe sweep`")
    ap.add_argument("--profile", help="an importance profile instead of the artifact's (the shifted stream)")
    ap.add_argument("--budgets", default="50%,33%,25%")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--sweep", type=Path, help="a `swapmoe sweep` output of the same stream (prune, swapmoe, full)")
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()

    exclude = tuple(s for s in a.exclude_sections.split(",") if s)
    docs = read_pairs(a.data, a.limit, a.order, (), exclude)
    profile = Profile.load(a.profile) if a.profile else None
    a.out.mkdir(parents=True, exist_ok=True)
    scorer = rouge_scorer()

    def rouge2(summaries: list[str]) -> list[float]:
        return [scorer.score(d["summary"], s)["rouge2"].fmeasure for d, s in zip(docs, summaries)]

    full = _cell(a.sweep, "full", "")
    print("| budget | run | ROUGE-2 | vs prune (± paired s.e.) | same-as-full | experts per layer |")
    print("|---|---|---|---|---|---|")
    for budget in a.budgets.split(","):
        runs: dict[str, list[str]] = {}
        counts: dict[str, str] = {}
        for policy in ("prune", "swapmoe"):
            got = _cell(a.sweep, policy, budget)
            if got is not None:
                runs[policy] = got
        for mode in a.modes.split(","):
            path = a.out / f"{mode}__{budget.replace('%', 'pct')}.json"
            if not path.is_file():
                res = bound_summaries(a.artifact, [d["text"] for d in docs], budget, mode, profile=profile,
                                      progress=lambda n, t: print(f"{mode} {budget}: {n}/{t}", file=sys.stderr,
                                                                  flush=True) if n % 200 < 8 else None)
                path.write_text(json.dumps({"mode": mode, "budget": budget, "order": a.order, **res}))
            res = json.loads(path.read_text())
            runs[mode] = res["summaries"]
            counts[mode] = "/".join(str(n) for n in res["counts"].values())
        base = rouge2(runs["prune"]) if "prune" in runs else None
        for name, summaries in runs.items():
            if len(summaries) != len(docs):
                sys.exit(f"{name} at {budget} has {len(summaries)} summaries for {len(docs)} documents: "
                         "run it on the same stream and limit")
            r = rouge2(summaries)
            vs = ""
            if base is not None and name != "prune":
                mean, se = _paired(base, r)
                vs = f"{mean:+.4f} (± {se:.4f})"
            same = f"{sum(x == y for x, y in zip(summaries, full)) / len(docs):.1%}" if full else ""
            print(f"| {budget} | {name} | {sum(r) / len(r):.4f} | {vs} | {same} | {counts.get(name, '')} |", flush=True)


if __name__ == "__main__":
    main()
