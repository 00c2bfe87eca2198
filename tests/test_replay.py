"""`ritmo run --replay` on real data: equals `ritmo backtest`, learns per closed episode, survives SIGKILL exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from bot.cli import main as cli_main
from bot.daemon.state import open_state_readonly
from bot.files.checkpoints import load_checkpoint
from strategies.bundle import backtest_period
from strategies.candles import CANDLE_MS, parse_utc_date_ms
from strategies.features import build_observations, compute_features
from tests.conftest import DATA_2024
from tests.test_daemon import make_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated(isolated_process: None) -> None:
    """Process state isolated (tests/conftest.py)."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "test.pt", candles_2024)


def replay_args(state_dir: Path, checkpoint: Path, date_from: str, date_to: str, seed: int = 1) -> list[str]:
    return [
        "run",
        "--replay",
        str(DATA_2024),
        "--from",
        date_from,
        "--to",
        date_to,
        "--speed",
        "max",
        "--seed",
        str(seed),
        "--state-dir",
        str(state_dir),
        "--checkpoint",
        str(checkpoint),
    ]


def status_json(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert cli_main(["status", "--json", "--state-dir", str(state_dir)]) == 0
    return json.loads(capsys.readouterr().out)


def final_state(state_dir: Path) -> dict[str, Any]:
    """Everything a kill must not change: ledger, position, rhythm, decisions, fills, and the newest weights."""
    (db,) = state_dir.glob("*.sqlite")
    store = open_state_readonly(db)
    try:
        meta = store.all_meta()
        decisions = store.conn.execute(
            "SELECT ts_ms, status, action, p_hold, p_buy, p_sell, model_version, position_after, fee_quote"
            " FROM decisions ORDER BY ts_ms"
        ).fetchall()
        fills = store.conn.execute("SELECT decision_ts_ms, side, qty_base, price, fee_quote FROM fills").fetchall()
        steps = store.conn.execute("SELECT episode_id, step, ts_ms, action, reward FROM episode_steps").fetchall()
        episodes = store.conn.execute("SELECT id, status, steps, settled, k FROM episodes").fetchall()
        updates = store.conn.execute("SELECT k, episode_id, status, parts, loss, model_version FROM updates").fetchall()
    finally:
        store.conn.close()
    model = meta["model"]
    payload = torch.load(model["checkpoint_path"], weights_only=True) if model["source"] == "online" else None
    return {
        "ledger": meta["ledger"],
        "rhythm": meta["rhythm"],
        "last_candle": meta["last_candle"],
        "model_version": model["version"],
        "decisions": decisions,
        "fills": fills,
        "steps": steps,
        "episodes": episodes,
        "updates": updates,
        "weights": payload["model"] if payload else None,
        "optimizers": payload["optimizers"] if payload else None,
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("ledger", "rhythm", "last_candle", "model_version", "decisions", "fills", "steps", "episodes"):
        assert a[key] == b[key], key
    assert [u[:4] for u in a["updates"]] == [u[:4] for u in b["updates"]]
    assert [u[5] for u in a["updates"]] == [u[5] for u in b["updates"]]
    for part in ("macro", "micro", "head"):
        for name, tensor in a["weights"][part].items():
            assert torch.equal(tensor, b["weights"][part][name]), (part, name)
    for opt in ("macro", "rest"):
        for pid, st in a["optimizers"][opt]["state"].items():
            for name, tensor in st.items():
                assert torch.equal(tensor, b["optimizers"][opt]["state"][pid][name]), (opt, pid, name)


# ---------------------------------------------------------------------------------------------------


def test_replay_equals_backtest(
    tmp_path: Path, checkpoint: Path, candles_2024: pd.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    """Learning off: the same trades and the same final equity as `ritmo backtest` (same checkpoint, seed, period)."""
    date_from, date_to, seed = "2024-12-01", "2024-12-04", 5
    state = tmp_path / "state"
    assert cli_main([*replay_args(state, checkpoint, date_from, date_to, seed), "--no-online-learning"]) == 0
    out = capsys.readouterr().out
    ticks = [json.loads(line) for line in out.splitlines() if '"event": "tick"' in line]
    assert len(ticks) == 3 * 288

    bundle = load_checkpoint(checkpoint)
    obs = build_observations(compute_features(candles_2024, bundle.spec), bundle.standardizer)
    result = backtest_period(
        bundle,
        candles_2024,
        obs,
        parse_utc_date_ms(date_from),
        parse_utc_date_ms(date_to),
        greedy=False,
        seed=seed,
        commission=0.001,
    )
    got = final_state(state)
    # A backtest trade is stamped with the candle whose open filled it: the decision candle + 5 minutes.
    replay_trades = [(ts + CANDLE_MS, side, qty, price, fee) for ts, side, qty, price, fee in got["fills"]]
    backtest_trades = [(t.ts_ms, t.side, t.qty_base, t.price, t.fee_quote) for t in result.trades]
    assert len(replay_trades) == len(backtest_trades) > 50
    assert replay_trades == backtest_trades
    status = status_json(state, capsys)
    assert status["equity"] == pytest.approx(result.policy.final_equity, rel=1e-9)
    assert status["fees_quote"] == pytest.approx(result.policy.fees_quote, rel=1e-9)
    assert status["n_trades"] == result.policy.n_trades
    np.testing.assert_array_equal(
        [d[2] for d in got["decisions"]], result.actions
    )  # every decision's action, not only the trades


def test_week_replay_with_online_learning(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,016 ticks, one update per closed episode (6 closed + the open 7th), the 1:10 rhythm, a consistent ledger."""
    # The test policy is random and pays 0.1% per trade: it would hit the default 50% drawdown halt in a week.
    monkeypatch.setenv("RITMO_MAX_DRAWDOWN", "1")
    state = tmp_path / "state"
    assert cli_main(replay_args(state, checkpoint, "2024-12-01", "2024-12-08")) == 0
    lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object (stdout is not a TTY)
    assert sum(e["event"] == "tick" for e in events) == 2016
    assert sum(e["event"] == "online_update" for e in events) == 6

    s = status_json(state, capsys)
    assert s["decisions"] == {"acted": 2016}
    assert s["episode"]["counts"] == {"learned": 6, "open": 1}
    assert s["episode"]["step"] == 288 and s["episode"]["steps"] == 288
    assert s["rhythm"] == {"k": 6, "macro_updates": 1}  # k = 0..5; MacroNet on k = 0 only (11-period)
    assert s["updates"] == {"learned": 6, "rejected": 0}
    assert s["model"]["source"] == "online" and s["model"]["checkpoint_path"].endswith("online-000005.pt")
    assert s["last_candle"]["ts"] == "2024-12-07T23:55:00Z"

    (db,) = state.glob("*.sqlite")
    store = open_state_readonly(db)
    try:
        updates = store.conn.execute("SELECT k, episode_id, parts, steps, applied FROM updates ORDER BY k").fetchall()
        assert updates == [(k, k + 1, "macro,micro,head" if k == 0 else "micro,head", 288, 1) for k in range(6)]
        fills = store.fills()
        assert sum(f["fee_quote"] for f in fills) == pytest.approx(s["fees_quote"], rel=1e-12)
        assert len(fills) == s["n_trades"]
        last = store.conn.execute("SELECT COUNT(DISTINCT model_version) FROM decisions").fetchone()[0]
        assert last == 7  # the initial model and one new version per update, each acting from the next tick
    finally:
        store.conn.close()
    assert s["equity"] == pytest.approx(s["cash_quote"] + s["qty_base"] * s["last_candle"]["close"], rel=1e-15)
    assert s["profit_quote"] == pytest.approx(s["equity"] - 10_000.0, rel=1e-15)


def _kill_and_restart(args: list[str], state: Path, kill_after: int, env: dict[str, str]) -> None:
    """Run the replay in a subprocess, SIGKILL it once the database holds `kill_after` decisions, run it again."""
    cmd = [sys.executable, "-m", "bot", *args]
    proc = subprocess.Popen(cmd, cwd=state.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = state / "replay-BTC-USDT.sqlite"
    deadline = time.monotonic() + 180
    try:
        while True:
            assert proc.poll() is None, f"replay ended before the kill: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "replay too slow to reach the kill point"
            if db.exists():
                try:
                    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                        n = conn.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
                except sqlite3.OperationalError:
                    n = 0  # schema not created yet
                if n >= kill_after:
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(cmd, cwd=state.parent, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def _kill_test(tmp_path: Path, checkpoint: Path, date_to: str, extra_env: dict[str, str], n_ticks: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RITMO_")}
    env.update(extra_env)
    env["PYTHONPATH"] = str(REPO)
    for key, value in extra_env.items():
        os.environ[key] = value  # the in-process reference run reads the same settings (monkeypatch undoes)
    seed = int.from_bytes(os.urandom(4), "little")
    kill_after = random.Random(seed).randrange(20, n_ticks - 20)
    print(f"kill after {kill_after} decisions (random seed {seed})")

    ref_dir, killed_dir = tmp_path / "ref" / "state", tmp_path / "killed" / "state"
    killed_dir.parent.mkdir(parents=True)
    assert cli_main(replay_args(ref_dir, checkpoint, "2024-12-01", date_to)) == 0
    _kill_and_restart(replay_args(killed_dir, checkpoint, "2024-12-01", date_to), killed_dir, kill_after, env)
    ref, got = final_state(ref_dir), final_state(killed_dir)
    assert len(ref["decisions"]) == n_ticks
    assert_same_state(ref, got)


def test_sigkill_at_a_random_tick_then_restart_is_exact_short(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One day, 24-step episodes (11 updates, MacroNet every 3rd): killed run == uninterrupted run, bit for bit."""
    extra = {
        "RITMO_EPISODE_STEPS": "24",
        "RITMO_MIN_EPISODE_STEPS": "12",
        "RITMO_MACRO_EVERY": "3",
        "RITMO_MAX_DRAWDOWN": "1",
    }
    for key in extra:
        monkeypatch.setenv(key, extra[key])
    _kill_test(tmp_path, checkpoint, "2024-12-02", extra, 288)


@pytest.mark.slow
def test_sigkill_at_a_random_tick_then_restart_is_exact_week(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A week with the default 288-step episodes, killed at a random tick and restarted."""
    extra = {"RITMO_EPISODE_STEPS": "288", "RITMO_MAX_DRAWDOWN": "1"}
    for key in extra:
        monkeypatch.setenv(key, extra[key])
    _kill_test(tmp_path, checkpoint, "2024-12-08", extra, 2016)


def test_replaying_into_a_state_already_past_from_is_a_clear_error(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new --from inside what the state has lived is refused, naming its last candle; after it, it continues."""
    state = tmp_path / "state"
    assert cli_main([*replay_args(state, checkpoint, "2024-12-01", "2024-12-01T06:00"), "--no-online-learning"]) == 0
    capsys.readouterr()
    code = cli_main([*replay_args(state, checkpoint, "2024-12-01T03:00", "2024-12-02"), "--no-online-learning"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    # The last tick (now = 05:55) decided the candle of 05:50; the next free tick is at 06:00.
    assert "is already later than --from 2024-12-01 03:00" in err[0]
    assert "its last decision is on the candle of 2024-12-01 05:50 UTC" in err[0]
    assert "--from 2024-12-01 06:00 or later, or replay into another --state-dir" in err[0]
    # The suggested --from continues the state.
    args = [*replay_args(state, checkpoint, "2024-12-01 06:00", "2024-12-01T07:00"), "--no-online-learning"]
    assert cli_main(args) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    (done,) = [e for e in events if e["event"] == "replay_done"]
    assert done["ticks"] == 12
