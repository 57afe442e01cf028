"""The building blocks of every subgraph: a GraphBuilder that names nodes and weights, and
the layers (norms, attention, activations, dequantisation) the Switch graphs are made of.

Graphs are ``onnx`` protobuf messages built with ``onnx.helper``. Weights of a MiB or
more never enter the protobuf: they are initializers marked external, and the artifact
writer puts their bytes in a data file beside the graph (writer.py), or they already lie
in an expert's weight block. ``point_at`` records where.

Shapes: B batch, T query tokens, L = P + T key tokens, H heads, K d_kv.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import quant

OPSET = 17
OPSET_INT4 = 18  # BitwiseAnd arrived in opset 18; only int4 expert graphs need it
IR_VERSION = 8  # the IR of opsets 17 and 18; onnx.helper.make_model would write its own, newer one
MS = "com.microsoft"  # ONNX Runtime's contrib ops (fused attention and RMS norm), version 1: the
# builder that uses them adds the opset import (fused.py, ladder.py)
EXTERNAL_MIN_BYTES = 1 << 20
F32, F16, I64, I8, U8 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT8, TensorProto.UINT8


@dataclass
class BuiltGraph:
    """A subgraph and the big weights that go beside it in ``FILE.onnx.data``."""

    proto: onnx.ModelProto
    blobs: list[tuple[str, np.ndarray]]


def tensor_type(dt) -> int:
    """The ONNX element type of a numpy dtype."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))


def external_tensor(name: str, elem_type: int, dims) -> TensorProto:
    """An initializer whose bytes live outside the protobuf; ``point_at`` says where."""
    t = TensorProto()
    t.name, t.data_type = name, elem_type
    t.dims.extend(int(d) for d in dims)
    t.data_location = TensorProto.EXTERNAL
    return t


def point_at(t: TensorProto, location: str, offset: int, length: int) -> None:
    """Record an external tensor's file, byte offset and length, as ONNX Runtime reads them.

    ``onnx.external_data_helper.set_external_data`` writes the same entries but wants the
    bytes in the message first, which is the copy this layout exists to avoid.
    """
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


class GraphBuilder:
    """A tiny helper that accumulates nodes and initializers for one subgraph."""

    def __init__(self, scope: str, storage_dtype: "str | quant.DenseWeights" = "float32"):
        """``storage_dtype``: the type weights are stored in, or a DenseWeights (dense subgraphs:
        its float type, and MatMul weights as MatMulNBits when it has ``bits``)."""
        self.scope = scope
        self.nbits = None
        if isinstance(storage_dtype, quant.DenseWeights):
            self.nbits = storage_dtype if storage_dtype.bits else None
            storage_dtype = storage_dtype.storage
        # int4 weights are packed uint8 and always added raw; numpy has no int4 of its own
        # (only ml_dtypes registers one, and only once something has imported it).
        self.storage = np.dtype(np.uint8 if storage_dtype == "int4" else storage_dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
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
        self.inits.append(helper.make_tensor(name, tensor_type(dtype), np.shape(value), np.asarray(value, dtype=dtype).ravel().tolist()))
        return name

    def weight(self, name: str, array: np.ndarray, external: dict | None = None, raw: bool = False) -> str:
        """Add a weight in the storage dtype; return a float32 tensor name (cast if stored as fp16).

        ``raw``: keep the array's own dtype and return it uncast (int8 weights, their scales).
        ``external``: {"location", "offset"} of bytes already on disk (an expert's weight block).
        """
        arr = np.ascontiguousarray(array) if raw else np.ascontiguousarray(array, dtype=self.storage)
        full = f"{self.scope}/{name}"
        if external is None and arr.nbytes < EXTERNAL_MIN_BYTES:
            self.inits.append(numpy_helper.from_array(arr, full))
        else:
            # Big tensors never enter the protobuf: protobuf copies a message several times
            # while a model is assembled, which at switch-base size costs hundreds of MB.
            t = external_tensor(full, tensor_type(arr.dtype), arr.shape)
            if external is None:
                self.blobs.append((full, arr))  # the writer fills in location and offset
            else:
                point_at(t, external["location"], external["offset"], arr.nbytes)
            self.inits.append(t)
        if raw or arr.dtype == np.float32:
            return full
        return self.op("Cast", [full], hint=f"{name}/cast", to=F32)

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, tensor: str, name: str, elem_type: int, shape: list) -> None:
        self.nodes.append(helper.make_node("Identity", [tensor], [name], name=f"{self.scope}/{name}/Identity"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, opset: int = OPSET) -> BuiltGraph:
        graph = helper.make_graph(self.nodes, self.scope.strip("/").replace("/", "."), self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="swapmoe_export")
        m.ir_version = IR_VERSION
        if self.nbits and any(n.op_type == "MatMulNBits" for n in self.nodes):
            m.opset_import.append(helper.make_opsetid(MS, 1))
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

    def linear(self, x: str, w_torch: np.ndarray, name: str, bias: np.ndarray | None = None, external: dict | None = None,
               keep_float: bool = False) -> str:
        """x · w_torch^T (+ bias). In a low-bit dense graph (``nbits``) the weight is stored for
        MatMulNBits unless ``keep_float`` (the router) or it lies in an expert's block (``external``)."""
        if self.nbits and not keep_float and external is None:
            y = self.matmul_nbits(x, w_torch, name)
        else:
            y = self.op("MatMul", [x, self.weight(f"{name}.weight", np.ascontiguousarray(w_torch.T), external)], hint=name)
        if bias is not None:
            y = self.op("Add", [y, self.weight(f"{name}.bias", bias)], hint=f"{name}/bias")
        return y

    def matmul_nbits(self, x: str, w_torch: np.ndarray, name: str, bits: int | None = None) -> str:
        """x[..., K] · W[K, N] through com.microsoft.MatMulNBits, W quantised from w_torch[N, K]
        (quant.quantize_nbits: the ladder's layout, ``bits`` or ``self.nbits``' bits, its block)."""
        nb = self.nbits
        bits = bits or nb.bits
        n, k = w_torch.shape
        q, s = quant.quantize_nbits(np.ascontiguousarray(w_torch.T), bits, nb.block)
        q_name = self.weight(f"{name}.weight_q{bits}", q, raw=True)
        s_name = self.weight(f"{name}.weight_scale", s, raw=True)
        out = self._name(f"{name}_out")
        self.nodes.append(helper.make_node("MatMulNBits", [x, q_name, s_name], [out], name=f"{self.scope}/{name}/MatMulNBits_{self._n}",
                                           domain=MS, K=k, N=n, bits=bits, block_size=nb.block,
                                           accuracy_level=nb.accuracy_level))
        return out

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
        return self.op("Mul", [self.op("Cast", [q], hint=f"{hint}/dequant", to=F32), scale], hint=f"{hint}/dequant")

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
