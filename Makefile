# Everything runs inside .venv, created on first use; torch is pinned to the CPU wheel.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test lint bench bench-fingerprint bench-perf bench-ac bench-ac-margins bench-scale clean

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

test: lint
	$(BIN)/python -m pytest -q

bench: bench-fingerprint bench-ac bench-scale

bench-fingerprint: $(STAMP)
	$(BIN)/python bench/bench_fingerprint.py

bench-ac: $(STAMP)
	$(BIN)/python bench/bench_ac.py

bench-ac-margins: $(STAMP)
	$(BIN)/python bench/ac_margins.py

bench-perf: $(STAMP)
	$(BIN)/python bench/bench_perf.py

bench-scale: $(STAMP)
	$(BIN)/python bench/bench_scale.py

clean:
	rm -rf $(VENV) .gate-cache gate-report .pytest_cache .mypy_cache .ruff_cache
