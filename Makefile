# detr-serve: `make run` serves the default model on :8000, `make test` runs every test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# On a machine without CUDA we install a CPU build of torch first so that pip does not
# pull the multi-GB CUDA wheel. Override TORCH_CPU / PIP_TORCH_ARGS for other indexes,
# e.g. PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu" TORCH_CPU=torch
TORCH_CPU ?= torch==2.13.0
PIP_TORCH_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install run test test-deps test-docker test-floors test-ultralytics fuzz lint fmt bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing the CUDA build of torch and the gpu extra"; \
		$(PY) -m pip install --quiet -e '.[dev,gpu]'; \
	else \
		echo "no CUDA: installing the CPU build of torch ($(TORCH_CPU))"; \
		$(PY) -m pip install --quiet $(PIP_TORCH_ARGS) '$(TORCH_CPU)' && \
		$(PY) -m pip install --quiet -e '.[dev,onnx]'; \
	fi
	@touch $@

run: install
	$(VENV)/bin/detr-serve --host $(HOST) --port $(PORT)

# The Prometheus end-to-end tests need prometheus and promtool (Debian's package, ~330 MB
# installed); the browser tests of the page at / need headless Chromium and its WebDriver
# (Debian's chromium and chromium-driver, ~300 MB). Without root we only say so, and those
# tests skip (or fail under CI=true).
APT_TEST_PACKAGES := $(if $(shell command -v promtool),,prometheus) \
	$(if $(and $(shell command -v chromium),$(shell command -v chromedriver)),,chromium chromium-driver)

test-deps:
	@if [ -n "$(strip $(APT_TEST_PACKAGES))" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian's $(strip $(APT_TEST_PACKAGES)) for the tests"; \
			apt-get update && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
				$(APT_TEST_PACKAGES); \
		else \
			echo "missing test tools: as root, run 'make test-deps' (apt-get install" \
				"$(strip $(APT_TEST_PACKAGES)))"; \
		fi; \
	fi

test: install test-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) test-ultralytics

# Ultralytics RT-DETR checkpoints (the `ultralytics` extra, AGPL-3.0) in an environment of their
# own: ultralytics imports torchvision, and no torchvision imports beside the CPU build of torch
# 2.13 that .venv holds. ULTRALYTICS_TORCH is the newest pair that does (torch's CUDA build,
# which runs on the CPU); .venv keeps its torch and its floors. tests/ultralytics runs there only.
ULTRALYTICS_VENV ?= .venv-ultralytics
ULTRALYTICS_TORCH ?= torch==2.14.1 torchvision==0.29.1
ULTRALYTICS_STAMP := $(ULTRALYTICS_VENV)/.installed-stamp
ULTRALYTICS_PYTEST_ARGS ?=

$(ULTRALYTICS_STAMP): pyproject.toml Makefile
	@test -x $(ULTRALYTICS_VENV)/bin/python || python3 -m venv $(ULTRALYTICS_VENV)
	$(ULTRALYTICS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(ULTRALYTICS_VENV)/bin/python -m pip install --quiet $(ULTRALYTICS_TORCH)
	$(ULTRALYTICS_VENV)/bin/python -m pip install --quiet -e '.[onnx,ultralytics]' \
		$(ULTRALYTICS_TORCH) pytest pytest-asyncio hypothesis psutil
	@touch $@

test-ultralytics: $(ULTRALYTICS_STAMP)
	$(ULTRALYTICS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/ultralytics \
		$(ULTRALYTICS_PYTEST_ARGS)

# The real image and compose stack (tests/docker): as root, installs Debian's docker.io,
# mmdebstrap and docker-compose when missing and starts dockerd when no daemon answers (and
# stops it after); without Docker Hub it builds the base image from Debian's packages and
# without the PyTorch CPU index it gives the build the CPU torch wheel pip finds here.
# Logs and the image's figures: test-artifacts/docker/.
test-docker: install
	DETR_TEST_DOCKER=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/docker $(PYTEST_ARGS)

# The dependency floors of pyproject.toml, proven: a fresh .venv-floors with every dependency at
# its floor (constraints/floors.txt; torch at TORCH_FLOOR, the oldest release tested), then the
# unit, API and process-split tests there.
TORCH_FLOOR ?= torch==2.13.0
FLOORS_VENV ?= .venv-floors
test-floors:
	rm -rf $(FLOORS_VENV) && python3 -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install --quiet $(PIP_TORCH_ARGS) '$(TORCH_FLOOR)'
	$(FLOORS_VENV)/bin/python -m pip install --quiet -c constraints/floors.txt -e . \
		pytest pytest-asyncio hypothesis psutil 'tritonclient[http]' brotli
	$(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/api \
		tests/e2e/test_process_split.py --ignore tests/unit/test_deploy_files.py \
		--ignore tests/unit/test_evaluate.py --ignore tests/unit/test_train_script.py \
		--ignore tests/unit/test_synthetic_shapes.py

# The dedicated fuzzing run of the API (schemathesis, over 1000 generated cases).
fuzz: install
	DETR_FUZZ_MAX_EXAMPLES=60 $(PY) -m pytest -q -s tests/e2e/test_schemathesis.py

lint: install
	$(VENV)/bin/ruff check app tests scripts
	$(VENV)/bin/ruff format --check app tests scripts
	$(VENV)/bin/mypy app

fmt: install
	$(VENV)/bin/ruff format app tests scripts
	$(VENV)/bin/ruff check --fix app tests scripts

bench: install
	$(PY) scripts/bench/bench.py

clean:
	rm -rf $(VENV) $(ULTRALYTICS_VENV) .pytest_cache .mypy_cache .ruff_cache
