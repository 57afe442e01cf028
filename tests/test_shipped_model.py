"""The shipped embedded model: it loads, exports on first use, and summarises a text of our
own to exactly the tokens of Hugging Face `generate` (greedy and beam search)."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from swapmoe_edge.runtime import embedded  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402
from swapmoe_edge.cli.main import main  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402

from tiny import hf_generate  # noqa: E402

# Written for this test; not from the corpus.
TEXT = (
    "swapmoe-edge runs mixture-of-experts language models inside a memory budget on small "
    "devices. It keeps the most important experts in memory, routes each token only to them "
    "and swaps experts from flash storage in the background.\n"
    "This package contains the command-line tool and the Python library."
)
SECOND = "A small terminal game in which a snake eats apples and grows longer. Written in C with ncurses."


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SWAPMOE_CACHE_DIR", str(cache))
    try:
        # validate: the device exports without torch; here the same export is checked against PyTorch.
        yield embedded.default_artifact(export_checkpoint, quiet=True, validate=True)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def hf_model():
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        embedded.EMBEDDED_DIR, dtype=torch.float32)
    return model.eval()


def _hf_tokens(model, texts, num_beams, max_new_tokens=32):
    """HF's tokens for TEXTS cut as the runtime cuts them: to the tokenizer's model_max_length
    (the model's training length), keeping the closing </s>."""
    tok = Tokenizer.from_file(str(embedded.EMBEDDED_DIR / "tokenizer.json"))
    limit = json.loads((embedded.EMBEDDED_DIR / "tokenizer_config.json").read_text())["model_max_length"]
    rows = [e.ids if len(e.ids) <= limit else e.ids[:limit - 1] + e.ids[-1:] for e in tok.encode_batch(texts)]
    return hf_generate(model, rows, max_new_tokens, num_beams), tok


def test_shipped_checkpoint_has_the_promised_shape():
    cfg = json.loads((embedded.EMBEDDED_DIR / "config.json").read_text())
    assert cfg["model_type"] == "switch_transformers" and cfg["num_experts"] >= 16
    size = sum(p.stat().st_size for p in embedded.EMBEDDED_DIR.glob("*.safetensors"))
    assert size <= 40e6, f"checkpoint is {size / 1e6:.1f} MB; the limit is 40 MB"
    assert (embedded.EMBEDDED_DIR / "README.md").is_file(), "the model card is missing"


def test_the_first_use_export_of_the_shipped_checkpoint_validates_against_pytorch(artifact):
    from swapmoe_edge.artifact.manifest import load_manifest

    report = load_manifest(artifact, verify=True).validation
    assert report and report["passed"] and report["compared"] > 0


@pytest.mark.parametrize("num_beams", [1, 3])
def test_summary_matches_hf_generate_token_for_token(artifact, hf_model, num_beams):
    want, tok = _hf_tokens(hf_model, [TEXT, SECOND], num_beams)
    with Runtime(artifact, RuntimeConfig(policy="full", budget="auto")) as rt:
        got = rt.summarize([TEXT, SECOND], num_beams=num_beams)
    assert [r.token_ids for r in got] == want
    assert all(r.summary and r.summary == tok.decode(w, skip_special_tokens=True).strip() for r, w in zip(got, want))


def test_cli_summarize_uses_the_embedded_model_by_default(artifact, hf_model, monkeypatch):
    monkeypatch.setenv("SWAPMOE_CACHE_DIR", str(artifact.parent))  # the export the fixture made
    want, tok = _hf_tokens(hf_model, [TEXT], 1)
    res = CliRunner().invoke(main, ["summarize", "--policy", "full", TEXT])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == tok.decode(want[0], skip_special_tokens=True).strip()
    assert "budget" in lines[1] and "decode" in lines[1] and "ms/token" in lines[1]
