# BlockPilot developer entry points. `make demo` and `make test` set everything up themselves
# (a virtualenv in .venv, the default model converted once into $BLOCKPILOT_CACHE) and are idempotent.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# This machine kind has a CPU build of torch on local disk; pip takes it for this exact version.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench step-costs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot demo

test: install
	$(BIN)/blockpilot prepare
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: install
	$(BIN)/blockpilot bench --num-prompts 8 --block-sizes 2-24 --repeats 3 --max-new-tokens 256 --output-dir runs/bench

step-costs: install
	$(BIN)/blockpilot step-costs --dtypes float32 bfloat16 --widths 1,2,4,8,16,24,32 --output runs/step_costs.json

clean:
	rm -rf $(VENV) runs *.egg-info
