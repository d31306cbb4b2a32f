#!/usr/bin/env bash
# Issue 30's measurement: how much data and how many optimizer steps a useful stage 1 needs. Every head below on
# slices of Re-DocRED's training split (25, 50, 100 documents) and on CDR's 500 training documents, for 600
# optimizer steps (train.min_steps, one epoch asked), scored on held-out documents every 100 steps (Re-DocRED:
# dev_50.json; CDR: its dev file). The held-out file is the run's `data.tune`: here it only records the curve (the
# best/ checkpoint it selects is not reported), so the table reads F1 by steps, not a tuned result.
# Resumable: rerun the same command and each run continues where it stopped; finished runs are skipped.
#
#   bash scripts/small_corpus_experiments.sh [RUNS_DIR]
#   python scripts/small_corpus_report.py [RUNS_DIR]     # the table (F1 at each evaluation, per run)
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/small-corpus}
LMRC=${LMRC:-.venv/bin/lmrc}
PY=${PY:-.venv/bin/python}
: "${LMRC_DATA_DIR:?set LMRC_DATA_DIR (e.g. ../shared/data)}"
RED=$LMRC_DATA_DIR/redocred
CDR=$LMRC_DATA_DIR/cdr
mkdir -p "$RUNS/data"
[ -f data/splits/train_450_split0.json ] || \
  $LMRC data split "$RED/train_450.json" --ratios 0.9,0.1 --seed 13 --out-dir data/splits
for n in 25 50 100; do  # the first n documents of the 405-document training split (a fixed, nested slice)
  [ -f "$RUNS/data/redocred_$n.json" ] || "$PY" - "$n" "$RUNS/data/redocred_$n.json" <<'PY'
import json, sys
n, out = int(sys.argv[1]), sys.argv[2]
docs = json.load(open("data/splits/train_450_split0.json", encoding="utf-8"))[:n]
json.dump(docs, open(out, "w", encoding="utf-8"))
PY
done

# corpus | training file | held-out file | rel_info
CORPORA=(
  "redocred_25|$RUNS/data/redocred_25.json|$RED/dev_50.json|$RED/rel_info.json"
  "redocred_50|$RUNS/data/redocred_50.json|$RED/dev_50.json|$RED/rel_info.json"
  "redocred_100|$RUNS/data/redocred_100.json|$RED/dev_50.json|$RED/rel_info.json"
  "cdr_500|$CDR/train.json|$CDR/dev.json|$CDR/rel_info.json"
)
HEADS=(${HEADS:-mdre atl atgl})
for corpus in ${CORPORA[@]+"${CORPORA[@]}"}; do
  IFS='|' read -r name train tune rel <<<"$corpus"
  for head in ${HEADS[@]+"${HEADS[@]}"}; do
    out=$RUNS/$name-$head
    if [ -f "$out/train_summary.json" ]; then echo "done: $out"; continue; fi
    resume=(); [ -f "$out/config.yaml" ] && resume=(--resume)
    echo "== $out"
    $LMRC stage1 train --config configs/stage1_minilm_cpu.yaml ${resume[@]+"${resume[@]}"} --output-dir "$out" \
      --set data.train="$train" --set data.tune="$tune" --set data.rel_info="$rel" --set loss.name="$head" \
      --set train.epochs=1 --set train.min_steps=600 --set train.eval_every_epochs=0 \
      --set train.eval_every_steps=100 --set train.save_every_steps=50 || echo "failed: $out"
  done
done
