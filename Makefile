# Two commands for a fresh machine: `make demo` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/binance_BTCUSDT_5m_2024.csv.gz

DEMO_STATE ?= .demo-state

.PHONY: venv demo run test test-all lint bench clean evaluation evaluation-doc

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, so that no range pulls in a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Replays the daemon (same tick code as live paper trading) over the last two months of the 2024 data with
# the shipped default checkpoint and online learning on, then prints `ritmo status`. The default decides every
# 48 candles (4 hours): episodes of 84 decisions (two weeks, as in its training) give about four online updates.
demo: venv
	rm -rf $(DEMO_STATE)
	RITMO_LOG_FORMAT=console RITMO_EPISODE_STEPS=84 RITMO_MIN_EPISODE_STEPS=24 $(PY) -m bot run --replay $(DATA) --from 2024-11-01 --to 2025-01-01 --speed max \
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

# One table of every speed and memory figure against its target (benchmarks/bench_all.py); stable-baselines3
# is installed for the training anchor only. The scripts it runs also work one by one.
bench: venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_all.py

# Walk-forward evaluations of the shipped configurations (docs/evaluation.md): about two hours on 2 cores,
# resumable (a finished fold/seed is kept under $(EVAL_OUT)). They re-read test folds already read once, so
# they are not recorded in the trials registry again; then the stored reports and the page are refreshed.
EVAL_DATA := $(foreach y,2021 2022 2023 2024,../shared/data/binance_BTCUSDT_5m_$(y).csv.gz)
EVAL_OUT ?= out/evaluation
EVALUATE = $(PY) -m bot evaluate --data $(EVAL_DATA) --folds 24/3/3/6 --seeds 5 --workers 2 --no-record

evaluation: venv
	$(EVALUATE) --split test --reread-test --config configs/default-long-only.json --name default-long-only \
		--out $(EVAL_OUT)/default-long-only
	$(EVALUATE) --split test --reread-test --config configs/default.json --name default --out $(EVAL_OUT)/default
	$(EVALUATE) --split test --reread-test --config configs/lo-exp-k12.json --name lo-exp-k12 --out $(EVAL_OUT)/lo-exp-k12
	$(EVALUATE) --split test --reread-test --config configs/lo-exp-k12.json --set position_mode='"long_short"' \
		--name ls-exp-k12 --out $(EVAL_OUT)/ls-exp-k12
	$(EVALUATE) --split valid --config configs/lo-exp-k12.json --set schedule='"symmetric"' \
		--name lo-exp-k12-symmetric --out $(EVAL_OUT)/lo-exp-k12-symmetric
	for n in default-long-only default lo-exp-k12 ls-exp-k12 lo-exp-k12-symmetric; do mkdir -p docs/evaluation/$$n; \
		cp $(EVAL_OUT)/$$n/report.md $(EVAL_OUT)/$$n/results.json $(EVAL_OUT)/$$n/*.png docs/evaluation/$$n/; done
	$(MAKE) evaluation-doc

# docs/evaluation.md from the trials registry and the stored reports (seconds).
evaluation-doc: venv
	$(PY) scripts/evaluation_doc.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(DEMO_STATE)
