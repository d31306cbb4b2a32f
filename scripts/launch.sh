# Sourced by the GPU scripts: `run_lmrc ARGS...` runs `lmrc ARGS...`; training through `accelerate launch` on
# NUM_GPUS GPUs (default: all that nvidia-smi lists; 1 without it), with ACCELERATE_CONFIG when set, else
# `--multi_gpu` (a node's default accelerate config could otherwise run one process); DRY_RUN=1 prints instead.
# Inference runs in one process: vLLM shards a model over GPUs only with generation.tensor_parallel_size; with
# PREDICT_SHARD=i/n (and no CUDA_VISIBLE_DEVICES of the job's own) shard i runs on GPU i mod NUM_GPUS.
# Written for bash >= 3.2 with `set -u` (no empty "${array[@]}" expansions). Hub models are downloaded by
# rank 0 while the other ranks wait (lmrc.stage2.modeling.prefetch_model; stage 1 loads on rank 0 first).
LMRC_PY=${LMRC_PY:-.venv/bin/python}
[ -x "$LMRC_PY" ] || LMRC_PY=python3
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NUM_GPUS:-0}" -ge 1 ] || NUM_GPUS=1
fi
run_lmrc() {
  local cmd
  if { [ "$1" = "stage1" ] || [ "$1" = "stage2" ]; } && [ "$2" = "train" ]; then
    cmd=("$LMRC_PY" -m accelerate.commands.launch --num_processes "$NUM_GPUS")
    if [ -n "${ACCELERATE_CONFIG:-}" ]; then
      cmd+=(--config_file "$ACCELERATE_CONFIG")
    elif [ "$NUM_GPUS" -gt 1 ]; then
      cmd+=(--multi_gpu --num_machines 1)
    fi
    cmd+=(-m lmrc "$@")
  elif [ -n "${PREDICT_SHARD:-}" ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    cmd=(env "CUDA_VISIBLE_DEVICES=$(( ${PREDICT_SHARD%%/*} % NUM_GPUS ))" "$LMRC_PY" -m lmrc "$@")
  else
    cmd=("$LMRC_PY" -m lmrc "$@")
  fi
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf 'DRY_RUN:'; printf ' %q' "${cmd[@]}"; printf '\n'
  else
    "${cmd[@]}"
  fi
}
