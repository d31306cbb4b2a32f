# lmrc: `make setup`, `make test`, `make lint`, `make demo`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA := $(abspath ../shared/data)
# Point at the shared data when it sits beside the checkout (these machines have no internet).
export LMRC_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/redocred),$(SHARED_DATA),)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint demo bench clean gpu-check

$(VENV)/.lmrc-setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(VENV)/.lmrc-setup-done

test: setup
	$(PY) -m pytest -q -rs tests   # -rs: every skipped test is listed with its reason

lint: setup
	$(VENV)/bin/ruff check lmrc tests scripts benchmarks
	$(VENV)/bin/ruff format --check lmrc tests scripts benchmarks

# The LMRC comparison end to end on the packaged models (configs/demo.yaml); resumable: run it again to continue.
DEMO_DIR ?= runs/demo
demo: setup
	@data=$$(bash scripts/demo_data.sh) && \
	LMRC_DATA_DIR=$$data $(VENV)/bin/lmrc compare --config configs/demo.yaml --output-dir $(DEMO_DIR)
	@echo
	@echo "The demo trains for a few minutes on a CPU: its F1 only shows that the pipeline runs end to end, not"
	@echo "what the methods reach (full-size GPU runs: scripts/run_redocred.sh, docs/GPUS.md)."

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info

bench: setup
	$(PY) benchmarks/bench.py   # under 20 minutes on 2 cores; rewrites docs/PERFORMANCE.md

# Does this GPU machine run lmrc? One line per check (pass / fail / skipped with why) on one GPU with tiny random
# models, a JSON report in runs/gpu_check/; prints one line and exits 0 without a CUDA device (docs/GPUS.md).
gpu-check: setup
	$(PY) scripts/gpu_check.py --out runs/gpu_check/report.json
