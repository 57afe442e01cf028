"""Expert importance (SwapMoE, Eq. 1) tracked online, and saved as an offline profile.

    I(E_i) = sum over tokens x routed to i of  ||x|| * G(x)_i * ||E_i||

"Routed to" is the router's *unmasked* choice (argmax over all experts), so an expert
that is not resident, and therefore masked out of the token loop, still earns
importance and can win its way back in. ``||x||`` is the norm of the token's hidden
state as it enters the MoE layer; ``G(x)_i`` its softmax gate probability.

A top-k router (``top_k`` > 1) routes each token to its k largest probabilities: the sum runs
over each token's k unmasked choices, each at its own softmax probability (before any
renormalisation over the k, which scales a token's k choices alike).

Shapes: N tokens, E experts, k choices per token.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from swapmoe_edge.core.errors import ArtifactError
from swapmoe_edge.artifact.files import write_json_atomic
from swapmoe_edge.core.keys import LayerKey, parse_layer_name
from swapmoe_edge.model.moe import top_k as top_k_of
from swapmoe_edge.residency.predictor import DecoderPredictor

PROFILE_NAME = "profile.json"
PROFILE_FORMAT = "swapmoe-profile"
PROFILE_SCHEMA_VERSION = 1


def eq1(norms: np.ndarray, x_norm: np.ndarray, probs: np.ndarray,
        valid: np.ndarray | None = None, top_k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 1 importance [E] and routing counts [E] of N tokens: ``x_norm`` [..., N], ``probs``
    [..., N, E] (flattened here), the tokens ``valid`` [..., N] marks (all without it), each
    token counted at its ``top_k`` unmasked choices."""
    probs = np.asarray(probs).reshape(-1, norms.size)  # N E
    x_norm = np.asarray(x_norm).reshape(-1)  # N
    if valid is not None:
        keep = np.asarray(valid, dtype=bool).reshape(-1)
        probs, x_norm = probs[keep], x_norm[keep]
    choice = top_k_of(probs, top_k)  # N k  unmasked top-k
    gate = np.take_along_axis(probs, choice, axis=1)  # N k
    choice = choice.reshape(-1)  # N*k
    weight = (x_norm[:, None] * gate).reshape(-1) * norms[choice]
    value = np.bincount(choice, weights=weight, minlength=norms.size)  # E
    return value, np.bincount(choice, minlength=norms.size)


class ImportanceTracker:
    """Accumulate Eq. 1 importance and routing counts per expert; safe across threads.

    The token loop calls ``observe`` (or ``observe_later``); the swapper thread reads
    ``snapshot``. Between requests, ``decay(f)`` turns the sums into an exponential moving
    average. Counts decay with importance, so both describe the same window.
    """

    # observe_later: a call with more tokens than this is added at once (a prefill's hidden
    # states are not held), and the queue is added up once it holds this many calls or bytes
    # (the bytes bound what it holds outside the budget: ~40 decode calls of a batch of 8 at
    # switch-base size, 256 calls on the embedded model).
    LATER_MAX_TOKENS = 64
    LATER_MAX_CALLS = 256
    LATER_MAX_BYTES = 1 << 20

    def __init__(self, layers: Mapping[LayerKey, np.ndarray], top_k: int = 1) -> None:
        """``layers`` maps each sparse layer to its experts' weight norms ||E|| [E]; ``top_k``: the
        experts the router sends each token to."""
        self._norms = {k: np.asarray(v, dtype=np.float64).copy() for k, v in layers.items()}
        self.top_k = int(top_k)
        for key, norms in self._norms.items():
            if norms.ndim != 1 or norms.size == 0 or not np.all(np.isfinite(norms)) or np.any(norms < 0):
                raise ValueError(f"{key}: expert norms must be a non-empty 1-D array of finite values >= 0")
            if not 1 <= self.top_k <= norms.size:
                raise ValueError(f"{key}: top_k {top_k} of {norms.size} experts")
        self._importance = {k: np.zeros_like(v) for k, v in self._norms.items()}
        self._counts = {k: np.zeros_like(v) for k, v in self._norms.items()}
        self._prior: dict[LayerKey, np.ndarray] = {}
        self._lock = threading.Lock()
        self._later: collections.deque = collections.deque()  # (layer, hidden, probs, valid)
        self._later_bytes = 0  # about what the queue holds (a fold may race an append: approximate)

    @property
    def layers(self) -> tuple[LayerKey, ...]:
        return tuple(self._norms)

    def norms(self, layer: LayerKey) -> np.ndarray:
        return self._norms[layer].copy()

    def observe(
        self,
        layer: LayerKey,
        x_norm: np.ndarray,
        probs: np.ndarray,
        valid: np.ndarray | None = None,
    ) -> None:
        """Add one batch of tokens: ``x_norm`` [N], ``probs`` [N, E] unmasked softmax, ``valid`` [N] bool."""
        norms = self._norms[layer]  # E
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape[-1] != norms.size:
            raise ValueError(f"{layer}: router gives {probs.shape[-1]} experts, the layer has {norms.size}")
        probs = probs.reshape(-1, norms.size)  # N E
        x_norm = np.asarray(x_norm, dtype=np.float64).reshape(-1)  # N
        if x_norm.size != probs.shape[0]:
            raise ValueError(f"{layer}: {x_norm.size} token norms for {probs.shape[0]} router rows")
        if valid is not None and np.size(valid) != x_norm.size:
            raise ValueError(f"{layer}: valid mask has {np.size(valid)} entries for {x_norm.size} tokens")
        value, count = eq1(norms, x_norm, probs, valid, self.top_k)
        with self._lock:
            self._importance[layer] += value
            self._counts[layer] += count

    def observe_later(self, layer: LayerKey, hidden: np.ndarray, probs: np.ndarray,
                      valid: np.ndarray | None = None) -> None:
        """``observe`` for the token loop: the tokens' hidden states ``hidden`` [..., D] (not yet
        their norms) are queued and added up by the next reader (the swapper's ``snapshot``,
        ``decay`` between requests) in one pass per layer, so a decoded token pays a queue
        append per layer instead of ~20 numpy calls. The arrays must not be written afterwards.
        The sums are those of ``observe`` (up to float64 summation order)."""
        if hidden.size > self.LATER_MAX_TOKENS * hidden.shape[-1]:
            self.observe(layer, np.linalg.norm(hidden, axis=-1), probs, valid)
            return
        self._later.append((layer, hidden, probs, valid))  # deque.append: atomic
        self._later_bytes += hidden.nbytes + np.asarray(probs).nbytes
        if len(self._later) >= self.LATER_MAX_CALLS or self._later_bytes >= self.LATER_MAX_BYTES:
            self.fold()

    def fold(self) -> None:
        """Add up what ``observe_later`` queued."""
        self._later_bytes = 0
        by_layer: dict[LayerKey, list] = {}
        while True:
            try:
                layer, hidden, probs, valid = self._later.popleft()
            except IndexError:
                break
            rows = by_layer.setdefault(layer, [[], [], []])
            rows[0].append(hidden.reshape(-1, hidden.shape[-1]))
            rows[1].append(np.asarray(probs).reshape(-1, np.shape(probs)[-1]))
            n = rows[0][-1].shape[0]
            rows[2].append(np.ones(n, bool) if valid is None else np.asarray(valid, bool).reshape(-1))
        for layer, (hidden, probs, valid) in by_layer.items():
            x_norm = np.linalg.norm(np.concatenate(hidden), axis=-1)
            self.observe(layer, x_norm, np.concatenate(probs), np.concatenate(valid))

    def decay(self, factor: float) -> None:
        """Scale everything by ``factor`` in [0, 1]: ``I <- factor * I`` before the next request."""
        if not (0.0 <= factor <= 1.0):
            raise ValueError(f"decay factor must be in [0, 1], got {factor}")
        self.fold()
        with self._lock:
            for key in self._importance:
                self._importance[key] *= factor
                self._counts[key] *= factor

    def seed(self, profile: "Profile", weight: float = 1.0) -> None:
        """Start from an offline profile (scaled by ``weight``) instead of zeros."""
        self.fold()
        with self._lock:
            for key in self._importance:
                if key in profile.importance:
                    self._importance[key] = weight * np.asarray(profile.importance[key], np.float64)
                    self._counts[key] = weight * np.asarray(profile.counts[key], np.float64)

    def set_prior(self, profile: "Profile", documents: float) -> None:
        """Blend a calibrated prior into every ``snapshot``: the profile's importance per document,
        times ``documents``, is added to the online sums and never decays.

        Without it, ``decay`` washes the seeded profile out after a few requests and the
        planner chases the last documents; with it, online evidence moves the plan only
        where it outweighs ``documents`` documents' worth of calibration.
        """
        if not (documents >= 0 and np.isfinite(documents)):
            raise ValueError(f"prior documents must be finite and >= 0, got {documents}")
        texts = float(profile.meta.get("texts") or 0) or 1.0
        with self._lock:
            for key in self._importance:
                if key in profile.importance:
                    self._prior[key] = np.asarray(profile.importance[key], np.float64) * (documents / texts)

    def snapshot(self) -> dict[LayerKey, np.ndarray]:
        """A copy of the importance per layer [E] (prior included), consistent across layers."""
        self.fold()
        with self._lock:
            return {k: v + self._prior[k] if k in self._prior else v.copy() for k, v in self._importance.items()}

    def snapshot_with_counts(self) -> tuple[dict[LayerKey, np.ndarray], dict[LayerKey, np.ndarray]]:
        """Importance and routing counts, both taken under one lock."""
        self.fold()
        with self._lock:
            return (
                {k: v.copy() for k, v in self._importance.items()},
                {k: v.copy() for k, v in self._counts.items()},
            )


def _frozen(a: Any) -> np.ndarray:
    arr = np.array(a, dtype=np.float64)  # a copy, so nobody else holds a writable view
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True)
class Profile:
    """Per-layer importance [E] and routing counts [E]; arrays are read-only.

    ``source`` says where the numbers came from: ``"profile"`` (calibration texts),
    ``"online"`` (a live tracker) or ``"norms"`` (no profile: ||E||, the pruning order).

    Optional, from a measuring profile run (``swapmoe profile --measure-loss``,
    substitution.py): ``loss[layer]`` [E], the measured cost to the model's output of
    keeping only ``k`` experts of that layer under masked routing (entry ``k - 1``; the last
    is 0), and ``substitute[layer]``, the one expert that serves best when the layer keeps
    only one. swapmoe's planner splits the budget by ``loss`` and a one-expert layer keeps
    ``substitute`` (planner.plan_counts, policies/swapmoe.py). ``rung_loss[layer][rung]``:
    the same loss with every expert of the layer on a low-bit rung of the ladder; the ladder's
    planner prices its rungs by it (planner.measured_quality).
    """

    importance: dict[LayerKey, np.ndarray]
    counts: dict[LayerKey, np.ndarray]
    source: str = "profile"
    meta: dict[str, Any] = field(default_factory=dict)
    loss: dict[LayerKey, np.ndarray] = field(default_factory=dict)
    substitute: dict[LayerKey, int] = field(default_factory=dict)
    rung_loss: dict[LayerKey, dict[str, float]] = field(default_factory=dict)
    predictor: Any = None  # predictor.DecoderPredictor: decoder experts from a request's encoder routing

    def __post_init__(self) -> None:
        object.__setattr__(self, "importance", {k: _frozen(v) for k, v in self.importance.items()})
        object.__setattr__(self, "counts", {k: _frozen(v) for k, v in self.counts.items()})
        object.__setattr__(self, "loss", {k: _frozen(v) for k, v in self.loss.items()})
        object.__setattr__(self, "substitute", {k: int(v) for k, v in self.substitute.items()})
        object.__setattr__(self, "rung_loss", {k: {str(r): float(x) for r, x in v.items()} for k, v in self.rung_loss.items()})
        for key, row in self.rung_loss.items():
            if key not in self.importance or not all(np.isfinite(x) and x >= 0 for x in row.values()):
                raise ValueError(f"{key}: rung loss must be finite values >= 0 for a profiled layer")
        if set(self.importance) != set(self.counts):
            raise ValueError("profile importance and counts must cover the same layers")
        p = self.predictor
        if p is not None and any(k not in self.importance or self.importance[k].size != p.experts
                                 for k in (*p.inputs, *p.outputs)):
            raise ValueError("the decoder predictor's layers must be profiled layers with as many experts")
        if self.loss and set(self.loss) != set(self.importance):
            raise ValueError("a profile's measured loss must cover every layer of its importance, or none")
        for key, row in self.loss.items():
            if row.shape != self.importance[key].shape or not np.all(np.isfinite(row)) or np.any(row < 0):
                raise ValueError(f"{key}: measured loss must be {self.importance[key].size} finite values >= 0")
        for key, e in self.substitute.items():
            if key not in self.importance or not 0 <= e < self.importance[key].size:
                raise ValueError(f"{key}: substitute expert {e} is not an expert of a profiled layer")
        for key, imp in self.importance.items():
            cnt = self.counts[key]
            if imp.ndim != 1 or imp.shape != cnt.shape or imp.size == 0:
                raise ValueError(
                    f"{key}: importance {imp.shape} and counts {cnt.shape} must be equal 1-D shapes"
                )
            if not all(np.all(np.isfinite(a)) and np.all(a >= 0) for a in (imp, cnt)):
                raise ValueError(f"{key}: importance and counts must be finite and >= 0")

    @classmethod
    def from_tracker(cls, tracker: ImportanceTracker, meta: dict[str, Any] | None = None) -> "Profile":
        importance, counts = tracker.snapshot_with_counts()
        return cls(importance, counts, source="online", meta=dict(meta or {}))

    @classmethod
    def from_norms(cls, norms: Mapping[LayerKey, np.ndarray]) -> "Profile":
        """The fallback with no calibration data: importance = ||E||, the pruning baseline's order."""
        return cls(
            {k: np.asarray(v, np.float64) for k, v in norms.items()},
            {k: np.zeros(np.shape(v)) for k, v in norms.items()},
            source="norms",
        )

    def check_layers(self, experts_per_layer: Mapping[LayerKey, int], where: str = "profile") -> None:
        """Raise ArtifactError unless the profile has exactly these sparse layers and expert counts."""
        want = {k.name: int(n) for k, n in experts_per_layer.items()}
        have = {k.name: int(v.size) for k, v in self.importance.items()}
        if want != have:
            raise ArtifactError(
                f"{where} does not match the model: it has layers/experts {have}, the artifact has "
                f"{want}. Run `swapmoe profile` again for this artifact, or delete the profile."
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "schema_version": PROFILE_SCHEMA_VERSION,
            "source": self.source,
            "meta": self.meta,
            "layers": {k.name: self._layer_json(k) for k in self.importance},
            **({"predictor": self.predictor.to_json()} if self.predictor is not None else {}),
        }

    def _layer_json(self, k: LayerKey) -> dict[str, Any]:
        out: dict[str, Any] = {"importance": self.importance[k].tolist(), "counts": self.counts[k].tolist()}
        if k in self.loss:
            out["loss"] = self.loss[k].tolist()
        if k in self.substitute:
            out["substitute"] = self.substitute[k]
        if k in self.rung_loss:
            out["rung_loss"] = dict(self.rung_loss[k])
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "Profile":
        """The inverse of ``to_json`` (format checks are ``load``'s); KeyError/TypeError/ValueError if malformed."""
        importance, counts, loss, substitute, rung_loss = {}, {}, {}, {}, {}
        for name, entry in raw["layers"].items():
            key = parse_layer_name(name)
            importance[key] = np.asarray(entry["importance"], dtype=np.float64)
            counts[key] = np.asarray(entry["counts"], dtype=np.float64)
            if "loss" in entry:
                loss[key] = np.asarray(entry["loss"], dtype=np.float64)
            if "substitute" in entry:
                e = entry["substitute"]
                if not isinstance(e, int) or isinstance(e, bool):
                    raise TypeError(f"{name}: substitute must be an expert index, got {e!r}")
                substitute[key] = e
            if "rung_loss" in entry:
                rows = entry["rung_loss"]
                if not isinstance(rows, dict):
                    raise TypeError(f"{name}: rung_loss must map rung names to losses, got {rows!r}")
                rung_loss[key] = {str(r): float(x) for r, x in rows.items()}
        predictor = None
        if raw.get("predictor") is not None:
            predictor = DecoderPredictor.from_json(raw["predictor"])
        meta = raw.get("meta") or {}
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be an object, got {type(meta).__name__}")
        texts = meta.get("texts", 0)  # how many documents the sums cover: the prior's divisor (set_prior)
        if isinstance(texts, bool) or not isinstance(texts, (int, float)) or not (np.isfinite(texts) and texts >= 0):
            raise ValueError(f"meta.texts must be a count of documents, got {str(texts)[:40]!r}")
        return cls(importance, counts, source=str(raw.get("source", "profile")), meta=dict(meta),
                   loss=loss, substitute=substitute, rung_loss=rung_loss, predictor=predictor)

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically; a directory means ``DIR/profile.json``. Returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / PROFILE_NAME
        write_json_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """Read a profile (a file, or a directory holding ``profile.json``); ArtifactError if bad."""
        path = Path(path)
        if path.is_dir():
            path = path / PROFILE_NAME
        redo = "Run `swapmoe profile` again, or delete it to fall back to the ||E|| order."
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(
                f"no importance profile at {path}. Run `swapmoe profile` to make one."
            ) from None
        except (OSError, ValueError, RecursionError) as e:
            raise ArtifactError(f"{path} is not valid JSON ({str(e)[:200]}). {redo}") from e
        if not isinstance(raw, dict) or raw.get("format") != PROFILE_FORMAT:
            raise ArtifactError(f"{path} is not a swapmoe importance profile. {redo}")
        version = raw.get("schema_version")
        if not isinstance(version, int) or version > PROFILE_SCHEMA_VERSION:
            raise ArtifactError(
                f"{path} has schema version {version!r}; this runtime reads up to "
                f"{PROFILE_SCHEMA_VERSION}. {redo}"
            )
        try:
            return cls.from_json(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{path} is malformed ({type(e).__name__}: {e}). {redo}") from e

    def total_tokens(self) -> dict[LayerKey, float]:
        return {k: float(v.sum()) for k, v in self.counts.items()}

