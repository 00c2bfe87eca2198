"""The backtest: shared accounting against buy-and-hold and flat, hand-checked figures, and no look-ahead.

Timeline under test (strategies/backtest.py): the period is candles i0 .. i1-1; the decision taken at the
close of candle i0-1+k (row k of the probability table) fills at the open of period candle k; equity is
marked at `from` and at every period candle's close.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from strategies.accounting import Ledger
from strategies.actions import BUY, HOLD, SELL
from strategies.backtest import (
    PERIODS_PER_YEAR,
    BacktestResult,
    TradeRecord,
    equity_metrics,
    period_rows,
    run_actions,
    run_backtest,
)
from strategies.bundle import (
    ModelBundle,
    PeriodError,
    backtest_period,
    decision_probs,
    period_probs,
    random_bundle,
)
from strategies.candles import CANDLE_MS, parse_utc_date_ms
from strategies.features import (
    Observations,
    build_observations,
    compute_features,
    default_feature_spec,
    first_valid_row,
)
from strategies.objectives import is_decision_candle
from strategies.policy import decision_uniforms, sample_action

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
COMMISSION = 0.001
SEED = 7
# A short stretch of the real data for the policy tests: enough history before FROM for the warm-up
# (first_valid_row = 1264 candles), then three days of period.
FROM = parse_utc_date_ms("2024-03-02")
TO = parse_utc_date_ms("2024-03-05")
HISTORY_ROWS = 1300


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _one_hot_table(n: int, action: int) -> np.ndarray:
    """A (n, 3 positions, 3 actions) table that always chooses `action`, whatever the position."""
    probs = np.zeros((n, 3, 3))
    probs[:, :, action] = 1.0
    return probs


def _real_period(candles: pd.DataFrame, date_from: str, date_to: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ts_ms, open and close of the real candles with open times in [date_from, date_to)."""
    ts = candles["ts_ms"].to_numpy()
    i0, i1 = period_rows(ts, parse_utc_date_ms(date_from), parse_utc_date_ms(date_to))
    return ts[i0:i1], candles["open"].to_numpy()[i0:i1], candles["close"].to_numpy()[i0:i1]


def _pipeline(candles: pd.DataFrame, from_ms: int, seed: int = SEED) -> tuple[ModelBundle, Observations]:
    """What `ritmo backtest --random-init` builds: features, a seeded policy standardised on the rows before
    `from_ms`, observations for every row."""
    features = compute_features(candles, default_feature_spec())
    i0, _ = period_rows(candles["ts_ms"].to_numpy(), from_ms, from_ms)
    bundle = random_bundle(seed, features, slice(0, i0), "long_short", COMMISSION)
    obs = build_observations(features, bundle.standardizer, bundle.macro_window, bundle.micro_window)
    return bundle, obs


def _corrupt_from(candles: pd.DataFrame, t_ms: int) -> pd.DataFrame:
    """A copy whose candles opened at or after `t_ms` are replaced by another future.

    Opens and closes get independent random factors in [0.7, 1.3] (highs and lows widened to stay
    consistent), volumes a factor in [0.05, 2]. A uniform factor (e.g. prices x3) would not do: the features
    are scale-free and buy-and-hold's curve is scale-invariant, so most of the change would be invisible;
    and x3 wipes out a 1x short, which the ledger then refuses to trade.
    """
    out = candles.copy()
    later = out["ts_ms"].to_numpy() >= t_ms
    n = int(later.sum())
    rng = np.random.default_rng(2024)
    f_open, f_close = rng.uniform(0.7, 1.3, n), rng.uniform(0.7, 1.3, n)
    o = out.loc[later, "open"].to_numpy() * f_open
    c = out.loc[later, "close"].to_numpy() * f_close
    h = np.maximum(out.loc[later, "high"].to_numpy() * np.maximum(f_open, f_close), np.maximum(o, c))
    lo = np.minimum(out.loc[later, "low"].to_numpy() * np.minimum(f_open, f_close), np.minimum(o, c))
    out.loc[later, ["open", "high", "low", "close"]] = np.column_stack([o, h, lo, c])
    out.loc[later, "volume"] = out.loc[later, "volume"].to_numpy() * rng.uniform(0.05, 2.0, n)
    return out


@pytest.fixture(scope="module")
def window(candles_2024: pd.DataFrame) -> pd.DataFrame:
    """Real candles from HISTORY_ROWS before FROM to one day after TO (index reset)."""
    ts = candles_2024["ts_ms"].to_numpy()
    i_from, i_to = period_rows(ts, FROM, TO)
    return candles_2024.iloc[i_from - HISTORY_ROWS : i_to + 288].reset_index(drop=True)


@pytest.fixture(scope="module")
def policy(window: pd.DataFrame) -> tuple[ModelBundle, Observations]:
    """The seeded random-init policy and its observations on `window`."""
    return _pipeline(window, FROM)


# --------------------------------------------------------------------------------------------------
# constant tables: buy-and-hold and flat through the same accounting
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["long_short", "long_only"])
@pytest.mark.parametrize("slippage_bps", [0.0, 5.0])
def test_always_buy_is_buy_and_hold_exactly(candles_2024: pd.DataFrame, mode: str, slippage_bps: float) -> None:
    ts, opens, closes = _real_period(candles_2024, "2024-11-01", "2024-12-01")
    res = run_backtest(
        _one_hot_table(len(ts), BUY), ts, opens, closes, mode=mode, commission=COMMISSION, slippage_bps=slippage_bps
    )
    assert np.array_equal(res.policy_equity, res.hold_equity)
    assert asdict(res.policy) == asdict(res.buy_and_hold)
    assert res.policy.n_trades == 1 and len(res.trades) == 1
    trade = res.trades[0]
    assert (trade.ts_ms, trade.side, trade.position_after) == (int(ts[0]), "buy", 1)
    assert trade.price == opens[0] * (1 + slippage_bps / 1e4)
    assert np.all(res.positions == 1.0) and res.policy.share_long == 1.0
    assert np.all(res.actions == BUY)


@pytest.mark.parametrize(
    ("mode", "action"),
    [("long_short", HOLD), ("long_only", HOLD), ("long_only", SELL)],
    ids=["hold", "hold-lo", "sell-lo"],
)
def test_never_in_the_market_is_flat(candles_2024: pd.DataFrame, mode: str, action: int) -> None:
    ts, opens, closes = _real_period(candles_2024, "2024-11-01", "2024-12-01")
    res = run_backtest(_one_hot_table(len(ts), action), ts, opens, closes, mode=mode, commission=COMMISSION, seed=3)
    assert np.all(res.policy_equity == 10_000.0)
    assert np.array_equal(res.policy_equity, res.flat_equity)
    assert res.trades == [] and res.policy.n_trades == 0
    assert res.policy.fees_quote == 0.0 and res.policy.turnover == 0.0
    assert (res.policy.share_flat, res.policy.share_long, res.policy.share_short) == (1.0, 0.0, 0.0)
    assert math.isnan(res.policy.sharpe) and math.isnan(res.policy.sortino)
    assert res.policy.to_dict() == res.flat.to_dict()


# --------------------------------------------------------------------------------------------------
# a tiny case computed by hand
# --------------------------------------------------------------------------------------------------


def _tiny_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Four candles and a table whose chosen action depends on the position (so the right row must be read).

    Intended path: HOLD (flat) -> BUY at 100 -> SELL at 125 to -1 -> SELL again (already -1: no trade).
    """
    ts = T0 + CANDLE_MS * np.arange(4, dtype=np.int64)
    opens = np.array([100.0, 100.0, 125.0, 121.0])
    closes = np.array([102.0, 110.0, 120.0, 126.0])
    probs = np.zeros((4, 3, 3))
    # position axis: index 0 short, 1 flat, 2 long. One action per (row, position).
    choice = {0: (SELL, HOLD, SELL), 1: (HOLD, BUY, HOLD), 2: (BUY, BUY, SELL), 3: (SELL, HOLD, BUY)}
    for k, per_position in choice.items():
        for p, a in enumerate(per_position):
            probs[k, p, a] = 1.0
    return probs, ts, opens, closes


@pytest.mark.parametrize(("greedy", "seed"), [(True, 0), (False, 0), (False, 12345)])
def test_tiny_case_by_hand(greedy: bool, seed: int) -> None:
    probs, ts, opens, closes = _tiny_case()
    res = run_backtest(probs, ts, opens, closes, mode="long_short", commission=COMMISSION, greedy=greedy, seed=seed)
    # k=0 HOLD: flat, equity 10000 at the close of 102.
    # k=1 BUY at 100: q = 10000/100 = 100, fee = 0.001*100*100 = 10, cash = 10000 - 10000 - 10 = -10;
    #     close 110: E = -10 + 100*110 = 10990.
    # k=2 SELL at 125 to -1: E = -10 + 100*125 = 12490, q' = -12490/125 = -99.92, |dq| = 199.92,
    #     fee = 0.001*199.92*125 = 24.99, cash = -10 + 199.92*125 - 24.99 = 24955.01;
    #     close 120: E = 24955.01 - 99.92*120 = 12964.61.
    # k=3 SELL while short: target -1 = position, nothing trades; close 126: E = 24955.01 - 99.92*126 = 12365.09.
    expected_equity = [10_000.0, 10_000.0, 10_990.0, 12_964.61, 12_365.09]
    assert res.policy_equity == pytest.approx(expected_equity, rel=1e-12)
    assert res.actions.tolist() == [HOLD, BUY, SELL, SELL]
    assert res.positions.tolist() == [0.0, 1.0, -1.0, -1.0]
    assert res.equity_ts_ms.tolist() == [T0 + CANDLE_MS * k for k in range(5)]
    assert len(res.trades) == 2
    buy, sell = res.trades
    assert (buy.ts_ms, buy.side, buy.price, buy.position_after) == (T0 + CANDLE_MS, "buy", 100.0, 1)
    assert buy.qty_base == pytest.approx(100.0, rel=1e-12) and buy.fee_quote == pytest.approx(10.0, rel=1e-12)
    assert (sell.ts_ms, sell.side, sell.price, sell.position_after) == (T0 + 2 * CANDLE_MS, "sell", 125.0, -1)
    assert sell.qty_base == pytest.approx(199.92, rel=1e-12) and sell.fee_quote == pytest.approx(24.99, rel=1e-12)

    m = res.policy
    assert m.n_trades == 2
    assert m.fees_quote == pytest.approx(34.99, rel=1e-12)
    assert m.turnover == pytest.approx((10_000 + 24_990) / 10_000, rel=1e-12)
    assert m.total_return == pytest.approx(0.236509, rel=1e-12)
    assert m.final_equity == pytest.approx(12_365.09, rel=1e-12)
    assert (m.share_long, m.share_short, m.share_flat) == (0.25, 0.5, 0.25)
    # the only drawdown: from the peak 12964.61 to 12365.09
    expected_dd = Fraction("599.52") / Fraction("12964.61")
    assert m.max_drawdown == pytest.approx(float(expected_dd), rel=1e-12)

    # buy-and-hold buys 100 at the first open (cash -10) and marks at every close.
    assert res.hold_equity == pytest.approx([10_000.0, 10_190.0, 10_990.0, 11_990.0, 12_590.0], rel=1e-12)
    assert (res.buy_and_hold.n_trades, res.buy_and_hold.share_long) == (1, 1.0)
    assert res.buy_and_hold.fees_quote == pytest.approx(10.0, rel=1e-12)
    assert res.buy_and_hold.max_drawdown == 0.0
    assert np.all(res.flat_equity == 10_000.0)


def test_tiny_case_slippage_moves_fills_against_us() -> None:
    probs, ts, opens, closes = _tiny_case()
    res = run_backtest(probs, ts, opens, closes, mode="long_short", commission=COMMISSION, slippage_bps=10.0)
    buy, sell = res.trades
    assert buy.price == pytest.approx(100.0 * 1.001, rel=1e-15)
    assert sell.price == pytest.approx(125.0 * 0.999, rel=1e-15)
    # buy: q = 10000/100.1, fee = 0.001 * 10000 = 10, cash = -10
    assert buy.qty_base == pytest.approx(10_000 / 100.1, rel=1e-12)
    assert res.policy_equity[2] == pytest.approx(-10 + 10_000 / 100.1 * 110, rel=1e-12)


def test_run_backtest_rejects_bad_shapes() -> None:
    probs, ts, opens, closes = _tiny_case()
    with pytest.raises(ValueError, match="same length"):
        run_backtest(probs[:3], ts, opens, closes, mode="long_short", commission=COMMISSION)
    with pytest.raises(ValueError, match="no candles"):
        run_backtest(probs[:0], ts[:0], opens[:0], closes[:0], mode="long_short", commission=COMMISSION)


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def test_metrics_by_hand() -> None:
    equity = np.array([100.0, 101.0, 99.0, 102.0, 102.0])
    positions = np.array([1.0, -1.0, 0.0, 1.0])
    m = equity_metrics(equity, positions, n_trades=3, turnover_quote=250.0, fees_quote=0.25)
    r = [math.log(101 / 100), math.log(99 / 101), math.log(102 / 99), 0.0]
    mean = sum(r) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 4)  # population std (ddof = 0)
    downside = math.sqrt(sum(min(x, 0.0) ** 2 for x in r) / 4)  # root mean square of the losses, over all steps
    assert PERIODS_PER_YEAR == 365 * 288
    assert m.sharpe == pytest.approx(mean / std * math.sqrt(365 * 288), rel=1e-12)
    assert m.sortino == pytest.approx(mean / downside * math.sqrt(365 * 288), rel=1e-12)
    assert m.max_drawdown == pytest.approx(2 / 101, rel=1e-12)
    assert m.total_return == pytest.approx(0.02, rel=1e-12) and m.final_equity == 102.0
    assert (m.n_trades, m.turnover, m.fees_quote) == (3, 2.5, 0.25)
    assert (m.share_long, m.share_short, m.share_flat) == (0.5, 0.25, 0.25)


def test_max_drawdown_takes_the_deepest_fall_from_a_running_peak() -> None:
    equity = np.array([100.0, 120.0, 90.0, 130.0, 65.0, 140.0])
    m = equity_metrics(equity, np.ones(5), 0, 0.0, 0.0)
    assert m.max_drawdown == pytest.approx(0.5, rel=1e-12)  # 130 -> 65, deeper than 120 -> 90 (25%)
    rising = equity_metrics(np.array([1.0, 2.0, 3.0]), np.ones(2), 0, 0.0, 0.0)
    assert rising.max_drawdown == 0.0
    assert not math.isfinite(rising.sortino)  # no losing step: no downside deviation to divide by


def test_flat_metrics_are_json_null() -> None:
    m = equity_metrics(np.full(10, 5_000.0), np.zeros(9), 0, 0.0, 0.0)
    assert math.isnan(m.sharpe) and math.isnan(m.sortino)
    d = m.to_dict()
    assert d["sharpe"] is None and d["sortino"] is None
    assert d["total_return"] == 0.0 and d["max_drawdown"] == 0.0 and d["share_flat"] == 1.0
    text = json.dumps(d, allow_nan=False)  # strict JSON: no NaN token
    assert json.loads(text)["sharpe"] is None


# --------------------------------------------------------------------------------------------------
# the real policy path: no look-ahead, reproducibility, greedy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
@pytest.mark.parametrize("t_offset", [0, 437], ids=["T=from", "T=inside"])
def test_no_look_ahead(window: pd.DataFrame, greedy: bool, t_offset: int) -> None:
    """Changing every candle opened at or after T changes nothing decided or marked before T."""
    ts = window["ts_ms"].to_numpy()
    i0, i1 = period_rows(ts, FROM, TO)
    j_t = i0 + t_offset  # first corrupted candle
    t_ms = int(ts[j_t])
    k_t = j_t - i0  # rows 0..k_t are the decisions at the closes of candles i0-1 .. j_t-1, all before T

    bundle, obs = _pipeline(window, FROM)
    bad_candles = _corrupt_from(window, t_ms)
    bad_bundle, bad_obs = _pipeline(bad_candles, FROM)
    assert bad_bundle.version() == bundle.version()
    assert bad_bundle.standardizer == bundle.standardizer

    # the network's inputs and outputs for decisions before T are bit-identical
    assert np.array_equal(obs.macro[:j_t], bad_obs.macro[:j_t]) and np.array_equal(obs.micro[:j_t], bad_obs.micro[:j_t])
    probs, bad_probs = period_probs(bundle, obs, i0, i1), period_probs(bad_bundle, bad_obs, i0, i1)
    assert np.array_equal(probs[: k_t + 1], bad_probs[: k_t + 1])
    assert not np.allclose(probs[k_t + 1 :], bad_probs[k_t + 1 :]), "the corruption must reach the network"

    good = backtest_period(bundle, window, obs, FROM, TO, greedy=greedy, seed=SEED)
    bad = backtest_period(bad_bundle, bad_candles, bad_obs, FROM, TO, greedy=greedy, seed=SEED)
    assert np.array_equal(good.actions[: k_t + 1], bad.actions[: k_t + 1])
    assert np.array_equal(good.positions[: k_t + 1], bad.positions[: k_t + 1])
    assert [t for t in good.trades if t.ts_ms < t_ms] == [t for t in bad.trades if t.ts_ms < t_ms]
    # equity point m is the mark at the close of candle i0-1+m: candles before T for m <= k_t
    for name in ("policy_equity", "hold_equity", "flat_equity"):
        assert np.array_equal(getattr(good, name)[: k_t + 1], getattr(bad, name)[: k_t + 1]), name
    assert good.hold_equity[k_t + 1] != bad.hold_equity[k_t + 1], "the first mark after T uses a changed close"
    assert not np.array_equal(good.policy_equity, bad.policy_equity)
    assert np.array_equal(good.equity_ts_ms, bad.equity_ts_ms)


def test_policy_trades_and_books_consistently(window: pd.DataFrame, policy: tuple[ModelBundle, Observations]) -> None:
    """The random policy really trades, and its trades replay to its equity, fees and turnover."""
    bundle, obs = policy
    res = backtest_period(bundle, window, obs, FROM, TO, greedy=False, seed=SEED, slippage_bps=2.0)
    m = res.policy
    assert m.n_trades == len(res.trades) > 20
    ts = window["ts_ms"].to_numpy()
    i0, i1 = period_rows(ts, FROM, TO)
    opens, closes = window["open"].to_numpy(), window["close"].to_numpy()
    row_of = {int(t): i for i, t in enumerate(ts)}
    cash, qty = 10_000.0, 0.0
    for t in res.trades:
        i = row_of[t.ts_ms]
        sign = 1.0 if t.side == "buy" else -1.0
        assert t.price == pytest.approx(opens[i] * (1 + sign * 2.0 / 1e4), rel=1e-14)
        assert t.fee_quote == pytest.approx(COMMISSION * t.qty_base * t.price, rel=1e-12)
        assert res.positions[i - i0] == t.position_after
        cash -= sign * t.qty_base * t.price + t.fee_quote
        qty += sign * t.qty_base
    assert cash + qty * closes[i1 - 1] == pytest.approx(res.policy_equity[-1], rel=1e-9)
    assert m.fees_quote == pytest.approx(sum(t.fee_quote for t in res.trades), rel=1e-12)
    assert m.turnover == pytest.approx(sum(t.qty_base * t.price for t in res.trades) / 10_000, rel=1e-12)
    changes = np.count_nonzero(np.diff(np.concatenate([[0.0], res.positions])))
    assert changes == m.n_trades
    assert m.share_long + m.share_short + m.share_flat == pytest.approx(1.0, abs=1e-12)
    assert res.equity_ts_ms[0] == FROM and res.equity_ts_ms[-1] == TO


def test_sampling_is_reproducible_and_keyed_by_candle_time(
    window: pd.DataFrame, policy: tuple[ModelBundle, Observations]
) -> None:
    bundle, obs = policy
    ts = window["ts_ms"].to_numpy()
    i0, i1 = period_rows(ts, FROM, TO)
    a = backtest_period(bundle, window, obs, FROM, TO, greedy=False, seed=SEED)
    b = backtest_period(bundle, window, obs, FROM, TO, greedy=False, seed=SEED)
    assert a.trades == b.trades and np.array_equal(a.actions, b.actions)
    assert np.array_equal(a.policy_equity, b.policy_equity)
    other = backtest_period(bundle, window, obs, FROM, TO, greedy=False, seed=SEED + 1)
    assert not np.array_equal(a.actions, other.actions), "another seed must give other samples"

    # each action is the inverse-CDF sample of the row for the position held before it, with u from (seed, time)
    probs = period_probs(bundle, obs, i0, i1)
    u = decision_uniforms(SEED, ts[i0:i1] - CANDLE_MS)
    before = np.concatenate([[0.0], a.positions[:-1]]).astype(int)
    expected = [sample_action(probs[k, before[k] + 1], u[k]) for k in range(i1 - i0)]
    assert a.actions.tolist() == expected


def test_a_later_start_sees_the_same_probabilities(
    window: pd.DataFrame, policy: tuple[ModelBundle, Observations]
) -> None:
    """A decision depends on (seed, candle time) and the position only, not on where the backtest started."""
    bundle, obs = policy
    ts = window["ts_ms"].to_numpy()
    i0, i1 = period_rows(ts, FROM, TO)
    offset = 301
    later = int(ts[i0 + offset])
    full_probs = period_probs(bundle, obs, i0, i1)
    late_probs = period_probs(bundle, obs, i0 + offset, i1)
    np.testing.assert_allclose(late_probs, full_probs[offset:], rtol=0, atol=1e-7)
    assert np.array_equal(decision_uniforms(SEED, ts[i0 + offset : i1]), decision_uniforms(SEED, ts[i0:i1])[offset:])

    full = backtest_period(bundle, window, obs, FROM, TO, greedy=False, seed=SEED)
    late = backtest_period(bundle, window, obs, later, TO, greedy=False, seed=SEED)
    # once both runs hold the same position before a decision, they take the same actions from then on
    held_full = np.concatenate([[0.0], full.positions[:-1]])[offset:]
    held_late = np.concatenate([[0.0], late.positions[:-1]])
    meet = int(np.argmax(held_full == held_late))
    assert held_full[meet] == held_late[meet] and meet < 50
    assert np.array_equal(full.actions[offset + meet :], late.actions[meet:])
    assert np.array_equal(full.positions[offset + meet :], late.positions[meet:])


def test_greedy_is_deterministic_and_ignores_the_seed(
    window: pd.DataFrame, policy: tuple[ModelBundle, Observations]
) -> None:
    bundle, obs = policy
    ts = window["ts_ms"].to_numpy()
    i0, i1 = period_rows(ts, FROM, TO)
    runs = [backtest_period(bundle, window, obs, FROM, TO, greedy=True, seed=s) for s in (0, 1, 987_654)]
    for r in runs[1:]:
        assert np.array_equal(r.actions, runs[0].actions) and r.trades == runs[0].trades
        assert np.array_equal(r.policy_equity, runs[0].policy_equity)
    probs = period_probs(bundle, obs, i0, i1)
    before = np.concatenate([[0.0], runs[0].positions[:-1]]).astype(int)
    assert runs[0].actions.tolist() == [int(np.argmax(probs[k, before[k] + 1])) for k in range(i1 - i0)]


# --------------------------------------------------------------------------------------------------
# periods and their errors
# --------------------------------------------------------------------------------------------------

_TS10 = T0 + CANDLE_MS * np.arange(10, dtype=np.int64)
_MIN = 60_000


@pytest.mark.parametrize(
    ("from_ms", "to_ms", "expected"),
    [
        (T0, T0 + 10 * CANDLE_MS, (0, 10)),
        (T0 - 10 * CANDLE_MS, T0 + 99 * CANDLE_MS, (0, 10)),  # bounds beyond the data are clipped
        (T0 + 3 * CANDLE_MS, T0 + 3 * CANDLE_MS, (3, 3)),  # empty
        (T0 + 2 * _MIN, T0 + 22 * _MIN, (1, 5)),  # a candle counts by its open time: [T0+5m, T0+20m]
        (T0 + 5 * _MIN, T0 + 20 * _MIN, (1, 4)),  # `to` is exclusive
        (T0 + 50 * _MIN, T0 + 100 * _MIN, (10, 10)),  # after the data
        (T0 - 100 * _MIN, T0, (0, 0)),  # before the data
        (T0 + 30 * _MIN, T0 + 10 * _MIN, (6, 2)),  # reversed: i1 < i0, callers must refuse it
    ],
)
def test_period_rows(from_ms: int, to_ms: int, expected: tuple[int, int]) -> None:
    assert period_rows(_TS10, from_ms, to_ms) == expected


def test_observations_start_at_first_valid_row(policy: tuple[ModelBundle, Observations]) -> None:
    _, obs = policy
    assert int(np.argmax(obs.valid)) == first_valid_row() and obs.valid[first_valid_row() :].all()


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("after_end", "no candles"),
        ("empty", "no candles"),
        ("reversed", "no candles"),
        ("first_row", "warm-up"),
        ("one_short", "warm-up"),
    ],
)
def test_backtest_period_errors(
    window: pd.DataFrame, policy: tuple[ModelBundle, Observations], where: str, match: str
) -> None:
    bundle, obs = policy
    ts = window["ts_ms"].to_numpy()
    first_ok = first_valid_row() + 1  # the first decision is taken at the close of the first valid row
    bounds = {
        "after_end": (int(ts[-1]) + CANDLE_MS, int(ts[-1]) + 100 * CANDLE_MS),
        "empty": (FROM, FROM),
        "reversed": (TO, FROM),
        "first_row": (int(ts[0]), int(ts[100])),
        "one_short": (int(ts[first_ok - 1]), int(ts[first_ok + 100])),
    }
    with pytest.raises(PeriodError, match=match):
        backtest_period(bundle, window, obs, *bounds[where], greedy=True, seed=0)


def test_backtest_period_first_possible_start(window: pd.DataFrame, policy: tuple[ModelBundle, Observations]) -> None:
    bundle, obs = policy
    ts = window["ts_ms"].to_numpy()
    first_ok = first_valid_row() + 1
    res = backtest_period(bundle, window, obs, int(ts[first_ok]), int(ts[first_ok + 10]), greedy=True, seed=0)
    assert isinstance(res, BacktestResult) and len(res.positions) == 10
    assert all(isinstance(t, TradeRecord) for t in res.trades)


# --------------------------------------------------------------------------------------------------
# the fast paths against the plain per-candle computation
# --------------------------------------------------------------------------------------------------


def _run_actions_candle_by_candle(
    actions: np.ndarray, ts: np.ndarray, opens: np.ndarray, closes: np.ndarray, mode: str, slippage_bps: float
) -> tuple[list[TradeRecord], np.ndarray, np.ndarray, np.ndarray]:
    """The ledger called at every candle, as run_actions did before it skipped the candles that cannot trade."""
    ledger = Ledger(cash_quote=10_000.0)
    trades, positions, taken, equity = [], [], [], [10_000.0]
    for k in range(len(ts)):
        action = int(actions[k, ledger.position + 1])
        taken.append(action)
        fill = ledger.apply_action(action, opens[k], COMMISSION, slippage_bps, mode)
        if fill is not None:
            trades.append(
                TradeRecord(int(ts[k]), fill.side, fill.qty_base, fill.price, fill.fee_quote, fill.position_after)
            )
        positions.append(float(ledger.position))
        equity.append(ledger.equity(closes[k]))
    return trades, np.asarray(positions), np.asarray(taken), np.asarray(equity)


@pytest.mark.parametrize("mode", ["long_short", "long_only"])
@pytest.mark.parametrize("hold_share", [0.0, 0.98], ids=["busy", "mostly-hold"])
def test_run_actions_equals_the_ledger_at_every_candle(
    candles_2024: pd.DataFrame, mode: str, hold_share: float
) -> None:
    """Bit-identical trades, positions, actions and equity to calling the ledger at each of 20,000 candles."""
    ts, opens, closes = _real_period(candles_2024, "2024-05-01", "2024-07-10")
    rng = np.random.default_rng(11)
    actions = rng.integers(0, 3, size=(len(ts), 3))
    actions[rng.random(len(ts)) < hold_share] = HOLD
    res = run_actions(actions, ts, opens, closes, mode=mode, commission=COMMISSION, slippage_bps=3.0)
    trades, positions, taken, equity = _run_actions_candle_by_candle(actions, ts, opens, closes, mode, 3.0)
    assert len(trades) > 100 and res.trades == trades
    assert np.array_equal(res.positions, positions) and np.array_equal(res.actions, taken)
    assert np.array_equal(res.policy_equity, equity)


def test_run_actions_raises_the_ledgers_errors() -> None:
    ts = T0 + CANDLE_MS * np.arange(6, dtype=np.int64)
    opens, closes = np.full(6, 100.0), np.full(6, 101.0)
    hold = np.zeros(6, dtype=np.int64)
    with pytest.raises(ValueError, match="unknown position mode"):
        run_actions(hold, ts, opens, closes, mode="sideways", commission=COMMISSION)
    with pytest.raises(ValueError, match="commission"):
        run_actions(hold, ts, opens, closes, mode="long_short", commission=1.5)
    bad_close = closes.copy()
    bad_close[4] = 0.0
    with pytest.raises(ValueError, match="price must be positive"):
        run_actions(hold, ts, opens, bad_close, mode="long_short", commission=COMMISSION)
    bad_open = opens.copy()
    bad_open[3] = -1.0
    with pytest.raises(ValueError, match="reference price must be positive"):
        run_actions(hold, ts, bad_open, closes, mode="long_short", commission=COMMISSION)
    with pytest.raises(ValueError, match="unknown action"):
        run_actions(np.array([0, 1, 0, 7, 0, 0]), ts, opens, closes, mode="long_short", commission=COMMISSION)


def test_decision_probs_run_the_network_only_at_decision_candles(
    window: pd.DataFrame, policy: tuple[ModelBundle, Observations]
) -> None:
    """With K = 12 the decision rows equal period_probs' rows; the others are HOLD with certainty."""
    bundle, obs = policy
    ts = window["ts_ms"].to_numpy()
    i0, i1 = period_rows(ts, FROM, TO)
    k12 = dataclasses.replace(bundle, decide_every=12)
    full, fast = period_probs(k12, obs, i0, i1), decision_probs(k12, obs, ts, i0, i1)
    decides = np.asarray(is_decision_candle(ts[i0:i1] - CANDLE_MS, 12))
    assert 0 < decides.sum() < len(decides)
    np.testing.assert_allclose(fast[decides], full[decides], rtol=0, atol=1e-7)
    assert (fast[~decides, :, HOLD] == 1.0).all() and (fast[~decides].sum(axis=2) == 1.0).all()
    for greedy in (False, True):
        via_table = run_backtest(
            full, ts[i0:i1], window["open"].to_numpy()[i0:i1], window["close"].to_numpy()[i0:i1],
            mode="long_short", commission=COMMISSION, greedy=greedy, seed=SEED, decide_every=12,
        )  # fmt: skip
        res = backtest_period(k12, window, obs, FROM, TO, greedy=greedy, seed=SEED)
        assert res.trades == via_table.trades and np.array_equal(res.actions, via_table.actions)
