#!/usr/bin/env bash
# The stage-1 measurement runs of docs/RESULTS.md: every head with the same budget (configs/stage1_minilm_cpu.yaml:
# MiniLM, 3 epochs, batch 4, seed 13, bf16 autocast, 1 thread), plus a second seed for ATL and ATGL's 3-point alpha
# search. Resumable: rerun the same command after an interruption and each run continues where it stopped.
#
#   bash scripts/stage1_experiments.sh [RUNS_DIR] [QUEUE]     # QUEUE: all (default), a or b (two parallel halves)
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/stage1}
QUEUE=${2:-all}
LMRC=${LMRC:-.venv/bin/lmrc}
: "${LMRC_DATA_DIR:?set LMRC_DATA_DIR (e.g. ../shared/data)}"
CONFIG=configs/stage1_minilm_cpu.yaml
mkdir -p "$RUNS"
[ -f data/splits/train_450_split0.json ] || \
  $LMRC data split "$LMRC_DATA_DIR/redocred/train_450.json" --ratios 0.9,0.1 --seed 13 --out-dir data/splits

# name | overrides
RUNS_A=(
  "atl|loss.name=atl"
  "atgl|loss.name=atgl"
  "amtl|loss.name=amtl"
  "atgl-a8.25|loss.name=atgl loss.params.alpha=8.25"
  "bce|loss.name=bce"
)
RUNS_B=(
  "atsl|loss.name=atsl"
  "mdre|loss.name=mdre"
  "atl-seed42|loss.name=atl train.seed=42"
  "atgl-a33|loss.name=atgl loss.params.alpha=33.0"
)
case "$QUEUE" in
  a) LIST=("${RUNS_A[@]}") ;;
  b) LIST=("${RUNS_B[@]}") ;;
  *) LIST=("${RUNS_A[@]}" "${RUNS_B[@]}") ;;
esac

for item in "${LIST[@]}"; do
  name=${item%%|*}
  sets=()
  for kv in ${item#*|}; do sets+=(--set "$kv"); done
  out="$RUNS/$name"
  resume=()
  [ -f "$out/config.yaml" ] && resume=(--resume)
  echo "== $name: $(date -u +%H:%M:%S)"
  /usr/bin/time -v -a -o "$out.time.txt" $LMRC -q stage1 train --config "$CONFIG" ${sets[@]+"${sets[@]}"} --output-dir "$out" ${resume[@]+"${resume[@]}"} \
    || { echo "!! $name failed (rerun this script to resume)"; continue; }
done
echo "== done $(date -u +%H:%M:%S)"
