# Everything runs inside .venv, created on first use; torch is pinned to the CPU wheel.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo image test lint bench bench-fingerprint bench-perf bench-device bench-ac bench-ac-text bench-ac-margins bench-scale clean

# `make image`: the container image, with podman or docker (whichever is on PATH). Build
# arguments pass through: BASE_IMAGE, TORCH_INDEX_URL, GATE_EXTRAS; WHEELHOUSE=DIR (anywhere)
# builds offline from DIR's wheels (staged with the context in a temporary directory).
# Podman on hosts where crun cannot set rlimits:
#   make image ENGINE_FLAGS="--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=4096:4096"
ENGINE ?= $(shell command -v podman || command -v docker)
ENGINE_FLAGS ?=
IMAGE ?= gate:latest
BASE_IMAGE ?= python:3.11-slim
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
GATE_EXTRAS ?=
WHEELHOUSE ?=

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/gate demo

lint: $(STAMP)
	$(BIN)/ruff check gate tests bench
	$(BIN)/mypy gate

# Two workers by default (the CI machines have two cores); TEST_JOBS=0 runs serially.
# --dist loadfile keeps each file on one worker, so its module fixtures train once.
TEST_JOBS ?= 2

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

bench: bench-fingerprint bench-ac bench-scale

bench-fingerprint: $(STAMP)
	$(BIN)/python bench/bench_fingerprint.py

bench-trigger: $(STAMP)
	$(BIN)/python bench/bench_trigger.py

bench-ac: $(STAMP)
	$(BIN)/python bench/bench_ac.py

bench-ac-text: $(STAMP)
	$(BIN)/python bench/bench_ac_text.py

bench-ac-margins: $(STAMP)
	$(BIN)/python bench/ac_margins.py

bench-perf: $(STAMP)
	$(BIN)/python bench/bench_perf.py

# Skips, saying why, unless torch sees a CUDA or MPS device.
bench-device: $(STAMP)
	$(BIN)/python bench/bench_device.py

bench-scale: $(STAMP)
	$(BIN)/python bench/bench_scale.py

image:
	@test -n "$(ENGINE)" || { echo "make image: neither podman nor docker is on PATH" >&2; exit 1; }
	set -e; ctx=.; \
	if [ -n "$(WHEELHOUSE)" ]; then \
	  ctx=$$(mktemp -d); trap 'rm -rf "$$ctx"' EXIT; \
	  cp -R Dockerfile .dockerignore pyproject.toml constraints.txt README.md gate policies "$$ctx"/; \
	  mkdir "$$ctx/wheelhouse"; \
	  cp -l "$(WHEELHOUSE)"/*.whl "$$ctx/wheelhouse/" 2>/dev/null || cp "$(WHEELHOUSE)"/*.whl "$$ctx/wheelhouse/"; \
	fi; \
	$(ENGINE) build $(ENGINE_FLAGS) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) --build-arg GATE_EXTRAS=$(GATE_EXTRAS) \
	  -t $(IMAGE) "$$ctx"; \
	$(ENGINE) image inspect --format '$(IMAGE): {{.Size}} bytes, user {{.Config.User}}' $(IMAGE)

clean:
	rm -rf $(VENV) .gate-cache gate-report .pytest_cache .mypy_cache .ruff_cache
