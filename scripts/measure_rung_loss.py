"""What each low-bit rung costs the model's output, per sparse layer (docs/results/ladder.md).

    python scripts/measure_rung_loss.py ARTIFACT --data validation.jsonl [--skip 0] [--limit 512] \
        [--write PROFILE]

For the documents, `full`'s greedy summaries are the targets; for each rung of the
artifact's ladder and each sparse layer, one teacher-forced pass runs every expert of that
layer on the rung (the other layers exact): the mean KL(full || rung) of the next-token
distribution per summary token (substitution.measure_rung_loss, which `swapmoe profile
--measure-loss` also runs). Beside it: the profile's measured loss of keeping half the
layer's experts, for scale. ``--write``: add the figures to that profile file (e.g. the
artifact's profile.json) as its ``rung_loss``, which the ladder's planner then prices its
rungs by (ladder_plan.measured_quality), without measuring the rest of the profile again.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swapmoe_edge.lab.evaluate import read_pairs  # noqa: E402
from swapmoe_edge.residency.importance import Profile  # noqa: E402
from swapmoe_edge.model.rungs import rung_runners  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_edge.lab.substitution import RUNG_LOSS_NOTE, measure_rung_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N documents")
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", type=Path, help="profile file to add the rung losses to")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message=r"input \d+ has \d+ tokens; truncated")
    texts = [d["text"] for d in read_pairs(a.data, a.skip + a.limit)[a.skip:]]
    with Runtime(a.artifact, RuntimeConfig(policy="full", budget="100%", threads=a.threads)) as rt:
        if not rt.manifest.ladder:
            raise SystemExit(f"{a.artifact} has no ladder: add one with `swapmoe ladder add`")
        runners = rung_runners(rt.manifest, rt.config, rt.sessions, rt.threads, list(rt.providers), rt.placement)
        got = measure_rung_loss(rt, texts, runners,
                                progress=lambda i, n: print(f"batch {i}/{n}", file=sys.stderr, flush=True))
        prof = rt.profile
    print("| rung | layer | KL, every expert on the rung | KL, half the experts absent (profile) |")
    print("|---|---|---|---|")
    for lk, row in got.items():
        for rung, kl in row.items():
            half = f"{prof.loss[lk][prof.importance[lk].size // 2 - 1]:.5f}" if prof.loss else "—"
            print(f"| {rung} | {lk.name} | {kl:.5f} | {half} |")
    if a.write:
        old = Profile.load(a.write)
        new = replace(old, rung_loss=got, meta={**old.meta, "rung_loss": RUNG_LOSS_NOTE,
                                                "rung_loss_texts": len(texts)})
        print(f"wrote {new.save(a.write)}", file=sys.stderr)


if __name__ == "__main__":
    main()
