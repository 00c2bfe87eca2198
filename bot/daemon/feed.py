"""The daemon's candles: a bounded candle buffer and the feed that keeps it current at every tick (drop the
forming candle, backfill holes, detect staleness) from a `MarketData` source (bot/daemon/market.py).

Time (docs/design.md §2): a candle's `ts_ms` is its OPEN time; it is closed when `ts_ms + 5 min <= exchange now`.
`tick(now_ms)` acts on `last_closed_open_ms(now_ms)`, the newest candle closed at `now_ms`.

The buffer is a fixed-capacity window of the newest closed candles (numpy columns, oldest dropped first), so
memory stays flat over months. The observation of a candle is a pure function of the `first_valid_row + 1`
candles (rows) ending at it, which the buffer always holds after warm-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import structlog

from bot.errors import TemporaryExchangeError
from strategies.candles import CANDLE_MS, VALUE_COLUMNS, CandleBatch, iso_utc

if TYPE_CHECKING:  # market.py builds on the candle types defined here
    from bot.daemon.market import MarketData

log = structlog.get_logger(__name__)


def last_closed_open_ms(now_ms: int) -> int:
    """Open time of the newest candle that is closed at `now_ms` (its close `ts_ms + 5 min <= now_ms`)."""
    return (int(now_ms) // CANDLE_MS) * CANDLE_MS - CANDLE_MS


@dataclass(frozen=True, slots=True)
class Candle:
    """One closed 5-minute candle; ts_ms is the open time (UTC ms)."""

    ts_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float


class CandleBuffer:
    """The newest `capacity` closed candles, oldest first; appending beyond capacity drops the oldest.

    Backed by arrays of twice the capacity: appends write at the end and, when the end is reached, the
    newest `capacity` rows are moved to the front once (amortised O(1) per candle, no allocation).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 2:
            raise ValueError("capacity must be >= 2")
        self.capacity = int(capacity)
        self._ts = np.zeros(2 * self.capacity, dtype=np.int64)
        self._values = np.zeros((2 * self.capacity, 5), dtype=np.float64)
        self._lo = 0
        self._hi = 0
        self.revision = 0
        """Bumped whenever candles already held are dropped (cleared, or cut to refetch a hole): rows that were
        read before may have changed, while plain appends keep every earlier row as it was."""

    def __len__(self) -> int:
        return self._hi - self._lo

    @property
    def ts_ms(self) -> np.ndarray:
        """Open times (a read-only view)."""
        view = self._ts[self._lo : self._hi]
        view.flags.writeable = False
        return view

    @property
    def last_ts_ms(self) -> int | None:
        """Open time of the newest candle, or None when empty."""
        return int(self._ts[self._hi - 1]) if len(self) else None

    def clear(self) -> None:
        """Forget every candle."""
        self._lo = self._hi = 0
        self.revision += 1

    def truncate_from(self, ts_ms: int) -> None:
        """Drop the candles with open time >= ts_ms (used to refetch from a hole)."""
        cut = int(np.searchsorted(self._ts[self._lo : self._hi], int(ts_ms), side="left"))
        if self._lo + cut < self._hi:
            self._hi = self._lo + cut
            self.revision += 1

    def extend(self, batch: CandleBatch) -> int:
        """Append the candles newer than the newest one held; returns how many were added."""
        ts = batch.ts_ms
        if len(ts) == 0:
            return 0
        last = self.last_ts_ms
        if last is not None:
            keep = ts > last
            if not keep.all():
                ts, values = ts[keep], batch.values[keep]
            else:
                values = batch.values
        else:
            values = batch.values
        n = len(ts)
        if n == 0:
            return 0
        if n >= self.capacity:
            ts, values = ts[-self.capacity :], values[-self.capacity :]
            self._lo, self._hi = 0, 0
            n = self.capacity
            self.revision += 1
        if self._hi + n > 2 * self.capacity:
            keep_n = min(len(self), self.capacity - n)
            start = self._hi - keep_n
            self._ts[:keep_n] = self._ts[start : self._hi]
            self._values[:keep_n] = self._values[start : self._hi]
            self._lo, self._hi = 0, keep_n
        self._ts[self._hi : self._hi + n] = ts
        self._values[self._hi : self._hi + n] = values
        self._hi += n
        if len(self) > self.capacity:
            self._lo = self._hi - self.capacity
        return n

    def index_of(self, ts_ms: int) -> int | None:
        """Row of the candle opened at ts_ms (0 = oldest held), or None if not held."""
        ts = self._ts[self._lo : self._hi]
        i = int(np.searchsorted(ts, int(ts_ms)))
        return i if i < len(ts) and int(ts[i]) == int(ts_ms) else None

    def first_after(self, ts_ms: int) -> Candle | None:
        """The oldest candle opened after ts_ms, or None."""
        ts = self._ts[self._lo : self._hi]
        i = int(np.searchsorted(ts, int(ts_ms), side="right"))
        return self.candle(i) if i < len(ts) else None

    def candle(self, row: int) -> Candle:
        """The candle at a row (negative rows count from the newest)."""
        n = len(self)
        if not -n <= row < n:
            raise IndexError(row)
        i = self._lo + (row % n)
        o, h, lo, c, v = (float(x) for x in self._values[i])
        return Candle(int(self._ts[i]), o, h, lo, c, v)

    def last(self) -> Candle:
        """The newest candle (IndexError when empty)."""
        return self.candle(-1)

    def closes(self, n: int) -> np.ndarray:
        """The closes of the newest n candles, oldest first (a read-only view: no DataFrame built)."""
        lo = max(self._lo, self._hi - int(n))
        view = self._values[lo : self._hi, VALUE_COLUMNS.index("close")]
        view.flags.writeable = False
        return view

    def window(self, n: int) -> CandleBatch:
        """The newest n candles (read-only views of the buffer, valid until the next append)."""
        lo = max(self._lo, self._hi - int(n))
        ts, values = self._ts[lo : self._hi], self._values[lo : self._hi]
        ts.flags.writeable = False
        values.flags.writeable = False
        return CandleBatch(ts, values)


# ---------------------------------------------------------------------------------------------------
# The feed: keeps the buffer current at each tick.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedUpdate:
    """What one feed update found."""

    expected_ts_ms: int
    """Open time of the candle the tick should act on (the newest closed at now)."""
    latest_ts_ms: int | None
    """Open time of the newest candle held after the update."""
    added: int
    attempts: int
    holes: tuple[int, ...] = field(default_factory=tuple)
    """Open times of missing candles that stayed missing after every retry (an exchange outage)."""
    error: str | None = None

    @property
    def is_stale(self) -> bool:
        """The expected candle is still missing: the tick must not act."""
        return self.latest_ts_ms is None or self.latest_ts_ms < self.expected_ts_ms


class CandleFeed:
    """Fetches newly closed candles into a CandleBuffer; backfills holes and retries a missing latest candle."""

    def __init__(
        self,
        market: MarketData,
        *,
        history: int,
        capacity: int | None = None,
        retries: int = 3,
        retry_delay_s: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.market = market
        self.history = int(history)
        self.buffer = CandleBuffer(capacity or self.history + 135)
        if self.buffer.capacity < self.history:
            raise ValueError("buffer capacity is below the history the features need")
        self.retries = int(retries)
        self.retry_delay_s = float(retry_delay_s)
        self._sleep = sleep

    def update(self, now_ms: int) -> FeedUpdate:
        """Bring the buffer up to the newest candle closed at now_ms (exchange time)."""
        expected = last_closed_open_ms(now_ms)
        start = expected - (self.history - 1) * CANDLE_MS
        last = self.buffer.last_ts_ms
        if last is None or last < start - CANDLE_MS:
            # Empty, or a downtime longer than the window: keeping the old rows would put a time gap
            # inside the feature window, so start over with a fresh window.
            if last is not None:
                log.info("buffer_reset", last=iso_utc(last), expected=iso_utc(expected))
            self.buffer.clear()
            since = start
        else:
            since = last + CANDLE_MS
        added, attempt, holes, error = 0, 0, (), None
        for attempt in range(1, self.retries + 2):
            if since > expected:
                break
            before = self.buffer.last_ts_ms
            try:
                batch = self.market.closed_candles(since, now_ms)
            except TemporaryExchangeError as exc:
                error = str(exc)
                log.warning("candles_fetch_failed", attempt=attempt, error=error)
                batch = CandleBatch.empty()
            added += self.buffer.extend(batch)
            holes = _holes(self.buffer, before, since)
            complete = not holes and (self.buffer.last_ts_ms or 0) >= expected
            if complete or attempt > self.retries:
                break
            if holes:
                # Refetch from the first hole: the rows after it are dropped and come back with it.
                since = holes[0]
                self.buffer.truncate_from(since)
                log.info("candle_backfill", first_missing=iso_utc(since), missing=len(holes), attempt=attempt)
            else:
                since = (self.buffer.last_ts_ms or since - CANDLE_MS) + CANDLE_MS
            self._sleep(self.retry_delay_s)
        if holes:
            log.warning("candle_gap", missing=len(holes), first_missing=iso_utc(holes[0]))
        return FeedUpdate(expected, self.buffer.last_ts_ms, added, attempt, tuple(holes), error)


def _holes(buffer: CandleBuffer, before_last: int | None, since_ms: int) -> list[int]:
    """Open times missing between the first requested candle and the newest held."""
    last = buffer.last_ts_ms
    if last is None:
        return []
    first = since_ms if before_last is None or since_ms > before_last else before_last + CANDLE_MS
    if before_last is None:
        # A fresh window: only holes inside what was received count (the start is where the data starts).
        ts = buffer.ts_ms
        if len(ts) == 0:
            return []
        first = int(ts[0])
    ts = buffer.ts_ms
    lo = int(np.searchsorted(ts, first, side="left"))
    have = ts[lo:]
    if len(have) == 0:
        return []
    want = np.arange(first, last + CANDLE_MS, CANDLE_MS, dtype=np.int64)
    if len(want) == len(have):
        return []
    return [int(x) for x in np.setdiff1d(want, have, assume_unique=True)]
