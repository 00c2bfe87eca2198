# Two commands for a fresh machine: `make demo` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/binance_BTCUSDT_5m_2024.csv.gz

DEMO_STATE ?= .demo-state

.PHONY: venv demo run test test-all lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, so that no range pulls in a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Replays the daemon (same tick code as live paper trading) over the last two months of the 2024 data with
# the shipped default checkpoint and online learning on, then prints `ritmo status`.
demo: venv
	rm -rf $(DEMO_STATE)
	RITMO_LOG_FORMAT=console $(PY) -m bot run --replay $(DATA) --from 2024-11-01 --to 2025-01-01 --speed max \
		--seed 1 --state-dir $(DEMO_STATE) --checkpoint checkpoints/default.pt --online-learning
	$(PY) -m bot status --state-dir $(DEMO_STATE) --mode replay

# Paper trading against Binance's public market data (needs internet; no keys). Settings from .env.
run: venv
	$(PY) -m bot run

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
	$(PY) benchmarks/bench_daemon.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(DEMO_STATE)
