#!/usr/bin/env python3
"""Before -> after tables for /tmp/meas/compare.md (reads only measure.sh outputs + the A/B bench JSON).

    python compare_after.py BEFORE AFTER [AB_JSON]
Before's figures.md used decode runs 1-5, pair rounds 1-10 and emb_swapmoe33_vs_full-loaded.json;
the same subsets are used here ("as in figures.md"), plus everything that exists ("all").
"""
import json, math, statistics as st, sys
from pathlib import Path

A, B = Path(sys.argv[1]), Path(sys.argv[2])
AB = Path(sys.argv[3]) if len(sys.argv) > 3 else None
med = st.median
def jl(f): return [json.loads(l) for l in Path(f).read_text().splitlines() if l.strip()]
def se(xs):
    n = len(xs); m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)

from rouge_score import rouge_scorer
sc = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
sa = json.loads((A / "sweep" / "sweep.json").read_text())
refs = [r["summary"] for r in jl(sa["settings"]["data"])][: sa["documents"]]
cache = {}
def r2(ref_i, s):
    k = (ref_i, s)
    if k not in cache: cache[k] = sc.score(refs[ref_i], s)["rouge2"].fmeasure
    return cache[k]

print(f"# {A} -> {B}\n")
print("## Quality: sweep cells, first 1000 test documents (run 1 = `sweep`, run 2/3 = `sweep-run2/3`)\n")
print("| cell | ROUGE-2 before run1 | after run1 | after − before, run1 (± paired s.e.) | docs changed run1→run1 | "
      "before runs 1/2/3 | after runs 1/2/3 | mean of 3, before → after | same as full before (runs 1/2/3) | same as full after (runs 1/2/3) | "
      "before run-to-run: docs changed run1→run2, run1→run3 |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
runs = ["sweep", "sweep-run2", "sweep-run3"]
for f in sorted((A / "sweep" / "cells").glob("*.json")):
    name = f.stem
    def load(d, r):
        p = d / r / "cells" / f.name
        return json.loads(p.read_text()) if p.is_file() else None
    ba = [load(A, r) for r in runs]; bb = [load(B, r) for r in runs]
    for d_, cs in ((A, ba), (B, bb)):  # exact_match lives in sweep.json's cells
        for r, c in zip(runs, cs):
            if c:
                c["exact_match"] = next(x for x in json.loads((d_ / r / "sweep.json").read_text())["cells"] if x["cell"] == name)["exact_match"]
    a, b = ba[0], bb[0]
    if b is None:
        print(f"| {name} | {a['rouge2']:.4f} | missing |"); continue
    d = [r2(i, y["summary"]) - r2(i, x["summary"]) for i, (x, y) in enumerate(zip(a["outputs"], b["outputs"]))]
    changed = sum(x["token_ids"] != y["token_ids"] for x, y in zip(a["outputs"], b["outputs"]))
    fmt = lambda cs: "/".join(f"{c['rouge2']:.4f}" if c else "—" for c in cs)
    fmtx = lambda cs: "/".join(f"{c['exact_match']:.1%}" if c and 'exact_match' in c else "—" for c in cs)
    ma = [c["rouge2"] for c in ba if c]; mb = [c["rouge2"] for c in bb if c]
    spread = ", ".join(str(sum(x["token_ids"] != y["token_ids"] for x, y in zip(a["outputs"], c["outputs"]))) if c else "—" for c in ba[1:])
    print(f"| {name} | {a['rouge2']:.4f} | {b['rouge2']:.4f} | {b['rouge2'] - a['rouge2']:+.4f} (± {se(d):.4f}) | {changed} | "
          f"{fmt(ba)} | {fmt(bb)} | {sum(ma)/len(ma):.4f} → {sum(mb)/len(mb):.4f} ({sum(mb)/len(mb) - sum(ma)/len(ma):+.4f}) | {fmtx(ba)} | {fmtx(bb)} | {spread} |")
# lead baseline and the sweep-level fields
sb = json.loads((B / "sweep" / "sweep.json").read_text())
print(f"\nLead-8 ROUGE-2: before {sa['lead_baseline'].get('rouge2', float('nan')):.4f}, after {sb['lead_baseline'].get('rouge2', float('nan')):.4f}")
print("\nCell fields, run 1, before → after (resident experts, peak RSS / budget, decode ms/token, cell wall s):\n")
cb = {c["cell"]: c for c in sb["cells"]}
for c in sa["cells"]:
    d = cb.get(c["cell"])
    if not d: continue
    res = lambda c: c["resident_experts"] if c["policy"] != "ladder" else "+".join(f"{v} {r}" for r, v in c.get("residents_by_rung", {}).items())
    print(f"- {c['cell']}: residents {res(c)} → {res(d)}; peak/budget {c['peak_rss_bytes']/c['budget_bytes']:.3f} → {d['peak_rss_bytes']/d['budget_bytes']:.3f}; "
          f"budget bytes {c['budget_bytes']} → {d['budget_bytes']}; decode {c['decode_ms_per_token']:.2f} → {d['decode_ms_per_token']:.2f} ms/token; "
          f"cell wall {c.get('cell_wall_s', 0):.0f} → {d.get('cell_wall_s', 0):.0f} s; swaps {c.get('swaps')} → {d.get('swaps')}; error {c.get('error')!r} → {d.get('error')!r}")

print("\n## Summaries of the first 20 test documents (`swapmoe summarize --json`)\n")
fa = {}
for f in sorted((A / "summaries").glob("*.jsonl")):
    g = B / "summaries" / f.name
    if not g.is_file():
        print(f"- {f.name}: missing after"); continue
    a, b = jl(f), jl(g)
    same = [x["token_ids"] == y["token_ids"] for x, y in zip(a, b)]
    print(f"- {f.name}: {sum(same)}/{len(a)} documents token-identical before vs after (counts {len(a)} / {len(b)}); "
          f"exact flags {sum(bool(x.get('exact')) for x in a)} → {sum(bool(y.get('exact')) for y in b)}")
    for i, (x, y, s) in enumerate(zip(a, b, same)):
        if not s:
            print(f"  - doc {i}: before {x['token_ids']} {x['summary']!r}; after {y['token_ids']} {y['summary']!r}")
for side, d in (("before", A), ("after", B)):
    rows = {f.stem: jl(f) for f in (d / "summaries").glob("*.jsonl")}
    base = [r["token_ids"] for r in rows["full-100pct"]]
    print(f"- {side}: " + "; ".join(f"{k} {sum(x == r['token_ids'] for x, r in zip(base, v))}/{len(v)} same as full" for k, v in sorted(rows.items()) if k != "full-100pct"))

print("\n## Decode against the floor (sb8, full, one thread, `bench_decode.py`)\n")
def dec(d, n=None):
    fs = sorted((d / "decode").glob("sb8-run*.json"), key=lambda p: int(p.stem.split("run")[1]))
    if n: fs = [f for f in fs if int(f.stem.split("run")[1]) <= n]
    return [json.loads(f.read_text())["runs"]["1"]["summary"] for f in fs]
for label, ra, rb in (("as in figures.md: before runs 1-5", dec(A, 5), dec(B)), ("all before runs", dec(A), dec(B))):
    if not ra or not rb: continue
    print(f"- {label} ({len(ra)}) vs after ({len(rb)}): " + "; ".join(
        f"{k} {med(r[k] for r in ra):.2f} → {med(r[k] for r in rb):.2f}" for k in ("decode_ms", "floor_ms", "ratio_to_floor", "paired_ratio_to_floor", "paired_decode_ms")))
    print(f"  - per run, ratio to floor: before {[round(r['ratio_to_floor'], 2) for r in ra]}; after {[round(r['ratio_to_floor'], 2) for r in rb]}")
    print(f"  - per run, paired ratio: before {[round(r['paired_ratio_to_floor'], 2) for r in ra]}; after {[round(r['paired_ratio_to_floor'], 2) for r in rb]}")

print("\n## swapmoe 33% / full 100% (sb8, alternating `bench_budget.py` processes)\n")
def pairs(d, n=None):
    out = []
    for f in sorted((d / "pairs").glob("r*-full.json"), key=lambda p: int(p.stem.split("-")[0][1:])):
        r = int(f.stem.split("-")[0][1:])
        if n and r > n: continue
        s = f.with_name(f"r{r}-swapmoe.json")
        if s.is_file():
            x = json.loads(f.read_text())["cells"][0]; y = json.loads(s.read_text())["cells"][0]
            out.append((r, x["decode_ms_per_token"], y["decode_ms_per_token"], y["decode_ms_per_token"] / x["decode_ms_per_token"]))
    return out
pb = pairs(B)
for label, pa in (("as in figures.md: before rounds 1-10", pairs(A, 10)), ("before rounds 1-%d (as many as after)" % len(pb), pairs(A, len(pb))), ("all before rounds", pairs(A))):
    if pa and pb:
        print(f"- {label} ({len(pa)}) vs after ({len(pb)}): full {med(p[1] for p in pa):.2f} → {med(p[1] for p in pb):.2f} ms/token; "
              f"swapmoe {med(p[2] for p in pa):.2f} → {med(p[2] for p in pb):.2f}; ratio median {med(p[3] for p in pa):.3f} → {med(p[3] for p in pb):.3f} "
              f"(before range {min(p[3] for p in pa):.2f}-{max(p[3] for p in pa):.2f}, after {min(p[3] for p in pb):.2f}-{max(p[3] for p in pb):.2f})")
print(f"  - after per round: {[(p[0], round(p[3], 3)) for p in pb]}")

print("\n## swapmoe 33% / full, embedded artifact, in-process paired (`bench_ladder_decode.py`)\n")
for label, f in (("before (figures.md, file -loaded)", A / "emb_swapmoe33_vs_full-loaded.json"), ("before (rerun)", A / "emb_swapmoe33_vs_full.json"), ("after", B / "emb_swapmoe33_vs_full.json")):
    if f.is_file():
        e = json.loads(f.read_text()); q = e["quartiles"]["swapmoe 33%"]
        print(f"- {label}: {q['median']:.3f}x (p25 {q['p25']:.3f}, p75 {q['p75']:.3f}, {q['batches']} batches); full {e['full_ms_per_token']:.3f} ms/token")

if AB and AB.is_file():
    r = json.loads(AB.read_text())
    s = r["runs"]["1"]["summary"]
    print("\n## Same-process-tree A/B (`bench_decode.py --before`), sb8 full, one thread\n")
    print(f"- before (/tmp/before code on art-before-sb8): {s['before_decode_ms']:.2f} ms/token (min {s['before_decode_ms_min']:.2f}); "
          f"after: {s['after_decode_ms']:.2f} (min {s['after_decode_ms_min']:.2f}); before/after {s['before_over_after']:.3f}x; "
          f"same tokens: {s['same_tokens_as_before']}")
    row = r["runs"]["1"]
    for k in ("ours", "before", "ours_again"):
        if k in row:
            print(f"  - {k}: decode ms per request {[round(x, 2) for x in row[k]['decode_ms']]}, median {med(row[k]['decode_ms']):.2f}")
    print(f"  - full summary keys: { {k: v for k, v in s.items() if 'before' in k or 'after' in k} }")
