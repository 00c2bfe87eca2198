"""The SQLite state: schema and version checks, WAL/synchronous pragmas, atomic transactions, the lock."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from bot.brokers.base import OrderIntent
from bot.daemon.state import (
    SCHEMA_VERSION,
    StateError,
    open_state,
    open_state_for_update,
    open_state_readonly,
)
from strategies.accounting import Fill, Ledger


def db(tmp_path: Path, **kw: object):
    return open_state(tmp_path / "paper-BTC-USDT.sqlite", mode="paper", symbol="BTC/USDT", **kw)  # type: ignore[arg-type]


def test_schema_created_with_version_and_pragmas(tmp_path: Path) -> None:
    store = db(tmp_path)
    try:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"meta", "decisions", "orders", "fills", "episodes", "episode_steps", "updates", "events"} <= tables
        assert store.get_meta("mode") == "paper" and store.get_meta("symbol") == "BTC/USDT"
    finally:
        store.close()


def test_replay_state_uses_normal_sync(tmp_path: Path) -> None:
    store = db(tmp_path, durable=False)
    try:
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        store.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db(tmp_path).close()
    path = tmp_path / "paper-BTC-USDT.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StateError, match="newer than this ritmo"):
        db(tmp_path)
    with pytest.raises(StateError, match="schema version"):
        open_state_readonly(path)


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "paper-BTC-USDT.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE something (x)")
    with pytest.raises(StateError, match="not a ritmo state"):
        db(tmp_path)


def test_other_mode_or_symbol_is_refused(tmp_path: Path) -> None:
    db(tmp_path).close()
    with pytest.raises(StateError, match="belongs to mode=paper"):
        open_state(tmp_path / "paper-BTC-USDT.sqlite", mode="replay", symbol="BTC/USDT")


def test_second_daemon_is_locked_out(tmp_path: Path) -> None:
    store = db(tmp_path)
    try:
        with pytest.raises(StateError, match="in use by another ritmo process"):
            db(tmp_path)
        # Readers (ritmo status) and operator writes (ritmo resume) need no lock.
        open_state_readonly(tmp_path / "paper-BTC-USDT.sqlite").conn.close()
        open_state_for_update(tmp_path / "paper-BTC-USDT.sqlite").conn.close()
    finally:
        store.close()
    db(tmp_path).close()  # released on close


def test_transaction_is_all_or_nothing(tmp_path: Path) -> None:
    store = db(tmp_path)
    try:
        with store.transaction():
            store.insert_decision({"ts_ms": 1, "status": "skipped", "position_before": 0, "position_after": 0})
        with pytest.raises(RuntimeError), store.transaction():
            store.set_meta("ledger", {"x": 1})
            store.insert_decision({"ts_ms": 2, "status": "skipped", "position_before": 0, "position_after": 0})
            raise RuntimeError("crash in the middle of a tick")
        assert store.get_meta("ledger") is None
        assert store.decision_count() == 1
        # The decisions primary key forbids acting twice on one candle.
        with pytest.raises(sqlite3.IntegrityError), store.transaction():
            store.insert_decision({"ts_ms": 1, "status": "acted", "position_before": 0, "position_after": 1})
        assert store.decision_count() == 1
    finally:
        store.close()


def test_meta_floats_round_trip_exactly(tmp_path: Path) -> None:
    store = db(tmp_path)
    try:
        ledger = Ledger(cash_quote=1 / 3, qty_base=0.1 + 0.2, position=1, fees_quote=1e-17, n_trades=3)
        with store.transaction():
            store.set_meta("ledger", ledger.to_dict())
        assert Ledger.from_dict(store.get_meta("ledger")) == ledger
        with pytest.raises(ValueError), store.transaction():
            store.set_meta("bad", float("nan"))  # never store a NaN the JSON could not read back
    finally:
        store.close()


def test_orders_fills_and_pending(tmp_path: Path) -> None:
    store = db(tmp_path)
    try:
        intent = OrderIntent("rt-BTCUSDT-1-B0", "BTC/USDT", 1000, "buy", 0.5, 100.0, 1, "policy")
        with store.transaction():
            store.record_intent(intent)
        assert [o["client_order_id"] for o in store.pending_orders()] == ["rt-BTCUSDT-1-B0"]
        fill = Fill("buy", 0.5, 100.1, 0.05, 50.05, 0, 1)
        with store.transaction():
            store.set_order_status(intent.client_order_id, "filled")
            store.insert_fill(intent.client_order_id, 1000, fill)
        assert store.pending_orders() == []
        (row,) = store.fills()
        assert (row["side"], row["qty_base"], row["price"], row["fee_quote"]) == ("buy", 0.5, 100.1, 0.05)
        with pytest.raises(StateError), store.transaction():
            store.set_order_status("nope", "filled")
        with pytest.raises(sqlite3.IntegrityError), store.transaction():
            store.set_order_status(intent.client_order_id, "bogus")
    finally:
        store.close()


def test_episode_steps_round_trip(tmp_path: Path) -> None:
    store = db(tmp_path)
    rng = np.random.default_rng(0)
    try:
        with store.transaction():
            ep = store.create_episode(0)
            for step in range(4):
                macro = rng.normal(size=60).astype(np.float32)
                micro = rng.normal(size=60).astype(np.float32)
                store.add_step(ep, step, step * 300_000, macro, micro, step % 2, step % 3, 100.0 + step)
        assert store.unsettled_step()["step"] == 3
        with store.transaction():
            for step in range(3):
                store.settle_step(ep, step, 0.01 * step)
            store.settle_step(ep, 0, 99.0)  # settling twice does nothing
        row = store.open_episode()
        assert (row["steps"], row["settled"]) == (4, 3)
        batch = store.episode_batch(ep)
        assert batch.macro.shape == (3, 60) and batch.macro.dtype == np.float32
        np.testing.assert_array_equal(batch.rewards, [0.0, 0.01, 0.02])
        np.testing.assert_array_equal(batch.actions, [0, 1, 2])
        np.testing.assert_array_equal(batch.positions, [0, 1, 0])
        with store.transaction():
            store.close_episode(ep, "pending", truncated=True, reason="gap")
        assert store.open_episode() is None and store.unsettled_step() is None
        assert [e["id"] for e in store.pending_episodes()] == [ep]
    finally:
        store.close()


def test_readonly_open_of_missing_state(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no state database"):
        open_state_readonly(tmp_path / "nothing.sqlite")
