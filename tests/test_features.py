"""Feature pipeline on the real 2024 data: warm-up, causality, scale-freeness, standardisation, windows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import ta

from strategies.features import (
    FEATURE_NAMES,
    MACRO_WINDOW,
    MICRO_WINDOW,
    FeatureSpec,
    Standardizer,
    aggregate_window,
    build_observations,
    compute_features,
    default_feature_spec,
    first_valid_row,
    fit_standardizer,
    warmup_candles,
)

SPEC = default_feature_spec()
WARMUP = warmup_candles(SPEC)


@pytest.fixture(scope="module")
def feats(candles_2024: pd.DataFrame) -> np.ndarray:
    """Default features of the whole year, (n, 20)."""
    return compute_features(candles_2024)


@pytest.fixture(scope="module")
def scale(feats: np.ndarray) -> np.ndarray:
    """Each feature's std over the year: the yardstick for absolute tolerances near zero."""
    return np.nanstd(feats, axis=0)


@pytest.fixture(scope="module")
def standardizer(feats: np.ndarray) -> Standardizer:
    """Fitted on the first 9 months."""
    return fit_standardizer(feats, slice(0, 273 * 288))


def assert_near(a: np.ndarray, b: np.ndarray, rel: float, scale: np.ndarray) -> None:
    """|a - b| <= rel * (|b| + scale) element-wise (relative, with the feature's std as floor near 0)."""
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    err = np.abs(a - b)
    bound = rel * (np.abs(b) + scale)
    ok = (err <= bound) | (np.isnan(a) & np.isnan(b))
    assert ok.all(), f"max excess {np.nanmax(err / bound)} x the tolerance at {np.argwhere(~ok)[:5].tolist()}"


def random_rows(lo: int, hi: int, k: int, seed: int) -> np.ndarray:
    """k distinct sorted random rows in [lo, hi)."""
    return np.sort(np.random.default_rng(seed).choice(np.arange(lo, hi), size=k, replace=False))


# ---------------------------------------------------------------------------------------------------
# Shape, warm-up, finiteness
# ---------------------------------------------------------------------------------------------------


def test_default_set_has_20_unique_names() -> None:
    assert len(FEATURE_NAMES) == 20 == len(set(FEATURE_NAMES))
    assert SPEC.names == FEATURE_NAMES and SPEC.n_features == 20


def test_warmup_rows_nan_then_all_finite(feats: np.ndarray, candles_2024: pd.DataFrame) -> None:
    assert feats.shape == (len(candles_2024), 20) and feats.dtype == np.float64
    assert WARMUP < 1500
    assert np.isnan(feats[: WARMUP - 1]).all()
    assert np.isfinite(feats[WARMUP - 1 :]).all()


def test_first_valid_row_formula() -> None:
    assert first_valid_row(SPEC) == (WARMUP - 1) + MACRO_WINDOW - 1
    assert first_valid_row(None, macro_window=10) == WARMUP - 1 + 9


# ---------------------------------------------------------------------------------------------------
# Causality: prefix invariance
# ---------------------------------------------------------------------------------------------------


def test_prefix_invariance_features_and_aggregates(
    candles_2024: pd.DataFrame, feats: np.ndarray, standardizer: Standardizer
) -> None:
    """Row t computed from data[:t+1] equals row t computed from the whole year (bit for bit)."""
    z_full = standardizer.transform(feats)
    full = {w: aggregate_window(z_full, w) for w in (MACRO_WINDOW, MICRO_WINDOW)}
    obs_full = build_observations(feats, standardizer)
    rows = random_rows(first_valid_row(SPEC), len(candles_2024), 10, seed=1)
    for t in rows:
        f = compute_features(candles_2024.iloc[: t + 1])
        np.testing.assert_array_equal(f[t], feats[t])
        z = standardizer.transform(f)
        for w, agg in full.items():
            np.testing.assert_array_equal(aggregate_window(z, w)[t], agg[t])
        obs = build_observations(f, standardizer)
        assert obs.valid[t]
        np.testing.assert_array_equal(obs.macro[t], obs_full.macro[t])
        np.testing.assert_array_equal(obs.micro[t], obs_full.micro[t])


def test_future_rows_do_not_change_past(candles_2024: pd.DataFrame, feats: np.ndarray) -> None:
    """Scrambling every candle after row t leaves rows <= t untouched."""
    t = 40_000
    scrambled = candles_2024.copy()
    rng = np.random.default_rng(3)
    m = len(scrambled) - (t + 1)
    prices = ["open", "high", "low", "close"]
    # Valid candles (high >= open, close >= low), different from the real ones.
    scrambled.loc[t + 1 :, prices] = scrambled.loc[t + 1 :, prices].to_numpy() * rng.uniform(0.5, 2.0, (m, 1))
    scrambled.loc[t + 1 :, "volume"] *= rng.uniform(0.0, 3.0, m)
    f = compute_features(scrambled)
    np.testing.assert_array_equal(f[: t + 1], feats[: t + 1])
    assert not np.array_equal(f[t + 1 :], feats[t + 1 :], equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# Warm-up length: a short history gives the same values as the whole year
# ---------------------------------------------------------------------------------------------------


def test_warmup_history_matches_full_history(candles_2024: pd.DataFrame, feats: np.ndarray, scale: np.ndarray) -> None:
    """Features at t from data[t-warmup+1 : t+1] are within 1e-6 relative of the full-year ones."""
    rows = random_rows(WARMUP - 1, len(candles_2024), 40, seed=2)
    for t in rows:
        window = candles_2024.iloc[t - WARMUP + 1 : t + 1]
        f = compute_features(window)
        assert np.isnan(f[:-1]).all()  # only the last row is past the warm-up
        assert_near(f[-1], feats[t], 1e-6, scale)
    # One candle less and the row is still warm-up.
    assert np.isnan(compute_features(candles_2024.iloc[: WARMUP - 1])).all()


def test_daemon_buffer_reproduces_training_observations(
    candles_2024: pd.DataFrame, feats: np.ndarray, standardizer: Standardizer
) -> None:
    """A live buffer of first_valid_row + 1 candles gives the newest observation as in training."""
    obs_full = build_observations(feats, standardizer)
    buffer_len = first_valid_row(SPEC) + 1
    for t in random_rows(buffer_len - 1, len(candles_2024), 8, seed=4):
        f = compute_features(candles_2024.iloc[t - buffer_len + 1 : t + 1])
        obs = build_observations(f, standardizer)
        assert obs.valid[-1] and not obs.valid[:-1].any()
        np.testing.assert_allclose(obs.macro[-1], obs_full.macro[t], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(obs.micro[-1], obs_full.micro[t], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Scale-freeness
# ---------------------------------------------------------------------------------------------------


def test_scale_free(candles_2024: pd.DataFrame, feats: np.ndarray, scale: np.ndarray) -> None:
    """Prices x 10 and volume x 7 give the same features to 1e-9 (no exception in this data)."""
    scaled = candles_2024.copy()
    scaled[["open", "high", "low", "close"]] *= 10.0
    scaled["volume"] *= 7.0
    assert_near(compute_features(scaled), feats, 1e-9, scale)


# ---------------------------------------------------------------------------------------------------
# Individual features against ta / definitions
# ---------------------------------------------------------------------------------------------------


def test_features_against_definitions(candles_2024: pd.DataFrame, feats: np.ndarray, scale: np.ndarray) -> None:
    c = candles_2024
    rows = slice(WARMUP - 1, None)
    col = {name: feats[rows, j] for j, name in enumerate(FEATURE_NAMES)}
    close = c["close"].to_numpy()
    np.testing.assert_allclose(col["logret_12"], np.log(close / np.roll(close, 12))[rows], rtol=1e-12)
    dlr = ta.others.DailyLogReturnIndicator(c["close"]).daily_log_return().to_numpy() / 100
    assert_near(col["logret_1"], dlr[rows], 1e-9, scale[0])
    # close_z is the Bollinger z-score over 48: ta's %B(48, dev 2) = z / 4 + 1/2. ta's pandas rolling std
    # is off by up to ~1e-7 relative on raw prices (see indicators.rolling_mean_std), hence 1e-6 here
    # and an exact per-window reference below.
    pband48 = ta.volatility.BollingerBands(c["close"], window=48, window_dev=2).bollinger_pband().to_numpy()
    j = FEATURE_NAMES.index("close_z")
    assert_near(col["close_z"], 4.0 * (pband48[rows] - 0.5), 1e-6, scale[j])
    for t in random_rows(WARMUP - 1, len(c), 50, seed=6):
        win = close[t - 47 : t + 1]
        z = (close[t] - win.mean()) / win.std()
        assert abs(feats[t, j] - z) <= 1e-12 * (abs(z) + 1)
    atr = ta.volatility.AverageTrueRange(c["high"], c["low"], c["close"], 14).average_true_range().to_numpy()
    np.testing.assert_allclose(col["atr"], (atr / close)[rows], rtol=1e-9)
    # Oscillators land in their documented ranges.
    for name in ("rsi", "stoch_k", "mfi", "di_diff"):
        assert np.abs(col[name]).max() <= 1.0
    assert col["adx"].min() >= 0.0 and col["adx"].max() <= 1.0


def test_degenerate_candles_stay_finite(candles_2024: pd.DataFrame) -> None:
    """Zero volume and a flat, tradeless market give finite (neutral) features, not NaN or inf."""
    c = candles_2024.iloc[:3000].reset_index(drop=True).copy()
    c.loc[1500, "volume"] = 0.0
    flat = slice(2000, 2099)  # 100 identical candles without a trade: more than every window
    for name in ("open", "high", "low", "close"):
        c.loc[flat, name] = c.loc[1999, "close"]
    c.loc[flat, "volume"] = 0.0
    f = compute_features(c)
    assert np.isfinite(f[WARMUP - 1 :]).all()
    last_flat = f[2099]
    for name in ("logret_1", "body", "range", "stoch_k", "cci", "mfi", "bb_pband", "close_z", "volume_z"):
        assert last_flat[FEATURE_NAMES.index(name)] == 0.0, name


# ---------------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------------


def test_spec_round_trip_through_json() -> None:
    back = FeatureSpec.from_dict(json.loads(json.dumps(SPEC.to_dict())))
    assert back == SPEC and hash(back) == hash(SPEC)
    assert back.to_dict() == SPEC.to_dict()
    assert warmup_candles(back) == WARMUP


def test_spec_equality_checks_params_and_order() -> None:
    changed = FeatureSpec(SPEC.names, {**SPEC.params, "rsi_window": 21})
    assert changed != SPEC
    assert FeatureSpec(tuple(reversed(SPEC.names)), SPEC.params) != SPEC
    params = dict(SPEC.params)
    spec = FeatureSpec(SPEC.names, params)
    params["rsi_window"] = 99  # a frozen spec keeps its own copy
    assert spec == SPEC


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="unknown feature"):
        FeatureSpec(("rsi", "nope"), SPEC.params)
    with pytest.raises(ValueError, match="needs params"):
        FeatureSpec(("rsi",), {})
    with pytest.raises(ValueError, match="duplicate"):
        FeatureSpec(("rsi", "rsi"), SPEC.params)


def test_custom_subset_spec(candles_2024: pd.DataFrame, feats: np.ndarray) -> None:
    spec = FeatureSpec(("logret_48", "body", "rsi"), SPEC.params)
    f = compute_features(candles_2024, spec)
    assert f.shape == (len(candles_2024), 3)
    w = warmup_candles(spec)
    assert w < WARMUP and np.isnan(f[: w - 1]).all() and np.isfinite(f[w - 1 :]).all()
    j = FEATURE_NAMES.index("rsi")
    np.testing.assert_array_equal(f[WARMUP - 1 :, 2], feats[WARMUP - 1 :, j])


# ---------------------------------------------------------------------------------------------------
# Standardizer
# ---------------------------------------------------------------------------------------------------


def test_standardizer_fits_only_on_given_rows(feats: np.ndarray) -> None:
    rows = slice(5_000, 60_000)
    st = fit_standardizer(feats, rows)
    other = feats.copy()
    other[:5_000] = 1e6
    other[60_000:] = -3.0
    assert fit_standardizer(other, rows) == st
    # An index array selects the same rows.
    assert fit_standardizer(other, np.arange(5_000, 60_000)) == st
    # NaN (warm-up) rows are skipped, not propagated.
    assert fit_standardizer(feats, slice(0, 60_000)) == fit_standardizer(feats, slice(WARMUP - 1, 60_000))
    np.testing.assert_allclose(st.mean, feats[rows].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(st.std, feats[rows].std(axis=0), rtol=1e-12)
    z = st.transform(feats[rows])
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=1e-9)


def test_standardizer_round_trip_and_floor() -> None:
    st = Standardizer(mean=np.array([1.0, -2.0]), std=np.array([0.5, 0.0]))
    d = json.loads(json.dumps(st.to_dict()))
    assert all(isinstance(v, float) for v in d["mean"] + d["std"])
    assert Standardizer.from_dict(d) == st
    z = st.transform(np.array([[2.0, -2.0], [np.nan, -1.0]]))
    np.testing.assert_array_equal(z[0], [2.0, 0.0])  # a zero std is floored, not divided by
    assert np.isnan(z[1, 0]) and z[1, 1] == 1e8
    with pytest.raises(ValueError, match="no complete"):
        fit_standardizer(np.full((5, 2), np.nan), slice(None))


# ---------------------------------------------------------------------------------------------------
# Window aggregation and observations
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [MICRO_WINDOW, MACRO_WINDOW])
def test_aggregate_window_equals_brute_force(feats: np.ndarray, standardizer: Standardizer, window: int) -> None:
    z = standardizer.transform(feats)
    agg = aggregate_window(z, window)
    n, k = z.shape
    assert agg.shape == (n, 3 * k)
    first = WARMUP - 1 + window - 1
    assert np.isnan(agg[:first]).all() and np.isfinite(agg[first:]).all()
    for t in np.r_[first, random_rows(first, n, 60, seed=5), n - 1]:
        win = z[t - window + 1 : t + 1]
        np.testing.assert_allclose(agg[t, :k], win.mean(axis=0), rtol=0, atol=1e-9)
        np.testing.assert_allclose(agg[t, k : 2 * k], win.std(axis=0), rtol=0, atol=1e-9)
        np.testing.assert_array_equal(agg[t, 2 * k :], z[t])


def test_aggregate_window_nan_in_middle() -> None:
    x = np.random.default_rng(0).normal(size=(50, 3))
    x[20, 1] = np.nan
    agg = aggregate_window(x, 5)
    bad = np.isnan(agg).any(axis=1)
    assert bad[:4].all() and bad[20:25].all() and not bad[4:20].any() and not bad[25:].any()
    assert np.isnan(agg[bad]).all()  # a bad row is NaN in all 3N columns


def _pandas_aggregate_window(x: np.ndarray, window: int) -> np.ndarray:
    """The former pandas implementation of aggregate_window, kept here as the reference."""
    x = np.where(np.isfinite(x), x, np.nan)
    n, k = x.shape
    roll = pd.DataFrame(x).rolling(window, min_periods=window)
    out = np.empty((n, 3 * k), dtype=np.float64)
    out[:, :k] = roll.mean().to_numpy()
    out[:, k : 2 * k] = roll.std(ddof=0).to_numpy()
    out[:, 2 * k :] = x
    out[np.isnan(out[:, : 2 * k]).any(axis=1)] = np.nan
    return out


@pytest.mark.parametrize("window", [MICRO_WINDOW, MACRO_WINDOW])
def test_aggregate_window_equals_pandas_rolling(feats: np.ndarray, standardizer: Standardizer, window: int) -> None:
    """Every row of the whole year within 1e-9 relative of pandas' rolling mean/std (1e-12 absolute near 0)."""
    z = standardizer.transform(feats)
    got, ref = aggregate_window(z, window), _pandas_aggregate_window(z, window)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ok = np.isfinite(ref)
    assert np.all(np.abs(got[ok] - ref[ok]) <= 1e-9 * np.abs(ref[ok]) + 1e-12)


def test_aggregate_window_non_finite_like_pandas() -> None:
    """NaN and inf anywhere in a window make the whole row NaN, as pandas' min_periods did."""
    x = np.random.default_rng(1).normal(size=(400, 4))
    x[[7, 130, 131, 250], [0, 2, 3, 1]] = [np.nan, np.inf, -np.inf, np.nan]
    for window in (1, 2, 7, 60, 129):
        got = aggregate_window(x, window)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(_pandas_aggregate_window(x, window)))
        # values against direct sums (pandas' running sums are themselves ~1e-11 off for tiny spreads)
        win = np.lib.stride_tricks.sliding_window_view(x, window, axis=0)  # (n - W + 1, N, W)
        with np.errstate(invalid="ignore"):  # inf - inf in the windows that hold an inf
            direct = np.concatenate([win.mean(axis=2), win.std(axis=2), x[window - 1 :]], axis=1)
        ok = np.isfinite(got[window - 1 :])
        np.testing.assert_allclose(got[window - 1 :][ok], direct[ok], rtol=1e-12, atol=1e-14)


def test_build_observations(feats: np.ndarray, standardizer: Standardizer) -> None:
    obs = build_observations(feats, standardizer)
    n = len(feats)
    assert obs.macro.shape == obs.micro.shape == (n, 60)
    assert obs.macro.dtype == obs.micro.dtype == np.float32 and obs.valid.dtype == bool
    start = first_valid_row(SPEC)
    assert not obs.valid[:start].any() and obs.valid[start:].all()
    assert not obs.macro[~obs.valid].any() and not obs.micro[~obs.valid].any()
    assert np.isfinite(obs.macro).all() and np.isfinite(obs.micro).all()
    z = standardizer.transform(feats).astype(np.float32)
    np.testing.assert_array_equal(obs.macro[start:, 40:], z[start:])
    np.testing.assert_array_equal(obs.micro[start:, 40:], z[start:])


def test_short_histories_are_all_nan(candles_2024: pd.DataFrame) -> None:
    """A buffer shorter than the warm-up (even empty) gives NaN rows of the right shape, no error."""
    for n in (0, 1, 30, WARMUP - 1):
        f = compute_features(candles_2024.iloc[:n])
        assert f.shape == (n, 20) and np.isnan(f).all()
