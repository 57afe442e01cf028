"""Tests for scripts/make_synthetic_checkpoint.py (tiny shape only; fast)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic_checkpoint.py"
INDEX = "model.safetensors.index.json"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


msc = _load_script()


def _read_all(ckpt: Path) -> dict:
    index = json.loads((ckpt / INDEX).read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(ckpt / fname), framework="numpy") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    assert msc.main(["--shape", "tiny", "-o", str(out), "--seed", "0", "--quiet"]) == 0
    return out


def test_loads_in_transformers_and_forward_is_finite(tiny_ckpt):
    torch = pytest.importorskip("torch")
    from transformers import SwitchTransformersForConditionalGeneration

    model, info = SwitchTransformersForConditionalGeneration.from_pretrained(
        str(tiny_ckpt), output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    # The weights really come from the files (not re-initialised), and the embeddings are tied.
    saved = _read_all(tiny_ckpt)
    name = "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight"
    np.testing.assert_array_equal(model.state_dict()[name].numpy(), saved[name])
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), saved["shared.weight"])
    assert model.config.decoder_start_token_id == 0
    model.eval()
    ids = torch.randint(2, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids[:, :5])
    assert out.logits.shape == (2, 5, model.config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_tensor_names_match_hf_state_dict(tiny_ckpt):
    pytest.importorskip("torch")
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig.from_pretrained(str(tiny_ckpt))
    model = SwitchTransformersForConditionalGeneration(config)
    tied = set(SwitchTransformersForConditionalGeneration._tied_weights_keys)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    saved = _read_all(tiny_ckpt)
    assert set(saved) == set(expected)
    assert {k: v.shape for k, v in saved.items()} == expected
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in saved.values())
    index = json.loads((tiny_ckpt / INDEX).read_text())
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in saved.values())


def test_sharding_small_max_shard_size(tmp_path, tiny_ckpt):
    out = tmp_path / "sharded"
    assert msc.main(["--shape", "tiny", "-o", str(out), "--max-shard-size", "20KB", "--quiet"]) == 0
    index = json.loads((out / INDEX).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3
    n = len(shards)
    assert shards == {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
    for fname in shards:
        assert (out / fname).is_file()
        with safe_open(str(out / fname), framework="numpy") as fh:
            keys = set(fh.keys())
        assert keys == {k for k, v in index["weight_map"].items() if v == fname}
    assert not list(out.glob("*.tmp"))
    # Same seed -> same weights, whatever the sharding.
    a, b = _read_all(out), _read_all(tiny_ckpt)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_output_path_is_a_file_fails_cleanly(tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("keep me")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "-o", str(target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert target.read_text() == "keep me"


def test_foreign_nonempty_dir_refused_but_own_output_rewritten(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    assert msc.main(["--shape", "tiny", "-o", str(foreign), "--quiet"]) != 0
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]

    own = tmp_path / "own"
    assert msc.main(["--shape", "tiny", "-o", str(own), "--quiet", "--max-shard-size", "20KB"]) == 0
    assert msc.main(["--shape", "tiny", "-o", str(own), "--quiet"]) == 0  # re-run replaces old shards
    assert sorted(p.name for p in own.glob("model-*.safetensors")) == ["model-00001-of-00001.safetensors"]


def test_script_imports_neither_torch_nor_transformers():
    code = (f"import runpy, sys; runpy.run_path({str(SCRIPT)!r}, run_name='x'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_not_enough_disk_space_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(msc, "free_bytes", lambda out: 1000)
    out = tmp_path / "full"
    assert msc.main(["--shape", "tiny", "-o", str(out), "--quiet"]) != 0
    assert "not enough disk space" in capsys.readouterr().err
    assert not out.exists()
