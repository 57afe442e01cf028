"""What each low-bit rung costs the model's output, per sparse layer (docs/results/ladder.md).

    python scripts/measure_rung_loss.py ARTIFACT --data validation.jsonl [--skip 1000] [--limit 300]

For the documents, `full`'s greedy summaries are the targets (as `swapmoe profile
--measure-loss` does for absent experts, substitution.py). For each rung of the artifact's
ladder and each sparse layer, one teacher-forced pass runs every expert of that layer on
that rung (the other layers exact) and gives the mean KL(full || rung) of the next-token
distribution per summary token. Beside it: the profile's measured loss of keeping half the
layer's experts, for scale. The ladder's planner values a rung by a fixed quality
(ladder_plan.QUALITY); these figures say how far that guess is from the model.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swapmoe_edge.evaluate import read_pairs  # noqa: E402
from swapmoe_edge.moe import dispatch, route  # noqa: E402
from swapmoe_edge.runtime import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_edge.substitution import _Batch, _log_softmax  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N documents (e.g. the profile's)")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message=r"input \d+ has \d+ tokens; truncated")
    texts = [d["text"] for d in read_pairs(a.data, a.skip + a.limit)[a.skip:]]
    with Runtime(a.artifact, RuntimeConfig(policy="ladder", budget="100%", threads=a.threads)) as rt:
        if not rt.runners:
            raise SystemExit(f"{a.artifact} has no ladder: add one with `swapmoe ladder add`")
        c = rt.manifest.config
        exact = rt.model.moe
        copies = {(rung, lk): [runner.load(rt.store.read(k, rung=rung)) for k in rt.manifest.layer(lk.stack, lk.layer).experts]
                  for rung, runner in rt.runners.items() for lk in rt.sparse}

        def on_rung(rung, lk):
            def moe(layer, normed, logits, token_mask):
                if layer.key != lk:
                    return exact(layer, normed, logits, token_mask)
                return dispatch(route(logits, c.expert_capacity), normed,
                                lambda e, x: rt.runners[rung].run(copies[(rung, lk)][e], x))
            return moe

        cases = list(copies)
        total, tokens = np.zeros(len(cases)), 0
        for i in range(0, len(texts), 8):
            ids, _ = rt.encode_texts(texts[i: i + 8])
            b = _Batch(ids, [r.token_ids for r in rt.generate(ids, max_new_tokens=32)],
                       c.decoder_start_token_id, c.pad_token_id)
            ref = _log_softmax(rt.model.forward(b.ids, b.mask, b.dec))  # the ladder at 100%: every expert at full precision
            p = np.exp(ref)
            for j, (rung, lk) in enumerate(cases):
                rt.model.moe = on_rung(rung, lk)
                try:
                    lp = _log_softmax(rt.model.forward(b.ids, b.mask, b.dec))
                finally:
                    rt.model.moe = exact
                total[j] += float((p * (ref - lp)).sum(-1)[b.valid].sum())
            tokens += int(b.valid.sum())
            print(f"{min(i + 8, len(texts))}/{len(texts)} documents", file=sys.stderr, flush=True)
        half = {lk: float(rt.profile.loss[lk][len(copies[cases[0]]) // 2 - 1]) if rt.profile.loss else None
                for lk in rt.sparse}
    print(f"| rung | layer | KL, every expert on the rung | KL, half the experts absent (profile) |")
    print("|---|---|---|---|")
    for j, (rung, lk) in enumerate(cases):
        h = f"{half[lk]:.5f}" if half[lk] is not None else "—"
        print(f"| {rung} | {lk.name} | {total[j] / max(tokens, 1):.5f} | {h} |")


if __name__ == "__main__":
    main()
