"""Every kind of ONNX subgraph export writes is a valid model: onnx's checker passes it (with
ONNX Runtime's own schemas for the contrib ops the fused and ladder graphs use), its external
weights lie where the artifact says, 4 KiB-aligned and inside their file; and the
relative-position buckets are HF's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_export import builder, export_checkpoint, fused, graphs, ladder, quant
from swapmoe_export.reference import bucket_table
from swapmoe_export.writer import ALIGN, ArtifactWriter

from tiny import save_tiny

CFG = SimpleNamespace(num_heads=2, d_kv=4, d_model=8, d_ff=64, num_experts=4, layer_norm_epsilon=1e-6,
                      dense_act_fn="gelu_new", vocab_size=20, tie_word_embeddings=True)
CONTRIB = {("SimplifiedLayerNormalization", ""), ("SkipSimplifiedLayerNormalization", builder.MS),
           ("MultiHeadAttention", builder.MS), ("MatMulNBits", builder.MS)}


@pytest.fixture(scope="module", autouse=True)
def ort_contrib_schemas():
    """Register ONNX Runtime's schemas of its contrib ops with onnx, so that the checker checks those
    nodes too (SimplifiedLayerNormalization sits in the ONNX domain, where onnx knows no such op)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    if not hasattr(ort_c, "get_all_operator_schema"):
        pytest.skip("this ONNX Runtime build does not expose its operator schemas")
    added = []
    for s in ort_c.get_all_operator_schema():
        if (s.name, s.domain) in CONTRIB and not onnx.defs.has(s.name, s.domain):
            onnx.defs.register_schema(_as_onnx_schema(s))
            added.append(s)
    yield
    for s in added:
        onnx.defs.deregister_schema(s.name, s.since_version, s.domain)


def _as_onnx_schema(s) -> onnx.defs.OpSchema:
    S = onnx.defs.OpSchema

    def param(p):
        option = getattr(S.FormalParameterOption, str(p.option).rsplit(".", 1)[1])
        return S.FormalParameter(p.name, p.typeStr, param_option=option, is_homogeneous=p.isHomogeneous)

    def attribute(a):
        if a._default_value:
            return S.Attribute(a.name, onnx.AttributeProto.FromString(a._default_value))
        return S.Attribute(a.name, getattr(S.AttrType, str(a.type).rsplit(".", 1)[1]), required=a.required)

    return S(s.name, s.domain, s.since_version, inputs=[param(p) for p in s.inputs], outputs=[param(p) for p in s.outputs],
             type_constraints=[(t.type_param_str, list(t.allowed_type_strs), t.description) for t in s.type_constraints],
             attributes=[attribute(a) for a in s.attributes.values()])


def check_file(path: Path, rung_data: Path | None = None) -> None:
    """onnx's full check (strict shape inference, custom domains included) and the external-data layout.

    ``rung_data``: a rung session template's weights, which the runtime hands ONNX Runtime in
    memory under the placeholder name; they are put beside the template for the check.
    """
    if rung_data is not None:
        (path.parent / ladder.RUNG_DATA).write_bytes(rung_data.read_bytes())
    onnx.checker.check_model(str(path), full_check=True, check_custom_domain=True)
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        e = {x.key: x.value for x in t.external_data}
        assert list(e) == ["location", "offset", "length"] and "/" not in e["location"], (t.name, e)
        offset, length = int(e["offset"]), int(e["length"])
        assert offset % ALIGN == 0, (t.name, offset)
        assert length == int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize, t.name
        assert offset + length <= (path.parent / e["location"]).stat().st_size, (t.name, e)


def _w(r, *shape):
    return r.standard_normal(shape).astype(np.float32)


def _expert_block(writer: ArtifactWriter, name: str, parts: dict) -> dict:
    """An expert's weight block as export writes it; role -> offset."""
    return dict(zip(parts, writer.write_blocks(f"experts/{name}.bin", list(parts.values()))))


def _subgraph_cases(writer: ArtifactWriter) -> dict:
    """One subgraph of each kind export writes, through the artifact writer.

    Returns builder -> [file] ((template, its rung's weights) for session templates).
    """
    r = np.random.default_rng(0)
    attn = {"q": _w(r, 8, 8), "k": _w(r, 8, 8), "v": _w(r, 8, 8), "o": _w(r, 8, 8), "layer_norm": _w(r, 8)}
    ffn = {"layer_norm": _w(r, 8), "wi": _w(r, 64, 8), "wo": _w(r, 8, 64)}
    router = {"layer_norm": _w(r, 8), "classifier": _w(r, 4, 8), "classifier_bias": _w(r, 4)}
    cases: dict = {}

    def add(fn, rel, built):
        writer.write_onnx(rel, built)
        cases.setdefault(fn, []).append(rel)

    add(graphs.embed_graph, "dense/embed.onnx", graphs.embed_graph(_w(r, 20, 8), "float32"))
    add(graphs.embed_graph, "dense/big_embed.onnx", graphs.embed_graph(_w(r, 300, 1024), "float32"))  # 1.2 MiB: .data
    add(graphs.position_bias_graph, "dense/position_bias.onnx", graphs.position_bias_graph(
        "/encoder/position_bias", _w(r, 8, 2), graphs.relative_position_buckets(True, 8, 16), 16, "float16"))
    add(graphs.self_attention_graph, "dense/self_attn.onnx",
        graphs.self_attention_graph("/decoder/block.0/self_attn", attn, CFG, "float32", with_cache=True))
    add(graphs.self_attention_graph, "dense/attn.onnx",
        graphs.self_attention_graph("/encoder/block.0/self_attn", attn, CFG, "float16", with_cache=False))
    add(graphs.cross_kv_graph, "dense/cross_kv.onnx", graphs.cross_kv_graph("/decoder/block.0/cross_kv", attn, CFG, "float32"))
    add(graphs.cross_attention_graph, "dense/cross_attn.onnx",
        graphs.cross_attention_graph("/decoder/block.0/cross_attn", attn, CFG, "float32"))
    add(graphs.dense_ffn_graph, "dense/ffn.onnx", graphs.dense_ffn_graph("/encoder/block.0/ffn", ffn, CFG, "float32"))
    add(graphs.router_graph, "dense/router.onnx", graphs.router_graph("/encoder/block.1/moe", router, CFG, "float16"))
    add(graphs.final_norm_graph, "dense/final_norm.onnx", graphs.final_norm_graph("/encoder/final_norm", _w(r, 8), CFG, "float32"))
    add(graphs.lm_head_graph, "dense/lm_head.onnx", graphs.lm_head_graph(_w(r, 8), _w(r, 20, 8), CFG, "float32"))
    add(graphs.lm_head_graph, "dense/lm_head_fused.onnx", graphs.lm_head_graph(_w(r, 8), _w(r, 20, 8), CFG, "float16", fused=True))
    for dt in quant.EXPERT_DTYPES:
        add(graphs.expert_kernel_graph, f"dense/expert_kernel.{dt}.onnx", graphs.expert_kernel_graph(32, 64, "gelu", dt))
    contrib_ops = fused.CONTRIB_OPS
    for contrib in (True, False):  # ORT's fused nodes, and standard ops only
        fused.CONTRIB_OPS = contrib
        try:
            tag = "contrib" if contrib else "standard"
            add(fused.encoder_block_graph, f"dense/enc_block.{tag}.onnx",
                fused.encoder_block_graph("/encoder/block.0", attn, ffn, CFG, "float32", False))
            add(fused.encoder_block_graph, f"dense/enc_block_sparse.{tag}.onnx",
                fused.encoder_block_graph("/encoder/block.1", attn, router, CFG, "float16", True))
            add(fused.decoder_step_graph, f"dense/dec_step.{tag}.onnx",
                fused.decoder_step_graph("/decoder/block.0", attn, attn, ffn, CFG, "float32", False))
            add(fused.decoder_step_graph, f"dense/dec_step_sparse.{tag}.onnx",
                fused.decoder_step_graph("/decoder/block.1", attn, attn, router, CFG, "float32", True))
        finally:
            fused.CONTRIB_OPS = contrib_ops

    wi, wo = _w(r, 32, 64), _w(r, 64, 32)  # [D, F], [F, D] as export stores them
    for name, dt, act in (("f32", "float32", "relu"), ("f16", "float16", "gelu")):
        o = _expert_block(writer, name, {"wi": wi.astype(dt), "wo": wo.astype(dt)})
        add(graphs.expert_graph, f"experts/{name}.onnx",
            graphs.expert_graph(f"/x/{name}", wi.T, wo.T, act, dt, f"{name}.bin", (o["wi"], o["wo"])))
    (qi, si), (qo, so) = quant.quantize_int8(wi), quant.quantize_int8(wo)
    parts = {"wi": qi, "wi_scale": si, "wo": qo, "wo_scale": so}
    add(graphs.expert_int8_graph, "experts/i8.onnx",
        graphs.expert_int8_graph("/x/i8", parts, "gelu_new", "i8.bin", _expert_block(writer, "i8", parts)))
    parts, _ = ladder.int4_expert(wi, wo)
    add(ladder.int4_expert_graph, "experts/i4.onnx",
        ladder.int4_expert_graph("/x/i4", 32, 64, "gelu_new", parts, _expert_block(writer, "i4", parts), "i4.bin"))
    for rung in ladder.RUNGS:
        entry = ladder.write_rung(writer, "f32", "/x/f32", wi, wo, rung)
        writer.write_bytes(ladder.template_rel(rung), ladder.session_template(32, 64, "relu", rung, entry))
        cases.setdefault(ladder.session_template, []).append((ladder.template_rel(rung), entry["weights_file"]))
        add(ladder.kernel_graph, f"dense/{ladder.kernel_name(rung)}.onnx", ladder.kernel_graph(32, 64, "gelu", rung))
    return cases


@pytest.fixture(scope="module")
def subgraphs(tmp_path_factory):
    writer = ArtifactWriter(tmp_path_factory.mktemp("subgraphs"))
    return writer.root, _subgraph_cases(writer)


def test_every_graph_builder_is_covered_here(subgraphs):
    builders = {f for m in (graphs, fused, ladder) for name, f in vars(m).items()
                if name.endswith("_graph") and callable(f) and f.__module__ == m.__name__}
    assert builders | {ladder.session_template} == set(subgraphs[1])


def test_every_kind_of_subgraph_passes_the_onnx_checker(subgraphs):
    root, cases = subgraphs
    files = [f if isinstance(f, tuple) else (f, None) for rels in cases.values() for f in rels]
    assert len(files) == 28 + 2 * len(ladder.RUNGS)  # each rung: a session template and a kernel
    for rel, rung_data in files:
        check_file(root / rel, rung_data and root / rung_data)


def test_onnx_reads_our_external_weights_back_and_small_ones_stay_inline(tmp_path):
    r = np.random.default_rng(1)
    small, big = _w(r, 300, 1024), _w(r, 300, 1024)  # 600 KiB as float16, 1.2 MiB as float32
    writer = ArtifactWriter(tmp_path)
    writer.write_onnx("small.onnx", graphs.embed_graph(small, "float16"))
    writer.write_onnx("big.onnx", graphs.embed_graph(big, "float32"))
    assert sorted(writer.files) == ["big.onnx", "big.onnx.data", "small.onnx"]
    (s,) = [t for t in onnx.load(str(tmp_path / "small.onnx")).graph.initializer if t.name == "/embed/shared.weight"]
    assert s.data_location == TensorProto.DEFAULT
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(s), small.astype(np.float16))
    (b,) = [t for t in onnx.load(str(tmp_path / "big.onnx")).graph.initializer if t.name == "/embed/shared.weight"]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(b), big)  # onnx.load fills it in from big.onnx.data


def test_an_onnx_checker_failure_is_caught(tmp_path):
    """The checks above can fail: an op with a wrong attribute does not pass."""
    g = graphs.GraphBuilder("/bad")
    x = g.input("x", builder.F32, ["N", 4])
    g.output(g.op("Softmax", [x], axis="last"), "y", builder.F32, ["N", 4])
    ArtifactWriter(tmp_path).write_onnx("bad.onnx", g.model())
    with pytest.raises(onnx.checker.ValidationError):
        check_file(tmp_path / "bad.onnx")


# -- whole artifacts: every file export writes, in each layout -------------------------------

LAYOUTS = {
    "fused_f32_int4_ladder": (dict(d_ff=64), {}),
    "split_int8_experts": (dict(dense_act_fn="gelu_new", router_bias=True), dict(fuse_layers=False, expert_dtype="int8")),
    "f16_int4_experts": (dict(d_ff=64, vocab_size=8200), dict(dtype="float16", expert_dtype="int4", ladder_rungs=())),
    "big_vocab_int8_ladder": (dict(vocab_size=8200, tie_word_embeddings=False), dict(ladder_rungs=("int4", "int8"))),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_file_of_an_exported_artifact_passes_the_onnx_checker(tmp_path, layout):
    pytest.importorskip("transformers")
    overrides, options = LAYOUTS[layout]
    art = export_checkpoint(save_tiny(tmp_path / "ckpt", seed=2, **overrides), tmp_path / "art", validate=False,
                            quiet=True, **options)
    m = load_manifest(art, verify=True)
    first = next(iter(m.experts.values()))
    templates = {r.session_graph: m.path(first.rungs[name].weights_file) for name, r in m.ladder.items()}
    assert len(templates) == len(options.get("ladder_rungs", ("int4",)))
    for path in sorted(art.rglob("*.onnx")):
        check_file(path, templates.get(str(path.relative_to(art))))
    # Each expert's graph reads its weights from the expert's own block, at the manifest's offsets.
    for e in m.experts.values():
        g = onnx.load(str(m.path(e.graph.file)), load_external_data=False)
        where = {t.name: {x.key: x.value for x in t.external_data} for t in g.graph.initializer}
        for t in e.tensors:
            assert where[t.name]["location"] == Path(e.weights_file).name
            assert int(where[t.name]["offset"]) == t.offset and t.offset % ALIGN == 0
        assert e.nbytes == m.path(e.weights_file).stat().st_size


# Valid T5 settings (at least 4 buckets, max distance above half of them), the standard
# 32/128 among them; export refuses the others (HF's own buckets overflow there).
@pytest.mark.parametrize("num_buckets,max_distance", [(4, 3), (8, 16), (8, 20), (16, 9), (16, 128), (32, 20),
                                                      (32, 128), (32, 256), (64, 100), (128, 512)])
def test_numpy_relative_position_buckets_equal_hf(num_buckets, max_distance):
    pytest.importorskip("torch")
    for bidirectional in (True, False):
        ours = graphs.relative_position_buckets(bidirectional, num_buckets, max_distance)
        np.testing.assert_array_equal(ours, bucket_table(bidirectional, num_buckets, max_distance))
