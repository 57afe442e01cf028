#!/usr/bin/env bash
# Every figure on the embedded model: the test-split scores of the model card, the budget
# sweep, and the expert types. Run from the repository root in the venv.
#
#   bash docs/results/embedded/reproduce.sh [CORPUS_DIR] [WORK_DIR]
#
# CORPUS_DIR: the model's corpus, `bash scripts/fetch_debian_lists.sh /tmp/apt-multi` then
# `swapmoe data debian --lists-dir /tmp/apt-multi/lists -o CORPUS_DIR` (see the model card).
# If missing it is built here from the machine's own apt lists (`apt-get update -o
# Acquire::Languages=en`), a smaller corpus with a different test split. WORK_DIR holds the exports and the raw
# sweep folders (resumable: finished cells are skipped). Tables and plots are copied into
# this folder. Takes about 12 minutes on two cores (10-12 measured).
set -euo pipefail
CORPUS=${1:-/tmp/debcorpus}
WORK=${2:-/tmp/embedded_results}
CKPT=${CKPT:-swapmoe_edge/model_data/switch-debian}
THREADS=${THREADS:-1}
LIMIT=${LIMIT:-1000}   # test documents per cell
RESULTS=${RESULTS:-$(dirname "$0")}
mkdir -p "$WORK" "$RESULTS"
[ -f "$CORPUS/test.jsonl" ] || swapmoe data debian -o "$CORPUS"

for dt in float32 float16 int8 int4; do
  [ -f "$WORK/art-$dt/manifest.json" ] || swapmoe export "$CKPT" -o "$WORK/art-$dt" --expert-dtype "$dt" --quiet
done
# The shipped importance profile (SwapMoE Eq. 1) comes from validation documents.
if [ ! -f "$CKPT/profile.json" ]; then
  swapmoe profile "$WORK/art-float32" --data "$CORPUS/validation.jsonl" --limit 512
  cp "$WORK/art-float32/profile.json" "$CKPT/profile.json"
fi
for dt in float32 float16 int8 int4; do cp "$CKPT/profile.json" "$WORK/art-$dt/profile.json"; done

# Expert types (in the background, on the other core): each at 100, 50 and 25% of its own
# expert bytes (full, and swapmoe with the importance planner).
(
  for dt in float16 int8 int4; do
    swapmoe sweep "$WORK/art-$dt" --data "$CORPUS/test.jsonl" -o "$WORK/sweep-$dt" --limit "$LIMIT" \
      --budgets 100%,50%,25% --policies full,swapmoe --planners importance --threads "$THREADS" --quiet
    cp "$WORK/sweep-$dt/sweep.json" "$RESULTS/dtype-$dt.json"; cp "$WORK/sweep-$dt/sweep.md" "$RESULTS/dtype-$dt.md"
  done
) > "$WORK/dtypes.log" 2>&1 &
DTYPES=$!

# The model card and the budget sweep: test documents, every policy, budget and planner; lead-8 alongside.
swapmoe sweep "$WORK/art-float32" --data "$CORPUS/test.jsonl" -o "$WORK/sweep" --limit "$LIMIT" \
  --budgets 100%,75%,50%,33%,25% --threads "$THREADS"
cp "$WORK"/sweep/sweep.csv "$WORK"/sweep/sweep.md "$WORK"/sweep/sweep.json "$WORK"/sweep/*.png "$RESULTS"/
wait "$DTYPES" || { echo "the expert-type sweeps failed: see $WORK/dtypes.log" >&2; exit 1; }
echo "done: $RESULTS"
