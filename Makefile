PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: test test-fast demo demo-flow bench bench-quick lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch goes in first and pinned, so no later range can pull a CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ui]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest

# The same without the end-to-end tests (marked slow): minutes, not the whole suite.
test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

# The main job on the embedded tiny base: personalize an example subject, then before/after pictures and figures.
demo: $(STAMP)
	$(BIN)/svdiff demo --output_dir demo-output

# The same on the embedded flow-matching transformer (an SD3 pipeline).
demo-flow: $(STAMP)
	$(BIN)/svdiff demo --base embedded:flow --output_dir demo-output/flow

# The evidence report: every benchmark, the paper's claims checked (bench-quick: fewer subjects, seeds and steps).
bench: $(STAMP)
	$(BIN)/python benchmarks/report.py --out docs/results/report

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/report.py --quick --out runs/bench-quick/report

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache demo-output
