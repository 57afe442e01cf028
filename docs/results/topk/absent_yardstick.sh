#!/bin/bash
# Substitute or drop on the decoder-only yardstick: export a checkpoint, profile it on training
# documents, then compare the two rules on the validation split (never the test split).
#   docs/results/topk/absent_yardstick.sh CHECKPOINT_DIR WORK_DIR [DOCUMENTS]
set -euo pipefail
CK=$1 WORK=$2 LIMIT=${3:-200}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
swapmoe export "$CK" -o "$WORK/art" --no-validate
swapmoe profile "$WORK/art" --data /tmp/meas/corpus/train.jsonl --limit 200 --budget 100%
python "$HERE/absent.py" "$WORK/art" --data /tmp/meas/corpus/validation.jsonl --limit "$LIMIT" \
    --budgets 50% 33% 25% --policies swapmoe prune --out "$WORK/absent_yardstick.json"
