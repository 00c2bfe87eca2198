"""LiveBroker against the fake exchange: sizing, the intent-before-send order, fills and fees, reconciliation,
start checks, secrets; and one run with the real ccxt.binance class against the fake Binance server.

Helpers here (`Env`, `make_env`, `tick`) are shared with tests/test_live_faults.py.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ccxt
import pytest
from structlog.testing import capture_logs

from bot.brokers.base import Decision, ExecutionResult, client_order_id
from bot.brokers.live import LiveBroker, check_live_start, reconcile_balance
from bot.daemon.state import StateStore, open_state
from bot.errors import AuthenticationExchangeError, ConfigError
from bot.exchange.breaker import CircuitBreaker
from bot.exchange.client import ExchangeClient, make_exchange
from bot.settings import LIVE_CONFIRM_PHRASE, Settings
from strategies.accounting import Ledger
from strategies.actions import BUY, SELL
from tests.fake_binance import TEST_API_KEY, TEST_API_SECRET, FakeBinance
from tests.fake_exchange import FakeExchange

SYMBOL = "BTC/USDT"
PRICE = 50_000.0
CAP = 500.0
# Known credentials: every test with them asserts they appear in no output.
KEY = "liveKeyX9q2W7e4R1t8Y5u3I6o0PaSdFgHjKlZxCvBnMqWeRtYuIoP"
SECRET = "liveSecretZ4x7C1v9B3n6M2q8W5e0RtYuIoPaSdFgHjKlZxCvBnM"


@dataclass
class Env:
    """One live setup: fake exchange, broker, state store (in tmp_path), ledger, recorded sleeps."""

    fake: FakeExchange
    broker: LiveBroker
    store: StateStore
    ledger: Ledger
    sleeps: list[float]
    path: Path

    def candle_ts(self, offset: int = 0) -> int:
        """A candle open time near the fake's clock (distinct per offset)."""
        return (self.fake.now_ms // 300_000 - 1 + offset) * 300_000

    def orders(self, side: str | None = None) -> list[dict[str, Any]]:
        """Orders that exist on the exchange."""
        return [o for o in self.fake.orders if side is None or o["side"] == side]

    def db_orders(self) -> dict[str, dict[str, Any]]:
        """Order rows of the state database by client id."""
        cur = self.store.conn.execute("SELECT * FROM orders")
        names = [d[0] for d in cur.description]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}

    def assert_ledger_matches_exchange(self) -> None:
        """No lost fill: the ledger holds exactly what the exchange holds."""
        assert self.ledger.qty_base == pytest.approx(self.fake.balance("BTC"), abs=1e-9)
        assert self.ledger.cash_quote == pytest.approx(self.fake.balance("USDT"), abs=1e-6)


def make_env(
    tmp_path: Path,
    *,
    cash: float = 1_000.0,
    cap: float = CAP,
    breaker: CircuitBreaker | None = None,
    **fake_kwargs: Any,
) -> Env:
    """A fake exchange at the real wall clock (the state store stamps intents with it), funded with `cash`."""
    fake = FakeExchange(symbol=SYMBOL, now_ms=time.time_ns() // 1_000_000, balances={"USDT": cash}, **fake_kwargs)
    fake.set_ticker_price(SYMBOL, PRICE)
    fake.apiKey, fake.secret = KEY, SECRET
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        # Waiting moves the fake's clock: a down exchange comes back, a breaker cools down.
        sleeps.append(seconds)
        fake.advance(int(seconds * 1000))

    clock = lambda: fake.now_ms  # noqa: E731
    broker = LiveBroker(
        ExchangeClient(fake, sleep=sleep, rng=lambda: 0.5),
        symbol=SYMBOL,
        max_position_quote=cap,
        sleep=sleep,
        clock_ms=clock,
        breaker=breaker or CircuitBreaker(threshold=3, cooldown_ms=300_000, clock=clock, secrets=(KEY, SECRET)),
    )
    broker.note_close(PRICE)
    store = open_state(tmp_path / "live.db", mode="live", symbol=SYMBOL)
    return Env(fake, broker, store, Ledger(cash_quote=cash), sleeps, tmp_path / "live.db")


def decision(ts_ms: int, action: int, position_before: int = 0, reason: str = "policy") -> Decision:
    """A policy decision on the candle opening at ts_ms."""
    return Decision(SYMBOL, ts_ms, (0.2, 0.5, 0.3), action, position_before, "v1", reason)


def tick(env: Env, action: int, *, offset: int = 0, ref_price: float = PRICE) -> ExecutionResult:
    """What the daemon's tick does with a broker: execute, then record status and fills, in one transaction."""
    target = 1 if action == BUY else (0 if action == SELL else env.ledger.position)
    return execute_in_tick(env, decision(env.candle_ts(offset), action, env.ledger.position), target, ref_price)


def execute_in_tick(env: Any, d: Decision, target: int, ref_price: float) -> ExecutionResult:
    """The daemon's part around a broker: execute, then record status and fills, in one transaction."""
    with env.store.transaction() as store:
        result = env.broker.execute(d, target, env.ledger, ref_price, store, ref_source="ticker")
        if result.intent is not None:
            store.set_order_status(result.intent.client_order_id, result.status, result.reject_reason)
            for fill in result.fills:
                store.insert_fill(result.intent.client_order_id, d.ts_ms, fill)
    return result


def reconcile(env: Env) -> None:
    """What the daemon's start does: reconcile pending orders in one transaction."""
    with env.store.transaction() as store:
        pending = store.pending_orders()
        if pending:
            env.broker.reconcile(store, pending, env.ledger)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = make_env(tmp_path)
    yield e
    e.store.close()


# ---- execute: the happy path ---------------------------------------------------------------------------


def test_buy_places_one_market_order_with_intent_and_sent_durable_before_it(env: Env) -> None:
    seen: dict[str, Any] = {}
    real_create = env.fake.create_order

    def spy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        # Another connection sees only committed rows: the order's row must already say `sent`.
        conn = sqlite3.connect(env.path)
        seen["rows"] = conn.execute("SELECT client_order_id, status FROM orders").fetchall()
        conn.close()
        return real_create(*args, **kwargs)

    env.fake.create_order = spy  # type: ignore[method-assign]
    result = tick(env, BUY)
    coid = client_order_id(SYMBOL, env.candle_ts(), "BUY")
    assert seen["rows"] == [(coid, "sent")]
    assert result.status == "filled"
    assert len(env.fake.orders) == 1
    call = next(kw for name, kw in env.fake.call_log if name == "create_order")
    assert call["type"] == "market" and call["price"] is None and call["params"] == {"newClientOrderId": coid}
    # Capped: the position's notional is at most the cap, however much cash there is.
    assert env.ledger.qty_base * PRICE <= CAP * 1.0001
    assert env.ledger.qty_base == pytest.approx(0.01)
    assert env.ledger.position == 1
    assert env.db_orders()[coid]["status"] == "filled"
    assert len(env.store.fills()) == 1
    env.assert_ledger_matches_exchange()


def test_buy_then_sell_flattens_and_matches_the_exchange(env: Env) -> None:
    assert tick(env, BUY).status == "filled"
    env.fake.set_ticker_price(SYMBOL, PRICE * 1.01)
    env.broker.note_close(PRICE * 1.01)
    result = tick(env, SELL, offset=1, ref_price=PRICE * 1.01)
    assert result.status == "filled"
    assert [o["side"] for o in env.orders()] == ["buy", "sell"]
    assert env.ledger.qty_base == pytest.approx(0.0, abs=1e-12)
    assert env.ledger.position == 0
    assert env.ledger.fees_quote == pytest.approx(0.001 * 0.01 * PRICE * (1 + 1.01))
    env.assert_ledger_matches_exchange()


def test_small_account_buy_fits_cash_with_the_fee(tmp_path: Path) -> None:
    # Equity below the cap: the whole cash is the target, but the quote fee and a price move must still fit.
    env = make_env(tmp_path, cash=100.0)
    assert tick(env, BUY).status == "filled"
    assert env.ledger.cash_quote >= 0
    env.assert_ledger_matches_exchange()
    env.store.close()


def test_min_notional_is_checked_before_sending(tmp_path: Path) -> None:
    env = make_env(tmp_path, cap=4.0)  # 4 USDT < Binance's 5 USDT minimum notional
    with capture_logs() as logs:
        result = tick(env, BUY)
    assert result.status == "rejected" and "NOTIONAL" in (result.reject_reason or "")
    assert env.fake.calls["create_order"] == 0
    assert [e for e in logs if e["event"] == "order_rejected"]
    assert next(iter(env.db_orders().values()))["status"] == "rejected"
    env.store.close()


def test_fat_finger_price_far_from_last_close_is_refused(env: Env) -> None:
    with capture_logs() as logs:
        result = tick(env, BUY, ref_price=PRICE * 1.05)
    assert result.status == "rejected" and (result.reject_reason or "").startswith("refused")
    assert env.fake.calls["create_order"] == 0
    assert [e for e in logs if e["event"] == "order_refused"]


def test_fat_finger_notional_above_the_cap_is_refused(env: Env) -> None:
    # A sizing bug that would grow the position past the cap is caught by the guard itself.
    assert env.broker._fat_finger("buy", 0.02, PRICE, env.ledger) is not None
    assert env.broker._fat_finger("buy", 0.01, PRICE, env.ledger) is None
    # A flattening sell of a position that grew past the cap (price rise) must pass.
    env.ledger.qty_base = 0.02
    assert env.broker._fat_finger("sell", 0.02, PRICE, env.ledger) is None


def test_fills_come_from_my_trades_when_the_response_has_none(env: Env) -> None:
    real_create = env.fake.create_order

    def bare(*args: Any, **kwargs: Any) -> dict[str, Any]:
        order = real_create(*args, **kwargs)
        return {**order, "trades": [], "fee": None, "fees": []}

    env.fake.create_order = bare  # type: ignore[method-assign]
    env.fake.fills_per_order = 3
    result = tick(env, BUY)
    assert result.status == "filled" and len(result.fills) == 3
    assert env.fake.calls["fetch_my_trades"] == 1
    env.assert_ledger_matches_exchange()


def test_paused_while_breaker_open_sends_and_records_nothing(env: Env) -> None:
    for _ in range(3):
        env.broker.breaker.record_failure("boom")
    assert env.broker.breaker_state()["is_open"]
    with capture_logs() as logs:
        result = tick(env, BUY)
    assert result.status == "paused" and result.intent is None
    assert env.fake.calls["create_order"] == 0 and env.db_orders() == {}
    assert [e for e in logs if e["event"] == "trading_paused"]


# ---- reconciliation on start ---------------------------------------------------------------------------


def _crash_during_tick(env: Env, action: int, *, crash_in: str, offset: int = 0) -> None:
    """Run a tick that dies at `crash_in` ("create_order": before the send; "after": once it executed)."""
    if crash_in == "create_order":
        env.fake.fail_next("create_order", KeyboardInterrupt)
    else:
        real = env.fake.create_order

        def executed_then_die(*args: Any, **kwargs: Any) -> dict[str, Any]:
            real(*args, **kwargs)
            raise KeyboardInterrupt  # the process dies between "order sent" and "fill recorded"

        env.fake.create_order = executed_then_die  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        tick(env, action, offset=offset)
    if crash_in != "create_order":
        env.fake.create_order = real  # type: ignore[method-assign]


def test_reconcile_intent_never_sent_is_abandoned(env: Env) -> None:
    # The intent is committed, the process dies before the status moves to sent.
    real_set = env.store.set_order_status

    def die_before_sent(coid: str, status: str, detail: str | None = None) -> None:
        if status == "sent":
            raise KeyboardInterrupt
        real_set(coid, status, detail)

    env.store.set_order_status = die_before_sent  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        tick(env, BUY)
    env.store.set_order_status = real_set  # type: ignore[method-assign]
    [row] = env.db_orders().values()
    assert row["status"] == "intent"
    reconcile(env)
    assert next(iter(env.db_orders().values()))["status"] == "rejected"
    assert env.fake.calls["create_order"] == 0
    env.assert_ledger_matches_exchange()


def test_reconcile_books_an_order_executed_while_down_exactly_once(env: Env) -> None:
    ledger_before = Ledger(**env.ledger.to_dict())
    _crash_during_tick(env, BUY, crash_in="after")
    # The tick's transaction rolled back: the ledger in the database never saw the fill.
    env.ledger = ledger_before
    [row] = env.db_orders().values()
    assert row["status"] == "sent" and len(env.orders()) == 1
    reconcile(env)
    [row] = env.db_orders().values()
    assert row["status"] == "filled"
    assert len(env.store.fills()) == 1
    env.assert_ledger_matches_exchange()
    # A second start finds nothing pending; a replayed reconcile of the same row books nothing twice.
    reconcile(env)
    with env.store.transaction() as store:
        env.broker.reconcile(store, [row | {"status": "sent"}], env.ledger)
    assert len(env.store.fills()) == 1 and len(env.orders()) == 1
    env.assert_ledger_matches_exchange()


def test_reconcile_sent_but_never_executed_is_closed_without_sending(env: Env) -> None:
    _crash_during_tick(env, BUY, crash_in="create_order")
    assert next(iter(env.db_orders().values()))["status"] == "sent"
    reconcile(env)
    assert next(iter(env.db_orders().values()))["status"] == "rejected"
    assert env.orders() == []
    env.assert_ledger_matches_exchange()


def test_reconcile_finds_an_order_through_recent_trades(env: Env) -> None:
    # Binance reuses a filled market order's client id: the lookup may show another order; trades still tell.
    _crash_during_tick(env, BUY, crash_in="after")
    env.ledger = Ledger(cash_quote=1_000.0)
    env.fake.orders[-1]["clientOrderId"] = "someone-else"
    real_fetch = env.fake.fetch_order

    def by_id_only(id: str | None, symbol: str | None = None, params: dict | None = None) -> dict[str, Any]:
        order = real_fetch(id, symbol, params)
        if id is None:
            raise ccxt.OrderNotFound("binance -2013 Order does not exist.")
        return {**order, "clientOrderId": client_order_id(SYMBOL, env.candle_ts(), "BUY")}

    env.fake.fetch_order = by_id_only  # type: ignore[method-assign]
    reconcile(env)
    assert next(iter(env.db_orders().values()))["status"] == "filled"
    env.assert_ledger_matches_exchange()


def test_reconcile_balance_exchange_wins_beyond_dust(env: Env) -> None:
    env.fake.set_balance("BTC", 0.004)
    env.fake.set_balance("USDT", 800.0)
    with capture_logs() as logs:
        out = reconcile_balance(ExchangeClient(env.fake, sleep=lambda s: None), env.ledger, SYMBOL, dust_quote=1.0)
    assert out["adjusted"] and out["exchange_qty_base"] == 0.004 and out["ledger_cash_quote"] == 1_000.0
    [event] = [e for e in logs if e["event"] == "ledger_adjusted"]
    assert event["log_level"] == "error"  # logged loudly
    assert env.ledger.position == 1
    env.assert_ledger_matches_exchange()
    # Within dust: nothing changes.
    env.fake.set_balance("USDT", 800.5)
    assert not reconcile_balance(ExchangeClient(env.fake, sleep=lambda s: None), env.ledger, SYMBOL)["adjusted"]
    assert env.ledger.cash_quote == 800.0


# ---- start checks --------------------------------------------------------------------------------------


def _live_settings(**kwargs: Any) -> Settings:
    base: dict[str, Any] = {
        "mode": "live",
        "live_confirm": LIVE_CONFIRM_PHRASE,
        "api_key": KEY,
        "api_secret": SECRET,
        "max_position_quote": 100.0,
        "position_mode": "long_only",
    }
    return Settings(**(base | kwargs))


class KeyedFake(FakeExchange):
    """FakeExchange plus Binance's apiRestrictions endpoint."""

    can_withdraw = False

    def sapi_get_account_apirestrictions(self, params: dict | None = None) -> dict[str, Any]:
        self._enter("sapi_get_account_apirestrictions")
        return {"enableWithdrawals": self.can_withdraw, "enableSpotAndMarginTrading": True, "ipRestrict": True}


class UsdmFake(KeyedFake):
    """FakeExchange as binanceusdm, recording set_leverage and set_margin_mode."""

    def set_leverage(self, leverage: int, symbol: str | None = None, params: dict | None = None) -> dict:
        self._enter("set_leverage", leverage=leverage, symbol=symbol)
        return {}

    def set_margin_mode(self, mode: str, symbol: str | None = None, params: dict | None = None) -> dict:
        self._enter("set_margin_mode", mode=mode, symbol=symbol)
        return {}


def test_check_live_start_refuses_missing_prerequisites(tmp_path: Path) -> None:
    fake = KeyedFake(symbol=SYMBOL)
    ex = ExchangeClient(fake, sleep=lambda s: None)
    for bad in ({"live_confirm": "yes"}, {"api_key": ""}, {"max_position_quote": None}):
        with pytest.raises(ConfigError):
            check_live_start(_live_settings(**bad), ex, env_file=None)
    with pytest.raises(ConfigError, match="long_short"):
        check_live_start(_live_settings(position_mode="long_short"), ex, env_file=None)
    fake.can_withdraw = True
    with pytest.raises(AuthenticationExchangeError) as info:
        check_live_start(_live_settings(), ex, env_file=None)
    assert info.value.exit_code == 77


def test_check_live_start_sets_1x_isolated_on_usdm_and_warns_on_env_file(tmp_path: Path) -> None:
    ex = UsdmFake(symbol=SYMBOL, exchange_id="binanceusdm")
    env_file = tmp_path / ".env"
    env_file.write_text("RITMO_MODE=live\n")
    env_file.chmod(0o644)
    with capture_logs() as logs:
        check_live_start(
            _live_settings(position_mode="long_short"), ExchangeClient(ex, sleep=lambda s: None), env_file=env_file
        )
    calls = [(n, kw) for n, kw in ex.call_log if n.startswith("set_")]
    assert ("set_margin_mode", {"mode": "isolated", "symbol": SYMBOL}) in calls
    assert ("set_leverage", {"leverage": 1, "symbol": SYMBOL}) in calls
    assert [e for e in logs if e["event"] == "env_file_permissions"]
    env_file.chmod(0o600)
    with capture_logs() as logs:
        check_live_start(
            _live_settings(), ExchangeClient(KeyedFake(symbol=SYMBOL), sleep=lambda s: None), env_file=env_file
        )
    assert not [e for e in logs if e["event"] == "env_file_permissions"]


# ---- secrets -------------------------------------------------------------------------------------------


def test_secrets_never_appear_in_logs_or_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = make_env(tmp_path)
    leak = f"binance POST /api/v3/order X-MBX-APIKEY: {KEY} signature={SECRET} 500 Internal Server Error"
    texts: list[str] = []
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        env.fake.fail_after_execute("create_order", ccxt.ExchangeNotAvailable(leak))
        env.fake.fail_next("fetch_order", ccxt.RequestTimeout(leak))
        texts.append(str(tick(env, BUY)))
        env.fake.fail_next("create_order", ccxt.InsufficientFunds(leak))
        texts.append(str(tick(env, SELL, offset=1)))
        env.fake.fail_next("create_order", ccxt.AuthenticationError(leak))
        with pytest.raises(AuthenticationExchangeError) as info:
            tick(env, SELL, offset=2)
        texts += [str(info.value), repr(info.value)]
        env.fake.down_for(3_600_000)
        for i in range(5):
            texts.append(str(tick(env, SELL, offset=3 + i)))
    texts += [repr(e) for e in logs] + [caplog.text, str(env.broker.breaker_state())]
    texts += [repr(r) for r in env.store.conn.execute("SELECT * FROM orders").fetchall()]
    assert env.fake.calls["create_order"] >= 3
    for text in texts:
        assert KEY not in text and SECRET not in text
    env.store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert KEY.encode() not in raw and SECRET.encode() not in raw


# ---- the real ccxt.binance client against the fake Binance server --------------------------------------


@pytest.fixture(autouse=True)
def _localhost_only(localhost_only: None) -> None:
    """Only 127.0.0.1 (tests/conftest.py)."""


def _real_client_env(tmp_path: Path, server: FakeBinance) -> tuple[ExchangeClient, LiveBroker, StateStore, Ledger]:
    real = make_exchange(
        "binance", server.ccxt_config(timeout_ms=400), api_key=TEST_API_KEY, api_secret=TEST_API_SECRET
    )
    ex = ExchangeClient(real.ccxt_exchange, sleep=lambda s: None, rng=lambda: 0.0)
    ex.check_symbol(SYMBOL)  # loads the markets
    broker = LiveBroker(ex, symbol=SYMBOL, max_position_quote=CAP, sleep=lambda s: None)
    broker.note_close(50_000.0)
    store = open_state(tmp_path / "real.db", mode="live", symbol=SYMBOL)
    return ex, broker, store, Ledger(cash_quote=10_000.0)


@pytest.mark.usefixtures("_localhost_only")
@pytest.mark.parametrize("fault", [None, "500_after_execute"])
def test_real_ccxt_binance_places_one_signed_order(tmp_path: Path, fault: str | None) -> None:
    with FakeBinance() as server:
        _ex, broker, store, ledger = _real_client_env(tmp_path, server)
        if fault:
            server.fail_next_order(fault)
        ts = (int(time.time()) // 300 - 1) * 300_000
        with store.transaction():
            result = broker.execute(decision(ts, BUY), 1, ledger, 50_000.0, store)
        posts = server.requests_to("/api/v3/order", "POST")
        assert len(posts) == 1 and len(server.orders) == 1
        assert (
            posts[0].signed
            and posts[0].signature_ok
            and posts[0].params["type"] == "MARKET"
            and "quoteOrderQty" not in posts[0].params
        )
        assert posts[0].params["newClientOrderId"] == client_order_id(SYMBOL, ts, "BUY")
        assert result.status == "filled"
        if fault:
            assert server.requests_to("/api/v3/order", "GET")  # looked up by client id
        assert ledger.qty_base == pytest.approx(server.balance("BTC")[0], abs=1e-9)
        assert ledger.cash_quote == pytest.approx(server.balance("USDT")[0], abs=1e-6)
        store.close()


def test_drawdown_halt_flattens_the_live_position(env: Env) -> None:
    assert tick(env, BUY).status == "filled"
    d = decision(env.candle_ts(1), BUY, env.ledger.position, reason="halt")
    with env.store.transaction() as store:
        result = env.broker.execute(d, 0, env.ledger, PRICE, store)
    assert result.status == "filled" and result.intent is not None
    assert result.intent.client_order_id == client_order_id(SYMBOL, env.candle_ts(1), "FLATTEN")
    assert env.ledger.position == 0 and env.ledger.qty_base == pytest.approx(0.0, abs=1e-12)
    env.assert_ledger_matches_exchange()
