"""The candle buffer and feed: bounded memory, forming candle dropped, holes backfilled, stale data detected."""

from __future__ import annotations

from typing import Any

import ccxt
import numpy as np
import pandas as pd
import pytest

from bot.daemon.feed import CandleBuffer, CandleFeed, last_closed_open_ms
from bot.daemon.market import ExchangeMarketData, ReplayMarketData
from bot.exchange.client import ExchangeClient
from strategies.candles import CANDLE_MS, CandleBatch
from tests.fake_exchange import FakeExchange

T0 = 1_733_011_200_000  # 2024-12-01T00:00Z


def synthetic(n: int, start_ms: int = T0 - 2000 * CANDLE_MS) -> pd.DataFrame:
    ts = start_ms + CANDLE_MS * np.arange(n, dtype=np.int64)
    close = 100.0 + np.cumsum(np.sin(np.arange(n) / 7.0))
    return pd.DataFrame(
        {"ts_ms": ts, "open": close - 0.1, "high": close + 0.5, "low": close - 0.5, "close": close, "volume": 1.0}
    )


class HidingExchange(FakeExchange):
    """FakeExchange that leaves some candles out of the next `times` fetch_ohlcv answers (a lagging node)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden: set[int] = set()
        self.hide_times = 0

    def fetch_ohlcv(self, *args: Any, **kwargs: Any) -> list[list[float]]:
        rows = super().fetch_ohlcv(*args, **kwargs)
        if self.hide_times > 0:
            self.hide_times -= 1
            rows = [r for r in rows if int(r[0]) not in self.hidden]
        return rows


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, s: float) -> None:
        self.calls.append(s)


def test_last_closed_open_ms() -> None:
    assert last_closed_open_ms(T0) == T0 - CANDLE_MS
    assert last_closed_open_ms(T0 + 5_000) == T0 - CANDLE_MS
    assert last_closed_open_ms(T0 + CANDLE_MS - 1) == T0 - CANDLE_MS
    assert last_closed_open_ms(T0 + CANDLE_MS) == T0


def test_buffer_is_bounded_and_keeps_the_newest() -> None:
    buf = CandleBuffer(capacity=10)
    df = synthetic(1000)
    batch = CandleBatch.from_frame(df)
    for i in range(0, 1000, 3):  # appends of 3, many wrap-arounds of the backing arrays
        buf.extend(CandleBatch(batch.ts_ms[i : i + 3], batch.values[i : i + 3]))
        assert len(buf) <= 10
        assert buf.last_ts_ms == int(batch.ts_ms[min(i + 2, 999)])
        assert np.all(np.diff(buf.ts_ms) == CANDLE_MS)
    np.testing.assert_array_equal(buf.ts_ms, batch.ts_ms[-10:])
    win = buf.window(4)
    np.testing.assert_array_equal(win.column("close"), df["close"].to_numpy()[-4:])
    assert buf._ts.shape == (20,)  # memory is flat: the backing arrays never grow
    # Re-sent (older or equal) candles are ignored; a batch larger than the capacity keeps its newest.
    assert buf.extend(CandleBatch(batch.ts_ms[-5:], batch.values[-5:])) == 0
    buf.clear()
    buf.extend(batch)
    np.testing.assert_array_equal(buf.ts_ms, batch.ts_ms[-10:])
    buf.truncate_from(int(batch.ts_ms[-3]))
    assert buf.last_ts_ms == int(batch.ts_ms[-4])
    assert buf.index_of(int(batch.ts_ms[-4])) == len(buf) - 1
    assert buf.index_of(int(batch.ts_ms[-1])) is None


def test_replay_market_serves_closed_candles_and_next_open() -> None:
    df = synthetic(100)
    market = ReplayMarketData(CandleBatch.from_frame(df))
    now = int(df["ts_ms"].iloc[50])  # candle 50 has just opened: 0..49 are closed
    got = market.closed_candles(int(df["ts_ms"].iloc[40]), now)
    np.testing.assert_array_equal(got.ts_ms, df["ts_ms"].to_numpy()[40:50])
    buf = CandleBuffer(200)
    buf.extend(got)
    price, source = market.fill_reference(buf.last())
    assert (price, source) == (float(df["open"].iloc[50]), "next_open")
    buf2 = CandleBuffer(200)
    buf2.extend(CandleBatch.from_frame(df))
    assert market.fill_reference(buf2.last()) == (float(df["close"].iloc[-1]), "close")


def test_feed_warms_up_and_drops_the_forming_candle() -> None:
    df = synthetic(2500)
    now = int(df["ts_ms"].iloc[2000]) + 120_000  # candle 2000 is forming
    fake = FakeExchange(df, now_ms=now)
    feed = CandleFeed(
        ExchangeMarketData(ExchangeClient(fake, sleep=Sleeps()), "BTC/USDT"), history=1265, sleep=Sleeps()
    )
    upd = feed.update(now)
    assert not upd.is_stale
    assert upd.latest_ts_ms == int(df["ts_ms"].iloc[1999]) == upd.expected_ts_ms
    assert len(feed.buffer) == 1265
    np.testing.assert_array_equal(feed.buffer.window(1265).column("close"), df["close"].to_numpy()[735:2000])
    # The next tick fetches only what is new.
    fake.advance(CANDLE_MS)
    calls = fake.calls["fetch_ohlcv"]
    upd = feed.update(fake.now_ms)
    assert upd.added == 1 and fake.calls["fetch_ohlcv"] == calls + 1
    assert fake.call_log[-1][1]["since"] == int(df["ts_ms"].iloc[2000])


def test_gap_is_backfilled() -> None:
    df = synthetic(2500)
    now = int(df["ts_ms"].iloc[2000]) + 5_000
    fake = HidingExchange(df, now_ms=now)
    sleeps = Sleeps()
    feed = CandleFeed(ExchangeMarketData(ExchangeClient(fake, sleep=sleeps), "BTC/USDT"), history=1265, sleep=sleeps)
    feed.update(now)
    # Three candles later the exchange answers first without the middle one, then with it.
    fake.advance(3 * CANDLE_MS)
    missing = int(df["ts_ms"].iloc[2001])
    fake.hidden, fake.hide_times = {missing}, 1
    upd = feed.update(fake.now_ms)
    assert not upd.is_stale and upd.holes == ()
    assert upd.attempts == 2 and len(sleeps.calls) == 1
    np.testing.assert_array_equal(feed.buffer.ts_ms[-4:], df["ts_ms"].to_numpy()[1999:2003])
    np.testing.assert_array_equal(feed.buffer.window(4).column("close"), df["close"].to_numpy()[1999:2003])


def test_persistent_hole_is_accepted_after_retries() -> None:
    # An exchange outage: the candle never exists. The feed retries, then goes on without it.
    df = synthetic(2500).drop(index=2001).reset_index(drop=True)
    fake = FakeExchange(df, now_ms=int(df["ts_ms"].iloc[1999]) + 5_000)
    feed = CandleFeed(ExchangeMarketData(ExchangeClient(fake), "BTC/USDT"), history=1265, retries=2, sleep=Sleeps())
    feed.update(fake.now_ms)  # up to the candle 1998
    fake.advance(4 * CANDLE_MS)  # 1999, 2000, (2001 never existed), 2002
    upd = feed.update(fake.now_ms)
    assert not upd.is_stale and upd.attempts == 3
    assert upd.latest_ts_ms == upd.expected_ts_ms
    assert upd.holes == (T0 - 2000 * CANDLE_MS + 2001 * CANDLE_MS,)


def test_stale_feed_after_retries() -> None:
    df = synthetic(2100)
    fake = FakeExchange(df, now_ms=int(df["ts_ms"].iloc[-1]) + CANDLE_MS + 5_000)
    sleeps = Sleeps()
    feed = CandleFeed(
        ExchangeMarketData(ExchangeClient(fake, sleep=sleeps), "BTC/USDT"), history=1265, retries=3, sleep=sleeps
    )
    assert not feed.update(fake.now_ms).is_stale
    fake.advance(CANDLE_MS)  # the exchange's clock moves on, its candles do not
    upd = feed.update(fake.now_ms)
    assert upd.is_stale and upd.attempts == 4 and sleeps.calls == [2.0, 2.0, 2.0]
    assert upd.latest_ts_ms == upd.expected_ts_ms - CANDLE_MS


def test_exchange_failure_is_a_stale_tick_not_a_crash() -> None:
    df = synthetic(2100)
    fake = FakeExchange(df, now_ms=int(df["ts_ms"].iloc[-1]) + 5_000)
    market = ExchangeMarketData(ExchangeClient(fake, sleep=Sleeps(), rng=lambda: 0.0), "BTC/USDT")
    feed = CandleFeed(market, history=1265, retries=1, sleep=Sleeps())
    feed.update(fake.now_ms - CANDLE_MS)
    fake.fail_next("fetch_ohlcv", ccxt.NetworkError, times=10)
    upd = feed.update(fake.now_ms)
    assert upd.is_stale and "NetworkError" in (upd.error or "")


def test_long_downtime_restarts_the_window() -> None:
    df = synthetic(6000)
    fake = FakeExchange(df, now_ms=int(df["ts_ms"].iloc[2000]) + 5_000)
    feed = CandleFeed(ExchangeMarketData(ExchangeClient(fake), "BTC/USDT"), history=1265, sleep=Sleeps())
    feed.update(fake.now_ms)
    fake.advance(3000 * CANDLE_MS)  # ~10 days down
    upd = feed.update(fake.now_ms)
    assert not upd.is_stale
    ts = feed.buffer.ts_ms
    assert len(ts) == 1265 and np.all(np.diff(ts) == CANDLE_MS)  # no time gap inside the window


@pytest.mark.parametrize("lag_ms", [0, 299_999])
def test_feed_never_returns_a_candle_that_is_not_closed(lag_ms: int) -> None:
    df = synthetic(2100)
    now = int(df["ts_ms"].iloc[2000]) + lag_ms
    fake = FakeExchange(df, now_ms=now)
    feed = CandleFeed(ExchangeMarketData(ExchangeClient(fake), "BTC/USDT"), history=1265, sleep=Sleeps())
    feed.update(now)
    assert feed.buffer.last_ts_ms + CANDLE_MS <= now
