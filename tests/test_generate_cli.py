"""`swapmoe generate` and `summarize` on decoder-only artifacts (prompt templates), `--model NAME`
for the shipped models, on tiny models built in-process."""

import json

import pytest

pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from swapmoe_edge.cli.main import main  # noqa: E402
from swapmoe_edge.core.errors import InputError  # noqa: E402
from swapmoe_edge.runtime import embedded  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_edge.runtime.requests import encode_prompts  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402

import causal_tiny as ct  # noqa: E402
from tiny import save_tiny  # noqa: E402

TEMPLATE = "{document} w90 w91"  # the template's own tokens: two


def _tokenizer():
    """Word level over "w4".."w{V-1}", <pad>=0, <s>=1, <unk>=2, </s>=3, no post-processor (a prompt as it is)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": ct.PAD, "<s>": 1, "<unk>": 2, "</s>": ct.EOS, **{f"w{i}": i for i in range(4, ct.VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "<unk>", "</s>"])
    return tok


def _words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """(HF model, tokenizer, artifact with the template, artifact without one, checkpoint with the template)."""
    root = tmp_path_factory.mktemp("gen")
    model = ct.build("mixtral", seed=3)
    plain = ct.save(model, root / "ck-plain")
    _tokenizer().save(str(plain / "tokenizer.json"))
    templated = ct.save(model, root / "ck-templated")
    _tokenizer().save(str(templated / "tokenizer.json"))
    (templated / "swapmoe.json").write_text(json.dumps({"prompt_template": TEMPLATE}))
    return (model, _tokenizer(), export_checkpoint(templated, root / "art-templated", quiet=True),
            export_checkpoint(plain, root / "art-plain", quiet=True, validate=False), templated)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_generate_json_gives_the_text_and_the_generated_ids_of_hf_greedy(causal):
    model, tok, art, _, _ = causal
    prompts = ct.prompts(seed=5, n=2)
    r = _run("generate", "--artifact", art, "--policy", "full", "--json", "--max-new-tokens", 6, "--quiet",
             *map(_words, prompts))
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["token_ids"] for row in rows] == ct.hf_greedy(model, prompts, 6)
    assert [row["text"] for row in rows] == [tok.decode(row["token_ids"], skip_special_tokens=True) for row in rows]
    assert all(set(row) >= {"text", "token_ids", "exact", "stats"} for row in rows)


def test_generate_streams_the_text_that_json_gives(causal):
    _, _, art, _, _ = causal
    prompt = _words(ct.prompts(seed=6, n=1)[0])
    streamed = _run("generate", "--artifact", art, "--policy", "full", "--max-new-tokens", 6, prompt)
    as_json = _run("generate", "--artifact", art, "--policy", "full", "--max-new-tokens", 6, "--json", "--quiet", prompt)
    assert streamed.exit_code == 0 and as_json.exit_code == 0, streamed.output + as_json.output
    assert streamed.stdout == json.loads(as_json.stdout)["text"] + "\n"
    assert "[full, exact]" in streamed.stderr  # the stats line, as summarize writes it


def test_summarize_on_a_decoder_only_artifact_applies_its_template(causal):
    model, tok, art, _, _ = causal
    docs = [_words(p) for p in ct.prompts(seed=7, n=2)]
    with Runtime(art, RuntimeConfig(policy="full")) as rt:
        got = [r.token_ids for r in rt.summarize(docs, max_new_tokens=5)]
    prompts = [tok.encode(TEMPLATE.replace("{document}", d)).ids for d in docs]
    assert all(p[-2:] == [90, 91] for p in prompts)
    assert got == ct.hf_greedy(model, prompts, 5)


def test_summarize_on_a_decoder_only_artifact_without_template_is_refused(causal):
    _, _, _, plain, _ = causal
    r = _run("summarize", "--artifact", plain, "--policy", "full", "w5 w6 w7")
    assert r.exit_code == 2 and "prompt template" in r.stderr and "swapmoe generate" in r.stderr
    r = _run("generate", "--artifact", plain, "--policy", "full", "--max-new-tokens", 2, "--quiet", "w5 w6 w7")
    assert r.exit_code == 0, r.output  # generate needs none


def test_a_long_document_is_cut_so_that_the_template_fits():
    tok = _tokenizer()
    doc = _words(range(10, 40))  # 30 tokens
    with pytest.warns(UserWarning, match="tokens; truncated to 10 to fit the prompt template"):
        (row,), (cut,) = encode_prompts(tok, [doc], TEMPLATE, 12, root=".")
    assert cut and row == list(range(10, 20)) + [90, 91]
    (row,), (cut,) = encode_prompts(tok, ["w5 w6"], TEMPLATE, 12, root=".")
    assert not cut and row == [5, 6, 90, 91]
    with pytest.raises(InputError, match="no room"):
        encode_prompts(tok, [doc], TEMPLATE, 2, root=".")
    with pytest.raises(InputError, match="document"):
        encode_prompts(tok, [doc], "no slot", 12, root=".")


def test_a_long_prompt_keeps_its_last_tokens(causal):
    _, _, art, _, _ = causal
    with Runtime(art, RuntimeConfig(policy="full", max_source_tokens=8)) as rt:
        with pytest.warns(UserWarning, match="last tokens kept"):
            ids, cut = rt.encode_texts([_words(range(10, 30))])
    assert cut == [True] and ids == [list(range(22, 30))]


@pytest.mark.parametrize("args, said", [
    (["--artifact", "a", "--model", "b", "x"], "not both"),
    (["--model", "no-such-model", "x"], "no shipped model is called 'no-such-model'"),
    ([], "nothing to continue"),
    (["--max-new-tokens", "0", "x"], "max-new-tokens"),
])
def test_generate_usage_errors_are_one_line(args, said):
    r = _run("generate", *args)
    assert r.exit_code == 2 and said in r.output


def test_model_names_a_shipped_model_exported_on_first_use(causal, tmp_path, monkeypatch):
    """--model picks a folder of model_data; a decoder-only one summarises through its template,
    and the Switch default answers generate --json (its prompt read as the encoder input)."""
    _, _, _, _, templated = causal
    data = tmp_path / "model_data"
    save_tiny(data / embedded.EMBEDDED_NAME, seed=40)
    (data / "tiny-causal").symlink_to(templated)
    monkeypatch.setattr(embedded, "MODEL_DATA", data)
    monkeypatch.setenv("SWAPMOE_CACHE_DIR", str(tmp_path / "cache"))
    assert embedded.shipped_models() == ["switch-debian", "tiny-causal"]
    r = _run("summarize", "--model", "tiny-causal", "--policy", "full", "--json", "--quiet", "w5 w6 w7")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["token_ids"]
    r = _run("generate", "--policy", "full", "--json", "--quiet", "--max-new-tokens", 3, "w5 w6 w7")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)
    assert isinstance(row["text"], str) and 1 <= len(row["token_ids"]) <= 3
    made = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert made == ["switch-debian", "tiny-causal"]  # each exported into its own cache folder


def test_absent_chooses_what_becomes_of_a_choice_whose_expert_is_not_resident(causal):
    _, _, art, _, _ = causal
    prompts = [_words(p) for p in ct.prompts(seed=8, n=3)]
    got, want = {}, {}
    for absent in ("substitute", "drop"):
        r = _run("generate", "--artifact", art, "--policy", "prune", "--budget", "25%", "--absent", absent, "--json",
                 "--quiet", "--max-new-tokens", 8, *prompts)
        assert r.exit_code == 0, r.output
        got[absent] = [json.loads(line)["token_ids"] for line in r.stdout.splitlines()]
        with Runtime(art, RuntimeConfig(policy="prune", budget="25%", absent=absent)) as rt:
            want[absent] = [res.token_ids for res in rt.generate_texts(prompts, max_new_tokens=8)]
    assert got == want
    assert got["substitute"] != got["drop"]  # 2 of 8 experts a layer resident: many second choices are absent
    r = _run("generate", "--artifact", art, "--absent", "skip", "w5")
    assert r.exit_code == 2 and "'skip' is not one of" in r.output


def test_an_empty_output_says_why_and_how_to_prompt_a_summariser(tmp_path, monkeypatch):
    """The shipped decoder-only model is a summariser: a bare prompt ends at once, and the command
    says so and names the form it was trained on; a prompt in that form is continued."""
    monkeypatch.setenv("SWAPMOE_CACHE_DIR", str(tmp_path / "cache"))
    doc = "Package: vim. Vim is an almost compatible version of the UNIX editor Vi."
    r = _run("generate", "--model", "mixtral-debian", "--policy", "full", "--quiet", doc)
    assert r.exit_code == 0, r.output
    assert r.stdout == "\n"
    assert "note: 1 of 1 outputs are empty" in r.stderr and "'{document}\\nSummary:'" in r.stderr
    r = _run("generate", "--model", "mixtral-debian", "--policy", "full", "--quiet", doc + "\nSummary:")
    assert r.exit_code == 0 and r.stdout.strip(), r.output
    assert "outputs are empty" not in r.stderr


def test_profiling_a_summariser_on_long_documents_says_how_many_were_cut_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SWAPMOE_CACHE_DIR", str(tmp_path / "cache"))
    r = _run("embedded", "--model", "mixtral-debian", "--quiet")
    assert r.exit_code == 0, r.output
    art = r.stdout.strip()
    data = tmp_path / "docs.txt"
    long = " ".join(["vim is a highly configurable text editor"] * 20)
    data.write_text(f"{long}\nshort text about an editor\n{long} again\n")
    r = _run("profile", art, "--data", data, "--max-new-tokens", 2, "-o", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    assert "2 of 3 documents were truncated to the model's input limit" in r.stderr
    assert "warning: input" not in r.stderr  # one line, not one warning a document
