"""The Switch Transformer's subgraphs, one function per block kind (the layers they are
made of are GraphBuilder's, builder.py).

Shapes: B batch, T query tokens, S source (encoder) tokens, P past tokens, D d_model,
H heads, K d_kv, F d_ff, E experts, V vocab, N routed tokens.

Weights come in as numpy arrays in PyTorch layout (``[out, in]`` for linear layers) and
are stored transposed (``[in, out]``) so every projection is one MatMul. Node names are
hierarchical (``/decoder/block.5/self_attn/q/MatMul``) so profiles read well.

``dtype`` of a dense subgraph is a storage type name or a ``quant.DenseWeights`` (``--dtype
int8|int4``: every MatMul weight but the router's as MatMulNBits, GraphBuilder.linear).
"""

from __future__ import annotations

import math

import numpy as np

from . import ladder, quant
from .builder import F32, I8, I64, OPSET, BuiltGraph, GraphBuilder, tensor_type


def embed_graph(shared: np.ndarray, dtype: str | quant.DenseWeights) -> BuiltGraph:
    """ids -> the embedding rows in float32. A float16 table is gathered first and only its rows
    cast: ONNX Runtime folds a Cast of the whole table into a float32 copy of it at load."""
    g = GraphBuilder("/embed", dtype)
    ids = g.input("input_ids", I64, ["B", "T"])
    w = g.weight("shared.weight", np.asarray(shared, dtype=g.storage), raw=True)
    rows = g.op("Gather", [w, ids], hint="gather", axis=0)
    if g.storage != np.float32:
        rows = g.op("Cast", [rows], hint="gather/cast", to=F32)
    g.output(rows, "hidden", F32, ["B", "T", shared.shape[1]])
    return g.model()


def relative_position_buckets(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bucket for every relative position r in [-max_distance, max_distance].

    HF's ``_relative_position_bucket`` in numpy, in float32 like HF's torch code (a test
    compares the two over many settings), so export needs no torch.
    """
    rel = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) where the exact branch applies
        scaled = np.log(rel.astype(np.float32) / np.float32(max_exact))
        scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
        large = max_exact + np.where(np.isfinite(scaled), scaled, 0).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(rel < max_exact, rel, large)


def position_bias_graph(scope: str, bias_weight: np.ndarray, bucket_table: np.ndarray, max_distance: int, dtype: str | quant.DenseWeights) -> BuiltGraph:
    """rel_pos[Q, K] (memory - query position) -> bias[1, H, Q, K].

    ``bucket_table[r + max_distance]`` is HF's bucket for relative position r, computed at
    export by HF's own function, so the runtime reproduces it bit for bit; positions
    beyond +-max_distance share the edge buckets, as in HF.
    """
    g = GraphBuilder(scope, dtype)
    rel = g.input("rel_pos", I64, ["Q", "K"])
    shifted = g.op("Add", [rel, g.const(np.int64(max_distance))], hint="shift")
    clipped = g.op("Clip", [shifted, g.const(np.int64(0)), g.const(np.int64(2 * max_distance))], hint="clip")
    table = g.const(bucket_table.astype(np.int64), np.int64, "bucket_table")
    buckets = g.op("Gather", [table, clipped], hint="bucket", axis=0)
    w = g.weight("relative_attention_bias.weight", bias_weight)
    vals = g.op("Gather", [w, buckets], hint="bias", axis=0)  # [Q, K, H]
    out = g.op("Unsqueeze", [g.op("Transpose", [vals], hint="bias", perm=[2, 0, 1]), g.const([0])], hint="bias")
    g.output(out, "bias", F32, [1, bias_weight.shape[1], "Q", "K"])
    return g.model()


def self_attention_block(g: GraphBuilder, x: str, bias: str, w: dict, cfg, past: tuple[str, str] | None = None,
                         packed_qkv: bool = False) -> tuple[str, str, str]:
    """x + SelfAttention(LayerNorm(x)) -> (out, key, value); ``past`` (key, value) is concatenated first.

    ``packed_qkv``: one MatMul over [q | k | v] (one longer weight stream for a decoded token)
    then a Split, instead of three MatMuls.
    """
    h, k = cfg.num_heads, cfg.d_kv
    n = g.rms_norm(x, w["layer_norm"], cfg.layer_norm_epsilon)
    if packed_qkv:
        qkv = g.linear(n, np.concatenate([w["q"], w["k"], w["v"]], axis=0), "qkv")  # [B, T, 3*H*K]
        q, key, val = (g.heads(t, h, k, name) for t, name in
                       zip(g.op("Split", [qkv, g.const([h * k] * 3)], hint="qkv/split", n_out=3, axis=-1), "qkv"))
    else:
        q = g.heads(g.linear(n, w["q"], "q"), h, k, "q")
        key = g.heads(g.linear(n, w["k"], "k"), h, k, "k")
        val = g.heads(g.linear(n, w["v"], "v"), h, k, "v")
    if past is not None:
        key = g.op("Concat", [past[0], key], hint="cache/key", axis=2)
        val = g.op("Concat", [past[1], val], hint="cache/value", axis=2)
    ctx = g.attend(q, key, val, bias, h, k)
    return g.op("Add", [x, g.linear(ctx, w["o"], "o")], hint="residual"), key, val


def cross_attention_block(g: GraphBuilder, x: str, bias: str, ck: str, cv: str, w: dict, cfg) -> str:
    """x + CrossAttention(LayerNorm(x)) over precomputed encoder keys and values."""
    h, k = cfg.num_heads, cfg.d_kv
    n = g.rms_norm(x, w["layer_norm"], cfg.layer_norm_epsilon)
    q = g.heads(g.linear(n, w["q"], "q"), h, k, "q")
    ctx = g.attend(q, ck, cv, bias, h, k)
    return g.op("Add", [x, g.linear(ctx, w["o"], "o")], hint="residual")


def dense_ffn_block(g: GraphBuilder, x: str, w: dict, cfg) -> str:
    n = g.rms_norm(x, w["layer_norm"], cfg.layer_norm_epsilon)
    y = g.linear(g.act(g.linear(n, w["wi"], "wi"), cfg.dense_act_fn), w["wo"], "wo")
    return g.op("Add", [x, y], hint="residual")


def router_block(g: GraphBuilder, x: str, w: dict, cfg) -> tuple[str, str]:
    """The sparse layer's pre-FFN norm and router logits -> (normed, logits)."""
    n = g.rms_norm(x, w["layer_norm"], cfg.layer_norm_epsilon)
    return n, g.linear(n, w["classifier"], "router/classifier", bias=w.get("classifier_bias"), keep_float=True)


def self_attention_graph(scope: str, w: dict, cfg, dtype: str | quant.DenseWeights, with_cache: bool) -> BuiltGraph:
    """hidden + SelfAttention(LayerNorm(hidden)); with_cache adds past/present key and value."""
    h, k, d = cfg.num_heads, cfg.d_kv, cfg.d_model
    g = GraphBuilder(scope, dtype)
    x = g.input("hidden", F32, ["B", "T", d])
    bias = g.input("attn_bias", F32, ["b", h, "T", "L"])
    past = (g.input("past_key", F32, ["B", h, "P", k]), g.input("past_value", F32, ["B", h, "P", k])) if with_cache else None
    out, key, val = self_attention_block(g, x, bias, w, cfg, past)
    g.output(out, "hidden_out", F32, ["B", "T", d])
    if with_cache:
        g.output(key, "present_key", F32, ["B", h, "L", k])
        g.output(val, "present_value", F32, ["B", h, "L", k])
    return g.model()


def cross_kv_graph(scope: str, w: dict, cfg, dtype: str | quant.DenseWeights) -> BuiltGraph:
    """Encoder output -> this layer's cross-attention keys and values, computed once per request."""
    h, k, d = cfg.num_heads, cfg.d_kv, cfg.d_model
    g = GraphBuilder(scope, dtype)
    enc = g.input("encoder_hidden", F32, ["B", "S", d])
    g.output(g.heads(g.linear(enc, w["k"], "k"), h, k, "k"), "cross_key", F32, ["B", h, "S", k])
    g.output(g.heads(g.linear(enc, w["v"], "v"), h, k, "v"), "cross_value", F32, ["B", h, "S", k])
    return g.model()


def cross_attention_graph(scope: str, w: dict, cfg, dtype: str | quant.DenseWeights) -> BuiltGraph:
    h, k, d = cfg.num_heads, cfg.d_kv, cfg.d_model
    g = GraphBuilder(scope, dtype)
    x = g.input("hidden", F32, ["B", "T", d])
    bias = g.input("cross_bias", F32, ["B", 1, 1, "S"])
    ck = g.input("cross_key", F32, ["B", h, "S", k])
    cv = g.input("cross_value", F32, ["B", h, "S", k])
    g.output(cross_attention_block(g, x, bias, ck, cv, w, cfg), "hidden_out", F32, ["B", "T", d])
    return g.model()


def dense_ffn_graph(scope: str, w: dict, cfg, dtype: str | quant.DenseWeights) -> BuiltGraph:
    d = cfg.d_model
    g = GraphBuilder(scope, dtype)
    x = g.input("hidden", F32, ["B", "T", d])
    g.output(dense_ffn_block(g, x, w, cfg), "hidden_out", F32, ["B", "T", d])
    return g.model()


def router_graph(scope: str, w: dict, cfg, dtype: str | quant.DenseWeights) -> BuiltGraph:
    """The sparse layer's pre-FFN norm and router logits; experts and the residual run outside."""
    d, e = cfg.d_model, cfg.num_experts
    g = GraphBuilder(scope, dtype)
    x = g.input("hidden", F32, ["B", "T", d])
    n, logits = router_block(g, x, w, cfg)
    g.output(n, "normed", F32, ["B", "T", d])
    g.output(logits, "router_logits", F32, ["B", "T", e])
    return g.model()


def expert_graph(scope: str, wi: np.ndarray, wo: np.ndarray, act: str, dtype: str, location: str, offsets: tuple[int, int]) -> BuiltGraph:
    """x[N, D] -> act(x wi) wo, weights external in one file at the given byte offsets."""
    g = GraphBuilder(scope, dtype)
    x = g.input("x", F32, ["N", wi.shape[1]])
    hid = g.act(g.linear(x, wi, "wi", external={"location": location, "offset": offsets[0]}), act)
    y = g.linear(hid, wo, "wo", external={"location": location, "offset": offsets[1]})
    g.output(y, "y", F32, ["N", wo.shape[0]])
    return g.model()


def expert_kernel_graph(d_model: int, d_ff: int, act: str, dtype: str) -> BuiltGraph:
    """The expert computation with its weights as inputs: one session serves every expert.

    x[N, D], wi[D, F], wo[F, D] (storage dtype; int8 adds wi_scale[F], wo_scale[D]) -> y[N, D].
    int4: MatMulNBits' layout, wi[F, D/32, 16] and wo[D, F/32, 16] uint8 with float32 scales
    wi_scale[F, D/32], wo_scale[D, F/32] (export/ladder.py).
    The runtime holds each resident expert as plain arrays read straight from its weight block.
    """
    if dtype == "int4":  # the int4 rung's layout and standard-op kernel (ladder.int4_expert)
        return ladder.kernel_graph(d_model, d_ff, act, "int4")
    g = GraphBuilder("/expert_kernel", dtype)
    x = g.input("x", F32, ["N", d_model])
    if dtype == "int8":
        wi = g.dequantize(g.input("wi", I8, [d_model, d_ff]), g.input("wi_scale", F32, [d_ff]), "wi")
        wo = g.dequantize(g.input("wo", I8, [d_ff, d_model]), g.input("wo_scale", F32, [d_model]), "wo")
    else:
        elem = tensor_type(dtype)
        wi, wo = g.input("wi", elem, [d_model, d_ff]), g.input("wo", elem, [d_ff, d_model])
        if elem != F32:
            wi = g.op("Cast", [wi], hint="wi/cast", to=F32)
            wo = g.op("Cast", [wo], hint="wo/cast", to=F32)
    hid = g.act(g.op("MatMul", [x, wi], hint="wi"), act)
    g.output(g.op("MatMul", [hid, wo], hint="wo"), "y", F32, ["N", d_model])
    return g.model(OPSET)


def expert_int8_graph(scope: str, tensors: dict, act: str, location: str, offsets: dict) -> BuiltGraph:
    """x[N, D] -> act(x dq(wi)) dq(wo) with int8 weights and per-column scales, all external."""
    g = GraphBuilder(scope, "int8")
    d = tensors["wi"].shape[0]
    x = g.input("x", F32, ["N", d])

    def dq(name: str) -> str:
        q = g.weight(f"{name}.weight", tensors[name], {"location": location, "offset": offsets[name]}, raw=True)
        s = g.weight(f"{name}.scale", tensors[f"{name}_scale"], {"location": location, "offset": offsets[f"{name}_scale"]}, raw=True)
        return g.dequantize(q, s, name)

    hid = g.act(g.op("MatMul", [x, dq("wi")], hint="wi"), act)
    g.output(g.op("MatMul", [hid, dq("wo")], hint="wo"), "y", F32, ["N", d])
    return g.model()


def final_norm_graph(scope: str, weight: np.ndarray, cfg, dtype: str | quant.DenseWeights) -> BuiltGraph:
    g = GraphBuilder(scope, dtype)
    x = g.input("hidden", F32, ["B", "T", cfg.d_model])
    g.output(g.rms_norm(x, weight, cfg.layer_norm_epsilon, "final_layer_norm"), "hidden_out", F32, ["B", "T", cfg.d_model])
    return g.model()


def lm_head_graph(norm_weight: np.ndarray, lm_head: np.ndarray, cfg, dtype: str | quant.DenseWeights, fused: bool = False) -> BuiltGraph:
    """Decoder final norm, the tied-embedding rescale HF applies, and the vocabulary projection.

    ``fused`` (schema 2 with ORT's fused nodes): the norm as one node and the projection as one
    MatMul over a [D, V] copy (no reshapes around a Gemm; paired on switch-base-8, the head alone
    took 0.96x the Gemm's time). The transposed copy costs one more [V, D] array while exporting;
    at load ORT prepacks either layout into a buffer of the same size.
    """
    g = GraphBuilder("/lm_head", dtype)
    x = g.input("hidden", F32, ["B", "T", cfg.d_model])
    norm = g.rms_norm_op if fused else g.rms_norm
    n = norm(x, norm_weight, cfg.layer_norm_epsilon, "decoder/final_layer_norm")
    if cfg.tie_word_embeddings:
        n = g.op("Mul", [n, g.const(np.float32(cfg.d_model ** -0.5), np.float32, "scale")], hint="tied_rescale")
    if g.nbits:  # MatMulNBits takes [B, T, D] as it is, whatever the layout
        g.output(g.matmul_nbits(n, lm_head, "lm_head", g.nbits.lm_head_bits), "logits", F32, ["B", "T", cfg.vocab_size])
        return g.model()
    if fused:
        y = g.op("MatMul", [n, g.weight("lm_head.weight", np.ascontiguousarray(lm_head.T))], hint="lm_head")
        g.output(y, "logits", F32, ["B", "T", cfg.vocab_size])
        return g.model()
    # Kept as [V, D] (PyTorch layout) and used by Gemm with transB: a transposed copy
    # would cost another 100 MB at switch-base size, at export and again at load.
    w = g.weight("lm_head.weight", lm_head)
    flat = g.op("Reshape", [n, g.const([-1, cfg.d_model])], hint="lm_head/flatten")
    y = g.op("Gemm", [flat, w], hint="lm_head", transB=1)  # [B*T, V]
    bt = g.op("Slice", [g.op("Shape", [n], hint="lm_head/shape"), g.const([0]), g.const([2])], hint="lm_head/shape")
    shape = g.op("Concat", [bt, g.const([cfg.vocab_size])], hint="lm_head/shape", axis=0)
    g.output(g.op("Reshape", [y, shape], hint="lm_head/unflatten"), "logits", F32, ["B", "T", cfg.vocab_size])
    return g.model()


# Tensor names each kind of subgraph takes and gives (recorded in the manifest).
IO = {
    "embed": (("input_ids",), ("hidden",)),
    "position_bias": (("rel_pos",), ("bias",)),
    "attn": (("hidden", "attn_bias"), ("hidden_out",)),
    "self_attn": (("hidden", "attn_bias", "past_key", "past_value"), ("hidden_out", "present_key", "present_value")),
    "cross_kv": (("encoder_hidden",), ("cross_key", "cross_value")),
    "cross_attn": (("hidden", "cross_bias", "cross_key", "cross_value"), ("hidden_out",)),
    "ffn": (("hidden",), ("hidden_out",)),
    "router": (("hidden",), ("normed", "router_logits")),
    "expert": (("x",), ("y",)),
    "expert_kernel": (("x", "wi", "wo"), ("y",)),
    "expert_kernel_int8": (("x", "wi", "wi_scale", "wo", "wo_scale"), ("y",)),
    "expert_kernel_int4": (("x", "wi", "wi_scale", "wo", "wo_scale"), ("y",)),
    "rung_kernel": (("x", "wi", "wi_scale", "wo", "wo_scale"), ("y",)),  # ladder.py
    "final_norm": (("hidden",), ("hidden_out",)),
    # fused.py: one session per layer (schema 2)
    "enc_block": (("hidden", "attn_bias"), ("hidden_out",)),
    "enc_block_sparse": (("hidden", "attn_bias"), ("hidden_out", "normed", "router_logits")),
    "dec_step": (("hidden", "attn_bias", "past_key", "past_value", "cross_bias", "cross_key", "cross_value"),
                 ("hidden_out", "present_key", "present_value")),
    "dec_step_sparse": (("hidden", "attn_bias", "past_key", "past_value", "cross_bias", "cross_key", "cross_value"),
                        ("hidden_out", "present_key", "present_value", "normed", "router_logits")),
    "lm_head": (("hidden",), ("logits",)),
}
