"""`ritmo run --once` in live mode: the real ccxt.binance client, built from RITMO_* settings, against the fake
Binance REST server on 127.0.0.1 (real 2024 candles, HMAC signatures checked like Binance).

Everything stays on 127.0.0.1: an autouse guard refuses any other socket connection.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from bot.cli import main as cli_main
from bot.daemon.state import open_state_readonly
from bot.files.checkpoints import load_checkpoint, save_checkpoint
from bot.settings import LIVE_CONFIRM_PHRASE
from tests.conftest import assert_secrets_absent
from tests.fake_binance import TEST_API_KEY, TEST_API_SECRET, FakeBinance
from tests.test_daemon import make_checkpoint

CAP_QUOTE = 100.0


@pytest.fixture(autouse=True)
def _localhost_only(localhost_only: None) -> None:
    """Only 127.0.0.1 (tests/conftest.py)."""


def buying_checkpoint(path: Path, candles: pd.DataFrame) -> Path:
    """A long_only policy that always says BUY (its head's BUY logit biased by +20)."""
    make_checkpoint(path, candles, mode="long_only")
    bundle = load_checkpoint(path)
    with torch.no_grad():
        bundle.model.head.net[-1].bias.copy_(torch.tensor([0.0, 20.0, 0.0]))
    return save_checkpoint(path, bundle)


@pytest.fixture(scope="module")
def buy_ckpt(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    return buying_checkpoint(tmp_path_factory.mktemp("ckpt") / "buy.pt", candles_2024)


@pytest.fixture
def fake(candles_2024: pd.DataFrame) -> Iterator[FakeBinance]:
    with FakeBinance(candles=candles_2024, hang_s=1.5) as server:
        pin_mid_candle(server)
        yield server


def pin_mid_candle(fake: FakeBinance) -> None:
    """Put the server's clock 60 s after a 5-minute close: the runs of a test all see the same newest candle."""
    now_ms = time.time_ns() // 1_000_000
    fake.server_offset_ms = (now_ms // 300_000) * 300_000 + 60_000 - now_ms


def live_env(fake: FakeBinance, state_dir: Path, checkpoint: Path, **extra: str) -> dict[str, str]:
    """RITMO_* settings of a live daemon pointed at the fake server."""
    env = {
        "RITMO_MODE": "live",
        "RITMO_LIVE_CONFIRM": LIVE_CONFIRM_PHRASE,
        "RITMO_API_KEY": TEST_API_KEY,
        "RITMO_API_SECRET": TEST_API_SECRET,
        "RITMO_MAX_POSITION_QUOTE": str(CAP_QUOTE),
        "RITMO_EXCHANGE_CONFIG": json.dumps(fake.ccxt_config(timeout_ms=1_000)),
        "RITMO_CHECKPOINT": str(checkpoint),
        "RITMO_STATE_DIR": str(state_dir),
        "RITMO_SEED": "1",
        "RITMO_LOG_FORMAT": "json",
    }
    env.update(extra)
    return env


@pytest.fixture
def run_live(
    isolated_process: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Any:
    """Run `ritmo run --once` in-process with a live environment; returns (exit code, stdout + stderr)."""

    def run(env: dict[str, str], *args: str) -> tuple[int, str]:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        code = cli_main(["run", "--once", "--env-file", str(tmp_path / "absent.env"), *args])
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


def events(output: str) -> list[dict[str, Any]]:
    """The JSON log lines of an output."""
    out = []
    for line in output.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if "event" in record:  # not `ritmo status --json`
                out.append(record)
    return out


def assert_no_secret(output: str, root: Path) -> None:
    """Neither the key nor the secret is in the output or in any file under `root`."""
    assert_secrets_absent((TEST_API_KEY, TEST_API_SECRET), output, root)


def assert_ledger_matches_exchange(state_db: Path, fake: FakeBinance) -> dict[str, Any]:
    """The state's ledger holds exactly the exchange's BTC and USDT."""
    store = open_state_readonly(state_db)
    try:
        ledger = store.get_meta("ledger")
    finally:
        store.close()
    btc, usdt = sum(fake.balance("BTC")), sum(fake.balance("USDT"))
    assert ledger["qty_base"] == pytest.approx(btc, abs=1e-12)
    assert ledger["cash_quote"] == pytest.approx(usdt, abs=1e-8)
    return ledger


def state_db(state_dir: Path) -> Path:
    [db] = state_dir.glob("*.sqlite")
    return db


def test_once_live_places_one_signed_market_order(
    fake: FakeBinance, buy_ckpt: Path, tmp_path: Path, run_live: Any
) -> None:
    code, output = run_live(live_env(fake, tmp_path / "state", buy_ckpt))
    assert code == 0, output
    [order] = fake.orders
    assert order["side"] == "BUY" and order["type"] == "MARKET" and order["status"] == "FILLED"
    notional = float(order["cummulativeQuoteQty"])
    assert 0.95 * CAP_QUOTE < notional <= CAP_QUOTE * 1.001
    posts = fake.requests_to("/api/v3/order", "POST")
    assert len(posts) == 1 and posts[0].signature_ok
    assert posts[0].params["type"] == "MARKET" and "price" not in posts[0].params
    assert posts[0].params["newClientOrderId"] == order["clientOrderId"]
    ledger = assert_ledger_matches_exchange(state_db(tmp_path / "state"), fake)
    assert ledger["position"] == 1 and ledger["n_trades"] == 1
    ticks = [e for e in events(output) if e["event"] == "tick"]
    assert len(ticks) == 1 and ticks[0]["status"] == "acted" and ticks[0]["action"] == "BUY"
    assert any(e["event"] == "live_trading" for e in events(output))
    # A second --once on the same candle does nothing.
    code, output2 = run_live(live_env(fake, tmp_path / "state", buy_ckpt))
    assert code == 0 and "once_nothing_to_do" in output2
    assert len(fake.orders) == 1
    assert_no_secret(output + output2, tmp_path)


def test_once_live_500_after_execute_is_looked_up_not_resent(
    fake: FakeBinance, buy_ckpt: Path, tmp_path: Path, run_live: Any
) -> None:
    fake.fail_next_order("500_after_execute")
    code, output = run_live(live_env(fake, tmp_path / "state", buy_ckpt))
    assert code == 0, output
    assert len(fake.orders) == 1
    assert len(fake.requests_to("/api/v3/order", "POST")) == 1
    names = [e["event"] for e in events(output)]
    assert "order_ambiguous" in names and "order_found_after_ambiguous_send" in names
    ledger = assert_ledger_matches_exchange(state_db(tmp_path / "state"), fake)
    assert ledger["position"] == 1
    assert_no_secret(output, tmp_path)


def test_once_live_without_confirmation_refuses_before_any_request(
    fake: FakeBinance, buy_ckpt: Path, tmp_path: Path, run_live: Any
) -> None:
    env = live_env(fake, tmp_path / "state", buy_ckpt)
    del env["RITMO_LIVE_CONFIRM"]
    code, output = run_live(env)
    assert code == 78
    lines = output.strip().splitlines()
    assert lines[-1].startswith("ritmo run: error: RITMO_LIVE_CONFIRM does not hold the confirmation phrase")
    assert LIVE_CONFIRM_PHRASE in lines[-1]
    assert fake.requests == [] and fake.orders == []
    assert_no_secret(output, tmp_path)


@pytest.mark.parametrize(
    ("drop", "message"),
    [("RITMO_MAX_POSITION_QUOTE", "RITMO_MAX_POSITION_QUOTE"), ("RITMO_API_SECRET", "RITMO_API_SECRET")],
)
def test_once_live_without_cap_or_keys_refuses(
    fake: FakeBinance, buy_ckpt: Path, tmp_path: Path, run_live: Any, drop: str, message: str
) -> None:
    env = live_env(fake, tmp_path / "state", buy_ckpt)
    del env[drop]
    code, output = run_live(env)
    assert code == 78 and message in output.strip().splitlines()[-1]
    assert fake.orders == []


def test_once_live_refuses_a_long_short_checkpoint_on_spot(
    fake: FakeBinance, tmp_path: Path, run_live: Any, candles_2024: pd.DataFrame
) -> None:
    ckpt = make_checkpoint(tmp_path / "ls.pt", candles_2024, mode="long_short")
    code, output = run_live(live_env(fake, tmp_path / "state", ckpt))
    assert code == 78
    assert "long_short cannot trade live on binance spot" in output.strip().splitlines()[-1]
    assert fake.orders == []


def test_once_live_refuses_a_key_that_can_withdraw(
    candles_2024: pd.DataFrame, buy_ckpt: Path, tmp_path: Path, run_live: Any
) -> None:
    with FakeBinance(candles=candles_2024, can_withdraw=True) as fake:
        pin_mid_candle(fake)
        code, output = run_live(live_env(fake, tmp_path / "state", buy_ckpt))
        assert code == 77, output
        assert "withdraw" in output.strip().splitlines()[-1]
        assert fake.orders == []
        assert_no_secret(output, tmp_path)


def test_once_live_revoked_key_stops_with_exit_77(
    fake: FakeBinance, buy_ckpt: Path, tmp_path: Path, run_live: Any
) -> None:
    fake.key_enabled = False
    code, output = run_live(live_env(fake, tmp_path / "state", buy_ckpt))
    assert code == 77, output
    assert fake.orders == []
    assert_no_secret(output, tmp_path)


def test_live_status_shows_the_breaker_and_the_balance_check(
    fake: FakeBinance, buy_ckpt: Path, tmp_path: Path, run_live: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output = run_live(live_env(fake, tmp_path / "state", buy_ckpt))
    assert code == 0, output
    assert cli_main(["status", "--state-dir", str(tmp_path / "state"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["broker"]["breaker"]["state"] == "closed"
    assert status["balance_check"]["adjusted"] is False
    assert status["orders"]["by_status"] == {"filled": 1} and status["orders"]["pending"] == []
    # Someone sells half the BTC by hand: the next start adopts the exchange's balance and says so.
    btc_free, _ = fake.balance("BTC")
    fake.set_balance("BTC", round(btc_free / 2, 8))  # Binance reports balances to 8 decimals
    fake.set_balance("USDT", sum(fake.balance("USDT")) + 40.0)
    code, output = run_live(live_env(fake, tmp_path / "state", buy_ckpt))
    assert code == 0, output
    assert next(e for e in events(output) if e["event"] == "ledger_adjusted")["level"] == "error"
    assert_ledger_matches_exchange(state_db(tmp_path / "state"), fake)
    assert cli_main(["status", "--state-dir", str(tmp_path / "state")]) == 0
    text = capsys.readouterr().out
    assert "ADJUSTED to the exchange" in text and "circuit breaker closed" in text
    assert_no_secret(output + text, tmp_path)


@pytest.mark.parametrize("source", ["env_file", "credentials"])
def test_keys_from_env_file_or_systemd_credentials_never_leak(
    fake: FakeBinance,
    buy_ckpt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str,
    isolated_process: None,
) -> None:
    """The keys read from a .env file (left world-readable: warned) or from $CREDENTIALS_DIRECTORY sign orders
    and appear nowhere: not in logs, errors, `ritmo status`, the state database or the online checkpoints."""
    env = live_env(fake, tmp_path / "state", buy_ckpt)
    del env["RITMO_API_KEY"], env["RITMO_API_SECRET"]
    env_file = tmp_path / "ritmo.env"
    if source == "env_file":
        env_file.write_text(f"RITMO_API_KEY={TEST_API_KEY}\nRITMO_API_SECRET={TEST_API_SECRET}\n")
        env_file.chmod(0o644)
    else:
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "ritmo_api_key").write_text(TEST_API_KEY + "\n")
        (creds / "ritmo_api_secret").write_text(TEST_API_SECRET + "\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        env_file.write_text("")
        env_file.chmod(0o600)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # A first run whose order answers 500 after executing (error paths logged), then a clean one.
    fake.fail_next_order("500_after_execute")
    assert cli_main(["run", "--once", "--env-file", str(env_file)]) == 0
    fake.server_offset_ms += 300_000
    assert cli_main(["run", "--once", "--env-file", str(env_file)]) == 0
    assert cli_main(["status", "--state-dir", str(tmp_path / "state"), "--json"]) == 0
    out = capsys.readouterr()
    output = out.out + out.err
    assert len(fake.orders) == 1 and fake.requests_to("/api/v3/order", "POST")[0].signature_ok
    warned = [e for e in events(output) if e["event"] == "env_file_permissions"]
    assert bool(warned) == (source == "env_file")
    # Only the user's own key files may hold the keys.
    assert_secrets_absent(
        (TEST_API_KEY, TEST_API_SECRET), output, tmp_path, skip=lambda p: p.parent.name == "creds" or p == env_file
    )
