"""export_checkpoint hands a decoder-only checkpoint to its own driver with every option it was given."""

import json

import pytest

from swapmoe_export import causal_export, exporter


def test_decoder_only_checkpoint_gets_every_dense_option(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    seen = {}
    monkeypatch.setattr(causal_export, "export_causal", lambda model_dir, out_dir, **kw: seen.update(kw) or out_dir)
    exporter.export_checkpoint(tmp_path, tmp_path / "art", dtype="int4", block_size=64, accuracy_level=0,
                               lm_head="int4", force=True, validate=False)
    assert {k: seen[k] for k in ("dtype", "block_size", "accuracy_level", "lm_head", "force", "validate")} == {
        "dtype": "int4", "block_size": 64, "accuracy_level": 0, "lm_head": "int4", "force": True, "validate": False}


@pytest.mark.parametrize("arch", ["SwitchTransformersForConditionalGeneration", None])
def test_other_checkpoints_stay_with_the_switch_exporter(tmp_path, arch):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch]} if arch else {}))
    assert not causal_export.is_causal(tmp_path)
