"""The exchange boundary: the only module that imports ccxt, and `ExchangeClient`, the only way to call it.

`ExchangeClient` holds the ccxt object and exposes, as typed methods, every exchange operation ritmo uses;
nothing outside bot/exchange/ touches ccxt (tests/test_exchange_boundary.py holds that). `make_exchange` and
`exchange_from_settings` build one.

Everything ccxt raises is translated here, once, into three errors that say what the caller should do
(bot/errors.py): TemporaryExchangeError (retry later), OperationalExchangeError (a retry will not help:
stop and tell a human what was refused), AuthenticationExchangeError (keys/permissions, exit 77).

Reads (candles, balance, order status, time, trades, positions) go through `retry_read`, wired once in the
client: capped exponential backoff with full jitter; `Retry-After` honoured on HTTP 429/418; the time offset
resynchronised once on InvalidNonce (-1021); Binance's -2015 retried once, then taken as an authentication
error. Orders are never retried: `ExchangeClient.create_market_order` sends exactly once and
`classify_order_error` tells the caller whether the order certainly did not execute ("rejected"), may have
("ambiguous": look it up by client id with `fetch_order_by_client_id` before anything else) or the key is
refused ("auth"). `CircuitBreaker` (bot/exchange/breaker.py) pauses trading after a run of exchange
failures. The client's `sleep` and `rng` are injected so tests run in milliseconds.
"""

from __future__ import annotations

import difflib
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import ccxt
import numpy as np
import structlog

from bot.errors import (
    AuthenticationExchangeError,
    ConfigError,
    ExchangeError,
    OperationalExchangeError,
    TemporaryExchangeError,
    UnknownSymbolError,
)
from bot.exchange.rules import CLIENT_ORDER_ID_RE, MarketRules
from strategies.candles import CANDLE_MS, CandleBatch, last_copy_rows, ohlcv_batch

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

# Binance -2015 "Invalid API-key, IP, or permissions for action." (also in DDoSProtection texts, see retry_read).
_INVALID_KEY_RE = re.compile(r"(?<![\d.])-2015(?!\d)")
# A -2015 seen this many times within one read is an authentication error, not a temporary ban.
INVALID_KEY_STRIKES = 2
# Binance's handle_errors raises "binance 429 Too Many Requests {...}"; ccxt's generic one "... 418 ...".
_RATE_LIMIT_STATUS_RE = re.compile(r"(?:^|\s)(418|429)(?:\s|$)")
# Longest Retry-After a read sleeps through; beyond it the caller (circuit breaker) decides.
MAX_RETRY_AFTER_S = 60.0


def make_exchange(
    exchange_id: str,
    config: Mapping[str, Any] | None = None,
    *,
    sandbox: bool = False,
    api_key: str = "",
    api_secret: str = "",
) -> ExchangeClient:
    """A client on a new ccxt exchange: rate limiting on, re-sending and verbose off, clock sync on; `config` merged in.

    `sandbox=True` selects the exchange's test endpoints: Binance spot's testnet (`set_sandbox_mode`), or
    demo trading for Binance futures (`enable_demo_trading`; ccxt 4.5 refuses the old futures testnet).
    """
    if exchange_id not in ccxt.exchanges:
        close = difflib.get_close_matches(exchange_id, ccxt.exchanges, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown exchange id {exchange_id!r}{hint}")
    config = dict(config or {})
    if not isinstance(config.get("options", {}), Mapping):
        raise ConfigError("exchange config: 'options' must be a JSON object")
    options = dict(config.pop("options", {}))
    # maxRetriesOnFailure > 0 would make ccxt re-send requests itself, orders included: never allowed.
    if options.get("maxRetriesOnFailure", 0) != 0:
        raise ConfigError("exchange config: options.maxRetriesOnFailure must be 0 (ccxt would re-send orders)")
    if config.get("enableRateLimit", True) is not True:
        raise ConfigError("exchange config: enableRateLimit must stay true (the exchange bans abusers)")
    if config.pop("verbose", False):
        # ccxt's verbose mode print()s every request with its headers, API key included, past all logging.
        log.warning("exchange_verbose_ignored", exchange=exchange_id, reason="verbose prints the API key")
    for name, value, key in (("RITMO_API_KEY", api_key, "apiKey"), ("RITMO_API_SECRET", api_secret, "secret")):
        if value and config.get(key) and config[key] != value:
            raise ConfigError(f"{name} and RITMO_EXCHANGE_CONFIG's {key!r} differ: set the credential in one place")
        if value:
            config[key] = value
    if sandbox and isinstance(config.get("urls"), Mapping) and "api" in config["urls"]:
        # Sandbox mode replaces urls.api with ccxt's test URLs: the override would be dropped without a word.
        raise ConfigError("RITMO_SANDBOX=true conflicts with urls.api in RITMO_EXCHANGE_CONFIG: use one of them")
    options["maxRetriesOnFailure"] = 0
    args = {**config, "enableRateLimit": True, "verbose": False, "options": options}
    # ccxt logs request headers, API key included, at DEBUG on its own logger.
    ccxt_logger = logging.getLogger("ccxt")
    if ccxt_logger.level < logging.INFO:
        ccxt_logger.setLevel(logging.INFO)
    try:
        exchange = getattr(ccxt, exchange_id)(args)
    except ccxt.BaseError as exc:
        raise ConfigError(f"exchange config rejected by ccxt: {redact(str(exc))}") from None
    exchange.verbose = False
    # Signed requests carry a timestamp checked against the server's clock (Binance: -1021 outside
    # recvWindow); with this option ccxt measures the offset on every load_markets, and retry_read
    # re-measures it on InvalidNonce. An explicit setting in the config wins.
    if "adjustForTimeDifference" in exchange.options and "adjustForTimeDifference" not in options:
        exchange.options["adjustForTimeDifference"] = True
    if sandbox:
        _enable_sandbox(exchange)
    return ExchangeClient(exchange)


def exchange_from_settings(settings: Any) -> ExchangeClient:
    """make_exchange with the exchange, config, sandbox flag and credentials of a bot.settings.Settings."""
    return make_exchange(
        settings.exchange,
        dict(settings.exchange_config),
        sandbox=settings.sandbox,
        api_key=settings.api_key,
        api_secret=settings.api_secret,
    )


def _enable_sandbox(exchange: Any) -> None:
    """Point the exchange at its test network (spot testnet) or demo trading (Binance futures), and log it."""
    urls = getattr(exchange, "urls", {}) or {}
    default_type = str((exchange.options or {}).get("defaultType", "spot"))
    is_binance_futures = exchange.id in ("binanceusdm", "binancecoinm") or (
        exchange.id == "binance" and default_type in ("future", "swap", "delivery")
    )
    try:
        if is_binance_futures and "demo" in urls:
            exchange.enable_demo_trading(True)
            kind = "demo_trading"
        else:
            exchange.set_sandbox_mode(True)
            kind = "testnet"
    except ccxt.NotSupported:
        raise ConfigError(f"RITMO_SANDBOX=true: ccxt has no test network for {exchange.id}") from None
    api = exchange.urls.get("api")
    if isinstance(api, Mapping):
        # The base URL our orders go to: the futures one on Binance futures, else the spot one.
        keys = ("fapiPrivate", "dapiPrivate") if is_binance_futures else ("private", "public")
        if exchange.id == "binancecoinm":
            keys = ("dapiPrivate",)
        endpoint = next((api[k] for k in keys if k in api), None)
        endpoint = endpoint or next(iter(api.values()), None)
    else:
        endpoint = api
    log.warning("exchange_sandbox", exchange=exchange.id, kind=kind, endpoint=str(endpoint))


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


def is_invalid_key_error(exc: BaseException) -> bool:
    """True for Binance's -2015 "Invalid API-key, IP, or permissions for action", whatever class ccxt chose."""
    return _INVALID_KEY_RE.search(str(exc)) is not None


def retry_after_s(exchange: Any, exc: BaseException) -> tuple[int | None, float | None]:
    """(HTTP status 418/429 or None, the response's Retry-After in seconds or None) of a rate-limit error."""
    if not isinstance(exc, ccxt.RateLimitExceeded | ccxt.DDoSProtection):
        return None, None
    match = _RATE_LIMIT_STATUS_RE.search(str(exc))
    status = int(match.group(1)) if match else None
    # ccxt keeps the headers of the last response, the failed one included (set before raise_for_status).
    headers = getattr(exchange, "last_response_headers", None) or {}
    raw = next((str(v) for k, v in dict(headers).items() if str(k).lower() == "retry-after"), None)
    if raw is None:
        return status, None
    try:
        seconds = float(raw.strip())
    except ValueError:
        # RFC 9110 also allows an HTTP date.
        try:
            seconds = parsedate_to_datetime(raw).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return status, None
    if not math.isfinite(seconds):
        return status, None
    return status, max(0.0, seconds)


def retry_read(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay_s: float = 1.0,
    max_delay_s: float = 30.0,
    max_retry_after_s: float = MAX_RETRY_AFTER_S,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
    secrets: Iterable[str] = (),
    op: str | None = None,
    exchange: Any | None = None,
) -> T:
    """Call a read `fn`, retrying TemporaryExchangeError with capped exponential backoff and full jitter.

    `exchange` (default: the object `fn` is bound to) lets a retry honour Retry-After and resync the clock:
    - HTTP 429/418 (RateLimitExceeded, DDoSProtection): wait the response's Retry-After exactly (a 418
      without one waits `max_delay_s`); a Retry-After above `max_retry_after_s` (an IP ban of minutes to
      days) is not slept through: TemporaryExchangeError at once, with `.retry_after_s` for the caller.
    - InvalidNonce (-1021): `load_time_difference()` once, then one immediate retry; later ones back off.
    - Binance -2015 that ccxt did not call an authentication error (it reports a -2015 as DDoSProtection
      once any private call has succeeded): retried once; the second -2015 of the same read is
      AuthenticationExchangeError, so a revoked key or a removed IP stops the daemon instead of looping.
    Anything not temporary is raised at once, mapped and redacted.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    if exchange is None:
        exchange = getattr(fn, "__self__", None)
    policy = _ReadRetry(
        op=op or getattr(fn, "__name__", "read"),
        attempts=attempts,
        delays_s=(base_delay_s, max_delay_s, max_retry_after_s),
        exchange=exchange,
        secrets=(*secrets, *(secrets_of(exchange) if exchange is not None else ())),
    )
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (ccxt.BaseError, ExchangeError) as exc:
            delay_s = policy.after_failure(exc, attempt, rng)
        if delay_s is not None:
            sleep(delay_s)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class _ReadRetry:
    """One read under `retry_read`: what a failed attempt means, and how long to wait before the next."""

    op: str
    attempts: int
    delays_s: tuple[float, float, float]
    """(base delay, max delay, longest Retry-After waited out)"""
    exchange: Any
    secrets: tuple[str, ...]
    has_resynced: bool = False
    invalid_key_strikes: int = 0

    def after_failure(self, exc: BaseException, attempt: int, rng: Callable[[], float]) -> float | None:
        """The wait before the next attempt (None: retry at once), or raise the mapped, redacted error."""
        err = map_ccxt_error(exc, secrets=self.secrets)
        self._count_invalid_key(exc, err)
        if not isinstance(err, TemporaryExchangeError):
            # from None: the original exception's text may hold signed URLs; ours is redacted.
            raise err from None
        status, retry_after = retry_after_s(self.exchange, exc)
        self._give_up_if_due(err, attempt, status, retry_after)
        if isinstance(exc, ccxt.InvalidNonce) and not self.has_resynced and self.exchange is not None:
            self.has_resynced = True
            if _resync_time(self.exchange, self.op):
                return None  # the clock was the problem: retry at once
        if retry_after is not None or status == 418:
            return self._rate_limited_wait(err, attempt, status, retry_after)
        # Full jitter (uniform in [0, cap]) spreads retries of many clients; the cap bounds the wait.
        base_delay_s, max_delay_s, _ = self.delays_s
        delay_s = rng() * min(max_delay_s, base_delay_s * 2 ** (attempt - 1))
        log.warning(
            "exchange_retry",
            op=self.op,
            attempt=attempt,
            attempts=self.attempts,
            delay_s=round(delay_s, 3),
            error_class=getattr(err, "ccxt_error", type(err).__name__),
            error=str(err),
        )
        return delay_s

    def _count_invalid_key(self, exc: BaseException, err: ExchangeError) -> None:
        """A -2015 that ccxt did not call an authentication error: the second of one read is one."""
        if not is_invalid_key_error(exc) or isinstance(err, AuthenticationExchangeError):
            return
        self.invalid_key_strikes += 1
        if self.invalid_key_strikes >= INVALID_KEY_STRIKES:
            log.error("exchange_invalid_key", op=self.op, strikes=self.invalid_key_strikes, error=str(err))
            raise AuthenticationExchangeError(
                f"exchange refused the API key {self.invalid_key_strikes} times in a row (-2015 invalid "
                "API-key, IP, or permissions): check the key, its IP allow-list and its permissions"
            ) from None

    def _give_up_if_due(self, err: ExchangeError, attempt: int, status: int | None, retry_after: float | None) -> None:
        """Raise TemporaryExchangeError (with `.retry_after_s`) after the last attempt, or at once when the
        Retry-After is longer than a read may wait (an IP ban of minutes to days)."""
        if retry_after is not None and retry_after > self.delays_s[2]:
            log.warning(
                "exchange_backoff",
                op=self.op,
                attempt=attempt,
                status=status,
                reason="ip_banned" if status == 418 else "rate_limited",
                retry_after_s=retry_after,
                gave_up=True,
                error=str(err),
            )
            out = TemporaryExchangeError(f"{err} (Retry-After {retry_after:g} s is too long to wait in a read)")
        elif attempt == self.attempts:
            log.warning("exchange_gave_up", op=self.op, attempts=self.attempts, error=str(err))
            out = TemporaryExchangeError(f"{err} (gave up after {self.attempts} attempts)")
        else:
            return
        out.retry_after_s = retry_after  # type: ignore[attr-defined]
        raise out from None

    def _rate_limited_wait(
        self, err: ExchangeError, attempt: int, status: int | None, retry_after: float | None
    ) -> float:
        """Wait the response's Retry-After exactly; a 418 without one waits the max delay."""
        # 418 = IP banned for repeating 429s: retrying early lengthens the ban, so never guess short.
        delay_s = retry_after if retry_after is not None else self.delays_s[1]
        log.warning(
            "exchange_backoff",
            op=self.op,
            attempt=attempt,
            attempts=self.attempts,
            status=status,
            reason="ip_banned" if status == 418 else "rate_limited",
            retry_after_s=retry_after,
            delay_s=round(delay_s, 3),
            error=str(err),
        )
        return delay_s


def _resync_time(exchange: Any, op: str) -> bool:
    """Re-measure the offset between the local and the exchange clock (ccxt's load_time_difference)."""
    load = getattr(exchange, "load_time_difference", None)
    if load is None:
        return False
    try:
        offset_ms = load()
    except (ccxt.BaseError, ExchangeError) as exc:
        log.warning("exchange_time_resync_failed", op=op, error=str(map_ccxt_error(exc, secrets=secrets_of(exchange))))
        return False
    log.warning("exchange_time_resync", op=op, time_difference_ms=offset_ms)
    return True


def check_timeframe(timeframe: str) -> None:
    """Refuse any timeframe but 5m: candle times, features and the policy are all built on 5 minutes."""
    if timeframe != SUPPORTED_TIMEFRAME:
        raise ConfigError(f"timeframe {timeframe!r} is not supported: only {SUPPORTED_TIMEFRAME} candles are")


# ---------------------------------------------------------------------------------------------------
# Orders: what a failed send means; fees in quote.
# ---------------------------------------------------------------------------------------------------

ORDER_REJECTED = "rejected"
ORDER_AMBIGUOUS = "ambiguous"
ORDER_AUTH = "auth"

# Order failures after which the order certainly did not reach the matching engine, or was refused by it.
_REJECTED_CLASSES: tuple[type[BaseException], ...] = (
    ccxt.BadRequest,  # -1013 filters (min notional), -1111 precision, -11xx parameters; BadSymbol
    ccxt.InvalidOrder,  # LOT_SIZE, -2010 NEW_ORDER_REJECTED, OrderImmediatelyFillable, ...
    ccxt.InsufficientFunds,
    ccxt.OperationRejected,  # MarketClosed, ...
    ccxt.NotSupported,
    ccxt.ArgumentsRequired,  # raised by ccxt before sending anything
    # Refused at Binance's gateway before the matching engine: timestamp outside recvWindow (-1021) and
    # request/order rate limits (HTTP 429/418, -1003, -1015).
    ccxt.InvalidNonce,
    ccxt.RateLimitExceeded,
    ccxt.DDoSProtection,
)
# Texts that mean "sent, outcome unknown" whatever class ccxt picked (-1006, -1007 and their messages).
_STATUS_UNKNOWN_RE = re.compile(r"(?<![\d.])-100[67](?!\d)|status unknown", re.IGNORECASE)


def classify_order_error(exc: BaseException) -> str:
    """What an order failure means: "rejected" (certainly not executed), "ambiguous" (may have) or "auth".

    Ambiguous is the default for anything not known to be a refusal: a wrong "rejected" can double an
    order, a wrong "ambiguous" costs one lookup. After "ambiguous" the caller must look the order up by
    its client id (fetch_order_by_client_id, and the recent trades) before sending anything again.
    "auth" is exactly the AuthenticationError family (stop, exit 77). A -2015 that ccxt raises as
    DDoSProtection (its "temporary ban" reading, once a private call has succeeded) is "rejected": the
    order did not execute, and the next reads' -2015 rule (retry_read) decides whether the key is gone.
    """
    outcome = getattr(exc, "order_outcome", None)
    if outcome in (ORDER_REJECTED, ORDER_AMBIGUOUS, ORDER_AUTH):
        return str(outcome)
    if isinstance(exc, AuthenticationExchangeError | ccxt.AuthenticationError):
        return ORDER_AUTH
    if is_invalid_key_error(exc):
        return ORDER_REJECTED  # refused at the key check, before the matching engine
    if isinstance(exc, ccxt.BaseError) and _STATUS_UNKNOWN_RE.search(str(exc)):
        return ORDER_AMBIGUOUS  # -1006/-1007: sent, execution status unknown
    if isinstance(exc, ccxt.DuplicateOrderId):
        return ORDER_AMBIGUOUS  # an order with this id exists: find it before deciding anything
    if isinstance(exc, _REJECTED_CLASSES):
        return ORDER_REJECTED
    # RequestTimeout, NetworkError (connection reset), ExchangeNotAvailable (5xx), BadResponse, the bare
    # ccxt.ExchangeError of an unknown code, our own mapped errors, OSError, ...
    return ORDER_AMBIGUOUS


def _base_quote(symbol: str) -> tuple[str, str]:
    pair = symbol.split(":", 1)[0]
    base, _, quote = pair.partition("/")
    if not base or not quote:
        raise ValueError(f"symbol must look like BASE/QUOTE, got {symbol!r}")
    return base, quote


def fee_to_quote(
    fee: Mapping[str, Any] | None, symbol: str, price: float, rates: Mapping[str, float] | None = None
) -> float:
    """A ccxt fee ({cost, currency}) in the quote currency of `symbol`.

    Quote fees count as they are, base fees at the fill `price`, any other currency (BNB) at
    `rates[currency]`, its price in the quote currency (e.g. the BNB/USDT last price); a missing rate is
    a ValueError rather than a silently wrong ledger.
    """
    if not fee or fee.get("cost") in (None, 0, "0"):
        return 0.0
    cost = float(fee["cost"])
    currency = str(fee.get("currency") or "")
    base, quote = _base_quote(symbol)
    if currency == quote:
        return cost
    if currency == base:
        return cost * float(price)
    rate = (rates or {}).get(currency)
    if rate is None or not float(rate) > 0:
        raise ValueError(f"fee charged in {currency or '(no currency)'}: pass its price in {quote} in `rates`")
    return cost * float(rate)


# ---------------------------------------------------------------------------------------------------
# The client: every ccxt call of the product, reads retried with the one policy, orders sent once.
# ---------------------------------------------------------------------------------------------------

# The one read policy (retry_read's defaults), and its quick variant for a price needed right now.
READ_ATTEMPTS = 5
READ_BASE_DELAY_S = 1.0
QUICK_READ_ATTEMPTS = 2
QUICK_READ_BASE_DELAY_S = 0.5
# Binance -4046 "No need to change margin type": the setting is already what was asked.
_ALREADY_SET_RE = re.compile(r"-4046|No need to change")


class ExchangeClient:
    """A ccxt exchange behind typed methods: reads retried with the one policy (`retry_read`), orders never."""

    def __init__(
        self,
        ccxt_exchange: Any,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        # Only bot/exchange/ may touch the ccxt object itself (tests/test_exchange_boundary.py).
        self.ccxt_exchange = ccxt_exchange
        self._sleep = sleep
        self._rng = rng

    # --- identity and facts of the loaded markets (no request) -----------------------------------

    @property
    def id(self) -> str:
        """The ccxt exchange id (binance, binanceusdm, ...)."""
        return str(getattr(self.ccxt_exchange, "id", "?"))

    @property
    def precision_mode(self) -> int:
        """ccxt's precisionMode of the exchange (TICK_SIZE for Binance)."""
        return int(getattr(self.ccxt_exchange, "precisionMode", ccxt.TICK_SIZE))

    @property
    def secrets(self) -> tuple[str, ...]:
        """The credentials set on the exchange, to be redacted from messages."""
        return secrets_of(self.ccxt_exchange)

    def market(self, symbol: str) -> dict[str, Any]:
        """ccxt's description of `symbol` (markets must be loaded: `check_symbol`)."""
        return self.ccxt_exchange.market(symbol)

    def market_rules(self, symbol: str) -> MarketRules:
        """The order-size rules of `symbol` (amount step, minimum amount and notional)."""
        return MarketRules.from_ccxt_market(self.market(symbol), self.precision_mode)

    def amount_to_precision(self, symbol: str, qty: float) -> float:
        """`qty` truncated to the market's amount step by ccxt (never rounded up); 0.0 when below one step."""
        if not qty > 0:
            return 0.0
        try:
            return float(self.ccxt_exchange.amount_to_precision(symbol, qty))
        except ccxt.InvalidOrder:
            # ccxt refuses to return "0" for an amount below one step: that is an amount of zero to us.
            return 0.0

    def min_notional(self, symbol: str) -> float | None:
        """The market's minimum order value in quote (Binance NOTIONAL/MIN_NOTIONAL filter), None if unknown."""
        return self._market_limit(symbol, "cost", "min")

    def min_amount(self, symbol: str) -> float | None:
        """The market's minimum order quantity in base (Binance LOT_SIZE minQty), None if unknown."""
        return self._market_limit(symbol, "amount", "min")

    def _market_limit(self, symbol: str, kind: str, bound: str) -> float | None:
        value = ((self.market(symbol).get("limits") or {}).get(kind) or {}).get(bound)
        return float(value) if value else None

    # --- reads, retried ----------------------------------------------------------------------------

    def _read(
        self,
        fn: Callable[[], T],
        op: str,
        *,
        attempts: int = READ_ATTEMPTS,
        base_delay_s: float = READ_BASE_DELAY_S,
    ) -> T:
        """`fn` under the one read policy, with this client's sleep, jitter and credentials to redact."""
        return retry_read(
            fn,
            attempts=attempts,
            base_delay_s=base_delay_s,
            sleep=self._sleep,
            rng=self._rng,
            op=op,
            exchange=self.ccxt_exchange,
        )

    def check_symbol(self, symbol: str) -> None:
        """Load the markets (retried) and fail clearly when the exchange does not list `symbol`."""
        markets = self._read(self.ccxt_exchange.load_markets, "load_markets")
        if symbol not in (markets or {}):
            close = difflib.get_close_matches(symbol, list(markets or {}), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UnknownSymbolError(f"{self.id} has no market {symbol!r}{hint}")

    def server_time_ms(self) -> int:
        """The exchange's clock in epoch ms (fetch_time, retried); the local clock only if it has none."""
        exchange = self.ccxt_exchange
        if not (getattr(exchange, "has", {}) or {}).get("fetchTime"):
            log.warning("exchange_time_unavailable", exchange=self.id, fallback="local_clock")
            return int(exchange.milliseconds())
        now_ms = self._read(exchange.fetch_time, "fetch_time")
        if not isinstance(now_ms, int | float) or now_ms <= 0:
            raise OperationalExchangeError(f"{self.id} returned a nonsense server time: {now_ms!r}")
        return int(now_ms)

    def fetch_ohlcv_page(
        self, symbol: str, timeframe: str, since_ms: int, limit: int = MAX_OHLCV_LIMIT
    ) -> list[list[Any]]:
        """One fetch_ohlcv call (retried): raw rows with open time >= since_ms, forming candle included."""
        if not 1 <= limit <= MAX_OHLCV_LIMIT:
            raise ValueError(f"limit must be in 1..{MAX_OHLCV_LIMIT}, got {limit}")
        rows = self._read(
            lambda: self.ccxt_exchange.fetch_ohlcv(symbol, timeframe, since=int(since_ms), limit=int(limit)),
            "fetch_ohlcv",
        )
        if not isinstance(rows, list):
            raise OperationalExchangeError(f"{self.id} fetch_ohlcv returned {type(rows).__name__}, not a list")
        return rows

    def iter_closed_candle_pages(
        self,
        symbol: str,
        since_ms: int,
        now_ms: int,
        *,
        until_ms: int | None = None,
        timeframe: str = SUPPORTED_TIMEFRAME,
        limit: int = MAX_OHLCV_LIMIT,
    ) -> Iterator[CandleBatch]:
        """Page through closed candles with `since_ms <= ts_ms < until_ms`; one yielded batch per API call.

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
            rows = self.fetch_ohlcv_page(symbol, timeframe, since_ms, limit)
            if not rows:
                return
            page = ohlcv_batch(rows, now_ms)
            keep = page.ts_ms >= since_ms
            if until_ms is not None:
                keep &= page.ts_ms < until_ms
            page = CandleBatch(page.ts_ms[keep], page.values[keep])
            last_ts_ms = max(int(r[0]) for r in rows)
            next_since_ms = last_ts_ms + CANDLE_MS
            if next_since_ms <= since_ms:
                # An exchange that ignores `since` would loop forever; stop with a clear error instead.
                raise OperationalExchangeError(
                    f"{self.id} fetch_ohlcv returned no candle at or after since={since_ms}: cannot page"
                )
            yield page
            since_ms = next_since_ms

    def fetch_closed_candle_batch(
        self,
        symbol: str,
        since_ms: int,
        now_ms: int,
        timeframe: str = SUPPORTED_TIMEFRAME,
        *,
        until_ms: int | None = None,
    ) -> CandleBatch:
        """All closed candles from since_ms (before until_ms if given), paged; the forming candle dropped."""
        pages = list(self.iter_closed_candle_pages(symbol, since_ms, now_ms, until_ms=until_ms, timeframe=timeframe))
        pages = [p for p in pages if len(p)]
        if not pages:
            return CandleBatch.empty()
        ts = np.concatenate([p.ts_ms for p in pages])
        values = np.concatenate([p.values for p in pages])
        keep = last_copy_rows(ts)  # a candle on two pages: the later page's copy is the fresher one
        return CandleBatch(np.ascontiguousarray(ts[keep]), np.ascontiguousarray(values[keep]))

    def fetch_ticker(self, symbol: str, *, quick: bool = False) -> dict[str, Any]:
        """The ticker of `symbol` (retried; `quick`: two attempts, for a price needed right now)."""
        if quick:
            return self._read(
                lambda: self.ccxt_exchange.fetch_ticker(symbol),
                "fetch_ticker",
                attempts=QUICK_READ_ATTEMPTS,
                base_delay_s=QUICK_READ_BASE_DELAY_S,
            )
        return self._read(lambda: self.ccxt_exchange.fetch_ticker(symbol), "fetch_ticker")

    def fetch_balance(self) -> dict[str, Any]:
        """The account balance (ccxt's structure: free/used/total per currency), read with retries."""
        return self._read(self.ccxt_exchange.fetch_balance, "fetch_balance")

    def fetch_order(self, order_id: str, symbol: str) -> dict[str, Any]:
        """The order with this exchange order id (read, retried)."""
        return self._read(lambda: self.ccxt_exchange.fetch_order(order_id, symbol), "fetch_order")

    def fetch_order_by_client_id(self, symbol: str, client_id: str) -> dict[str, Any] | None:
        """The order with this client id (read, retried), or None when the exchange does not know it.

        Binance: GET /api/v3/order?origClientOrderId=...; -2013 "Order does not exist" is None. Right after an
        ambiguous send the order may not be visible yet: callers poll for a grace period before concluding.
        A filled order's client id may be reused on Binance; the newest order with the id is returned.
        """
        params = {self._client_id_param(lookup=True): client_id}

        def lookup() -> dict[str, Any] | None:
            try:
                return self.ccxt_exchange.fetch_order(None, symbol, params)
            except ccxt.OrderNotFound:
                return None

        return self._read(lookup, "fetch_order_by_client_id")

    def fetch_my_trades(
        self,
        symbol: str,
        *,
        since_ms: int | None = None,
        limit: int | None = None,
        order_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Our trades on `symbol` (optionally since a time, or of one order id on Binance), read with retries."""
        params = {"orderId": order_id} if order_id is not None else {}
        return self._read(
            lambda: self.ccxt_exchange.fetch_my_trades(symbol, since_ms, limit, params), "fetch_my_trades"
        )

    def fetch_positions(self, symbols: list[str]) -> list[dict[str, Any]]:
        """The futures positions of `symbols` (ccxt drops flat ones), read with retries."""
        return self._read(lambda: self.ccxt_exchange.fetch_positions(symbols), "fetch_positions")

    def fetch_position_mode(self, symbol: str | None = None) -> dict[str, Any]:
        """The futures account's position mode (ccxt: {'hedged': bool, 'info': ...}), read with retries."""
        fetch = getattr(self.ccxt_exchange, "fetch_position_mode", None)
        if fetch is None:
            raise ConfigError(f"{self.id}: ccxt cannot read the position mode (fetch_position_mode)")
        return self._read(lambda: fetch(symbol), "fetch_position_mode")

    def check_key_permissions(self) -> dict[str, Any]:
        """The API key's permissions (Binance GET /sapi/v1/account/apiRestrictions); refuses a key that can withdraw.

        A withdrawal-enabled key raises AuthenticationExchangeError (exit 77, like any key the exchange
        refuses): the fix is made on the exchange's API management page, not in our settings, and a leaked
        trading key must not be able to move funds out. Where the exchange reports nothing (other exchanges,
        Binance's testnet and demo trading have no /sapi) the result says checked=False and is logged.
        """
        method = getattr(self.ccxt_exchange, "sapi_get_account_apirestrictions", None)
        if method is None:
            log.warning("exchange_key_permissions_unavailable", exchange=self.id, reason="not reported")
            return {"checked": False}
        try:
            raw = self._read(method, "check_key_permissions")
        except OperationalExchangeError as exc:
            if getattr(exc, "ccxt_error", "") != "NotSupported":
                raise
            log.warning("exchange_key_permissions_unavailable", exchange=self.id, reason="no sapi endpoint")
            return {"checked": False}
        if not isinstance(raw, Mapping):
            raise OperationalExchangeError(f"{self.id} apiRestrictions returned {type(raw).__name__}, not an object")
        result = {
            "checked": True,
            "can_withdraw": bool(raw.get("enableWithdrawals")),
            "can_trade_spot": bool(raw.get("enableSpotAndMarginTrading")),
            "can_trade_futures": bool(raw.get("enableFutures")),
            "can_transfer": bool(raw.get("enableInternalTransfer") or raw.get("permitsUniversalTransfer")),
            "ip_restricted": bool(raw.get("ipRestrict")),
        }
        if result["can_withdraw"]:
            log.error("exchange_key_can_withdraw", exchange=self.id)
            raise AuthenticationExchangeError(
                "the API key can withdraw funds: ritmo refuses it; create a key without the withdrawal "
                "permission (Binance: API management, untick 'Enable Withdrawals') and restrict it to your IP"
            )
        if not result["ip_restricted"]:
            log.warning("exchange_key_not_ip_restricted", exchange=self.id)
        log.info("exchange_key_permissions", exchange=self.id, **{k: v for k, v in result.items() if k != "checked"})
        return result

    # --- writes, sent once -------------------------------------------------------------------------

    def _client_id_param(self, *, lookup: bool) -> str:
        # Binance names the id newClientOrderId when placing and origClientOrderId when querying.
        if self.id.startswith("binance"):
            return "origClientOrderId" if lookup else "newClientOrderId"
        return "clientOrderId"

    def create_market_order(
        self,
        symbol: str,
        side: str,
        qty_base: float,
        client_id: str,
        *,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send one market order for `qty_base` (price=None, never quoteOrderQty), never retried.

        `params` go to ccxt as they are (futures: {"reduceOnly": True}). Raises our mapped error with
        `.order_outcome` set by classify_order_error.
        """
        if side not in ("buy", "sell"):
            raise ValueError(f"side must be 'buy' or 'sell', got {side!r}")
        if not CLIENT_ORDER_ID_RE.match(client_id):
            raise ValueError(f"client order id {client_id!r} does not match {CLIENT_ORDER_ID_RE.pattern}")
        if not qty_base > 0:
            raise ValueError(f"qty_base must be > 0, got {qty_base}")
        params = {**(params or {}), self._client_id_param(lookup=False): client_id}
        try:
            # price=None: with a price, ccxt turns a Binance spot market buy into a quote amount (quoteOrderQty).
            return self.ccxt_exchange.create_order(symbol, "market", side, qty_base, None, params)
        except (ccxt.BaseError, ExchangeError) as exc:
            err = map_ccxt_error(exc, secrets=self.secrets)
            outcome = classify_order_error(exc)
        except OSError as exc:  # a socket error that escaped ccxt's wrapping: the request may have left
            err = TemporaryExchangeError(f"order send failed ({type(exc).__name__}): {redact(str(exc))}")
            outcome = ORDER_AMBIGUOUS
        err.order_outcome = outcome  # type: ignore[attr-defined]
        raise err from None

    def set_margin_mode(self, margin_mode: str, symbol: str) -> bool:
        """Set the futures margin mode of `symbol` (sent once); False when it was so already (Binance -4046)."""
        return self._set(lambda: self.ccxt_exchange.set_margin_mode(margin_mode, symbol))

    def set_leverage(self, leverage: int, symbol: str) -> bool:
        """Set the futures leverage of `symbol` (sent once); False when it was so already."""
        return self._set(lambda: self.ccxt_exchange.set_leverage(leverage, symbol))

    def _set(self, call: Callable[[], object]) -> bool:
        """Send one account setting; "no need to change" is success, anything else is mapped and raised."""
        try:
            call()
        except Exception as exc:  # whatever the call raised, mapped right here, with the credentials redacted
            if _ALREADY_SET_RE.search(str(exc)):
                return False
            raise map_ccxt_error(exc, secrets=self.secrets) from None
        return True
