"""The exchange boundary: ccxt error mapping, read retries with backoff, redaction, make_exchange."""

from __future__ import annotations

import random

import ccxt
import pandas as pd
import pytest
from structlog.testing import capture_logs

from bot.errors import (
    EXIT_NOPERM,
    EXIT_RUNTIME,
    AuthenticationExchangeError,
    ConfigError,
    OperationalExchangeError,
    TemporaryExchangeError,
)
from bot.exchange import (
    MAX_MESSAGE_CHARS,
    exchange_now_ms,
    fetch_closed_candles,
    fetch_ohlcv_page,
    make_exchange,
    map_ccxt_error,
    redact,
    retry_read,
)
from strategies.candles import CANDLE_MS
from tests.fake_exchange import FakeExchange

ATTEMPTS = 5
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def _candles(n: int) -> pd.DataFrame:
    ts = [T0 + i * CANDLE_MS for i in range(n)]
    return pd.DataFrame(
        {"ts_ms": ts, "open": 100.0, "high": 102.0, "low": 99.0, "close": 101.0, "volume": 5.0}
    )


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


@pytest.mark.parametrize(
    ("ccxt_class", "ours", "calls"), ERROR_TABLE, ids=[row[0].__name__ for row in ERROR_TABLE]
)
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
        fetch_ohlcv_page(fake, "BTC/USDT", "5m", T0, sleep=Recorder())
    assert fake.apiKey not in str(info.value)
    assert all(fake.apiKey not in str(e) for e in logs)
    assert fake.calls["fetch_ohlcv"] == 5


# ---- make_exchange (no network: constructing a ccxt exchange sends nothing) ------------------------


def test_make_exchange_settings_and_merge() -> None:
    config = {"timeout": 12_345, "options": {"defaultType": "future", "recvWindow": 7000}}
    ex = make_exchange("binance", config)
    assert isinstance(ex, ccxt.binance)
    assert ex.enableRateLimit is True
    assert ex.options["maxRetriesOnFailure"] == 0
    assert ex.timeout == 12_345
    assert ex.options["defaultType"] == "future"
    assert ex.options["recvWindow"] == 7000
    # ccxt's own default options survive the merge.
    assert "fetchCurrencies" in ex.options
    assert make_exchange("binance").options["maxRetriesOnFailure"] == 0


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

def test_fetch_closed_candles_drops_forming_and_pages() -> None:
    fake = FakeExchange(_candles(2_500), now_ms=T0 + 2_499 * CANDLE_MS + 60_000)
    raw = fake.fetch_ohlcv("BTC/USDT", "5m", since=T0 + 2_490 * CANDLE_MS, limit=1000)
    assert raw[-1][0] == T0 + 2_499 * CANDLE_MS  # the fake serves the forming candle, as Binance does
    assert raw[-1][4] != 101.0  # ... with a partial close
    df = fetch_closed_candles(fake, "BTC/USDT", T0, fake.now_ms, sleep=Recorder())
    assert len(df) == 2_499
    assert df["ts_ms"].iloc[-1] == T0 + 2_498 * CANDLE_MS
    assert df["ts_ms"].is_unique and df["ts_ms"].is_monotonic_increasing
    limits = [kw["limit"] for name, kw in fake.call_log if name == "fetch_ohlcv"]
    assert all(limit <= 1000 for limit in limits)
    assert fake.calls["fetch_ohlcv"] == 1 + 3


def test_bad_symbol_is_operational_and_not_retried() -> None:
    fake = FakeExchange(_candles(10))
    sleep = Recorder()
    with pytest.raises(OperationalExchangeError, match="BadSymbol"):
        fetch_ohlcv_page(fake, "NOPE/USDT", "5m", T0, sleep=sleep)
    assert fake.calls["fetch_ohlcv"] == 1
    assert sleep.delays == []


def test_exchange_now_ms_is_retried() -> None:
    fake = FakeExchange(_candles(10), now_ms=T0 + 123_456)
    fake.fail_next("fetch_time", ccxt.RequestTimeout, times=2)
    sleep = Recorder()
    assert exchange_now_ms(fake, sleep=sleep, rng=lambda: 0.5) == T0 + 123_456
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
