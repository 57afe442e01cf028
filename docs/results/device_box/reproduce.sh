#!/usr/bin/env bash
# Every device-box figure of this folder. Needs root, cgroup v1 memory+blkio (or v2
# memory+io), the synthetic switch-base-8 and -64 artifacts, and the Debian corpus's test
# split for the embedded model. Run from the repository root in the venv:
#
#   python scripts/make_synthetic_checkpoint.py --shape switch-base-8 -o $W/sb8 && swapmoe export $W/sb8 -o $W/sb8_art
#   python scripts/make_synthetic_checkpoint.py --shape switch-base-64 -o $W/sb64 && swapmoe export $W/sb64 -o $W/sb64_art --no-validate
#   bash docs/results/device_box/reproduce.sh $W/sb8_art $W/sb64_art CORPUS/test.jsonl [OUT] [PARTS]
#
# PARTS (default all): any of reads sb8 sb64 auto pressure soak. About 75 minutes on 2 cores.
# `python scripts/bench_reads.py $W/sb8_art --out OUT/reads_sb8.json` adds the read modes'
# costs, and `python scripts/device_box_report.py --check OUT/sb8 OUT/sb64 > OUT/targets.txt`
# the targets, one line each.
set -euo pipefail
SB8=${1:?sb8 artifact}; SB64=${2:?sb64 artifact}; TEST=${3:?test.jsonl}
OUT=${4:-$(dirname "$0")}; PARTS=${5:-"reads sb8 sb64 auto pressure soak"}
EMB=$(${PYTHON:-python} -c "from swapmoe_edge.cli.embedded import embedded_artifact; print(embedded_artifact(quiet=True))")
mkdir -p "$OUT"
DOCS=$(mktemp --suffix=.jsonl)  # the corpus's text stays out of the repository
trap 'rm -f "$DOCS"' EXIT
head -1000 "$TEST" > "$DOCS"
has() { [[ " $PARTS " == *" $1 "* ]]; }
B="${SWAPMOE:-swapmoe} bench"
# A first launch measures and caches the baseline; the cells then time a device's later launches.
if has reads; then  # O_DIRECT against read-then-fadvise(DONTNEED), the on-demand and swapmoe paths
  $B cells "$SB8" --policies on-demand,swapmoe --budgets 33% --memory 1.75GiB --flash-mbps 250 --requests 4 --read-mode fadvise -o "$OUT/reads_fadvise"
  $B cells "$SB8" --policies on-demand,swapmoe --budgets 33% --memory 1.75GiB --flash-mbps 250 --requests 4 --read-mode direct -o "$OUT/reads_direct"
fi
if has sb8; then
  $B cells "$SB8" --policies on-demand,prune,swapmoe --budgets 50%,33% --memory 50%=2GiB --memory 33%=1.75GiB \
     --flash-mbps 80 --flash-mbps 250 --flash-mbps 1500 --requests 6 -o "$OUT/sb8"
  $B cells "$SB8" --policies full --budgets 100% --memory 3GiB --flash-mbps 250 --requests 6 -o "$OUT/sb8_full"
fi
if has sb64; then
  $B cells "$SB64" --policies on-demand,prune,swapmoe --budgets 4.7GiB,2.6GiB --memory 4.7GiB=5.05GiB --memory 2.6GiB=2.95GiB \
     --flash-mbps 80 --flash-mbps 250 --flash-mbps 1500 --requests 4 -o "$OUT/sb64"
fi
if has auto; then
  $B cells "$SB8" --policies swapmoe,prune,on-demand --budgets auto --memory 1.5GiB --flash-mbps 250 --requests 4 -o "$OUT/auto_sb8"
  $B cells "$EMB" --policies swapmoe,prune,on-demand --budgets auto --memory 300MiB --flash-mbps 250 --requests 20 \
     --docs "$DOCS" --max-new-tokens 32 -o "$OUT/auto_embedded"
fi
if has pressure; then
  $B pressure "$SB8" --policy swapmoe --memory 2.25GiB --flash-mbps 250 --step 128MiB --steps 6 --interval 4 --duration 50 -o "$OUT/pressure_sb8"
  $B pressure "$SB8" --policy on-demand --memory 2.25GiB --flash-mbps 250 --step 128MiB --steps 6 --interval 4 --duration 50 -o "$OUT/pressure_sb8_ondemand"
fi
if has soak; then
  $B soak "$EMB" --policy swapmoe --budget 33% --requests 2000 --memory 600MiB --flash-mbps 250 \
     --docs "$DOCS" --max-new-tokens 32 -o "$OUT/soak_embedded"
fi
