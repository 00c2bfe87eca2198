"""The exchange boundary: ccxt error mapping, read retries (backoff, Retry-After, resync), order helpers,
the circuit breaker, make_exchange, and the fake exchange's orders and balances."""

from __future__ import annotations

import json
import random
import socket
from typing import Any

import ccxt
import numpy as np
import pandas as pd
import pytest
from structlog.testing import capture_logs

from bot.brokers.base import client_order_id
from bot.errors import (
    EXIT_NOPERM,
    EXIT_RUNTIME,
    AuthenticationExchangeError,
    ConfigError,
    OperationalExchangeError,
    TemporaryExchangeError,
)
from bot.exchange.breaker import CircuitBreaker
from bot.exchange.client import (
    MAX_MESSAGE_CHARS,
    ExchangeClient,
    classify_order_error,
    fee_to_quote,
    is_invalid_key_error,
    make_exchange,
    map_ccxt_error,
    redact,
    retry_after_s,
    retry_read,
)
from strategies.candles import CANDLE_MS
from tests.fake_exchange import FakeExchange, binance_error

ATTEMPTS = 5
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def _candles(n: int) -> pd.DataFrame:
    ts = [T0 + i * CANDLE_MS for i in range(n)]
    return pd.DataFrame({"ts_ms": ts, "open": 100.0, "high": 102.0, "low": 99.0, "close": 101.0, "volume": 5.0})


# ccxt exception in -> our error class and the number of calls retry_read makes (attempts=5).
ERROR_TABLE = [
    (ccxt.RequestTimeout, TemporaryExchangeError, ATTEMPTS),
    (ccxt.NetworkError, TemporaryExchangeError, ATTEMPTS),
    (ccxt.ExchangeNotAvailable, TemporaryExchangeError, ATTEMPTS),
    (ccxt.OnMaintenance, TemporaryExchangeError, ATTEMPTS),
    (ccxt.RateLimitExceeded, TemporaryExchangeError, ATTEMPTS),
    (ccxt.DDoSProtection, TemporaryExchangeError, ATTEMPTS),
    (ccxt.InvalidNonce, TemporaryExchangeError, ATTEMPTS),
    (ccxt.BadResponse, TemporaryExchangeError, ATTEMPTS),
    (ccxt.NullResponse, TemporaryExchangeError, ATTEMPTS),
    (ccxt.AuthenticationError, AuthenticationExchangeError, 1),
    (ccxt.PermissionDenied, AuthenticationExchangeError, 1),
    (ccxt.AccountSuspended, AuthenticationExchangeError, 1),
    (ccxt.AccountNotEnabled, AuthenticationExchangeError, 1),
    (ccxt.BadSymbol, OperationalExchangeError, 1),
    (ccxt.BadRequest, OperationalExchangeError, 1),
    (ccxt.InvalidOrder, OperationalExchangeError, 1),
    (ccxt.OrderNotFound, OperationalExchangeError, 1),
    (ccxt.InsufficientFunds, OperationalExchangeError, 1),
    (ccxt.NotSupported, OperationalExchangeError, 1),
    (ccxt.ExchangeError, OperationalExchangeError, 1),
    (ccxt.BaseError, OperationalExchangeError, 1),
]


class Recorder:
    """Injected sleep: records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.mark.parametrize(("ccxt_class", "ours", "calls"), ERROR_TABLE, ids=[row[0].__name__ for row in ERROR_TABLE])
def test_error_map_and_retry_count(ccxt_class: type[Exception], ours: type[Exception], calls: int) -> None:
    count = 0

    def always_fails() -> None:
        nonlocal count
        count += 1
        raise ccxt_class("binance GET https://api.binance.com/api/v3/klines 503 oops")

    sleep = Recorder()
    with pytest.raises(ours) as info:
        retry_read(always_fails, attempts=ATTEMPTS, sleep=sleep, rng=lambda: 1.0)
    assert type(info.value) is ours
    assert count == calls
    assert len(sleep.delays) == calls - 1
    assert ccxt_class.__name__ in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is None
    assert type(map_ccxt_error(ccxt_class("x"))) is ours
    assert info.value.exit_code == (EXIT_NOPERM if ours is AuthenticationExchangeError else EXIT_RUNTIME)


def test_rate_limit_siblings_are_both_temporary() -> None:
    # The trap: neither is a subclass of the other, so catching one would miss the other.
    assert not issubclass(ccxt.RateLimitExceeded, ccxt.DDoSProtection)
    assert not issubclass(ccxt.DDoSProtection, ccxt.RateLimitExceeded)
    # And in ccxt 4.5 NetworkError is not a ccxt.ExchangeError: the table must not rely on that.
    assert not issubclass(ccxt.NetworkError, ccxt.ExchangeError)


def test_retry_succeeds_after_transient_errors() -> None:
    outcomes: list[object] = [ccxt.RequestTimeout("t1"), ccxt.ExchangeNotAvailable("502"), 42]

    def flaky() -> object:
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out

    sleep = Recorder()
    with capture_logs() as logs:
        assert retry_read(flaky, sleep=sleep, rng=lambda: 1.0, op="fetch_thing") == 42
    assert sleep.delays == [1.0, 2.0]
    retries = [e for e in logs if e["event"] == "exchange_retry"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert retries[0]["op"] == "fetch_thing"
    assert retries[0]["error_class"] == "RequestTimeout"
    assert retries[1]["error_class"] == "ExchangeNotAvailable"
    assert retries[1]["delay_s"] == 2.0
    assert retries[0]["log_level"] == "warning"


def test_backoff_grows_is_capped_and_jittered() -> None:
    def fails() -> None:
        raise ccxt.NetworkError("down")

    sleep = Recorder()
    with pytest.raises(TemporaryExchangeError, match="gave up after 8 attempts"):
        retry_read(fails, attempts=8, base_delay_s=1.0, max_delay_s=30.0, sleep=sleep, rng=lambda: 1.0)
    assert sleep.delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]

    # Full jitter: each delay uniform in [0, cap], so never above the cap.
    jitter = Recorder()
    rng = random.Random(7).random
    with pytest.raises(TemporaryExchangeError):
        retry_read(fails, attempts=8, base_delay_s=1.0, max_delay_s=30.0, sleep=jitter, rng=rng)
    caps = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert all(0.0 <= d <= cap for d, cap in zip(jitter.delays, caps, strict=True))
    assert jitter.delays != caps


def test_non_ccxt_exceptions_are_not_retried_or_mapped() -> None:
    count = 0

    def bug() -> None:
        nonlocal count
        count += 1
        raise KeyError("programming error")

    with pytest.raises(KeyError):
        retry_read(bug, sleep=Recorder())
    assert count == 1


def test_messages_never_carry_credentials() -> None:
    key = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
    message = (
        "binance GET https://api.binance.com/api/v3/account?timestamp=1704067200000&recvWindow=5000"
        "&signature=c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71 "
        f'{{"X-MBX-APIKEY": "{key}", "apiKey": "{key}", "secret": "s3cr3t-value"}} '
        "api_key=abcdef123 " + "x" * 1000
    )
    err = map_ccxt_error(ccxt.AuthenticationError(message))
    text = str(err)
    assert key not in text
    assert "c8db56825ae7" not in text
    assert "s3cr3t-value" not in text
    assert "abcdef123" not in text
    assert "signature=***" in text
    assert len(text) < MAX_MESSAGE_CHARS + 100
    # Exact secret values are removed wherever they appear, even in free text.
    assert "MYSECRETKEY123" not in redact("key MYSECRETKEY123 rejected", secrets=["MYSECRETKEY123"])


def test_exchange_credentials_are_redacted_in_retries() -> None:
    fake = FakeExchange(_candles(10))
    fake.apiKey = "FAKEAPIKEY-0123456789"
    fake.fail_next("fetch_ohlcv", ccxt.NetworkError(f"binance GET ... key {fake.apiKey} failed"), times=5)
    with capture_logs() as logs, pytest.raises(TemporaryExchangeError) as info:
        ExchangeClient(fake, sleep=Recorder()).fetch_ohlcv_page("BTC/USDT", "5m", T0)
    assert fake.apiKey not in str(info.value)
    assert all(fake.apiKey not in str(e) for e in logs)
    assert fake.calls["fetch_ohlcv"] == 5


# ---- make_exchange (no network: constructing a ccxt exchange sends nothing) ------------------------


def test_make_exchange_settings_and_merge() -> None:
    config = {"timeout": 12_345, "options": {"defaultType": "future", "recvWindow": 7000}}
    client = make_exchange("binance", config)
    assert isinstance(client, ExchangeClient) and client.id == "binance"
    ex = client.ccxt_exchange
    assert isinstance(ex, ccxt.binance)
    assert ex.enableRateLimit is True
    assert ex.options["maxRetriesOnFailure"] == 0
    assert ex.timeout == 12_345
    assert ex.options["defaultType"] == "future"
    assert ex.options["recvWindow"] == 7000
    # ccxt's own default options survive the merge.
    assert "fetchCurrencies" in ex.options
    assert make_exchange("binance").ccxt_exchange.options["maxRetriesOnFailure"] == 0


@pytest.mark.parametrize(
    ("exchange_id", "config", "match"),
    [
        ("binanse", None, "unknown exchange id 'binanse' \\(did you mean binance"),
        ("binance", {"options": {"maxRetriesOnFailure": 3}}, "maxRetriesOnFailure must be 0"),
        ("binance", {"enableRateLimit": False}, "enableRateLimit must stay true"),
        ("binance", {"options": "nope"}, "'options' must be a JSON object"),
    ],
)
def test_make_exchange_refuses(exchange_id: str, config: dict | None, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_exchange(exchange_id, config)


# ---- reads against the fake exchange -----------------------------------------------------------------


def test_fetch_closed_candle_batch_drops_forming_and_pages() -> None:
    fake = FakeExchange(_candles(2_500), now_ms=T0 + 2_499 * CANDLE_MS + 60_000)
    raw = fake.fetch_ohlcv("BTC/USDT", "5m", since=T0 + 2_490 * CANDLE_MS, limit=1000)
    assert raw[-1][0] == T0 + 2_499 * CANDLE_MS  # the fake serves the forming candle, as Binance does
    assert raw[-1][4] != 101.0  # ... with a partial close
    batch = ExchangeClient(fake, sleep=Recorder()).fetch_closed_candle_batch("BTC/USDT", T0, fake.now_ms)
    assert len(batch) == 2_499
    assert batch.ts_ms[-1] == T0 + 2_498 * CANDLE_MS
    assert bool((np.diff(batch.ts_ms) > 0).all())  # unique and increasing
    limits = [kw["limit"] for name, kw in fake.call_log if name == "fetch_ohlcv"]
    assert all(limit <= 1000 for limit in limits)
    assert fake.calls["fetch_ohlcv"] == 1 + 3


def test_bad_symbol_is_operational_and_not_retried() -> None:
    fake = FakeExchange(_candles(10))
    sleep = Recorder()
    with pytest.raises(OperationalExchangeError, match="BadSymbol"):
        ExchangeClient(fake, sleep=sleep).fetch_ohlcv_page("NOPE/USDT", "5m", T0)
    assert fake.calls["fetch_ohlcv"] == 1
    assert sleep.delays == []


def test_server_time_ms_is_retried() -> None:
    fake = FakeExchange(_candles(10), now_ms=T0 + 123_456)
    fake.fail_next("fetch_time", ccxt.RequestTimeout, times=2)
    sleep = Recorder()
    assert ExchangeClient(fake, sleep=sleep, rng=lambda: 0.5).server_time_ms() == T0 + 123_456
    assert fake.calls["fetch_time"] == 3
    assert sleep.delays == [0.5, 1.0]


def test_fake_fail_next_after_lets_calls_through_first() -> None:
    fake = FakeExchange(_candles(10))
    fake.fail_next("fetch_time", ccxt.ExchangeNotAvailable, times=1, after=2)
    fake.fetch_time()
    fake.fetch_time()
    with pytest.raises(ccxt.ExchangeNotAvailable):
        fake.fetch_time()
    assert fake.fetch_time() == fake.now_ms
    assert fake.calls["fetch_time"] == 4


def test_quick_ticker_read_gives_up_after_two_attempts() -> None:
    fake = FakeExchange(_candles(10))
    fake.fail_next("fetch_ticker", ccxt.RequestTimeout, times=5)
    sleep = Recorder()
    client = ExchangeClient(fake, sleep=sleep, rng=lambda: 1.0)
    with pytest.raises(TemporaryExchangeError, match="gave up after 2 attempts"):
        client.fetch_ticker("BTC/USDT", quick=True)
    assert fake.calls["fetch_ticker"] == 2 and sleep.delays == [0.5]
    assert client.fetch_ticker("BTC/USDT")["last"] > 0  # the ordinary read retries through the other three
    assert fake.calls["fetch_ticker"] == 2 + 4 and sleep.delays == [0.5, 1.0, 2.0, 4.0]


class SettingsFake(FakeExchange):
    """FakeExchange with the futures account settings (recorded, failures injectable)."""

    def set_margin_mode(self, margin_mode: str, symbol: str | None = None, params: dict | None = None) -> dict:
        self._enter("set_margin_mode", margin_mode=margin_mode, symbol=symbol)
        return {}

    def set_leverage(self, leverage: int, symbol: str | None = None, params: dict | None = None) -> dict:
        self._enter("set_leverage", leverage=leverage, symbol=symbol)
        return {}


def test_account_settings_are_sent_once_and_already_set_is_success() -> None:
    fake = SettingsFake(_candles(1))
    fake.apiKey = "SETTINGSKEY-0123456789"
    client = ExchangeClient(fake, sleep=Recorder())
    assert client.set_margin_mode("isolated", "BTC/USDT") is True
    assert client.set_leverage(1, "BTC/USDT") is True
    no_change = 'binanceusdm {"code":-4046,"msg":"No need to change margin type."}'
    fake.fail_next("set_margin_mode", ccxt.MarginModeAlreadySet(no_change))
    assert client.set_margin_mode("isolated", "BTC/USDT") is False
    fake.fail_next("set_leverage", ccxt.RequestTimeout(f"binanceusdm key {fake.apiKey} timed out"))
    with pytest.raises(TemporaryExchangeError) as info:
        client.set_leverage(1, "BTC/USDT")
    assert fake.apiKey not in str(info.value) and info.value.__cause__ is None
    assert (fake.calls["set_margin_mode"], fake.calls["set_leverage"]) == (2, 2)  # a write is never retried
    with pytest.raises(ConfigError, match="cannot read the position mode"):
        client.fetch_position_mode("BTC/USDT")  # the spot fake has no fetch_position_mode


# ---- the new error-map rows: Retry-After, -2015, InvalidNonce (exception in -> our error, calls, sleeps) ---

INVALID_KEY_MSG = 'binance {"code":-2015,"msg":"Invalid API-key, IP, or permissions for action."}'


@pytest.mark.parametrize(
    ("setup", "ours", "calls", "delays", "resyncs"),
    [
        # 429 with Retry-After: wait exactly that long, then succeed.
        (lambda f: f.rate_limit_next("fetch_time", 3), None, 2, [3.0], 0),
        # 418 (IP banned) with Retry-After: the same, twice.
        (lambda f: f.rate_limit_next("fetch_time", 4, status=418, times=2), None, 3, [4.0, 4.0], 0),
        # 418 without Retry-After: never guess short, wait the cap (max_delay_s = 30).
        (lambda f: f.fail_next("fetch_time", "ip_banned"), None, 2, [30.0], 0),
        # RateLimitExceeded (-1003/-1015 by code) with a Retry-After header: honoured too.
        (lambda f: f.fail_next("fetch_time", ccxt.RateLimitExceeded, retry_after_s=2), None, 2, [2.0], 0),
        # A Retry-After longer than max_retry_after_s (60) is not slept through.
        (lambda f: f.rate_limit_next("fetch_time", 900, status=418), TemporaryExchangeError, 1, [], 0),
        # -2015 as DDoSProtection (ccxt, after a private call succeeded): once temporary, twice auth.
        (lambda f: f.fail_next("fetch_time", "invalid_key_after_auth", 5), AuthenticationExchangeError, 2, [1.0], 0),
        (lambda f: f.fail_next("fetch_time", "invalid_key_after_auth", 1), None, 2, [1.0], 0),
        # -2015 as AuthenticationError (before any private call succeeded) or PermissionDenied: auth at once.
        (lambda f: f.fail_next("fetch_time", "invalid_key", 5), AuthenticationExchangeError, 1, [], 0),
        (
            lambda f: f.fail_next("fetch_time", ccxt.PermissionDenied(INVALID_KEY_MSG)),
            AuthenticationExchangeError,
            1,
            [],
            0,
        ),
        # InvalidNonce (-1021): resync the clock once, retry at once.
        (lambda f: f.fail_next("fetch_time", "nonce"), None, 2, [], 1),
        # ... a clock that stays off: one resync, then the ordinary backoff until the attempts run out.
        (lambda f: f.fail_next("fetch_time", "nonce", 9), TemporaryExchangeError, 5, [2.0, 4.0, 8.0], 1),
    ],
    ids=[
        "429-retry-after",
        "418-retry-after",
        "418-no-header",
        "rate-limit-exceeded-header",
        "418-too-long",
        "2015-repeated",
        "2015-once",
        "2015-authentication-error",
        "2015-permission-denied",
        "invalid-nonce-once",
        "invalid-nonce-persistent",
    ],
)
def test_error_map_new_rows(
    setup: Any, ours: type[Exception] | None, calls: int, delays: list[float], resyncs: int
) -> None:
    fake = FakeExchange(_candles(10), now_ms=T0 + 123_456)
    setup(fake)
    sleep = Recorder()
    if ours is None:
        assert retry_read(fake.fetch_time, sleep=sleep, rng=lambda: 1.0) == T0 + 123_456
    else:
        with pytest.raises(ours) as info:
            retry_read(fake.fetch_time, sleep=sleep, rng=lambda: 1.0)
        assert type(info.value) is ours and info.value.__cause__ is None
    assert fake.calls["fetch_time"] == calls
    assert sleep.delays == delays
    assert fake.calls["load_time_difference"] == resyncs


def test_retry_after_logs_exchange_backoff_and_carries_the_wait() -> None:
    fake = FakeExchange(_candles(10))
    fake.rate_limit_next("fetch_time", 5)
    with capture_logs() as logs:
        retry_read(fake.fetch_time, sleep=Recorder())
    (event,) = [e for e in logs if e["event"] == "exchange_backoff"]
    assert event["status"] == 429 and event["retry_after_s"] == 5.0 and event["delay_s"] == 5.0
    assert event["reason"] == "rate_limited" and event["log_level"] == "warning"
    fake.rate_limit_next("fetch_time", 3_600, status=418)
    with pytest.raises(TemporaryExchangeError) as info:
        retry_read(fake.fetch_time, sleep=Recorder())
    assert info.value.retry_after_s == 3_600.0  # type: ignore[attr-defined]


def test_retry_after_parsing() -> None:
    fake = FakeExchange(_candles(10))
    exc = binance_error("rate_limit")
    fake.last_response_headers = {"retry-after": "12"}  # header names are case-insensitive
    assert retry_after_s(fake, exc) == (429, 12.0)
    fake.last_response_headers = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}  # a date in the past
    assert retry_after_s(fake, exc) == (429, 0.0)
    fake.last_response_headers = {"Retry-After": "soon"}
    assert retry_after_s(fake, exc) == (429, None)
    # Only rate-limit errors look at the headers (they may be stale for anything else).
    fake.last_response_headers = {"Retry-After": "12"}
    assert retry_after_s(fake, ccxt.RequestTimeout("x")) == (None, None)
    assert retry_after_s(None, binance_error("ip_banned")) == (418, None)


def test_invalid_key_detection() -> None:
    assert is_invalid_key_error(ccxt.DDoSProtection(INVALID_KEY_MSG))
    assert is_invalid_key_error(AuthenticationExchangeError("... -2015 ..."))
    assert not is_invalid_key_error(ccxt.DDoSProtection('binance {"code":-20150}'))
    assert not is_invalid_key_error(ccxt.ExchangeError("price 12-2015.5"))


# ---- classify_order_error ----------------------------------------------------------------------------------

ORDER_OUTCOMES = [
    # certainly not executed
    (ccxt.BadRequest('binance {"code":-1013,"msg":"Filter failure: NOTIONAL"}'), "rejected"),
    (ccxt.InvalidOrder('binance ... {"code":-1013,"msg":"Filter failure: LOT_SIZE"}'), "rejected"),
    (ccxt.BadRequest('binance {"code":-1111,"msg":"Parameter \'quantity\' has too much precision."}'), "rejected"),
    (binance_error("insufficient"), "rejected"),
    (ccxt.BadSymbol("binance does not have market symbol XXX/USDT"), "rejected"),
    (ccxt.MarketClosed('binance {"code":-1013,"msg":"Market is closed."}'), "rejected"),
    (ccxt.OrderImmediatelyFillable("x"), "rejected"),
    (ccxt.ArgumentsRequired("binance createOrder() requires a side"), "rejected"),
    (ccxt.NotSupported("x"), "rejected"),
    (binance_error("nonce"), "rejected"),
    (binance_error("rate_limit"), "rejected"),
    (binance_error("ip_banned"), "rejected"),
    (ccxt.RateLimitExceeded('binance {"code":-1015,"msg":"Too many new orders"}'), "rejected"),
    (binance_error("invalid_key_after_auth"), "rejected"),  # -2015 as DDoSProtection: see the rule
    # may have executed: look it up by client id first
    (binance_error("timeout"), "ambiguous"),
    (binance_error("500"), "ambiguous"),
    (binance_error("1007"), "ambiguous"),
    (binance_error("reset"), "ambiguous"),
    (ccxt.OperationFailed('binance {"code":-1006,"msg":"... Execution status unknown."}'), "ambiguous"),
    (ccxt.ExchangeError('binance {"code":-1007,"msg":"... Send status unknown ..."}'), "ambiguous"),
    (ccxt.InvalidOrder("binance ... status unknown"), "ambiguous"),  # the text wins over the class
    (ccxt.OnMaintenance("binance System is under maintenance."), "ambiguous"),
    (ccxt.BadResponse("binance returned garbage"), "ambiguous"),
    (ccxt.DuplicateOrderId("binance duplicate order sent"), "ambiguous"),
    (ccxt.ExchangeError('binance {"code":-9999,"msg":"new, unknown"}'), "ambiguous"),
    (ConnectionResetError(104, "Connection reset by peer"), "ambiguous"),
    (TemporaryExchangeError("mapped already"), "ambiguous"),
    # stop: the key is refused
    (binance_error("invalid_key"), "auth"),
    (ccxt.PermissionDenied("binance This account may not place or cancel orders."), "auth"),
    (ccxt.AccountSuspended("x"), "auth"),
    (AuthenticationExchangeError("mapped already"), "auth"),
]


@pytest.mark.parametrize(("exc", "outcome"), ORDER_OUTCOMES, ids=[f"{type(e).__name__}-{o}" for e, o in ORDER_OUTCOMES])
def test_classify_order_error(exc: BaseException, outcome: str) -> None:
    assert classify_order_error(exc) == outcome


def test_create_market_order_is_never_retried_and_carries_the_outcome() -> None:
    fake = FakeExchange(_candles(10))
    client = ExchangeClient(fake)
    fake.fail_next("create_order", ccxt.RequestTimeout)
    with pytest.raises(TemporaryExchangeError) as info:
        client.create_market_order("BTC/USDT", "buy", 0.01, client_order_id("BTC/USDT", T0, "BUY"))
    assert info.value.order_outcome == "ambiguous"  # type: ignore[attr-defined]
    assert fake.calls["create_order"] == 1 and fake.orders == []
    for bad in ({"side": "long"}, {"client_id": "has space"}, {"qty": 0.0}):
        kwargs = {"side": "buy", "qty": 0.01, "client_id": "rt-ok"} | bad
        with pytest.raises(ValueError):
            client.create_market_order("BTC/USDT", kwargs["side"], kwargs["qty"], kwargs["client_id"])
    assert fake.calls["create_order"] == 1


# ---- client order ids, precision, fees ----------------------------------------------------------------------


def test_amount_precision_and_limits_from_the_market() -> None:
    client = ExchangeClient(FakeExchange(_candles(10)))
    assert client.amount_to_precision("BTC/USDT", 0.0123499) == 0.01234
    assert client.amount_to_precision("BTC/USDT", 0.000009) == 0.0  # below one step: ccxt raises, we say 0
    assert client.amount_to_precision("BTC/USDT", -1.0) == 0.0
    assert client.min_notional("BTC/USDT") == 5.0
    assert client.min_amount("BTC/USDT") == 1e-05
    real = make_exchange("binance")
    real.ccxt_exchange.markets = None
    real.ccxt_exchange.set_markets([FAKE_MARKET_FOR_REAL])
    assert real.amount_to_precision("BTC/USDT", 0.0123499) == 0.01234


FAKE_MARKET_FOR_REAL = {
    "id": "BTCUSDT",
    "symbol": "BTC/USDT",
    "base": "BTC",
    "quote": "USDT",
    "type": "spot",
    "spot": True,
    "precision": {"amount": 1e-05, "price": 0.01},
    "limits": {"amount": {"min": 1e-05}, "cost": {"min": 5.0}},
}


@pytest.mark.parametrize(
    ("fee", "expected"),
    [
        ({"cost": 0.5, "currency": "USDT"}, 0.5),
        ({"cost": 0.00001, "currency": "BTC"}, 0.00001 * 50_000.0),
        ({"cost": 0.001, "currency": "BNB"}, 0.001 * 600.0),
        ({"cost": 0.0, "currency": "XYZ"}, 0.0),
        ({"cost": None, "currency": "USDT"}, 0.0),
        (None, 0.0),
    ],
)
def test_fee_to_quote(fee: dict | None, expected: float) -> None:
    assert fee_to_quote(fee, "BTC/USDT", 50_000.0, {"BNB": 600.0}) == pytest.approx(expected)


def test_fee_to_quote_needs_a_rate_and_handles_futures_symbols() -> None:
    with pytest.raises(ValueError, match="BNB"):
        fee_to_quote({"cost": 0.001, "currency": "BNB"}, "BTC/USDT", 50_000.0)
    assert fee_to_quote({"cost": 0.2, "currency": "USDT"}, "BTC/USDT:USDT", 50_000.0) == 0.2


# ---- circuit breaker -----------------------------------------------------------------------------------------


class Clock:
    """Injected epoch-ms clock."""

    def __init__(self, now_ms: int = 0) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def test_circuit_breaker_state_machine() -> None:
    clock = Clock(1_000)
    cb = CircuitBreaker(threshold=3, cooldown_ms=60_000, clock=clock)
    assert cb.state()["state"] == "closed" and not cb.is_open
    cb.record_failure(TemporaryExchangeError("502"))
    cb.record_failure(TemporaryExchangeError("502"))
    cb.record_success()  # not consecutive any more
    assert cb.state()["failures"] == 0
    with capture_logs() as logs:
        for _ in range(3):
            cb.record_failure(TemporaryExchangeError("temporary exchange error (RequestTimeout): binance GET"))
    assert cb.is_open
    assert [e["event"] for e in logs] == ["circuit_open"]
    state = cb.state()
    assert state["state"] == "open" and state["is_open"] is True and state["failures"] == 3
    assert state["since_ms"] == 1_000 and state["half_opens_at_ms"] == 61_000 and state["trips"] == 1
    assert "RequestTimeout" in state["last_error"]
    json.dumps(state)  # `ritmo status` stores and prints it

    clock.now_ms = 60_999
    assert cb.is_open
    clock.now_ms = 61_000 + 5_000
    assert not cb.is_open  # half-open: one trial goes through
    assert cb.state()["state"] == "half_open" and cb.state()["since_ms"] == 61_000
    cb.record_failure("still down")  # a failed trial re-opens at once, for another cooldown
    assert cb.is_open and cb.state()["since_ms"] == 66_000 and cb.state()["trips"] == 2
    clock.now_ms = 126_000
    assert cb.state()["state"] == "half_open"
    with capture_logs() as logs:
        cb.record_success()
    assert [e["event"] for e in logs] == ["circuit_closed"]
    assert cb.state() | {"last_error": None} == {
        "state": "closed",
        "is_open": False,
        "failures": 0,
        "threshold": 3,
        "since_ms": 126_000,
        "half_opens_at_ms": None,
        "trips": 2,
        "last_error": None,
    }


def test_circuit_breaker_redacts_and_validates() -> None:
    cb = CircuitBreaker(threshold=1, clock=Clock(), secrets=["SUPERSECRETKEY123"])
    cb.record_failure(ccxt.NetworkError("key SUPERSECRETKEY123 signature=abcdef0123"))
    assert "SUPERSECRETKEY123" not in cb.state()["last_error"] and "abcdef0123" not in cb.state()["last_error"]
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=0)


# ---- make_exchange: verbose, clock sync, credentials, sandbox (construction only: no network) ---------------


def test_make_exchange_forces_verbose_off_and_syncs_the_clock() -> None:
    with capture_logs() as logs:
        ex = make_exchange("binance", {"verbose": True}).ccxt_exchange
    assert ex.verbose is False
    assert [e["event"] for e in logs] == ["exchange_verbose_ignored"]
    assert ex.options["adjustForTimeDifference"] is True
    assert (
        make_exchange("binance", {"options": {"adjustForTimeDifference": False}}).ccxt_exchange.options[
            "adjustForTimeDifference"
        ]
        is False
    )


def test_make_exchange_credentials() -> None:
    ex = make_exchange("binance", api_key="K" * 64, api_secret="S" * 64).ccxt_exchange
    assert ex.apiKey == "K" * 64 and ex.secret == "S" * 64
    assert make_exchange("binance", {"apiKey": "K" * 64}, api_key="K" * 64).ccxt_exchange.apiKey == "K" * 64
    with pytest.raises(ConfigError, match="RITMO_API_KEY and RITMO_EXCHANGE_CONFIG's 'apiKey' differ") as info:
        make_exchange("binance", {"apiKey": "A" * 64}, api_key="K" * 64)
    assert "A" * 64 not in str(info.value) and "K" * 64 not in str(info.value)


@pytest.mark.parametrize(
    ("exchange_id", "options", "kind", "host"),
    [
        ("binance", {}, "testnet", "testnet.binance.vision"),
        ("binanceusdm", {}, "demo_trading", "demo-fapi.binance.com"),
        ("binance", {"defaultType": "future"}, "demo_trading", "demo-fapi.binance.com"),
    ],
)
def test_make_exchange_sandbox(exchange_id: str, options: dict, kind: str, host: str) -> None:
    with capture_logs() as logs:
        ex = make_exchange(exchange_id, {"options": options}, sandbox=True).ccxt_exchange
    (event,) = [e for e in logs if e["event"] == "exchange_sandbox"]
    assert event["kind"] == kind and host in event["endpoint"]
    assert host in json.dumps(ex.urls["api"])
    mainnet = ("https://api.binance.com", "https://fapi.binance.com", "https://dapi.binance.com")
    assert not any(str(url).startswith(mainnet) for url in ex.urls["api"].values())


def test_make_exchange_sandbox_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"RITMO_SANDBOX=true conflicts with urls\.api"):
        make_exchange("binance", {"urls": {"api": {"public": "http://127.0.0.1:1/api/v3"}}}, sandbox=True)

    def no_sandbox(self: Any, enabled: bool) -> None:
        raise ccxt.NotSupported("kraken does not have a sandbox URL")

    monkeypatch.setattr(ccxt.kraken, "set_sandbox_mode", no_sandbox)
    with pytest.raises(ConfigError, match="no test network for kraken"):
        make_exchange("kraken", sandbox=True)


def test_key_permissions_are_not_reported_on_the_testnet(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    ex = make_exchange("binance", {"rateLimit": 1}, sandbox=True, api_key="K" * 64, api_secret="S" * 64)
    ex = ExchangeClient(ex.ccxt_exchange, sleep=Recorder())
    with capture_logs() as logs:
        assert ex.check_key_permissions() == {"checked": False}
    assert [e["event"] for e in logs] == ["exchange_key_permissions_unavailable"]
    assert ExchangeClient(FakeExchange(_candles(1)), sleep=Recorder()).check_key_permissions() == {"checked": False}


# ---- the fake exchange's orders and balances (what the LiveBroker's fault suite relies on) ------------------


def _trading_fake(**kwargs: Any) -> FakeExchange:
    fake = FakeExchange(_candles(10), **kwargs)
    fake.fill_price = 50_000.0
    return fake


def test_fake_market_buy_and_sell_keep_balances_consistent() -> None:
    fake = _trading_fake()
    buy = fake.create_order("BTC/USDT", "market", "buy", 0.1, None, {"newClientOrderId": "rt-a"})
    assert buy["status"] == "closed" and buy["filled"] == 0.1 and buy["average"] == 50_000.0
    assert buy["fee"] == {"cost": 5.0, "currency": "USDT"} and buy["clientOrderId"] == "rt-a"
    fake.fill_price = 51_000.0
    sell = fake.create_order("BTC/USDT", "market", "sell", 0.04, None, {"newClientOrderId": "rt-b"})
    bal = fake.fetch_balance()
    assert bal["BTC"]["total"] == pytest.approx(0.06)
    assert bal["USDT"]["free"] == pytest.approx(10_000 - 5_000 - 5 + 0.04 * 51_000 - 0.04 * 51_000 * 0.001)
    assert bal["total"]["USDT"] == bal["USDT"]["total"] and bal["used"]["USDT"] == 0.0
    assert fake.fetch_order(None, "BTC/USDT", {"origClientOrderId": "rt-b"})["id"] == sell["id"]
    assert fake.fetch_order(buy["id"], "BTC/USDT")["clientOrderId"] == "rt-a"
    assert [t["order"] for t in fake.fetch_my_trades("BTC/USDT")] == [buy["id"], sell["id"]]
    assert [t["order"] for t in fake.fetch_my_trades("BTC/USDT", params={"orderId": sell["id"]})] == [sell["id"]]
    with pytest.raises(ccxt.OrderNotFound):
        fake.fetch_order(None, "BTC/USDT", {"origClientOrderId": "rt-never"})
    assert ExchangeClient(fake, sleep=Recorder()).fetch_order_by_client_id("BTC/USDT", "rt-never") is None


@pytest.mark.parametrize(
    ("fee_asset", "bnb", "buy_fee", "sell_fee"),
    [
        ("base", 0.0, {"cost": 0.0001, "currency": "BTC"}, {"cost": 0.00005, "currency": "BTC"}),
        ("received", 0.0, {"cost": 0.0001, "currency": "BTC"}, {"cost": 2.5, "currency": "USDT"}),
        ("BNB", 1.0, {"cost": 0.00625, "currency": "BNB"}, {"cost": 0.003125, "currency": "BNB"}),
        ("BNB", 0.0, {"cost": 0.0001, "currency": "BTC"}, {"cost": 2.5, "currency": "USDT"}),  # BNB short
    ],
)
def test_fake_fee_currencies(fee_asset: str, bnb: float, buy_fee: dict, sell_fee: dict) -> None:
    fake = _trading_fake(fee_asset=fee_asset, balances={"USDT": 10_000.0, "BNB": bnb})
    buy = fake.create_order("BTC/USDT", "market", "buy", 0.1, None, {"newClientOrderId": "rt-1"})
    sell = fake.create_order("BTC/USDT", "market", "sell", 0.05, None, {"newClientOrderId": "rt-2"})
    assert buy["fee"]["currency"] == buy_fee["currency"] and buy["fee"]["cost"] == pytest.approx(buy_fee["cost"])
    assert sell["fee"]["currency"] == sell_fee["currency"] and sell["fee"]["cost"] == pytest.approx(sell_fee["cost"])
    # The ledger identity the LiveBroker relies on: balances move by exactly the fills and the fees.
    fees = [buy["fee"], sell["fee"]]
    btc_fee = sum(f["cost"] for f in fees if f["currency"] == "BTC")
    usdt_fee = sum(f["cost"] for f in fees if f["currency"] == "USDT")
    bnb_fee = sum(f["cost"] for f in fees if f["currency"] == "BNB")
    assert fake.balance("BTC") == pytest.approx(0.05 - btc_fee)
    assert fake.balance("USDT") == pytest.approx(10_000.0 - 5_000.0 + 2_500.0 - usdt_fee)
    assert fake.balance("BNB") == pytest.approx(bnb - bnb_fee)
    in_quote = sum(fee_to_quote(f, "BTC/USDT", 50_000.0, {"BNB": 600.0}) for f in fees)
    assert in_quote == pytest.approx(7.5 if fee_asset != "BNB" or bnb == 0 else 7.5 * 0.75)


def test_fake_partial_fill_and_split_trades() -> None:
    fake = _trading_fake()
    fake.fills_per_order = 2
    fake.partial_fill_next(0.5)
    order = fake.create_order("BTC/USDT", "market", "buy", 0.1, None, {"newClientOrderId": "rt-p"})
    assert order["status"] == "expired" and order["filled"] == pytest.approx(0.05)
    assert order["remaining"] == pytest.approx(0.05) and len(order["trades"]) == 2
    assert order["average"] == pytest.approx((0.025 * 50_000 + 0.025 * 50_000.01) / 0.05)
    assert fake.balance("BTC") == pytest.approx(0.05)
    assert fake.balance("USDT") == pytest.approx(10_000 - order["cost"] - order["fee"]["cost"])


@pytest.mark.parametrize(
    ("amount", "exc", "match"),
    [
        (0.000015, ccxt.InvalidOrder, "LOT_SIZE"),  # not a whole number of steps
        (0.00005, ccxt.BadRequest, "-1013"),  # 2.5 USDT < 5 USDT
        (1.0, ccxt.InsufficientFunds, "-2010"),
    ],
)
def test_fake_order_checks_like_binance(amount: float, exc: type[Exception], match: str) -> None:
    fake = _trading_fake()
    with pytest.raises(exc, match=match) as info:
        fake.create_order("BTC/USDT", "market", "buy", amount, None, {"newClientOrderId": "rt-x"})
    assert classify_order_error(info.value) == "rejected"
    assert fake.orders == [] and fake.balance("USDT") == 10_000.0
    with pytest.raises(ValueError, match="price=None"):
        fake.create_order("BTC/USDT", "market", "buy", 0.01, 50_000.0)


def test_fake_execute_then_raise_and_lookup() -> None:
    fake = _trading_fake()
    client = ExchangeClient(fake, sleep=Recorder())
    fake.fail_after_execute("create_order", "500")
    cid = client_order_id("BTC/USDT", T0, "BUY")
    with pytest.raises(TemporaryExchangeError) as info:
        client.create_market_order("BTC/USDT", "buy", 0.01, cid)
    assert info.value.order_outcome == "ambiguous"  # type: ignore[attr-defined]
    found = client.fetch_order_by_client_id("BTC/USDT", cid)
    assert found is not None and found["filled"] == 0.01 and len(fake.orders) == 1


def test_fake_down_for_a_while_of_fake_time() -> None:
    fake = _trading_fake()
    fake.down_for(10_000)
    with pytest.raises(ccxt.ExchangeNotAvailable):
        fake.fetch_balance()
    with pytest.raises(ccxt.ExchangeNotAvailable):
        fake.create_order("BTC/USDT", "market", "buy", 0.01, None)
    assert fake.orders == []

    def sleep(seconds: float) -> None:  # the fake's clock moves while we wait
        fake.advance(round(seconds * 1000))

    assert retry_read(fake.fetch_time, sleep=sleep, rng=lambda: 1.0) == T0 + 10 * CANDLE_MS + 15_000
    assert fake.down_until_ms is None
