# lightning-qlora: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install train test lint bench bench-cpu quant-report quant-quality quality-gpu clean

help: ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-13s %s\n", $$1, $$2}'

# The CPU build of torch is pinned first so pip never pulls a multi-GB CUDA wheel onto a CPU machine;
# on a machine that already has a CUDA torch in $(VENV), it is left alone.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	-$(PY) -m pip install -q --upgrade pip  # best effort: an old pip still installs everything below
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its dev tools

train: $(STAMP) ## run the embedded default recipe (CPU, no downloads); pass overrides with ARGS="lora.r=16 ..."
	$(VENV)/bin/lightning-qlora $(ARGS)

test: $(STAMP) ## run the test suite (GPU tests skip without CUDA)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check plugin tests
	$(VENV)/bin/ruff format --check plugin tests

bench: $(STAMP) ## GPU benchmark: ours vs PEFT + bitsandbytes, side by side; appends to BENCHMARKS.md (ARGS="--models 7b")
	$(PY) -m lightning_qlora.bench --report BENCHMARKS.md $(ARGS)

bench-cpu: $(STAMP) ## the benchmark's tiny CPU configuration (figures mean nothing)
	$(PY) -m lightning_qlora.bench --cpu $(ARGS)

quant-report: $(STAMP) ## NF4/FP4/int4 quantization error report (ARGS="--model DIR" or "--recipe default")
	$(VENV)/bin/lightning-qlora-quant-report $(ARGS)

quant-quality: $(STAMP) ## fit the default model, then held-out loss of every 4-bit format + LoRA recovery (CPU, minutes)
	$(VENV)/bin/lightning-qlora-quant-report --recipe default --train-first --out outputs/quant_quality $(ARGS)

quality-gpu: $(STAMP) ## the same study on a ~100M Llama trained on the Python stdlib (one GPU, ~6 min; ARGS="--tiny" on a CPU)
	$(VENV)/bin/lightning-qlora-quant-report --stdlib-llama --out outputs/quant_quality_stdlib $(ARGS)

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun wandb lightning_logs .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
