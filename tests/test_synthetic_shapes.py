"""Decoder-only shapes of scripts/make_synthetic_checkpoint.py: toy sizes load in HF and run.

The full-size shapes are checked by their tensor lists only (no weights are written).
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic_checkpoint.py"
INDEX = "model.safetensors.index.json"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint_shapes", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


msc = _load_script()
HF_CLASS = {"olmoe-tiny": "OlmoeForCausalLM", "mixtral-tiny": "MixtralForCausalLM"}


def _read_all(ckpt: Path) -> dict:
    index = json.loads((ckpt / INDEX).read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(ckpt / fname), framework="numpy") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    return out


def _params(shape: str, layers: int | None = None) -> tuple[int, int]:
    specs = msc.tensor_specs(msc.make_config(shape, layers))
    total = sum(int(np.prod(s[1])) for s in specs)
    experts = sum(int(np.prod(s[1])) for s in specs if ".experts." in s[0])
    return total, experts


def test_full_size_shapes_have_the_published_parameter_counts():
    # OLMoE-1B-7B: 6.9B parameters, of which 64 experts x 3 x 2048 x 1024 x 16 layers.
    total, experts = _params("olmoe-1b-7b")
    assert experts == 16 * 64 * 3 * 2048 * 1024
    assert 6.90e9 < total < 6.95e9
    # Mixtral-8x7B at its full 32 layers: 46.7B parameters.
    total, experts = _params("mixtral-reduced", layers=32)
    assert experts == 32 * 8 * 3 * 4096 * 14336
    assert 46.65e9 < total < 46.75e9
    cfg = msc.make_config("mixtral-reduced")
    assert cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 8 and cfg["num_experts_per_tok"] == 2
    assert msc.make_config("olmoe-1b-7b", layers=2)["num_hidden_layers"] == 2


def test_layers_refused_for_switch_and_nonpositive(tmp_path, capsys):
    assert msc.main(["--shape", "tiny", "--layers", "2", "-o", str(tmp_path / "a"), "--quiet"]) == 2
    assert "decoder-only" in capsys.readouterr().err
    assert msc.main(["--shape", "olmoe-tiny", "--layers", "0", "-o", str(tmp_path / "b"), "--quiet"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module", params=["olmoe-tiny", "mixtral-tiny"])
def causal_ckpt(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "ckpt"
    # A small shard limit: several shards, some tensors split from their layer's others.
    assert msc.main(["--shape", request.param, "-o", str(out), "--max-shard-size", "200KB", "--quiet"]) == 0
    return request.param, out


def test_hf_loads_the_published_layout_and_runs(causal_ckpt):
    torch = pytest.importorskip("torch")
    import transformers

    shape, ckpt = causal_ckpt
    cls = getattr(transformers, HF_CLASS[shape])
    model, info = cls.from_pretrained(str(ckpt), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    saved = _read_all(ckpt)
    assert len(json.loads((ckpt / INDEX).read_text())["weight_map"]) == len(saved)
    assert len(set(json.loads((ckpt / INDEX).read_text())["weight_map"].values())) > 2
    # The per-expert tensors land in HF's fused gate_up / down tensors, gate first.
    olmoe = shape.startswith("olmoe")
    moe = "mlp" if olmoe else "block_sparse_moe"
    gate, up, down = ("gate_proj", "up_proj", "down_proj") if olmoe else ("w1", "w3", "w2")
    sd = model.state_dict()
    e = 3
    fused = sd["model.layers.1.mlp.experts.gate_up_proj"][e].numpy()
    np.testing.assert_array_equal(fused, np.concatenate([saved[f"model.layers.1.{moe}.experts.{e}.{gate}.weight"],
                                                         saved[f"model.layers.1.{moe}.experts.{e}.{up}.weight"]]))
    np.testing.assert_array_equal(sd["model.layers.1.mlp.experts.down_proj"][e].numpy(),
                                  saved[f"model.layers.1.{moe}.experts.{e}.{down}.weight"])
    np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), saved["lm_head.weight"])
    assert np.all(saved["model.layers.0.input_layernorm.weight"] == 1)

    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
        gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert out.logits.shape == (2, 9, model.config.vocab_size) and torch.isfinite(out.logits).all()
    assert gen.shape == (1, 13)
    # Router logits spread as the script promises (~ROUTER_LOGIT_STD), not HF's near-uniform init.
    spread = float(torch.cat([r.reshape(-1, r.shape[-1]) for r in out.router_logits]).std())
    assert 1.2 < spread < 3.0, spread


def test_config_facts_and_generation_config(causal_ckpt):
    pytest.importorskip("torch")
    from transformers import AutoConfig, GenerationConfig

    shape, ckpt = causal_ckpt
    cfg = AutoConfig.from_pretrained(str(ckpt))
    assert cfg.architectures == [HF_CLASS[shape]]
    if shape.startswith("olmoe"):
        assert cfg.num_experts == 16 and cfg.num_experts_per_tok == 4 and cfg.norm_topk_prob is False
        assert cfg.rope_parameters["rope_theta"] == 10000.0
    else:
        assert cfg.num_local_experts == 4 and cfg.num_experts_per_tok == 2 and cfg.num_key_value_heads == 2
        assert cfg.rope_parameters["rope_theta"] == 1e6
    gen = GenerationConfig.from_pretrained(str(ckpt))
    assert gen.eos_token_id == cfg.eos_token_id


def test_float16_is_stored_as_float16_and_loads(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import OlmoeForCausalLM

    a, b = tmp_path / "f16", tmp_path / "f32"
    assert msc.main(["--shape", "olmoe-tiny", "--dtype", "float16", "--layers", "1", "-o", str(a), "--quiet"]) == 0
    assert msc.main(["--shape", "olmoe-tiny", "--layers", "1", "-o", str(b), "--quiet"]) == 0
    h, s = _read_all(a), _read_all(b)
    assert h.keys() == s.keys() and all(v.dtype == np.float16 for v in h.values())
    assert json.loads((a / INDEX).read_text())["metadata"]["total_size"] == sum(v.nbytes for v in h.values())
    # Same seed: the float16 weights are the float32 ones rounded.
    name = "model.layers.0.mlp.experts.5.up_proj.weight"
    np.testing.assert_array_equal(h[name], s[name].astype(np.float16))
    assert json.loads((a / "config.json").read_text())["dtype"] == "float16"
    model = OlmoeForCausalLM.from_pretrained(str(a), dtype=torch.float32)
    assert model.config.num_hidden_layers == 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def _bench_script():
    path = SCRIPT.parent / "bench_causal_decode.py"
    spec = importlib.util.spec_from_file_location("bench_causal_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_exports_validated_and_the_decode_bench_counts_k_experts(tmp_path):
    """The published per-expert layout goes through the exporter's PyTorch validation, and the
    decode bench on the artifact counts the bytes of k experts a layer."""
    pytest.importorskip("torch")
    from swapmoe_edge.artifact.manifest import load_manifest
    from swapmoe_export import export_checkpoint

    ckpt = tmp_path / "ckpt"
    assert msc.main(["--shape", "olmoe-tiny", "-o", str(ckpt), "--quiet"]) == 0
    art = export_checkpoint(ckpt, tmp_path / "art", quiet=True)
    m = load_manifest(art)
    assert m.extra["family"] == "causal" and m.extra["hf_architecture"] == "OlmoeForCausalLM"
    out = _bench_script().run(str(art), threads=1, tokens=3, requests=1, prompt_len=5, profile=False)
    expert = next(iter(m.experts.values())).nbytes
    assert out["top_k"] == 4 and out["bytes_by_part"]["experts (top-4)"] == 2 * 4 * expert
    assert out["ratio_median"] > 0 and len(out["plain_ms_per_token_by_request"]) == 1
