#!/usr/bin/env python3
"""Figures of one measure.sh output folder as Markdown.

    python tables.py OUTDIR > OUTDIR/figures.md

Reads only files measure.sh writes (sweep/, summaries/, decode/, pairs/, emb_swapmoe33_vs_full.json,
timings.tsv). Per-document ROUGE-2 is recomputed here with rouge-score (stemmer on, as
swapmoe_edge.evaluate) against the corpus's references, for standard errors: of each cell's
mean, and of the difference to `full` and to `prune` at the same budget, paired by document.
Needs rouge_score (the tree's venv has it); does not import swapmoe_edge.
"""
from __future__ import annotations

import json
import math
import statistics as st
import sys
from pathlib import Path

OUT = Path(sys.argv[1])
med = st.median


def busy_map():
    """output path -> '% busy' that wait_quiet found just before the command that wrote it (commands.log)."""
    f = OUT / "commands.log"
    m, last = {}, None
    if not f.is_file():
        return m
    for ln in f.read_text().splitlines():
        if "wait_quiet:" in ln:
            last = ln.split("wait_quiet:")[1].strip()
            continue
        toks = ln.split()
        for flag in ("--json", "--out"):
            if flag in toks and last is not None:
                m[Path(toks[toks.index(flag) + 1]).name] = last
        last = None
    return m


BUSY = busy_map()
QUIET = 25  # % busy at most: measure.sh's QUIET_BUSY


def quiet(name):
    b = BUSY.get(name)
    return b is not None and int(b.split("%")[0]) <= QUIET


def p(*a):
    print(*a)


def se(xs):
    n = len(xs)
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def quality():
    sj = OUT / "sweep" / "sweep.json"
    if not sj.is_file():
        p("\n(no sweep)\n")
        return
    d = json.loads(sj.read_text())
    cells = [c for c in d["cells"] if not c.get("error")]
    settings = d["settings"]
    p(f"\n## Quality: first {d['documents']} test documents, one thread\n")
    p(f"Artifact `{settings.get('artifact')}`, data `{settings.get('data')}`. Lead-8: "
      + ", ".join(f"{k} {v:.4f}" for k, v in d.get("lead_baseline", {}).items() if isinstance(v, float)))
    failed = [c for c in d["cells"] if c.get("error")] + list(d.get("failed") or [])
    if failed:
        p(f"\nFAILED cells: {failed}")
    cdir = OUT / "sweep" / "cells"
    full_out = prune_out = None
    outs = {}
    for c in cells:
        f = cdir / f"{c['cell']}.json"
        if f.is_file():
            outs[c["cell"]] = json.loads(f.read_text())["outputs"]
    per_doc = {}
    try:
        from rouge_score import rouge_scorer
        sc = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
        data = Path(settings["data"])
        refs = [json.loads(l)["summary"] for l in data.read_text().splitlines() if l.strip()][: d["documents"]]
        for k, o in outs.items():
            assert len(o) == len(refs), (k, len(o), len(refs))
            per_doc[k] = [sc.score(r, x["summary"])["rouge2"].fmeasure for r, x in zip(refs, o)]
    except Exception as e:  # noqa: BLE001
        p(f"\n(per-document ROUGE-2 not computed: {e})")
    full = next(c for c in cells if c["policy"] == "full")

    def paired(a, b):
        if a not in per_doc or b not in per_doc:
            return None
        return se([y - x for x, y in zip(per_doc[a], per_doc[b])])

    p("\n| policy | budget | ROUGE-1 | ROUGE-2 | ± s.e. | ROUGE-L | same as full | fidelity R-2 | − full (± paired s.e.) "
      "| − prune (± paired s.e.) | experts resident | peak RSS / budget | decode ms/token | cell wall s |")
    p("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"full": 0, "ladder": 1, "swapmoe": 2, "prune": 3}
    for c in sorted(cells, key=lambda c: (-float(c["budget"].rstrip("%")), order.get(c["policy"], 9))):
        k = c["cell"]
        s = f"± {se(per_doc[k]):.4f}" if k in per_doc else "—"
        dfull = paired(full["cell"], k)
        pr = f"prune__{c['budget'].replace('%', 'pct')}__importance"
        dprune = paired(pr, k) if c["policy"] not in ("full", "prune") else None
        res = (c["resident_experts"] if c["policy"] != "ladder"
               else "+".join(f"{v} {r}" for r, v in c.get("residents_by_rung", {}).items()))
        dfull_s = "" if dfull is None or c["policy"] == "full" else f"{c['rouge2'] - full['rouge2']:+.4f} (± {dfull:.4f})"
        dprune_s = ""
        if dprune is not None:
            prc = next(x for x in cells if x["cell"] == pr)
            dprune_s = f"{c['rouge2'] - prc['rouge2']:+.4f} (± {dprune:.4f})"
        p(f"| {c['policy']} | {c['budget']} | {c['rouge1']:.4f} | **{c['rouge2']:.4f}** | {s} | {c['rougeL']:.4f} "
          f"| {c.get('exact_match', float('nan')):.1%} | {c.get('fidelity_rouge2', float('nan')):.4f} "
          f"| {dfull_s} | {dprune_s} "
          f"| {res} | {c['peak_rss_bytes'] / c['budget_bytes']:.3f} | {c['decode_ms_per_token']:.2f} | {c.get('cell_wall_s', 0):.0f} |")


def repeats():
    """The same sweep run again with the same code: how far the lossy policies move by themselves."""
    runs = sorted(OUT.glob("sweep-run*/sweep.json"))
    if not runs or not (OUT / "sweep" / "cells").is_dir():
        return
    p("\n### Run-to-run spread: the same sweep again, same code and artifact\n")
    p("| cell | run 1: ROUGE-2, same as full | " + " | ".join(f"{r.parent.name}: ROUGE-2, same as full, documents whose summary differs from run 1" for r in runs) + " |")
    p("|---|---|" + "---|" * len(runs))
    em = {}  # (sweep folder, cell) -> same-as-full share: sweep.json has it, the cell files do not
    for d in [OUT / "sweep"] + [r.parent for r in runs]:
        for c in json.loads((d / "sweep.json").read_text())["cells"]:
            em[(d.name, c.get("cell"))] = c.get("exact_match", float("nan"))
    for f in sorted((OUT / "sweep" / "cells").glob("*.json")):
        a = json.loads(f.read_text())
        a["exact_match"] = em.get(("sweep", f.stem), float("nan"))
        row = []
        for r in runs:
            g = r.parent / "cells" / f.name
            if not g.is_file():
                row.append("—")
                continue
            b = json.loads(g.read_text())
            b["exact_match"] = em.get((r.parent.name, f.stem), float("nan"))
            diff = sum(x["token_ids"] != y["token_ids"] for x, y in zip(a["outputs"], b["outputs"]))
            row.append(f"{b['rouge2']:.4f}, {b.get('exact_match', float('nan')):.1%}, {diff}")
        p(f"| {f.stem} | {a['rouge2']:.4f}, {a.get('exact_match', float('nan')):.1%} | " + " | ".join(row) + " |")


def summaries():
    sd = OUT / "summaries"
    if not sd.is_dir():
        return
    p("\n## Summaries of the first 20 test documents (`summarize --json`, one thread)\n")
    p("| file | documents | exact flags | first summary |")
    p("|---|---|---|---|")
    rows = {}
    for f in sorted(sd.glob("*.jsonl")):
        recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        rows[f.stem] = recs
        p(f"| {f.name} | {len(recs)} | {sum(bool(r.get('exact')) for r in recs)}/{len(recs)} exact | {recs[0]['summary'] if recs else ''} |")
    if "full-100pct" in rows:
        base = [r["token_ids"] for r in rows["full-100pct"]]
        for k, recs in rows.items():
            if k != "full-100pct":
                same = sum(a == r["token_ids"] for a, r in zip(base, recs))
                p(f"\n{k}: {same}/{len(recs)} summaries token-identical to full's")


def decode():
    runs = sorted((OUT / "decode").glob("sb8-run*.json")) if (OUT / "decode").is_dir() else []
    if not runs:
        return
    p("\n## Decode against the floor: switch-base-8 synthetic, float32, `full`, one thread (`scripts/bench_decode.py`)\n")
    p("| run | decode ms/token median (min) | floor ms (GB/s median) | ratio to floor | paired ratio (p25-p75) "
      "| paired decode ms | TTFT 64 / 512 ms | load s | peak RSS MiB | others' CPU before the run |")
    p("|---|---|---|---|---|---|---|---|---|---|")
    keys = {"decode_ms": [], "floor_ms": [], "ratio_to_floor": [], "paired_ratio_to_floor": [], "ttft64": [], "ttft512": []}
    for f in runs:
        r = json.loads(f.read_text())
        row = r["runs"]["1"]
        s = row["summary"]
        t = s["ttft_ms"]
        lo, hi = s.get("paired_ratio_p25_p75", [float("nan")] * 2)
        p(f"| {f.stem} | {s['decode_ms']:.2f} ({s['decode_ms_min']:.2f}) | {s['floor_ms']:.2f} ({s['gbps_median']:.1f}) "
          f"| {s['ratio_to_floor']:.2f}x | {s.get('paired_ratio_to_floor', float('nan')):.2f}x ({lo:.2f}-{hi:.2f}) "
          f"| {s.get('paired_decode_ms', float('nan')):.2f} | {t.get('64', float('nan')):.0f} / {t.get('512', float('nan')):.0f} "
          f"| {row['ours']['load_s']:.1f} | {row['ours']['peak_rss_bytes'] / 2**20:.0f} | {BUSY.get(f.name, '?')} |")
        for k in ("decode_ms", "floor_ms", "ratio_to_floor", "paired_ratio_to_floor"):
            if k in s:
                keys[k].append(s[k])
        keys["ttft64"].append(t.get("64", float("nan")))
        keys["ttft512"].append(t.get("512", float("nan")))
    p(f"| **median of runs** | **{med(keys['decode_ms']):.2f}** | {med(keys['floor_ms']):.2f} | **{med(keys['ratio_to_floor']):.2f}x** "
      f"| **{med(keys['paired_ratio_to_floor']):.2f}x** | | {med(keys['ttft64']):.0f} / {med(keys['ttft512']):.0f} | | | |")
    qs = [json.loads(f.read_text())["runs"]["1"]["summary"] for f in runs if quiet(f.name)]
    if qs:
        p(f"| **median of quiet runs** ({len(qs)}: others ≤{QUIET}% busy) | **{med(x['decode_ms'] for x in qs):.2f}** "
          f"| {med(x['floor_ms'] for x in qs):.2f} | **{med(x['ratio_to_floor'] for x in qs):.2f}x** "
          f"| **{med(x['paired_ratio_to_floor'] for x in qs):.2f}x** | | "
          f"{med(x['ttft_ms']['64'] for x in qs):.0f} / {med(x['ttft_ms']['512'] for x in qs):.0f} | | | |")
    r = json.loads(runs[0].read_text())
    bpt = r["bytes_per_token"]
    parts = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in bpt.items()) if isinstance(bpt, dict) else ""
    p(f"\nWeight bytes a token reads: {r['bytes_total'] / 1e6:.1f} MB ({parts}); ORT calls a token: {r['ort_calls_per_token']}. "
      f"Tokens per request {len(r['runs']['1']['ours']['tokens'])}, requests {len(r['runs']['1']['ours']['decode_ms'])}.")
    prof = r["runs"]["1"]["summary"].get("profile_ms_per_token")
    if prof:
        p("Profile (run 1, ms/token): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(prof.items(), key=lambda kv: -kv[1])))


def pairs():
    pd = OUT / "pairs"
    if not pd.is_dir():
        return
    rounds = sorted({int(f.stem.split("-")[0][1:]) for f in pd.glob("r*-*.json")})
    if not rounds:
        return
    p("\n## swapmoe 33% against full 100%, switch-base-8 synthetic float32, alternating runs (`scripts/bench_budget.py`)\n")
    p("| round | first | full decode ms/token | swapmoe 33% decode ms/token | ratio | full TTFT ms | swapmoe TTFT ms "
      "| full peak MiB | swapmoe peak MiB (budget) | swapmoe stall ms, swaps/req | others' CPU before full / swapmoe |")
    p("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios, fd, sd, qr, qf, qsw = [], [], [], [], [], []
    for r in rounds:
        try:
            f = json.loads((pd / f"r{r}-full.json").read_text())["cells"][0]
            s = json.loads((pd / f"r{r}-swapmoe.json").read_text())["cells"][0]
        except (FileNotFoundError, IndexError):
            p(f"| {r} | missing | | | | | | | | |")
            continue
        ratio = s["decode_ms_per_token"] / f["decode_ms_per_token"]
        ratios.append(ratio); fd.append(f["decode_ms_per_token"]); sd.append(s["decode_ms_per_token"])
        if quiet(f"r{r}-full.json") and quiet(f"r{r}-swapmoe.json"):
            qr.append(ratio); qf.append(f["decode_ms_per_token"]); qsw.append(s["decode_ms_per_token"])
        p(f"| {r} | {'full' if r % 2 else 'swapmoe'} | {f['decode_ms_per_token']:.2f} | {s['decode_ms_per_token']:.2f} | {ratio:.3f} "
          f"| {f['ttft_ms']:.0f} | {s['ttft_ms']:.0f} | {f['peak_rss_bytes'] / 2**20:.0f} "
          f"| {s['peak_rss_bytes'] / 2**20:.0f} ({s['budget_bytes'] / 2**20:.0f}) | {s['stall_ms']:.0f}, {s['swaps_per_request']} "
          f"| {BUSY.get(f'r{r}-full.json', '?')} / {BUSY.get(f'r{r}-swapmoe.json', '?')} |")
    if ratios:
        p(f"| **median** | | **{med(fd):.2f}** | **{med(sd):.2f}** | **{med(ratios):.3f}** | | | | | | |")
    if qr:
        p(f"| **median of quiet rounds** ({len(qr)}: both cells ≤{QUIET}% busy) | | **{med(qf):.2f}** | **{med(qsw):.2f}** "
          f"| **{med(qr):.3f}** | | | | | | |")


def ladderpairs():
    f = OUT / "emb_swapmoe33_vs_full.json"
    if not f.is_file():
        return
    d = json.loads(f.read_text())
    p("\n## swapmoe 33% against full, embedded artifact, paired batch by batch in one process (`scripts/bench_ladder_decode.py`)\n")
    for k, q in d["quartiles"].items():
        p(f"- {k} / full: **{q['median']:.3f}x** (p25 {q['p25']:.3f}, p75 {q['p75']:.3f}; {q['batches']} batches of 8, "
          f"{d['documents']} documents x {d['rounds']} rounds); full {d['full_ms_per_token']:.3f} ms/token median; "
          f"others' CPU before the run: {BUSY.get(f.name, '?')}")


def timings():
    f = OUT / "timings.tsv"
    if f.is_file():
        p("\n## Wall time per step (s)\n")
        lines = f.read_text().splitlines()[1:]
        p("| step | start (UTC) | s |\n|---|---|---|")
        for ln in lines:
            step, t0, _, s = ln.split("\t")
            p(f"| {step} | {t0} | {s} |")


p(f"# Figures: {OUT}")
env = OUT / "env.txt"
if env.is_file():
    p("\n```\n" + env.read_text().strip() + "\n```")
quality()
repeats()
summaries()
decode()
pairs()
ladderpairs()
timings()
