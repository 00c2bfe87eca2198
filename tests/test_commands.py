"""Operator commands (pause, resume, flatten, clear_halt) applied by a real daemon at its next tick.

Daemons here are the paper broker over the real Nov-Dec 2024 candles (the replay market, as in
tests/test_daemon.py) with a seeded random long_short policy, which trades often enough to exercise entries
and exits. Commands are queued the way `ritmo serve` queues them: `StateStore.add_command` on a connection
of its own.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import structlog
import torch

from bot.commands.run import Components, build_daemon
from bot.daemon.market import ReplayMarketData
from bot.daemon.state import open_state_for_update
from bot.daemon.tick import Daemon
from bot.files.checkpoints import load_checkpoint, save_checkpoint
from bot.settings import load_settings
from strategies.candles import CANDLE_MS, CandleBatch, parse_utc_date_ms
from tests.test_daemon import make_checkpoint, replay_daemon, settings_env

DEC1 = parse_utc_date_ms("2024-12-01")


@pytest.fixture(autouse=True)
def _torch_one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def candles(candles_2024: pd.DataFrame) -> pd.DataFrame:
    """Nov-Dec 2024 (warm-up before 2024-12-01 included)."""
    return candles_2024[candles_2024["ts_ms"] >= parse_utc_date_ms("2024-11-01")].reset_index(drop=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "cmd.pt", candles_2024)


@pytest.fixture
def comps(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> Iterator[Components]:
    c = replay_daemon(tmp_path, checkpoint, candles, online_learning="false")
    try:
        yield c
    finally:
        c.store.close()


def queue(comps: Components, kind: str, by: str = "api:test") -> int:
    """Queue a command through a second connection, as `ritmo serve` does (committed at once)."""
    other = open_state_for_update(comps.store.path)
    try:
        with other.transaction():
            return other.add_command(kind, by)
    finally:
        other.conn.close()


def command(comps: Components, command_id: int) -> dict[str, Any]:
    return next(c for c in comps.store.commands() if c["id"] == command_id)


def tick_until(daemon: Daemon, now_ms: int, predicate: Any, limit: int = 300) -> int:
    """Tick from now_ms until predicate(outcome) holds; the time of the next tick."""
    for _ in range(limit):
        out = daemon.tick(now_ms)
        now_ms += CANDLE_MS
        if out is not None and predicate(out):
            return now_ms
    raise AssertionError("condition never reached")


# ---------------------------------------------------------------------------------------------------
# pause / resume
# ---------------------------------------------------------------------------------------------------


def test_pause_blocks_entries_allows_exits_and_resume_lifts_it(comps: Components) -> None:
    daemon, store = comps.daemon, comps.store
    now = tick_until(daemon, DEC1, lambda o: o.position_after != 0)
    pause_id = queue(comps, "pause", "api:alice")
    with structlog.testing.capture_logs() as logs:
        outs = [daemon.tick(now + i * CANDLE_MS) for i in range(120)]
    now += 120 * CANDLE_MS
    # Applied at the first tick, audited with who and when.
    row = command(comps, pause_id)
    assert (row["status"], row["candle_ts_ms"], row["result"]) == (
        "applied",
        outs[0].ts_ms,
        {"changed": True, "paused": True},
    )
    assert store.get_meta("paused")["paused"] is True and store.get_meta("paused")["by"] == "api:alice"
    applied = [e for e in logs if e["event"] == "command_applied"]
    assert [(e["id"], e["kind"], e["requested_by"]) for e in applied] == [(pause_id, "pause", "api:alice")]
    assert [e["detail"]["id"] for e in store.events("command")] == [pause_id]
    # Never an entry or an increase: every tick either holds or goes flat.
    assert all(o.position_after in (0, o.position_before) for o in outs)
    assert any(o.position_before != 0 and o.position_after == 0 for o in outs), "the open position could exit"
    blocked = store.conn.execute(
        "SELECT ts_ms, action, position_before, target_position, position_after, status FROM decisions"
        " WHERE reason = 'paused' ORDER BY ts_ms"
    ).fetchall()
    assert blocked, "a random policy asks to enter within 120 candles"
    assert all(
        status == "acted" and after in (0, before) and target == after
        for _, _, before, target, after, status in blocked
    )
    # The episode keeps the policy's action at a blocked entry; the position chain follows the ledger.
    ts, action, before = blocked[0][0], blocked[0][1], blocked[0][2]
    step = store.conn.execute("SELECT action, position FROM episode_steps WHERE ts_ms = ?", (ts,)).fetchone()
    assert step == (action, before)
    nxt = store.conn.execute("SELECT position FROM episode_steps WHERE ts_ms = ?", (ts + CANDLE_MS,)).fetchone()
    assert (
        nxt is None
        or nxt[0] == store.conn.execute("SELECT position_after FROM decisions WHERE ts_ms = ?", (ts,)).fetchone()[0]
    )
    # A second pause is a no-op; resume lifts the pause and entries come back.
    again = queue(comps, "pause")
    daemon.tick(now)
    now += CANDLE_MS
    assert command(comps, again)["result"] == {"changed": False, "paused": True}
    resume_id = queue(comps, "resume", "cli:bob")
    outs = [daemon.tick(now + i * CANDLE_MS) for i in range(120)]
    assert command(comps, resume_id)["result"] == {"changed": True, "paused": False}
    assert store.get_meta("paused")["paused"] is False
    assert any(o.position_before == 0 and o.position_after != 0 for o in outs), "entries resume"
    assert (
        store.conn.execute(
            "SELECT COUNT(*) FROM decisions WHERE reason = 'paused' AND ts_ms >= ?", (outs[0].ts_ms,)
        ).fetchone()[0]
        == 0
    )


def test_resume_without_pause_is_a_recorded_noop(comps: Components) -> None:
    cid = queue(comps, "resume")
    comps.daemon.tick(DEC1)
    row = command(comps, cid)
    assert row["status"] == "applied" and row["result"] == {"changed": False, "paused": False}
    assert comps.store.get_meta("paused") is None


# ---------------------------------------------------------------------------------------------------
# flatten
# ---------------------------------------------------------------------------------------------------


def test_flatten_on_a_decision_tick_does_not_pause(comps: Components) -> None:
    daemon, store = comps.daemon, comps.store
    now = tick_until(daemon, DEC1, lambda o: o.position_after != 0)
    held = daemon.mem.ledger.position
    cid = queue(comps, "flatten", "api:alice")
    out = daemon.tick(now)
    now += CANDLE_MS
    assert out.position_before == held and out.position_after == 0
    row = command(comps, cid)
    assert row["status"] == "applied" and row["candle_ts_ms"] == out.ts_ms
    assert row["result"]["changed"] is True and row["result"]["position_before"] == held
    order = store.conn.execute(
        "SELECT client_order_id, reason, status FROM orders WHERE decision_ts_ms = ?", (out.ts_ms,)
    ).fetchone()
    assert order[0] == row["result"]["client_order_id"] and order[1:] == ("flatten", "filled")
    decision = store.conn.execute("SELECT status, reason FROM decisions WHERE ts_ms = ?", (out.ts_ms,)).fetchone()
    assert decision == ("acted", "flatten")
    assert daemon.mem.ledger.qty_base == 0
    # Flatten is one order, not a pause: the policy enters again afterwards.
    tick_until(daemon, now, lambda o: o.position_after != 0)


def test_flatten_when_flat_is_applied_without_an_order(comps: Components) -> None:
    daemon, store = comps.daemon, comps.store
    assert daemon.mem.ledger.position == 0  # a new state starts flat
    cid = queue(comps, "flatten")
    out = daemon.tick(DEC1)
    assert out.position_after == 0 and store.fills() == []
    row = command(comps, cid)
    assert row["status"] == "applied"
    assert row["result"]["changed"] is False and row["result"]["client_order_id"] is None


def test_flatten_on_a_kept_tick(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    """decide_every K = 3: a flatten between two decisions trades at once (reason flatten, status kept)."""
    bundle = load_checkpoint(checkpoint)
    k3 = save_checkpoint(tmp_path / "k3.pt", dataclasses.replace(bundle, decide_every=3))
    comps = replay_daemon(tmp_path / "state", k3, candles, online_learning="false")
    daemon, store = comps.daemon, comps.store
    try:
        now = tick_until(daemon, DEC1, lambda o: o.status == "kept" and o.position_after != 0, limit=600)
        cid = queue(comps, "flatten")
        out = daemon.tick(now)
        assert out.status == "kept" and out.position_before != 0 and out.position_after == 0
        row = command(comps, cid)
        assert row["status"] == "applied" and row["candle_ts_ms"] == out.ts_ms
        assert (
            store.conn.execute("SELECT reason FROM decisions WHERE ts_ms = ?", (out.ts_ms,)).fetchone()[0] == "flatten"
        )
        # A kept tick adds no episode step, even when it trades.
        assert store.conn.execute("SELECT COUNT(*) FROM episode_steps WHERE ts_ms = ?", (out.ts_ms,)).fetchone()[0] == 0
    finally:
        store.close()


def test_a_skipped_tick_leaves_flatten_pending(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    """Candle t missing after the retries: the tick is a skip, the flatten waits for the next tick that trades."""
    hole = DEC1 + 40 * CANDLE_MS
    settings = load_settings(settings_env(tmp_path, checkpoint, online_learning="false"), env_file=None)
    market = ReplayMarketData(CandleBatch.from_frame(candles[candles["ts_ms"] != hole]), settings.symbol)
    comps = build_daemon(settings, market, sleep=lambda s: None, rules=None)
    daemon = comps.daemon
    try:
        for i in range(40):
            daemon.tick(DEC1 + i * CANDLE_MS)
        if daemon.mem.ledger.position == 0:
            pytest.skip("the seeded policy is flat before the hole")  # keeps the test honest if the seed changes
        cid = queue(comps, "flatten")
        skipped = daemon.tick(hole + CANDLE_MS)
        assert skipped.status == "skipped" and skipped.reason == "stale_data"
        assert command(comps, cid)["status"] == "pending"
        assert daemon.mem.ledger.position != 0
        out = daemon.tick(hole + 2 * CANDLE_MS)
        assert out.status == "acted" and out.position_after == 0
        assert command(comps, cid)["status"] == "applied"
    finally:
        comps.store.close()


def test_pause_plus_flatten_stays_flat(comps: Components) -> None:
    daemon = comps.daemon
    now = tick_until(daemon, DEC1, lambda o: o.position_after != 0)
    queue(comps, "pause")
    queue(comps, "flatten")
    outs = [daemon.tick(now + i * CANDLE_MS) for i in range(60)]
    assert outs[0].position_after == 0
    assert all(o.position_after == 0 for o in outs)
    assert [c["status"] for c in comps.store.commands()] == ["applied", "applied"]


# ---------------------------------------------------------------------------------------------------
# clear_halt
# ---------------------------------------------------------------------------------------------------


def test_clear_halt_does_what_ritmo_resume_does(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    comps = replay_daemon(tmp_path, checkpoint, candles, max_drawdown=0.004, online_learning="false")
    daemon, store = comps.daemon, comps.store
    try:
        noop = queue(comps, "clear_halt")
        now = tick_until(daemon, DEC1, lambda o: o.status == "halted")
        assert command(comps, noop)["result"] == {"changed": False, "halted": False}
        # Paused while halted: clearing the halt does not lift the pause.
        queue(comps, "pause")
        daemon.tick(now)
        now += CANDLE_MS
        last = store.get_meta("last_candle")
        equity = daemon.mem.ledger.equity(last["close"])
        cid = queue(comps, "clear_halt", "api:alice")
        out = daemon.tick(now)
        assert out.status == "acted"  # the halt is cleared before this tick reads it
        assert store.get_meta("halt")["halted"] is False
        row = command(comps, cid)
        assert row["status"] == "applied" and row["result"]["changed"] is True
        assert row["result"]["peak_equity"] == pytest.approx(equity)
        resume = store.events("resume")
        assert len(resume) == 1 and resume[0]["detail"]["by"] == "api:alice"
        assert resume[0]["detail"]["peak_equity_reset_to"] == pytest.approx(equity)
        assert store.get_meta("paused")["paused"] is True
        outs = [daemon.tick(now + i * CANDLE_MS) for i in range(1, 30)]
        assert all(o.position_after == 0 for o in outs)  # flat after the halt, and paused: no entry
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------------
# Concurrency and crash safety
# ---------------------------------------------------------------------------------------------------


def test_command_inserted_while_the_daemon_runs_is_applied_at_the_next_tick(comps: Components) -> None:
    daemon = comps.daemon
    stop = threading.Event()
    inserted: dict[str, int] = {}
    done_ticks: list[int] = []

    def ticker() -> None:
        now = DEC1
        while not stop.is_set() and len(done_ticks) < 400:
            out = daemon.tick(now)
            done_ticks.append(out.ts_ms)
            now += CANDLE_MS

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        while len(done_ticks) < 5:
            threading.Event().wait(0.01)
        inserted["id"] = queue(comps, "pause", "api:concurrent")
        ticks_at_insert = len(done_ticks)
        while len(done_ticks) < ticks_at_insert + 3:
            threading.Event().wait(0.01)
    finally:
        stop.set()
        thread.join()
    row = command(comps, inserted["id"])
    assert row["status"] == "applied"
    # Applied by the first tick that began after the insert committed (at most the one in flight plus one).
    assert row["candle_ts_ms"] in done_ticks[ticks_at_insert - 1 : ticks_at_insert + 2]


def test_a_tick_that_raises_leaves_the_command_pending(comps: Components, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, store = comps.daemon, comps.store
    daemon.tick(DEC1)
    cid = queue(comps, "pause")

    def boom(w: Any) -> Any:
        raise RuntimeError("crash after the commands were applied in the transaction")

    monkeypatch.setattr(daemon, "_record", boom)
    with pytest.raises(RuntimeError):
        daemon.tick(DEC1 + CANDLE_MS)
    assert command(comps, cid)["status"] == "pending"
    assert store.get_meta("paused") is None and not store.events("command")
    monkeypatch.undo()
    out = daemon.tick(DEC1 + CANDLE_MS)
    assert out is not None
    row = command(comps, cid)
    assert row["status"] == "applied" and row["candle_ts_ms"] == out.ts_ms
    assert store.get_meta("paused")["paused"] is True
