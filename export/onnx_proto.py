"""The few ONNX protobuf messages export writes, encoded without the ``onnx`` package.

Why: the exporter must run on the device's runtime-only install (onnxruntime, numpy; no
torch, no onnx), e.g. to export the embedded model on its first use on a Jetson. ONNX files
are protobuf; this module builds the subset of ``onnx.proto`` the subgraph builders use
(models, graphs, nodes, int/ints/string attributes, tensors with inline or external data,
tensor value infos) and serialises it in protobuf's wire format, fields in field-number
order and set fields only, as the ``onnx`` package does: a test checks that the bytes equal
the ``onnx`` package's for every kind of subgraph.

The function names follow ``onnx.helper`` so the builders read like ordinary ONNX code.
Field numbers are those of onnx/onnx.proto (proto2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

IR_VERSION = 8


class TensorProto:
    """``onnx.TensorProto``: element types, data location, and the fields export sets."""

    FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, STRING, BOOL, FLOAT16, DOUBLE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
    DEFAULT, EXTERNAL = 0, 1

    def __init__(self):
        self.dims: list[int] = []
        self.data_type: int | None = None
        self.name: str | None = None
        self.raw_data: bytes | None = None
        self.float_data: list[float] = []
        self.int32_data: list[int] = []
        self.int64_data: list[int] = []
        self.external_data = _Entries()
        self.data_location: int | None = None

    def encode(self, out: bytearray) -> None:
        for d in self.dims:  # proto2 repeated int64 without [packed=true]
            _varint_field(out, 1, d)
        _opt_varint(out, 2, self.data_type)
        _packed(out, 4, self.float_data, "f")
        _packed_varints(out, 5, self.int32_data)
        _packed_varints(out, 7, self.int64_data)
        _opt_bytes(out, 8, self.name)
        _opt_bytes(out, 9, self.raw_data)
        for e in self.external_data:
            _message(out, 13, e)
        _opt_varint(out, 14, self.data_location)


@dataclass
class StringStringEntry:
    key: str = ""
    value: str = ""

    def encode(self, out: bytearray) -> None:
        _bytes_field(out, 1, self.key)
        _bytes_field(out, 2, self.value)


class _Entries(list):
    """A repeated message field with protobuf's ``add()``."""

    def add(self) -> StringStringEntry:
        self.append(StringStringEntry())
        return self[-1]


@dataclass
class AttributeProto:
    name: str
    type: int  # 1 FLOAT, 2 INT, 3 STRING, 7 INTS
    f: float | None = None
    i: int | None = None
    s: bytes | None = None
    ints: list[int] = field(default_factory=list)

    def encode(self, out: bytearray) -> None:
        _bytes_field(out, 1, self.name)
        if self.f is not None:
            _tag(out, 2, 5)
            out += struct.pack("<f", self.f)
        _opt_varint(out, 3, self.i)
        _opt_bytes(out, 4, self.s)
        for v in self.ints:  # not packed in onnx.proto
            _varint_field(out, 8, v)
        _varint_field(out, 20, self.type)


@dataclass
class NodeProto:
    op_type: str
    input: list[str]
    output: list[str]
    name: str | None = None
    attribute: list[AttributeProto] = field(default_factory=list)
    domain: str | None = None  # e.g. "com.microsoft" for ONNX Runtime's contrib ops

    def encode(self, out: bytearray) -> None:
        for s in self.input:
            _bytes_field(out, 1, s)
        for s in self.output:
            _bytes_field(out, 2, s)
        _opt_bytes(out, 3, self.name)
        _bytes_field(out, 4, self.op_type)
        for a in self.attribute:
            _message(out, 5, a)
        _opt_bytes(out, 7, self.domain)


@dataclass
class ValueInfoProto:
    name: str
    elem_type: int
    shape: list | None  # ints are dim_value, strings dim_param

    def encode(self, out: bytearray) -> None:
        _bytes_field(out, 1, self.name)
        tensor_type = bytearray()
        _varint_field(tensor_type, 1, self.elem_type)
        if self.shape is not None:
            shape = bytearray()
            for d in self.shape:
                dim = bytearray()
                if isinstance(d, str):
                    _bytes_field(dim, 2, d)
                else:
                    _varint_field(dim, 1, int(d))
                _len_field(shape, 1, dim)
            _len_field(tensor_type, 2, shape)
        type_proto = bytearray()
        _len_field(type_proto, 1, tensor_type)
        _len_field(out, 2, type_proto)


@dataclass
class GraphProto:
    node: list[NodeProto]
    name: str
    input: list[ValueInfoProto]
    output: list[ValueInfoProto]
    initializer: list[TensorProto]

    def encode(self, out: bytearray) -> None:
        for n in self.node:
            _message(out, 1, n)
        _bytes_field(out, 2, self.name)
        for t in self.initializer:
            _message(out, 5, t)
        for v in self.input:
            _message(out, 11, v)
        for v in self.output:
            _message(out, 12, v)


@dataclass
class OperatorSetIdProto:
    domain: str
    version: int

    def encode(self, out: bytearray) -> None:
        _bytes_field(out, 1, self.domain)
        _varint_field(out, 2, self.version)


@dataclass
class ModelProto:
    graph: GraphProto
    opset_import: list[OperatorSetIdProto]
    producer_name: str | None = None
    ir_version: int = IR_VERSION

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        out = bytearray()
        _varint_field(out, 1, self.ir_version)
        _opt_bytes(out, 2, self.producer_name)
        _message(out, 7, self.graph)
        for o in self.opset_import:
            _message(out, 8, o)
        return bytes(out)


# -- onnx.helper's builders ----------------------------------------------------------------

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint16): TensorProto.UINT16,
    np.dtype(np.int16): TensorProto.INT16, np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL,
    np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.float64): TensorProto.DOUBLE,
}


def np_dtype_to_tensor_dtype(dt) -> int:
    try:
        return _NP_TO_ONNX[np.dtype(dt)]
    except KeyError:
        raise ValueError(f"no ONNX element type for numpy dtype {dt}") from None


def make_node(op_type: str, inputs: list[str], outputs: list[str], name: str | None = None, domain: str | None = None,
              **attrs) -> NodeProto:
    return NodeProto(op_type, list(inputs), list(outputs), name,
                     [_attribute(k, v) for k, v in sorted(attrs.items()) if v is not None], domain)


def _attribute(key: str, value) -> AttributeProto:
    if isinstance(value, (bool, int, np.integer)):
        return AttributeProto(key, 2, i=int(value))
    if isinstance(value, (float, np.floating)):
        return AttributeProto(key, 1, f=float(value))
    if isinstance(value, (str, bytes)):
        return AttributeProto(key, 3, s=value.encode() if isinstance(value, str) else value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value):
        return AttributeProto(key, 7, ints=[int(v) for v in value])
    raise TypeError(f"attribute {key}={value!r}: only int, float, string and int-list attributes are supported")


def make_tensor(name: str, data_type: int, dims, vals) -> TensorProto:
    """A small constant with its values in the typed field, as ``onnx.helper.make_tensor``."""
    t = TensorProto()
    t.data_type, t.name = data_type, name
    if data_type == TensorProto.FLOAT:
        t.float_data = [float(v) for v in vals]
    elif data_type == TensorProto.INT64:
        t.int64_data = [int(v) for v in vals]
    elif data_type in (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.BOOL):
        t.int32_data = [int(v) for v in vals]
    else:
        raise TypeError(f"make_tensor: element type {data_type} is not supported here")
    t.dims = [int(d) for d in dims]
    return t


def from_array(arr: np.ndarray, name: str) -> TensorProto:
    """A tensor with its values as little-endian raw bytes, as ``onnx.numpy_helper.from_array``."""
    arr = np.asarray(arr)
    t = TensorProto()
    t.dims = [int(d) for d in arr.shape]
    t.name = name
    t.data_type = np_dtype_to_tensor_dtype(arr.dtype)
    t.raw_data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    return t


def make_tensor_value_info(name: str, elem_type: int, shape) -> ValueInfoProto:
    return ValueInfoProto(name, elem_type, None if shape is None else list(shape))


def make_graph(nodes, name: str, inputs, outputs, initializer=()) -> GraphProto:
    return GraphProto(list(nodes), name, list(inputs), list(outputs), list(initializer))


def make_opsetid(domain: str, version: int) -> OperatorSetIdProto:
    return OperatorSetIdProto(domain, version)


def make_model(graph: GraphProto, opset_imports, producer_name: str | None = None) -> ModelProto:
    return ModelProto(graph, list(opset_imports), producer_name)


# -- wire format ---------------------------------------------------------------------------


def _varint(out: bytearray, v: int) -> None:
    v &= (1 << 64) - 1  # negative int64 as ten bytes of two's complement, as protobuf does
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _tag(out: bytearray, num: int, wire: int) -> None:
    _varint(out, (num << 3) | wire)


def _varint_field(out: bytearray, num: int, v: int) -> None:
    _tag(out, num, 0)
    _varint(out, int(v))


def _opt_varint(out: bytearray, num: int, v: int | None) -> None:
    if v is not None:
        _varint_field(out, num, v)


def _len_field(out: bytearray, num: int, payload: bytes | bytearray) -> None:
    _tag(out, num, 2)
    _varint(out, len(payload))
    out += payload


def _bytes_field(out: bytearray, num: int, s: str | bytes) -> None:
    _len_field(out, num, s.encode() if isinstance(s, str) else s)


def _opt_bytes(out: bytearray, num: int, s: str | bytes | None) -> None:
    if s is not None:
        _bytes_field(out, num, s)


def _message(out: bytearray, num: int, msg) -> None:
    body = bytearray()
    msg.encode(body)
    _len_field(out, num, body)


def _packed(out: bytearray, num: int, values: list, fmt: str) -> None:
    if values:
        _len_field(out, num, struct.pack(f"<{len(values)}{fmt}", *values))


def _packed_varints(out: bytearray, num: int, values: list[int]) -> None:
    if values:
        body = bytearray()
        for v in values:
            _varint(body, v)
        _len_field(out, num, body)
