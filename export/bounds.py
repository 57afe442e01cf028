"""How far the split model may be from PyTorch: a per-token bound that follows float32 rounding.

A dot product of length n rounded in a float type is off by at most about n·u of the
sum of its terms' magnitudes (u: the unit roundoff, 2^-24 for float32), and a block is a
chain of such reductions: the RMS norm over D, the projections over D, the attention
scores over K, the softmax and the weighted sum over the L keys, the output projection
over H·K, the FFN over D then F (a sparse layer: the router over D, then the expert).
So a block's output, token by token, may be off by about u · Σn of its norm, where Σn
adds the block's reduction sizes; the bound is MARGIN times that.

MARGIN covers what the n·u rule leaves out, such as cancellation (a sum smaller than its
terms). Measured on 98 tiny models (93 with initializer_factor 10 or 30, block RMS up to
60,000; 8 stored in float16): the typical token sits at 0.002-0.01 of u·Σn, so the bound
is 1,600x or more above it. Wiring errors (a swapped or transposed weight, a wrong bias,
norm or position bias) put most tokens at 24-1,300x the bound (tests/test_export_bounds.py).

The arithmetic is float32 in every artifact: float16 weights are cast to float32 before
use and the PyTorch reference runs the same rounded weights, so the storage type does not
widen the bound. A graph that computed in float16 would use float16's u (2^-11).

Shapes: B batch, T tokens (positions), D the compared width (d_model, or vocab for logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11}
MARGIN = 16.0
# A few tokens may go past the bound, up to NEAR times it: a softmax near tie (the top two
# scores almost equal) turns the scores' rounding into a larger change of the weights, and
# its size falls off only as 1/gap, a heavy tail. Of the 98 models above, 10 had a token
# past 5 u·Σn, the worst at 26 u·Σn (1.6x the bound); NEAR = 8 (128 u·Σn) leaves 5x above
# that. Such tokens are reported (the manifest's validation.rounding_outliers), not failed.
NEAR = 8.0
ISOLATED = 1 / 8  # at most this share of the tokens (at least one) counts as isolated


def block_reductions(cfg, stack: str, sparse: bool, src_len: int, tgt_len: int) -> int:
    """Σn for one block: the lengths of the reductions a token's output goes through."""
    d, hk = cfg.d_model, cfg.num_heads * cfg.d_kv

    def attention(keys: int) -> int:  # norm, q/k/v projection, scores, softmax, weighted sum, output
        return d + d + cfg.d_kv + keys + keys + hk

    n = attention(src_len if stack == "encoder" else tgt_len)
    if stack == "decoder":
        n += attention(src_len)
    n += d + (d if sparse else 0) + d + cfg.d_ff  # norm, (router), wi, wo
    return n


def final_norm_reductions(cfg) -> int:
    return cfg.d_model


def lm_head_reductions(cfg) -> int:
    return cfg.d_model + cfg.d_model  # the final norm, the projection to the vocabulary


def rounding_bound(reductions: int, compute: str = "float32") -> float:
    return MARGIN * UNIT_ROUNDOFF[compute] * reductions


def token_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """[B, T, D] -> [B, T]: |got - ref| / |ref| per token (in float64); a zero token counts absolute
    error against the tensor's typical token norm."""
    g, r = got.astype(np.float64), ref.astype(np.float64)
    diff = np.linalg.norm(g - r, axis=-1)
    norm = np.linalg.norm(r, axis=-1)
    floor = max(float(np.median(norm)) * 1e-6, np.finfo(np.float32).tiny)
    return diff / np.maximum(norm, floor)


@dataclass(frozen=True)
class Comparison:
    """One output compared token by token: its errors, the bound, and what kind of difference it is."""

    name: str
    errors: np.ndarray  # [B, T]
    bound: float
    what: str = "the float32 rounding bound"

    @property
    def bad(self) -> np.ndarray:
        return ~(self.errors <= self.bound)  # NaN counts as bad

    @property
    def passed(self) -> bool:
        """Every token within the bound, or only a few just past it (rounding at a near tie)."""
        return self.kind in ("ok", "rounding")

    @property
    def worst(self) -> float:
        return float(np.max(self.errors)) if np.isfinite(self.errors).all() else float("inf")

    @property
    def kind(self) -> str:
        """What the tokens past the bound look like:

        ok: none. rounding: a few, at most NEAR times the bound (accepted). isolated-far: a few,
        far past it. systematic: many, but all within NEAR times it. wiring: half or more, some
        far past. partial: a group (more than a few, less than half), some far past.
        """
        n_bad, n = int(self.bad.sum()), self.errors.size
        if n_bad == 0:
            return "ok"
        near = self.worst <= NEAR * self.bound
        if n_bad <= max(1, n * ISOLATED):
            return "rounding" if near else "isolated-far"
        if near:
            return "systematic"
        return "wiring" if n_bad * 2 >= n else "partial"

    def outliers(self) -> list[dict]:
        """The tokens past the bound: where, and their error as a share of the bound."""
        return [{"token": [int(i), int(t)], "error": float(self.errors[i, t]), "share_of_bound": float(self.errors[i, t] / self.bound)}
                for i, t in np.argwhere(self.bad)]

    def facts(self) -> str:
        """What differs and by how much: the tokens past the bound, and the others' worst."""
        bad, e, b = self.bad, self.errors, self.bound
        n_bad, n = int(bad.sum()), e.size
        where = np.argwhere(bad)
        if n_bad * 2 >= n:
            med = float(np.median(e))
            shown = f"median {med:.1e} ({med / b:.0f}x it)"
        else:
            shown = ", ".join(f"[{i}, {t}] {e[i, t]:.1e}" for i, t in where[:4]) + (" ..." if len(where) > 4 else "")
        good = e[~bad]
        rest = f"; the other tokens at most {good.max():.1e}" if good.size else ""
        return f"{self.name}: {n_bad}/{n} tokens past {self.what} {b:.1e} (error / token norm): {shown}{rest}"

    def describe(self) -> str:
        """One line: the facts, and the kind of difference they point to."""
        n_bad, n, ratio = int(self.bad.sum()), self.errors.size, self.worst / self.bound
        return f"{self.facts()}: " + {
            "ok": "all within it",
            "rounding": f"isolated tokens just past the rounding bound (at most {ratio:.1f}x it): float32 rounding "
                        "amplified at a near tie (softmax over large scores, or the router), not wiring",
            "isolated-far": f"isolated tokens far past the rounding bound ({ratio:.0f}x it), the rest within it: an "
                            "expert only these tokens use is wired wrong, or a routing decision flipped at a near tie",
            "systematic": f"many tokens just past the rounding bound (at most {ratio:.1f}x it): a small systematic "
                          "difference (a norm's epsilon, an activation variant, a constant), not a swapped weight",
            "wiring": f"{'every token' if n_bad == n else 'most tokens'} off by far more than rounding: wiring (a "
                      "swapped, transposed or missing weight, a wrong bias, norm or mask)",
            "partial": "a group of tokens off by far more than rounding, the rest within it: a path only they take is "
                       "wired wrong (an expert, a padded or masked position)",
        }[self.kind]


def compare(name: str, got: np.ndarray, ref: np.ndarray, bound: float, what: str = Comparison.what) -> Comparison | str:
    """The token-by-token comparison, or a one-line mismatch when the shapes differ."""
    if got.shape != ref.shape:
        return f"{name}: shape {got.shape} != PyTorch {ref.shape}: wiring (the output has the wrong shape)"
    return Comparison(name, token_errors(got, ref), bound, what)
