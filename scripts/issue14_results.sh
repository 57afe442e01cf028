#!/usr/bin/env bash
# Issue 14's figures (docs/results/issue14/): traces of the test split and their replays, and
# swapmoe against prune on shuffled, grouped and shifted streams of 1,000 test documents.
#   bash scripts/issue14_results.sh ARTIFACT CORPUS_DIR WORK_DIR
# ARTIFACT: the embedded model's export (its profile.json is the shipped one: importance, measured
# loss curves and substitutes from 512 validation documents); CORPUS_DIR: `swapmoe data debian`
# output with sections; WORK_DIR: scratch (traces, sweep cells).
# The shifted stream's profile (programming sections of the validation split, loss measured) is
#   swapmoe profile ARTIFACT --data CORPUS_DIR/validation.jsonl --limit 512 --sections $PROG --measure-loss \
#     -o docs/results/issue14/profile_validation_prog_sections.json
set -euo pipefail
ART=${1:?artifact}; CORPUS=${2:?corpus dir}; WORK=${3:?work dir}
OUT=docs/results/issue14
PROG=libs,libdevel,python,perl,rust,golang,haskell,javascript,java,ruby,ocaml,php,devel,lisp
PROFILE=$OUT/profile_validation_prog_sections.json
mkdir -p "$WORK" "$OUT"
for order in shuffled grouped; do
  [ -f "$WORK/test-$order.npz" ] || swapmoe trace record "$ART" --data "$CORPUS/test.jsonl" --limit 1000 --order $order \
    -o "$WORK/test-$order.npz" --quiet
done
[ -f "$WORK/test-shifted.npz" ] || swapmoe trace record "$ART" --data "$CORPUS/test.jsonl" --limit 1000 --order grouped \
  --exclude-sections $PROG -o "$WORK/test-shifted.npz" --quiet
for s in shuffled grouped; do
  swapmoe trace replay "$WORK/test-$s.npz" --budget 50%,33%,25% --profile "$ART/profile.json" --json > "$OUT/replay_test_$s.jsonl"
done
swapmoe trace replay "$WORK/test-shifted.npz" --budget 50%,33%,25% --profile "$PROFILE" --json > "$OUT/replay_test_shifted.jsonl"
common=(--data "$CORPUS/test.jsonl" --limit 1000 --policies prune,swapmoe --planners importance
        --budgets 75%,50%,33%,25% --threads 1 --quiet)
swapmoe sweep "$ART" "${common[@]}" --order shuffled -o "$WORK/sweep-shuffled"
swapmoe sweep "$ART" "${common[@]}" --order grouped -o "$WORK/sweep-grouped"
swapmoe sweep "$ART" "${common[@]}" --order grouped --exclude-sections $PROG --profile "$PROFILE" -o "$WORK/sweep-shifted"
for s in shuffled grouped shifted; do
  cp "$WORK/sweep-$s/sweep.md" "$OUT/sweep_$s.md"; cp "$WORK/sweep-$s/sweep.csv" "$OUT/sweep_$s.csv"
done
