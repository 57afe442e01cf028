#!/usr/bin/env bash
# Baseline figures of a swapmoe_edge checkout, run the same way on any tree.
#
#   bash docs/results/relayout/measure.sh TREE OUTDIR   e.g. a worktree of the older commit, /tmp/meas/before
#
# TREE: a checkout (its .venv is made if missing: torch==2.13.0 first, then -e ".[export,test]").
# OUTDIR: raw outputs (sweep folder, summaries JSON, bench JSON, logs, timings.tsv, commands.log).
# Artifacts go beside OUTDIR: $(dirname OUTDIR)/art-$(basename OUTDIR) (embedded, float16 experts
# + the default int4 ladder, as docs/results/ladder.md) and ...-sb8 (synthetic switch-base-8, float32).
# Shared inputs, built once if missing (tree-independent, so before/after use the same files):
#   CORPUS (default /tmp/meas/corpus)   the model card's four-release Debian corpus
#   SB8    (default /tmp/meas/sb8)      synthetic switch-base-8 checkpoint, seed 0
# Every step is skipped when its output already exists (resumable). One ORT thread everywhere,
# one heavy process at a time. STEPS (default "quality summaries decode pairs ladderpairs") picks steps.
set -euo pipefail
TREE=$(realpath "${1:?usage: measure.sh TREE OUTDIR}")
OUT=$(realpath -m "${2:?usage: measure.sh TREE OUTDIR}")
MEAS=$(dirname "$OUT")
TAG=$(basename "$OUT")
CORPUS=${CORPUS:-/tmp/meas/corpus}
APT=${APT:-/tmp/meas/apt-multi}
SB8=${SB8:-/tmp/meas/sb8}
ART=${ART:-$MEAS/art-$TAG}
ART_SB8=${ART_SB8:-$MEAS/art-$TAG-sb8}
THREADS=1
LIMIT=${LIMIT:-1000}            # test documents for the quality sweep
QUALITY_RUNS=${QUALITY_RUNS:-3} # the sweep again (sweep-run2, ...): run-to-run spread of the lossy policies
LADDER_ROUNDS=${LADDER_ROUNDS:-10}
DECODE_RUNS=${DECODE_RUNS:-5}   # bench_decode.py runs (each: bandwidth probe + ours + profile)
TOKENS=${TOKENS:-32}; REQUESTS=${REQUESTS:-6}
PAIR_ROUNDS=${PAIR_ROUNDS:-10}   # alternating full-100% / swapmoe-33% bench_budget.py runs on sb8
STEPS=${STEPS:-"quality summaries decode pairs ladderpairs"}
mkdir -p "$OUT"
CMDS="$OUT/commands.log"; TIMES="$OUT/timings.tsv"
[ -f "$TIMES" ] || printf 'step\tstart\tend\tseconds\n' > "$TIMES"

run() {  # log the command (with cwd and the load average), then run it
  printf '%s\tload %s\t(cd %s) %s\n' "$(date -u +%FT%TZ)" "$(cut -d' ' -f1-3 /proc/loadavg)" "$PWD" "$*" >> "$CMDS"
  "$@"
}
timed() {  # timed STEP CMD...: the step's wall time goes to timings.tsv
  local step=$1; shift
  local t0; t0=$(date +%s)
  "$@"
  local t1; t1=$(date +%s)
  printf '%s\t%s\t%s\t%s\n' "$step" "$(date -u -d @"$t0" +%T)" "$(date -u -d @"$t1" +%T)" $((t1 - t0)) >> "$TIMES"
  echo "== $step: $((t1 - t0)) s" >&2
}
want() { [[ " $STEPS " == *" $1 "* ]]; }
QUIET_BUSY=${QUIET_BUSY:-25}    # before each timed speed command: wait until the machine's CPUs are
QUIET_MAX=${QUIET_MAX:-120}     # at most this % busy over 5 s (others' work), or QUIET_MAX s have passed
busy_pct() {  # % of all CPUs busy over 5 s, from /proc/stat
  local a b
  read -r -a a < <(head -1 /proc/stat); sleep 5; read -r -a b < <(head -1 /proc/stat)
  local ta=0 tb=0 i
  for i in 1 2 3 4 5 6 7 8; do ta=$((ta + a[i])); tb=$((tb + b[i])); done
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) tot=$((tb - ta))
  echo $(( 100 * (tot - idle) / tot ))
}
wait_quiet() {
  local t0=$SECONDS b
  while :; do
    b=$(busy_pct)
    if (( b <= QUIET_BUSY )) || (( SECONDS - t0 >= QUIET_MAX )); then break; fi
  done
  printf '%s\twait_quiet: %s%% busy after %s s\n' "$(date -u +%FT%TZ)" "$b" $((SECONDS - t0)) >> "$CMDS"
}

cd "$TREE"
# -- 1. venv ------------------------------------------------------------------------------------
venv() {
  run python3 -m venv .venv
  run .venv/bin/pip install --quiet torch==2.13.0
  run .venv/bin/pip install --quiet -e ".[export,test]"
}
[ -x .venv/bin/swapmoe ] || timed venv venv
# shellcheck disable=SC1091
. .venv/bin/activate
{ echo "tree: $TREE"; git -C "$TREE" rev-parse HEAD 2>/dev/null || true; git -C "$TREE" status --short | head -20 || true
  python -c "import sys, onnxruntime, numpy; print('python', sys.version.split()[0], 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  lscpu | grep -E 'Model name|^CPU\(s\)|L3' || true; uptime; } > "$OUT/env.txt" 2>&1

# -- 2. corpus (shared) ----------------------------------------------------------------------------
corpus() {
  if [ ! -d "$APT/lists" ] || ! compgen -G "$APT/lists/*_Translation-en*" > /dev/null; then
    run bash scripts/fetch_debian_lists.sh "$APT"
  fi
  run swapmoe data debian --lists-dir "$APT/lists" -o "$CORPUS"
}
[ -f "$CORPUS/test.jsonl" ] || timed corpus corpus
[ -f "$CORPUS/first20.jsonl" ] || head -n 20 "$CORPUS/test.jsonl" > "$CORPUS/first20.jsonl"

# A cpu-x86_64 device profile with threads 1: `summarize` has no --threads option.
DEV1="$MEAS/cpu-x86_64-1thread.json"
[ -f "$DEV1" ] || python - "$TREE/devices/cpu-x86_64.json" "$DEV1" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1])); p["name"] = "cpu-x86_64-1thread"; p["threads"] = 1
json.dump(p, open(sys.argv[2], "w"), indent=1)
EOF

# -- 3. embedded artifact: float16 experts + default (auto = int4) ladder, shipped profile ------------
CKPT=swapmoe_edge/model_data/switch-debian
export_emb() {
  run swapmoe export "$CKPT" -o "$ART" --expert-dtype float16 --ladder int4 --quiet
  run cp "$CKPT/profile.json" "$ART/profile.json"
  run swapmoe info "$ART" --json > "$OUT/info-emb.json"
}
[ -f "$ART/manifest.json" ] || timed export_emb export_emb

# -- 4. quality: first LIMIT test documents, one thread ---------------------------------------------
sweep_into() {
  run swapmoe sweep "$ART" --data "$CORPUS/test.jsonl" -o "$1" --limit "$LIMIT" \
    --budgets 33%,25% --policies full,ladder,prune,swapmoe --planners importance --threads "$THREADS" --quiet \
    2> "$1.log"
}
quality() {
  sweep_into "$OUT/sweep"
  run python scripts/ladder_tables.py "$OUT/sweep" > "$OUT/ladder_tables.md"
}
want quality && { [ -f "$OUT/sweep/sweep.json" ] && [ -f "$OUT/ladder_tables.md" ] || timed quality quality; }
for i in $(seq 2 "$QUALITY_RUNS"); do
  want quality && { [ -f "$OUT/sweep-run$i/sweep.json" ] || timed "quality_run$i" sweep_into "$OUT/sweep-run$i"; }
done

summaries() {
  mkdir -p "$OUT/summaries"
  local p b
  for pb in full:100% on-demand:33% prune:33%; do
    p=${pb%%:*}; b=${pb#*:}
    run swapmoe summarize --artifact "$ART" --file "$CORPUS/first20.jsonl" --policy "$p" --budget "$b" \
      --device "$DEV1" --json --quiet > "$OUT/summaries/$p-${b%\%}pct.jsonl"
  done
}
want summaries && { [ -f "$OUT/summaries/prune-33pct.jsonl" ] || timed summaries summaries; }

# -- 5. speed: synthetic switch-base-8, float32 ------------------------------------------------------
if want decode || want pairs; then
  if [ ! -f "$SB8/model.safetensors.index.json" ]; then
    timed sb8_checkpoint run python scripts/make_synthetic_checkpoint.py --shape switch-base-8 -o "$SB8" --quiet
  fi
  [ -f "$ART_SB8/manifest.json" ] || timed sb8_export run swapmoe export "$SB8" -o "$ART_SB8" --dtype float32 --quiet
fi
decode() {
  mkdir -p "$OUT/decode"
  local i
  for i in $(seq 1 "$DECODE_RUNS"); do
    [ -f "$OUT/decode/sb8-run$i.json" ] && continue
    wait_quiet
    run python scripts/bench_decode.py "$ART_SB8" --threads "$THREADS" --tokens "$TOKENS" --requests "$REQUESTS" \
      --ttft-lengths 64 512 --json "$OUT/decode/sb8-run$i.json" > "$OUT/decode/sb8-run$i.log" 2>&1
  done
}
want decode && timed decode decode

# swapmoe 33% against full 100% on the same artifact: scripts/bench_budget.py (each cell its own
# process, random ids, 1 warm-up + 5 requests of 16 tokens), the two alternating round by round
# (full first on odd rounds, swapmoe first on even ones).
pairs() {
  mkdir -p "$OUT/pairs"
  local r order cell p b
  for r in $(seq 1 "$PAIR_ROUNDS"); do
    if (( r % 2 )); then order="full:100% swapmoe:33%"; else order="swapmoe:33% full:100%"; fi
    for cell in $order; do
      p=${cell%%:*}; b=${cell#*:}
      [ -f "$OUT/pairs/r$r-$p.json" ] && continue
      wait_quiet
      run python scripts/bench_budget.py "$ART_SB8" --policies "$p" --budgets "$b" --threads "$THREADS" \
        --out "$OUT/pairs/r$r-$p.json" > /dev/null 2> "$OUT/pairs/r$r-$p.log"
    done
  done
}
want pairs && timed pairs pairs

# The same comparison on the embedded artifact with the repository's in-process paired tool
# (full and swapmoe runtimes in one process, batch by batch, real text).
ladderpairs() {
  wait_quiet
  run python scripts/bench_ladder_decode.py "$ART" --data "$CORPUS/test.jsonl" --policies swapmoe --budgets 33% \
    --docs 64 --rounds "$LADDER_ROUNDS" --threads "$THREADS" --out "$OUT/emb_swapmoe33_vs_full.json" > "$OUT/emb_swapmoe33_vs_full.log" 2>&1
}
want ladderpairs && { [ -f "$OUT/emb_swapmoe33_vs_full.json" ] || timed ladderpairs ladderpairs; }

# -- tables -------------------------------------------------------------------------------------------
python "$(dirname "$(realpath "$0")")/tables.py" "$OUT" > "$OUT/figures.md" || echo "tables.py failed" >&2
echo "done: $OUT/figures.md" >&2
