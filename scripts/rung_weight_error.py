"""Relative RMS error of the embedded model's expert weights on the low rungs, by quantiser.

    python scripts/rung_weight_error.py [CHECKPOINT] [--blocks 16,32,64]

Every expert weight (wi and wo of every sparse layer, as [inputs, outputs]), blocks of
inputs per output column as the rungs store them: ``||w - dq(q(w))|| / ||w||`` summed over
the model. Quantisers: ``int2 amax`` (the int4 rule at 2 bits: s = amax, levels -2..1),
``int2 search`` (export/ladder.py: the scale among ±0.2..1.2 amax with the least squared
error), ``int2 float zero point`` (min/max affine, levels min + k(max - min)/3: one more
float per block), and int4 as exported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from swapmoe_export import ladder


def _blocks(w: np.ndarray, b: int) -> np.ndarray:
    k, n = w.shape
    kb = -(-k // b)
    p = np.zeros((kb * b, n), np.float32)
    p[:k] = w
    return p.T.reshape(n, kb, b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default="swapmoe_edge/model_data/switch-debian")
    ap.add_argument("--blocks", default="16,32,64")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    weights = load_file(f"{a.checkpoint}/model.safetensors")
    ws = [v.astype(np.float32).T for k, v in weights.items() if ".experts." in k and k.endswith((".wi.weight", ".wo.weight"))]
    out = {"weights": len(ws)}
    for b in [int(x) for x in a.blocks.split(",")]:
        err = {"int2 amax": 0.0, "int2 search": 0.0, "int2 float zero point": 0.0, "int4": 0.0}
        norm = 0.0
        for w in ws:
            g = _blocks(w, b)
            norm += float(np.square(g).sum())
            s = np.abs(g).max(-1, keepdims=True)
            s[s == 0] = 1
            err["int2 amax"] += float(np.square(g - np.clip(np.rint(g / s), -2, 1) * s).sum())
            amax = np.abs(g).max(-1)
            s2 = ladder._search_scale(g, amax, 2)[..., None]
            s2[s2 == 0] = 1
            err["int2 search"] += float(np.square(g - np.clip(np.rint(g / s2), -2, 1) * s2).sum())
            lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
            st = (hi - lo) / 3
            st[st == 0] = 1
            err["int2 float zero point"] += float(np.square(g - (np.clip(np.rint((g - lo) / st), 0, 3) * st + lo)).sum())
            s4 = amax[..., None] / 7
            s4[s4 == 0] = 1
            err["int4"] += float(np.square(g - np.clip(np.rint(g / s4), -8, 7) * s4).sum())
        bits = {"int2 amax": 2 + 32 / b, "int2 search": 2 + 32 / b, "int2 float zero point": 2 + 64 / b, "int4": 4 + 32 / b}
        out[b] = {k: {"rel_rms": (v / norm) ** 0.5, "bits_per_weight": bits[k]} for k, v in err.items()}
        print(f"block {b}: " + ", ".join(f"{k} {(v / norm) ** 0.5:.3f} ({bits[k]:.2f} bits)" for k, v in err.items()))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
