"""The vectorised indicators equal ta's own classes (fillna=False).

Full-year comparisons on the real 2024 data (ta's Python loops take about 3.5 s in total for the year);
other windows on a contiguous 3-month slice with a non-zero index; ties and zero volume on synthetic
tick-rounded data. Tolerance: relative 1e-9 where both are finite; NaN patterns are asserted exactly
(ta's 0.0 warm-up rows for ATR and ADX are asserted as such). Bollinger bands are the exception: they
match ta to 1e-6, because ta's own pandas rolling std is only that accurate on raw prices.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import ta

from strategies import indicators

RTOL = 1e-9


def assert_close(mine: np.ndarray, ref: pd.Series | np.ndarray, rows: slice = slice(None)) -> None:
    """mine == ref to relative RTOL on `rows`, and both finite (or both NaN) there."""
    mine = np.asarray(mine)[rows]
    ref = np.asarray(ref, dtype=np.float64)[rows]
    np.testing.assert_array_equal(np.isnan(mine), np.isnan(ref))
    both = np.isfinite(mine) & np.isfinite(ref)
    np.testing.assert_allclose(mine[both], ref[both], rtol=RTOL, atol=0)
    # inf (MFI with no negative flow is 100, not inf; CCI/MFI 0/0 is NaN) must agree too.
    np.testing.assert_array_equal(mine[~both & ~np.isnan(mine)], ref[~both & ~np.isnan(ref)])


@pytest.fixture(scope="module")
def hlcv(candles_2024: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series, pd.Series]:
    """The full year's high, low, close, volume."""
    c = candles_2024
    return c["high"], c["low"], c["close"], c["volume"]


@pytest.fixture(scope="module")
def quarter(candles_2024: pd.DataFrame) -> pd.DataFrame:
    """A contiguous 3-month slice (Apr-Jun 2024) that keeps its original, non-zero index."""
    return candles_2024.iloc[91 * 288 : 182 * 288]


@pytest.fixture(scope="module")
def ticky() -> pd.DataFrame:
    """Synthetic candles rounded to a coarse tick (many ties), with flat stretches and zero volumes."""
    rng = np.random.default_rng(7)
    n = 3000
    close = np.round(100 + np.cumsum(rng.normal(0, 0.3, n)), 0)
    close[1000:1040] = close[999]  # a flat market: 40 identical candles
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) + np.round(rng.exponential(0.3, n), 0)
    low = np.minimum(open_, close) - np.round(rng.exponential(0.3, n), 0)
    high[1000:1040] = low[1000:1040] = close[1000:1040]
    volume = np.round(rng.exponential(5, n), 0)  # about 18% zeros
    volume[1000:1040] = 0.0
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume})


# ---------------------------------------------------------------------------------------------------
# ATR
# ---------------------------------------------------------------------------------------------------


def test_atr_equals_ta_full_year(hlcv) -> None:
    h, lo, c, _ = hlcv
    w = 14
    mine = indicators.average_true_range(h, lo, c, w)
    ref = ta.volatility.AverageTrueRange(h, lo, c, w, fillna=False).average_true_range().to_numpy()
    # ta writes 0.0 (not NaN) into its warm-up rows; we return NaN there.
    assert np.isnan(mine[: w - 1]).all() and (ref[: w - 1] == 0).all()
    assert np.isfinite(mine[w - 1 :]).all()
    assert_close(mine, ref, slice(w - 1, None))


@pytest.mark.parametrize("w", [5, 30])
def test_atr_other_windows_quarter(quarter, w) -> None:
    q = quarter
    mine = indicators.average_true_range(q["high"], q["low"], q["close"], w)
    ref = ta.volatility.AverageTrueRange(q["high"], q["low"], q["close"], w).average_true_range()
    assert_close(mine, ref, slice(w - 1, None))


# ---------------------------------------------------------------------------------------------------
# ADX
# ---------------------------------------------------------------------------------------------------


def _check_adx(h: pd.Series, lo: pd.Series, c: pd.Series, w: int) -> None:
    mine = indicators.average_directional_index(h, lo, c, w)
    ref = ta.trend.ADXIndicator(h, lo, c, w, fillna=False)
    adx, pos, neg = ref.adx().to_numpy(), ref.adx_pos().to_numpy(), ref.adx_neg().to_numpy()
    # ADX: ta's warm-up rows 0..2w-2 are 0.0; ours NaN.
    assert np.isnan(mine.adx[: 2 * w - 1]).all() and (adx[: 2 * w - 1] == 0).all()
    assert np.isfinite(mine.adx[2 * w - 1 :]).all()
    assert_close(mine.adx, adx, slice(2 * w - 1, None))
    for m, r in ((mine.adx_pos, pos), (mine.adx_neg, neg)):
        # +DI/-DI: ta's rows 0..w are 0.0. Row w is a real value (ta's adx() uses it through DX) that
        # ta's adx_pos()/adx_neg() loops skip; we return it, so only rows > w are compared.
        assert np.isnan(m[:w]).all() and (r[: w + 1] == 0).all()
        assert np.isfinite(m[w:]).all()
        assert_close(m, r, slice(w + 1, None))


def test_adx_equals_ta_full_year(hlcv) -> None:
    h, lo, c, _ = hlcv
    _check_adx(h, lo, c, 14)


@pytest.mark.parametrize("w", [7, 25])
def test_adx_other_windows_quarter(quarter, w) -> None:
    _check_adx(quarter["high"], quarter["low"], quarter["close"], w)


# ---------------------------------------------------------------------------------------------------
# CCI and MFI (same NaN pattern as ta: rows < window-1)
# ---------------------------------------------------------------------------------------------------


def test_cci_equals_ta_full_year(hlcv) -> None:
    h, lo, c, _ = hlcv
    mine = indicators.commodity_channel_index(h, lo, c, 20, 0.015)
    ref = ta.trend.CCIIndicator(h, lo, c, 20, 0.015, fillna=False).cci()
    assert np.isnan(mine[:19]).all() and np.isfinite(mine[19:]).all()
    assert_close(mine, ref)


@pytest.mark.parametrize(("w", "constant"), [(10, 0.015), (48, 0.02)])
def test_cci_other_windows_quarter(quarter, w, constant) -> None:
    q = quarter
    mine = indicators.commodity_channel_index(q["high"], q["low"], q["close"], w, constant)
    assert_close(mine, ta.trend.CCIIndicator(q["high"], q["low"], q["close"], w, constant).cci())


def test_mfi_equals_ta_full_year(hlcv) -> None:
    h, lo, c, v = hlcv
    mine = indicators.money_flow_index(h, lo, c, v, 14)
    ref = ta.volume.MFIIndicator(h, lo, c, v, 14, fillna=False).money_flow_index()
    assert np.isnan(mine[:13]).all() and np.isfinite(mine[13:]).all()
    assert_close(mine, ref)


@pytest.mark.parametrize("w", [5, 30])
def test_mfi_other_windows_quarter(quarter, w) -> None:
    q = quarter
    mine = indicators.money_flow_index(q["high"], q["low"], q["close"], q["volume"], w)
    assert_close(mine, ta.volume.MFIIndicator(q["high"], q["low"], q["close"], q["volume"], w).money_flow_index())


# ---------------------------------------------------------------------------------------------------
# Ties, flat stretches, zero volume, short inputs
# ---------------------------------------------------------------------------------------------------


def test_all_equal_ta_on_ties_and_flat_market(ticky) -> None:
    h, lo, c, v = ticky["high"], ticky["low"], ticky["close"], ticky["volume"]
    assert_close(
        indicators.average_true_range(h, lo, c, 14),
        ta.volatility.AverageTrueRange(h, lo, c, 14).average_true_range(),
        slice(13, None),
    )
    _check_adx(h, lo, c, 14)
    cci = indicators.commodity_channel_index(h, lo, c, 20)
    assert np.isnan(cci[1019:1040]).all()  # 0/0 in the flat stretch, as in ta
    assert_close(cci, ta.trend.CCIIndicator(h, lo, c, 20).cci())
    mfi = indicators.money_flow_index(h, lo, c, v, 14)
    assert np.isnan(mfi[1014:1040]).all()
    assert_close(mfi, ta.volume.MFIIndicator(h, lo, c, v, 14).money_flow_index())


def test_short_inputs_are_all_nan() -> None:
    x = np.array([1.0, 2.0, 3.0])
    assert np.isnan(indicators.average_true_range(x + 1, x - 1, x, 14)).all()
    assert all(np.isnan(a).all() for a in indicators.average_directional_index(x + 1, x - 1, x, 14))
    assert np.isnan(indicators.commodity_channel_index(x + 1, x - 1, x, 14)).all()
    assert np.isnan(indicators.money_flow_index(x + 1, x - 1, x, x, 14)).all()


# ---------------------------------------------------------------------------------------------------
# Bollinger bands / windowed mean and std
# ---------------------------------------------------------------------------------------------------


def test_rolling_mean_std_is_exact_per_window(hlcv) -> None:
    """Every window's mean/std equals numpy on that window alone (so it cannot depend on earlier data)."""
    close = hlcv[2].to_numpy()
    w = 48
    mean, std = indicators.rolling_mean_std(close, w)
    assert np.isnan(mean[: w - 1]).all() and np.isnan(std[: w - 1]).all()
    rows = np.random.default_rng(0).integers(w - 1, len(close), 200)
    for t in rows:
        win = close[t - w + 1 : t + 1]
        assert abs(mean[t] - win.mean()) <= 1e-15 * win.mean()
        assert abs(std[t] - win.std()) <= 1e-12 * win.std()
    flat_mean, flat_std = indicators.rolling_mean_std(np.full(30, 42283.58), 20)
    assert (flat_mean[19:] == 42283.58).all() and (flat_std[19:] == 0.0).all()


def test_bollinger_equals_ta_up_to_ta_rolling_std_error(hlcv) -> None:
    """Bands equal ta's to 1e-6: ta's pandas rolling std on raw prices is itself off by up to ~1e-7."""
    close = hlcv[2]
    w = 20
    mine = indicators.bollinger_bands(close, w, 2)
    ref = ta.volatility.BollingerBands(close, w, 2, fillna=False)
    np.testing.assert_allclose(mine.mavg[w - 1 :], ref.bollinger_mavg()[w - 1 :], rtol=1e-12)
    for m, r in (
        (mine.hband, ref.bollinger_hband()),
        (mine.lband, ref.bollinger_lband()),
        (mine.wband, ref.bollinger_wband()),
    ):
        assert np.isnan(m[: w - 1]).all() and np.isnan(np.asarray(r)[: w - 1]).all()
        np.testing.assert_allclose(m[w - 1 :], np.asarray(r)[w - 1 :], rtol=1e-6)
    np.testing.assert_allclose(mine.pband[w - 1 :], ref.bollinger_pband()[w - 1 :], rtol=1e-6, atol=1e-6)
    # The deviation is ta's: its std vs the exact per-window std.
    exact = np.array([close.to_numpy()[t - w + 1 : t + 1].std() for t in range(w - 1, len(close))])
    ta_std = (ref.bollinger_hband() - ref.bollinger_mavg()).to_numpy()[w - 1 :] / 2
    mine_std = (mine.hband - mine.mavg)[w - 1 :] / 2
    assert np.max(np.abs(mine_std / exact - 1)) < 1e-9 < np.max(np.abs(ta_std / exact - 1)) < 1e-6
