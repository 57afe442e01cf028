"""ONNX subgraph builders, one function per block kind.

Shapes: B batch, T query tokens, S source (encoder) tokens, P past tokens, D d_model,
H heads, K d_kv, F d_ff, E experts, V vocab, N routed tokens.

Weights come in as numpy arrays in PyTorch layout (``[out, in]`` for linear layers) and
are stored transposed (``[in, out]``) so every projection is one MatMul. Node names are
hierarchical (``/decoder/block.5/self_attn/q/MatMul``) so profiles read well.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import onnx_proto as helper
from . import quant
from .onnx_proto import TensorProto

OPSET = 17
OPSET_INT4 = 18  # BitwiseAnd arrived in opset 18; only int4 expert graphs need it
MS = "com.microsoft"  # ONNX Runtime's contrib ops (fused attention and RMS norm), version 1: the
# builder that uses them adds the opset import (fused.py, ladder.py)
EXTERNAL_MIN_BYTES = 1 << 20
_NP2ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


@dataclass
class BuiltGraph:
    """A subgraph and the big weights that go beside it in ``FILE.onnx.data``."""

    proto: helper.ModelProto
    blobs: list[tuple[str, np.ndarray]]


class GraphBuilder:
    """A tiny helper that accumulates nodes and initializers for one subgraph."""

    def __init__(self, scope: str, storage_dtype: str = "float32"):
        self.scope = scope
        # int4 weights are packed uint8 and always added raw; numpy has no int4 of its own
        # (only ml_dtypes registers one, and only once something has imported it).
        self.storage = np.dtype(np.uint8 if storage_dtype == "int4" else storage_dtype)
        self.nodes: list[helper.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[helper.ValueInfoProto] = []
        self.outputs: list[helper.ValueInfoProto] = []
        self.blobs: list[tuple[str, np.ndarray]] = []
        self._n = 0

    # -- plumbing --------------------------------------------------------------------
    @contextmanager
    def sub(self, name: str):
        """Nodes and weights added inside are named under ``SCOPE/name`` (fused graphs hold several blocks)."""
        outer = self.scope
        self.scope = f"{outer}/{name}"
        try:
            yield self
        finally:
            self.scope = outer

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{self.scope}/{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, **attrs) -> str | list[str]:
        base = f"{self.scope}/{hint or op_type}"
        outs = [self._name(f"{hint or op_type}_out") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{base}/{op_type}_{self._n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64, hint: str = "const") -> str:
        name = self._name(hint)
        self.inits.append(helper.make_tensor(name, _onnx_type(np.dtype(dtype)), np.shape(value), np.asarray(value, dtype=dtype).ravel().tolist()))
        return name

    def weight(self, name: str, array: np.ndarray, external: dict | None = None, raw: bool = False) -> str:
        """Add a weight in the storage dtype; return a float32 tensor name (cast if stored as fp16).

        ``raw``: keep the array's own dtype and return it uncast (int8 weights, their scales).
        """
        arr = np.ascontiguousarray(array) if raw else np.ascontiguousarray(array, dtype=self.storage)
        full = f"{self.scope}/{name}"
        if external is None and arr.nbytes < EXTERNAL_MIN_BYTES:
            self.inits.append(helper.from_array(arr, full))
        else:
            # Big tensors never enter the protobuf: protobuf copies a message several times
            # while a model is assembled, which at switch-base size costs hundreds of MB.
            t = TensorProto()
            t.name = full
            t.data_type = _onnx_type(arr.dtype)
            t.dims.extend(arr.shape)
            t.data_location = TensorProto.EXTERNAL
            if external is None:
                self.blobs.append((full, arr))  # the writer fills in location and offset
            else:
                for k, v in (("location", external["location"]), ("offset", str(external["offset"])), ("length", str(arr.nbytes))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
            self.inits.append(t)
        if raw or arr.dtype == np.float32:
            return full
        return self.op("Cast", [full], hint=f"{name}/cast", to=TensorProto.FLOAT)

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, tensor: str, name: str, elem_type: int, shape: list) -> None:
        self.nodes.append(helper.make_node("Identity", [tensor], [name], name=f"{self.scope}/{name}/Identity"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, opset: int = OPSET) -> "BuiltGraph":
        graph = helper.make_graph(self.nodes, self.scope.strip("/").replace("/", "."), self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="swapmoe_export")
        m.ir_version = 8
        return BuiltGraph(m, self.blobs)


    # -- layers ----------------------------------------------------------------------
    def rms_norm(self, x: str, weight: np.ndarray, eps: float, hint: str = "layer_norm") -> str:
        w = self.weight(f"{hint}.weight", weight)
        sq = self.op("Mul", [x, x], hint=f"{hint}/sq")
        var = self.op("ReduceMean", [sq], hint=f"{hint}/mean", axes=[-1], keepdims=1)
        var_eps = self.op("Add", [var, self.const(np.float32(eps), np.float32, "eps")], hint=f"{hint}/eps")
        inv = self.op("Reciprocal", [self.op("Sqrt", [var_eps], hint=f"{hint}/sqrt")], hint=f"{hint}/rsqrt")
        return self.op("Mul", [w, self.op("Mul", [x, inv], hint=f"{hint}/scale")], hint=f"{hint}/weight")

    def rms_norm_op(self, x: str, weight: np.ndarray, eps: float, hint: str = "layer_norm") -> str:
        """``rms_norm`` as one ONNX Runtime node (SimplifiedLayerNormalization): x / sqrt(mean(x^2) + eps) * w."""
        w = self.weight(f"{hint}.weight", weight)
        return self.op("SimplifiedLayerNormalization", [x, w], hint=hint, axis=-1, epsilon=float(eps), stash_type=1)

    def skip_rms_norm(self, x: str, skip: str, weight: np.ndarray, eps: float, hint: str = "layer_norm") -> tuple[str, str]:
        """(x + skip, rms_norm(x + skip)) as one node: a residual add and the next block's norm."""
        w = self.weight(f"{hint}.weight", weight)
        normed, total = self._name(f"{hint}_out"), self._name(f"{hint}_sum")
        self.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, skip, w], [normed, "", "", total],
                                           name=f"{self.scope}/{hint}/SkipSimplifiedLayerNormalization_{self._n}",
                                           domain=MS, epsilon=float(eps)))
        return total, normed

    def mha(self, q: str, k: str, v: str, bias: str, h: int, past: tuple[str, str] | None = None,
            hint: str = "attn") -> list[str]:
        """softmax(q k^T + bias) v over H heads in one node (com.microsoft MultiHeadAttention), no
        1/sqrt(K) scaling. q [B,T,H*K]; k, v [B,T,H*K] (then ``past`` [B,H,P,K] is prepended and
        the grown [B,H,L,K] are returned too) or already split [B,H,S,K]; bias [B|1, H|1, T, L].
        Returns [context [B,T,H*K]] or [context, key, value]."""
        ins = [q, k, v, "", "", bias] + (list(past) if past else [])
        out = self.op("MultiHeadAttention", ins, hint=hint, n_out=3 if past else 1, domain=MS, num_heads=h, scale=1.0)
        return [out] if isinstance(out, str) else out

    def linear(self, x: str, w_torch: np.ndarray, name: str, bias: np.ndarray | None = None, external: dict | None = None) -> str:
        w = self.weight(f"{name}.weight", np.ascontiguousarray(w_torch.T), external)
        y = self.op("MatMul", [x, w], hint=name)
        if bias is not None:
            y = self.op("Add", [y, self.weight(f"{name}.bias", bias)], hint=f"{name}/bias")
        return y

    def act(self, x: str, kind: str) -> str:
        if kind == "relu":
            return self.op("Relu", [x], hint="act")
        if kind == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
            e = self.op("Erf", [self.op("Mul", [x, self.const(np.float32(1 / math.sqrt(2)), np.float32)], hint="act")], hint="act")
            return self.op("Mul", [self.op("Mul", [x, self.const(np.float32(0.5), np.float32)], hint="act"), self.op("Add", [e, self.const(np.float32(1), np.float32)], hint="act")], hint="act")
        # gelu_new / gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = self.op("Mul", [self.op("Mul", [x, x], hint="act"), x], hint="act")
        inner = self.op("Add", [x, self.op("Mul", [x3, self.const(np.float32(0.044715), np.float32)], hint="act")], hint="act")
        t = self.op("Tanh", [self.op("Mul", [inner, self.const(np.float32(math.sqrt(2 / math.pi)), np.float32)], hint="act")], hint="act")
        return self.op("Mul", [self.op("Mul", [x, self.const(np.float32(0.5), np.float32)], hint="act"), self.op("Add", [t, self.const(np.float32(1), np.float32)], hint="act")], hint="act")

    def dequantize(self, q: str, scale: str, hint: str) -> str:
        """int8 [in, out] * scale [out] in float32, as Cast and Mul.

        Not DequantizeLinear: on constant weights ORT's extended optimisations rewrite
        DequantizeLinear + MatMul into a quantised MatMul whose results differ (1.5e-2 on a
        tiny expert, against 7e-7 for this form).
        """
        return self.op("Mul", [self.op("Cast", [q], hint=f"{hint}/dequant", to=TensorProto.FLOAT), scale], hint=f"{hint}/dequant")

    def dequantize_int4(self, packed: str, scale: str, n_in: int, n_out: int, hint: str) -> str:
        """packed uint8 [in, out/2] and float16 scale [in/G, out] -> float32 w [in, out].

        Standard ops only, so every execution provider runs it; op for op what
        ``quant.dequantize_int4`` computes: (float32(n) - 8) · float32(scale) per group.
        """
        h = f"{hint}/dequant"
        lo = self.op("BitwiseAnd", [packed, self.const(np.uint8(15), np.uint8)], hint=h)  # even columns
        hi = self.op("BitShift", [packed, self.const(np.uint8(4), np.uint8)], hint=h, direction="RIGHT")  # odd
        pairs = self.op("Concat", [self.op("Unsqueeze", [x, self.const([2])], hint=h) for x in (lo, hi)], hint=h, axis=2)
        n = self.op("Reshape", [pairs, self.const([n_in, n_out])], hint=h)  # [in, out/2, 2] -> [in, out]
        q = self.op("Sub", [self.op("Cast", [n], hint=h, to=F32), self.const(np.float32(8), np.float32)], hint=h)
        groups = self.op("Reshape", [q, self.const([n_in // quant.INT4_GROUP, quant.INT4_GROUP, n_out])], hint=h)
        s = self.op("Unsqueeze", [self.op("Cast", [scale], hint=h, to=F32), self.const([1])], hint=h)  # [in/G, 1, out]
        return self.op("Reshape", [self.op("Mul", [groups, s], hint=h), self.const([n_in, n_out])], hint=h)

    def heads(self, x: str, h: int, k: int, hint: str) -> str:
        """[B, T, H*K] -> [B, H, T, K]"""
        r = self.op("Reshape", [x, self.const([0, 0, h, k])], hint=f"{hint}/split_heads")
        return self.op("Transpose", [r], hint=f"{hint}/split_heads", perm=[0, 2, 1, 3])

    def attend(self, q: str, k: str, v: str, bias: str, h: int, kdim: int) -> str:
        """softmax(q k^T + bias) v, no 1/sqrt(K) scaling (T5 folds it into the weights)."""
        scores = self.op("MatMul", [q, self.op("Transpose", [k], hint="attn/kT", perm=[0, 1, 3, 2])], hint="attn/scores")
        probs = self.op("Softmax", [self.op("Add", [scores, bias], hint="attn/bias")], hint="attn/softmax", axis=-1)
        ctx = self.op("MatMul", [probs, v], hint="attn/context")
        ctx = self.op("Transpose", [ctx], hint="attn/merge_heads", perm=[0, 2, 1, 3])
        return self.op("Reshape", [ctx, self.const([0, 0, h * kdim])], hint="attn/merge_heads")


def _onnx_type(dt: np.dtype) -> int:
    if dt in _NP2ONNX:
        return _NP2ONNX[dt]
    return helper.np_dtype_to_tensor_dtype(dt)


F32, I64 = TensorProto.FLOAT, TensorProto.INT64


# -- subgraphs ---------------------------------------------------------------------------


def embed_graph(shared: np.ndarray, dtype: str) -> BuiltGraph:
    g = GraphBuilder("/embed", dtype)
    ids = g.input("input_ids", I64, ["B", "T"])
    w = g.weight("shared.weight", shared)
    g.output(g.op("Gather", [w, ids], hint="gather", axis=0), "hidden", F32, ["B", "T", shared.shape[1]])
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


def position_bias_graph(scope: str, bias_weight: np.ndarray, bucket_table: np.ndarray, max_distance: int, dtype: str) -> BuiltGraph:
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
    return n, g.linear(n, w["classifier"], "router/classifier", bias=w.get("classifier_bias"))


def self_attention_graph(scope: str, w: dict, cfg, dtype: str, with_cache: bool) -> BuiltGraph:
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


def cross_kv_graph(scope: str, w: dict, cfg, dtype: str) -> BuiltGraph:
    """Encoder output -> this layer's cross-attention keys and values, computed once per request."""
    h, k, d = cfg.num_heads, cfg.d_kv, cfg.d_model
    g = GraphBuilder(scope, dtype)
    enc = g.input("encoder_hidden", F32, ["B", "S", d])
    g.output(g.heads(g.linear(enc, w["k"], "k"), h, k, "k"), "cross_key", F32, ["B", h, "S", k])
    g.output(g.heads(g.linear(enc, w["v"], "v"), h, k, "v"), "cross_value", F32, ["B", h, "S", k])
    return g.model()


def cross_attention_graph(scope: str, w: dict, cfg, dtype: str) -> BuiltGraph:
    h, k, d = cfg.num_heads, cfg.d_kv, cfg.d_model
    g = GraphBuilder(scope, dtype)
    x = g.input("hidden", F32, ["B", "T", d])
    bias = g.input("cross_bias", F32, ["B", 1, 1, "S"])
    ck = g.input("cross_key", F32, ["B", h, "S", k])
    cv = g.input("cross_value", F32, ["B", h, "S", k])
    g.output(cross_attention_block(g, x, bias, ck, cv, w, cfg), "hidden_out", F32, ["B", "T", d])
    return g.model()


def dense_ffn_graph(scope: str, w: dict, cfg, dtype: str) -> BuiltGraph:
    d = cfg.d_model
    g = GraphBuilder(scope, dtype)
    x = g.input("hidden", F32, ["B", "T", d])
    g.output(dense_ffn_block(g, x, w, cfg), "hidden_out", F32, ["B", "T", d])
    return g.model()


def router_graph(scope: str, w: dict, cfg, dtype: str) -> BuiltGraph:
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
    int4: wi[D, F/2], wo[F, D/2] packed uint8, wi_scale[D/G, F], wo_scale[F/G, D] float16.
    The runtime holds each resident expert as plain arrays read straight from its weight block.
    """
    g = GraphBuilder("/expert_kernel", dtype)
    x = g.input("x", F32, ["N", d_model])
    if dtype == "int4":
        U8, F16, G = TensorProto.UINT8, TensorProto.FLOAT16, quant.INT4_GROUP
        wi = g.dequantize_int4(g.input("wi", U8, [d_model, d_ff // 2]), g.input("wi_scale", F16, [d_model // G, d_ff]), d_model, d_ff, "wi")
        wo = g.dequantize_int4(g.input("wo", U8, [d_ff, d_model // 2]), g.input("wo_scale", F16, [d_ff // G, d_model]), d_ff, d_model, "wo")
    elif dtype == "int8":
        I8 = TensorProto.INT8
        wi = g.dequantize(g.input("wi", I8, [d_model, d_ff]), g.input("wi_scale", F32, [d_ff]), "wi")
        wo = g.dequantize(g.input("wo", I8, [d_ff, d_model]), g.input("wo_scale", F32, [d_model]), "wo")
    else:
        elem = _onnx_type(np.dtype(dtype))
        wi, wo = g.input("wi", elem, [d_model, d_ff]), g.input("wo", elem, [d_ff, d_model])
        if elem != F32:
            wi = g.op("Cast", [wi], hint="wi/cast", to=F32)
            wo = g.op("Cast", [wo], hint="wo/cast", to=F32)
    hid = g.act(g.op("MatMul", [x, wi], hint="wi"), act)
    g.output(g.op("MatMul", [hid, wo], hint="wo"), "y", F32, ["N", d_model])
    return g.model(OPSET_INT4 if dtype == "int4" else OPSET)


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


def expert_int4_graph(scope: str, tensors: dict, act: str, location: str, offsets: dict) -> BuiltGraph:
    """x[N, D] -> act(x dq(wi)) dq(wo) with packed int4 weights and float16 group scales, all external."""
    g = GraphBuilder(scope, "float32")
    d = tensors["wi"].shape[0]
    x = g.input("x", F32, ["N", d])

    def dq(name: str) -> str:
        packed = tensors[name]
        q = g.weight(f"{name}.weight", packed, {"location": location, "offset": offsets[name]}, raw=True)
        s = g.weight(f"{name}.scale", tensors[f"{name}_scale"], {"location": location, "offset": offsets[f"{name}_scale"]}, raw=True)
        return g.dequantize_int4(q, s, packed.shape[0], packed.shape[1] * 2, name)

    hid = g.act(g.op("MatMul", [x, dq("wi")], hint="wi"), act)
    g.output(g.op("MatMul", [hid, dq("wo")], hint="wo"), "y", F32, ["N", d])
    return g.model(OPSET_INT4)


def final_norm_graph(scope: str, weight: np.ndarray, cfg, dtype: str) -> BuiltGraph:
    g = GraphBuilder(scope, dtype)
    x = g.input("hidden", F32, ["B", "T", cfg.d_model])
    g.output(g.rms_norm(x, weight, cfg.layer_norm_epsilon, "final_layer_norm"), "hidden_out", F32, ["B", "T", cfg.d_model])
    return g.model()


def lm_head_graph(norm_weight: np.ndarray, lm_head: np.ndarray, cfg, dtype: str, fused: bool = False) -> BuiltGraph:
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
