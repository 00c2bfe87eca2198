"""IncrementalFeatures (strategies/incremental.py) against the batch pipeline of strategies/features.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from strategies.candles import VALUE_COLUMNS
from strategies.features import (
    FEATURE_NAMES,
    FeatureSpec,
    Standardizer,
    build_observations,
    compute_features,
    default_feature_spec,
    first_valid_row,
    fit_standardizer,
    last_observation,
)
from strategies.incremental import IncrementalFeatures, WindowAggregate

# Features: every indicator mirrors the batch arithmetic, so rows are in fact bit-identical on 2024; the
# contract is 1e-9 relative with an absolute floor of 1e-15 for values near 0 (features are O(1e-3..1)).
FEATURE_RTOL, FEATURE_ATOL = 1e-9, 1e-15
# Observations are float32: two ulp relative, one ulp of 1.0 absolute (std near 0, running vs rolling sums).
OBS_RTOL, OBS_ATOL = 2.5e-7, 1.2e-7
HISTORY = first_valid_row() + 1  # 1265: the daemon's window


def _values(candles: pd.DataFrame) -> list[list[float]]:
    """Candles as rows [open, high, low, close, volume]."""
    return candles[list(VALUE_COLUMNS)].to_numpy().tolist()


def _feed(engine: IncrementalFeatures, candles: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Update with each candle; features (n, N), macro and micro (n, 3N) float32 (0 where None), valid (n,)."""
    n, k = len(candles), engine.n_features
    feats = np.empty((n, k))
    macro, micro = np.zeros((n, 3 * k), np.float32), np.zeros((n, 3 * k), np.float32)
    valid = np.zeros(n, dtype=bool)
    for i, row in enumerate(_values(candles)):
        feats[i] = engine.update(*row)
        obs = engine.observation()
        if obs is not None:
            macro[i], micro[i] = obs
            valid[i] = True
    return feats, macro, micro, valid


@pytest.fixture(scope="module")
def year(candles_2024: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, Standardizer]:
    """The 2024 candles, their batch features and a standardiser fitted on Jan-Sep."""
    feats = compute_features(candles_2024)
    return candles_2024, feats, fit_standardizer(feats, slice(0, 274 * 288))


def test_every_row_of_2024_equals_batch(year: tuple[pd.DataFrame, np.ndarray, Standardizer]) -> None:
    """Fed the real year candle by candle: all 20 features on every row, and both aggregates on every valid row."""
    candles, batch, std = year
    feats, macro, micro, valid = _feed(IncrementalFeatures(standardizer=std), candles)
    for j, name in enumerate(FEATURE_NAMES):
        np.testing.assert_allclose(feats[:, j], batch[:, j], rtol=FEATURE_RTOL, atol=FEATURE_ATOL, err_msg=name)
    obs = build_observations(batch, std)
    np.testing.assert_array_equal(valid, obs.valid)
    assert valid.sum() == len(candles) - first_valid_row()
    np.testing.assert_allclose(macro[valid], obs.macro[valid], rtol=OBS_RTOL, atol=OBS_ATOL)
    np.testing.assert_allclose(micro[valid], obs.micro[valid], rtol=OBS_RTOL, atol=OBS_ATOL)


def test_prefix_invariance(year: tuple[pd.DataFrame, np.ndarray, Standardizer]) -> None:
    """Built from candles[:k] then updated == updated from the start == compute_features(candles[:m]) at m-1."""
    candles, _, std = year
    data = candles.iloc[20_000:23_000].reset_index(drop=True)
    k = HISTORY + 37
    from_start = IncrementalFeatures(standardizer=std)
    head_feats, _, _, _ = _feed(from_start, data.iloc[:k])
    built = IncrementalFeatures(standardizer=std, candles=data.iloc[:k])
    np.testing.assert_array_equal(built.features, head_feats[-1])
    for m, row in enumerate(_values(data.iloc[k:]), start=k + 1):
        a, b = built.update(*row), from_start.update(*row)
        np.testing.assert_array_equal(a, b)
        obs_a, obs_b = built.observation(), from_start.observation()
        assert obs_a is not None and obs_b is not None
        np.testing.assert_array_equal(obs_a[0], obs_b[0])
        np.testing.assert_array_equal(obs_a[1], obs_b[1])
        if m % 331 == 0:  # no look-ahead: the batch on exactly the candles seen so far
            prefix = compute_features(data.iloc[:m])
            np.testing.assert_allclose(a, prefix[-1], rtol=FEATURE_RTOL, atol=FEATURE_ATOL)
            ref = build_observations(prefix, std)
            np.testing.assert_allclose(obs_a[0], ref.macro[-1], rtol=OBS_RTOL, atol=OBS_ATOL)
            np.testing.assert_allclose(obs_a[1], ref.micro[-1], rtol=OBS_RTOL, atol=OBS_ATOL)


def test_rebuild_after_gap_gives_batch_values_of_buffer(year: tuple[pd.DataFrame, np.ndarray, Standardizer]) -> None:
    """A restart or backfill rebuilds from the buffer: its batch values, then its updates, whatever came before."""
    candles, _, std = year
    engine = IncrementalFeatures(standardizer=std, candles=candles.iloc[:2000])
    # Candles after a two-day hole: the old state must leave no trace.
    buffer = candles.iloc[2576 : 2576 + HISTORY].reset_index(drop=True)
    rebuilt = engine.rebuild(buffer)
    np.testing.assert_allclose(rebuilt, compute_features(buffer), rtol=FEATURE_RTOL, atol=FEATURE_ATOL)
    assert engine.rows_seen == HISTORY
    obs = engine.observation()
    daemon = last_observation(std.transform(compute_features(buffer)))  # what `observe` gives today
    assert obs is not None and daemon is not None
    for got, want in zip(obs, daemon, strict=True):
        # last_observation sums the window directly: equal to ~1e-6 (its own docstring).
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    more = candles.iloc[2576 + HISTORY : 2576 + HISTORY + 50]
    feats, macro, _, valid = _feed(engine, more)
    whole = pd.concat([buffer, more], ignore_index=True)
    batch = compute_features(whole)
    np.testing.assert_allclose(feats, batch[HISTORY:], rtol=FEATURE_RTOL, atol=FEATURE_ATOL)
    assert valid.all()
    np.testing.assert_allclose(macro, build_observations(batch, std).macro[HISTORY:], rtol=OBS_RTOL, atol=OBS_ATOL)


def test_short_buffer_has_no_observation(year: tuple[pd.DataFrame, np.ndarray, Standardizer]) -> None:
    """One candle short of the history: NaN warm-up where the batch has it, and no observation."""
    candles, _, std = year
    buffer = candles.iloc[: HISTORY - 1]
    engine = IncrementalFeatures(standardizer=std, candles=buffer)
    assert engine.observation() is None
    engine.update(*_values(candles.iloc[HISTORY - 1 : HISTORY])[0])
    assert engine.observation() is not None
    with pytest.raises(ValueError, match="standardizer"):
        IncrementalFeatures(candles=buffer).observation()


def test_flat_and_zero_volume_stretches() -> None:
    """The 0/0 rules (flat windows, no money flow, zero volume, equal closes) as in the batch code."""
    rng = np.random.default_rng(7)
    n = 1600
    close = 100.0 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
    close[300:420] = close[300]  # a flat market: no range, no volume
    close[900:1000] = close[900]
    high = close * (1 + rng.uniform(0, 1e-3, n))
    low = close * (1 - rng.uniform(0, 1e-3, n))
    volume = rng.uniform(0, 5, n)
    for a, b in ((300, 420), (900, 1000)):
        high[a:b] = low[a:b] = close[a:b]
        volume[a:b] = 0.0
    open_ = np.r_[close[0], close[:-1]]
    candles = pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume})
    engine = IncrementalFeatures()
    feats = engine.rebuild(candles)
    batch = compute_features(candles)
    np.testing.assert_allclose(feats, batch, rtol=FEATURE_RTOL, atol=FEATURE_ATOL)
    # The neutral 0/0 values really occur in the flat stretch (stoch_k, cci, mfi, bb_pband, close_z, volume_z).
    flat = [FEATURE_NAMES.index(n) for n in ("stoch_k", "cci", "mfi", "bb_pband", "close_z", "volume_z")]
    assert (batch[999, flat] == 0.0).all()


def test_window_aggregate_matches_direct_sums() -> None:
    """Running [mean, std, last] against numpy on each window, across resyncs and a NaN row passing through."""
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 0.01, (400, 4))  # mean >> std: cancellation if the sums were not shifted
    x[150, 2] = np.nan
    agg = WindowAggregate(37, 4)
    for i in range(len(x)):
        agg.push(x[i])
        got = agg.aggregate()
        w = x[max(0, i - 36) : i + 1]
        if i < 36 or not np.isfinite(w).all():
            assert got is None
            continue
        assert got is not None
        np.testing.assert_allclose(got, np.concatenate([w.mean(0), w.std(0), w[-1]]), rtol=1e-9, atol=1e-12)


def test_other_spec_and_windows(year: tuple[pd.DataFrame, np.ndarray, Standardizer]) -> None:
    """Another feature order, a subset, logret_5 and other indicator windows: still the batch values."""
    candles, _, _ = year
    params = dict(default_feature_spec().params)
    params.update(rsi_window=9, macd_fast=5, macd_slow=35, macd_signal=4, cci_window=11, adx_window=7, bb_window=30)
    params.update(volume_window=24, zscore_window=96, ema_window=20, mfi_window=10, stoch_window=5, atr_window=21)
    names = ("ema_ratio", "logret_5", "adx", "volume_z", "cci", "bb_width", "macd_diff", "mfi", "rsi", "atr")
    spec = FeatureSpec(names=(*names, "close_z", "stoch_k", "di_diff", "bb_pband"), params=params)
    data = candles.iloc[50_000:54_000]
    batch = compute_features(data, spec)
    std = fit_standardizer(batch, slice(0, 3000))
    feats, macro, micro, valid = _feed(IncrementalFeatures(spec, std, macro_window=100, micro_window=7), data)
    np.testing.assert_allclose(feats, batch, rtol=FEATURE_RTOL, atol=FEATURE_ATOL)
    obs = build_observations(batch, std, 100, 7)
    np.testing.assert_array_equal(valid, obs.valid)
    assert valid.sum() > 2000
    np.testing.assert_allclose(macro, obs.macro, rtol=OBS_RTOL, atol=OBS_ATOL)
    np.testing.assert_allclose(micro, obs.micro, rtol=OBS_RTOL, atol=OBS_ATOL)


def test_update_candle_refuses_a_candle_fed_twice(year: tuple[pd.DataFrame, np.ndarray, Standardizer]) -> None:
    """With open times, a candle not newer than the last one fed is refused (the state would be corrupt)."""
    candles, _, _ = year
    engine = IncrementalFeatures(candles=candles.iloc[:100])
    assert engine.last_ts_ms == int(candles["ts_ms"].iloc[99])
    row = candles.iloc[100]
    candle = SimpleNamespace(**{c: row[c] for c in ("open", "high", "low", "close", "volume")}, ts_ms=int(row.ts_ms))
    engine.update_candle(candle)
    assert engine.rows_seen == 101
    with pytest.raises(ValueError, match="not newer"):
        engine.update_candle(candle)
    assert engine.rows_seen == 101
