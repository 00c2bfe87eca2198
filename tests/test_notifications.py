"""Notifications: events -> outbox rows in the tick's transaction -> the outbox sender -> Apprise -> a local
HTTP receiver (127.0.0.1 only; Apprise's `json://` plugin POSTs {"title", "message", "type"})."""

from __future__ import annotations

import dataclasses
import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from bot.commands.run import Components, build_daemon
from bot.daemon.alerts import message_for
from bot.daemon.outbox import OutboxSender, notify_auth_failure
from bot.daemon.tick import DaemonConfig
from bot.logs import configure_logging
from bot.settings import load_settings, state_db_path
from strategies.candles import CANDLE_MS, parse_utc_date_ms
from tests.conftest import process_isolation
from tests.fake_exchange import FakeExchange
from tests.test_daemon import FakeClock, make_checkpoint, replay_daemon, settings_env

DEC1 = parse_utc_date_ms("2024-12-01")
PASSWORD = "S3cretPassw0rd"
TOKEN = "t0kenXYZ987abc"


class Receiver:
    """A local webhook: answers each POST with the next planned behaviour (an HTTP code, or 'hang')."""

    def __init__(self) -> None:
        self.plan: list[int | str] = []
        self.received: list[dict[str, Any]] = []
        self.in_flight = threading.Event()
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                action = receiver.plan.pop(0) if receiver.plan else 200
                if action == "hang":
                    receiver.in_flight.set()
                    receiver.release.wait(10)
                    receiver.in_flight.clear()
                    return
                if action == 200:
                    receiver.received.append(json.loads(body))
                self.send_response(int(action))
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "hook") -> str:
        return f"json://127.0.0.1:{self.port}/{path}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(localhost_only: None) -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Logging, torch threads and RITMO_* restored afterwards (tests/conftest.py)."""
    with process_isolation(monkeypatch, tmp_path):
        torch.set_num_threads(1)
        yield


@pytest.fixture(scope="module")
def candles(candles_2024: pd.DataFrame) -> pd.DataFrame:
    return candles_2024[candles_2024["ts_ms"] >= parse_utc_date_ms("2024-11-01")].reset_index(drop=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "notify.pt", candles_2024)


def paper_daemon(state_dir: Path, checkpoint: Path, candles: pd.DataFrame, url: str) -> tuple[Components, FakeClock]:
    """A paper daemon on a fake exchange's clock with RITMO_NOTIFY_URLS set: notifications on, as in production."""
    from bot.daemon.market import ExchangeMarketData
    from bot.exchange.client import ExchangeClient

    fake = FakeExchange(candles, now_ms=DEC1 + 5_000)
    clock = FakeClock(fake)
    env = settings_env(state_dir, checkpoint, mode="paper", notify_urls=url, online_learning="false")
    settings = load_settings(env, env_file=None)
    market = ExchangeMarketData(ExchangeClient(fake, sleep=clock.sleep), "BTC/USDT")
    return build_daemon(settings, market, sleep=clock.sleep, rules=None), clock


def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------
# The tick writes, the sender delivers.
# ---------------------------------------------------------------------------------------------------


def test_trade_is_enqueued_in_the_tick_and_delivered(
    tmp_path: Path, candles: pd.DataFrame, checkpoint: Path, receiver: Receiver
) -> None:
    comps, clock = paper_daemon(tmp_path, checkpoint, candles, receiver.url())
    store = comps.store
    try:
        assert comps.daemon.config.notify
        assert [r["kind"] for r in store.outbox()] == ["start"]  # the start event, in start()'s transaction
        while not store.fills():
            comps.daemon.tick(clock.now_ms())
            clock.fake.advance(CANDLE_MS)
        fill = store.fills()[0]
        trades = [r for r in store.outbox() if r["kind"] == "trade"]
        assert len(trades) == 1 and trades[0]["status"] == "pending"
        sender = OutboxSender(store.path, [receiver.url()], poll_s=0.05).start()
        try:
            wait_for(lambda: len(receiver.received) == 2)
        finally:
            sender.stop(2.0)
        start, trade = receiver.received
        assert start["title"] == "ritmo paper BTC/USDT: started"
        assert trade["title"].startswith(f"ritmo paper BTC/USDT: {fill['side']} ")
        assert trade["type"] == "info"
        assert f"position: flat -> {'long' if fill['position_after'] == 1 else 'short'}" in trade["message"]
        assert f"{fill['qty_base']:.6g}" in trade["message"]
        rows = store.outbox()
        assert all(r["status"] == "sent" and r["attempts"] == 1 and r["sent_at_ms"] for r in rows)
    finally:
        store.close()


def test_an_event_rolled_back_with_its_tick_is_never_sent(
    tmp_path: Path, candles: pd.DataFrame, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    comps, clock = paper_daemon(tmp_path, checkpoint, candles, "json://127.0.0.1:9/x")
    store = comps.store
    try:
        before = len(store.outbox())

        def boom(w: Any) -> Any:
            comps.daemon._event("halt", {"reason": "test"}, w.t)
            raise RuntimeError("crash inside the transaction")

        monkeypatch.setattr(comps.daemon, "_record", boom)
        with pytest.raises(RuntimeError):
            comps.daemon.tick(clock.now_ms())
        assert len(store.outbox()) == before and not store.events("halt")
    finally:
        store.close()


def test_failed_send_is_retried_with_backoff_then_sent(tmp_path: Path, receiver: Receiver) -> None:
    store = _bare_state(tmp_path)
    with store.transaction():
        store.enqueue_notification("halt", "ritmo paper BTC/USDT: HALTED", "drawdown", "failure")
    receiver.plan = [500, 500, 200]
    now = [_created(store)]
    sender = OutboxSender(store.path, [receiver.url()], clock=lambda: now[0], backoff_s=10)
    try:
        assert sender.send_due() == 0
        row = store.outbox()[0]
        assert (row["status"], row["attempts"]) == ("pending", 1)
        assert row["last_error"] == "apprise: failure"
        assert row["next_attempt_ms"] - now[0] == 10_000  # first backoff: 10 s
        assert sender.send_due() == 0 and store.outbox()[0]["attempts"] == 1  # not due yet
        now[0] += 10_000
        assert sender.send_due() == 0
        row = store.outbox()[0]
        assert row["attempts"] == 2 and row["next_attempt_ms"] - now[0] == 20_000  # doubled
        now[0] += 20_000
        assert sender.send_due() == 1
        row = store.outbox()[0]
        assert (row["status"], row["attempts"]) == ("sent", 3)
        assert receiver.received == [{**receiver.received[0], "title": "ritmo paper BTC/USDT: HALTED"}]
        assert receiver.received[0]["type"] == "failure"
    finally:
        sender.stop(0)
        store.close()


def test_give_up_after_max_attempts(tmp_path: Path, receiver: Receiver) -> None:
    store = _bare_state(tmp_path)
    with store.transaction():
        store.enqueue_notification("stop", "t", "b", "info")
    receiver.plan = [503, 503]
    now = [_created(store)]
    sender = OutboxSender(store.path, [receiver.url()], clock=lambda: now[0], backoff_s=1, max_attempts=2)
    try:
        sender.send_due()
        now[0] += 1_000
        sender.send_due()
        row = store.outbox()[0]
        assert (row["status"], row["attempts"]) == ("failed", 2)
        now[0] += 10_000_000
        assert sender.send_due() == 0 and receiver.plan == []  # a failed row is never sent again
    finally:
        sender.stop(0)
        store.close()


def test_hanging_service_times_out_and_never_delays_ticks(
    tmp_path: Path, candles: pd.DataFrame, checkpoint: Path, receiver: Receiver
) -> None:
    comps, clock = paper_daemon(tmp_path, checkpoint, candles, receiver.url())
    store = comps.store
    receiver.plan = ["hang"]
    sender = OutboxSender(store.path, [receiver.url()], poll_s=0.05, send_timeout_s=1.5).start()
    try:
        assert receiver.in_flight.wait(5), "the sender is stuck on the start notification"
        durations = []
        while receiver.in_flight.is_set() and len(durations) < 30:
            t0 = time.perf_counter()
            comps.daemon.tick(clock.now_ms())
            durations.append(time.perf_counter() - t0)
            clock.fake.advance(CANDLE_MS)
        assert durations and max(durations) < 1.0, durations
        wait_for(lambda: store.outbox()[0]["last_error"] is not None)
        first = store.outbox()[0]
        assert first["kind"] == "start" and first["status"] == "pending" and first["attempts"] == 1
        assert first["last_error"] == "apprise: timeout"
    finally:
        receiver.release.set()
        t0 = time.monotonic()
        sender.stop(flush_timeout_s=1.0)
        assert time.monotonic() - t0 < 3.0  # the flush never runs past its deadline (plus Apprise's grace)
        store.close()


def test_pending_rows_survive_a_restart_of_the_sender(tmp_path: Path, receiver: Receiver) -> None:
    store = _bare_state(tmp_path)
    with store.transaction():
        for i in range(3):
            store.enqueue_notification("trade", f"t{i}", f"b{i}", "info")
    first = OutboxSender(store.path, [receiver.url()])
    first.stop(flush_timeout_s=0)  # stopped before sending anything
    assert [r["status"] for r in store.outbox()] == ["pending"] * 3
    second = OutboxSender(store.path, [receiver.url()], poll_s=0.05).start()
    try:
        wait_for(lambda: len(receiver.received) == 3)
    finally:
        second.stop(1.0)
    assert [m["title"] for m in receiver.received] == ["t0", "t1", "t2"]
    assert [r["status"] for r in store.outbox()] == ["sent"] * 3
    store.close()


# ---------------------------------------------------------------------------------------------------
# Which events notify.
# ---------------------------------------------------------------------------------------------------


def test_daily_summary_once_per_day_even_across_restarts(
    tmp_path: Path, candles: pd.DataFrame, checkpoint: Path
) -> None:
    start = DEC1 + 22 * 3600_000  # 2024-12-01 22:00: two hours before midnight
    comps = replay_daemon(tmp_path, checkpoint, candles, online_learning="false")
    try:
        for i in range(30):  # to 00:25 on the 2nd
            comps.daemon.tick(start + i * CANDLE_MS)
        events = comps.store.events("daily_summary")
        assert len(events) == 1
        d = events[0]["detail"]
        assert d["day"] == "2024-12-01"
        assert events[0]["candle_ts_ms"] == DEC1 + 86_400_000  # the first candle of the 2nd
        day_end = DEC1 + 86_400_000
        fills = [f for f in comps.store.fills() if f["decision_ts_ms"] < day_end]
        assert d["trades"] == len(fills) and d["fees_quote"] == pytest.approx(sum(f["fee_quote"] for f in fills))
        last = comps.store.conn.execute(
            "SELECT equity_after, position_after FROM decisions WHERE ts_ms < ? ORDER BY ts_ms DESC LIMIT 1",
            (day_end,),
        ).fetchone()
        assert (d["equity"], d["position"]) == (pytest.approx(last[0]), last[1])
        assert d["pnl_quote"] == pytest.approx(d["equity"] - d["equity_start"])
        assert d["pnl_pct"] == pytest.approx(100 * d["pnl_quote"] / d["equity_start"])
    finally:
        comps.store.close()
    comps = replay_daemon(tmp_path, checkpoint, candles, online_learning="false")
    try:
        for i in range(30, 40):
            comps.daemon.tick(start + i * CANDLE_MS)
        assert len(comps.store.events("daily_summary")) == 1
    finally:
        comps.store.close()


def test_breaker_transitions_are_events_and_notifications(
    tmp_path: Path, candles: pd.DataFrame, checkpoint: Path
) -> None:
    comps = replay_daemon(tmp_path, checkpoint, candles, online_learning="false")
    daemon, store = comps.daemon, comps.store
    daemon.config = dataclasses.replace(daemon.config, notify=True)
    states = iter(["closed", "open", "half_open", "open", "half_open", "closed", "closed"])

    def status() -> dict[str, Any]:
        state = next(states)
        return {"kind": "live", "breaker": {"state": state, "is_open": state == "open", "failures": 5, "trips": 2}}

    daemon.broker.status = status  # type: ignore[method-assign]
    try:
        for i in range(7):
            daemon.tick(DEC1 + i * CANDLE_MS)
        kinds = [e["kind"] for e in store.events() if e["kind"].startswith("breaker")]
        assert kinds == ["breaker_open", "breaker_closed"]  # one alarm per outage, not per half-open trial
        rows = [(r["kind"], r["level"]) for r in store.outbox() if r["kind"].startswith("breaker")]
        assert rows == [("breaker_open", "warning"), ("breaker_closed", "success")]
        assert store.get_meta("broker")["breaker"]["state"] == "closed"
    finally:
        store.close()


def test_notifications_are_off_in_replay(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    comps = replay_daemon(tmp_path, checkpoint, candles, online_learning="false", notify_urls="json://127.0.0.1:9/x")
    try:
        assert comps.daemon.config.notify is False
        for i in range(20):
            comps.daemon.tick(DEC1 + i * CANDLE_MS)
        assert comps.store.fills() and comps.store.outbox() == []
        assert comps.store.events("start")  # the events are still recorded
    finally:
        comps.store.close()
    paper = load_settings(settings_env(tmp_path, checkpoint, mode="paper", notify_urls="json://h/x"), env_file=None)
    assert DaemonConfig.from_settings(paper, "long_short").notify is True
    quiet = load_settings(settings_env(tmp_path, checkpoint, mode="paper"), env_file=None)
    assert DaemonConfig.from_settings(quiet, "long_short").notify is False


def test_stop_and_commands_notify(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    comps = replay_daemon(tmp_path, checkpoint, candles, online_learning="false")
    daemon, store = comps.daemon, comps.store
    daemon.config = dataclasses.replace(daemon.config, notify=True)
    try:
        with store.transaction():
            store.add_command("pause", "api:alice")
        daemon.tick(DEC1)
        daemon.record_stop("signal SIGTERM", 0)
        rows = {r["kind"]: r for r in store.outbox()}
        assert rows["command"]["title"] == "ritmo replay BTC/USDT: pause applied"
        assert "by api:alice" in rows["command"]["body"]
        assert rows["stop"]["title"] == "ritmo replay BTC/USDT: stopped" and rows["stop"]["level"] == "info"
        assert store.events("stop")[0]["detail"]["exit_code"] == 0
    finally:
        store.close()


def test_message_levels() -> None:
    ctx = {"mode": "live", "symbol": "BTC/USDT"}
    assert message_for("halt", {"reason": "drawdown 51%"}, ctx)[2] == "failure"
    assert message_for("stop", {"reason": "tick failures", "exit_code": 1}, ctx)[2] == "warning"
    assert message_for("update_rolled_back", {"k": 3}, ctx)[0] == "ritmo live BTC/USDT: online update rolled back"
    assert message_for("state_created", {}, ctx) is None and message_for("mark", {}, ctx) is None


# ---------------------------------------------------------------------------------------------------
# Secrets and the authentication failure path.
# ---------------------------------------------------------------------------------------------------


def test_secrets_in_notification_urls_never_reach_the_logs(tmp_path: Path, receiver: Receiver) -> None:
    url = f"json://user:{PASSWORD}@127.0.0.1:{receiver.port}/hook?token={TOKEN}"
    settings = load_settings({"RITMO_NOTIFY_URLS": url, "RITMO_STATE_DIR": str(tmp_path)}, env_file=None)
    out = io.StringIO()
    configure_logging("json", "DEBUG", stream=out, secrets=settings.secret_values())
    store = _bare_state(tmp_path)
    with store.transaction():
        store.enqueue_notification("halt", "t", "b", "failure")
    receiver.plan = [500, "hang"]
    now = [_created(store)]
    sender = OutboxSender(store.path, settings.notify_urls, clock=lambda: now[0], send_timeout_s=1.0)
    try:
        sender.send_due()  # 500: Apprise warns
        now[0] += 60_000
        sender.send_due()  # hang: Apprise's timeout error
        receiver.release.set()
    finally:
        sender.stop(0)
        store.close()
    text = out.getvalue()
    assert "notification_retry" in text and '"logger": "apprise"' in text
    assert "Failed to send JSON" in text  # what Apprise says about the 500 came through our handler
    for secret in (PASSWORD, TOKEN, url):
        assert secret not in text


def test_auth_failure_is_recorded_and_sent(
    tmp_path: Path, candles: pd.DataFrame, checkpoint: Path, receiver: Receiver
) -> None:
    env = settings_env(tmp_path, checkpoint, mode="paper", notify_urls=receiver.url())
    settings = load_settings(env, env_file=None)
    # No state yet: sent directly.
    assert notify_auth_failure(settings, "binance: invalid API key") is True
    assert receiver.received[-1]["title"] == "ritmo paper BTC/USDT: authentication FAILED"
    # With a state: an event and an outbox row, sent within the deadline.
    comps, _ = paper_daemon(tmp_path, checkpoint, candles, receiver.url())
    comps.store.close()
    assert notify_auth_failure(settings, "binance: invalid API key") is True
    from bot.daemon.state import open_state_readonly

    store = open_state_readonly(state_db_path(settings))
    try:
        assert store.events("auth_failure")[0]["detail"]["exit_code"] == 77
        assert {r["kind"]: r["status"] for r in store.outbox()}["auth_failure"] == "sent"
    finally:
        store.conn.close()


# ---------------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------------


def _bare_state(tmp_path: Path) -> Any:
    from bot.daemon.state import open_state

    return open_state(tmp_path / "paper-BTC-USDT.sqlite", mode="paper", symbol="BTC/USDT", lock=False)


def _created(store: Any) -> int:
    rows = store.outbox()
    return int(rows[0]["created_at_ms"]) if rows else 0
