#!/usr/bin/env bash
# Stage 2 LoRA fine-tuning (rc: classify candidates; direct: the all-pairs baseline) on one or more GPUs, resumable.
#   bash scripts/train_stage2.sh rc|direct [CONFIG] [--set key=value ...]
# 13B+ models over several GPUs: ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml (or deepspeed_zero3.yaml).
# Environment: NUM_GPUS, ACCELERATE_CONFIG, DRY_RUN=1, LMRC_DATA_DIR (see scripts/launch.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: train_stage2.sh rc|direct [CONFIG] [--set key=value ...]}
case "$MODE" in rc|direct) ;; *) echo "train_stage2.sh: mode must be rc or direct, got '$MODE'" >&2; exit 2;; esac
shift
CONFIG=configs/redocred_stage2_$MODE.yaml
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then CONFIG=$1; shift; fi
source scripts/launch.sh
run_lmrc stage2 train --config "$CONFIG" --set "mode=$MODE" --resume "$@"
