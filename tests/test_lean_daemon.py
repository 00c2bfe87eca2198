"""The daemon's processes never load pandas, pyarrow, ta or torch's compiler stack (docs/design.md §8): a replay
with online learning, and a paper tick through ccxt against the loopback fake Binance. Each runs in a fresh
Python, which then reports what it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from tests.conftest import DATA_2024, REPO
from tests.fake_binance import FakeBinance

# pandas + pyarrow ~85 MB, ta needs pandas, torch._dynamo + sympy ~70 MB (strategies/optim.py).
HEAVY = ("pandas", "pyarrow", "ta", "torch._dynamo", "sympy")
CHECKPOINT = REPO / "checkpoints" / "default.pt"

# Runs the CLI, then prints the heavy modules it loaded as the last line.
RUNNER = """
import json, sys
from bot.cli import main
code = main(sys.argv[1:])
print("HEAVY " + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
sys.exit(code)
"""


def _run(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, list[str], str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RITMO_")}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER.format(heavy=HEAVY), *args],
        env={**clean, "PYTHONPATH": str(REPO), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY ")]
    heavy = json.loads(lines[-1][len("HEAVY ") :]) if lines else ["(no report)"]
    return proc.returncode, heavy, proc.stdout + proc.stderr


def _events(out: str, name: str) -> list[dict]:
    return [e for e in (json.loads(ln) for ln in out.splitlines() if ln.startswith("{")) if e.get("event") == name]


def test_a_replay_with_online_learning_loads_no_pandas(tmp_path: Path) -> None:
    args = ["run", "--replay", str(DATA_2024), "--from", "2024-12-01", "--to", "2024-12-04", "--speed", "max"]
    args += ["--seed", "1", "--state-dir", str(tmp_path / "state"), "--checkpoint", str(CHECKPOINT)]
    code, heavy, out = _run(
        [*args, "--online-learning"], {"RITMO_EPISODE_STEPS": "6", "RITMO_MIN_EPISODE_STEPS": "4"}, tmp_path
    )
    assert code == 0, out[-3000:]
    done = _events(out, "replay_done")
    assert done and done[0]["updates"] >= 1, out[-3000:]  # online learning really ran
    assert heavy == []


def test_a_paper_tick_through_ccxt_loads_no_pandas(tmp_path: Path, candles_2024: pd.DataFrame) -> None:
    with FakeBinance(candles=candles_2024) as fake:
        now_ms = time.time_ns() // 1_000_000
        fake.server_offset_ms = (now_ms // 300_000) * 300_000 + 60_000 - now_ms  # well inside a candle
        env = {
            "RITMO_MODE": "paper",
            "RITMO_EXCHANGE_CONFIG": json.dumps(fake.ccxt_config(timeout_ms=2_000)),
            "RITMO_CHECKPOINT": str(CHECKPOINT),
            "RITMO_STATE_DIR": str(tmp_path / "state"),
            "RITMO_ONLINE_LEARNING": "true",
            "RITMO_LOG_FORMAT": "json",
        }
        code, heavy, out = _run(["run", "--once", "--env-file", str(tmp_path / "absent.env")], env, tmp_path)
        assert fake.requests_to("/api/v3/klines"), "the tick must have fetched candles from the fake"
    assert code == 0, out[-3000:]
    assert _events(out, "tick"), out[-3000:]
    assert heavy == []
