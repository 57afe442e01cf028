"""Measure what each low-bit rung costs the output, per sparse layer, and merge it into a profile.

`swapmoe profile --measure-loss` measures every rung of the artifact's ladder along with the
loss curves and the predictor; this measures only the rungs named (the same measure:
lab.substitution.measure_rung_loss, teacher-forced KL against full's greedy summaries with
every expert of one layer on the rung), so that a rung added later (``swapmoe ladder add``)
gets its price without redoing the rest of a profile. The profile's other fields are kept.

    python scripts/rung_loss.py ARTIFACT --data CORPUS/validation.jsonl --limit 512 \
        --rungs int2 --profile ARTIFACT/profile.json [--out NEW.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from swapmoe_edge.lab.calibrate import calibration_texts
from swapmoe_edge.lab.substitution import measure_rung_loss
from swapmoe_edge.model.rungs import rung_runners
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--rungs", default="int2", help="comma-separated rungs of the artifact's ladder")
    ap.add_argument("--profile", required=True, help="the profile to merge the losses into")
    ap.add_argument("--out", help="where to write the merged profile (default: --profile)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    texts = calibration_texts(a.data, a.limit)
    t0 = time.perf_counter()
    with Runtime(a.artifact, RuntimeConfig(policy="full", threads=a.threads)) as rt:
        runners = rung_runners(rt.manifest, replace(rt.config, ladder_rungs=a.rungs), rt.sessions, rt.threads,
                               list(rt.providers), rt.placement)
        losses = measure_rung_loss(rt, texts, runners, max_new_tokens=a.max_new_tokens,
                                   progress=lambda i, n: print(f"\r{i}/{n} batches", end="", file=sys.stderr))
    print(file=sys.stderr)
    raw = json.loads(Path(a.profile).read_text())
    for lk, row in losses.items():
        raw["layers"][lk.name].setdefault("rung_loss", {}).update(row)
        print(f"{lk.name}: " + ", ".join(f"{r} {x:.6f}" for r, x in row.items()))
    raw["meta"]["rung_loss_texts"] = len(texts)
    Path(a.out or a.profile).write_text(json.dumps(raw, indent=2) + "\n")
    print(f"{len(texts)} texts, {time.perf_counter() - t0:.0f} s; wrote {a.out or a.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
