#!/usr/bin/env bash
# The figures of this folder: deterministic serving (swaps only at request boundaries) against
# the timed swapper (swaps whenever its reads land) on test documents of the embedded model, for
# the policies with a background swapper. Run from the repository root in the venv:
#
#   bash docs/results/deterministic/reproduce.sh [ARTIFACT] [CORPUS_DIR] [WORK_DIR] [PARTS]
#
# ARTIFACT: the embedded model's export (default: the one `swapmoe summarize` uses, in the cache);
# CORPUS_DIR: `swapmoe data debian` output (the model card's corpus; see scripts/fetch_debian_lists.sh);
# WORK_DIR: scratch (sweep folders, resumable: finished cells are skipped); PARTS (default all):
# any of runs sweep cost table. One ORT thread, one measurement at a time; about 25 minutes on
# two shared cores.
set -euo pipefail
ART=${1:-$(python -c "from swapmoe_edge.cli.embedded import embedded_artifact as e; print(e(quiet=True))")}
CORPUS=${2:-/tmp/meas/corpus}
WORK=${3:-/tmp/deterministic_results}
PARTS=${4:-"runs sweep cost table"}
LIMIT=${LIMIT:-1000}
OUT=$(dirname "$0")
has() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$WORK"

if has runs; then
  # The same 30 documents through `swapmoe summarize` at 33%: 5 runs one after another, 4 at once,
  # and 4 at once beside two busy-looping processes; per mode, how many different outputs.
  head -n 30 "$CORPUS/test.jsonl" > "$WORK/docs30.jsonl"
  hog='import time
t = time.time()
while time.time() - t < 120: pass'
  : > "$OUT/runs.txt"
  for mode in --no-deterministic --deterministic; do
    dir="$WORK/runs$mode"; rm -rf "$dir"; mkdir -p "$dir"
    run() { swapmoe summarize --artifact "$ART" --budget 33% --policy swapmoe --file "$WORK/docs30.jsonl" --json --quiet $mode 2>/dev/null; }
    for i in 1 2 3 4 5; do run > "$dir/seq$i.jsonl"; done
    pids=(); for i in 1 2 3 4; do run > "$dir/conc$i.jsonl" & pids+=($!); done; wait "${pids[@]}"
    python -c "$hog" & h1=$!; python -c "$hog" & h2=$!
    pids=(); for i in 1 2 3 4; do run > "$dir/hog$i.jsonl" & pids+=($!); done; wait "${pids[@]}"
    kill $h1 $h2; wait $h1 $h2 2>/dev/null || true
    python - "$dir" "$mode" >> "$OUT/runs.txt" <<'PY'
import json, sys
from pathlib import Path
d, mode = Path(sys.argv[1]), sys.argv[2]
def runs(pattern):
    return [[json.loads(l) for l in p.read_text().splitlines() if l.strip()] for p in sorted(d.glob(pattern))]
for name, pattern in (("5 one after another", "seq*.jsonl"), ("4 at once", "conc*.jsonl"),
                      ("4 at once + 2 CPU hogs", "hog*.jsonl"), ("all 13", "*.jsonl")):
    rs = runs(pattern)
    per_doc = [len({tuple(r[i]["token_ids"]) for r in rs}) for i in range(len(rs[0]))]
    whole = len({tuple(tuple(x["token_ids"]) for x in r) for r in rs})
    det = sorted({str(x["stats"]["deterministic"]) for r in rs for x in r})
    print(f"{mode:18} {name:24} distinct outputs {whole:2} of {len(rs):2} runs; documents that differ "
          f"{sum(n > 1 for n in per_doc):2} of {len(per_doc)}; most versions of one document {max(per_doc)}; "
          f"stats deterministic: {'/'.join(det)}")
PY
  done
  cat "$OUT/runs.txt"
fi

if has sweep; then
  # Quality and fidelity: two timed sweeps (how far they move between runs of the same command)
  # and two deterministic ones (which must agree token for token), budget by budget in turn, so
  # that the cells compared run minutes apart.
  for b in 50% 33% 25%; do
    for run in default-1 deterministic-1 default-2 deterministic-2; do
      flag=--no-deterministic; [[ $run == deterministic* ]] && flag=--deterministic
      swapmoe sweep "$ART" --data "$CORPUS/test.jsonl" -o "$WORK/$run" --limit "$LIMIT" --budgets "$b" \
        --policies swapmoe,ladder --planners importance --threads 1 $flag --quiet
    done
  done
  for run in default-1 deterministic-1 default-2 deterministic-2; do  # the tables over all budgets (every cell is done)
    flag=--no-deterministic; [[ $run == deterministic* ]] && flag=--deterministic
    swapmoe sweep "$ART" --data "$CORPUS/test.jsonl" -o "$WORK/$run" --limit "$LIMIT" --budgets 50%,33%,25% \
      --policies swapmoe,ladder --planners importance --threads 1 $flag --quiet
    cp "$WORK/$run/sweep.md" "$OUT/sweep_$run.md"
  done
fi

if has cost; then
  # Decode cost, paired batch by batch in one process (200 documents, 3 rounds of fresh runtimes).
  python scripts/bench_deterministic.py "$ART" --data "$CORPUS/test.jsonl" --docs 200 --rounds 3 \
    --policies swapmoe,ladder --budgets 50%,33%,25% --out "$OUT/cost.json"
fi

if has table; then
  python "$OUT/table.py" "$WORK" "$OUT/cost.json" > "$OUT/table.md"
fi
