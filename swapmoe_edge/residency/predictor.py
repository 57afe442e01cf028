"""Which decoder experts a request will want, predicted from its encoder routing.

A request's encoder pass routes every source token before the decoder runs its first step,
and which experts the encoder used says what the document is about, and so which experts
its summary's tokens will choose. On the embedded model's validation documents the 7
decoder experts (of 16) that carry most of a document's importance cover 0.777 of it in
``dec.L03`` when taken from the calibrated prior, 0.842 when predicted from the document's
own encoder routing, 0.986 in hindsight (docs/results/streams/README.md).

The model is linear: a document's importance shares of every encoder sparse layer
(concatenated, plus 1) times ``weights`` gives its decoder layers' shares, clipped at 0.
It is fitted by ridge regression on calibration documents run one at a time under ``full``
(``swapmoe profile --predict-decoder``), and kept in the profile. swapmoe uses it once per
request: after the encoder pass, each decoder layer is planned from the prediction instead of
the prior and the last documents, and the swapper moves those layers at once (policies.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from swapmoe_edge.core.errors import InputError
from swapmoe_edge.core.keys import LayerKey, parse_layer_name

# `predict_decoder="auto"` waits for the predicted swaps only when an expert reads this fast.
PREDICT_WAIT_MAX_EXPERT_BYTES = 4 << 20

PREDICTOR_NOTE = ("ridge regression of each calibration document's decoder importance shares on its encoder "
                  "importance shares, documents run one at a time under full (swapmoe_edge/predictor.py)")


def shares(importance: Mapping[LayerKey, np.ndarray], layers: Sequence[LayerKey]) -> np.ndarray:
    """The layers' importance rows, each divided by its sum (0 where nothing was routed), concatenated."""
    rows = []
    for lk in layers:
        row = np.asarray(importance[lk], dtype=np.float64)
        total = float(row.sum())
        rows.append(row / total if total > 0 else np.zeros_like(row))
    return np.concatenate(rows)


@dataclass(frozen=True)
class DecoderPredictor:
    inputs: tuple[LayerKey, ...]  # encoder sparse layers, in the order of the weights' rows
    outputs: tuple[LayerKey, ...]  # decoder sparse layers, in the order of the weights' columns
    experts: int
    weights: np.ndarray  # [len(inputs) * experts + 1, len(outputs) * experts]; the last row: intercept
    documents: int = 0
    ridge: float = 1.0

    def __post_init__(self) -> None:
        w = np.array(self.weights, dtype=np.float64)
        w.flags.writeable = False
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        want = (len(self.inputs) * self.experts + 1, len(self.outputs) * self.experts)
        if not self.inputs or not self.outputs or self.experts < 1:
            raise ValueError("a decoder predictor needs encoder and decoder layers and at least one expert")
        if w.shape != want:
            raise ValueError(f"predictor weights are {w.shape}, {len(self.inputs)} encoder and "
                             f"{len(self.outputs)} decoder layers of {self.experts} experts need {want}")
        if not np.all(np.isfinite(w)):
            raise ValueError("predictor weights must be finite")

    def predict(self, encoder_importance: Mapping[LayerKey, np.ndarray]) -> dict[LayerKey, np.ndarray]:
        """Each decoder layer's predicted importance shares [E] from one request's encoder importance."""
        x = np.append(shares(encoder_importance, self.inputs), 1.0)
        y = np.clip(x @ self.weights, 0.0, None)
        return {lk: y[i * self.experts:(i + 1) * self.experts] for i, lk in enumerate(self.outputs)}

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [k.name for k in self.inputs], "outputs": [k.name for k in self.outputs],
                "experts": self.experts, "documents": self.documents, "ridge": self.ridge,
                "weights": np.round(self.weights, 7).tolist()}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "DecoderPredictor":
        return cls(tuple(parse_layer_name(n) for n in raw["inputs"]), tuple(parse_layer_name(n) for n in raw["outputs"]),
                   int(raw["experts"]), np.asarray(raw["weights"], dtype=np.float64), int(raw.get("documents", 0)),
                   float(raw.get("ridge", 1.0)))


def fit(documents: Sequence[Mapping[LayerKey, np.ndarray]], ridge: float = 1.0) -> DecoderPredictor:
    """Ridge regression over per-document importance (every sparse layer's row [E] per document)."""
    if len(documents) < 2:
        raise InputError(f"fitting a decoder predictor needs at least two documents, got {len(documents)}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    layers = list(documents[0])
    inputs = tuple(k for k in layers if k.stack == "encoder")
    outputs = tuple(k for k in layers if k.stack == "decoder")
    if not inputs or not outputs:
        raise InputError("this model has no sparse layers in its encoder or its decoder: there is nothing to predict")
    experts = int(np.asarray(documents[0][layers[0]]).size)
    x = np.array([np.append(shares(d, inputs), 1.0) for d in documents])  # N, I*E+1
    y = np.array([shares(d, outputs) for d in documents])  # N, O*E
    w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
    return DecoderPredictor(inputs, outputs, experts, w, len(documents), ridge)


def per_document_importance(runtime, texts: Sequence[str], max_new_tokens: int = 32,
                            progress: Callable[[int, int], None] | None = None) -> list[dict[LayerKey, np.ndarray]]:
    """Eq. 1 importance of every sparse layer for each text alone (``runtime`` should be exact)."""
    out = []
    for i, text in enumerate(texts):
        out.append(dict(runtime.profile_texts([text], max_new_tokens=max_new_tokens, batch_size=1).importance))
        if progress is not None:
            progress(i + 1, len(texts))
    return out
