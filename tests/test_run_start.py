"""A bad start is ridden out (docs/design.md §8): `ritmo run` waits for an unreachable exchange, tells systemd,
feeds the watchdog, stops cleanly on a signal, and exits only on configuration (78) or authentication (77).

The process tests run the real `ritmo run --once` (paper or live) with the real ccxt client against the fake
Binance REST server (tests/fake_binance.py) on 127.0.0.1: first on a port where nothing listens yet.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bot.daemon.service import StartInterrupted, StartWaiter, StopSignal
from bot.errors import AuthenticationExchangeError, ConfigError, TemporaryExchangeError
from bot.settings import LIVE_CONFIRM_PHRASE
from tests.fake_binance import TEST_API_KEY, TEST_API_SECRET, FakeBinance
from tests.test_daemon import make_checkpoint
from tests.test_runner import NotifyReceiver

REPO = Path(__file__).resolve().parent.parent

# `ritmo` with short waits: the start backoff (5 s doubling to 5 min) and the client's read retries
# (1 s doubling, 5 attempts) shortened so that a test waits seconds; everything else is the real process.
FAST_START = """
import sys
from bot.daemon import service
from bot.exchange import client
service.START_RETRY_FIRST_S = 0.3
service.START_RETRY_MAX_S = 1.0
client.ExchangeClient._read.__kwdefaults__["base_delay_s"] = 0.01
from bot.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def _localhost_only(localhost_only: None) -> None:
    """Only 127.0.0.1 (tests/conftest.py)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin_mid_candle(fake: FakeBinance) -> None:
    """The server's clock 60 s after a 5-minute close, so the newest closed candle does not move under the test."""
    now_ms = time.time_ns() // 1_000_000
    fake.server_offset_ms = (now_ms // 300_000) * 300_000 + 60_000 - now_ms


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "start.pt", candles_2024)


def env_for(fake: FakeBinance, state_dir: Path, checkpoint: Path, *, timeout_ms: int = 1_000, **extra: str) -> dict:
    """The environment of a paper `ritmo run` pointed at `fake` (up or not)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RITMO_", "NOTIFY_", "WATCHDOG_"))}
    env.update(
        PYTHONPATH=str(REPO),
        RITMO_EXCHANGE_CONFIG=json.dumps(fake.ccxt_config(timeout_ms=timeout_ms)),
        RITMO_CHECKPOINT=str(checkpoint),
        RITMO_STATE_DIR=str(state_dir),
        RITMO_SEED="1",
        RITMO_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


class Daemon:
    """A `ritmo run` process whose JSON log lines are collected as they come (a reader thread per stream)."""

    def __init__(self, env: dict[str, str], cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FAST_START, "run", "--env-file", str(cwd / "absent.env"), *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, is_stdout: bool) -> None:
        for line in stream:
            if not is_stdout:
                self._stderr.append(line)
            elif line.startswith("{"):
                self.events.append(json.loads(line))

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait_for(self, event: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until `event` is logged (fails if the process ends first or the time runs out)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.named(event)
            if found:
                return found[-1]
            if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                break
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"no {event!r}; events {[e.get('event') for e in self.events]}; stderr {self.stderr}")

    def finish(self, timeout_s: float = 120.0) -> int:
        """Wait for the exit and the last of its output."""
        try:
            self.proc.wait(timeout=timeout_s)
        finally:
            self.proc.kill()
        for reader in self._readers:
            reader.join(timeout=10)
        return int(self.proc.returncode)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == event]


# ---------------------------------------------------------------------------------------------------
# The process: down, then up; a stop while waiting; Ctrl-C before it is up; authentication.
# ---------------------------------------------------------------------------------------------------


def test_exchange_down_at_start_then_up_warms_up_and_ticks(
    tmp_path: Path, checkpoint: Path, candles_2024: pd.DataFrame, notify_socket: NotifyReceiver
) -> None:
    fake = FakeBinance(port=free_port(), candles=candles_2024)
    pin_mid_candle(fake)
    env = env_for(fake, tmp_path / "state", checkpoint, NOTIFY_SOCKET=os.environ["NOTIFY_SOCKET"])
    daemon = Daemon(env, tmp_path, "--once")
    try:
        first = daemon.wait_for("start_waiting")
        assert first["level"] == "warning" and first["phase"] == "connect" and first["attempt"] == 1
        assert first["retry_in_s"] == pytest.approx(0.3) and "NetworkError" in first["error"]
        fake.start()  # the network is back
        assert daemon.finish() == 0, daemon.stderr
    finally:
        fake.stop()
    waits = daemon.named("start_waiting")
    assert [w["attempt"] for w in waits] == list(range(1, len(waits) + 1))
    assert [w["retry_in_s"] for w in waits] == [min(1.0, 0.3 * 2**i) for i in range(len(waits))]
    (warm,) = daemon.named("warmed_up")
    assert warm["candles"] >= 1265 and warm["start_attempts"] == len(waits) + 3  # + connect, start, warm-up
    (tick,) = daemon.named("tick")
    assert tick["status"] in ("acted", "kept")
    assert daemon.stderr == ""
    messages = notify_socket.messages()
    # READY when the wait began (the unit is up, patiently), a STATUS per failed attempt, watchdog fed.
    assert messages[0] == "READY=1"
    statuses = [m for m in messages if m.startswith("STATUS=waiting for the exchange (connect)")]
    assert len(statuses) == len(waits)
    assert messages.count("WATCHDOG=1") >= len(waits) + 1
    assert any(m.startswith("STATUS=warmed up after waiting") for m in messages)
    assert messages[-1] == "STOPPING=1"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_waiting_exits_0_promptly(tmp_path: Path, checkpoint: Path, sig: int) -> None:
    fake = FakeBinance(port=free_port())  # never started
    daemon = Daemon(env_for(fake, tmp_path / "state", checkpoint), tmp_path)
    daemon.wait_for("start_waiting")
    sent = time.monotonic()
    daemon.proc.send_signal(sig)
    assert daemon.finish(timeout_s=30) == 0, daemon.stderr
    assert time.monotonic() - sent < 5
    (stopped,) = daemon.named("stopped")
    assert stopped["signal"] == sig and stopped["phase"] == "start" and stopped["waiting"] is True
    assert "Traceback" not in daemon.stderr and daemon.stderr == ""
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_a_stop_while_waiting_in_warm_up_removes_the_new_state(
    tmp_path: Path, checkpoint: Path, candles_2024: pd.DataFrame
) -> None:
    """The state was created (model loaded, state locked) when the warm-up fetch failed: it is removed again."""
    with FakeBinance(candles=candles_2024) as fake:
        pin_mid_candle(fake)
        fake.fail_next("/api/v3/klines", "500", times=100_000)
        state = tmp_path / "state"
        daemon = Daemon(env_for(fake, state, checkpoint), tmp_path, "--once")
        waiting = daemon.wait_for("start_waiting")
        assert waiting["phase"] == "warm_up" and "warm-up holds 0 of 1265 candles" in waiting["error"]
        assert (state / "paper-BTC-USDT.sqlite").exists()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.finish(timeout_s=60) == 0, daemon.stderr
    assert daemon.named("state_removed")
    assert sorted(p.name for p in state.iterdir()) == []


def test_ctrl_c_before_the_daemon_is_up_exits_130_with_one_line(
    tmp_path: Path, checkpoint: Path, candles_2024: pd.DataFrame
) -> None:
    """Ctrl-C while the first request hangs (nothing announced yet): "ritmo run: interrupted", 130, no traceback."""
    with FakeBinance(candles=candles_2024, hang_s=30) as fake:
        fake.fail_next("/api/v3/exchangeInfo", "timeout")
        daemon = Daemon(env_for(fake, tmp_path / "state", checkpoint, timeout_ms=60_000), tmp_path, "--once")
        daemon.wait_for("starting")
        deadline = time.monotonic() + 60
        while not fake.requests_to("/api/v3/exchangeInfo"):
            assert time.monotonic() < deadline and daemon.proc.poll() is None
            time.sleep(0.05)
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.finish(timeout_s=20) == 130
    assert daemon.stderr == "ritmo run: interrupted\n"
    assert not daemon.named("start_waiting")


@pytest.fixture(scope="module")
def long_only_checkpoint(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "long-only.pt", candles_2024, mode="long_only")


def test_authentication_failure_at_start_exits_77_without_waiting(
    tmp_path: Path, long_only_checkpoint: Path, candles_2024: pd.DataFrame
) -> None:
    with FakeBinance(candles=candles_2024) as fake:
        pin_mid_candle(fake)
        fake.key_enabled = False  # a revoked key: every signed call answers -2015
        env = env_for(
            fake,
            tmp_path / "state",
            long_only_checkpoint,
            RITMO_MODE="live",
            RITMO_LIVE_CONFIRM=LIVE_CONFIRM_PHRASE,
            RITMO_API_KEY=TEST_API_KEY,
            RITMO_API_SECRET=TEST_API_SECRET,
            RITMO_MAX_POSITION_QUOTE="100",
        )
        daemon = Daemon(env, tmp_path, "--once")
        assert daemon.finish() == 77
    assert not daemon.named("start_waiting")
    (line,) = daemon.stderr.splitlines()
    assert line.startswith("ritmo run: error: ") and TEST_API_KEY not in line
    # The state this failed start created is gone.
    assert not list((tmp_path / "state").glob("*.sqlite*"))


def test_an_unlisted_symbol_is_a_configuration_error(tmp_path: Path, checkpoint: Path) -> None:
    with FakeBinance() as fake:
        daemon = Daemon(env_for(fake, tmp_path / "state", checkpoint, RITMO_SYMBOL="BTC/USDX"), tmp_path, "--once")
        assert daemon.finish() == 78
    assert not daemon.named("start_waiting")
    assert daemon.stderr.startswith("ritmo run: error: RITMO_SYMBOL='BTC/USDX' is invalid: ")
    assert len(daemon.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# StartWaiter in-process: the backoff, the watchdog slices, what is and is not retried.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyReceiver]:
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:
        pytest.skip("tmp_path too long for an AF_UNIX address")
    receiver = NotifyReceiver(path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield receiver
    receiver.close()


class FlakyStep:
    """Fails `failures` times with TemporaryExchangeError, then returns "done"."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise TemporaryExchangeError(f"network down ({self.calls})")
        return "done"


def test_backoff_doubles_from_5_s_to_a_cap_of_5_minutes() -> None:
    waiter = StartWaiter()
    assert [waiter.delay_s(n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert waiter.delay_s(10_000) == 300


def test_waiter_sleeps_in_watchdog_slices_and_notifies(notify_socket: NotifyReceiver) -> None:
    slept: list[float] = []
    clock = {"t": 0.0}

    def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock["t"] += seconds
        time.sleep(0.01)  # let the receiver drain its queue (a full one drops datagrams, as systemd's would)

    waiter = StartWaiter(
        first_s=5, max_s=300, sleep=fake_sleep, monotonic=lambda: clock["t"], env={"WATCHDOG_USEC": "4000000"}
    )
    step = FlakyStep(3)
    assert waiter.call(step, "connect") == "done"
    assert step.calls == 4 and waiter.attempts == 4 and waiter.waited
    # 5 + 10 + 20 s of waiting, never more than half the 4 s watchdog interval at a time.
    assert sum(slept) == pytest.approx(35) and max(slept) <= 2.0
    messages = notify_socket.messages()
    assert messages.count("READY=1") == 1 and messages[0] == "READY=1"
    statuses = [m for m in messages if m.startswith("STATUS=")]
    assert len(statuses) == 3 and "attempt 3 failed, next in 20 s: network down (3)" in statuses[-1]
    assert messages.count("WATCHDOG=1") == len(slept) + 3


@pytest.mark.parametrize("error", [ConfigError("bad"), AuthenticationExchangeError("key"), ValueError("bug")])
def test_waiter_does_not_retry_other_errors(error: Exception, notify_socket: NotifyReceiver) -> None:
    waiter = StartWaiter(sleep=lambda s: pytest.fail("must not wait"))
    calls = []

    def step() -> None:
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        waiter.call(step, "connect")
    assert calls == [1] and not waiter.waited and notify_socket.messages() == []


def test_a_signal_during_start_up_raises_in_the_main_thread() -> None:
    stop = StopSignal().install(interrupt_start=True)
    try:
        with pytest.raises(StartInterrupted) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted at once
        assert exc.value.signum == signal.SIGTERM and not exc.value.waiting
        # Once started, a signal only sets the flag: the tick in flight finishes.
        stop2 = StopSignal().install(interrupt_start=True)
        stop2.started()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop2.is_set()
        stop2.restore()
    finally:
        stop.restore()


@pytest.mark.parametrize("record", ["nothing", "order_intent", "command"])
def test_a_new_state_is_removed_only_when_it_records_nothing(tmp_path: Path, record: str) -> None:
    """A first tick that committed an order intent and then failed must keep its state: the order may be live."""
    from bot.brokers.base import OrderIntent
    from bot.commands.run import removing_unused_new_state
    from bot.daemon.state import open_state

    db = tmp_path / "state" / "live-BTC-USDT.sqlite"
    with pytest.raises(RuntimeError, match="first tick failed"), removing_unused_new_state(db):
        store = open_state(db, mode="live", symbol="BTC/USDT")
        with store.transaction():
            if record == "order_intent":
                store.record_intent(
                    OrderIntent("rt-BTCUSDT-1-B0", "BTC/USDT", 1_700_000_000_000, "buy", 0.001, 40_000.0, 1, "policy")
                )
            elif record == "command":
                store.add_command("pause", "api:127.0.0.1")
        store.close()
        raise RuntimeError("first tick failed")
    assert db.exists() is (record != "nothing")
    assert Path(f"{db}.lock").exists() is (record != "nothing")
