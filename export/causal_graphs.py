"""The subgraphs of a decoder-only top-k MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE),
made of GraphBuilder's layers (builder.py), op for op as transformers 5 computes them.

One "step" graph per layer runs everything up to the routed experts: RMSNorm, q/k/v (biases,
q/k norms and clipping where the model has them), rotary positions from ``position_ids``,
grouped-query attention over the KV cache passed in and out, the residual, the post-attention
norm, the router logits and, where the model has one, the gated shared expert. The runtime
adds the routed experts' sum (model/causal.py).

Shapes: B batch, T new tokens, P cached tokens, L = P + T, D hidden, H heads, Hk key/value
heads, G = H / Hk, Dh head dim, F expert width, E experts, V vocabulary, N routed tokens.
Weights come in PyTorch layout ([out, in]); GraphBuilder.linear stores them [in, out].

``dtype`` a quant.DenseWeights with bits (``--dtype int8|int4``): q/k/v/o, the shared expert's
gate/up/down and the LM head are com.microsoft.MatMulNBits (GraphBuilder.linear); the embedding,
the norms, the router and the shared expert's one-column gate stay floating point.
"""

from __future__ import annotations

import numpy as np

from swapmoe_edge.artifact.causal_config import CausalConfig

from . import ladder, quant
from .builder import F32, I8, I64, OPSET, BuiltGraph, GraphBuilder, tensor_type


def inv_freq(cfg: CausalConfig) -> np.ndarray:
    """HF's default rotary inverse frequencies [Dh/2] in float32, by torch's own arithmetic where it is installed."""
    dh = cfg.head_dim
    try:
        import torch  # deferred: export runs without torch; with it the frequencies are HF's bit for bit
    except ImportError:
        return (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), np.arange(0, dh, 2, dtype=np.float32) / np.float32(dh))).astype(np.float32)
    return (1.0 / (cfg.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.int64).to(dtype=torch.float) / dh))).numpy()


def swiglu(g: GraphBuilder, h: str, f: int) -> str:
    """h [N, 2F] (gate | up) -> silu(gate) * up [N, F]."""
    gate, up = g.op("Split", [h, g.const([f, f])], hint="swiglu", n_out=2, axis=-1)
    return g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], hint="silu")], hint="silu"), up], hint="swiglu")


def _rope(g: GraphBuilder, pos: str, cfg: CausalConfig) -> tuple[str, str]:
    """position_ids [B, T] -> cos, sin [B, 1, T, Dh] (HF: emb = cat(freqs, freqs))."""
    p = g.op("Unsqueeze", [g.op("Cast", [pos], hint="rope/pos", to=F32), g.const([-1])], hint="rope/pos")  # [B, T, 1]
    freqs = g.op("Mul", [p, g.const(inv_freq(cfg), np.float32, "rope/inv_freq")], hint="rope/freqs")  # [B, T, Dh/2]
    emb = g.op("Unsqueeze", [g.op("Concat", [freqs, freqs], hint="rope/emb", axis=-1), g.const([1])], hint="rope/emb")
    return g.op("Cos", [emb], hint="rope/cos"), g.op("Sin", [emb], hint="rope/sin")


def _rotate(g: GraphBuilder, x: str, cos: str, sin: str, dh: int, hint: str) -> str:
    """x * cos + rotate_half(x) * sin on x [B, H, T, Dh]."""
    x1, x2 = g.op("Split", [x, g.const([dh // 2, dh // 2])], hint=f"{hint}/rotate_half", n_out=2, axis=-1)
    rot = g.op("Concat", [g.op("Neg", [x2], hint=f"{hint}/rotate_half"), x1], hint=f"{hint}/rotate_half", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], hint=f"{hint}/rope"), g.op("Mul", [rot, sin], hint=f"{hint}/rope")], hint=f"{hint}/rope")


def _project(g: GraphBuilder, n: str, w: dict, name: str, heads: int, cfg: CausalConfig) -> str:
    """n [B, T, D] -> q or k [B, heads, T, Dh], with the model's norm and clip."""
    eps, dh = cfg.rms_norm_eps, cfg.head_dim
    y = g.linear(n, w[name], f"{name}_proj", bias=w.get(f"{name}_bias"))
    if cfg.qk_norm == "full" and name in "qk":  # OLMoE: over the whole projection, before the clip
        y = g.rms_norm(y, w[f"{name}_norm"], eps, f"{name}_norm")
    if cfg.clip_qkv is not None:
        c = np.float32(cfg.clip_qkv)
        y = g.op("Clip", [y, g.const(-c, np.float32), g.const(c, np.float32)], hint=f"{name}/clip")
    y = g.op("Reshape", [y, g.const([0, 0, heads, dh])], hint=f"{name}/split_heads")  # [B, T, heads, Dh]
    if cfg.qk_norm == "head" and name in "qk":  # Qwen3-MoE: per head, over Dh
        y = g.rms_norm(y, w[f"{name}_norm"], eps, f"{name}_norm")
    return g.op("Transpose", [y], hint=f"{name}/split_heads", perm=[0, 2, 1, 3])


def _repeat_kv(g: GraphBuilder, x: str, cfg: CausalConfig, hint: str) -> str:
    """[B, Hk, L, Dh] -> [B, H, L, Dh], each key/value head serving G query heads in a row (HF's repeat_kv)."""
    groups = cfg.num_heads // cfg.num_kv_heads
    if groups == 1:
        return x
    x5 = g.op("Expand", [g.op("Unsqueeze", [x, g.const([2])], hint=hint), g.const([1, 1, groups, 1, 1])], hint=hint)
    return g.op("Reshape", [x5, g.const([0, cfg.num_heads, -1, cfg.head_dim])], hint=hint)


def _mlp(g: GraphBuilder, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray, name: str) -> str:
    """A dense SwiGLU MLP (the shared expert) with its weights in the graph."""
    h = g.linear(x, np.concatenate([gate, up], axis=0), f"{name}/gate_up_proj")  # MatMulNBits: per output column
    return g.linear(swiglu(g, h, gate.shape[0]), down, f"{name}/down_proj")


def step_graph(scope: str, w: dict, router: np.ndarray, shared: dict | None, cfg: CausalConfig,
               dtype: str | quant.DenseWeights) -> BuiltGraph:
    """hidden, position_ids, attn_bias, past_key, past_value -> hidden_out (residual + attention
    [+ the gated shared expert]), present_key, present_value, normed, router_logits."""
    d, hk, dh, e = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts
    g = GraphBuilder(scope, dtype)
    x = g.input("hidden", F32, ["B", "T", d])
    pos = g.input("position_ids", I64, ["B", "T"])
    bias = g.input("attn_bias", F32, ["B", 1, "T", "L"])
    past_k = g.input("past_key", F32, ["B", hk, "P", dh])
    past_v = g.input("past_value", F32, ["B", hk, "P", dh])
    with g.sub("self_attn"):
        n = g.rms_norm(x, w["input_layernorm"], cfg.rms_norm_eps, "input_layernorm")
        cos, sin = _rope(g, pos, cfg)
        q = _rotate(g, _project(g, n, w, "q", cfg.num_heads, cfg), cos, sin, dh, "q")  # [B, H, T, Dh]
        k = _rotate(g, _project(g, n, w, "k", hk, cfg), cos, sin, dh, "k")  # [B, Hk, T, Dh]
        v = g.linear(n, w["v"], "v_proj", bias=w.get("v_bias"))
        if cfg.clip_qkv is not None:
            c = np.float32(cfg.clip_qkv)
            v = g.op("Clip", [v, g.const(-c, np.float32), g.const(c, np.float32)], hint="v/clip")
        v = g.heads(v, hk, dh, "v")  # [B, Hk, T, Dh]
        key = g.op("Concat", [past_k, k], hint="cache/key", axis=2)  # [B, Hk, L, Dh]
        val = g.op("Concat", [past_v, v], hint="cache/value", axis=2)
        kt = g.op("Transpose", [_repeat_kv(g, key, cfg, "repeat_kv/key")], hint="attn/kT", perm=[0, 1, 3, 2])
        scores = g.op("Mul", [g.op("MatMul", [q, kt], hint="attn/scores"), g.const(np.float32(dh ** -0.5), np.float32, "scaling")],
                      hint="attn/scale")  # [B, H, T, L]
        probs = g.op("Softmax", [g.op("Add", [scores, bias], hint="attn/mask")], hint="attn/softmax", axis=-1)
        ctx = g.op("MatMul", [probs, _repeat_kv(g, val, cfg, "repeat_kv/value")], hint="attn/context")  # [B, H, T, Dh]
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], hint="attn/merge_heads", perm=[0, 2, 1, 3]),
                               g.const([0, 0, cfg.num_heads * dh])], hint="attn/merge_heads")
        h = g.op("Add", [x, g.linear(ctx, w["o"], "o_proj", bias=w.get("o_bias"))], hint="residual")
    with g.sub("mlp"):
        normed = g.rms_norm(h, w["post_attention_layernorm"], cfg.rms_norm_eps, "post_attention_layernorm")
        logits = g.linear(normed, router, "gate", keep_float=True)  # [B, T, E]
        if shared is not None:  # Qwen2-MoE: sigmoid(normed . gate_weight) * SwiGLU(normed)
            s = _mlp(g, normed, shared["gate"], shared["up"], shared["down"], "shared_expert")
            sg = g.op("Sigmoid", [g.linear(normed, shared["gate_weight"], "shared_expert_gate", keep_float=True)], hint="shared_expert_gate")
            h = g.op("Add", [h, g.op("Mul", [sg, s], hint="shared_expert")], hint="shared_expert/residual")
    g.output(h, "hidden_out", F32, ["B", "T", d])
    g.output(key, "present_key", F32, ["B", hk, "L", dh])
    g.output(val, "present_value", F32, ["B", hk, "L", dh])
    g.output(normed, "normed", F32, ["B", "T", d])
    g.output(logits, "router_logits", F32, ["B", "T", e])
    return g.model()


def lm_head_graph(norm: np.ndarray, lm_head: np.ndarray, cfg: CausalConfig, dtype: str | quant.DenseWeights) -> BuiltGraph:
    """hidden [B, T, D] -> the final RMSNorm -> logits [B, T, V] (MatMulNBits at the LM head's own width where low-bit)."""
    g = GraphBuilder("/lm_head", dtype)
    x = g.input("hidden", F32, ["B", "T", cfg.hidden_size])
    n = g.rms_norm(x, norm, cfg.rms_norm_eps, "model/norm")
    y = g.matmul_nbits(n, lm_head, "lm_head", g.nbits.lm_head_bits) if g.nbits else g.linear(n, lm_head, "lm_head")
    g.output(y, "logits", F32, ["B", "T", cfg.vocab_size])
    return g.model()


def _expert_weights(g: GraphBuilder, dtype: str, d: int, f: int, get) -> tuple[str, str]:
    """wi [D, 2F] and wo [F, D] as float32 tensor names, dequantised where stored as int8/int4;
    ``get(role)`` adds one stored array (a weight or an input) and returns its name."""
    if dtype == "int8":
        return g.dequantize(get("wi"), get("wi_scale"), "wi"), g.dequantize(get("wo"), get("wo_scale"), "wo")
    wi, wo = get("wi"), get("wo")
    if dtype != "float32":
        wi, wo = g.op("Cast", [wi], hint="wi/cast", to=F32), g.op("Cast", [wo], hint="wo/cast", to=F32)
    return wi, wo


def expert_graph(scope: str, parts: dict, dtype: str, location: str, offsets: dict,
                 accuracy_level: int = quant.INT4_ACCURACY) -> BuiltGraph:
    """One expert alone: x [N, D] -> SwiGLU(x wi) wo, its stored arrays external in its weight block
    (int4: two MatMulNBits at ``accuracy_level``)."""
    if dtype == "int4":  # MatMulNBits (ladder.int4_expert): wi [2F, D/32, 16], wo [D, F/32, 16]
        d, f = parts["wo"].shape[0], parts["wi"].shape[0] // 2
        return ladder.int4_expert_graph(scope, d, f, "swiglu", parts, offsets, location, accuracy_level)
    g = GraphBuilder(scope, dtype)
    d, f = parts["wi"].shape[0], parts["wo"].shape[0]
    x = g.input("x", F32, ["N", d])

    def get(role: str) -> str:
        return g.weight(quant.TENSOR_LEAF[role], parts[role], {"location": location, "offset": offsets[role]}, raw=True)

    wi, wo = _expert_weights(g, dtype, d, f, get)
    y = g.op("MatMul", [swiglu(g, g.op("MatMul", [x, wi], hint="wi"), f), wo], hint="wo")
    g.output(y, "y", F32, ["N", d])
    return g.model(OPSET)


def kernel_graph(d: int, f: int, dtype: str) -> BuiltGraph:
    """The expert computation with its weights as inputs (one session runs every expert):
    x [N, D], wi [D, 2F], wo [F, D] in the storage type (int8: + wi_scale [2F], wo_scale [D];
    int4: MatMulNBits' layout, ladder.int4_expert)."""
    if dtype == "int4":  # the int4 rung's layout and standard-op kernel
        return ladder.kernel_graph(d, f, "swiglu", "int4")
    g = GraphBuilder("/expert_kernel", dtype)
    x = g.input("x", F32, ["N", d])
    n = 2 * f
    if dtype == "int8":
        shapes = {"wi": (I8, [d, n]), "wi_scale": (F32, [n]), "wo": (I8, [f, d]), "wo_scale": (F32, [d])}
    else:
        shapes = {"wi": (tensor_type(dtype), [d, n]), "wo": (tensor_type(dtype), [f, d])}
    wi, wo = _expert_weights(g, dtype, d, f, lambda role: g.input(role, *shapes[role]))
    g.output(g.op("MatMul", [swiglu(g, g.op("MatMul", [x, wi], hint="wi"), f), wo], hint="wo"), "y", F32, ["N", d])
    return g.model(OPSET)
