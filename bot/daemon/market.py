"""Where the daemon's market data and time come from: the `MarketData` seam (exchange or replay file) and the
clocks (the exchange's corrected clock, or a simulated one for replays and tests).

Time (docs/design.md §2): a candle's `ts_ms` is its OPEN time; the clocks tell exchange time in epoch ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import structlog

from bot.clock import wall_ms
from bot.daemon.feed import Candle
from bot.errors import ExchangeError
from strategies.candles import CANDLE_MS, CandleBatch

if TYPE_CHECKING:
    # Replays never load the exchange module (nor ccxt): the client is only a type here.
    from bot.exchange.client import ExchangeClient

log = structlog.get_logger(__name__)


class MarketData(Protocol):
    """The daemon's view of a market: closed candles, and a reference price for a fill after a decision."""

    symbol: str

    def closed_candles(self, since_ms: int, now_ms: int) -> CandleBatch:
        """Closed candles with open time >= since_ms at exchange time now_ms, oldest first (may have holes)."""
        ...

    def fill_reference(self, decision: Candle) -> tuple[float, str]:
        """The price a market order placed right after deciding on `decision` would fill at, and its source."""
        ...


class SimClock:
    """A simulated clock for replays and tests: `sleep` advances it instantly."""

    def __init__(self, now_ms: int) -> None:
        self._now_ms = int(now_ms)

    def now_ms(self) -> int:
        """The simulated time."""
        return self._now_ms

    def set(self, now_ms: int) -> None:
        """Jump to a time."""
        self._now_ms = int(now_ms)

    def sleep(self, seconds: float) -> None:
        """Advance the simulated time by `seconds`."""
        self._now_ms += round(seconds * 1000)


class ExchangeClock:
    """The local clock corrected by the exchange's (`fetch_time`), refreshed every `refresh_s` seconds."""

    def __init__(
        self,
        client: ExchangeClient,
        *,
        refresh_s: float = 3600.0,
        local_ms: Callable[[], int] = wall_ms,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self._refresh_ms = int(refresh_s * 1000)
        self._local_ms = local_ms
        self._sleep = sleep
        self.offset_ms = 0
        self._synced_at_ms: int | None = None

    def sync(self) -> int:
        """Measure the offset exchange - local (half the round trip attributed to each leg)."""
        before = self._local_ms()
        server = self.client.server_time_ms()
        after = self._local_ms()
        self.offset_ms = int(server - (before + after) // 2)
        self._synced_at_ms = after
        log.info("clock_synced", offset_ms=self.offset_ms, round_trip_ms=after - before)
        return self.offset_ms

    def now_ms(self) -> int:
        """Exchange time: local clock + the last measured offset (re-measured when due)."""
        local = self._local_ms()
        if self._synced_at_ms is None or local - self._synced_at_ms >= self._refresh_ms:
            try:
                self.sync()
            except ExchangeError as exc:
                # Keep the previous offset: a missed sync costs a few ms of accuracy, not the tick.
                log.warning("clock_sync_failed", error=str(exc))
                self._synced_at_ms = local
            local = self._local_ms()
        return local + self.offset_ms

    def sleep(self, seconds: float) -> None:
        """Real sleep."""
        self._sleep(seconds)


class ExchangeMarketData:
    """Closed candles and ticker prices from the exchange, through its client (bot/exchange/client.py)."""

    def __init__(self, client: ExchangeClient, symbol: str) -> None:
        self.client = client
        self.symbol = symbol

    def closed_candles(self, since_ms: int, now_ms: int) -> CandleBatch:
        """Paged fetch_ohlcv (retried), forming candle dropped by exchange time."""
        return self.client.fetch_closed_candle_batch(self.symbol, since_ms, now_ms)

    def fill_reference(self, decision: Candle) -> tuple[float, str]:
        """The ticker's last trade price fetched now; the decision candle's close if that fails."""
        try:
            ticker = self.client.fetch_ticker(self.symbol, quick=True)
            last = float((ticker or {}).get("last") or 0.0)
            if last > 0 and np.isfinite(last):
                return last, "ticker"
            log.warning("ticker_unusable", last=(ticker or {}).get("last"))
        except ExchangeError as exc:
            log.warning("ticker_failed", error=str(exc))
        return decision.close, "close"


class ReplayMarketData:
    """Candles from a data file served as the exchange would serve them at a simulated time.

    The fill reference is the NEXT candle's open (the first trade after the decision), exactly as the
    backtest fills; if the file has no next candle, the decision candle's close.
    """

    def __init__(self, candles: CandleBatch, symbol: str = "BTC/USDT") -> None:
        self.symbol = symbol
        self._ts = candles.ts_ms
        self._values = candles.values

    @property
    def first_ts_ms(self) -> int:
        """Open time of the first candle of the file."""
        return int(self._ts[0])

    @property
    def last_ts_ms(self) -> int:
        """Open time of the last candle of the file."""
        return int(self._ts[-1])

    def rows_before(self, ts_ms: int) -> int:
        """How many candles of the file open before ts_ms."""
        return int(np.searchsorted(self._ts, int(ts_ms), side="left"))

    def closed_candles(self, since_ms: int, now_ms: int) -> CandleBatch:
        """The file's candles with since_ms <= ts_ms and ts_ms + 5 min <= now_ms."""
        lo = int(np.searchsorted(self._ts, int(since_ms), side="left"))
        hi = int(np.searchsorted(self._ts, int(now_ms) - CANDLE_MS, side="right"))
        if hi <= lo:
            return CandleBatch.empty()
        return CandleBatch(self._ts[lo:hi], self._values[lo:hi])

    def fill_reference(self, decision: Candle) -> tuple[float, str]:
        """The open of the candle after the decision candle (next-open fill), else its close."""
        nxt = decision.ts_ms + CANDLE_MS
        i = int(np.searchsorted(self._ts, nxt))
        if i < len(self._ts) and int(self._ts[i]) == nxt:
            return float(self._values[i, 0]), "next_open"
        return decision.close, "close"
