"""strategies/evaluation.py: baselines, daily returns, trade statistics, bootstrap, (deflated) Sharpe ratios.

Hand-computed numbers where a formula is simple enough to check by hand, properties (prefix invariance,
determinism, monotonicity, coverage) elsewhere, and one test on the real 2024 candles.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from strategies import accounting
from strategies.evaluation import (
    BUY,
    HOLD,
    SELL,
    bootstrap_ci,
    daily_log_returns,
    deflated_sharpe_ratio,
    expected_max_sharpe,
    probabilistic_sharpe_ratio,
    random_turnover_actions,
    sample_skew_kurtosis,
    sharpe_ratio,
    sma_rule_actions,
    summarize_seeds,
    switch_prob_for_trades,
    trade_stats,
)

DAY = 86_400_000
HOUR = 3_600_000
FIVE_MIN = 300_000
PHI = NormalDist()
GAMMA = 0.5772156649


def _approx(x: float) -> object:
    return pytest.approx(x, rel=1e-12, abs=1e-15)


def _positions(actions: np.ndarray, mode: str) -> np.ndarray:
    """Position after each action (n,), starting flat, through the project's own accounting."""
    p, out = 0, []
    for a in actions:
        p = int(accounting.target_position(int(a), p, mode))
        out.append(p)
    return np.array(out, dtype=np.int64)


def test_evaluation_stays_free_of_torch() -> None:
    """The statistics import without torch (the evaluation report runs in light processes)."""
    code = "import sys, strategies.evaluation; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------------------------------------
# sma_rule_actions
# ---------------------------------------------------------------------------------------------------------


def test_sma_rule_hand_computed() -> None:
    close = np.array([1, 2, 3, 4, 3, 2, 1, 1, 5], dtype=np.float64)
    # i=2: fast (2+3)/2=2.5 > slow (1+2+3)/3=2 -> BUY; i=3: 3.5 > 3; i=4: 3.5 > 10/3; i=5: 2.5 < 3 -> SELL;
    # i=6: 1.5 < 2; i=7: 1 < 4/3; i=8: 3 > 7/3 -> BUY.
    expected = [HOLD, HOLD, BUY, BUY, BUY, SELL, SELL, SELL, BUY]
    for mode in ("long_only", "long_short"):
        got = sma_rule_actions(close, 2, 3, mode)
        assert got.dtype == np.int64
        assert got.tolist() == expected


def test_sma_rule_tie_is_sell_and_short_input_is_hold() -> None:
    assert sma_rule_actions(np.full(5, 2.0), 1, 2, "long_only").tolist() == [HOLD, SELL, SELL, SELL, SELL]
    assert sma_rule_actions(np.arange(1.0, 4.0), 2, 5, "long_short").tolist() == [HOLD] * 3
    assert sma_rule_actions(np.zeros(0), 2, 5, "long_short").tolist() == []


def test_sma_rule_validates() -> None:
    close = np.arange(1.0, 20.0)
    with pytest.raises(ValueError, match="position mode"):
        sma_rule_actions(close, 2, 5, "short_only")
    for fast, slow in ((5, 5), (6, 5), (0, 5)):
        with pytest.raises(ValueError, match="fast < slow"):
            sma_rule_actions(close, fast, slow, "long_only")
    with pytest.raises(ValueError, match="finite"):
        sma_rule_actions(np.r_[close, np.nan], 2, 5, "long_only")


def test_sma_rule_prefix_invariant_synthetic() -> None:
    rng = np.random.default_rng(3)
    close = 30_000 * np.exp(np.cumsum(rng.normal(0, 0.002, 5000)))
    full = sma_rule_actions(close, 12, 48, "long_short")
    assert {HOLD, BUY, SELL} <= set(full.tolist())
    for t in (0, 10, 46, 47, 48, 1234, 4998, 4999):
        # a copy, so a different memory alignment cannot change the sums either
        np.testing.assert_array_equal(sma_rule_actions(close[: t + 1].copy(), 12, 48, "long_short"), full[: t + 1])


def test_sma_rule_real_2024_prefix_invariant(candles_2024: pd.DataFrame) -> None:
    close = candles_2024["close"].to_numpy(dtype=np.float64)
    full = sma_rule_actions(close, 288, 1440, "long_only")
    assert (full[:1439] == HOLD).all()
    assert np.isin(full[1439:], (BUY, SELL)).all()
    assert (full == BUY).sum() > 1000 and (full == SELL).sum() > 1000
    cuts = np.random.default_rng(2024).integers(1440, close.size, size=5)
    for t in cuts:
        np.testing.assert_array_equal(sma_rule_actions(close[: t + 1].copy(), 288, 1440, "long_only"), full[: t + 1])


# ---------------------------------------------------------------------------------------------------------
# random_turnover_actions, switch_prob_for_trades
# ---------------------------------------------------------------------------------------------------------


def test_random_turnover_is_pure_and_prefix_stable() -> None:
    a = random_turnover_actions(3000, 0.05, "long_short", seed=11)
    np.testing.assert_array_equal(a, random_turnover_actions(3000, 0.05, "long_short", seed=11))
    assert not np.array_equal(a, random_turnover_actions(3000, 0.05, "long_short", seed=12))
    np.testing.assert_array_equal(random_turnover_actions(1000, 0.05, "long_short", seed=11), a[:1000])
    assert a.dtype == np.int64 and np.isin(a, (HOLD, BUY, SELL)).all()


@pytest.mark.parametrize("mode", ["long_only", "long_short"])
def test_random_turnover_every_action_trades(mode: str) -> None:
    actions = random_turnover_actions(4000, 0.03, mode, seed=5)
    pos = _positions(actions, mode)
    before = np.r_[0, pos[:-1]]
    traded = actions != HOLD
    # every non-HOLD action moves the position (no wasted BUY-while-long), and HOLD never does
    assert (pos[traded] != before[traded]).all()
    assert (pos[~traded] == before[~traded]).all()
    allowed = {0, 1} if mode == "long_only" else {-1, 1}
    assert set(pos[np.argmax(traded) :].tolist()) <= allowed


@pytest.mark.parametrize("mode", ["long_only", "long_short"])
def test_random_turnover_matches_trade_count(mode: str) -> None:
    n, p = 100_000, 0.01
    trades = int((random_turnover_actions(n, p, mode, seed=1) != HOLD).sum())
    assert abs(trades - n * p) < 5 * math.sqrt(n * p * (1 - p))  # binomial: 5 standard deviations


def test_random_turnover_extremes_and_first_direction() -> None:
    assert (random_turnover_actions(50, 0.0, "long_short", seed=0) == HOLD).all()
    assert random_turnover_actions(4, 1.0, "long_only", seed=0).tolist() == [BUY, SELL, BUY, SELL]
    firsts = set()
    for seed in range(40):
        a = random_turnover_actions(200, 0.2, "long_short", seed=seed)
        firsts.add(int(a[a != HOLD][0]))
        assert random_turnover_actions(200, 0.2, "long_only", seed=seed)[a != HOLD][0] == BUY  # same switches
    assert firsts == {BUY, SELL}  # from flat, long_short goes long or short
    with pytest.raises(ValueError):
        random_turnover_actions(10, 1.5, "long_only", seed=0)
    with pytest.raises(ValueError):
        random_turnover_actions(10, 0.5, "both", seed=0)


def test_switch_prob_for_trades() -> None:
    assert switch_prob_for_trades(50, 1000) == 0.05
    assert switch_prob_for_trades(2000, 1000) == 1.0
    assert switch_prob_for_trades(0, 1000) == 0.0
    assert switch_prob_for_trades(-3, 1000) == 0.0
    with pytest.raises(ValueError):
        switch_prob_for_trades(3, 0)


# ---------------------------------------------------------------------------------------------------------
# daily_log_returns
# ---------------------------------------------------------------------------------------------------------


def test_daily_log_returns_hand_computed() -> None:
    d1 = 19_000 * DAY
    ts = np.array([d1 + 12 * HOUR, d1 + 18 * HOUR, d1 + DAY, d1 + DAY + 12 * HOUR, d1 + 3 * DAY + HOUR, d1 + 4 * DAY])
    eq = np.array([100.0, 110.0, 120.0, 99.0, 108.0, 120.0])
    days, r = daily_log_returns(ts, eq)
    # day 1: first mark 100 -> 120 (the midnight mark ends day 1); day 2: 120 -> 99; day 3 has no mark and is
    # skipped; day 4 starts from the last earlier mark (99) and ends at the midnight mark 120; no day 5.
    assert days.tolist() == [d1, d1 + DAY, d1 + 3 * DAY]
    np.testing.assert_allclose(r, [math.log(1.2), math.log(99 / 120), math.log(120 / 99)], rtol=1e-14)
    assert r.sum() == pytest.approx(math.log(1.2), rel=1e-12)


def test_daily_log_returns_regular_curve() -> None:
    rng = np.random.default_rng(0)
    start = 19_500 * DAY + 7 * FIVE_MIN  # starts 35 minutes into a day
    ts = start + FIVE_MIN * np.arange(288 * 3 + 1, dtype=np.int64)
    eq = 1000 * np.exp(np.cumsum(np.r_[0.0, rng.normal(0, 1e-3, ts.size - 1)]))
    days, r = daily_log_returns(ts, eq)
    assert days.tolist() == [19_500 * DAY + k * DAY for k in range(4)]
    last_day0 = np.flatnonzero(ts <= 19_501 * DAY)[-1]
    assert r[0] == pytest.approx(math.log(eq[last_day0] / eq[0]), rel=1e-12)
    assert r.sum() == pytest.approx(math.log(eq[-1] / eq[0]), rel=1e-10, abs=1e-12)


def test_daily_log_returns_validates() -> None:
    with pytest.raises(ValueError, match="increasing"):
        daily_log_returns(np.array([0, 0]), np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="> 0"):
        daily_log_returns(np.array([0, 1]), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        daily_log_returns(np.array([0]), np.array([1.0]))


# ---------------------------------------------------------------------------------------------------------
# trade_stats
# ---------------------------------------------------------------------------------------------------------


def _curve(eq: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return 19_000 * DAY + FIVE_MIN * np.arange(len(eq), dtype=np.int64), np.array(eq)


def test_trade_stats_hand_computed() -> None:
    ts, eq = _curve([100, 99.9, 101, 102, 103, 103, 102.9, 101, 100, 99, 99.5])
    positions = np.array([0, 1, 1, 1, 0, 0, -1, -1, 1, 0])
    # runs: candles 1..3 long (eq[4]/eq[1] = 103/99.9), 6..7 short (100/102.9), 8..8 long (99/100)
    s = trade_stats(ts, eq, positions, fees_quote=0.5, n_trades=5, commission=0.001)
    assert s["n_round_trips"] == 3
    assert s["avg_holding_candles"] == _approx(2.0)
    assert s["avg_holding_hours"] == _approx(2.0 / 12)
    assert s["trades_per_day"] == _approx(5 / (10 * FIVE_MIN / DAY))  # 144 trades a day
    assert s["win_rate"] == _approx(1 / 3)
    assert s["profit_factor"] == pytest.approx((103 - 99.9) / ((102.9 - 100) + (100 - 99)), rel=1e-12)
    edge = (math.log(103 / 99.9) + math.log(100 / 102.9) + math.log(99 / 100)) / 3 * 1e4 / 2
    assert s["edge_per_trade_bps"] == pytest.approx(edge, rel=1e-12)
    assert s["fee_per_trade_bps"] == _approx(10.0)
    assert s["edge_over_fee"] == pytest.approx(edge / 10, rel=1e-12)
    assert s["fees_quote"] == 0.5 and s["fees_frac_of_start_equity"] == _approx(0.005)


def test_trade_stats_flat_only_winners_only_losers_open_run() -> None:
    ts, eq = _curve([100, 101, 102, 103])
    flat = trade_stats(ts, eq, np.zeros(3, dtype=np.int64), 0.0, 0, 0.001)
    assert flat["n_round_trips"] == 0 and flat["avg_holding_candles"] == 0.0 and flat["trades_per_day"] == 0.0
    assert flat["win_rate"] is None and flat["profit_factor"] is None
    assert flat["edge_per_trade_bps"] is None and flat["edge_over_fee"] is None

    # a run still open at the end is marked at the last close: candles 1..2 -> eq[3] / eq[1]
    up = trade_stats(ts, eq, np.array([0, 1, 1]), 0.1, 1, 0.0)
    assert up["n_round_trips"] == 1 and up["win_rate"] == 1.0
    assert up["profit_factor"] is None  # no losing run: the ratio is infinite, reported as None
    assert up["edge_per_trade_bps"] == pytest.approx(math.log(103 / 101) * 1e4 / 2, rel=1e-12)
    assert up["edge_over_fee"] is None  # commission 0

    down = trade_stats(ts, eq, np.array([-1, 0, -1]), 0.1, 3, 0.001)
    assert down["n_round_trips"] == 2 and down["win_rate"] == 1.0  # equity ratios 101/100, 103/102, whatever the side
    ts2, eq2 = _curve([100, 99, 98, 97])
    loser = trade_stats(ts2, eq2, np.array([1, 0, 1]), 0.1, 3, 0.001)
    assert loser["win_rate"] == 0.0 and loser["profit_factor"] == 0.0
    assert loser["edge_over_fee"] < 0


def test_trade_stats_validates() -> None:
    ts, eq = _curve([100, 101, 102])
    with pytest.raises(ValueError, match="len"):
        trade_stats(ts, eq, np.array([0, 1, 1]), 0.0, 0, 0.001)
    with pytest.raises(ValueError, match="-1, 0, 1"):
        trade_stats(ts, eq, np.array([0, 2]), 0.0, 0, 0.001)


# ---------------------------------------------------------------------------------------------------------
# sharpe_ratio, bootstrap_ci
# ---------------------------------------------------------------------------------------------------------


def test_sharpe_ratio_hand_computed_and_undefined() -> None:
    r = np.array([0.01, -0.01, 0.02, 0.0])
    # mean 0.005; deviations +-0.005, +-0.015 -> std sqrt(125e-6)
    assert sharpe_ratio(r, 365) == pytest.approx(0.005 / math.sqrt(125e-6) * math.sqrt(365), rel=1e-12)
    assert math.isnan(sharpe_ratio(np.array([0.1, 0.1, 0.1]), 365))  # float std would be ~1e-17, not 0
    assert math.isnan(sharpe_ratio(np.array([0.1]), 365))
    assert math.isnan(sharpe_ratio(np.array([0.1, np.nan, 0.2]), 365))


def _sharpe_365(x: np.ndarray) -> float:
    return sharpe_ratio(x, 365)


def test_bootstrap_deterministic_and_contains_estimate() -> None:
    x = np.random.default_rng(1).normal(0.002, 0.02, 1500)
    ci = bootstrap_ci(x, _sharpe_365, n_boot=500, seed=3)
    assert ci == bootstrap_ci(x, _sharpe_365, n_boot=500, seed=3)
    assert ci != bootstrap_ci(x, _sharpe_365, n_boot=500, seed=4)
    lo, hi = ci
    assert lo < sharpe_ratio(x, 365) < hi
    lo, hi = bootstrap_ci(x, np.mean, n_boot=500)
    assert lo < x.mean() < hi and lo < 0.002 < hi


def test_bootstrap_width_shrinks_with_more_data() -> None:
    rng = np.random.default_rng(2)
    small, large = rng.normal(0.001, 0.02, 250), rng.normal(0.001, 0.02, 4000)
    w_small = np.subtract(*bootstrap_ci(small, np.mean, n_boot=800)[::-1])
    w_large = np.subtract(*bootstrap_ci(large, np.mean, n_boot=800)[::-1])
    assert 0 < w_large < 0.5 * w_small  # sqrt(16) = 4 in theory


def test_bootstrap_block_one_matches_normal_theory() -> None:
    x = np.random.default_rng(4).normal(0.0, 1.0, 2000)
    lo, hi = bootstrap_ci(x, np.mean, n_boot=2000, block=1)
    half = 1.959964 * x.std() / math.sqrt(x.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)


def test_bootstrap_blocks_widen_for_autocorrelated_data() -> None:
    rng = np.random.default_rng(5)
    e, x = rng.normal(size=3000), np.zeros(3000)
    for i in range(1, 3000):
        x[i] = 0.8 * x[i - 1] + e[i]  # AR(1): the iid bootstrap understates the mean's spread by ~3x
    w_iid = np.subtract(*bootstrap_ci(x, np.mean, n_boot=600, block=1)[::-1])
    w_block = np.subtract(*bootstrap_ci(x, np.mean, n_boot=600, block=40)[::-1])
    assert w_block > 1.8 * w_iid


def test_bootstrap_resamples_are_consecutive_blocks() -> None:
    seen: list[np.ndarray] = []

    def record(row: np.ndarray) -> float:
        seen.append(row.copy())
        return float(row.mean())

    bootstrap_ci(np.arange(23, dtype=np.float64), record, n_boot=50, block=5, seed=9)
    assert len(seen) == 50
    for row in seen:
        assert row.size == 23
        for k in range(0, 23, 5):
            chunk = row[k : k + 5]
            np.testing.assert_array_equal(np.diff(chunk), np.ones(chunk.size - 1))
            assert 0 <= chunk[0] <= 23 - 5


def test_bootstrap_nan_cases() -> None:
    assert all(map(math.isnan, bootstrap_ci(np.ones(9), np.mean, block=5)))  # fewer than 2 blocks
    assert all(map(math.isnan, bootstrap_ci(np.ones(50), lambda _: math.nan)))
    assert all(map(math.isnan, bootstrap_ci(np.full(50, 0.01), _sharpe_365)))  # std 0 in every resample


# ---------------------------------------------------------------------------------------------------------
# sample_skew_kurtosis, probabilistic and deflated Sharpe ratio
# ---------------------------------------------------------------------------------------------------------


def test_sample_skew_kurtosis() -> None:
    skew, kurt = sample_skew_kurtosis(np.array([0.0, 0.0, 0.0, 1.0]))
    # mean 1/4, m2 = 3/16, m3 = 3/32, m4 = 21/256 -> skew 2/sqrt(3), kurtosis 7/3
    assert skew == pytest.approx(2 / math.sqrt(3), rel=1e-12)
    assert kurt == pytest.approx(7 / 3, rel=1e-12)
    skew, kurt = sample_skew_kurtosis(np.random.default_rng(0).normal(size=200_000))
    assert abs(skew) < 0.03 and abs(kurt - 3) < 0.06
    assert all(map(math.isnan, sample_skew_kurtosis(np.full(5, 2.0))))


def test_psr_formula() -> None:
    # normal returns: Φ(SR sqrt(n - 1) / sqrt(1 + SR²/2))
    expected = PHI.cdf(0.1 * math.sqrt(249) / math.sqrt(1 + 0.01 / 2))
    assert probabilistic_sharpe_ratio(0.1, 0.0, 250, 0.0, 3.0) == pytest.approx(expected, rel=1e-12)
    assert probabilistic_sharpe_ratio(0.07, 0.07, 250, -0.5, 6.0) == pytest.approx(0.5, abs=1e-15)
    # negative skew and fat tails lower the confidence in a positive SR
    assert probabilistic_sharpe_ratio(0.1, 0.0, 250, -1.0, 8.0) < probabilistic_sharpe_ratio(0.1, 0.0, 250, 0, 3)


def test_dsr_with_one_trial_is_psr() -> None:
    assert expected_max_sharpe(0.0025, 1) == 0.0
    for sr, skew, kurt in ((0.1, 0.0, 3.0), (0.05, -0.7, 9.0), (-0.02, 0.3, 4.0)):
        assert deflated_sharpe_ratio(sr, 0.0025, 1, 365, skew, kurt) == pytest.approx(
            probabilistic_sharpe_ratio(sr, 0.0, 365, skew, kurt), rel=1e-15
        )


def test_dsr_hand_computed() -> None:
    sr, v, n, n_obs = 0.1, 0.0025, 10, 500
    sr0 = math.sqrt(v) * ((1 - GAMMA) * PHI.inv_cdf(1 - 1 / n) + GAMMA * PHI.inv_cdf(1 - 1 / (n * math.e)))
    assert 0.07 < sr0 < 0.08  # 0.05 * (0.4228 * 1.2816 + 0.5772 * 1.7892) = 0.0788
    expected = PHI.cdf((sr - sr0) * math.sqrt(n_obs - 1) / math.sqrt(1 - 0 * sr + (3 - 1) / 4 * sr**2))
    assert expected_max_sharpe(v, n) == pytest.approx(sr0, rel=1e-9)
    assert deflated_sharpe_ratio(sr, v, n, n_obs, 0.0, 3.0) == pytest.approx(expected, rel=1e-9)
    assert 0.6 < expected < 0.75


def test_dsr_decreases_with_trials_and_takes_an_array() -> None:
    dsr = [deflated_sharpe_ratio(0.1, 0.0025, n, 500, 0.0, 3.0) for n in (1, 2, 5, 10, 100, 1000)]
    assert all(a > b for a, b in itertools.pairwise(dsr))
    trials = np.array([0.02, 0.09, -0.03, 0.05, 0.11])
    assert deflated_sharpe_ratio(0.11, trials, 5, 400, 0.2, 5.0) == pytest.approx(
        deflated_sharpe_ratio(0.11, float(np.var(trials, ddof=1)), 5, 400, 0.2, 5.0), rel=1e-15
    )


def test_dsr_nan_cases() -> None:
    assert math.isnan(deflated_sharpe_ratio(math.nan, 0.0025, 10, 500, 0.0, 3.0))
    assert math.isnan(deflated_sharpe_ratio(0.1, math.inf, 10, 500, 0.0, 3.0))
    assert math.isnan(deflated_sharpe_ratio(0.1, np.array([0.1]), 10, 500, 0.0, 3.0))  # one trial: no variance
    assert math.isnan(deflated_sharpe_ratio(0.1, 0.0025, 10, 500, 20.0, 3.0))  # 1 - 2 + 0.005 <= 0
    assert math.isnan(probabilistic_sharpe_ratio(0.1, 0.0, 500, 0.0, math.nan))
    with pytest.raises(ValueError):
        deflated_sharpe_ratio(0.1, 0.0025, 0, 500, 0.0, 3.0)


# ---------------------------------------------------------------------------------------------------------
# summarize_seeds
# ---------------------------------------------------------------------------------------------------------


def test_summarize_seeds() -> None:
    s = summarize_seeds([1.0, None, 3.0, math.nan, 2.0, math.inf])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 6, "n_finite": 3}
    assert summarize_seeds([None, math.nan]) == {
        "mean": None,
        "std": None,
        "min": None,
        "max": None,
        "n": 2,
        "n_finite": 0,
    }
    one = summarize_seeds([0.5])
    assert one["mean"] == 0.5 and one["std"] is None and one["n_finite"] == 1
