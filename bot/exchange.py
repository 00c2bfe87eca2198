"""The exchange boundary: the only module that imports ccxt.

Everything ccxt raises is translated here, once, into three errors that say what the caller should do
(bot/errors.py): TemporaryExchangeError (retry later), OperationalExchangeError (a retry will not help:
stop and tell a human what was refused), AuthenticationExchangeError (keys/permissions). Reads go through
`retry_read` (capped exponential backoff with full jitter); order placement must never be retried blindly
and will get no such wrapper. `sleep` and `rng` are injected so tests run in milliseconds.
"""

from __future__ import annotations

import difflib
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import ccxt
import pandas as pd
import structlog

from bot.errors import (
    AuthenticationExchangeError,
    ConfigError,
    ExchangeError,
    OperationalExchangeError,
    TemporaryExchangeError,
)
from strategies.candles import CANDLE_MS, empty_candles, normalize_ohlcv_rows

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Binance spot serves at most 1000 klines per request; asking for more is silently cut to 1000.
MAX_OHLCV_LIMIT = 1000
SUPPORTED_TIMEFRAME = "5m"
# Exchange messages are kept short in our errors and logs: they can carry whole URLs and response bodies.
MAX_MESSAGE_CHARS = 300

# One table, checked in order; the first matching ccxt class wins. Order matters only where classes nest:
# in ccxt 4.5 NetworkError (and its children RequestTimeout, ExchangeNotAvailable > OnMaintenance,
# DDoSProtection, RateLimitExceeded, InvalidNonce) and BadResponse sit under OperationFailed, NOT under
# ccxt.ExchangeError; AuthenticationError > PermissionDenied/AccountSuspended and BadRequest > BadSymbol,
# InvalidOrder, InsufficientFunds sit under ccxt.ExchangeError.
_ERROR_TABLE: tuple[tuple[type[BaseException], type[ExchangeError]], ...] = (
    # RateLimitExceeded and DDoSProtection are siblings under NetworkError: both listed, neither assumed.
    (ccxt.RateLimitExceeded, TemporaryExchangeError),
    (ccxt.DDoSProtection, TemporaryExchangeError),
    (ccxt.OnMaintenance, TemporaryExchangeError),
    (ccxt.ExchangeNotAvailable, TemporaryExchangeError),
    (ccxt.RequestTimeout, TemporaryExchangeError),
    # InvalidNonce (clock skew / recvWindow) is under NetworkError too; a later attempt may well pass.
    (ccxt.NetworkError, TemporaryExchangeError),
    # Garbled/empty responses (BadResponse, NullResponse) and CancelPending: transient by nature.
    (ccxt.OperationFailed, TemporaryExchangeError),
    (ccxt.AccountSuspended, AuthenticationExchangeError),
    (ccxt.PermissionDenied, AuthenticationExchangeError),
    (ccxt.AuthenticationError, AuthenticationExchangeError),
    (ccxt.BadSymbol, OperationalExchangeError),
    (ccxt.BadRequest, OperationalExchangeError),
    (ccxt.InvalidOrder, OperationalExchangeError),
    (ccxt.InsufficientFunds, OperationalExchangeError),
    (ccxt.ExchangeError, OperationalExchangeError),
    # Anything else ccxt may add under BaseError: not known to be transient, so do not retry it.
    (ccxt.BaseError, OperationalExchangeError),
)

_WHAT_TO_DO = {
    TemporaryExchangeError: "temporary exchange error",
    AuthenticationExchangeError: "exchange refused the credentials or permissions",
    OperationalExchangeError: "exchange refused the request",
}

# Things that look like credentials in URLs, headers or JSON bodies: keep the name, hide the value.
_SECRET_PATTERNS = (
    re.compile(
        r"((?:x-mbx-apikey|api[_-]?key|api[_-]?secret|secret|password|passphrase|listenkey|token|signature)"
        r"[\"']?\s*[:=]\s*[\"']?)[^&\s\"',}]+",
        re.IGNORECASE,
    ),
)
_REDACTED = "***"


def make_exchange(exchange_id: str, config: dict[str, Any] | None = None) -> Any:
    """Build a ccxt exchange with rate limiting on and ccxt's own re-sending off; `config` is merged in."""
    if exchange_id not in ccxt.exchanges:
        close = difflib.get_close_matches(exchange_id, ccxt.exchanges, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown exchange id {exchange_id!r}{hint}")
    config = dict(config or {})
    if not isinstance(config.get("options", {}), dict):
        raise ConfigError("exchange config: 'options' must be a JSON object")
    options = dict(config.pop("options", {}))
    # maxRetriesOnFailure > 0 would make ccxt re-send requests itself, orders included: never allowed.
    if options.get("maxRetriesOnFailure", 0) != 0:
        raise ConfigError("exchange config: options.maxRetriesOnFailure must be 0 (ccxt would re-send orders)")
    if config.get("enableRateLimit", True) is not True:
        raise ConfigError("exchange config: enableRateLimit must stay true (the exchange bans abusers)")
    options["maxRetriesOnFailure"] = 0
    args = {**config, "enableRateLimit": True, "options": options}
    # ccxt logs request headers, API key included, at DEBUG on its own logger.
    ccxt_logger = logging.getLogger("ccxt")
    if ccxt_logger.level < logging.INFO:
        ccxt_logger.setLevel(logging.INFO)
    try:
        return getattr(ccxt, exchange_id)(args)
    except ccxt.BaseError as exc:
        raise ConfigError(f"exchange config rejected by ccxt: {redact(str(exc))}") from None


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Hide credential-like values and the given secret strings, then shorten to MAX_MESSAGE_CHARS."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, _REDACTED)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + _REDACTED, text)
    text = " ".join(text.split())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text


def secrets_of(exchange: Any) -> tuple[str, ...]:
    """The credential strings set on an exchange object, to be redacted from messages."""
    found = []
    for attr in ("apiKey", "secret", "password", "privateKey", "token"):
        value = getattr(exchange, attr, None)
        # Very short values would redact ordinary words; real keys are long.
        if isinstance(value, str) and len(value) >= 8:
            found.append(value)
    return tuple(found)


def map_ccxt_error(exc: BaseException, *, secrets: Iterable[str] = ()) -> ExchangeError:
    """Translate a ccxt exception into our error class, with a short message free of credentials."""
    if isinstance(exc, ExchangeError):
        return exc
    target: type[ExchangeError] = OperationalExchangeError
    for ccxt_class, ours in _ERROR_TABLE:
        if isinstance(exc, ccxt_class):
            target = ours
            break
    detail = redact(str(exc), secrets) or "(no message)"
    err = target(f"{_WHAT_TO_DO[target]} ({type(exc).__name__}): {detail}")
    err.ccxt_error = type(exc).__name__  # type: ignore[attr-defined]
    return err


def retry_read(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay_s: float = 1.0,
    max_delay_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
    secrets: Iterable[str] = (),
    op: str | None = None,
) -> T:
    """Call a read `fn`, retrying only TemporaryExchangeError with capped exponential backoff, full jitter."""
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    secrets = tuple(secrets)
    op = op or getattr(fn, "__name__", "read")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (ccxt.BaseError, ExchangeError) as exc:
            err = map_ccxt_error(exc, secrets=secrets)
            if not isinstance(err, TemporaryExchangeError):
                # from None: the original exception's text may hold signed URLs; ours is redacted.
                raise err from None
            if attempt == attempts:
                log.warning("exchange_gave_up", op=op, attempts=attempts, error=str(err))
                raise TemporaryExchangeError(f"{err} (gave up after {attempts} attempts)") from None
            # Full jitter (uniform in [0, cap]) spreads retries of many clients; the cap bounds the wait.
            cap_s = min(max_delay_s, base_delay_s * 2 ** (attempt - 1))
            delay_s = rng() * cap_s
            log.warning(
                "exchange_retry",
                op=op,
                attempt=attempt,
                attempts=attempts,
                delay_s=round(delay_s, 3),
                error_class=getattr(err, "ccxt_error", type(err).__name__),
                error=str(err),
            )
            sleep(delay_s)
    raise AssertionError("unreachable")  # pragma: no cover


def check_timeframe(timeframe: str) -> None:
    """Refuse any timeframe but 5m: candle times, features and the policy are all built on 5 minutes."""
    if timeframe != SUPPORTED_TIMEFRAME:
        raise ConfigError(f"timeframe {timeframe!r} is not supported: only {SUPPORTED_TIMEFRAME} candles are")


def check_symbol(exchange: Any, symbol: str, *, sleep: Callable[[float], None] = time.sleep) -> None:
    """Load the markets (retried) and fail clearly when the exchange does not list `symbol`."""
    markets = retry_read(exchange.load_markets, sleep=sleep, secrets=secrets_of(exchange), op="load_markets")
    if symbol not in (markets or {}):
        close = difflib.get_close_matches(symbol, list(markets or {}), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise OperationalExchangeError(f"{exchange.id} has no market {symbol!r}{hint}")


def exchange_now_ms(
    exchange: Any,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> int:
    """The exchange's clock in epoch ms (fetch_time, retried); the local clock only if it has none."""
    if not (getattr(exchange, "has", {}) or {}).get("fetchTime"):
        log.warning("exchange_time_unavailable", exchange=exchange.id, fallback="local_clock")
        return int(exchange.milliseconds())
    now_ms = retry_read(exchange.fetch_time, sleep=sleep, rng=rng, secrets=secrets_of(exchange), op="fetch_time")
    if not isinstance(now_ms, int | float) or now_ms <= 0:
        raise OperationalExchangeError(f"{exchange.id} returned a nonsense server time: {now_ms!r}")
    return int(now_ms)


def fetch_ohlcv_page(
    exchange: Any,
    symbol: str,
    timeframe: str,
    since_ms: int,
    limit: int = MAX_OHLCV_LIMIT,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> list[list[Any]]:
    """One fetch_ohlcv call (retried): raw rows with open time >= since_ms, forming candle included."""
    if not 1 <= limit <= MAX_OHLCV_LIMIT:
        raise ValueError(f"limit must be in 1..{MAX_OHLCV_LIMIT}, got {limit}")
    rows = retry_read(
        lambda: exchange.fetch_ohlcv(symbol, timeframe, since=int(since_ms), limit=int(limit)),
        sleep=sleep,
        rng=rng,
        secrets=secrets_of(exchange),
        op="fetch_ohlcv",
    )
    if not isinstance(rows, list):
        raise OperationalExchangeError(f"{exchange.id} fetch_ohlcv returned {type(rows).__name__}, not a list")
    return rows


def iter_closed_candle_pages(
    exchange: Any,
    symbol: str,
    since_ms: int,
    now_ms: int,
    *,
    until_ms: int | None = None,
    timeframe: str = SUPPORTED_TIMEFRAME,
    limit: int = MAX_OHLCV_LIMIT,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> Iterator[pd.DataFrame]:
    """Page through closed candles with `since_ms <= ts_ms < until_ms`; one yielded frame per API call.

    Paging stops when the exchange returns nothing, when the next candle would open at or after
    `until_ms`, or when it would not be closed at `now_ms` (exchange time). Gaps are jumped over, as the
    exchange returns the first candles at or after `since`.
    """
    check_timeframe(timeframe)
    since_ms = -(-int(since_ms) // CANDLE_MS) * CANDLE_MS  # first 5-minute boundary at or after since
    while True:
        if until_ms is not None and since_ms >= until_ms:
            return
        if since_ms + CANDLE_MS > now_ms:
            return  # the next candle is not closed yet
        rows = fetch_ohlcv_page(exchange, symbol, timeframe, since_ms, limit, sleep=sleep, rng=rng)
        if not rows:
            return
        page = normalize_ohlcv_rows(rows, now_ms)
        page = page[page["ts_ms"] >= since_ms]
        if until_ms is not None:
            page = page[page["ts_ms"] < until_ms]
        page = page.reset_index(drop=True)
        last_ts_ms = max(int(r[0]) for r in rows)
        next_since_ms = last_ts_ms + CANDLE_MS
        if next_since_ms <= since_ms:
            # An exchange that ignores `since` would loop forever; stop with a clear error instead.
            raise OperationalExchangeError(
                f"{exchange.id} fetch_ohlcv returned no candle at or after since={since_ms}: cannot page"
            )
        yield page
        since_ms = next_since_ms


def fetch_closed_candles(
    exchange: Any,
    symbol: str,
    since_ms: int,
    now_ms: int,
    timeframe: str = SUPPORTED_TIMEFRAME,
    *,
    until_ms: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> pd.DataFrame:
    """All closed candles from since_ms (before until_ms if given), paged; the forming candle dropped."""
    pages = list(
        iter_closed_candle_pages(
            exchange, symbol, since_ms, now_ms, until_ms=until_ms, timeframe=timeframe, sleep=sleep, rng=rng
        )
    )
    pages = [p for p in pages if len(p)]
    if not pages:
        return empty_candles()
    df = pd.concat(pages, ignore_index=True)
    return df.drop_duplicates(subset="ts_ms", keep="last").sort_values("ts_ms").reset_index(drop=True)
