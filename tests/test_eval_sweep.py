"""Evaluation (ROUGE, fidelity to full, aggregated cost) and the resumable budget sweep."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("rouge_score")

from swapmoe_edge.core.errors import InputError  # noqa: E402
from swapmoe_edge.lab.evaluate import evaluate, lead_baseline, rouge  # noqa: E402

from tiny import export_tiny, words  # noqa: E402

MEASURES = ("ttft_ms", "decode_ms_per_token", "request_ms", "peak_rss_bytes", "bytes_read", "swaps", "stall_ms",
            "first_choice_resident", "rouge1", "rouge2", "rougeL", "budget_bytes", "exact")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("evalsweep"), seed=41, num_experts=8,
                       num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Five documents of tiny-vocabulary words; each reference is a few of its words."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("evaldata") / "docs.jsonl"
    recs = []
    for n in (14, 9, 20, 11, 16):
        ids = rng.integers(3, 96, n).tolist()
        recs.append({"text": words(ids), "summary": words(ids[:3])})
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def _in_unit(res):
    return all(0.0 <= res[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))


def test_full_scores_in_range_and_is_faithful_to_itself(art, data):
    res = evaluate(art, data, "full", "auto", max_new_tokens=4, batch_size=2, keep_outputs=True, quiet=True)
    assert _in_unit(res) and res["exact"] is True and res["documents"] == 5 and res["requests"] == 3
    assert res["fidelity"]["reference"] == "self"
    # a second full run, scored against the first one's saved outputs: identical, token for token
    again = evaluate(art, data, "full", "auto", max_new_tokens=4, batch_size=2, reference_outputs=res["outputs"], quiet=True)
    fid = again["fidelity"]
    assert fid["reference"] == "given" and fid["exact_match"] == 1.0
    assert fid["rouge1"] == fid["rouge2"] == fid["rougeL"] == 1.0
    for k in MEASURES:
        assert k in again
    assert again["peak_rss_bytes"] > 0 and again["budget_bytes"] >= again["baseline_bytes"]


def test_a_lossy_policy_at_a_low_budget_says_so_and_measures_fidelity_against_a_full_run(art, data):
    res = evaluate(art, data, "prune", "13%", max_new_tokens=4, quiet=True)
    assert res["exact"] is False and _in_unit(res)
    fid = res["fidelity"]
    assert fid["reference"] == "full run" and 0.0 <= fid["exact_match"] < 1.0
    assert all(0.0 <= fid[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert res["first_choice_resident"] < 1.0


def test_runtime_settings_reach_the_evaluated_run_and_residents_are_reported_per_layer(art, data):
    kw = dict(max_new_tokens=4, compare_to_full=False, quiet=True)
    even = evaluate(art, data, "swapmoe", "40%", config={"decoder_weight": 1.0}, **kw)
    heavy = evaluate(art, data, "swapmoe", "40%", config={"decoder_weight": 50.0}, **kw)
    for res in (even, heavy):
        assert sum(res["resident_experts_per_layer"].values()) == res["resident_experts"]
    decoder = lambda res: sum(n for k, n in res["resident_experts_per_layer"].items() if k.startswith("dec."))  # noqa: E731
    assert decoder(heavy) > decoder(even)
    with pytest.raises(InputError, match="decoder_weight"):
        evaluate(art, data, "swapmoe", "40%", config={"decoder_weight": 0.0}, **kw)


def test_an_exact_policy_matches_full_token_for_token(art, data):
    res = evaluate(art, data, "on-demand", "13%", max_new_tokens=4, quiet=True)
    assert res["exact"] is True and res["fidelity"]["exact_match"] == 1.0
    assert res["loads"] > 0 and res["bytes_read"] > 0 and res["stall_ms"] > 0


def test_lead_baseline_matches_a_hand_computed_rouge(tmp_path):
    path = tmp_path / "lead.jsonl"
    path.write_text(json.dumps({"text": "a b c d e f g h i j", "summary": "a b x"}) + "\n\n"
                    + json.dumps({"text": "p q r", "summary": "p q r"}) + "\n")
    res = lead_baseline(path)
    # doc 1, lead-8 "a b c d e f g h" vs "a b x": unigrams P 2/8 R 2/3 -> F 4/11; bigrams P 1/7 R 1/2 -> F 2/9;
    # LCS "a b" as unigrams. Doc 2: the lead is the reference, 1 everywhere.
    assert res["documents"] == 2 and res["baseline"] == "lead-8"
    assert res["rouge1"] == pytest.approx((4 / 11 + 1) / 2)
    assert res["rouge2"] == pytest.approx((2 / 9 + 1) / 2)
    assert res["rougeL"] == pytest.approx((4 / 11 + 1) / 2)
    assert lead_baseline(path, n_words=2, limit=1)["rouge1"] == pytest.approx(0.8)  # "a b": P 1, R 2/3


def test_fidelity_counts_two_identical_empty_outputs_as_one():
    # doc 1: both empty -> 1; doc 2: one shared unigram of two, no shared bigram
    assert rouge(["", "w5 w6"], ["", "w5 w7"], identical_is_one=True) == {"rouge1": 0.75, "rouge2": 0.5, "rougeL": 0.75}
    assert rouge([""], [""])["rouge1"] == 0.0  # against references rouge-score's own rule stands


def test_a_record_without_summary_is_named_by_its_line(art, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "w5 w6", "summary": "w5"}) + "\n\n" + json.dumps({"text": "w7 w8"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:3 has no string field `summary`"):
        evaluate(art, path, "full", "auto", quiet=True)
    plain = tmp_path / "plain.txt"
    plain.write_text("w5 w6\n")
    with pytest.raises(InputError, match="plain text"):
        lead_baseline(plain)


def test_cli_eval_prints_scores_baseline_and_fidelity(art, data):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "swapmoe_edge", "eval", "--artifact", str(art), "--data", str(data),
                        "--policy", "swapmoe", "--budget", "25%", "--max-new-tokens", "3", "--limit", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ROUGE-1/2/L" in r.stdout and "lead-8" in r.stdout and "fidelity" in r.stdout and "approximate" in r.stdout
    assert "3/3 docs" in r.stderr  # progress
    bad = subprocess.run([sys.executable, "-m", "swapmoe_edge", "eval", "--artifact", str(art), "--data", str(data),
                          "--limit", "0", "--json"], capture_output=True, text=True)
    assert bad.returncode == 2 and "limit" in bad.stderr and "Traceback" not in bad.stderr


# -- sweep ----------------------------------------------------------------------------------------


def test_sweep_writes_every_measure_and_resumes_without_rerunning_cells(art, data, tmp_path, monkeypatch):
    from swapmoe_edge.lab import sweep as sweep_mod

    out = tmp_path / "sweep"
    kw = dict(budgets=("100%", "25%"), policies=("prune", "swapmoe"), planners=("importance",), limit=4,
              max_new_tokens=3, quiet=True)
    res = sweep_mod.sweep(art, data, out, **kw)
    cells = sorted((out / "cells").glob("*.json"))
    assert [c.stem for c in cells] == ["full__100pct", "prune__100pct__importance", "prune__25pct__importance",
                                       "swapmoe__100pct__importance", "swapmoe__25pct__importance"]
    assert not res["failed"] and len(res["cells"]) == 5
    for c in cells:
        cell = json.loads(c.read_text())
        assert "error" not in cell
        for k in MEASURES:
            assert cell[k] is not None, (c.name, k)
        assert cell["peak_rss_bytes"] > 0 and cell["budget_bytes"] > 0
        assert cell["fidelity"]["exact_match"] is not None and len(cell["outputs"]) == 4
    full = json.loads((out / "cells" / "full__100pct.json").read_text())
    low = json.loads((out / "cells" / "swapmoe__25pct__importance.json").read_text())
    assert full["fidelity"]["exact_match"] == 1.0 and low["exact"] is False
    assert low["fidelity"]["reference"] == "given"  # the full cell's saved outputs, not a new full run

    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and all(r["peak_rss_bytes"] and r["budget_bytes"] and r["fidelity_rouge2"] for r in rows)
    assert {r["policy"] for r in rows} == {"full", "prune", "swapmoe"}
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["lead_baseline"]["documents"] == 4 and "outputs" not in summary["cells"][0]
    table = (out / "sweep.md").read_text().splitlines()
    assert len([ln for ln in table if ln.startswith("| full ") or ln.startswith("| prune ")
                or ln.startswith("| swapmoe ")]) == 5
    assert table[2].split(" | ")[14] == "1.00"  # full's decode time against itself
    assert "first 8 words" in table[-1]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["decode_ms_vs_budget.png", "peak_rss_vs_budget.png", "rouge2_vs_budget.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    # resume: no cell process runs again, and no cell file is rewritten
    mtimes = {c: c.stat().st_mtime_ns for c in cells}

    def no_process(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(sweep_mod, "_run_cell_process", no_process)
    again = sweep_mod.sweep(art, data, out, **kw)
    assert {c: c.stat().st_mtime_ns for c in cells} == mtimes
    assert [r["cell"] for r in again["cells"]] == [r["cell"] for r in res["cells"]]
    with pytest.raises(InputError, match="other settings"):
        sweep_mod.sweep(art, data, out, **{**kw, "max_new_tokens": 5})


def test_sweep_plans_full_once_and_on_demand_with_one_planner():
    from swapmoe_edge.lab.sweep import plan_cells

    cells = plan_cells(["100%", "50%"], ["on-demand", "full", "swapmoe"], ["importance", "uniform"])
    names = [c.name for c in cells]
    assert names[0] == "full__100pct" and names.count("full__100pct") == 1
    assert [n for n in names if n.startswith("on-demand")] == ["on-demand__100pct__importance", "on-demand__50pct__importance"]
    assert len([n for n in names if n.startswith("swapmoe")]) == 4


def test_deterministic_cells_say_so_and_a_timing_dependent_cell_says_why_not(art, data, tmp_path):
    from swapmoe_edge.lab.sweep import sweep

    kw = dict(budgets=("25%",), policies=("swapmoe",), planners=("importance",), limit=3, max_new_tokens=3,
              quiet=True, plots=False)
    det = sweep(art, data, tmp_path / "det", deterministic=True, **kw)
    cell = json.loads((tmp_path / "det" / "cells" / "swapmoe__25pct__importance.json").read_text())
    assert cell["deterministic"] is True and cell["nondeterminism"] == [] and cell["settings"]["deterministic"] is True
    assert all(r["deterministic"] is True for r in det["cells"])
    with open(tmp_path / "det" / "sweep.csv") as f:
        assert {r["deterministic"] for r in csv.DictReader(f)} == {"True"}
    assert "| deterministic |" in (tmp_path / "det" / "sweep.md").read_text()
    sweep(art, data, tmp_path / "off", deterministic=False, **kw)
    cell = json.loads((tmp_path / "off" / "cells" / "swapmoe__25pct__importance.json").read_text())
    assert cell["deterministic"] is False and "deterministic is off" in cell["nondeterminism"][0]
    sweep(art, data, tmp_path / "default", **kw)  # swapmoe's own default: deterministic
    path = tmp_path / "default" / "cells" / "swapmoe__25pct__importance.json"
    cell = json.loads(path.read_text())
    assert cell["deterministic"] is True and cell["settings"]["deterministic"] is None
    # a cell from before the setting existed (the timed swapper) is not resumed as if it were the same
    del cell["settings"]["deterministic"]
    path.write_text(json.dumps(cell))
    with pytest.raises(InputError, match="deterministic: 'not recorded' there, None now"):
        sweep(art, data, tmp_path / "default", **kw)


def test_cli_eval_deterministic_runs_are_identical(art, data):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "swapmoe_edge", "eval", "--artifact", str(art), "--data", str(data), "--policy",
           "swapmoe", "--budget", "25%", "--max-new-tokens", "4", "--threads", "1", "--deterministic", "--json", "--quiet"]
    runs = [subprocess.run(cmd, capture_output=True, text=True) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    res = [json.loads(r.stdout) for r in runs]
    assert all(x["deterministic"] is True for x in res)
    assert res[0]["rouge2"] == res[1]["rouge2"] and res[0]["fidelity"] == res[1]["fidelity"]


# -- without the eval extra ------------------------------------------------------------------------

# Runs the CLI with these modules' imports blocked, as in a runtime-only install.
_BLOCKED_CLI = ("import sys\n"
                "for name in sys.argv[1].split(','):\n"
                "    sys.modules[name] = None\n"
                "sys.argv = ['swapmoe'] + sys.argv[2:]\n"
                "from swapmoe_edge.cli.main import main\n"
                "main()\n")


@pytest.mark.parametrize("verb, blocked", [("eval", "rouge_score"), ("sweep", "rouge_score"), ("sweep", "matplotlib")])
def test_eval_and_sweep_without_the_eval_extra_stop_at_once_with_one_line_and_leave_nothing(art, data, tmp_path,
                                                                                           verb, blocked):
    import os
    import subprocess
    import sys

    out, cache = tmp_path / "sweep", tmp_path / "cache"
    # eval without --artifact would export the embedded model into the cache first: it must not get that far
    args = ["eval", "--data", str(data)] if verb == "eval" else ["sweep", str(art), "--data", str(data), "-o", str(out)]
    r = subprocess.run([sys.executable, "-c", _BLOCKED_CLI, blocked, *args], capture_output=True, text=True,
                       env={**os.environ, "SWAPMOE_CACHE_DIR": str(cache)}, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and blocked in lines[0], r.stderr
    assert 'pip install "swapmoe-edge[eval]"' in lines[0]
    assert not out.exists() and not cache.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
