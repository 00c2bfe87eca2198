"""Honest evaluation of a policy: baselines at the same costs, daily-return statistics, multiple-testing care.

Everything here is a pure function of numpy arrays (no I/O, no clock, no torch), so the walk-forward
evaluation that calls it can be re-run and audited.

Baselines (emitted as action codes 0 HOLD, 1 BUY, 2 SELL, the same codes `strategies.accounting` maps to
positions, so the caller runs them through the very same accounting, commission and slippage as the
policy; a baseline that paid different costs would not be a comparison):
- `sma_rule_actions`: a plain trend rule (fast SMA above slow SMA -> BUY, else SELL). If a learned policy
  cannot beat a two-line rule out of sample, it has learned nothing worth its parameters.
- `random_turnover_actions`: a random policy trading as often as the policy did
  (`switch_prob_for_trades`). It separates skill from turnover: at 0.1 % per side, trading a lot loses
  money by itself, and a policy must beat random trading at its own trade count, not only flat.
Buy-and-hold and flat are computed by the backtest itself.

Statistics:
- `daily_log_returns`: the equity curve is marked every 5 minutes, but 5-minute returns are strongly
  non-normal and fees cluster on trades; everything below works on UTC-daily log returns.
- `trade_stats`: turnover, holding time, win rate, profit factor, and the edge per trade against the fee
  per trade. An edge below the fee is the usual way a policy that "predicts" still loses money.
- `sharpe_ratio` and `bootstrap_ci`: a moving-block bootstrap on daily values (blocks keep the short-range
  dependence of daily returns) gives percentile intervals for the annualised Sharpe ratio and for the mean
  daily log-return difference policy minus buy-and-hold. An interval that contains 0 means "not shown".
- `deflated_sharpe_ratio` (Bailey & López de Prado, 2014): the best of many tries has a high Sharpe ratio
  by luck alone. It discounts the reported Sharpe ratio by the expected maximum of N null trials, where N
  must count every configuration x seed that was tried, not only the ones reported.
- `summarize_seeds`: mean/std/min/max of one figure over seeds, so a single lucky seed is never reported
  alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from strategies.actions import BUY, HOLD, SELL, validate_position_mode
from strategies.candles import CANDLE_MS

__all__ = [
    "BUY",
    "HOLD",
    "SELL",
    "bootstrap_ci",
    "daily_log_returns",
    "deflated_sharpe_ratio",
    "expected_max_sharpe",
    "probabilistic_sharpe_ratio",
    "random_turnover_actions",
    "sample_skew_kurtosis",
    "sharpe_ratio",
    "sma_rule_actions",
    "summarize_seeds",
    "switch_prob_for_trades",
    "trade_stats",
]


DAY_MS = 86_400_000
EULER_GAMMA = 0.5772156649015329
_NORMAL = NormalDist()


# ----------------------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------------------


def _windowed_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean of each complete window ending at row i, (n,) -> (n - window + 1,)."""
    # Each window is summed on its own (not a running cumsum difference), so row i is a pure function of
    # x[i-window+1 .. i]: a prefix of the input gives bit-identical means, and no error accumulates over
    # a year of ~1e4-1e5 prices.
    return sliding_window_view(x, window).mean(axis=-1)


def sma_rule_actions(close: np.ndarray, fast: int, slow: int, mode: str) -> np.ndarray:
    """Trend-rule actions (n,) int64 from closes (n,): BUY if SMA_fast > SMA_slow else SELL; HOLD in warm-up.

    The decision at the close of candle i uses closes[: i + 1] only. Rows i < slow - 1 (slow window not yet
    complete) are HOLD. A tie (SMA_fast == SMA_slow) is SELL. `mode` is validated but does not change the
    actions: the caller's accounting maps SELL to flat (long_only) or short (long_short). Windows are in
    candles: 1 day / 5 days = 288 / 1440, 2 days / 8 days = 576 / 2304 on 5-minute candles.
    Requires 1 <= fast < slow.
    """
    validate_position_mode(mode)
    if not (isinstance(fast, int | np.integer) and isinstance(slow, int | np.integer)) or not 1 <= fast < slow:
        raise ValueError(f"need integer windows with 1 <= fast < slow, got fast={fast!r} slow={slow!r}")
    close = np.asarray(close, dtype=np.float64)
    if close.ndim != 1:
        raise ValueError(f"close must be 1-D, got shape {close.shape}")
    if not np.all(np.isfinite(close)):
        raise ValueError("close must be finite")
    n = close.shape[0]
    actions = np.full(n, HOLD, dtype=np.int64)
    if n < slow:
        return actions
    slow_mean = _windowed_mean(close, slow)  # row j is the window ending at candle j + slow - 1
    fast_mean = _windowed_mean(close, fast)[slow - fast :]  # aligned to the same end candles
    actions[slow - 1 :] = np.where(fast_mean > slow_mean, BUY, SELL)
    return actions


def random_turnover_actions(n: int, switch_prob: float, mode: str, seed: int) -> np.ndarray:
    """Random-policy actions (n,) int64 that change position with probability `switch_prob` at each decision.

    Starts flat (position 0, like every backtest). At each decision, with probability switch_prob, the
    policy moves to another position state and emits the action that reaches it, otherwise HOLD:
    - long_only: 0 -> +1 (BUY), +1 -> 0 (SELL);
    - long_short: 0 -> +1 or -1 (uniformly, BUY or SELL), +1 -> -1 (SELL), -1 -> +1 (BUY). Flat cannot be
      reached again with BUY/SELL alone in long_short, so after the first trade it alternates +1 / -1.
    Every switch is exactly one trade, so the expected trade count is n * switch_prob in both modes. Pure
    function of (n, switch_prob, mode, seed); decision i uses draws 2i and 2i+1 of
    np.random.default_rng(seed), so a shorter n gives a prefix of a longer one.
    """
    validate_position_mode(mode)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= switch_prob <= 1.0:
        raise ValueError(f"switch_prob must lie in [0, 1], got {switch_prob}")
    draws = np.random.default_rng(seed).random((n, 2))  # row-major: row i is draws 2i, 2i+1
    switch = draws[:, 0] < switch_prob
    actions = np.full(n, HOLD, dtype=np.int64)
    k = np.flatnonzero(switch)
    if k.size == 0:
        return actions
    # From flat the first switch goes to +1 in long_only; in long_short to +1 or -1 by the second draw.
    first = BUY if mode == "long_only" or draws[k[0], 1] < 0.5 else SELL
    other = SELL if first == BUY else BUY
    # Only two states are ever visited after the first switch, so the switches alternate.
    actions[k] = np.where(np.arange(k.size) % 2 == 0, first, other)
    return actions


def switch_prob_for_trades(n_trades: float, n_decisions: int) -> float:
    """Switch probability clip(n_trades / n_decisions, 0, 1): matches the policy's trade count in expectation."""
    if n_decisions <= 0:
        raise ValueError(f"n_decisions must be > 0, got {n_decisions}")
    return float(min(max(n_trades / n_decisions, 0.0), 1.0))


# ----------------------------------------------------------------------------------------------------------
# Equity curve -> daily returns, trade statistics
# ----------------------------------------------------------------------------------------------------------


def _validate_curve(equity_ts_ms: np.ndarray, equity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ts int64 (m,), equity float64 (m,)) after checking shapes, order and positivity."""
    ts = np.asarray(equity_ts_ms, dtype=np.int64)
    eq = np.asarray(equity, dtype=np.float64)
    if ts.ndim != 1 or eq.ndim != 1 or ts.shape != eq.shape:
        raise ValueError(f"equity_ts_ms and equity must be 1-D of equal length, got {ts.shape} and {eq.shape}")
    if ts.shape[0] < 2:
        raise ValueError("an equity curve needs at least 2 marks")
    if np.any(np.diff(ts) <= 0):
        raise ValueError("equity_ts_ms must be strictly increasing")
    if not np.all(np.isfinite(eq)) or np.any(eq <= 0):
        raise ValueError("equity must be finite and > 0")
    return ts, eq


def daily_log_returns(equity_ts_ms: np.ndarray, equity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(day_start_ms (d,) int64, log return of each UTC day (d,)) from marks ts (m,), equity (m,).

    A day [D, D + 1 day) runs from the last mark at or before D (for the first day: the first mark, which
    is the start of the curve) to the last mark at or before D + 1 day. A mark exactly at midnight is thus
    the end of the day before (the close of the 23:55 candle). Days containing no mark after the start are
    skipped; the next listed day then starts from the last earlier mark, so the gap's P&L is not lost.
    The returns sum to ln(equity[-1] / equity[0]).
    """
    ts, eq = _validate_curve(equity_ts_ms, equity)
    # The day whose (start, end] holds each mark after the first: for integer ms, floor((t - 1) / day).
    day = (ts[1:] - 1) // DAY_MS
    last = np.flatnonzero(np.r_[day[1:] != day[:-1], True]) + 1  # index in ts of each day's last mark
    end_value = eq[last]
    start_value = np.r_[eq[0], end_value[:-1]]
    return day[last - 1] * DAY_MS, np.log(end_value / start_value)


def _position_runs(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first candle a (r,), last candle b (r,)) of each maximal run of one equal non-zero position."""
    n = positions.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, positions[1:] != positions[:-1]])
    ends = np.r_[starts[1:] - 1, n - 1]
    held = positions[starts] != 0
    return starts[held], ends[held]


def trade_stats(
    equity_ts_ms: np.ndarray,
    equity: np.ndarray,
    positions: np.ndarray,
    fees_quote: float,
    n_trades: int,
    commission: float,
) -> dict[str, float | int | None]:
    """Turnover and per-run trade quality of a backtest: marks ts (n+1,), equity (n+1,), positions (n,).

    positions[i] in {-1, 0, 1} is held during candle i, between marks equity[i] and equity[i + 1]. A "run"
    is a maximal stretch of candles a..b holding one equal non-zero position (a long_short flip +1 -> -1
    ends one run and starts another). Its P&L is equity[b + 1] - equity[a] and its ratio
    equity[b + 1] / equity[a]. The opening fill (at the open of candle a) and its fee fall inside that
    window; the closing fill happens at the open of candle b + 1, so the closing fee lands in the next
    candle's window (the next run's, after a flip). That approximation is accepted. A run still open at
    the end is marked to market at the last close, like the backtest.

    Keys:
    - trades_per_day: n_trades / period days, period = (ts[-1] - ts[0]) / 1 day.
    - avg_holding_candles / avg_holding_hours: mean run length (0.0 if never in a position).
    - n_round_trips: number of runs.
    - win_rate: fraction of runs with ratio > 1 (None without runs).
    - profit_factor: sum of winning runs' P&L / |sum of losing runs' P&L| in quote; None when there is no
      losing run (the ratio would be inf, or 0/0 without any run), 0.0 when there are only losing runs.
    - edge_per_trade_bps: mean over runs of 1e4 * ln(ratio) / 2 (a run is two trades, open and close);
      net of the fees booked inside the run's window. None without runs.
    - fee_per_trade_bps: commission * 1e4 (the fee of one side, in bps of the traded notional).
    - edge_over_fee: edge_per_trade_bps / fee_per_trade_bps; None if commission is 0 or without runs.
    - fees_quote: the fees paid, as given; fees_frac_of_start_equity: fees_quote / equity[0].
    """
    ts, eq = _validate_curve(equity_ts_ms, equity)
    pos = np.asarray(positions)
    if pos.ndim != 1 or pos.shape[0] != eq.shape[0] - 1:
        raise ValueError(f"positions must be 1-D with len(equity) - 1 = {eq.shape[0] - 1} rows, got {pos.shape}")
    if not np.all(np.isin(pos, (-1, 0, 1))):
        raise ValueError("positions must lie in {-1, 0, 1}")
    if n_trades < 0 or commission < 0 or fees_quote < 0:
        raise ValueError("n_trades, commission and fees_quote must be >= 0")
    pos = pos.astype(np.int64)

    period_days = (ts[-1] - ts[0]) / DAY_MS
    a, b = _position_runs(pos)
    n_runs = int(a.size)
    lengths = (b - a + 1).astype(np.float64)
    pnl = eq[b + 1] - eq[a]
    log_ratio = np.log(eq[b + 1] / eq[a])

    avg_candles = float(lengths.mean()) if n_runs else 0.0
    win_rate = float(np.mean(eq[b + 1] / eq[a] > 1.0)) if n_runs else None
    gains, losses = float(pnl[pnl > 0].sum()), float(-pnl[pnl < 0].sum())
    profit_factor = gains / losses if losses > 0 else None
    edge = float(log_ratio.mean() * 1e4 / 2) if n_runs else None
    fee_bps = commission * 1e4
    return {
        "trades_per_day": n_trades / period_days,
        "avg_holding_candles": avg_candles,
        "avg_holding_hours": avg_candles * CANDLE_MS / 3_600_000,
        "n_round_trips": n_runs,
        "win_rate": win_rate,
        "profit_factor": profit_factor,
        "edge_per_trade_bps": edge,
        "fee_per_trade_bps": fee_bps,
        "edge_over_fee": edge / fee_bps if edge is not None and fee_bps > 0 else None,
        "fees_quote": float(fees_quote),
        "fees_frac_of_start_equity": float(fees_quote) / float(eq[0]),
    }


# ----------------------------------------------------------------------------------------------------------
# Sharpe ratio and the block bootstrap
# ----------------------------------------------------------------------------------------------------------


def sharpe_ratio(returns: np.ndarray, periods_per_year: float) -> float:
    """Annualised Sharpe ratio mean / std (ddof 0) * sqrt(periods_per_year) of returns (n,); nan if undefined.

    nan with fewer than 2 values, with all values equal (std 0; checked exactly, since the floating std of
    equal values can be ~1e-18 rather than 0), or with any non-finite value. No risk-free rate.
    """
    r = np.asarray(returns, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"returns must be 1-D, got shape {r.shape}")
    if r.size < 2 or not np.all(np.isfinite(r)) or np.ptp(r) == 0:
        return math.nan
    std = float(r.std())
    if std == 0:
        return math.nan
    return float(r.mean()) / std * math.sqrt(periods_per_year)


def bootstrap_ci(
    values: np.ndarray,
    stat: Callable[[np.ndarray], float],
    *,
    n_boot: int = 2000,
    block: int = 5,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Moving-block bootstrap percentile interval (lo, hi) of stat(values) for values (n,), e.g. daily returns.

    Each resample concatenates ceil(n / block) blocks of `block` consecutive values with uniformly random
    starts in [0, n - block] and cuts the result to n values; blocks keep the short-range dependence that
    an iid bootstrap would destroy. Resamples whose stat is nan are dropped. (nan, nan) when n < 2 * block
    or every resample gives nan. For a paired comparison (policy minus buy-and-hold) pass the daily
    differences, so both legs are resampled on the same days. Deterministic in `seed`.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    if block < 1 or n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need block >= 1, n_boot >= 1, 0 < alpha < 1; got {block}, {n_boot}, {alpha}")
    n = v.size
    if n < 2 * block:
        return math.nan, math.nan
    n_blocks = -(-n // block)
    starts = np.random.default_rng(seed).integers(0, n - block + 1, size=(n_boot, n_blocks))
    index = (starts[:, :, None] + np.arange(block)).reshape(n_boot, n_blocks * block)[:, :n]
    stats = np.array([stat(row) for row in v[index]], dtype=np.float64)
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------------------
# Probabilistic and deflated Sharpe ratio (Bailey & López de Prado)
# ----------------------------------------------------------------------------------------------------------


def sample_skew_kurtosis(x: np.ndarray) -> tuple[float, float]:
    """(skewness, kurtosis) of x (n,) from population moments; kurtosis is non-excess (3 for a normal).

    nan, nan with fewer than 2 values, a non-finite value, or all values equal.
    """
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {v.shape}")
    if v.size < 2 or not np.all(np.isfinite(v)) or np.ptp(v) == 0:
        return math.nan, math.nan
    d = v - v.mean()
    m2 = float(np.mean(d**2))
    return float(np.mean(d**3)) / m2**1.5, float(np.mean(d**4)) / m2**2


def probabilistic_sharpe_ratio(sr: float, sr_benchmark: float, n_obs: int, skew: float, kurtosis: float) -> float:
    """P(true SR > sr_benchmark) = Φ((SR - SR*) sqrt(n_obs - 1) / sqrt(1 - γ3 SR + (γ4 - 1) / 4 SR²)).

    Sharpe ratios are per observation (not annualised): callers pass the daily SR of daily returns and
    n_obs = number of days. skew and kurtosis (non-excess, 3 for a normal) are those of the same returns.
    nan when an input is not finite, n_obs < 2, or the square-root argument is <= 0.
    """
    if not all(math.isfinite(float(z)) for z in (sr, sr_benchmark, skew, kurtosis)) or n_obs < 2:
        return math.nan
    var = 1.0 - skew * sr + (kurtosis - 1.0) / 4.0 * sr**2
    if not var > 0:
        return math.nan
    return _NORMAL.cdf((sr - sr_benchmark) * math.sqrt(n_obs - 1) / math.sqrt(var))


def expected_max_sharpe(sr_trials: np.ndarray | float, n_trials: int) -> float:
    """SR0 = sqrt(V) ((1 - γ) Φ⁻¹(1 - 1/N) + γ Φ⁻¹(1 - 1/(N e))): the expected best per-observation SR of N nulls.

    V is `sr_trials` itself when a float (the variance of the trials' SRs), else the variance (ddof 1) of
    the array of trial SRs (shape (k,), k >= 2). SR0 = 0 when N == 1 (nothing was selected). nan when V is
    not finite.
    """
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if isinstance(sr_trials, int | float | np.integer | np.floating):
        v = float(sr_trials)
    else:
        trials = np.asarray(sr_trials, dtype=np.float64).ravel()
        v = float(np.var(trials, ddof=1)) if trials.size >= 2 else math.nan
    if not math.isfinite(v):
        return math.nan
    if v < 0:
        raise ValueError(f"the variance of the trials' Sharpe ratios must be >= 0, got {v}")
    if n_trials == 1:
        return 0.0
    z1 = _NORMAL.inv_cdf(1.0 - 1.0 / n_trials)
    z2 = _NORMAL.inv_cdf(1.0 - 1.0 / (n_trials * math.e))
    return math.sqrt(v) * ((1.0 - EULER_GAMMA) * z1 + EULER_GAMMA * z2)


def deflated_sharpe_ratio(
    sr: float, sr_trials: np.ndarray | float, n_trials: int, n_obs: int, skew: float, kurtosis: float
) -> float:
    """Deflated Sharpe ratio = PSR(sr, SR0): the probability that the best of N trials beats luck.

    All Sharpe ratios are per observation, NOT annualised: callers pass the daily SR computed on daily
    returns, n_obs days, and the skewness and (non-excess) kurtosis of those daily returns. `sr_trials` is
    the variance of the trials' SRs (float) or the trials' SRs (k,); n_trials N must count every
    configuration x seed tried. nan when an input is not finite or the square-root argument is <= 0.
    """
    sr0 = expected_max_sharpe(sr_trials, n_trials)
    return probabilistic_sharpe_ratio(sr, sr0, n_obs, skew, kurtosis)


# ----------------------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------------------


def summarize_seeds(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """{"mean", "std", "min", "max", "n", "n_finite"} of one figure over seeds (k,), ignoring None/nan/inf.

    std is the sample std (ddof 1): None with fewer than 2 finite values. mean/min/max are None when
    nothing is finite. n counts every value given, n_finite those used.
    """
    finite = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    k = int(finite.size)
    return {
        "mean": float(finite.mean()) if k else None,
        "std": float(finite.std(ddof=1)) if k >= 2 else None,
        "min": float(finite.min()) if k else None,
        "max": float(finite.max()) if k else None,
        "n": len(values),
        "n_finite": k,
    }
