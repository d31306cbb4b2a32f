#!/usr/bin/env bash
# The stage-2 measurement of docs/RESULTS.md: LoRA rc training of smollm2-135m on the first 100 documents of
# train_450.json (1 epoch; lr raised to 5e-4 for this CPU budget, see RESULTS.md; gradient checkpointing keeps
# the run under ~4 GiB: without it, 2,048-token batches of 4 took 12 GiB; max_pairs 18 as the run was started
# before rc prompts became uncapped), then relation classification
# given gold pairs on dev_50.json, strict and with SBERT mapping. Resumable: rerun the same command.
#
#   bash scripts/stage2_experiments.sh [RUNS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/stage2}
LMRC=${LMRC:-.venv/bin/lmrc}
: "${LMRC_DATA_DIR:?set LMRC_DATA_DIR (e.g. ../shared/data)}"
OUT="$RUNS/rc-smollm2"
mkdir -p "$RUNS"
resume=()
[ -f "$OUT/config.yaml" ] && resume=(--resume)
echo "== train $(date -u +%H:%M:%S)"
/usr/bin/time -v -a -o "$OUT.train.time.txt" $LMRC -q stage2 train --config configs/stage2_rc_smollm2_cpu.yaml \
  --set train.lr=5e-4 --set train.num_threads=1 --set train.gradient_checkpointing=true --set max_pairs=18 --output-dir "$OUT" ${resume[@]+"${resume[@]}"} || exit 1
echo "== predict (gold pairs, SBERT mapping + strict) $(date -u +%H:%M:%S)"
/usr/bin/time -v -a -o "$OUT.predict.time.txt" $LMRC -q stage2 predict --adapter "$OUT" \
  --input "$LMRC_DATA_DIR/redocred/dev_50.json" --gold-pairs --output "$OUT/dev_50.gold_pairs.json" \
  --set align.relation_mapping=sbert --resume \
  --debug-out "$OUT/dev_50.debug.jsonl" || exit 1
echo "== done $(date -u +%H:%M:%S)"
