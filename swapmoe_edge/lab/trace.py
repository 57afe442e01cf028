"""Routing traces: what the router wanted, token by token, so that residency policies can be
replayed without running the model (replay.py).

A trace is recorded under the ``full`` policy (every expert resident), so each token's
router probabilities are the unmodified model's. A lossy policy would change the hidden
states and hence later routing; a replay ignores that feedback (it prices residency, not
output quality), and says so.

File format (``numpy.savez_compressed``, one ``.npz``; shapes: L sparse layers, E experts,
V events, N tokens, D documents, R requests):

| array | shape, dtype | meaning |
|---|---|---|
| ``meta`` | 0-d str | JSON: format, version, artifact, timings, the profile (see ``TraceMeta``) |
| ``layer_names`` | [L] str | sparse layers in manifest order (``enc.L01``, ``dec.L03``...) |
| ``norms`` | [L, E] float32 | expert weight norms ‖E‖ |
| ``expert_bytes`` | [L] int64 | bytes of one expert of the layer, as stored |
| ``ev_request`` | [V] int32 | request (one runtime chunk; 0, 1, ...) of each event |
| ``ev_layer`` | [V] int16 | index into ``layer_names`` |
| ``ev_step`` | [V] int32 | 0: the encoder pass; k >= 1: decoder step k |
| ``ev_offset`` | [V+1] int64 | tokens of event v are ``ev_offset[v]:ev_offset[v+1]`` |
| ``probs`` | [N, E] float16 | unmasked router softmax of each token |
| ``x_norm`` | [N] float32 | ‖x‖ of the token entering the MoE layer (Eq. 1) |
| ``tok_doc`` | [N] int32 | document (index into ``doc_id``) of each token |
| ``doc_id``, ``doc_section`` | [D] str | the documents in stream order |

Events are in the order the runtime ran them. Padding is excluded: encoder padding by the
attention mask, decoder rows after their EOS by the generated lengths.

A top-k model (the decoder-only families) keeps every token's full softmax as Switch does; the
meta records its ``routing`` (family, k, whether the k gates are renormalised), so that a replay
routes each token to its k first choices with the model's own router (``Trace.family``).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from swapmoe_edge.core.errors import InputError
from swapmoe_edge.model.causal import causal_config
from swapmoe_edge.model.families import DEFAULT, Family, get_family
from swapmoe_edge.model.families import causal as causal_family
from swapmoe_edge.model.moe import softmax, top_k
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.runtime.facade import Runtime
from swapmoe_edge.runtime.requests import chunks

TRACE_FORMAT = "swapmoe-trace"
TRACE_VERSION = 1


@dataclass(frozen=True)
class Trace:
    meta: dict[str, Any]
    layer_names: tuple[str, ...]
    norms: np.ndarray  # [L, E]
    expert_bytes: np.ndarray  # [L]
    ev_request: np.ndarray  # [V]
    ev_layer: np.ndarray  # [V]
    ev_step: np.ndarray  # [V]
    ev_offset: np.ndarray  # [V+1]
    probs: np.ndarray  # [N, E]
    x_norm: np.ndarray  # [N]
    tok_doc: np.ndarray  # [N]
    doc_id: tuple[str, ...]
    doc_section: tuple[str, ...]

    @property
    def num_experts(self) -> int:
        return int(self.norms.shape[1])

    @property
    def num_requests(self) -> int:
        return int(self.ev_request.max()) + 1 if self.ev_request.size else 0

    def events(self) -> Iterator[tuple[int, int, int, slice]]:
        """(request, layer index, step, token slice) of every event, in order."""
        for v in range(self.ev_layer.size):
            yield (int(self.ev_request[v]), int(self.ev_layer[v]), int(self.ev_step[v]),
                   slice(int(self.ev_offset[v]), int(self.ev_offset[v + 1])))

    @property
    def top_k(self) -> int:
        """Experts a token goes to (Switch: 1)."""
        return int(self.meta.get("top_k", 1))

    def choices(self) -> np.ndarray:
        """[N, k] each token's unmasked k first choices, largest first (the router's order)."""
        return top_k(self.probs.astype(np.float32), self.top_k)

    def family(self) -> Family:
        """The model family whose router the trace's tokens went through, bound to its k."""
        routing = self.meta.get("routing") or {}
        if self.top_k == 1 and routing.get("family", DEFAULT) == DEFAULT:
            return get_family(DEFAULT)
        return causal_family.routed(self.top_k, bool(routing.get("norm_topk_prob", False)))

    def profile(self) -> Profile | None:
        """The importance profile the recording artifact had (None if it had none)."""
        raw = self.meta.get("profile")
        if not raw:
            return None
        return Profile.from_json(raw)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(
            tmp, meta=np.array(json.dumps(self.meta)), layer_names=np.array(self.layer_names),
            norms=self.norms.astype(np.float32), expert_bytes=self.expert_bytes.astype(np.int64),
            ev_request=self.ev_request.astype(np.int32), ev_layer=self.ev_layer.astype(np.int16),
            ev_step=self.ev_step.astype(np.int32), ev_offset=self.ev_offset.astype(np.int64),
            probs=self.probs.astype(np.float16), x_norm=self.x_norm.astype(np.float32),
            tok_doc=self.tok_doc.astype(np.int32), doc_id=np.array(self.doc_id, dtype=str),
            doc_section=np.array(self.doc_section, dtype=str))
        tmp.replace(path)
        return path


def load_trace(path: str | Path) -> Trace:
    """Read a trace written by ``record_trace``; InputError if it is not one."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != TRACE_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}")
        if int(meta.get("version", 0)) > TRACE_VERSION:
            raise ValueError(f"version {meta.get('version')} is newer than this runtime's {TRACE_VERSION}")
        t = Trace(meta=meta, layer_names=tuple(str(x) for x in z["layer_names"]), norms=z["norms"],
                  expert_bytes=z["expert_bytes"], ev_request=z["ev_request"], ev_layer=z["ev_layer"],
                  ev_step=z["ev_step"], ev_offset=z["ev_offset"], probs=z["probs"], x_norm=z["x_norm"],
                  tok_doc=z["tok_doc"], doc_id=tuple(str(x) for x in z["doc_id"]),
                  doc_section=tuple(str(x) for x in z["doc_section"]))
    except FileNotFoundError:
        raise InputError(f"no trace at {path}; record one with `swapmoe trace record`.") from None
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path} is not a swapmoe trace ({e}); record one with `swapmoe trace record`.") from e
    if t.ev_offset.size != t.ev_layer.size + 1 or t.ev_offset[-1] != t.probs.shape[0]:
        raise InputError(f"{path}: event offsets do not match the token arrays; the file is damaged. Record it again.")
    return t


def record_trace(artifact: str | Path, docs: Sequence[dict], out: str | Path, *, max_new_tokens: int = 32,
                 batch_size: int = 8, threads: int | None = 1, meta: dict[str, Any] | None = None,
                 quiet: bool = True) -> Trace:
    """Run ``full`` greedy generation over ``docs`` (records with ``text``; ``id``/``section``
    kept when present) in stream order, and write the routing trace to ``out``. A decoder-only
    model with a prompt template reads each document through it, as ``summarize`` does."""
    if not docs:
        raise InputError("a trace needs at least one document")
    events: list[tuple[int, int, int]] = []  # (request, layer, step)
    probs: list[np.ndarray] = []
    norms_x: list[np.ndarray] = []
    rows: list[np.ndarray] = []  # [n] row of the chunk each token belongs to
    state = {"request": 0, "steps": {}}

    with Runtime(artifact, RuntimeConfig(policy="full", budget="100%", threads=threads)) as rt:
        routing = {"family": rt.family.name, "top_k": rt.family.top_k,
                   "norm_topk_prob": bool(causal_config(rt.manifest).norm_topk_prob) if rt.decoder_only else False}
        names = [lk.name for lk in rt.sparse]
        index = {lk: i for i, lk in enumerate(rt.sparse)}

        def recording(layer, normed, logits, mask, moe):
            lk = layer.key
            step = 0
            if lk.stack == "decoder":
                step = state["steps"][lk] = state["steps"].get(lk, 0) + 1
            b, t = logits.shape[:2]
            valid = np.ones((b, t), bool) if mask is None else np.asarray(mask, bool)  # [B, T]
            p = softmax(logits)[valid]  # [n, E]
            events.append((state["request"], index[lk], step))
            probs.append(p.astype(np.float16))
            norms_x.append(np.linalg.norm(normed, axis=-1)[valid].astype(np.float32))
            rows.append(np.nonzero(valid)[0].astype(np.int32))
            return moe(layer, normed, logits, mask)

        timings = {"ttft_ms": [], "decode_ms_per_token": []}
        lengths: list[list[int]] = []  # per request: generated tokens (EOS included) of each row
        doc_of_row: list[list[int]] = []
        for i in range(0, len(docs), batch_size):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"input \d+ has \d+ tokens; truncated")
                ids, _ = rt.encode_measured([d["text"] for d in docs[i: i + batch_size]])  # as summarize sends them
            start = i
            for chunk in chunks(ids, rt.config.max_source_tokens):  # one request each, as the runtime runs them
                results = rt.generate(chunk, max_new_tokens=max_new_tokens, num_beams=1, hook=recording)
                lengths.append([len(r.token_ids) for r in results])
                doc_of_row.append(list(range(start, start + len(chunk))))
                timings["ttft_ms"].append(results[0].stats["ttft_ms"])
                timings["decode_ms_per_token"].append(results[0].stats["decode_ms_per_token"])
                state["request"] += 1
                state["steps"] = {}
                start += len(chunk)
            if not quiet:
                print(f"trace: {min(i + batch_size, len(docs))}/{len(docs)} docs", flush=True)
        expert_bytes = np.array([rt.expert_cost[lk] for lk in rt.sparse], np.int64)
        norms = np.stack([rt.norms[lk] for lk in rt.sparse]).astype(np.float32)
        profile = rt.profile.to_json() if rt.profile.source != "norms" else None
        artifact_dir = str(rt.manifest.root)

    assert state["request"] == len(lengths), (state["request"], len(lengths))
    keep_p, keep_x, keep_doc, ev, offsets = [], [], [], [], [0]
    for (req, layer, step), p, x, r in zip(events, probs, norms_x, rows):
        alive = np.ones(r.size, bool) if step == 0 else np.array(lengths[req])[r] >= step  # rows before their EOS
        if not alive.any():
            continue
        keep_p.append(p[alive])
        keep_x.append(x[alive])
        keep_doc.append(np.array(doc_of_row[req], np.int32)[r[alive]])
        ev.append((req, layer, step))
        offsets.append(offsets[-1] + int(alive.sum()))
    ev_arr = np.array(ev, np.int64).reshape(-1, 3)
    med = lambda v: float(np.median(v)) if v else 0.0  # noqa: E731
    trace = Trace(
        meta={"format": TRACE_FORMAT, "version": TRACE_VERSION, "artifact": artifact_dir,
              "documents": len(docs), "max_new_tokens": max_new_tokens, "batch_size": batch_size, "top_k": routing["top_k"],
              "routing": routing,
              "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "ttft_ms": med(timings["ttft_ms"]), "token_ms": med(timings["decode_ms_per_token"]),
              "profile": profile, **(meta or {})},
        layer_names=tuple(names), norms=norms, expert_bytes=expert_bytes,
        ev_request=ev_arr[:, 0], ev_layer=ev_arr[:, 1], ev_step=ev_arr[:, 2], ev_offset=np.array(offsets, np.int64),
        probs=np.concatenate(keep_p), x_norm=np.concatenate(keep_x), tok_doc=np.concatenate(keep_doc),
        doc_id=tuple(str(d.get("id", i)) for i, d in enumerate(docs)),
        doc_section=tuple(str(d.get("section", "")) for d in docs))
    trace.save(out)
    return trace
