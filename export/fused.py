"""Fused subgraphs: a whole encoder block, or a whole decoder step of one layer, in one graph.

Decoding one token is memory-bound, and each ONNX Runtime call costs tens of microseconds
of Python and ORT bookkeeping on top of the weights it reads: a decoder layer used to be
three calls (self-attention, cross-attention, FFN or router), now it is one. A sparse
layer's graph ends at its router: it returns the residual stream (``hidden_out``), the
normed FFN input and the router logits; the runtime adds the experts' output.

Shapes: B batch, T query tokens, S source tokens, P past tokens, L = P + T, D d_model,
H heads, K d_kv, E experts.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from . import quant
from .builder import F32, MS, BuiltGraph, GraphBuilder
from .graphs import (cross_attention_block, cross_attention_graph, cross_kv_graph, dense_ffn_block, dense_ffn_graph,
                     router_block, router_graph, self_attention_block, self_attention_graph)


PACKED_QKV = True  # decoder step graphs: q, k, v in one MatMul (bench_decode_pairs: see docs/results/decode.md)
# Layer graphs (encoder blocks, decoder steps) from ONNX Runtime's fused nodes (MultiHeadAttention,
# SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization): 18 nodes a dense decoder layer instead
# of 56. After each weight stream the caches are cold, and every small node then costs several
# microseconds (docs/results/decode.md). False: standard ONNX ops only (tests, A/B runs).
CONTRIB_OPS = True


def _model(g: GraphBuilder) -> BuiltGraph:
    built = g.model()
    if any(n.domain == MS for n in g.nodes) and not any(o.domain == MS for o in built.proto.opset_import):
        built.proto.opset_import.append(helper.make_opsetid(MS, 1))
    return built


def _ffn_or_router(g: GraphBuilder, x: str, ffn: dict, cfg, sparse: bool) -> None:
    d = cfg.d_model
    if not sparse:
        with g.sub("ffn"):
            g.output(dense_ffn_block(g, x, ffn, cfg), "hidden_out", F32, ["B", "T", d])
        return
    with g.sub("moe"):
        normed, logits = router_block(g, x, ffn, cfg)
    g.output(x, "hidden_out", F32, ["B", "T", d])  # the residual the experts' output is added to
    g.output(normed, "normed", F32, ["B", "T", d])
    g.output(logits, "router_logits", F32, ["B", "T", cfg.num_experts])


def encoder_block_graph(scope: str, attn: dict, ffn: dict, cfg, dtype: str | quant.DenseWeights, sparse: bool) -> BuiltGraph:
    """hidden[B,S,D], attn_bias[B,H,S,S] -> hidden_out (dense) or hidden_out, normed, router_logits (sparse)."""
    g = GraphBuilder(scope, dtype)
    x = g.input("hidden", F32, ["B", "S", cfg.d_model])
    bias = g.input("attn_bias", F32, ["B", cfg.num_heads, "S", "S"])
    if not CONTRIB_OPS:
        with g.sub("self_attn"):
            x = self_attention_block(g, x, bias, attn, cfg)[0]
        _ffn_or_router(g, x, ffn, cfg, sparse)
        return g.model()
    h, eps = cfg.num_heads, cfg.layer_norm_epsilon
    with g.sub("self_attn"):
        n = g.rms_norm_op(x, attn["layer_norm"], eps)
        q, k, v = (g.linear(n, attn[t], t) for t in "qkv")
        attn_out = g.linear(g.mha(q, k, v, bias, h)[0], attn["o"], "o")
    _ffn_or_router_contrib(g, x, attn_out, ffn, cfg, sparse)
    return _model(g)


def decoder_step_graph(scope: str, self_attn: dict, cross_attn: dict, ffn: dict, cfg, dtype: str | quant.DenseWeights, sparse: bool) -> BuiltGraph:
    """One decoder layer for T new tokens over a cache of P: self-attention (cache grows),
    cross-attention, then the dense FFN or the sparse layer's norm and router.

    Outputs: hidden_out, present_key/value [B,H,L,K], and if sparse normed, router_logits.
    """
    h, k, d = cfg.num_heads, cfg.d_kv, cfg.d_model
    g = GraphBuilder(scope, dtype)
    x = g.input("hidden", F32, ["B", "T", d])
    bias = g.input("attn_bias", F32, ["b", h, "T", "L"])
    past = (g.input("past_key", F32, ["B", h, "P", k]), g.input("past_value", F32, ["B", h, "P", k]))
    cross_bias = g.input("cross_bias", F32, ["B", 1, 1, "S"])
    ck = g.input("cross_key", F32, ["B", h, "S", k])
    cv = g.input("cross_value", F32, ["B", h, "S", k])
    if CONTRIB_OPS:
        key, val = _decoder_step_contrib(g, x, bias, past, cross_bias, ck, cv, self_attn, cross_attn, ffn, cfg, sparse)
    else:
        key, val = _decoder_step_standard(g, x, bias, past, cross_bias, ck, cv, self_attn, cross_attn, ffn, cfg, sparse)
    g.output(key, "present_key", F32, ["B", h, "L", k])
    g.output(val, "present_value", F32, ["B", h, "L", k])
    # Output order is the IO table's: hidden_out, present_key, present_value[, normed, router_logits].
    order = ["hidden_out", "present_key", "present_value"] + (["normed", "router_logits"] if sparse else [])
    outs = {o.name: o for o in g.outputs}
    g.outputs[:] = [outs[n] for n in order]
    return _model(g)


def _decoder_step_standard(g, x, bias, past, cross_bias, ck, cv, self_attn, cross_attn, ffn, cfg, sparse):
    """The step from standard ONNX ops (the blocks the split layout uses too)."""
    with g.sub("self_attn"):
        x, key, val = self_attention_block(g, x, bias, self_attn, cfg, past, packed_qkv=PACKED_QKV)
    with g.sub("cross_attn"):
        x = cross_attention_block(g, x, cross_bias, ck, cv, cross_attn, cfg)
    _ffn_or_router(g, x, ffn, cfg, sparse)
    return key, val


def _decoder_step_contrib(g, x, bias, past, cross_bias, ck, cv, self_attn, cross_attn, ffn, cfg, sparse):
    """The same step from ONNX Runtime's fused nodes. Each residual add is fused with the norm that
    follows it (SkipSimplifiedLayerNormalization returns the sum and the normed sum)."""
    h, k, eps = cfg.num_heads, cfg.d_kv, cfg.layer_norm_epsilon
    with g.sub("self_attn"):
        n = g.rms_norm_op(x, self_attn["layer_norm"], eps)
        qkv = g.linear(n, np.concatenate([self_attn["q"], self_attn["k"], self_attn["v"]], axis=0), "qkv")
        q, key, val = g.op("Split", [qkv, g.const([h * k] * 3)], hint="qkv/split", n_out=3, axis=-1)
        ctx, key, val = g.mha(q, key, val, bias, h, past)
        attn_out = g.linear(ctx, self_attn["o"], "o")
    with g.sub("cross_attn"):
        x, n = g.skip_rms_norm(attn_out, x, cross_attn["layer_norm"], eps)
        # MultiHeadAttention wants the bias as [B, 1, T, S]: the padding mask is the same for every query
        t = g.op("Slice", [g.op("Shape", [n], hint="bias/shape"), g.const([1]), g.const([2])], hint="bias/shape")
        shape = g.op("Concat", [g.const([1, 1]), t, g.const([1])], hint="bias/shape", axis=0)
        cbias = g.op("Expand", [cross_bias, shape], hint="bias/expand")
        ctx = g.mha(g.linear(n, cross_attn["q"], "q"), ck, cv, cbias, h)[0]
        attn_out = g.linear(ctx, cross_attn["o"], "o")
    _ffn_or_router_contrib(g, x, attn_out, ffn, cfg, sparse)
    return key, val


def _ffn_or_router_contrib(g: GraphBuilder, x: str, attn_out: str, ffn: dict, cfg, sparse: bool) -> None:
    """x + attn_out, then the dense FFN (output hidden_out) or the router (hidden_out, normed, router_logits)."""
    d, eps = cfg.d_model, cfg.layer_norm_epsilon
    if not sparse:
        with g.sub("ffn"):
            x, n = g.skip_rms_norm(attn_out, x, ffn["layer_norm"], eps)
            y = g.linear(g.act(g.linear(n, ffn["wi"], "wi"), cfg.dense_act_fn), ffn["wo"], "wo")
            g.output(g.op("Add", [x, y], hint="residual"), "hidden_out", F32, ["B", "T", d])
        return
    with g.sub("moe"):
        x, n = g.skip_rms_norm(attn_out, x, ffn["layer_norm"], eps)
        logits = g.linear(n, ffn["classifier"], "router/classifier", bias=ffn.get("classifier_bias"), keep_float=True)
    g.output(x, "hidden_out", F32, ["B", "T", d])
    g.output(n, "normed", F32, ["B", "T", d])
    g.output(logits, "router_logits", F32, ["B", "T", cfg.num_experts])


def add_layer_graphs(add, name: str, scope: str, stack: str, self_attn: dict, cross_attn: dict | None,
                     ffn: dict, cfg, dtype: str | quant.DenseWeights, sparse: bool, fuse: bool = True) -> dict[str, str]:
    """Write one layer's dense subgraphs through ``add(name, kind, graph)``; return its manifest parts.

    Fused (schema 2): encoder {"block"}; decoder {"cross_kv", "step"} (cross_kv runs once
    per request). ``fuse=False`` writes schema 1's separate parts (attn | self_attn,
    cross_attn; ffn | router), which the runtime still reads: tests and A/B benchmarks.
    ``ffn`` holds the FFN norm and wi/wo (dense) or the router classifier (sparse).
    """
    suffix = "_sparse" if sparse else ""
    if not fuse:
        return _split_layer_graphs(add, name, scope, stack, self_attn, cross_attn, ffn, cfg, dtype, sparse)
    if stack == "encoder":
        return {"block": add(f"{name}.block", f"enc_block{suffix}",
                             encoder_block_graph(scope, self_attn, ffn, cfg, dtype, sparse))}
    return {
        "cross_kv": add(f"{name}.cross_kv", "cross_kv", cross_kv_graph(f"{scope}/cross_kv", cross_attn, cfg, dtype)),
        "step": add(f"{name}.step", f"dec_step{suffix}",
                    decoder_step_graph(scope, self_attn, cross_attn, ffn, cfg, dtype, sparse)),
    }


def _split_layer_graphs(add, name, scope, stack, self_attn, cross_attn, ffn, cfg, dtype, sparse) -> dict[str, str]:
    parts: dict[str, str] = {}
    if stack == "encoder":
        parts["attn"] = add(f"{name}.attn", "attn", self_attention_graph(f"{scope}/self_attn", self_attn, cfg, dtype, with_cache=False))
    else:
        parts["self_attn"] = add(f"{name}.self_attn", "self_attn", self_attention_graph(f"{scope}/self_attn", self_attn, cfg, dtype, with_cache=True))
        parts["cross_kv"] = add(f"{name}.cross_kv", "cross_kv", cross_kv_graph(f"{scope}/cross_kv", cross_attn, cfg, dtype))
        parts["cross_attn"] = add(f"{name}.cross_attn", "cross_attn", cross_attention_graph(f"{scope}/cross_attn", cross_attn, cfg, dtype))
    if sparse:
        parts["router"] = add(f"{name}.router", "router", router_graph(f"{scope}/moe", ffn, cfg, dtype))
    else:
        parts["ffn"] = add(f"{name}.ffn", "ffn", dense_ffn_graph(f"{scope}/ffn", ffn, cfg, dtype))
    return parts
