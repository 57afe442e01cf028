"""The shipped decoder-only yardstick (model_data/mixtral-debian): it loads in Hugging Face, its
prompts are the ones it was trained on, and it exports and summarises as HF generates."""

import json
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from swapmoe_edge.runtime.embedded import MODEL_DATA, shipped_models  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_edge.runtime.requests import encode_prompts  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import train_causal_summarizer as trainer  # noqa: E402

CKPT = MODEL_DATA / "mixtral-debian"
DOCS = [  # made up, in the corpus's style: a short one and one longer than the 64 tokens kept
    "A command-line tool to convert images between formats.",
    "This package provides the Python 3 bindings for libfoo, a library to parse and write FOO files. "
    "It supports streaming input, random access and validation against the schema.\n"
    "This package contains the development headers and static libraries, together with the "
    "documentation generated from the sources and a set of examples that show how to use every "
    "part of the interface from C, C++ and Python programs.",
    "GNU Emacs mode for editing YAML files\nFeatures:\n - syntax highlighting\n - indentation",
]


@pytest.fixture(scope="module")
def hf():
    return transformers.MixtralForCausalLM.from_pretrained(CKPT, dtype=torch.float32).eval()


def test_the_yardstick_is_shipped_and_loads_as_a_top2_moe(hf):
    assert "mixtral-debian" in shipped_models()
    c = hf.config
    assert (c.num_local_experts, c.num_experts_per_tok, c.vocab_size) == (32, 2, 8192)
    template = json.loads((CKPT / "swapmoe.json").read_text())["prompt_template"]
    assert template == trainer.PROMPT_TEMPLATE
    size = sum(p.stat().st_size for p in CKPT.iterdir())
    assert size < 40e6, size


def test_the_runtime_builds_the_prompts_it_was_trained_on():
    """What summarize feeds the model is what train_causal_summarizer.py trained it on."""
    tok = trainer.prompt_tokenizer(CKPT / "tokenizer.json")
    limit = json.loads((CKPT / "tokenizer_config.json").read_text())["model_max_length"]
    served = Tokenizer.from_file(str(CKPT / "tokenizer.json"))  # as the runtime loads it
    with pytest.warns(UserWarning, match="tokens; truncated to 64 to fit the prompt template"):
        ids, cut = encode_prompts(served, DOCS, trainer.PROMPT_TEMPLATE, limit, root=CKPT)
    assert cut == [False, True, False]
    assert ids == [tok.encode(trainer.render_prompt(tok, d, 64)).ids for d in DOCS]
    assert trainer.EOS not in ids[0]  # a prompt is tokenised as it is, no closing </s>


def test_the_shipped_files_export_and_summarise_as_hf_generates(hf, tmp_path):
    art = export_checkpoint(CKPT, tmp_path / "art", quiet=True)  # validated against PyTorch
    tok = trainer.prompt_tokenizer(CKPT / "tokenizer.json")
    prompts = [tok.encode(trainer.render_prompt(tok, d, 64)).ids for d in DOCS]
    want = trainer.summarize(hf, tok, prompts, 32)
    with Runtime(art, RuntimeConfig(policy="full", threads=1)) as rt:
        with pytest.warns(UserWarning):
            got = rt.summarize(DOCS, max_new_tokens=32)
    assert [r.summary for r in got] == want
