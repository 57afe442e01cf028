#!/usr/bin/env bash
# The decoder-only device box: an OLMoE-1B-7B-shaped synthetic model (float16 weights, int4
# ladder copies of every expert) under budgets of 4 GiB and 2 GiB in cgroups 10% larger, flash
# throttled to 250 MB/s, for prune, swapmoe, ladder and on-demand. Needs root and cgroup v1
# memory+blkio (or v2 memory+io), ~13 GB of disk for the checkpoint and ~17 GB for the
# artifact (the checkpoint can go once the artifact is written). Run from the repository root
# in the venv:
#
#   bash scripts/causal_device_box.sh WORKDIR [OUT] [PARTS]
#
# PARTS (default all): any of checkpoint export cells repeat dense. Random weights and random
# prompts: speed and memory only. About 40 minutes on 2 cores (export ~13, cells ~20).
set -euo pipefail
W=${1:?work directory}; OUT=${2:-docs/results/causal/device_box}; PARTS=${3:-"checkpoint export cells repeat dense"}
PY=${PYTHON:-python}; SW=${SWAPMOE:-swapmoe}
has() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$W" "$OUT"
ART=$W/olmoe-art16
if has checkpoint; then
  $PY scripts/make_synthetic_checkpoint.py --shape olmoe-1b-7b --dtype float16 -o "$W/olmoe-1b-7b"
fi
if has export; then  # 16 layers at full size: PyTorch validation would need ~28 GB of float32 weights
  $SW export "$W/olmoe-1b-7b" -o "$ART" --dtype float16 --ladder int4 --no-validate
fi
CELL=(--flash-mbps 250 --requests 5 --max-new-tokens 8 --source-len 32)
if has cells; then
  $SW bench cells "$ART" --policies prune,swapmoe,ladder,on-demand --budgets 4GiB,2GiB \
    --memory 4GiB=4.4GiB --memory 2GiB=2.2GiB "${CELL[@]}" -o "$OUT/olmoe" || true  # 2 GiB cells fail: see README
fi
if has repeat; then  # the same 4 GiB cells again, in other orders, and with swaps at request boundaries only
  $SW bench cells "$ART" --policies swapmoe,ladder,prune --budgets 4GiB --memory 4GiB=4.4GiB "${CELL[@]}" \
    --requests 6 -o "$OUT/olmoe_repeat"
  $SW bench cells "$ART" --policies prune,swapmoe --budgets 4GiB --memory 4GiB=4.4GiB "${CELL[@]}" \
    --requests 6 --cold-start blocking -o "$OUT/olmoe_blocking"
  $SW bench cells "$ART" --policies prune,swapmoe,ladder --budgets 4GiB --memory 4GiB=4.4GiB "${CELL[@]}" \
    --requests 6 -o "$OUT/olmoe_third"
fi
if has dense; then  # what the float16 dense part costs in RAM once ORT has opened it
  $PY scripts/bench_dense_fp16.py "$ART" --json "$OUT/dense_fp16.json"
fi
