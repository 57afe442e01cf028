"""Quality, fidelity and cost of one policy at one budget on a summarisation set.

    res = evaluate("artifact/", "val.jsonl", policy="swapmoe", budget="33%", limit=500)
    res["rouge2"], res["fidelity"]["rouge2"], res["peak_rss_bytes"]

The data is JSONL with ``text`` and ``summary``. Quality is ROUGE-1/2/L F1 (rouge-score,
Porter stemmer, mean over documents) against the references; fidelity is the same ROUGE
of this policy's summaries against the ``full`` policy's summaries on the same inputs,
plus the share of documents whose token ids match ``full`` exactly. ``lead_baseline`` is
the bar a summariser has to clear: the first eight words of the document.

rouge-score is an optional extra (``pip install "swapmoe-edge[eval]"``), imported only when
scoring, after generation, so it never counts towards the runtime's memory; ``require_eval_extra``
checks that it is installed, without importing it, before any work starts.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from swapmoe_edge.core.errors import InputError, SwapMoEError
from swapmoe_edge.core.textio import read_documents, read_text_file
from swapmoe_edge.core.units import format_size
from swapmoe_edge.lab.streams import order_documents, select_sections
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.runtime.facade import Runtime

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
EVAL_EXTRA = 'pip install "swapmoe-edge[eval]"'


def require_eval_extra(modules: Sequence[str] = ("rouge_score",)) -> None:
    """SwapMoEError (one line, naming the extra) unless ``modules`` of the ``eval`` extra are
    installed. Looks them up without importing them (an import here would count in the measured
    run's memory), so that a missing extra fails before any work, not after generation."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise SwapMoEError(f"this needs the eval extra ({', '.join(missing)} not installed): {EVAL_EXTRA}")


# -- data -------------------------------------------------------------------------------------


def read_pairs(data_path: str | Path, limit: int | None = None, order: str = "file",
               sections: Sequence[str] = (), exclude_sections: Sequence[str] = ()) -> list[dict]:
    """Records of a JSONL file, each with string ``text`` and ``summary``: those of the chosen
    sections (all by default), the first ``limit`` of them, in stream ``order`` (streams.py)."""
    path = Path(data_path)
    docs = read_documents(path)
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, not {limit}")
    lines = read_text_file(path).splitlines()
    line_of = [n for n, ln in enumerate(lines, 1) if ln.strip()]  # read_documents skips blank lines
    if not lines[line_of[0] - 1].lstrip().startswith("{"):
        raise InputError(f"{path} is plain text (one document per line); evaluation needs JSONL records "
                         "with `text` (the document) and `summary` (the reference).")
    for i, rec in enumerate(docs):
        if not isinstance(rec.get("summary"), str):
            raise InputError(f"{path}:{line_of[i]} has no string field `summary`; evaluation needs JSONL "
                             "records with `text` (the document) and `summary` (the reference).")
    docs = select_sections(docs, sections, exclude_sections, where=str(path))
    if limit is not None:
        docs = docs[:limit]
    return order_documents(docs, order, where=str(path))


# -- scoring ------------------------------------------------------------------------------------


def scorer():
    """rouge-score's scorer for ROUGE-1/2/L with stemming, as every figure here uses."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise SwapMoEError(f"ROUGE needs the eval extra ({e}): {EVAL_EXTRA}") from e
    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def paired_se(references: Sequence[str], a: Sequence[str], b: Sequence[str], key: str = "rouge2") -> float:
    """Standard error of the mean per-document difference ``key(b) - key(a)`` against ``references``."""
    assert len(references) == len(a) == len(b) and len(references) > 1
    score = scorer().score
    diffs = [0.0 if x == y else score(ref, y)[key].fmeasure - score(ref, x)[key].fmeasure
             for ref, x, y in zip(references, a, b)]
    mean = sum(diffs) / len(diffs)
    return (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5


def results_paired_se(a: Mapping[str, Any], b: Mapping[str, Any], key: str = "rouge2") -> float:
    """``paired_se`` of two ``evaluate`` results (sweep cells) over the documents they ran on."""
    s = a["settings"]
    docs = read_pairs(s["data"], s["limit"], s["order"], s["sections"], s["exclude_sections"])
    return paired_se([d["summary"] for d in docs], [x["summary"] for x in a["outputs"]],
                     [y["summary"] for y in b["outputs"]], key)


def rouge(targets: Sequence[str], predictions: Sequence[str], *, identical_is_one: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 of ``predictions`` against ``targets``.

    rouge-score gives 0 when both texts have no tokens; for fidelity two identical outputs
    (empty ones included) must score 1, hence ``identical_is_one``.
    """
    assert len(targets) == len(predictions)
    if not targets:
        return {k: 0.0 for k in ROUGE_KEYS}
    score = scorer().score
    sums = dict.fromkeys(ROUGE_KEYS, 0.0)
    for target, pred in zip(targets, predictions):
        if identical_is_one and target == pred:
            for k in ROUGE_KEYS:
                sums[k] += 1.0
            continue
        scores = score(target, pred)
        for k in ROUGE_KEYS:
            sums[k] += scores[k].fmeasure
    return {k: v / len(targets) for k, v in sums.items()}


def lead(text: str, n_words: int = 8) -> str:
    return " ".join(text.split()[:n_words])


def lead_baseline(data_path: str | Path, n_words: int = 8, limit: int | None = None,
                  sections: Sequence[str] = (), exclude_sections: Sequence[str] = ()) -> dict[str, Any]:
    """ROUGE of the first ``n_words`` words of each document against its reference (lead-8)."""
    docs = read_pairs(data_path, limit, sections=sections, exclude_sections=exclude_sections)
    scores = rouge([d["summary"] for d in docs], [lead(d["text"], n_words) for d in docs])
    return {"baseline": f"lead-{n_words}", "n_words": n_words, "documents": len(docs), **scores}


# -- running ------------------------------------------------------------------------------------


def _progress(quiet: bool, label: str, done: int, total: int) -> None:
    if not quiet:
        print(f"eval {label}: {done}/{total} docs", file=sys.stderr, flush=True)


def _generate(artifact, texts: Sequence[str], policy: str, budget: str, planner: str, max_new_tokens: int,
              num_beams: int | None, batch_size: int, threads: int | None, quiet: bool,
              config: Mapping[str, Any] | None = None, profile: str | Path | None = None):
    """Summarise ``texts`` in batches; returns (results, per-request stats, runtime facts).

    ``config``: further RuntimeConfig fields (``decoder_weight``, ``decay``, ...); ``profile``:
    an importance profile file to use instead of the artifact's.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    label = f"{policy} {budget}" + (f" {planner}" if policy != "full" else "")
    results, requests = [], []
    prof = Profile.load(profile) if profile is not None else None
    with Runtime(artifact, RuntimeConfig(policy=policy, budget=budget, planner=planner, threads=threads,
                                         **(config or {})), profile=prof) as rt:
        if prof is not None:
            prof.check_layers({lk: rt.manifest.config.num_experts for lk in rt.sparse}, where=str(profile))
        num_beams = rt.default_num_beams if num_beams is None else num_beams
        facts = {"budget_bytes": int(rt.budget_bytes), "baseline_bytes": int(rt.baseline), "num_beams": num_beams}
        _progress(quiet, label, 0, len(texts))
        for i in range(0, len(texts), batch_size):
            with warnings.catch_warnings():  # counted in the result as truncated_inputs instead
                warnings.filterwarnings("ignore", message=r"input \d+ has \d+ tokens; truncated")
                batch = rt.summarize(texts[i: i + batch_size], max_new_tokens=max_new_tokens, num_beams=num_beams)
            results.extend(batch)
            # The runtime may run a batch in several chunks (its activation envelope): one
            # request each, with its own stats and peak.
            requests.extend({r.stats["request"]: r.stats for r in batch}.values())
            _progress(quiet, label, len(results), len(texts))
        rt.policy.settle()  # deterministic: the last boundary's round is done, so these are reproducible too
        per_layer = dict(rt.residents.counts())
        facts["resident_experts"] = sum(per_layer.values())
        facts["resident_experts_per_layer"] = per_layer
        facts["resident_expert_bytes"] = int(rt.residents.nbytes)
        facts["residents_by_rung"] = rt.residents_by_rung()
    return results, requests, facts


def _aggregate(requests: list[dict]) -> dict[str, Any]:
    """Medians of latencies, max of peak RSS, sums of I/O, over requests (batches)."""
    med = lambda k: statistics.median(r[k] for r in requests)  # noqa: E731
    return {
        "ttft_ms": med("ttft_ms"),
        "decode_ms_per_token": med("decode_ms_per_token"),
        "request_ms": med("request_ms"),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in requests),
        "min_live_budget_bytes": min(r["budget_bytes"] for r in requests),
        "bytes_read": sum(r["bytes_read"] for r in requests),
        "loads": sum(r["loads"] for r in requests),
        "swaps": sum(r["swaps"] for r in requests),
        "stall_ms": sum(r["stall_ms"] for r in requests),
        "boundary_wait_ms": sum(r.get("boundary_wait_ms", 0.0) for r in requests),  # deterministic: waits for rounds
        "first_choice_resident": statistics.fmean(r["first_choice_resident"] for r in requests),
        "low_precision_tokens": sum(r.get("low_precision_tokens", 0) for r in requests),
    }


def _outputs(results) -> list[dict]:
    return [{"summary": r.summary, "token_ids": list(r.token_ids)} for r in results]


def evaluate(artifact: str | Path, data_path: str | Path, policy: str, budget: str, planner: str = "importance",
             limit: int | None = None, max_new_tokens: int = 32, num_beams: int | None = None, batch_size: int = 8,
             reference_outputs: Sequence[Mapping[str, Any]] | None = None, *, compare_to_full: bool = True,
             keep_outputs: bool = False, threads: int | None = None, quiet: bool = False,
             config: Mapping[str, Any] | None = None, order: str = "file", sections: Sequence[str] = (),
             exclude_sections: Sequence[str] = (), profile: str | Path | None = None) -> dict[str, Any]:
    """Summarise the documents of ``data_path`` under ``policy``/``budget``; score and measure.

    Fidelity is against ``reference_outputs`` (``{"summary", "token_ids"}`` per document,
    e.g. a saved ``full`` run) when given; else against a ``full`` run made here *after*
    this policy's run, so that this run's memory readings are not disturbed by it. With
    ``compare_to_full=False`` and no reference, fidelity is left out (``None``).
    ``num_beams`` None: the checkpoint's generation config's. Latency medians are over requests (batches of ``batch_size`` documents). ``config``
    sets further RuntimeConfig fields (``decoder_weight``, ``decay``, ...) of this run.
    ``order``, ``sections``, ``exclude_sections``: the stream (read_pairs); ``profile``: an
    importance profile file instead of the artifact's (e.g. calibrated on other sections).
    ``config={"deterministic": True}``: swaps only at request boundaries (RuntimeConfig).
    """
    require_eval_extra()
    docs = read_pairs(data_path, limit, order, sections, exclude_sections)
    texts = [d["text"] for d in docs]
    if reference_outputs is not None and len(reference_outputs) != len(docs):
        raise InputError(f"reference_outputs has {len(reference_outputs)} entries for {len(docs)} documents; "
                         "make the reference run with the same data and limit.")
    t0 = time.perf_counter()
    results, requests, facts = _generate(artifact, texts, policy, budget, planner, max_new_tokens, num_beams,
                                         batch_size, threads, quiet, config, profile)
    wall_s = time.perf_counter() - t0
    outputs = _outputs(results)

    reference_source = "given"
    if reference_outputs is None and policy == "full":
        reference_outputs, reference_source = outputs, "self"
    elif reference_outputs is None and compare_to_full:
        full, _, _ = _generate(artifact, texts, "full", "auto", planner, max_new_tokens, num_beams, batch_size,
                               threads, quiet)
        reference_outputs, reference_source = _outputs(full), "full run"

    fidelity = None
    if reference_outputs is not None:
        ref_summaries = [str(r["summary"]) for r in reference_outputs]
        same = sum(list(o["token_ids"]) == list(r["token_ids"]) for o, r in zip(outputs, reference_outputs))
        fidelity = {**rouge(ref_summaries, [o["summary"] for o in outputs], identical_is_one=True),
                    "exact_match": same / len(docs), "reference": reference_source}

    stats = _aggregate(requests)
    stats["truncated_inputs"] = sum(bool(r.stats.get("truncated_input")) for r in results)
    why = sorted({w for r in results for w in r.stats.get("nondeterminism", ())})
    out: dict[str, Any] = {
        "artifact": str(artifact),
        "data": str(data_path),
        "policy": policy,
        "budget": str(budget),
        "planner": planner,
        "order": order,
        "sections": list(sections),
        "exclude_sections": list(exclude_sections),
        "profile": str(profile) if profile is not None else None,
        **facts,
        "exact": all(r.exact for r in results),
        # every output is what the same inputs give under any load (RuntimeConfig.deterministic)
        "deterministic": all(r.stats.get("deterministic", False) for r in results),
        "nondeterminism": why,
        "documents": len(docs),
        "requests": len(requests),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        **rouge([d["summary"] for d in docs], [o["summary"] for o in outputs]),
        "fidelity": fidelity,
        **stats,
        "wall_s": wall_s,
    }
    if keep_outputs:
        out["outputs"] = outputs
    return out


def format_report(res: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> str:
    """A few aligned lines for people: scores, the lead baseline, fidelity, cost."""
    r3 = lambda d: " / ".join(f"{d[k]:.4f}" for k in ROUGE_KEYS)  # noqa: E731
    planner = f", planner {res['planner']}" if res["policy"] != "full" else ""
    lines = [
        f"policy        {res['policy']} ({'exact' if res['exact'] else 'approximate'}), budget {res['budget']} = "
        f"{format_size(res['budget_bytes'])}{planner}; {res['documents']} documents",
        f"ROUGE-1/2/L   {r3(res)}",
    ]
    if baseline is not None:
        lines.append(f"{baseline['baseline']:<14}{r3(baseline)}")
    fid = res.get("fidelity")
    if fid is not None:
        lines.append(f"fidelity      {r3(fid)} against full ({fid['reference']}); exact match {fid['exact_match']:.0%}")
    lines += [
        f"latency       ttft {res['ttft_ms']:.1f} ms, decode {res['decode_ms_per_token']:.2f} ms/token, "
        f"request {res['request_ms']:.0f} ms (medians over {res['requests']} request{'s' if res['requests'] != 1 else ''} "
        f"of up to {res['batch_size']} documents)",
        f"memory        peak RSS {format_size(res['peak_rss_bytes'])} (budget {format_size(res['budget_bytes'])}), "
        f"{res['resident_experts']} experts resident, read {format_size(res['bytes_read'])}, {res['loads']} loads, "
        f"{res['swaps']} swaps, stall {res['stall_ms']:.0f} ms, first choice resident {res['first_choice_resident']:.0%}",
    ]
    return "\n".join(lines)
