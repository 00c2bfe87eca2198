"""The REAL ccxt.binance client, built by bot.exchange.client.make_exchange, against the fake Binance server.

Everything stays on 127.0.0.1: an autouse guard refuses any other socket connection.
"""

from __future__ import annotations

import json
import logging
import random
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import ccxt
import pytest
from structlog.testing import capture_logs

from bot.brokers.base import client_order_id
from bot.errors import EXIT_NOPERM, AuthenticationExchangeError, OperationalExchangeError, TemporaryExchangeError
from bot.exchange.client import (
    ExchangeClient,
    classify_order_error,
    exchange_from_settings,
    fee_to_quote,
    make_exchange,
)
from bot.settings import load_settings
from tests.fake_binance import TEST_API_KEY, TEST_API_SECRET, FakeBinance

SYMBOL = "BTC/USDT"
CANDLE_TS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
# ccxt's client timeout in these tests; the fake's "timeout" faults hang longer than this.
TIMEOUT_MS = 400


class Recorder:
    """Injected sleep: records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture(autouse=True)
def _localhost_only(localhost_only: None) -> None:
    """Only 127.0.0.1 (tests/conftest.py)."""


@pytest.fixture
def fake() -> Iterator[FakeBinance]:
    with FakeBinance(hang_s=TIMEOUT_MS / 1000 + 1.0) as server:
        yield server


def _exchange(fake: FakeBinance, *, key: str = TEST_API_KEY, secret: str = TEST_API_SECRET) -> ExchangeClient:
    return make_exchange("binance", fake.ccxt_config(timeout_ms=TIMEOUT_MS), api_key=key, api_secret=secret)


def _sleeping(client: ExchangeClient, sleep: Recorder, rng: Callable[[], float] = random.random) -> ExchangeClient:
    """The same ccxt object in a client whose reads sleep with `sleep` (a fresh recorder for each checked call)."""
    return ExchangeClient(client.ccxt_exchange, sleep=sleep, rng=rng)


@pytest.fixture
def exchange(fake: FakeBinance) -> ExchangeClient:
    ex = _exchange(fake)
    ex.ccxt_exchange.load_markets()
    return ex


def _order_posts(fake: FakeBinance) -> list[Any]:
    return fake.requests_to("/api/v3/order", "POST")


# ---- configuration and reads ---------------------------------------------------------------------------


def test_every_api_url_points_at_the_fake_and_the_client_is_safe(fake: FakeBinance) -> None:
    ex = _exchange(fake).ccxt_exchange
    assert isinstance(ex, ccxt.binance)
    assert all(str(url).startswith(fake.url + "/") for url in ex.urls["api"].values())
    assert ex.verbose is False
    assert ex.options["maxRetriesOnFailure"] == 0
    assert ex.options["adjustForTimeDifference"] is True


def test_load_markets_limits_time_and_candles(fake: FakeBinance) -> None:
    fake.server_offset_ms = 4_000  # the server's clock is 4 s ahead of ours
    client = _sleeping(_exchange(fake), Recorder())
    ex = client.ccxt_exchange
    markets = ex.load_markets()
    assert set(markets) == {"BTC/USDT", "BNB/USDT"}
    assert ex.markets[SYMBOL]["precision"]["amount"] == 1e-05
    assert client.min_notional(SYMBOL) == 5.0
    assert client.min_amount(SYMBOL) == 1e-05
    # adjustForTimeDifference: load_markets measured the offset, so signed timestamps follow the server.
    assert -4_500 < ex.options["timeDifference"] < -3_500
    now = client.server_time_ms()
    assert abs(now - fake.server_ms()) < 1_000
    candles = client.fetch_closed_candle_batch(SYMBOL, now - 10 * 300_000, now)
    assert 9 <= len(candles) <= 10
    assert int(candles.ts_ms[-1]) + 300_000 <= now  # the forming candle is dropped
    assert client.fetch_balance()["USDT"]["free"] == 10_000.0
    assert client.fetch_ticker(SYMBOL)["last"] == 50_000.0  # ccxt reads /api/v3/ticker/24hr
    assert {r.path for r in fake.requests} <= {
        "/api/v3/ticker/24hr",
        "/api/v3/exchangeInfo",
        "/api/v3/time",
        "/api/v3/klines",
        "/api/v3/account",
    }


def test_settings_json_round_trip_builds_the_same_client(fake: FakeBinance) -> None:
    env = {
        "RITMO_EXCHANGE_CONFIG": json.dumps(fake.ccxt_config(timeout_ms=TIMEOUT_MS)),
        "RITMO_API_KEY": TEST_API_KEY,
        "RITMO_API_SECRET": TEST_API_SECRET,
    }
    ex = _sleeping(exchange_from_settings(load_settings(env, env_file=None)), Recorder())
    ex.ccxt_exchange.load_markets()
    assert ex.fetch_balance()["USDT"]["total"] == 10_000.0
    assert fake.requests_to("/api/v3/account")[0].signature_ok is True


# ---- orders --------------------------------------------------------------------------------------------


def test_market_buy_is_signed_sent_once_with_quantity_and_client_id(
    fake: FakeBinance, exchange: ExchangeClient
) -> None:
    cid = client_order_id(SYMBOL, CANDLE_TS, "BUY")
    qty = exchange.amount_to_precision(SYMBOL, 0.0123456)
    assert qty == 0.01234  # truncated to the 0.00001 step, never rounded up
    order = exchange.create_market_order(SYMBOL, "buy", qty, cid)

    posts = _order_posts(fake)
    assert len(posts) == 1
    sent = posts[0]
    assert sent.signature_ok is True
    assert sent.headers["X-MBX-APIKEY"] == TEST_API_KEY
    assert sent.params["type"] == "MARKET" and sent.params["side"] == "BUY"
    assert sent.params["quantity"] == "0.01234"
    assert sent.params["newClientOrderId"] == cid
    assert "quoteOrderQty" not in sent.params and "price" not in sent.params

    assert order["status"] == "closed" and order["filled"] == pytest.approx(0.01234)
    assert order["clientOrderId"] == cid
    assert order["average"] == pytest.approx(50_000.0)
    # Binance charges a buy's fee in the asset received (BTC) unless BNB pays it.
    assert order["fee"]["currency"] == "BTC"
    fee_quote = fee_to_quote(order["fee"], SYMBOL, order["average"])
    assert fee_quote == pytest.approx(0.001 * 0.01234 * 50_000.0)
    assert fake.balance("USDT")[0] == pytest.approx(10_000.0 - 0.01234 * 50_000.0)
    assert fake.balance("BTC")[0] == pytest.approx(0.01234 * 0.999)

    found = _sleeping(exchange, Recorder()).fetch_order_by_client_id(SYMBOL, cid)
    assert found is not None and found["id"] == order["id"] and found["status"] == "closed"
    trades = _sleeping(exchange, Recorder()).fetch_my_trades(SYMBOL, order_id=order["id"])
    assert [t["order"] for t in trades] == [order["id"]]
    assert _sleeping(exchange, Recorder()).fetch_order_by_client_id(SYMBOL, "rt-never-sent") is None


def test_bnb_fee_and_split_fills(fake: FakeBinance, exchange: ExchangeClient) -> None:
    fake.fee_asset = "BNB"
    fake.fills_per_order = 3
    fake.set_balance("BNB", 1.0)
    order = exchange.create_market_order(SYMBOL, "buy", 0.003, client_id=client_order_id(SYMBOL, CANDLE_TS, "BUY"))
    trades = _sleeping(exchange, Recorder()).fetch_my_trades(SYMBOL, order_id=order["id"])
    assert len(trades) == 3 and sum(t["amount"] for t in trades) == pytest.approx(0.003)
    assert {t["fee"]["currency"] for t in trades} == {"BNB"}
    fee_quote = sum(fee_to_quote(t["fee"], SYMBOL, t["price"], {"BNB": 600.0}) for t in trades)
    assert fee_quote == pytest.approx(0.00075 * order["cost"], rel=1e-3)
    with pytest.raises(ValueError, match="BNB"):
        fee_to_quote(trades[0]["fee"], SYMBOL, trades[0]["price"])


@pytest.mark.parametrize(
    ("qty", "ccxt_class", "code"),
    [
        (0.00005, ccxt.BadRequest, "NOTIONAL"),  # 2.5 USDT < 5 USDT: -1013 as BadRequest
        (150.0, ccxt.InvalidOrder, "MARKET_LOT_SIZE"),  # ccxt: any body with LOT_SIZE is InvalidOrder
        (1.0, ccxt.InsufficientFunds, "insufficient balance"),  # 50,000 USDT > 10,000
    ],
)
def test_refused_orders_are_rejected_not_ambiguous(
    fake: FakeBinance, exchange: ExchangeClient, qty: float, ccxt_class: type[Exception], code: str
) -> None:
    cid = client_order_id(SYMBOL, CANDLE_TS, "BUY")
    with pytest.raises(ccxt_class, match=code) as raw:
        exchange.ccxt_exchange.create_order(SYMBOL, "market", "buy", qty, None, {"newClientOrderId": cid})
    assert classify_order_error(raw.value) == "rejected"
    with pytest.raises(OperationalExchangeError) as ours:
        exchange.create_market_order(SYMBOL, "buy", qty, cid)
    assert ours.value.order_outcome == "rejected"  # type: ignore[attr-defined]
    assert fake.orders == [] and len(_order_posts(fake)) == 2


@pytest.mark.parametrize(
    ("fault", "ccxt_class"),
    [
        ("500_after_execute", "ExchangeNotAvailable"),
        ("1007_after_execute", "RequestTimeout"),
        ("timeout_after_execute", "RequestTimeout"),
        ("reset_after_execute", "NetworkError"),
    ],
)
def test_executed_but_failed_answer_is_ambiguous_and_found_by_lookup(
    fake: FakeBinance, exchange: ExchangeClient, fault: str, ccxt_class: str
) -> None:
    cid = client_order_id(SYMBOL, CANDLE_TS, "BUY")
    fake.fail_next_order(fault)
    with pytest.raises(TemporaryExchangeError) as info:
        exchange.create_market_order(SYMBOL, "buy", 0.01, cid)
    assert info.value.order_outcome == "ambiguous"  # type: ignore[attr-defined]
    assert info.value.ccxt_error == ccxt_class  # type: ignore[attr-defined]
    # The caller looks the order up by its client id before anything else: it executed.
    found = _sleeping(exchange, Recorder()).fetch_order_by_client_id(SYMBOL, cid)
    assert found is not None and found["status"] == "closed" and found["filled"] == pytest.approx(0.01)
    assert len(fake.orders) == 1 and len(_order_posts(fake)) == 1
    assert fake.balance("USDT")[0] == pytest.approx(10_000.0 - 500.0)


def test_timeout_before_execution_is_ambiguous_and_lookup_finds_nothing(
    fake: FakeBinance, exchange: ExchangeClient
) -> None:
    cid = client_order_id(SYMBOL, CANDLE_TS, "SELL")
    fake.fail_next_order("timeout")
    with pytest.raises(TemporaryExchangeError) as info:
        exchange.create_market_order(SYMBOL, "buy", 0.01, cid)
    assert info.value.order_outcome == "ambiguous"  # type: ignore[attr-defined]
    assert _sleeping(exchange, Recorder()).fetch_order_by_client_id(SYMBOL, cid) is None
    assert fake.orders == []


def test_a_filled_orders_client_id_can_be_reused_so_only_the_lookup_prevents_doubles(
    fake: FakeBinance, exchange: ExchangeClient
) -> None:
    cid = client_order_id(SYMBOL, CANDLE_TS, "BUY")
    first = exchange.create_market_order(SYMBOL, "buy", 0.01, cid)
    second = exchange.create_market_order(SYMBOL, "buy", 0.02, cid)  # Binance accepts it: not open any more
    assert first["id"] != second["id"] and len(fake.orders) == 2
    found = _sleeping(exchange, Recorder()).fetch_order_by_client_id(SYMBOL, cid)
    assert found is not None and found["id"] == second["id"]


# ---- authentication, rate limits, clock ------------------------------------------------------------------


def test_wrong_key_is_an_authentication_error(fake: FakeBinance) -> None:
    sleep = Recorder()
    ex = _sleeping(_exchange(fake, key="WrongKey" + "x" * 56), sleep)
    ex.ccxt_exchange.load_markets()
    with pytest.raises(AuthenticationExchangeError) as info:
        ex.fetch_balance()
    assert info.value.exit_code == EXIT_NOPERM
    assert sleep.delays == []  # not retried
    assert fake.requests_to("/api/v3/account")[0].status == 401


def test_wrong_secret_fails_the_signature_check(fake: FakeBinance) -> None:
    ex = _sleeping(_exchange(fake, secret="WrongSecret" + "y" * 53), Recorder())
    ex.ccxt_exchange.load_markets()
    with pytest.raises(AuthenticationExchangeError, match="AuthenticationError"):
        ex.fetch_balance()
    assert fake.requests_to("/api/v3/account")[0].signature_ok is False


def test_revoked_key_after_a_success_is_retried_once_then_auth(fake: FakeBinance, exchange: ExchangeClient) -> None:
    _sleeping(exchange, Recorder()).fetch_balance()  # a private call succeeded: ccxt now says DDoSProtection on -2015
    fake.key_enabled = False
    with pytest.raises(ccxt.DDoSProtection, match="-2015"):
        exchange.ccxt_exchange.fetch_balance()
    sleep = Recorder()
    with capture_logs() as logs, pytest.raises(AuthenticationExchangeError, match="-2015"):
        _sleeping(exchange, sleep).fetch_balance()
    assert len(sleep.delays) == 1
    assert len(fake.requests_to("/api/v3/account")) == 1 + 1 + 2
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["exchange_invalid_key"]
    # An order refused this way certainly did not execute; one -2015 alone does not stop the daemon.
    with pytest.raises(TemporaryExchangeError) as order_err:
        exchange.create_market_order(SYMBOL, "buy", 0.01, client_order_id(SYMBOL, CANDLE_TS, "BUY"))
    assert order_err.value.order_outcome == "rejected"  # type: ignore[attr-defined]
    assert fake.orders == []


@pytest.mark.parametrize(("status", "reason"), [("429", "rate_limited"), ("418", "ip_banned")])
def test_retry_after_is_honoured(fake: FakeBinance, exchange: ExchangeClient, status: str, reason: str) -> None:
    fake.fail_next("/api/v3/account", status, retry_after_s=7)
    sleep = Recorder()
    with capture_logs() as logs:
        balance = _sleeping(exchange, sleep).fetch_balance()
    assert balance["USDT"]["free"] == 10_000.0
    assert sleep.delays == [7.0]
    backoff = [e for e in logs if e["event"] == "exchange_backoff"]
    assert len(backoff) == 1
    assert backoff[0]["status"] == int(status) and backoff[0]["reason"] == reason
    assert backoff[0]["retry_after_s"] == 7.0


def test_long_ip_ban_is_not_slept_through(fake: FakeBinance, exchange: ExchangeClient) -> None:
    fake.fail_next("/api/v3/account", "418", retry_after_s=3_600)
    sleep = Recorder()
    with pytest.raises(TemporaryExchangeError, match="Retry-After 3600") as info:
        _sleeping(exchange, sleep).fetch_balance()
    assert info.value.retry_after_s == 3_600.0  # type: ignore[attr-defined]
    assert sleep.delays == []


def test_invalid_nonce_resyncs_the_clock_and_retries_once(fake: FakeBinance, exchange: ExchangeClient) -> None:
    fake.server_offset_ms = 30_000  # the server's clock jumped 30 s ahead: our timestamps fall out of recvWindow
    sleep = Recorder()
    with capture_logs() as logs:
        balance = _sleeping(exchange, sleep).fetch_balance()
    assert balance["USDT"]["free"] == 10_000.0
    assert sleep.delays == []  # the retry after a resync is immediate
    accounts = fake.requests_to("/api/v3/account")
    assert [r.status for r in accounts] == [400, 200]
    assert -30_500 < exchange.ccxt_exchange.options["timeDifference"] < -29_500
    assert [e["event"] for e in logs] == ["exchange_time_resync"]
    # An order refused for its timestamp never reached the matching engine.
    assert classify_order_error(ccxt.InvalidNonce('binance {"code":-1021,"msg":"..."}')) == "rejected"


def test_key_permissions(fake: FakeBinance, exchange: ExchangeClient) -> None:
    perms = _sleeping(exchange, Recorder()).check_key_permissions()
    assert perms == {
        "checked": True,
        "can_withdraw": False,
        "can_trade_spot": True,
        "can_trade_futures": False,
        "can_transfer": False,
        "ip_restricted": True,
    }
    fake.can_withdraw = True
    with pytest.raises(AuthenticationExchangeError, match="can withdraw") as info:
        _sleeping(exchange, Recorder()).check_key_permissions()
    assert info.value.exit_code == EXIT_NOPERM


# ---- secrets ---------------------------------------------------------------------------------------------


def test_key_and_secret_never_appear_in_logs_errors_or_output(
    fake: FakeBinance, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)  # the root at DEBUG: ccxt's own logger must still stay at INFO
    config = fake.ccxt_config(timeout_ms=TIMEOUT_MS)
    config["verbose"] = True  # would print() every request with its headers: make_exchange turns it off
    errors: list[BaseException] = []
    with capture_logs() as logs:
        ex = make_exchange("binance", config, api_key=TEST_API_KEY, api_secret=TEST_API_SECRET)
        ex.ccxt_exchange.load_markets()
        cid = client_order_id(SYMBOL, CANDLE_TS, "BUY")
        ex.create_market_order(SYMBOL, "buy", 0.01, cid)
        _sleeping(ex, Recorder()).fetch_my_trades(SYMBOL)
        fake.fail_next("/api/v3/account", "429", retry_after_s=1)
        fake.fail_next("/api/v3/account", "500")
        _sleeping(ex, Recorder(), rng=lambda: 0.0).fetch_balance()
        for fault in ("500_after_execute", "timeout_after_execute", "reset_after_execute"):
            fake.fail_next_order(fault)
            try:
                ex.create_market_order(SYMBOL, "buy", 0.01, cid)
            except TemporaryExchangeError as exc:
                errors.append(exc)
        for qty in (0.00005, 1.0):
            try:
                ex.create_market_order(SYMBOL, "buy", qty, cid)
            except OperationalExchangeError as exc:
                errors.append(exc)
        fake.server_offset_ms = 30_000
        _sleeping(ex, Recorder()).fetch_balance()
        fake.key_enabled = False
        try:
            _sleeping(ex, Recorder()).fetch_balance()
        except AuthenticationExchangeError as exc:
            errors.append(exc)
        bad = make_exchange("binance", config, api_key="Wrong" + "k" * 59, api_secret=TEST_API_SECRET)
        try:
            _sleeping(bad, Recorder()).fetch_balance()
        except AuthenticationExchangeError as exc:
            errors.append(exc)
    assert len(errors) == 7
    out = capsys.readouterr()
    texts = [out.out, out.err, caplog.text, *(json.dumps(e, default=str) for e in logs)]
    for exc in errors:
        texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
        if exc.__context__ is not None:  # suppressed by `from None`, but still reachable
            texts.append(str(exc.__context__))
    blob = "\n".join(texts)
    assert TEST_API_KEY not in blob and TEST_API_SECRET not in blob
    assert "exchange_backoff" in blob and "exchange_time_resync" in blob  # the paths did run
    assert not any(r.name.startswith("ccxt") and r.levelno < logging.INFO for r in caplog.records)
