#!/usr/bin/env bash
# The figures of this folder: traces of the test split and their replays, swapmoe against
# prune on shuffled, grouped and shifted streams of 1,000 test documents, the hindsight
# bounds, the decoder predictor's check and its cost. Run from the repository root in the venv:
#
#   bash docs/results/streams/reproduce.sh ARTIFACT CORPUS_DIR WORK_DIR [PARTS]
#
# ARTIFACT: the embedded model's export (its profile.json is the shipped one: importance,
# measured loss curves, substitutes and the decoder predictor from 512 validation documents;
# `python -c "from swapmoe_edge.cli.embedded import embedded_artifact as e; print(e())"`);
# CORPUS_DIR: `swapmoe data debian` output with sections; WORK_DIR: scratch (traces, sweep
# cells; resumable). PARTS (default all): any of profile replay sweep compare bound predictor cost.
# About 25 minutes for replay+sweep on two shared cores, as long again for the bounds.
set -euo pipefail
ART=${1:?artifact}; CORPUS=${2:?corpus dir}; WORK=${3:?work dir}
PARTS=${4:-"profile replay sweep compare bound predictor cost"}
OUT=$(dirname "$0")
PROG=libs,libdevel,python,perl,rust,golang,haskell,javascript,java,ruby,ocaml,php,devel,lisp
PROFILE=$OUT/profile_validation_prog_sections.json
has() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$WORK" "$OUT/predictor"

if has profile; then
  # The shipped profile (~5 min with the loss; the predictor runs the texts once more, one at a time),
  # and the shifted stream's: programming sections of the validation split.
  swapmoe profile "$ART" --data "$CORPUS/validation.jsonl" --limit 512 --measure-loss --predict-decoder \
    -o "$WORK/profile.json"
  swapmoe profile "$ART" --data "$CORPUS/validation.jsonl" --limit 512 --measure-loss --predict-decoder \
    --sections $PROG -o "$PROFILE"
fi
if has replay; then
  for order in shuffled grouped; do
    [ -f "$WORK/test-$order.npz" ] || swapmoe trace record "$ART" --data "$CORPUS/test.jsonl" --limit 1000 \
      --order $order -o "$WORK/test-$order.npz" --quiet
  done
  [ -f "$WORK/test-shifted.npz" ] || swapmoe trace record "$ART" --data "$CORPUS/test.jsonl" --limit 1000 \
    --order grouped --exclude-sections $PROG -o "$WORK/test-shifted.npz" --quiet
  for s in shuffled grouped; do
    swapmoe trace replay "$WORK/test-$s.npz" --budget 50%,33%,25% --profile "$ART/profile.json" --json \
      > "$OUT/replay_test_$s.jsonl"
  done
  swapmoe trace replay "$WORK/test-shifted.npz" --budget 50%,33%,25% --profile "$PROFILE" --json \
    > "$OUT/replay_test_shifted.jsonl"
  python scripts/replay_table.py "$OUT"/replay_test_*.jsonl
fi
if has sweep; then
  common=(--data "$CORPUS/test.jsonl" --limit 1000 --policies prune,swapmoe --planners importance
          --budgets 75%,50%,33%,25% --threads 1 --quiet)
  swapmoe sweep "$ART" "${common[@]}" --order shuffled -o "$WORK/sweep-shuffled"
  swapmoe sweep "$ART" "${common[@]}" --order grouped -o "$WORK/sweep-grouped"
  swapmoe sweep "$ART" "${common[@]}" --order grouped --exclude-sections $PROG --profile "$PROFILE" \
    -o "$WORK/sweep-shifted"
  for s in shuffled grouped shifted; do
    cp "$WORK/sweep-$s/sweep.md" "$OUT/predictor/sweep_$s.md"; cp "$WORK/sweep-$s/sweep.csv" "$OUT/predictor/sweep_$s.csv"
  done
fi
if has compare; then  # swapmoe against prune, with paired standard errors
  python scripts/compare_policies.py "$WORK"/sweep-{shuffled,grouped,shifted} > "$OUT/predictor/final.md"
fi
if has bound; then  # each request's own residents, set before it runs, beside the sweeps' cells
  python scripts/hindsight_bound.py "$ART" --data "$CORPUS/test.jsonl" --order shuffled \
    --sweep "$WORK/sweep-shuffled" -o "$WORK/bound-shuffled" > "$OUT/predictor/bound_shuffled.md"
  python scripts/hindsight_bound.py "$ART" --data "$CORPUS/test.jsonl" --order grouped \
    --sweep "$WORK/sweep-grouped" -o "$WORK/bound-grouped" > "$OUT/predictor/bound_grouped.md"
  python scripts/hindsight_bound.py "$ART" --data "$CORPUS/test.jsonl" --order grouped --exclude-sections $PROG \
    --profile "$PROFILE" --sweep "$WORK/sweep-shifted" -o "$WORK/bound-shifted" > "$OUT/predictor/bound_shifted.md"
fi
if has predictor; then  # held-out validation documents: the predictor was fitted on the first 512
  python scripts/predictor_check.py "$ART" --data "$CORPUS/validation.jsonl" --skip 512 --limit 1000 \
    > "$OUT/predictor/predictor_check.md"
fi
if has cost; then  # what the prediction costs in time, paired in one process (run on a quiet machine)
  for b in 50% 33% 25%; do
    python scripts/bench_predict_cost.py --artifact "$ART" --data "$CORPUS/test.jsonl" --budget $b --docs 480 \
      --modes auto,off
  done > "$OUT/predictor/cost_quiet.txt"
fi
