# Sourced by the GPU scripts: `run_lmrc ARGS...` runs `lmrc ARGS...`; training through `accelerate launch` on
# NUM_GPUS GPUs (default: the visible ones: CUDA_VISIBLE_DEVICES when set, else all that nvidia-smi lists; 1
# without any), with `--mixed_precision` the precision lmrc resolves for "auto" on this machine (MIXED_PRECISION
# overrides it; lmrc's own choice from the config still wins inside the run, and a node's accelerate default of
# fp16 never applies). DRY_RUN=1 prints the commands instead.
# Stage 1 always runs DDP: ACCELERATE_CONFIG (FSDP / DeepSpeed) applies to stage 2 only, and `--multi_gpu`
# (several GPUs) or a plain process (one GPU) keeps a node's default accelerate config from choosing another engine.
# Stage 2 uses ACCELERATE_CONFIG when set, else `--multi_gpu` (a node's default config could run one process).
# Inference runs in one process: vLLM shards a model over GPUs only with generation.tensor_parallel_size; with
# PREDICT_SHARD=i/n (and no CUDA_VISIBLE_DEVICES of the job's own) shard i runs on GPU i mod NUM_GPUS.
# Written for bash >= 3.2 with `set -u` (no empty "${array[@]}" expansions). Hub models are downloaded by
# rank 0 while the other ranks wait (lmrc.stage2.modeling.prefetch_model; stage 1 loads on rank 0 first).
LMRC_PY=${LMRC_PY:-.venv/bin/python}
[ -x "$LMRC_PY" ] || LMRC_PY=python3
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    # CUDA renumbers the listed devices from 0 and hides the others ("" or "-1": none visible).
    _lmrc_visible=0
    for _lmrc_id in ${CUDA_VISIBLE_DEVICES//,/ }; do
      [ "$_lmrc_id" = "-1" ] && break
      _lmrc_visible=$((_lmrc_visible + 1))
    done
    if [ "${NUM_GPUS:-0}" -eq 0 ] || [ "$_lmrc_visible" -lt "$NUM_GPUS" ]; then NUM_GPUS=$_lmrc_visible; fi
  fi
  [ "${NUM_GPUS:-0}" -ge 1 ] || NUM_GPUS=1
fi
lmrc_mixed_precision() {  # sets MIXED_PRECISION once: lmrc's "auto" here (bf16 on native-bf16 GPUs, else fp16)
  if [ -z "${MIXED_PRECISION:-}" ]; then
    MIXED_PRECISION=$("$LMRC_PY" -c 'from lmrc.machine.hardware import resolve_mixed_precision as r; print(r("auto"))' \
      2>/dev/null) || MIXED_PRECISION=no
  fi
}
run_lmrc() {
  local cmd
  if [ "$1" = "stage1" ] && [ "$2" = "train" ] && [ "$NUM_GPUS" -le 1 ]; then
    cmd=("$LMRC_PY" -m lmrc "$@")
  elif { [ "$1" = "stage1" ] || [ "$1" = "stage2" ]; } && [ "$2" = "train" ]; then
    cmd=("$LMRC_PY" -m accelerate.commands.launch --num_processes "$NUM_GPUS")
    lmrc_mixed_precision
    cmd+=(--mixed_precision "$MIXED_PRECISION")
    if [ "$1" = "stage2" ] && [ -n "${ACCELERATE_CONFIG:-}" ]; then
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
