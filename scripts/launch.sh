# Sourced by the GPU scripts: `run_lmrc ARGS...` runs `lmrc ARGS...` through `accelerate launch` on NUM_GPUS GPUs
# (default: all that nvidia-smi lists; 1 without it), with ACCELERATE_CONFIG when set; DRY_RUN=1 prints instead.
LMRC_PY=${LMRC_PY:-.venv/bin/python}
[ -x "$LMRC_PY" ] || LMRC_PY=python3
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NUM_GPUS:-0}" -ge 1 ] || NUM_GPUS=1
fi
run_lmrc() {
  local cmd
  if [ "$1" = "stage1" ] && [ "$2" = "train" ] || [ "$1" = "stage2" ] && [ "$2" = "train" ]; then
    cmd=("$LMRC_PY" -m accelerate.commands.launch --num_processes "$NUM_GPUS")
    [ -n "${ACCELERATE_CONFIG:-}" ] && cmd+=(--config_file "$ACCELERATE_CONFIG")
    cmd+=(-m lmrc "$@")
  else
    cmd=("$LMRC_PY" -m lmrc "$@")  # inference runs in one process (vLLM shards over GPUs itself)
  fi
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf 'DRY_RUN:'; printf ' %q' "${cmd[@]}"; printf '\n'
  else
    "${cmd[@]}"
  fi
}
