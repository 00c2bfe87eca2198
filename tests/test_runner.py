"""`ritmo run` as a process: configuration errors, signals, the scheduler, sd_notify, logs; `ritmo status`/`resume`."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bot.cli import main as cli_main
from bot.commands import run as runner
from bot.daemon import service
from bot.exchange.client import ExchangeClient
from bot.settings import load_settings
from strategies.candles import CANDLE_MS, parse_utc_date_ms
from tests.conftest import DATA_2024, assert_secrets_absent
from tests.fake_exchange import FakeExchange
from tests.test_daemon import make_checkpoint, settings_env

REPO = Path(__file__).resolve().parent.parent
DEC1 = parse_utc_date_ms("2024-12-01")
KEY = "kEy1234567890ABCDEFghijklmnopQRSTUV"
SECRET = "sEcReT0987654321zyxwvuTSRQPONMLKJi"


@pytest.fixture(autouse=True)
def _isolated(isolated_process: None) -> None:
    """Process state isolated (tests/conftest.py)."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "test.pt", candles_2024)


@pytest.fixture(scope="module")
def candles(candles_2024: pd.DataFrame) -> pd.DataFrame:
    return candles_2024[candles_2024["ts_ms"] >= parse_utc_date_ms("2024-11-20")].reset_index(drop=True)


class NotifyReceiver:
    """A datagram socket announced as $NOTIFY_SOCKET, read by a thread as systemd would (a full queue blocks)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self._messages: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                self._messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def messages(self) -> list[str]:
        """Everything received so far (waits a moment for datagrams in flight)."""
        time.sleep(0.2)
        return list(self._messages)

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyReceiver]:
    path = tmp_path / "notify.sock"
    if len(str(path)) >= 100:
        pytest.skip("tmp_path too long for an AF_UNIX address")
    receiver = NotifyReceiver(path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield receiver
    receiver.close()


def subprocess_env(**ritmo: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RITMO_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = str(REPO)
    env.update(ritmo)
    return env


# ---------------------------------------------------------------------------------------------------
# Configuration errors: exit 78, one line.
# ---------------------------------------------------------------------------------------------------


def test_bad_setting_exits_78_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bot", "run", "--once"],
        env=subprocess_env(RITMO_MODE="bogus"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 78
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("ritmo run: error: RITMO_MODE='bogus' is invalid")
    assert "paper, live, replay" in lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"RITMO_MODE": "replay"}, ["run"], "RITMO_MODE=replay needs a data file"),
        ({}, ["run", "--once", "--from", "2024-12-01"], "--from/--to only apply to a replay"),
        ({"RITMO_MODE": "live"}, ["run", "--once"], "RITMO_LIVE_CONFIRM"),
        (
            {"RITMO_CHECKPOINT": "nope.pt"},
            ["run", "--replay", str(DATA_2024), "--from", "2024-12-01", "--to", "2024-12-02"],
            "RITMO_CHECKPOINT='nope.pt' is invalid: file not found",
        ),
        (
            {},
            ["run", "--replay", str(DATA_2024), "--from", "2024-12-01", "--to", "2024-12-02", "--seed", "-1"],
            "--seed -1 is invalid",
        ),
    ],
)
def test_configuration_errors_exit_78(
    env: dict[str, str],
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli_main(args) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_live_mode_refuses_other_exchanges_before_any_network(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.settings import LIVE_CONFIRM_PHRASE

    for key, value in {
        "RITMO_MODE": "live",
        "RITMO_EXCHANGE": "kraken",
        "RITMO_LIVE_CONFIRM": LIVE_CONFIRM_PHRASE,
        "RITMO_API_KEY": KEY,
        "RITMO_API_SECRET": SECRET,
        "RITMO_MAX_POSITION_QUOTE": "100",
    }.items():
        monkeypatch.setenv(key, value)
    assert cli_main(["run", "--once"]) == 78
    err = capsys.readouterr().err
    assert "Binance spot (binance" in err and "binanceusdm" in err and KEY not in err and SECRET not in err
    # binanceusdm is accepted, but a perpetual must be named with its settle currency.
    monkeypatch.setenv("RITMO_EXCHANGE", "binanceusdm")
    assert cli_main(["run", "--once"]) == 78
    assert "BTC/USDT:USDT" in capsys.readouterr().err


def test_replay_period_errors(
    tmp_path: Path, checkpoint: Path, candles_2024: pd.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    """Impossible periods are usage errors (2, one line); a failed start leaves no state file behind."""
    base = ["run", "--replay", str(DATA_2024), "--checkpoint", str(checkpoint), "--state-dir", "s"]
    cases = [
        (["--from", "2024-12-02", "--to", "2024-12-01"], "--to must be after --from"),
        (["--from", "2024-12-01", "--to", "2024-12-01"], "--to must be after --from"),
        (["--from", "2024-12-01T00:01", "--to", "2024-12-02"], "5-minute boundaries"),
        (["--from", "2025-02-01", "--to", "2025-03-01"], "is after the end of"),
        (["--from", "2024-12-01", "--to", "2024-12-02", "--speed", "0"], "--speed '0' is invalid"),
    ]
    # The earliest start: the 1265th candle of the file must be closed when the first decision is taken.
    earliest = pd.Timestamp(int(candles_2024["ts_ms"].iloc[1264]) + CANDLE_MS, unit="ms").strftime("%Y-%m-%d %H:%M")
    cases.append(
        (["--from", "2024-01-02", "--to", "2024-01-03"], f"the earliest --from for this file is {earliest} (UTC)")
    )
    for extra, message in cases:
        assert cli_main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ritmo run: error: ") and message in err[0], err
    assert "candles of history" in err[0]
    # The warm-up error came after the state was opened: the state this run created is gone again.
    assert not any((tmp_path / "s").glob("*.sqlite*")) and not any((tmp_path / "s").glob("*.lock"))
    # From the earliest start on, the replay runs.
    assert cli_main([*base, "--from", earliest, "--to", "2024-01-05T12:00", "--no-online-learning"]) == 0, earliest


def test_replay_past_the_end_of_the_file_is_clipped(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --to past the data replays up to the file's end, warns `period_clipped` and logs the period used."""
    from bot.daemon.state import open_state_readonly

    args = ["run", "--replay", str(DATA_2024), "--checkpoint", str(checkpoint), "--state-dir", "s", "--seed", "1"]
    args += ["--from", "2024-12-31T22:00", "--to", "2025-02-01", "--no-online-learning"]
    assert cli_main(args) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (clipped,) = [e for e in events if e["event"] == "period_clipped"]
    assert clipped["level"] == "warning" and clipped["requested"] == "2025-02-01 00:00"
    assert clipped["used"] == "2025-01-01 00:00"
    (start,) = [e for e in events if e["event"] == "replay_start"]
    assert start["end"] == "2025-01-01T00:00:00Z"
    (done,) = [e for e in events if e["event"] == "replay_done"]
    assert done["ticks"] == 24  # 22:00 .. 23:55: every candle the file holds after --from
    store = open_state_readonly(tmp_path / "s" / "replay-BTC-USDT.sqlite")
    try:
        assert store.get_meta("replay")["to_ms"] == parse_utc_date_ms("2025-01-01")
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------------
# Signals.
# ---------------------------------------------------------------------------------------------------

SLOW_TICK_SCRIPT = """
import pathlib, sys, time
from bot.daemon import tick as daemon
marker, slow_at = pathlib.Path(sys.argv[1]), int(sys.argv[2])
original = daemon.Daemon._tick_in_tx
calls = {"n": 0}
def slow_tick(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == slow_at:
        marker.write_text("in tick")
        time.sleep(2.0)  # SIGTERM arrives here, in the middle of the tick's transaction
    return original(self, *args, **kwargs)
daemon.Daemon._tick_in_tx = slow_tick
from bot.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_sigterm_during_a_tick_finishes_it_and_exits_0(tmp_path: Path, checkpoint: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text(SLOW_TICK_SCRIPT)
    marker = tmp_path / "in_tick"
    state = tmp_path / "state"
    args = ["run", "--replay", str(DATA_2024), "--from", "2024-12-01", "--to", "2024-12-02"]
    args += ["--checkpoint", str(checkpoint), "--state-dir", str(state), "--seed", "1"]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker), "5", *args],
        env=subprocess_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    ticks = [e for e in events if e["event"] == "tick"]
    assert len(ticks) == 5  # the tick in flight was finished (and logged), no new one started
    assert events[-1]["event"] == "stopped" and events[-1]["signal"] == signal.SIGTERM
    assert not any(e["event"] == "replay_done" for e in events)
    with sqlite3.connect(state / "replay-BTC-USDT.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 5
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class SteppingClock:
    """Exchange time of a FakeExchange; each scheduled tick (a worker thread) moves it 5 minutes on."""

    def __init__(self, fake: FakeExchange) -> None:
        self.fake = fake

    def now_ms(self) -> int:
        if threading.current_thread() is not threading.main_thread():
            self.fake.advance(CANDLE_MS)
        return self.fake.now_ms

    def sleep(self, seconds: float) -> None:
        self.fake.advance(round(seconds * 1000))


def test_scheduled_paper_daemon_stops_cleanly_on_sigterm_mid_tick(
    tmp_path: Path, checkpoint: Path, candles: pd.DataFrame, notify_socket: NotifyReceiver
) -> None:
    """The real scheduler loop (fast trigger, fake exchange): READY, WATCHDOG per tick, SIGTERM mid-tick, exit 0."""
    from apscheduler.triggers.interval import IntervalTrigger

    from bot.daemon.tick import Daemon

    settings = load_settings(settings_env(tmp_path, checkpoint, mode="paper"), env_file=None)
    fake = FakeExchange(candles, now_ms=DEC1 + 5_000)
    clock = SteppingClock(fake)
    in_tick = threading.Event()
    original = Daemon._tick_in_tx
    calls = {"n": 0}

    def slow_third(self: Daemon, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            in_tick.set()
            time.sleep(1.0)
        return original(self, *args)

    def send_sigterm() -> None:
        in_tick.wait(60)
        os.kill(os.getpid(), signal.SIGTERM)

    stop = service.StopSignal().install()
    killer = threading.Thread(target=send_sigterm, daemon=True)
    killer.start()
    Daemon._tick_in_tx = slow_third  # type: ignore[method-assign]
    try:
        rc = runner.run_realtime(
            settings,
            once=False,
            greedy=False,
            stop=stop,
            client=ExchangeClient(fake, sleep=clock.sleep),
            clock=clock,
            trigger=IntervalTrigger(seconds=0.3, timezone=UTC),
            local_ms=lambda: fake.now_ms,
        )
    finally:
        Daemon._tick_in_tx = original  # type: ignore[method-assign]
        stop.restore()
    assert rc == 0 and stop.signum == signal.SIGTERM
    with sqlite3.connect(tmp_path / "paper-BTC-USDT.sqlite") as conn:
        rows = conn.execute("SELECT ts_ms, status FROM decisions ORDER BY ts_ms").fetchall()
    assert [r[1] for r in rows] == ["acted"] * 3  # the third (interrupted) tick was committed
    assert [r[0] for r in rows] == [DEC1, DEC1 + CANDLE_MS, DEC1 + 2 * CANDLE_MS]
    messages = notify_socket.messages()
    assert messages[0] == "READY=1" and messages[-1] == "STOPPING=1"
    assert messages.count("WATCHDOG=1") == 3
    assert sum(m.startswith("STATUS=") for m in messages) == 3


def test_scheduler_configuration() -> None:
    settings = load_settings({"RITMO_TICK_DELAY_S": "7", "RITMO_MISFIRE_GRACE_S": "90"}, env_file=None)
    trigger = service.make_trigger(settings)
    fields = {f.name: str(f) for f in trigger.fields}
    assert fields["minute"] == "*/5" and fields["second"] == "7"
    assert str(trigger.timezone) == "UTC"
    scheduler = service.make_scheduler(settings)
    assert str(scheduler.timezone) == "UTC"
    assert scheduler._job_defaults == {"coalesce": True, "max_instances": 1, "misfire_grace_time": 90}


# ---------------------------------------------------------------------------------------------------
# --once, sd_notify, logs, secrets.
# ---------------------------------------------------------------------------------------------------


def test_once_against_the_fake_exchange_logs_json_without_secrets(
    tmp_path: Path, checkpoint: Path, candles: pd.DataFrame, notify_socket: NotifyReceiver
) -> None:
    env = settings_env(tmp_path, checkpoint, mode="paper", api_key=KEY, api_secret=SECRET)
    settings = load_settings(env, env_file=None)
    out = io.StringIO()
    from bot.logs import configure_logging

    configure_logging("json", "DEBUG", stream=out, secrets=settings.secret_values())
    fake = FakeExchange(candles, now_ms=DEC1 + 5_000)
    fake.apiKey, fake.secret = KEY, SECRET
    clock = SteppingClock(fake)
    client = ExchangeClient(fake, sleep=clock.sleep)
    rc = runner.run_realtime(settings, once=True, greedy=False, stop=service.StopSignal(), client=client, clock=clock)
    assert rc == 0
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    ticks = [e for e in events if e["event"] == "tick"]
    assert len(ticks) == 1 and ticks[0]["ts"] == "2024-11-30T23:55:00Z" and ticks[0]["candle"] == ticks[0]["ts"]
    for key in (
        "status",
        "action",
        "probs",
        "position_before",
        "position_after",
        "equity",
        "fee_quote",
        "model_version",
        "episode_step",
        "k",
        "latency_ms",
    ):
        assert key in ticks[0]
    assert KEY not in out.getvalue() and SECRET not in out.getvalue()
    assert notify_socket.messages() == ["READY=1", "WATCHDOG=1", "STOPPING=1"]
    # A second --once on the same candle does nothing (idempotent).
    rc = runner.run_realtime(settings, once=True, greedy=False, stop=service.StopSignal(), client=client, clock=clock)
    assert rc == 0 and "once_nothing_to_do" in out.getvalue()
    assert_secrets_absent((KEY, SECRET), out.getvalue(), tmp_path)


def test_replay_notifies_ready_watchdog_stopping(
    tmp_path: Path, checkpoint: Path, notify_socket: NotifyReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "--replay", str(DATA_2024), "--from", "2024-12-01", "--to", "2024-12-01T01:00"]
    assert cli_main([*args, "--checkpoint", str(checkpoint), "--state-dir", "s"]) == 0
    messages = notify_socket.messages()
    # Replays ping the watchdog at most once a second (a real daemon after every tick).
    assert messages[0] == "READY=1" and messages[-1] == "STOPPING=1"
    assert set(messages[1:-1]) == {"WATCHDOG=1"}
    lines = capsys.readouterr().out.splitlines()
    assert sum(json.loads(line)["event"] == "tick" for line in lines) == 12


def test_status_and_resume_commands(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["run", "--replay", str(DATA_2024), "--from", "2024-12-01", "--to", "2024-12-01T02:00"]
    monkeypatch.setenv("RITMO_MAX_DRAWDOWN", "0.001")  # a halt at the first loss
    assert cli_main([*args, "--checkpoint", str(checkpoint), "--state-dir", "s"]) == 0
    monkeypatch.delenv("RITMO_MAX_DRAWDOWN")
    capsys.readouterr()
    # status and resume need no API key, even with RITMO_MODE=live in the environment.
    monkeypatch.setenv("RITMO_MODE", "live")
    assert cli_main(["status", "--state-dir", "s", "--mode", "replay"]) == 0
    text = capsys.readouterr().out
    assert "HALTED since" in text and "ritmo resume" in text
    assert cli_main(["resume", "--state-dir", "s", "--mode", "replay"]) == 0
    assert "halt cleared" in capsys.readouterr().out
    assert cli_main(["resume", "--state-dir", "s", "--mode", "replay"]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert cli_main(["status", "--json", "--state-dir", "s", "--mode", "replay"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["halt"]["halted"] is False and status["mode"] == "replay"
    assert cli_main(["status", "--state-dir", "elsewhere"]) == 1
    assert "no state database" in capsys.readouterr().err
