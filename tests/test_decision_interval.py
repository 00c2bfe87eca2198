"""The decision interval in the daemon: a checkpoint with decide_every K decides only on decision candles.

Checkpoints here are checkpoints/card-exact.pt (a frozen reference) with decide_every = 12 and its decision
head's last bias pushed away from HOLD (that policy never trades, and these tests must see trades).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from bot.cli import main as cli_main
from bot.daemon.state import open_state_readonly
from bot.files.checkpoints import load_checkpoint, save_checkpoint
from strategies.bundle import ModelBundle, backtest_period
from strategies.candles import CANDLE_MS, parse_utc_date_ms
from strategies.features import build_observations, compute_features
from strategies.objectives import ex_ante_volatility, is_decision_candle
from strategies.trainer import TrainConfig
from tests.conftest import process_isolation
from tests.test_daemon import replay_daemon, run_ticks, weights
from tests.test_replay import REPO, replay_args

K = 12
DEC1 = parse_utc_date_ms("2024-12-01")


def interval_checkpoint(path: Path, decide_every: int = K, bias_shift: float = 10.0, **train: Any) -> Path:
    """checkpoints/card-exact.pt deciding every `decide_every` candles, with HOLD made less likely (so it trades);
    `train` overrides fields of its train_config (objective, group_size, ...)."""
    bundle = load_checkpoint(REPO / "checkpoints" / "card-exact.pt")
    with torch.no_grad():
        bundle.model.head.net[-1].bias.add_(torch.tensor([-bias_shift, bias_shift, bias_shift]))
    config = {**bundle.train_config, **train}
    bundle = dataclasses.replace(bundle, decide_every=decide_every, train_config=config, optimizers=None)
    return save_checkpoint(path, bundle)


@pytest.fixture(autouse=True)
def _isolated(isolated_process: None) -> None:
    """Process state isolated (tests/conftest.py)."""


@pytest.fixture(scope="module")
def k12_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return interval_checkpoint(tmp_path_factory.mktemp("k12") / "k12.pt")


@pytest.fixture(scope="module")
def candles(candles_2024: pd.DataFrame) -> pd.DataFrame:
    """Nov-Dec 2024 (warm-up for replays starting on 2024-12-01)."""
    return candles_2024[candles_2024["ts_ms"] >= parse_utc_date_ms("2024-11-01")].reset_index(drop=True)


def read_rows(state_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    (db,) = state_dir.glob("*.sqlite")
    store = open_state_readonly(db)
    try:
        return store.conn.execute(sql).fetchall()
    finally:
        store.conn.close()


# ---------------------------------------------------------------------------------------------------
# Replay (learning off) == backtest, and the rhythm of decisions.
# ---------------------------------------------------------------------------------------------------

DATE_FROM, DATE_TO, SEED = "2024-12-01", "2024-12-04", 5


@contextlib.contextmanager
def in_process(cwd: Path) -> Iterator[io.StringIO]:
    """Run `ritmo` in-process for a module-scoped fixture (the conftest's isolated_process is per test), with
    its stdout captured."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, process_isolation(mp, cwd), contextlib.redirect_stdout(out):
        yield out


@pytest.fixture(scope="module")
def k12_replay(
    tmp_path_factory: pytest.TempPathFactory, k12_checkpoint: Path, candles_2024: pd.DataFrame
) -> dict[str, Any]:
    """One 3-day replay of the K = 12 checkpoint with learning off (shared by the tests below), and the
    backtest of the same checkpoint, seed and period."""
    root = tmp_path_factory.mktemp("k12-replay")
    state = root / "state"
    with in_process(root) as out:
        args = [*replay_args(state, k12_checkpoint, DATE_FROM, DATE_TO, SEED), "--no-online-learning"]
        assert cli_main(args) == 0
        log_lines = out.getvalue().splitlines()
        assert cli_main(["status", "--json", "--state-dir", str(state)]) == 0
        status = json.loads(out.getvalue().splitlines()[-1])
    bundle = load_checkpoint(k12_checkpoint)
    obs = build_observations(compute_features(candles_2024, bundle.spec), bundle.standardizer)
    result = backtest_period(
        bundle,
        candles_2024,
        obs,
        parse_utc_date_ms(DATE_FROM),
        parse_utc_date_ms(DATE_TO),
        greedy=False,
        seed=SEED,
        commission=0.001,
    )
    return {
        "state": state,
        "log": [json.loads(line) for line in log_lines if line.startswith("{")],
        "status": status,
        "backtest": result,
    }


def test_k12_replay_equals_backtest_trade_for_trade(k12_replay: dict[str, Any]) -> None:
    """Learning off: the K = 12 replay books exactly the trades of `ritmo backtest` (which honours K too)."""
    result = k12_replay["backtest"]
    fills = read_rows(k12_replay["state"], "SELECT decision_ts_ms, side, qty_base, price, fee_quote FROM fills")
    replay_trades = [(ts + CANDLE_MS, side, qty, price, fee) for ts, side, qty, price, fee in fills]
    backtest_trades = [(t.ts_ms, t.side, t.qty_base, t.price, t.fee_quote) for t in result.trades]
    assert len(replay_trades) == len(backtest_trades) >= 10, "the test policy must trade"
    assert replay_trades == backtest_trades
    s = k12_replay["status"]
    assert s["equity"] == pytest.approx(result.policy.final_equity, rel=1e-9)
    assert s["fees_quote"] == pytest.approx(result.policy.fees_quote, rel=1e-9)
    assert s["n_trades"] == result.policy.n_trades
    actions = [r[0] for r in read_rows(k12_replay["state"], "SELECT action FROM decisions ORDER BY ts_ms")]
    np.testing.assert_array_equal(actions, result.actions)  # HOLD between decisions in both


def test_k12_decides_only_on_decision_candles_and_marks_every_tick(k12_replay: dict[str, Any]) -> None:
    rows = read_rows(
        k12_replay["state"],
        "SELECT ts_ms, status, action, p_hold, reason, equity_before, equity_after, episode_step, close"
        " FROM decisions ORDER BY ts_ms",
    )
    assert len(rows) == 3 * 288
    decided = [r for r in rows if r[1] == "acted"]
    kept = [r for r in rows if r[1] == "kept"]
    assert len(decided) + len(kept) == len(rows)
    assert [r[0] for r in decided] == [r[0] for r in rows if (r[0] // 300_000 + 1) % K == 0]
    assert len(decided) == 3 * 288 // K
    assert all(r[2] == 0 and r[3] is None and r[4] == "between_decisions" and r[7] is None for r in kept)
    assert all(r[3] is not None and r[7] is not None for r in decided)
    # Equity is marked at every close, kept ticks included, and equals the backtest's curve at each close.
    curve = k12_replay["backtest"].policy_equity
    for i, r in enumerate(rows):
        assert math.isfinite(r[5]) and math.isfinite(r[6])
        assert r[5] == pytest.approx(curve[i], rel=1e-12)
    ticks = [e for e in k12_replay["log"] if e["event"] == "tick"]
    assert len(ticks) == len(rows) and all(e["equity"] is not None for e in ticks)
    assert {e["status"] for e in ticks} == {"acted", "kept"}
    s = k12_replay["status"]
    assert s["decisions"] == {"acted": len(decided), "kept": len(kept)}
    assert s["model"]["decide_every"] == K


def test_k12_steps_settle_at_the_close_k_candles_later(
    k12_replay: dict[str, Any], candles: pd.DataFrame, k12_checkpoint: Path
) -> None:
    """Step t's reward is ln(E at the close of t + K / E at t's close); its stored prices are the candles'."""
    equity = dict(read_rows(k12_replay["state"], "SELECT ts_ms, equity_before FROM decisions"))
    steps = read_rows(
        k12_replay["state"],
        "SELECT ts_ms, reward, decision_close, next_open, settle_close, volatility FROM episode_steps ORDER BY ts_ms",
    )
    assert len(steps) == 3 * 288 // K
    by_ts = candles.set_index("ts_ms")
    closes = candles["close"].to_numpy()
    window = TrainConfig.from_dict(load_checkpoint(k12_checkpoint).train_config).vol_window
    vol = ex_ante_volatility(closes, window, K)
    row_of = {int(ts): i for i, ts in enumerate(candles["ts_ms"].to_numpy())}
    settled = [s for s in steps if s[1] is not None]
    assert len(settled) == len(steps) - 1  # the last decision's settling candle is after the replay
    for ts, reward, d_close, n_open, s_close, v in settled:
        assert is_decision_candle(ts, K)
        assert reward == pytest.approx(math.log(equity[ts + K * CANDLE_MS] / equity[ts]), rel=1e-12, abs=1e-15)
        assert d_close == by_ts.loc[ts, "close"]
        assert n_open == by_ts.loc[ts + CANDLE_MS, "open"]
        assert s_close == by_ts.loc[ts + K * CANDLE_MS, "close"]
        assert v == pytest.approx(vol[row_of[ts]], rel=1e-9)


# ---------------------------------------------------------------------------------------------------
# Episodes of decisions K candles apart, and their continuity.
# ---------------------------------------------------------------------------------------------------


def test_episode_counts_decisions_and_gap_between_decisions_truncates(
    tmp_path: Path, candles: pd.DataFrame, k12_checkpoint: Path
) -> None:
    comps = replay_daemon(
        tmp_path, k12_checkpoint, candles, episode_steps=4, min_episode_steps=2, online_learning="false"
    )
    daemon, store = comps.daemon, comps.store
    try:
        first = DEC1 - CANDLE_MS  # the candle decided on at now = DEC1
        assert is_decision_candle(first, K)
        run_ticks(daemon, DEC1, 4 * K + 1)  # 4 decisions, then the 5th settles the 4th and starts episode 2
        ep1 = store.episode(1)
        assert (ep1["status"], ep1["steps"], ep1["settled"], ep1["truncated"]) == ("frozen", 4, 4, 0)
        assert store.open_episode()["steps"] == 1
        # Downtime over the next decision candle (ticks resume after it): the open episode is cut as a gap.
        resume_now = DEC1 + (5 * K + 2) * CANDLE_MS
        out = daemon.tick(resume_now)
        assert out.status == "kept"
        ep2 = store.episode(2)
        assert (ep2["status"], ep2["truncated"], ep2["reason"]) == ("discarded", 1, "gap")
        # Downtime only between two decisions keeps the chain: the position was held all along.
        run_ticks(daemon, resume_now + CANDLE_MS, K)  # reaches the next decision candle
        ep3 = store.open_episode()
        assert ep3["steps"] == 1
        daemon.tick(resume_now + (K + 5) * CANDLE_MS)  # skips a few kept candles
        run_ticks(daemon, resume_now + (K + 6) * CANDLE_MS, K - 5)  # up to the next decision
        assert store.open_episode()["id"] == ep3["id"] and store.open_episode()["steps"] == 2
        assert store.episode(ep3["id"])["settled"] == 1
    finally:
        store.close()


def test_k1_checkpoint_decides_every_candle(tmp_path: Path, candles: pd.DataFrame) -> None:
    """decide_every 1 (every checkpoint from before the field): no kept tick, as before."""
    ckpt = interval_checkpoint(tmp_path / "k1.pt", decide_every=1)
    comps = replay_daemon(tmp_path / "state", ckpt, candles, online_learning="false")
    try:
        outs = run_ticks(comps.daemon, DEC1, 30)
        assert {o.status for o in outs} == {"acted"}
        assert comps.store.conn.execute("SELECT COUNT(*) FROM episode_steps").fetchone()[0] == 30
    finally:
        comps.store.close()


def test_halt_between_decisions_flattens_at_once(tmp_path: Path, candles: pd.DataFrame, k12_checkpoint: Path) -> None:
    """The drawdown guard does not wait for the next decision: a halt on a kept tick flattens on that tick."""
    comps = replay_daemon(tmp_path, k12_checkpoint, candles, online_learning="false")
    daemon, store = comps.daemon, comps.store
    try:
        i = 0
        while True:  # up to a kept tick that holds a position (the test policy trades at most decisions)
            out = daemon.tick(DEC1 + i * CANDLE_MS)
            i += 1
            if out.status == "kept" and out.position_after != 0:
                break
            assert i < 200, "the test policy never held a position"
        with store.transaction():
            store.set_meta("peak_equity", 10 * out.equity)  # a drawdown of 90% as of the next close
        halted = daemon.tick(DEC1 + i * CANDLE_MS)
        assert not is_decision_candle(halted.ts_ms, K)
        assert (halted.status, halted.position_before, halted.position_after) == ("halted", out.position_after, 0)
        assert halted.probs is None and halted.fee_quote > 0
        row = store.last_decision()
        assert (row["status"], row["reason"], row["p_hold"]) == ("halted", "halt", None)
        assert store.conn.execute("SELECT reason FROM orders ORDER BY created_at_ms DESC").fetchone()[0] == "halt"
        assert [e["kind"] for e in store.events("halt")] == ["halt"]
        later = run_ticks(daemon, DEC1 + (i + 1) * CANDLE_MS, K)  # a decision candle among them: still halted
        assert all(o.status == "halted" and o.position_after == 0 for o in later)
    finally:
        store.close()


@pytest.mark.parametrize(("objective", "method"), [("log_return", "group"), ("expected_pnl", "expected_pnl")])
def test_restart_mid_interval_continues_exactly(
    tmp_path: Path, candles: pd.DataFrame, objective: str, method: str
) -> None:
    """K = 12 with a non-card update: 130 ticks in one go == 67 + restart + 63, weights included."""
    group = 4 if method == "group" else 1
    ckpt = interval_checkpoint(tmp_path / "k12g.pt", objective=objective, group_size=group)
    extra = {"episode_steps": 3, "min_episode_steps": 2, "macro_every": 2, "max_drawdown": 1}
    a = replay_daemon(tmp_path / "a", ckpt, candles, **extra)
    try:
        run_ticks(a.daemon, DEC1, 130)
        ref = (a.daemon.mem.ledger.to_dict(), a.daemon.mem.k, a.daemon.mem.macro_updates)
        ref_w = weights(a.daemon.learner.model)
        ref_updates = a.store.conn.execute("SELECT k, status, method, loss FROM updates ORDER BY k").fetchall()
    finally:
        a.store.close()
    k0 = load_checkpoint(ckpt).rhythm["k"]  # the online rhythm continues the training checkpoint's counter
    assert ref[1] == k0 + 3 and [u[2] for u in ref_updates] == [method] * 3
    b = replay_daemon(tmp_path / "b", ckpt, candles, **extra)
    run_ticks(b.daemon, DEC1, 67)  # mid-interval, mid-episode, after the first update
    b.store.close()
    b = replay_daemon(tmp_path / "b", ckpt, candles, **extra)
    try:
        run_ticks(b.daemon, DEC1 + 67 * CANDLE_MS, 63)
        assert (b.daemon.mem.ledger.to_dict(), b.daemon.mem.k, b.daemon.mem.macro_updates) == ref
        got = weights(b.daemon.learner.model)
        assert all(torch.equal(got[key], ref_w[key]) for key in ref_w)
        assert b.store.conn.execute("SELECT k, status, method, loss FROM updates ORDER BY k").fetchall() == ref_updates
    finally:
        b.store.close()


def test_bundle_round_trip_keeps_decide_every(tmp_path: Path, k12_checkpoint: Path) -> None:
    bundle: ModelBundle = load_checkpoint(k12_checkpoint)
    assert bundle.decide_every == K
    assert load_checkpoint(interval_checkpoint(tmp_path / "o.pt", objective="dsr")).objective == "dsr"


def test_changed_decision_interval_discards_the_open_episode(
    tmp_path: Path, candles: pd.DataFrame, k12_checkpoint: Path
) -> None:
    """A state whose open episode was decided every 12 candles, restarted with a K = 1 checkpoint: that episode's
    chain and settlement no longer hold, so it is discarded (and the change recorded)."""
    comps = replay_daemon(tmp_path, k12_checkpoint, candles, online_learning="false")
    run_ticks(comps.daemon, DEC1, 30)
    assert comps.store.open_episode()["steps"] == 3
    comps.store.close()
    k1 = interval_checkpoint(tmp_path / "k1.pt", decide_every=1)
    comps = replay_daemon(tmp_path, k1, candles, online_learning="false")
    try:
        assert comps.store.open_episode() is None and comps.store.episode(1)["reason"] == "decide_every_changed"
        assert [e["detail"] for e in comps.store.events("decide_every_changed")] == [{"old": K, "new": 1}]
        assert comps.daemon.tick(DEC1 + 30 * CANDLE_MS).status == "acted"
    finally:
        comps.store.close()
