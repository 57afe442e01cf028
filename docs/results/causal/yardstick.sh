#!/usr/bin/env bash
# The decoder-only yardstick's figures: its test scores against lead-8 (HF generate), its
# importance profile from validation documents, and the quality of every policy at 50, 33 and
# 25% of the expert bytes on the test split. Run from the repository root in the venv.
#
#   bash docs/results/causal/yardstick.sh [CORPUS_DIR] [WORK_DIR]
#
# CORPUS_DIR: the four-release Debian corpus of the model cards (see
# swapmoe_edge/model_data/switch-debian/README.md). WORK_DIR: the export and the sweep
# folder (resumable: finished cells are skipped).
set -euo pipefail
CORPUS=${1:-/tmp/debcorpus_multi}
WORK=${2:-/tmp/yardstick_results}
CKPT=${CKPT:-swapmoe_edge/model_data/mixtral-debian}
THREADS=${THREADS:-1}
LIMIT=${LIMIT:-1000}   # test documents per cell
RESULTS=${RESULTS:-$(dirname "$0")}
mkdir -p "$WORK" "$RESULTS"

# The model card's scores: HF generate, greedy, first LIMIT test documents; lead-8 alongside.
python scripts/train_causal_summarizer.py --score "$CKPT" --data "$CORPUS" --split test --limit "$LIMIT" \
  --threads "$THREADS" > "$RESULTS/yardstick_hf_test.json"

# float32 experts with the default int4 ladder; the importance profile from validation documents.
[ -f "$WORK/art/manifest.json" ] || swapmoe export "$CKPT" -o "$WORK/art" --quiet
[ -f "$WORK/art/profile.json" ] || swapmoe profile "$WORK/art" --data "$CORPUS/validation.jsonl" --limit 256 --measure-loss

swapmoe sweep "$WORK/art" --data "$CORPUS/test.jsonl" -o "$WORK/sweep" --limit "$LIMIT" --threads "$THREADS" \
  --budgets 100%,50%,33%,25% --policies full,prune,swapmoe,ladder --planners importance --quiet
cp "$WORK/sweep/sweep.md" "$RESULTS/yardstick_sweep.md"
cp "$WORK/sweep/sweep.json" "$RESULTS/yardstick_sweep.json"
echo "done: $RESULTS"
