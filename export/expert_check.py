"""Every expert's standalone subgraph against numpy on the checkpoint's weights for it.

The end-to-end and block checks see only the experts that their tokens are routed to; this one
runs each expert's own subgraph on random tokens and compares it with the expert computed in
float64 from the checkpoint's weights, rounded as the artifact stores them, within the float32
rounding bound of its two products. A block that holds another expert's weights, or weights
written at the wrong offset, fails here whatever the routing.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from swapmoe_edge.core.keys import ExpertKey
from swapmoe_edge.model.sessions import open_session, session_options

from . import bounds, quant

_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def activation(h: np.ndarray, act: str) -> np.ndarray:
    """The expert's activation in float64: ``swiglu`` takes h = [gate | up]."""
    if act == "swiglu":
        f = h.shape[-1] // 2
        gate, up = h[..., :f], h[..., f:]
        return gate / (1 + np.exp(-gate)) * up
    if act == "relu":
        return np.maximum(h, 0)
    if act == "gelu":
        return 0.5 * h * (1 + _erf(h / math.sqrt(2)))
    if act in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * h * (1 + np.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h ** 3)))
    raise ValueError(f"no reference for the expert activation {act!r}")


def check_experts(manifest, weights: Callable[[ExpertKey], tuple[np.ndarray, np.ndarray]], act: str, seed: int = 0,
                  tokens: int = 4) -> tuple[list[str], float]:
    """(mismatches, worst share of the bound) over every expert of ``manifest``; ``weights(key)``
    gives its (wi [D, F'], wo [F, D]) from the checkpoint, in the layout the graph multiplies.
    int4 experts at accuracy level 4 round each product's input as MatMulNBits does
    (quant.quantize_activations), here too."""
    rng = np.random.default_rng(seed)
    nb = manifest.expert_nbits
    block = nb["block_size"] if nb and nb["accuracy_level"] == 4 else None

    def rounded(a: np.ndarray) -> np.ndarray:
        return quant.quantize_activations(a.astype(np.float32), block).astype(np.float64) if block else a.astype(np.float64)

    opts = session_options(1)
    d, f = manifest.config.d_model, manifest.config.d_ff
    bound = bounds.rounding_bound(d + (2 * f if act == "swiglu" else f))
    bad, worst = [], 0.0
    for key, entry in manifest.experts.items():
        wi_t, wo_t = (quant.as_stored(w, manifest.expert_dtype).astype(np.float64) for w in weights(key))
        x = rng.standard_normal((tokens, d)).astype(np.float32)
        got = open_session(manifest.path(entry.graph.file), opts).run(None, {"x": x})[0]
        ref = rounded(activation(rounded(x) @ wi_t, act)) @ wo_t
        cmp = bounds.compare(f"expert {key.name}", got[None], ref[None].astype(np.float32), bound)
        if isinstance(cmp, str):
            bad.append(cmp)
            continue
        worst = max(worst, cmp.worst / bound)
        if not cmp.passed:
            bad.append(cmp.describe())
    return bad, worst
