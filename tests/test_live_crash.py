"""Crash consistency of live mode: SIGKILL at 20 points of live sessions, restarting each time.

A live `ritmo run --once` (the real ccxt.binance client, tests/crash_daemon.py planting the kill) trades
against the fake Binance server on 127.0.0.1, one candle per run, the fake's clock moved 5 minutes between
runs. Twenty runs are killed with SIGKILL: at least twice at each of the order's critical points (intent
committed / `sent` committed / order executed / fill recorded / tick committed), the rest before a random
SQL statement or HTTP request. After each kill the daemon is restarted, on the same candle or a later one.
At the end: every order the exchange executed is recorded once as filled, with its fills; no candle has two
orders; no order is left pending; and the ledger's cash, position and fees equal the exchange's.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from bot.daemon.state import open_state_readonly
from bot.files.checkpoints import load_checkpoint, save_checkpoint
from bot.settings import LIVE_CONFIRM_PHRASE
from tests.conftest import assert_secrets_absent
from tests.fake_binance import TEST_API_KEY, TEST_API_SECRET, FakeBinance
from tests.test_daemon import make_checkpoint

CANDLE_MS = 300_000
CRASH_DAEMON = Path(__file__).resolve().parent / "crash_daemon.py"
# Points where the order's fate is decided: each gets at least two kills.
ORDER_POINTS = (
    "after_intent_commit",
    "after_sent_commit",
    "after_order_executed",
    "after_fill_recorded",
    "after_tick_commit",
)
N_KILLS = 20
MAX_RUNS = 80
SEED = 20241127
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00Z
CLEAN_STEPS_AFTER = 8


def trading_checkpoint(path: Path, candles: pd.DataFrame) -> Path:
    """A long_only random policy that rarely holds: BUY or SELL with ~47% each (so it trades every ~2 candles)."""
    make_checkpoint(path, candles, mode="long_only", seed=3)
    bundle = load_checkpoint(path)
    with torch.no_grad():
        # Zero weights: the logits are the bias whatever the observation and position (a scaled-down weight
        # still let the position input make the policy repeat its last action, trading far less often).
        bundle.model.head.net[-1].weight.zero_()
        bundle.model.head.net[-1].bias.copy_(torch.tensor([-2.0, 0.0, 0.0]))
    return save_checkpoint(path, bundle)


class Session:
    """The fake exchange, the state directory and the daemon runs of one crash test."""

    def __init__(self, fake: FakeBinance, root: Path, checkpoint: Path) -> None:
        self.fake = fake
        self.root = root
        self.kill_log = root / "kills.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RITMO_")},
            "RITMO_MODE": "live",
            "RITMO_LIVE_CONFIRM": LIVE_CONFIRM_PHRASE,
            "RITMO_API_KEY": TEST_API_KEY,
            "RITMO_API_SECRET": TEST_API_SECRET,
            "RITMO_MAX_POSITION_QUOTE": "1000",
            "RITMO_EXCHANGE_CONFIG": json.dumps(fake.ccxt_config(timeout_ms=2_000)),
            "RITMO_CHECKPOINT": str(checkpoint),
            "RITMO_STATE_DIR": str(root / "state"),
            "RITMO_SEED": "1",
            "RITMO_LOG_FORMAT": "json",
            "RITMO_EPISODE_STEPS": "12",
            "RITMO_MIN_EPISODE_STEPS": "4",
            "CRASH_KILL_LOG": str(self.kill_log),
            "PYTHONUNBUFFERED": "1",
        }
        # The fake's clock: 30 s after the close of candle `step` from a fixed instant, whatever the local time:
        # the candles served, hence the policy's decisions and the orders, are then the same on every run (from
        # the local clock, the number of orders varied with the day the test ran).
        self.t0_ms = T0_MS
        self.outputs: list[str] = []

    def at_step(self, step: int) -> None:
        """Put the exchange's clock 30 s into candle period `step` (the runs take a few seconds)."""
        target = self.t0_ms + step * CANDLE_MS + 30_000
        self.fake.server_offset_ms = target - time.time_ns() // 1_000_000

    def run(self, kill_at: str = "") -> int:
        """One `ritmo run --once`; its exit code (-9 when the planted kill fired)."""
        env = {**self.env, "CRASH_KILL_AT": kill_at}
        done = subprocess.run(
            [sys.executable, str(CRASH_DAEMON), "run", "--once", "--env-file", str(self.root / "absent.env")],
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.outputs.append(done.stdout + done.stderr)
        if done.returncode not in (0, -9):
            raise AssertionError(f"run (kill_at={kill_at!r}) exited {done.returncode}:\n{done.stderr[-4000:]}")
        return done.returncode

    def db(self) -> Path:
        [db] = (self.root / "state").glob("*.sqlite")
        return db

    def state(self) -> dict[str, Any]:
        """Ledger, orders and fills as recorded."""
        store = open_state_readonly(self.db())
        try:
            cur = store.conn.execute("SELECT * FROM orders")
            names = [d[0] for d in cur.description]
            orders = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            return {"ledger": store.get_meta("ledger"), "orders": orders, "fills": store.fills()}
        finally:
            store.close()


def kill_schedule(rng: random.Random) -> list[str]:
    """Twenty kill points: two of each critical point, the rest random SQL statements and HTTP requests."""
    points = [p for p in ORDER_POINTS for _ in range(2)]
    while len(points) < N_KILLS:
        kind = rng.choice(["sql", "sql", "http", "http_after", *ORDER_POINTS])
        points.append(
            kind if kind in ORDER_POINTS else f"{kind}:{rng.randint(3, 90) if kind == 'sql' else rng.randint(1, 8)}"
        )
    rng.shuffle(points)
    return points


def assert_consistent(session: Session) -> dict[str, Any]:
    """Exchange and state agree: orders once each, every fill booked, ledger == balances, fees equal."""
    fake, state = session.fake, session.state()
    exchange_orders = fake.orders
    by_client_id = Counter(o["clientOrderId"] for o in exchange_orders)
    assert all(n == 1 for n in by_client_id.values()), by_client_id
    rows = {o["client_order_id"]: o for o in state["orders"]}
    # Every order the exchange executed is recorded as filled; every filled row was executed exactly once.
    for o in exchange_orders:
        assert rows[o["clientOrderId"]]["status"] == "filled", rows[o["clientOrderId"]]
    filled = {cid for cid, o in rows.items() if o["status"] == "filled"}
    assert filled == set(by_client_id)
    assert [o for o in state["orders"] if o["status"] in ("intent", "sent", "unknown")] == []
    # At most one order per candle.
    per_candle = Counter(rows[o["clientOrderId"]]["decision_ts_ms"] for o in exchange_orders)
    assert all(n == 1 for n in per_candle.values()), per_candle
    # Every exchange trade is booked once, with its quantity.
    trades = fake.trades
    assert len(state["fills"]) == len(trades)
    for cid in by_client_id:
        order_id = next(o["orderId"] for o in exchange_orders if o["clientOrderId"] == cid)
        # A fee in BTC (a buy's default) is taken from the BTC received; the ledger books the net quantity.
        ex_qty = sum(
            float(t["qty"]) - (float(t["commission"]) if t["commissionAsset"] == "BTC" and t["isBuyer"] else 0.0)
            for t in trades
            if t["orderId"] == order_id
        )
        booked = sum(f["qty_base"] for f in state["fills"] if f["client_order_id"] == cid)
        assert booked == pytest.approx(ex_qty, rel=1e-9, abs=1e-12), cid
    ledger = state["ledger"]
    btc, usdt = sum(fake.balance("BTC")), sum(fake.balance("USDT"))
    assert ledger["qty_base"] == pytest.approx(btc, abs=1e-12)
    assert ledger["cash_quote"] == pytest.approx(usdt, abs=1e-8)
    assert ledger["position"] == (1 if btc * float(fake._price("BTCUSDT")) > 5.0 else 0)
    fees = sum(float(t["commission"]) * (float(t["price"]) if t["commissionAsset"] == "BTC" else 1.0) for t in trades)
    assert ledger["fees_quote"] == pytest.approx(fees, rel=1e-9, abs=1e-9)
    assert ledger["n_trades"] == len(trades)
    return state


@pytest.mark.slow
def test_sigkill_at_20_points_never_doubles_or_loses_an_order(tmp_path: Path, candles_2024: pd.DataFrame) -> None:
    rng = random.Random(SEED)
    checkpoint = trading_checkpoint(tmp_path / "trading.pt", candles_2024)
    schedule = kill_schedule(rng)
    with FakeBinance(candles=candles_2024, balances={"USDT": 5_000.0}) as fake:
        session = Session(fake, tmp_path, checkpoint)
        step, runs, kills = 0, 0, []
        pending = schedule.pop()
        session.at_step(step)
        while (pending or schedule) and runs < MAX_RUNS:
            runs += 1
            if session.run(pending) == -9:
                kills.append(pending)
                pending = schedule.pop() if schedule else ""
                if rng.random() < 0.5:
                    # Restart on the same candle: the candle's order (if any) must not be placed again.
                    runs += 1
                    assert session.run() == 0
                    assert_consistent(session)
                    step += 1
                else:
                    step += 1  # restart one candle later (with the next kill planted, if any)
            else:
                assert_consistent(session)
                step += 1
            session.at_step(step)
        # A few clean candles after the last kill: trading goes on normally on the recovered state (and the test
        # sees enough orders to mean something whatever the kill schedule abandoned).
        for extra in range(1, CLEAN_STEPS_AFTER + 1):
            session.at_step(step + extra)
            assert session.run() == 0
        state = assert_consistent(session)

    recorded = session.kill_log.read_text().split()
    assert recorded == kills, (recorded, kills)
    assert len(kills) == N_KILLS, f"only {len(kills)} kills fired in {runs} runs: {kills}"
    for point in ORDER_POINTS:
        assert kills.count(point) >= 2, (point, kills)
    n_orders = len(fake.orders)
    assert n_orders >= 10, f"too few orders to mean anything: {n_orders}"
    abandoned = [o for o in state["orders"] if o["status"] == "rejected"]
    # A kill between `intent` and `sent` leaves an intent that was never sent: abandoned on restart, not sent.
    assert all(o["client_order_id"] not in {x["clientOrderId"] for x in fake.orders} for o in abandoned)
    assert_secrets_absent(
        (TEST_API_KEY, TEST_API_SECRET), "\n".join(session.outputs), tmp_path, skip=lambda p: p.suffix == ".pt"
    )
    print(
        f"crash test: {runs} runs, {len(kills)} kills, {n_orders} exchange orders, {len(abandoned)} abandoned intents"
    )
