"""A fake exchange that speaks the part of ccxt's unified API ritmo uses, with no network.

Behaves like Binance spot where it matters to us:
- `fetch_ohlcv` returns up to `limit` (default 500, capped at 1000) candles with open time >= `since`,
  oldest first, INCLUDING the still-forming candle at the fake's clock, with a partial OHLCV;
  without `since` it returns the most recent `limit` candles.
- unknown symbols raise `ccxt.BadSymbol`; failures are injected as ccxt's own exception classes, with
  the messages ccxt.binance builds from Binance's answers (see `binance_error`).
- orders: `create_order(symbol, 'market', side, amount, None, params={'newClientOrderId': ...})` fills at
  once at `fill_price` (default: the ticker's last), checked like Binance (LOT_SIZE step and minimum ->
  InvalidOrder, NOTIONAL -> BadRequest -1013, balance -> InsufficientFunds), with a fee in the quote
  currency, the base currency, the asset received (Binance's default) or BNB, as configured; partial
  fills on command (status 'expired', as Binance ends a market order the book could not fill); a
  filled order's client id may be reused, and a lookup by client id finds the newest order.
- `fetch_order` (by id or `origClientOrderId`), `fetch_my_trades`, `fetch_balance` (free/used/total,
  kept consistent with every fill), `fetch_ticker`, `amount_to_precision` (TICK_SIZE, truncating).

Faults, on command: `fail_next` (raise before the call does anything, optionally with a Retry-After
header), `fail_after_execute` (the call does its work, e.g. an order executes, then raises: a timeout
or a 5xx on the way back), `rate_limit_next` (HTTP 429/418 as ccxt.binance reports them: DDoSProtection,
with Retry-After in `last_response_headers`), `partial_fill_next`, and `down_for(ms)`: every call raises
ExchangeNotAvailable until the fake's clock has moved past that time (`down_for(ms, methods=...)`: only those
calls, e.g. the private API down while market data still answers). `order_visibility_lag_ms`: an order and its
trades stay invisible to `fetch_order`/`fetch_my_trades` for that long after they execute (Binance's -2013
"Order does not exist" right after a timed-out send).

Every public method starts with `_enter(name)`, which counts the call and raises any injected failure.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Any

import ccxt
import pandas as pd

CANDLE_MS = 300_000
# Binance's own limits for /api/v3/klines.
DEFAULT_OHLCV_LIMIT = 500
MAX_OHLCV_LIMIT = 1000


def _market(symbol: str) -> dict[str, Any]:
    base, quote = symbol.split("/")
    return {
        "id": f"{base}{quote}",
        "symbol": symbol,
        "base": base,
        "quote": quote,
        "baseId": base,
        "quoteId": quote,
        "type": "spot",
        "spot": True,
        "contract": False,
        "linear": None,
        "active": True,
        "taker": 0.001,
        "maker": 0.001,
        "precision": {"amount": 1e-05, "price": 0.01},
        "limits": {"amount": {"min": 1e-05, "max": 9000.0}, "cost": {"min": 5.0, "max": None}},
        "info": {"symbol": f"{base}{quote}", "orderTypes": ["LIMIT", "MARKET"]},
    }


# Binance's answers as ccxt.binance turns them into exceptions (class and message), for fail_next.
_BINANCE_ERRORS: dict[str, tuple[type[ccxt.BaseError], str]] = {
    "min_notional": (ccxt.BadRequest, 'binance {"code":-1013,"msg":"Filter failure: NOTIONAL"}'),
    "lot_size": (
        ccxt.InvalidOrder,
        'binance order amount should be evenly divisible by lot size {"code":-1013,"msg":"Filter failure: LOT_SIZE"}',
    ),
    "insufficient": (
        ccxt.InsufficientFunds,
        "binance Account has insufficient balance for requested action. "
        '{"code":-2010,"msg":"Account has insufficient balance for requested action."}',
    ),
    "invalid_key": (
        ccxt.AuthenticationError,
        'binance {"code":-2015,"msg":"Invalid API-key, IP, or permissions for action."}',
    ),
    # ccxt.binance raises a -2015 as DDoSProtection once a private call has succeeded in this process.
    "invalid_key_after_auth": (
        ccxt.DDoSProtection,
        'binance {"code":-2015,"msg":"Invalid API-key, IP, or permissions for action."}',
    ),
    "nonce": (
        ccxt.InvalidNonce,
        'binance {"code":-1021,"msg":"Timestamp for this request is outside of the recvWindow."}',
    ),
    "timeout": (ccxt.RequestTimeout, "binance POST https://api.binance.com/api/v3/order"),
    "500": (
        ccxt.ExchangeNotAvailable,
        "binance POST https://api.binance.com/api/v3/order 500 Internal Server Error <html>500</html>",
    ),
    "1007": (
        ccxt.RequestTimeout,
        'binance {"code":-1007,"msg":"Timeout waiting for response from backend server. '
        'Send status unknown; execution status unknown."}',
    ),
    "reset": (ccxt.NetworkError, "binance POST https://api.binance.com/api/v3/order"),
    "rate_limit": (
        ccxt.DDoSProtection,
        'binance 429 Too Many Requests {"code":-1003,"msg":"Too much request weight used; '
        'current limit is 6000 request weight per 1 MINUTE."}',
    ),
    "ip_banned": (
        ccxt.DDoSProtection,
        'binance 418 I\'m a teapot {"code":-1003,"msg":"Way too much request weight used; IP banned."}',
    ),
}
BINANCE_ERROR_KINDS = tuple(_BINANCE_ERRORS)


def binance_error(kind: str) -> ccxt.BaseError:
    """The exception ccxt.binance raises for a Binance answer, e.g. binance_error("min_notional")."""
    cls, message = _BINANCE_ERRORS[kind]
    return cls(message)


@dataclass
class _Injected:
    """A queued failure: the exception, and the response headers ccxt would have kept with it."""

    exc: BaseException | type[BaseException] | None
    headers: dict[str, str] | None = None


def _dec(x: float) -> Decimal:
    # ccxt works on the float's shortest repr; so does the fake.
    return Decimal(repr(float(x)))


class FakeExchange:
    """In-memory stand-in for a ccxt exchange: candles, orders and balances, a settable clock, fault injection.

    fee_asset: "quote" (fee = fee_rate x cost, paid in quote), "base" (fee_rate x amount, paid in base),
    "received" (Binance's default: base on a buy, quote on a sell) or "BNB" (bnb_fee_rate x cost at
    bnb_price, paid in BNB; the received asset when the BNB balance is short, as Binance does).
    """

    def __init__(
        self,
        candles: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
        *,
        symbol: str = "BTC/USDT",
        now_ms: int | None = None,
        exchange_id: str = "binance",
        extra_symbols: tuple[str, ...] = ("ETH/USDT",),
        balances: Mapping[str, float] | None = None,
        fee_rate: float = 0.001,
        fee_asset: str = "quote",
        bnb_price: float = 600.0,
        bnb_fee_rate: float = 0.00075,
    ) -> None:
        if candles is None:
            candles = {}
        if isinstance(candles, pd.DataFrame):
            candles = {symbol: candles}
        self.id = exchange_id
        self.apiKey = ""
        self.secret = ""
        self.has: dict[str, bool] = {"fetchOHLCV": True, "fetchTime": True, "fetchTicker": True}
        # ccxt.TICK_SIZE: market precisions are step sizes (1e-05), as ccxt reports Binance's.
        self.precisionMode = 4
        # fetch_ticker's `last`; None = the close of the newest candle visible at the fake's clock.
        self.ticker_last: float | None = None
        self.timeframes: dict[str, str] = {
            tf: tf for tf in ("1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "1d", "1w")
        }
        self._candles: dict[str, pd.DataFrame] = {}
        for sym, df in candles.items():
            self.set_candles(sym, df)
        self.markets: dict[str, dict[str, Any]] = {sym: _market(sym) for sym in (*self._candles, *extra_symbols)}
        if now_ms is None:
            # Default clock: just after the last candle closed, so nothing is forming.
            last = [int(df["ts_ms"].iloc[-1]) for df in self._candles.values() if len(df)]
            now_ms = max(last) + CANDLE_MS if last else 1_704_067_200_000
        self.now_ms = int(now_ms)
        self.calls: Counter[str] = Counter()
        # Every call with its arguments, e.g. ("fetch_ohlcv", {"since": ..., "limit": ...}).
        self.call_log: list[tuple[str, dict[str, Any]]] = []
        # Per method: None lets one call through, anything else is raised (see fail_next).
        self._failures: dict[str, deque[_Injected]] = defaultdict(deque)
        # Raised after the call has done its work (see fail_after_execute).
        self._failures_after: dict[str, deque[_Injected]] = defaultdict(deque)
        self.has.update({"createOrder": True, "fetchOrder": True, "fetchMyTrades": True, "fetchBalance": True})
        # ccxt.binance's clock options: load_time_difference() sets timeDifference (counted in calls).
        self.options: dict[str, Any] = {"adjustForTimeDifference": True, "timeDifference": 0}
        # Headers of the last (failed) response, as ccxt keeps them; set by rate_limit_next.
        self.last_response_headers: dict[str, str] | None = None
        # Order fills: None = the ticker's last price of the symbol.
        self.fill_price: float | None = None
        # fetch_ticker's `last` per symbol, over ticker_last (e.g. BNB/USDT for BNB fees).
        self.ticker_prices: dict[str, float] = {}
        self.fee_rate = float(fee_rate)
        if fee_asset not in ("quote", "base", "received", "BNB"):
            raise ValueError(f"fee_asset must be quote, base, received or BNB, not {fee_asset!r}")
        self.fee_asset = fee_asset
        self.bnb_fee_rate = float(bnb_fee_rate)
        if fee_asset == "BNB":
            self.set_ticker_price("BNB/USDT", bnb_price)
        # Trades per order (Binance splits a market order over the book levels it takes).
        self.fills_per_order = 1
        self._balances: dict[str, list[Decimal]] = {}  # currency -> [free, used]
        for currency, amount in (balances if balances is not None else {"USDT": 10_000.0}).items():
            self._balances[currency] = [_dec(amount), Decimal(0)]
        self.orders: list[dict[str, Any]] = []
        self.trades: list[dict[str, Any]] = []
        self._partial: deque[float] = deque()
        # Every call raises ExchangeNotAvailable while now_ms < down_until_ms (see down_for); with
        # down_methods set, only calls of those methods do.
        self.down_until_ms: int | None = None
        self.down_methods: frozenset[str] | None = None
        # Orders and trades younger than this are not found by fetch_order / fetch_my_trades (0: at once).
        self.order_visibility_lag_ms = 0
        self._next_order_id = 1000
        self._next_trade_id = 5000

    # -- test controls ------------------------------------------------------------------------------

    def set_candles(self, symbol: str, df: pd.DataFrame) -> None:
        """Serve `df` (columns ts_ms, open, high, low, close, volume) as the history of `symbol`."""
        self._candles[symbol] = df.sort_values("ts_ms").reset_index(drop=True)
        if hasattr(self, "markets"):
            self.markets.setdefault(symbol, _market(symbol))

    def advance(self, ms: int) -> None:
        """Move the fake's clock forward."""
        self.now_ms += int(ms)

    def fail_next(
        self,
        method_name: str,
        exc: BaseException | type[BaseException] | str,
        times: int = 1,
        *,
        after: int = 0,
        retry_after_s: float | None = None,
    ) -> None:
        """Make `times` calls of `method_name` raise `exc` before doing anything.

        `exc` is a ccxt exception class or instance, or a kind of binance_error ("min_notional", ...).
        The failures start after `after` more successful calls of that method (0: the very next call),
        which is how a test interrupts a download mid-way. `retry_after_s` puts a Retry-After header in
        `last_response_headers` when the failure is raised, as ccxt keeps the failed response's headers.
        """
        headers = None if retry_after_s is None else {"Retry-After": f"{retry_after_s:g}"}
        queue = self._failures[method_name]
        queue.extend([_Injected(None)] * after)
        for _ in range(times):
            queue.append(_Injected(binance_error(exc) if isinstance(exc, str) else exc, headers))

    def fail_after_execute(
        self, method_name: str, exc: BaseException | type[BaseException] | str, times: int = 1
    ) -> None:
        """Make the next `times` calls of `method_name` do their work (an order executes), then raise `exc`."""
        for _ in range(times):
            self._failures_after[method_name].append(_Injected(binance_error(exc) if isinstance(exc, str) else exc))

    def rate_limit_next(self, method_name: str, retry_after_s: float, *, status: int = 429, times: int = 1) -> None:
        """HTTP 429 (or 418, IP banned) with Retry-After, raised as ccxt.binance does: DDoSProtection."""
        kind = {429: "rate_limit", 418: "ip_banned"}[status]
        self.fail_next(method_name, kind, times, retry_after_s=retry_after_s)

    def partial_fill_next(self, ratio: float, times: int = 1) -> None:
        """The next `times` orders fill only `ratio` of their amount (rounded down to the step)."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError("ratio must be in [0, 1)")
        self._partial.extend([ratio] * times)

    def down_for(self, ms: int, *, methods: tuple[str, ...] | None = None) -> None:
        """Every call (or every call of `methods`) raises ExchangeNotAvailable until the clock has advanced `ms`."""
        self.down_until_ms = self.now_ms + int(ms)
        self.down_methods = None if methods is None else frozenset(methods)

    def set_ticker_price(self, symbol: str, price: float) -> None:
        """fetch_ticker(symbol)'s last price (and the fill price of its orders unless fill_price is set)."""
        self.ticker_prices[symbol] = float(price)
        self.markets.setdefault(symbol, _market(symbol))

    def set_balance(self, currency: str, free: float, used: float = 0.0) -> None:
        """Set one currency's free and used balance."""
        self._balances[currency] = [_dec(free), _dec(used)]

    def balance(self, currency: str) -> float:
        """Total (free + used) of a currency, for assertions."""
        free, used = self._balances.get(currency, [Decimal(0), Decimal(0)])
        return float(free + used)

    def _raise(self, injected: _Injected, method_name: str) -> None:
        exc = injected.exc
        assert exc is not None
        if isinstance(exc, type):
            exc = exc(f"{self.id} {method_name} injected {exc.__name__}")
        self.last_response_headers = injected.headers
        raise exc

    def _enter(self, method_name: str, **kwargs: Any) -> None:
        """Count the call and raise the next injected failure for this method, if any."""
        self.calls[method_name] += 1
        self.call_log.append((method_name, kwargs))
        if self.down_until_ms is not None:
            if self.now_ms < self.down_until_ms:
                if self.down_methods is None or method_name in self.down_methods:
                    self.last_response_headers = None
                    raise ccxt.ExchangeNotAvailable(
                        f"{self.id} {method_name} 503 Service Unavailable (down until {self.down_until_ms})"
                    )
            else:
                self.down_until_ms = None
                self.down_methods = None
        queue = self._failures.get(method_name)
        if queue:
            injected = queue.popleft()
            if injected.exc is None:
                return  # a call that was scheduled to succeed before the failures start
            self._raise(injected, method_name)

    def _exit(self, method_name: str) -> None:
        """After the call did its work: raise the next after-execute failure for this method, if any."""
        queue = self._failures_after.get(method_name)
        if queue:
            self._raise(queue.popleft(), method_name)

    # -- ccxt unified API ---------------------------------------------------------------------------

    def milliseconds(self) -> int:
        """ccxt's local clock; here the fake's clock."""
        return self.now_ms

    def fetch_time(self, params: dict | None = None) -> int:
        """Server time in epoch ms."""
        self._enter("fetch_time")
        return self.now_ms

    def load_markets(self, reload: bool = False, params: dict | None = None) -> dict[str, dict[str, Any]]:
        """The markets, keyed by unified symbol."""
        self._enter("load_markets", reload=reload)
        return self.markets

    def market(self, symbol: str) -> dict[str, Any]:
        """One market, or ccxt.BadSymbol as ccxt raises it."""
        if symbol not in self.markets:
            raise ccxt.BadSymbol(f"{self.id} does not have market symbol {symbol}")
        return self.markets[symbol]

    def fetch_ohlcv(
        self,
        symbol: str,
        timeframe: str = "1m",
        since: int | None = None,
        limit: int | None = None,
        params: dict | None = None,
    ) -> list[list[float]]:
        """Candles like Binance: oldest first, open time >= since, up to limit, forming candle partial."""
        self._enter("fetch_ohlcv", symbol=symbol, timeframe=timeframe, since=since, limit=limit)
        self.market(symbol)
        if timeframe not in self.timeframes:
            raise ccxt.BadRequest(f"{self.id} Invalid interval {timeframe}")
        if timeframe != "5m":
            raise ccxt.NotSupported(f"{self.id} fake serves 5m candles only, not {timeframe}")
        limit = min(DEFAULT_OHLCV_LIMIT if limit is None else int(limit), MAX_OHLCV_LIMIT)
        df = self._candles.get(symbol)
        if df is None or limit <= 0:
            return []
        ts = df["ts_ms"].to_numpy()
        # Nothing that opens after "now" exists yet.
        visible = df[ts <= self.now_ms]
        if since is not None:
            page = visible[visible["ts_ms"] >= int(since)].head(limit)
        else:
            page = visible.tail(limit)
        rows = [
            [int(t), float(o), float(h), float(lo), float(c), float(v)]
            for t, o, h, lo, c, v in page[["ts_ms", "open", "high", "low", "close", "volume"]].itertuples(
                index=False, name=None
            )
        ]
        if rows and rows[-1][0] + CANDLE_MS > self.now_ms:
            rows[-1] = self._forming(rows[-1])
        return rows

    def fetch_ticker(self, symbol: str, params: dict | None = None) -> dict[str, Any]:
        """A ticker like ccxt's: `last` is ticker_last if set, else the newest visible candle's (partial) close."""
        self._enter("fetch_ticker", symbol=symbol)
        self.market(symbol)
        last = self._last_price(symbol)
        return {"symbol": symbol, "timestamp": self.now_ms, "last": last, "close": last}

    def _last_price(self, symbol: str) -> float | None:
        """The ticker's last price, without counting a call: ticker_prices, ticker_last, else the candles."""
        if symbol in self.ticker_prices:
            return self.ticker_prices[symbol]
        last = self.ticker_last
        df = self._candles.get(symbol)
        if last is None and df is not None:
            visible = df[df["ts_ms"].to_numpy() <= self.now_ms]
            if len(visible):
                t, o, h, lo, c, v = visible[["ts_ms", "open", "high", "low", "close", "volume"]].iloc[-1].tolist()
                row = [int(t), o, h, lo, c, v]
                last = self._forming(row)[4] if row[0] + CANDLE_MS > self.now_ms else c
        return last

    def _forming(self, row: list[float]) -> list[float]:
        """The candle as it looks part-way through: close drifts from open, volume so far (always differs)."""
        ts, o, h, lo, c, v = row
        frac = (self.now_ms - ts) / CANDLE_MS  # in [0, 1)
        close = o + (c - o) * frac * 0.5 + o * 1e-4  # never equal to the final close
        high = max(o, close, o + (h - o) * frac)
        low = min(o, close, o - (o - lo) * frac)
        return [int(ts), o, high, low, close, v * frac * 0.5]

    # -- clock sync, balances, orders, trades -------------------------------------------------------

    def load_time_difference(self, params: dict | None = None) -> int:
        """ccxt's clock resync: the fake's clocks agree, so the offset is 0 (the call is counted)."""
        self._enter("load_time_difference")
        self.options["timeDifference"] = 0
        return 0

    def amount_to_precision(self, symbol: str, amount: float) -> str:
        """Like ccxt in TICK_SIZE mode: truncated to the amount step; InvalidOrder when that leaves 0."""
        step = _dec(self.market(symbol)["precision"]["amount"])
        value = (_dec(amount) / step).to_integral_value(rounding=ROUND_DOWN) * step
        if value == 0:
            raise ccxt.InvalidOrder(
                f"{self.id} amount of {symbol} must be greater than minimum amount precision of {step}"
            )
        return f"{value.normalize():f}"

    def fetch_balance(self, params: dict | None = None) -> dict[str, Any]:
        """ccxt's balance structure: free/used/total per currency and by kind."""
        self._enter("fetch_balance")
        out: dict[str, Any] = {"info": {}, "free": {}, "used": {}, "total": {}}
        for currency, (free, used) in sorted(self._balances.items()):
            entry = {"free": float(free), "used": float(used), "total": float(free + used)}
            out[currency] = entry
            for kind in ("free", "used", "total"):
                out[kind][currency] = entry[kind]
        out["timestamp"] = self.now_ms
        return out

    def create_order(
        self,
        symbol: str,
        type: str,
        side: str,
        amount: float,
        price: float | None = None,
        params: dict | None = None,
    ) -> dict[str, Any]:
        """A market order that fills at once (or partly, on command), checked and charged like Binance."""
        params = dict(params or {})
        self._enter("create_order", symbol=symbol, type=type, side=side, amount=amount, price=price, params=params)
        market = self.market(symbol)
        if type != "market":
            raise ccxt.InvalidOrder(f"{self.id} fake: market orders only, not {type}")
        if price is not None:
            # ccxt.binance would send a spot market BUY with a price as quoteOrderQty (amount x price).
            raise ValueError("fake: market orders must pass price=None (ccxt would send quoteOrderQty)")
        if side not in ("buy", "sell"):
            raise ccxt.BadRequest(f'{self.id} {{"code":-1117,"msg":"Invalid side."}}')
        qty = _dec(amount)
        step = _dec(market["precision"]["amount"])
        limits = market["limits"]
        if qty % step != 0 or qty < _dec(limits["amount"]["min"]) or qty > _dec(limits["amount"]["max"]):
            raise binance_error("lot_size")
        fill_price = self.fill_price if self.fill_price is not None else self._last_price(symbol)
        if fill_price is None:
            raise ccxt.ExchangeError(f"{self.id} fake: no price for {symbol}: set fill_price or candles")
        price_d = _dec(fill_price)
        min_cost = limits["cost"]["min"]
        if min_cost is not None and qty * price_d < _dec(min_cost):
            raise binance_error("min_notional")
        base, quote = market["base"], market["quote"]
        ratio = self._partial.popleft() if self._partial else 1.0
        filled = (qty * _dec(ratio) / step).to_integral_value(rounding=ROUND_DOWN) * step if ratio < 1 else qty
        # Balance check on the whole order, as Binance does before matching.
        bal = self._balances
        for currency in (base, quote):
            bal.setdefault(currency, [Decimal(0), Decimal(0)])
        need_cur, need = (quote, qty * price_d) if side == "buy" else (base, qty)
        fee_cur, _ = self._fee(side, qty, qty * price_d, base, quote)
        if fee_cur == need_cur and self.fee_asset in ("quote", "base"):
            need += self._fee(side, qty, qty * price_d, base, quote)[1]
        if bal[need_cur][0] < need:
            raise binance_error("insufficient")
        order_id = str(self._next_order_id)
        self._next_order_id += 1
        client_id = params.get("newClientOrderId") or params.get("clientOrderId") or f"x-fake{order_id}"
        trades = []
        n = max(1, min(self.fills_per_order, int(filled / step))) if filled > 0 else 0
        piece = (filled / n / step).to_integral_value(rounding=ROUND_DOWN) * step if n else Decimal(0)
        for i in range(n):
            part = piece if i < n - 1 else filled - piece * (n - 1)
            # Later book levels are a tick worse.
            tick = _dec(market["precision"]["price"]) * i
            p = price_d + tick if side == "buy" else price_d - tick
            cost = part * p
            fee_cur, fee = self._fee(side, part, cost, base, quote)
            if side == "buy":
                bal[quote][0] -= cost
                bal[base][0] += part
            else:
                bal[base][0] -= part
                bal[quote][0] += cost
            bal.setdefault(fee_cur, [Decimal(0), Decimal(0)])[0] -= fee
            trade_id = str(self._next_trade_id)
            self._next_trade_id += 1
            trade_fee = {"cost": float(fee), "currency": fee_cur}
            trades.append(
                {
                    "id": trade_id,
                    "order": order_id,
                    "timestamp": self.now_ms,
                    "datetime": _iso(self.now_ms),
                    "symbol": symbol,
                    "type": "market",
                    "side": side,
                    "takerOrMaker": "taker",
                    "price": float(p),
                    "amount": float(part),
                    "cost": float(cost),
                    "fee": trade_fee,
                    "fees": [dict(trade_fee)],
                    "info": {"orderId": order_id, "commissionAsset": fee_cur, "commission": str(fee)},
                }
            )
        self.trades.extend(trades)
        total_cost = sum((_dec(t["cost"]) for t in trades), Decimal(0))
        fees_by_cur: dict[str, Decimal] = {}
        for t in trades:
            cur = t["fee"]["currency"]
            fees_by_cur[cur] = fees_by_cur.get(cur, Decimal(0)) + _dec(t["fee"]["cost"])
        fees = [{"cost": float(c), "currency": cur} for cur, c in fees_by_cur.items()]
        average = float(total_cost / filled) if filled > 0 else None
        status = "closed" if filled == qty else "expired"
        order = {
            "id": order_id,
            "clientOrderId": client_id,
            "timestamp": self.now_ms,
            "datetime": _iso(self.now_ms),
            "lastTradeTimestamp": self.now_ms if trades else None,
            "symbol": symbol,
            "type": "market",
            "timeInForce": "GTC",
            "postOnly": False,
            "reduceOnly": None,
            "side": side,
            "price": average,
            "average": average,
            "amount": float(qty),
            "filled": float(filled),
            "remaining": float(qty - filled),
            "cost": float(total_cost),
            "status": status,
            "fee": dict(fees[0]) if len(fees) == 1 else None,
            "fees": fees,
            "trades": trades,
            "info": {
                "orderId": order_id,
                "clientOrderId": client_id,
                "status": "FILLED" if status == "closed" else "EXPIRED",
                "origQty": str(qty),
                "executedQty": str(filled),
                "cummulativeQuoteQty": str(total_cost),
            },
        }
        self.orders.append(order)
        self._exit("create_order")
        return copy.deepcopy(order)

    def _fee(self, side: str, qty: Decimal, cost: Decimal, base: str, quote: str) -> tuple[str, Decimal]:
        """(currency, amount) of the fee on a fill of `qty` base for `cost` quote."""
        received = base if side == "buy" else quote
        if self.fee_asset == "BNB":
            bnb_price = self.ticker_prices.get(f"BNB/{quote}")
            if bnb_price:
                bnb = (cost * _dec(self.bnb_fee_rate) / _dec(bnb_price)).quantize(Decimal("1e-8"), ROUND_DOWN)
                if self._balances.get("BNB", [Decimal(0)])[0] >= bnb:
                    return "BNB", bnb
            currency = received  # not enough BNB: Binance charges the received asset instead
        elif self.fee_asset == "received":
            currency = received
        else:
            currency = base if self.fee_asset == "base" else quote
        rate = _dec(self.fee_rate)
        amount = cost * rate if currency == quote else qty * rate
        return currency, amount.quantize(Decimal("1e-8"), ROUND_DOWN)

    def _visible(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Orders or trades the exchange's queries already show (see order_visibility_lag_ms)."""
        if not self.order_visibility_lag_ms:
            return items
        return [x for x in items if x["timestamp"] + self.order_visibility_lag_ms <= self.now_ms]

    def fetch_order(self, id: str | None, symbol: str | None = None, params: dict | None = None) -> dict[str, Any]:
        """An order by id or by params origClientOrderId/clientOrderId (the newest one with that id)."""
        params = dict(params or {})
        self._enter("fetch_order", id=id, symbol=symbol, params=params)
        if symbol is None:
            raise ccxt.ArgumentsRequired(f"{self.id} fetchOrder() requires a symbol argument")
        client_id = params.get("origClientOrderId") or params.get("clientOrderId")
        found = [
            o
            for o in self._visible(self.orders)
            if o["symbol"] == symbol and ((id is not None and o["id"] == str(id)) or o["clientOrderId"] == client_id)
        ]
        if not found:
            raise ccxt.OrderNotFound(f'{self.id} {{"code":-2013,"msg":"Order does not exist."}}')
        order = copy.deepcopy(found[-1])
        self._exit("fetch_order")
        return order

    def fetch_my_trades(
        self, symbol: str | None = None, since: int | None = None, limit: int | None = None, params: dict | None = None
    ) -> list[dict[str, Any]]:
        """Our trades, oldest first; `since` in ms, params orderId filters one order (as on Binance)."""
        params = dict(params or {})
        self._enter("fetch_my_trades", symbol=symbol, since=since, limit=limit, params=params)
        if symbol is None:
            raise ccxt.ArgumentsRequired(f"{self.id} fetchMyTrades() requires a symbol argument")
        out = [t for t in self._visible(self.trades) if t["symbol"] == symbol]
        if since is not None:
            out = [t for t in out if t["timestamp"] >= since]
        if "orderId" in params:
            out = [t for t in out if t["order"] == str(params["orderId"])]
        out = out[: limit or 500]
        self._exit("fetch_my_trades")
        return copy.deepcopy(out)


def _iso(ms: int) -> str:
    return pd.Timestamp(ms, unit="ms", tz="UTC").strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
