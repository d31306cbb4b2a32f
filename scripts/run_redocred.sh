#!/usr/bin/env bash
# Full-size Re-DocRED on GPUs: both stages trained with the LMRC paper's settings, the test set predicted by the
# pipeline (classifier-LLM and the direct baseline; vLLM generation when installed), scored, and compared.
#   LMRC_DATA_DIR=/data bash scripts/run_redocred.sh [RUNS_DIR]        # resumable: rerun to continue
# Needs the official files in $LMRC_DATA_DIR/redocred: train_revised.json, dev_revised.json, test_revised.json,
# rel_info.json (lmrc data fetch redocred --to $LMRC_DATA_DIR/redocred). More documents than one job can take:
# PREDICT_SHARD=i/n runs one shard of the test predictions (a SLURM array: PREDICT_SHARD=$SLURM_ARRAY_TASK_ID/8),
# then `lmrc merge RUNS/shard_*.json --output RUNS/test.classifier-llm.json`.
# Environment: NUM_GPUS, ACCELERATE_CONFIG (FSDP / DeepSpeed for 13B+ stage-2 models; stage 1 always runs DDP),
# MIXED_PRECISION, DRY_RUN=1, BACKEND (hf or vllm).
# Each PREDICT_SHARD runs on its own GPU (i mod NUM_GPUS) unless the job sets CUDA_VISIBLE_DEVICES itself.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/redocred}
: "${LMRC_DATA_DIR:?set LMRC_DATA_DIR to the folder holding redocred/}"
D=$LMRC_DATA_DIR/redocred
source scripts/launch.sh
if [ -z "${BACKEND:-}" ]; then
  BACKEND=hf
  "$LMRC_PY" -c "import vllm" 2>/dev/null && BACKEND=vllm
fi

run_lmrc stage1 train --config configs/redocred_stage1.yaml --set "output_dir=$RUNS/stage1" --resume
run_lmrc stage2 train --config configs/redocred_stage2_rc.yaml --set "output_dir=$RUNS/rc" --resume
run_lmrc stage2 train --config configs/redocred_stage2_direct.yaml --set "output_dir=$RUNS/direct" --resume

shard=()
suffix=""
if [ -n "${PREDICT_SHARD:-}" ]; then shard=(--shard "$PREDICT_SHARD"); suffix=".shard${PREDICT_SHARD%%/*}"; fi
run_lmrc predict --input "$D/test_revised.json" --output "$RUNS/test.classifier-llm$suffix.json" \
  --stage1 "$RUNS/stage1/best" --stage2 "$RUNS/rc" --recall-target 0.95 --tune "$D/dev_revised.json" \
  --train "$D/train_revised.json" --set "stage2.overrides.generation.backend=$BACKEND" --resume ${shard[@]+"${shard[@]}"}
run_lmrc predict --input "$D/test_revised.json" --output "$RUNS/test.direct$suffix.json" --stage2 "$RUNS/direct" \
  --train "$D/train_revised.json" --set "stage2.overrides.generation.backend=$BACKEND" --resume ${shard[@]+"${shard[@]}"}
[ -n "${PREDICT_SHARD:-}" ] && exit 0   # merge the shards, then rerun without PREDICT_SHARD to compare

run_lmrc evaluate --pred "$RUNS/test.classifier-llm.json" --gold "$D/test_revised.json" \
  --train "$D/train_revised.json" --rel-info "$D/rel_info.json" --out "$RUNS/test.classifier-llm.metrics.json" --overwrite
run_lmrc compare --config configs/redocred_compare.yaml --output-dir "$RUNS/compare" \
  --set "stage1.path=$RUNS/stage1/best" --set "rc.path=$RUNS/rc" --set "direct.path=$RUNS/direct" \
  --set "stage2_overrides.generation.backend=$BACKEND"
