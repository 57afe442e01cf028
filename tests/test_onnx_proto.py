"""Export writes ONNX without the onnx package: its bytes must be the onnx package's, and its
relative-position buckets HF's."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from swapmoe_export import fused, graphs, onnx_proto  # noqa: E402
from swapmoe_export.reference import bucket_table  # noqa: E402

CFG = SimpleNamespace(num_heads=2, d_kv=4, d_model=8, d_ff=64, num_experts=4, layer_norm_epsilon=1e-6,
                      dense_act_fn="gelu_new", vocab_size=20, tie_word_embeddings=True)


def _every_kind_of_subgraph():
    """One subgraph of each kind the exporter writes, from a fixed seed (small and big weights)."""
    r = np.random.default_rng(0)

    def w(*shape):
        return r.standard_normal(shape).astype(np.float32)

    attn = {"q": w(8, 8), "k": w(8, 8), "v": w(8, 8), "o": w(8, 8), "layer_norm": w(8)}
    return [
        graphs.embed_graph(w(20, 8), "float32"),
        graphs.embed_graph(w(300, 1024), "float32"),  # > 1 MiB: external blob
        graphs.position_bias_graph("/encoder/position_bias", w(8, 2), graphs.relative_position_buckets(True, 8, 16), 16, "float16"),
        graphs.self_attention_graph("/decoder/block.0/self_attn", attn, CFG, "float32", with_cache=True),
        graphs.self_attention_graph("/encoder/block.0/self_attn", attn, CFG, "float16", with_cache=False),
        graphs.cross_kv_graph("/decoder/block.0/cross_kv", attn, CFG, "float32"),
        graphs.cross_attention_graph("/decoder/block.0/cross_attn", attn, CFG, "float32"),
        graphs.dense_ffn_graph("/encoder/block.0/ffn", {"layer_norm": w(8), "wi": w(64, 8), "wo": w(8, 64)}, CFG, "float32"),
        graphs.router_graph("/encoder/block.1/moe", {"layer_norm": w(8), "classifier": w(4, 8), "classifier_bias": w(4)}, CFG, "float16"),
        graphs.expert_graph("/encoder/block.1/moe/expert.0", w(64, 8), w(8, 64), "relu", "float32", "enc.L01.E00.bin", (0, 4096)),
        graphs.expert_int8_graph("/x", {"wi": np.ones((8, 64), np.int8), "wi_scale": w(64), "wo": np.ones((64, 8), np.int8), "wo_scale": w(8)},
                                 "relu", "e.bin", {"wi": 0, "wi_scale": 4096, "wo": 8192, "wo_scale": 12288}),
        graphs.expert_int4_graph("/y", {"wi": np.ones((32, 32), np.uint8), "wi_scale": np.ones((1, 64), np.float16),
                                        "wo": np.ones((64, 16), np.uint8), "wo_scale": np.ones((2, 32), np.float16)},
                                 "gelu", "e.bin", {"wi": 0, "wi_scale": 4096, "wo": 8192, "wo_scale": 12288}),
        *(graphs.expert_kernel_graph(32, 64, "gelu", dt) for dt in ("float32", "float16", "int8", "int4")),
        graphs.final_norm_graph("/encoder/final_norm", w(8), CFG, "float32"),
        graphs.lm_head_graph(w(8), w(20, 8), CFG, "float32"),
        graphs.lm_head_graph(w(8), w(20, 8), CFG, "float32", fused=True),
        # issue 17: one graph per layer
        fused.encoder_block_graph("/encoder/block.0", attn, {"layer_norm": w(8), "wi": w(64, 8), "wo": w(8, 64)}, CFG, "float32", False),
        fused.encoder_block_graph("/encoder/block.1", attn, {"layer_norm": w(8), "classifier": w(4, 8)}, CFG, "float16", True),
        fused.decoder_step_graph("/decoder/block.0", attn, attn, {"layer_norm": w(8), "wi": w(64, 8), "wo": w(8, 64)}, CFG, "float32", False),
        fused.decoder_step_graph("/decoder/block.1", attn, attn, {"layer_norm": w(8), "classifier": w(4, 8), "classifier_bias": w(4)}, CFG, "float32", True),
    ]


def _onnx_package_helper():
    """The onnx package behind the names graphs.py uses."""
    return SimpleNamespace(
        make_node=onnx.helper.make_node, make_tensor=onnx.helper.make_tensor,
        make_tensor_value_info=onnx.helper.make_tensor_value_info, make_graph=onnx.helper.make_graph,
        make_model=onnx.helper.make_model, make_opsetid=onnx.helper.make_opsetid,
        np_dtype_to_tensor_dtype=onnx.helper.np_dtype_to_tensor_dtype,
        from_array=onnx.numpy_helper.from_array, ModelProto=onnx.ModelProto,
        NodeProto=onnx.NodeProto, ValueInfoProto=onnx.ValueInfoProto,
    )


def test_every_subgraph_serializes_to_the_onnx_packages_bytes(monkeypatch):
    ours = [g.proto.SerializeToString() for g in _every_kind_of_subgraph()]
    monkeypatch.setattr(graphs, "helper", _onnx_package_helper())
    monkeypatch.setattr(graphs, "TensorProto", onnx.TensorProto)
    theirs = [g.proto.SerializeToString() for g in _every_kind_of_subgraph()]
    assert len(ours) == len(theirs) == 23
    for a, b in zip(ours, theirs):
        assert a == b
    for a in ours:
        m = onnx.load_from_string(a)
        assert m.SerializeToString() == a  # canonical: onnx writes the same bytes back
        # SimplifiedLayerNormalization is ONNX Runtime's, registered by ORT in the ONNX domain,
        # which onnx's checker does not know; ORT loads and validates those graphs at export.
        ort_only = any(n.op_type == "SimplifiedLayerNormalization" for n in m.graph.node)
        if not ort_only and not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer):
            onnx.checker.check_model(m)


def test_external_blobs_are_filled_in_like_onnx_does():
    g = graphs.embed_graph(np.zeros((300, 1024), np.float32), "float32")
    (name, arr), = g.blobs
    t = next(t for t in g.proto.graph.initializer if t.name == name)
    for k, v in (("location", "embed.onnx.data"), ("offset", "0"), ("length", str(arr.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    m = onnx.load_from_string(g.proto.SerializeToString())
    (init,) = [t for t in m.graph.initializer if t.name == name]
    assert {e.key: e.value for e in init.external_data} == {"location": "embed.onnx.data", "offset": "0", "length": str(arr.nbytes)}
    assert init.data_location == onnx.TensorProto.EXTERNAL and list(init.dims) == [300, 1024]


def test_negative_ints_and_unsupported_attributes():
    node = onnx_proto.make_node("Slice", ["x"], ["y"], name="n", axes=[-1, 0], keepdims=0)
    m = onnx_proto.make_model(onnx_proto.make_graph([node], "g", [], []), [onnx_proto.make_opsetid("", 17)])
    parsed = onnx.load_from_string(m.SerializeToString())
    attrs = {a.name: a for a in parsed.graph.node[0].attribute}
    assert list(attrs["axes"].ints) == [-1, 0] and attrs["keepdims"].i == 0
    with pytest.raises(TypeError, match="attribute"):
        onnx_proto.make_node("X", [], [], bad={"a": 1})


# Valid T5 settings (at least 4 buckets, max distance above half of them), the standard
# 32/128 among them; export refuses the others (HF's own buckets overflow there).
@pytest.mark.parametrize("num_buckets,max_distance", [(4, 3), (8, 16), (8, 20), (16, 9), (16, 128), (32, 20),
                                                      (32, 128), (32, 256), (64, 100), (128, 512)])
def test_numpy_relative_position_buckets_equal_hf(num_buckets, max_distance):
    for bidirectional in (True, False):
        ours = graphs.relative_position_buckets(bidirectional, num_buckets, max_distance)
        np.testing.assert_array_equal(ours, bucket_table(bidirectional, num_buckets, max_distance))
