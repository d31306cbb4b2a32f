#!/usr/bin/env bash
# Stage 1 on one or more GPUs (DDP through accelerate), resumable: rerun the same line after an interruption.
#   bash scripts/train_stage1.sh [CONFIG] [--set key=value ...]
# Environment: NUM_GPUS (default: all visible), MIXED_PRECISION (default: lmrc's auto), DRY_RUN=1 (print the
# command instead of running it), LMRC_DATA_DIR (the data folder the configs point at). Stage 1 runs DDP only:
# ACCELERATE_CONFIG (FSDP / DeepSpeed) is for stage 2 and not used here (see scripts/launch.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/redocred_stage1.yaml}
shift || true
source scripts/launch.sh
run_lmrc stage1 train --config "$CONFIG" --resume "$@"
