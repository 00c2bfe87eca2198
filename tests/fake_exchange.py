"""A fake exchange that speaks the part of ccxt's unified API ritmo uses, with no network.

Behaves like Binance spot where it matters to us:
- `fetch_ohlcv` returns up to `limit` (default 500, capped at 1000) candles with open time >= `since`,
  oldest first, INCLUDING the still-forming candle at the fake's clock, with a partial OHLCV;
  without `since` it returns the most recent `limit` candles.
- unknown symbols raise `ccxt.BadSymbol`; failures are injected as ccxt's own exception classes.

State is plain dictionaries keyed by method or symbol, and every public method starts with `_enter(name)`
(counting the call and raising any injected failure), so order and balance methods (`create_order`,
`fetch_order`, `fetch_open_orders`, `cancel_order`, `fetch_balance`, `fetch_ticker`) slot in later with
the same counters and fault injection.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Mapping
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
        "type": "spot",
        "spot": True,
        "active": True,
        "precision": {"amount": 1e-05, "price": 0.01},
        "limits": {"amount": {"min": 1e-05, "max": 9000.0}, "cost": {"min": 5.0, "max": None}},
    }


class FakeExchange:
    """In-memory stand-in for a ccxt exchange: candles from DataFrames, a settable clock, fault injection."""

    def __init__(
        self,
        candles: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
        *,
        symbol: str = "BTC/USDT",
        now_ms: int | None = None,
        exchange_id: str = "binance",
        extra_symbols: tuple[str, ...] = ("ETH/USDT",),
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
        self.markets: dict[str, dict[str, Any]] = {
            sym: _market(sym) for sym in (*self._candles, *extra_symbols)
        }
        if now_ms is None:
            # Default clock: just after the last candle closed, so nothing is forming.
            last = [int(df["ts_ms"].iloc[-1]) for df in self._candles.values() if len(df)]
            now_ms = max(last) + CANDLE_MS if last else 1_704_067_200_000
        self.now_ms = int(now_ms)
        self.calls: Counter[str] = Counter()
        # Every call with its arguments, e.g. ("fetch_ohlcv", {"since": ..., "limit": ...}).
        self.call_log: list[tuple[str, dict[str, Any]]] = []
        # Per method: None lets one call through, anything else is raised (see fail_next).
        self._failures: dict[str, deque[BaseException | type[BaseException] | None]] = defaultdict(deque)

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
        exc: BaseException | type[BaseException],
        times: int = 1,
        *,
        after: int = 0,
    ) -> None:
        """Make `times` calls of `method_name` raise `exc` (a ccxt exception class or instance).

        The failures start after `after` more successful calls of that method (0: the very next call),
        which is how a test interrupts a download mid-way.
        """
        queue = self._failures[method_name]
        queue.extend([None] * after)
        queue.extend([exc] * times)

    def _enter(self, method_name: str, **kwargs: Any) -> None:
        """Count the call and raise the next injected failure for this method, if any."""
        self.calls[method_name] += 1
        self.call_log.append((method_name, kwargs))
        queue = self._failures.get(method_name)
        if queue:
            exc = queue.popleft()
            if exc is None:
                return  # a call that was scheduled to succeed before the failures start
            if isinstance(exc, type):
                exc = exc(f"{self.id} {method_name} injected {exc.__name__}")
            raise exc

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
        last = self.ticker_last
        df = self._candles.get(symbol)
        if last is None and df is not None:
            visible = df[df["ts_ms"].to_numpy() <= self.now_ms]
            if len(visible):
                t, o, h, lo, c, v = visible[["ts_ms", "open", "high", "low", "close", "volume"]].iloc[-1].tolist()
                row = [int(t), o, h, lo, c, v]
                last = self._forming(row)[4] if row[0] + CANDLE_MS > self.now_ms else c
        return {"symbol": symbol, "timestamp": self.now_ms, "last": last, "close": last}

    def _forming(self, row: list[float]) -> list[float]:
        """The candle as it looks part-way through: close drifts from open, volume so far (always differs)."""
        ts, o, h, lo, c, v = row
        frac = (self.now_ms - ts) / CANDLE_MS  # in [0, 1)
        close = o + (c - o) * frac * 0.5 + o * 1e-4  # never equal to the final close
        high = max(o, close, o + (h - o) * frac)
        low = min(o, close, o - (o - lo) * frac)
        return [int(ts), o, high, low, close, v * frac * 0.5]
