"""What one decoded token must read, from the manifest: the floor that decode speed is judged by.

Decoding one token of one row is memory-bound: every weight it touches is read once and
used for one multiply-add. So ``bytes_per_token / streaming_bandwidth`` is the least time
a token can take on a machine, whatever the code (the "floor"); ``scripts/bench_decode.py``
measures the bandwidth and sets our decode time against it.

The bytes are the artifact's files as stored, so a model whose dense weights are int8 or int4
(MatMulNBits blocks and their scales) is held to its own, lower floor; and each sparse layer
reads its family's ``top_k`` experts (Switch: 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from swapmoe_edge.artifact.manifest import Manifest
from swapmoe_edge.model.families import family_of

_ITEMSIZE = {"float32": 4, "float16": 2}


@dataclass(frozen=True)
class TokenBytes:
    """Bytes one greedy decoding step of one row reads, by part kind.

    ``weights``: subgraph files of the decoder layers (cross_kv excluded: it runs once per
    request), the top-k experts of each sparse decoder layer (key ``expert (top-1)`` for k = 1,
    ``experts (top-K)`` above), the LM head, one embedding row.
    ``cache_per_past_token``: self-attention K and V bytes read per cached token; the
    cross-attention cache adds the same per source token.
    """

    weights: dict[str, int]
    cache_per_past_token: int
    ort_calls: int  # ONNX Runtime calls per token: dense subgraphs + one expert per sparse layer

    @property
    def total(self) -> int:
        return sum(self.weights.values())

    def cache_bytes(self, past: int, source: int) -> int:
        return self.cache_per_past_token * (past + source)


def _file_bytes(m: Manifest, rel: str) -> int:
    return sum(m.files[f].size for f in (rel, rel + ".data") if f in m.files)


def bytes_per_token(m: Manifest, rung: str | None = None) -> TokenBytes:
    """``rung``: the experts run as their ladder copies on that rung (the ``ladder`` policy with
    low-bit copies only), so their bytes are the copies'."""
    c = m.config
    k = family_of(m).top_k
    experts = "expert (top-1)" if k == 1 else f"experts (top-{k})"
    weights: dict[str, int] = {}
    calls = 2  # embedding and LM head (the position bias comes from a table made once)
    for layer in m.stack_layers("decoder"):
        for role, name in layer.parts.items():
            if role == "cross_kv":
                continue
            weights[role] = weights.get(role, 0) + _file_bytes(m, m.subgraphs[name].file)
            calls += 1
        if layer.sparse:  # experts of one layer have one size; k of them (or all, if fewer)
            chosen = layer.experts[:k]
            size = [m.experts[e].rungs[rung].nbytes if rung else m.experts[e].nbytes for e in chosen]
            weights[experts] = weights.get(experts, 0) + sum(size)
            calls += len(chosen)
    weights["lm_head"] = _file_bytes(m, m.subgraphs["lm_head"].file)
    weights["embed (one row)"] = c.d_model * _ITEMSIZE.get(m.dtype, 4)
    cache = len(m.stack_layers("decoder")) * 2 * c.num_heads * c.d_kv * 4  # K and V, float32
    return TokenBytes(weights, cache, calls)
