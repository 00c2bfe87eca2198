# Two commands for a fresh machine: `make demo` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/binance_BTCUSDT_5m_2024.csv.gz

.PHONY: venv demo test test-all lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, so that no range pulls in a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m bot backtest --random-init --seed 1 --data $(DATA) --from 2024-11-01 --to 2025-01-01

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest

test-all: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -m ''

lint: venv
	$(PY) -m ruff check .

bench: venv
	$(PY) benchmarks/bench_features.py
	$(PY) benchmarks/bench_backtest.py
	$(PY) benchmarks/bench_policy.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
