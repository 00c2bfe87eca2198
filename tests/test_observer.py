"""The daemon's incremental observation (bot/daemon/observer.py) against the full recompute it replaces, on real
candles: tick by tick, across a refetched hole and a cleared buffer, and the drift guard when they disagree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import structlog

from bot.daemon.feed import CandleBuffer
from bot.daemon.observer import BufferObserver
from bot.files.checkpoints import load_checkpoint
from strategies.bundle import ModelBundle, history_needed, observe
from strategies.candles import CandleBatch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "binance_BTCUSDT_5m_2024.csv.gz"
CAPACITY = 1400


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return load_checkpoint(REPO / "checkpoints" / "default.pt")


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    from bot.files.candles import load_candles

    return load_candles(DATA).iloc[:3200].reset_index(drop=True)


def _batch(df: pd.DataFrame) -> CandleBatch:
    return CandleBatch.from_frame(df)


def _assert_same(got: tuple[np.ndarray, np.ndarray] | None, want: tuple[np.ndarray, np.ndarray] | None) -> None:
    assert (got is None) == (want is None)
    if got is not None and want is not None:
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.float32 and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_buffer_revision_moves_only_when_held_rows_are_dropped(candles: pd.DataFrame) -> None:
    buf = CandleBuffer(10)
    buf.extend(_batch(candles.iloc[:5]))
    r0 = buf.revision
    buf.extend(_batch(candles.iloc[5:12]))  # outgrowing the capacity drops the oldest: rows keep their values
    assert buf.revision == r0
    buf.truncate_from(int(candles["ts_ms"].iloc[20]))  # nothing held at or after it
    assert buf.revision == r0
    buf.truncate_from(int(candles["ts_ms"].iloc[9]))
    assert buf.revision == r0 + 1 and len(buf) == 7
    buf.extend(_batch(candles.iloc[:40]))  # a batch longer than the capacity replaces every row
    assert buf.revision == r0 + 2
    buf.clear()
    assert buf.revision == r0 + 3


def test_incremental_observation_equals_the_full_recompute_tick_by_tick(
    bundle: ModelBundle, candles: pd.DataFrame
) -> None:
    history = history_needed(bundle)
    buf = CandleBuffer(CAPACITY)
    obs = BufferObserver(bundle, check_every_ticks=10**9)
    start = history - 40  # warm-up ticks (None) first, then valid observations
    buf.extend(_batch(candles.iloc[:start]))
    compared = 0
    for i in range(start, len(candles)):
        buf.extend(_batch(candles.iloc[i : i + 1]))
        obs.sync(buf)
        if i % 7 == 0 or i < history + 5:
            _assert_same(obs.observation(buf), observe(buf.window(history).to_frame(), bundle))
            compared += 1
    assert compared > 300 and obs.rebuilds == 1  # built once at the first sync, then only updated
    assert obs.observation(buf) is not None


def test_a_refetched_hole_or_cleared_buffer_rebuilds(bundle: ModelBundle, candles: pd.DataFrame) -> None:
    history = history_needed(bundle)
    buf = CandleBuffer(CAPACITY)
    obs = BufferObserver(bundle, check_every_ticks=10**9)
    buf.extend(_batch(candles.iloc[:2000].drop(index=[1990])))  # a hole the feed will refetch
    obs.sync(buf)
    buf.truncate_from(int(candles["ts_ms"].iloc[1990]))
    buf.extend(_batch(candles.iloc[1990:2001]))
    obs.sync(buf)
    assert obs.rebuilds == 2
    _assert_same(obs.observation(buf), observe(buf.window(history).to_frame(), bundle))
    buf.clear()
    buf.extend(_batch(candles.iloc[1500:2900]))
    obs.sync(buf)
    assert obs.rebuilds == 3
    _assert_same(obs.observation(buf), observe(buf.window(history).to_frame(), bundle))


def test_drift_is_logged_and_repaired_by_the_periodic_recompute(bundle: ModelBundle, candles: pd.DataFrame) -> None:
    history = history_needed(bundle)
    buf = CandleBuffer(CAPACITY)
    obs = BufferObserver(bundle, check_every_ticks=3)
    buf.extend(_batch(candles.iloc[:2000]))
    obs.sync(buf)
    row = candles.iloc[2000]
    # The engine sees a candle the buffer never held (a corrupted state): its observation drifts.
    obs.engine.update(row["open"] * 1.5, row["high"] * 1.5, row["low"], row["close"] * 1.5, row["volume"] * 9)
    buf.extend(_batch(candles.iloc[2000:2001]))
    with structlog.testing.capture_logs() as logs:
        obs.sync(buf)  # feeds candle 2000 after the bad one
        assert obs.observation(buf) is not None  # not yet due: the drifted value goes unnoticed
        obs.sync(buf)
        got = obs.observation(buf)  # due: the full recompute wins, the drift is logged, the engine rebuilt
    full = observe(buf.window(history).to_frame(), bundle)
    _assert_same(got, full)
    drift = [e for e in logs if e["event"] == "feature_drift"]
    assert len(drift) == 1 and drift[0]["max_abs_diff"] > 1e-3
    assert obs.rebuilds == 2
    buf.extend(_batch(candles.iloc[2001:2002]))
    obs.sync(buf)
    _assert_same(obs.observation(buf), observe(buf.window(history).to_frame(), bundle))


def test_the_periodic_recompute_agrees_with_a_healthy_engine(bundle: ModelBundle, candles: pd.DataFrame) -> None:
    """Thousands of candles with a check every 50 ticks: the fresh engine always agrees, nothing is replaced."""
    buf = CandleBuffer(CAPACITY)
    obs = BufferObserver(bundle, check_every_ticks=50)
    buf.extend(_batch(candles.iloc[:1500]))
    with structlog.testing.capture_logs() as logs:
        for i in range(1500, len(candles)):
            buf.extend(_batch(candles.iloc[i : i + 1]))
            obs.sync(buf)
            assert obs.observation(buf) is not None
    assert (len(candles) - 1500) // 50 >= 20  # the guard really ran, many times
    assert not [e for e in logs if e["event"] == "feature_drift"]
    assert obs.rebuilds == 1
