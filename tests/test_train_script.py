"""scripts/train_summarizer.py runs end to end on a tiny corpus of our own and writes a
checkpoint that HF loads, with the Switch-paper router initialisation."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("rouge_score")


def _load_script(name: str):
    """A script of scripts/ as a module (scripts/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_summarizer = _load_script("train_summarizer")

TOPICS = ["terminal game", "image viewer", "mail client", "music player", "text editor", "web browser"]


def _corpus(path: Path) -> Path:
    path.mkdir()
    for split, n in (("train", 60), ("validation", 6)):
        with open(path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                topic = TOPICS[i % len(TOPICS)]
                text = (f"pkg{i} is a small {topic} written in C. It starts fast, needs little memory "
                        f"and works well on old computers. Version {i} adds themes.")
                f.write(json.dumps({"text": text, "summary": f"small {topic}"}) + "\n")
    return path


def test_training_writes_a_loadable_switch_checkpoint(tmp_path):
    data, out = _corpus(tmp_path / "corpus"), tmp_path / "ckpt"
    args = ["--data", str(data), "-o", str(out), "--max-steps", "4", "--max-minutes", "0", "--eval-every", "4",
            "--eval-docs", "3", "--vocab-size", "300", "--d-model", "32", "--d-ff", "64", "--heads", "2",
            "--layers", "2", "--experts", "4", "--batch-size", "8", "--threads", "1", "--max-target-len", "8"]
    assert train_summarizer.main(args) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["evals"][-1]["step"] == 4 and 0.0 <= log["evals"][-1]["rouge2"] <= 1.0
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_experts == 4 and model.config.d_model == 32
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 128
    assert "<copy>" not in (out / "tokenizer.json").read_text()  # only with --copy-fraction


def test_router_init_follows_the_switch_paper_not_hfs_std_one():
    args = train_summarizer.parse_args(["--data", "x", "-o", "y", "--d-model", "64", "--d-ff", "128", "--heads", "2",
                                        "--layers", "2", "--experts", "4"])
    config = train_summarizer.make_config(args, 300)
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    router = next(m for n, m in model.named_modules() if n.endswith("router.classifier"))
    assert router.weight.std().item() > 0.5  # HF's own init
    train_summarizer.init_switch_weights(model, config, 0.1)
    std = router.weight.std().item()
    assert std < 2 * math.sqrt(0.1 / 64) and router.weight.abs().max().item() <= 2 * math.sqrt(0.1 / 64) + 1e-6


def test_span_copy_pairs_are_runs_of_the_documents_own_words(tmp_path):
    import random

    data = _corpus(tmp_path / "corpus")
    train = train_summarizer.load_jsonl(data / "train.jsonl")
    args = train_summarizer.parse_args(["--data", "x", "-o", "y", "--span-copy-words", "10", "--span-copy-per-doc", "3"])
    tok = train_summarizer.train_tokenizer([r["text"] for r in train], 300)
    src = train_summarizer.encode(tok, [r["text"] for r in train], args.max_source_len)
    pairs = train_summarizer.span_pairs(tok, train, src, args, random.Random(0))
    assert len(pairs) == 3 * len(train)
    lengths = set()
    for k, (s, t) in enumerate(pairs):
        words = train[k // 3]["text"].split()[:10]
        assert s == src[k // 3]  # the input is the whole document, unchanged
        span = tok.decode(t, skip_special_tokens=True).split()
        lengths.add(len(span))
        assert 2 <= len(span) <= 8
        assert any(words[i:i + len(span)] == span for i in range(len(words) - len(span) + 1)), span
    assert len(lengths) > 3  # lengths vary, spans are not all the opening


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_adafactor_steps_are_relative_to_each_tensors_scale(name):
    args = train_summarizer.parse_args(["--data", "x", "-o", "y", "--d-model", "64", "--d-ff", "128", "--heads", "2",
                                        "--layers", "2", "--experts", "4", "--optimizer", name, "--lr", "1e-2"])
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(train_summarizer.make_config(args, 300))
    params = dict(model.named_parameters())
    emb, query = params["shared.weight"], params["encoder.block.0.layer.0.SelfAttention.q.weight"]
    assert emb.std() > 20 * query.std()  # T5's initialisation: very different scales
    before = {k: p.detach().clone() for k, p in (("emb", emb), ("query", query))}
    opt = train_summarizer.make_optimizer(model, args)
    ids = torch.randint(3, 300, (4, 12))
    model(input_ids=ids, labels=ids[:, :5].clone()).loss.backward()
    opt.step()
    rel = {k: ((p - before[k]).norm() / before[k].norm()).item() for k, p in (("emb", emb), ("query", query))}
    if name == "adafactor":
        assert 0.2 < rel["query"] / rel["emb"] < 5
    else:
        assert rel["query"] / rel["emb"] > 10
