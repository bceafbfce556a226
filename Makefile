# meshq — every command a newcomer needs. `make demo` runs the main job, `make test` the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-fast lint demo bench worker flower serve redis clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check app tasks pipelines tests bench celeryconfig.py
	$(BIN)/mypy app tasks pipelines celeryconfig.py
	# The direction of imports between layers (contracts in setup.cfg, [importlinter]).
	$(BIN)/lint-imports

demo: install
	$(BIN)/meshq demo

bench: install
	$(BIN)/python bench/run_all.py

worker: install
	$(BIN)/celery -A app worker --loglevel INFO

flower: install
	$(BIN)/celery -A app flower --task_runtime_metric_buckets=1,5,15,60,300,900,1800,3600,7200,14400,43200

serve: install
	$(BIN)/meshq serve

redis: install
	$(BIN)/meshq redis

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info .demo .bench
