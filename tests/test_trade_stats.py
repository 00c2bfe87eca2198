"""Round trips, realised P&L and the backtest's trade statistics (strategies/trade_stats.py).

Hand-made fill sequences (long_only, long_short, flips, partial fills, dust, an open lot at the end), then two
real backtests of the 2024 data checked against an independent computation from the positions and the
equity curve alone.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from bot.commands.backtest import format_report, result_to_dict, strategy_stats
from strategies.actions import BUY, HOLD, SELL
from strategies.backtest import PERIODS_PER_YEAR, period_rows, run_actions
from strategies.bundle import backtest_period, random_bundle
from strategies.candles import CANDLE_MS, parse_utc_date_ms
from strategies.features import build_observations, compute_features, default_feature_spec
from strategies.trade_stats import cagr, match_fills, match_trade_records, trade_stats

H = 3_600_000  # one hour in ms


def fills(*rows: tuple[int, str, float, float, float, int, int]):
    """match_fills over rows (hour, side, qty, price, fee, position_before, position_after)."""
    cols = list(zip(*rows, strict=True))
    return match_fills([h * H for h in cols[0]], *cols[1:])


# --------------------------------------------------------------------------------------------------
# hand-made sequences
# --------------------------------------------------------------------------------------------------


def test_long_only_round_trip_is_net_of_both_fees() -> None:
    m = fills((0, "buy", 2.0, 100.0, 0.2, 0, 1), (5, "sell", 2.0, 110.0, 0.22, 1, 0))
    assert m.fills[0].realised_pnl_quote is None and m.fills[0].entry_price == 100.0
    assert m.fills[1].realised_pnl_quote == pytest.approx(2 * 10.0 - 0.2 - 0.22)
    assert m.fills[1].closed_entry_price == 100.0 and m.fills[1].entry_price is None
    (trip,) = m.trips
    assert (trip.direction, trip.entry_price, trip.qty_base, trip.holding_hours) == (1, 100.0, 2.0, 5.0)
    assert trip.pnl_quote == pytest.approx(19.58) and trip.fees_quote == pytest.approx(0.42)
    assert m.open_lot is None


def test_partial_fills_average_the_entry_and_a_reduction_keeps_the_trip_open() -> None:
    m = fills(
        (0, "buy", 1.0, 100.0, 0.1, 0, 1),
        (0, "buy", 1.0, 102.0, 0.102, 1, 1),  # a second fill of the same order
        (2, "sell", 0.5, 110.0, 0.055, 1, 1),  # reduces: the position state stays long
        (3, "sell", 1.5, 90.0, 0.135, 1, 0),
    )
    assert m.fills[1].entry_price == pytest.approx(101.0)
    entry_fees = 0.1 + 0.102
    first = 0.5 * (110.0 - 101.0) - 0.055 - entry_fees * 0.5 / 2.0
    second = 1.5 * (90.0 - 101.0) - 0.135 - entry_fees * 1.5 / 2.0
    assert m.fills[2].realised_pnl_quote == pytest.approx(first)
    assert m.fills[2].entry_price == pytest.approx(101.0)  # a reduction leaves the average cost alone
    assert m.fills[3].realised_pnl_quote == pytest.approx(second)
    (trip,) = m.trips
    assert trip.pnl_quote == pytest.approx(first + second) and trip.qty_base == 2.0 and trip.holding_hours == 3.0
    assert trip.fees_quote == pytest.approx(entry_fees + 0.055 + 0.135)


def test_a_flip_closes_one_trip_and_opens_the_next_at_the_same_fill() -> None:
    m = fills(
        (0, "buy", 1.0, 100.0, 0.1, 0, 1),
        (1, "sell", 3.0, 110.0, 0.33, 1, -1),  # closes 1 long, opens 2 short
        (4, "buy", 2.0, 105.0, 0.21, -1, 0),
    )
    long_pnl = 1.0 * (110.0 - 100.0) - 0.33 / 3 - 0.1
    short_pnl = -1 * (105.0 - 110.0) * 2.0 - 0.21 - 0.33 * 2 / 3
    assert m.fills[1].realised_pnl_quote == pytest.approx(long_pnl)
    assert m.fills[1].closed_entry_price == 100.0 and m.fills[1].entry_price == 110.0
    assert m.fills[2].realised_pnl_quote == pytest.approx(short_pnl)
    assert [(t.direction, t.entry_price, t.qty_base, t.holding_hours) for t in m.trips] == [
        (1, 100.0, 1.0, 1.0),
        (-1, 110.0, 2.0, 3.0),
    ]
    assert [t.pnl_quote for t in m.trips] == pytest.approx([long_pnl, short_pnl])
    # every fee is counted exactly once over the trips
    assert sum(t.fees_quote for t in m.trips) == pytest.approx(0.1 + 0.33 + 0.21)


def test_an_open_lot_at_the_end_is_not_a_round_trip() -> None:
    m = fills(
        (0, "sell", 1.0, 100.0, 0.1, 0, -1),
        (1, "buy", 2.0, 90.0, 0.18, -1, 1),  # short closed at a profit, long opened
    )
    assert len(m.trips) == 1 and m.trips[0].pnl_quote == pytest.approx(10.0 - 0.09 - 0.1)
    lot = m.open_lot
    assert lot is not None and (lot.direction, lot.entry_ts_ms, lot.entry_price, lot.qty_base) == (1, H, 90.0, 1.0)
    assert lot.entry_fees_quote == pytest.approx(0.09)
    assert lot.unrealised_pnl_quote(95.0) == pytest.approx(5.0 - 0.09)  # no exit fee deducted


def test_dust_left_after_a_close_belongs_to_no_lot() -> None:
    m = fills(
        (0, "buy", 1.00004, 100.0, 0.100004, 0, 1),
        (1, "sell", 1.0, 110.0, 0.11, 1, 0),  # floored to the amount step: 0.00004 left, the state is flat
        (2, "sell", 0.00004, 111.0, 0.0000044, 0, 0),  # the dust sold later: no lot, no P&L
    )
    assert m.fills[1].realised_pnl_quote == pytest.approx(1.0 * 10.0 - 0.11 - 0.100004)  # all entry fees
    assert m.fills[2].realised_pnl_quote is None and m.fills[2].entry_price is None
    assert len(m.trips) == 1 and m.open_lot is None


def test_a_position_changed_outside_the_fills_ends_the_lot_without_a_round_trip() -> None:
    m = fills(
        (0, "buy", 1.0, 100.0, 0.1, 0, 1),
        (3, "buy", 1.0, 120.0, 0.12, 0, 1),  # the ledger was set flat by a balance check in between
    )
    assert m.trips == [] and m.open_lot is not None
    assert (m.open_lot.entry_price, m.open_lot.qty_base, m.open_lot.entry_ts_ms) == (120.0, 1.0, 3 * H)


def test_bad_fills_are_refused() -> None:
    with pytest.raises(ValueError, match="side"):
        fills((0, "hold", 1.0, 100.0, 0.1, 0, 1))
    with pytest.raises(ValueError, match="same length"):
        match_fills([0], ["buy"], [1.0], [100.0], [0.1], [0], [])


def test_trade_stats_by_hand() -> None:
    # one win (+19.58), one loss, then an open lot; 8 candles, 5 of them in the market
    m = fills(
        (0, "buy", 2.0, 100.0, 0.2, 0, 1),
        (1, "sell", 2.0, 110.0, 0.22, 1, 0),
        (2, "buy", 1.0, 100.0, 0.1, 0, 1),
        (4, "sell", 1.0, 95.0, 0.095, 1, 0),
        (5, "buy", 1.0, 100.0, 0.1, 0, 1),
    )
    positions = np.array([1, 0, 1, 1, 0, 1, 0, 0])
    ts = np.arange(9) * 365 * 24 * H // 8  # the 8 candles span exactly one 365-day year
    equity = np.linspace(100.0, 121.0, 9)
    s = trade_stats(m, positions, equity, ts)
    loss = 1.0 * (95.0 - 100.0) - 0.1 - 0.095
    assert (s.round_trips, s.wins, s.win_rate) == (2, 1, 0.5)
    assert s.gross_profit_quote == pytest.approx(19.58) and s.gross_loss_quote == pytest.approx(-loss)
    assert s.profit_factor == pytest.approx(19.58 / -loss)
    assert s.avg_holding_hours == pytest.approx((1 + 2) / 2)
    assert s.exposure == 4 / 8
    assert s.years == pytest.approx(1.0) and s.cagr == pytest.approx(0.21)
    assert s.open_at_end


def test_profit_factor_without_losses_is_inf_and_without_trips_nan() -> None:
    ts, positions, equity = np.array([0, CANDLE_MS]), np.zeros(1), np.array([100.0, 100.0])
    win = fills((0, "buy", 1.0, 100.0, 0.0, 0, 1), (1, "sell", 1.0, 101.0, 0.0, 1, 0))
    s = trade_stats(win, positions, equity, ts)
    assert s.profit_factor == math.inf and s.to_dict()["profit_factor"] is None
    none = trade_stats(match_fills([], [], [], [], [], [], []), positions, equity, ts)
    assert math.isnan(none.profit_factor) and math.isnan(none.win_rate) and math.isnan(none.avg_holding_hours)
    assert none.gross_loss_quote == 0.0 and str(none.gross_loss_quote) == "0.0"  # not -0.0
    assert json.loads(json.dumps(none.to_dict()))["win_rate"] is None


@pytest.mark.parametrize(
    ("start", "end", "years", "expected"),
    [
        (100.0, 121.0, 2.0, 0.10),
        (100.0, 101.0, 0.5, 1.01**2 - 1),  # half a year compounded to a whole one
        (100.0, 90.0, 1.0, -0.10),
        (100.0, 0.0, 1.0, -1.0),  # wiped out
        (100.0, 110.0, 0.0, math.nan),  # no length
        (100.0, 1e9, 1e-4, math.inf),  # too large to represent
    ],
)
def test_cagr(start: float, end: float, years: float, expected: float) -> None:
    got = cagr(start, end, years)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-12)


def test_backtest_report_shows_the_new_figures() -> None:
    """A rising market, one buy and one sell in long_only: one winning round trip, profit factor inf."""
    n = 6
    ts = parse_utc_date_ms("2024-01-01") + np.arange(n) * CANDLE_MS
    opens = np.array([100.0, 101.0, 102.0, 103.0, 104.0, 105.0])
    closes = opens + 0.5
    res = run_actions(
        np.array([BUY, HOLD, SELL, HOLD, HOLD, HOLD]), ts, opens, closes, mode="long_only", commission=0.001
    )
    info = {
        "from": "a",
        "to": "b",
        "candles": n,
        "position_mode": "long_only",
        "commission": 0.001,
        "slippage_bps": 0.0,
        "greedy": True,
        "seed": None,
        "model": "m",
    }
    doc = json.loads(json.dumps(result_to_dict(res, info)))
    policy = doc["policy"]
    assert (policy["round_trips"], policy["wins"], policy["win_rate"]) == (1, 1, 1.0)
    assert policy["profit_factor"] is None and policy["gross_loss_quote"] == 0.0  # inf becomes null
    assert policy["avg_holding_hours"] == pytest.approx(2 * CANDLE_MS / H)
    assert policy["exposure"] == pytest.approx(2 / 6) and policy["open_at_end"] is False
    assert doc["buy_and_hold"]["open_at_end"] is True and doc["buy_and_hold"]["round_trips"] == 0
    assert doc["flat"]["exposure"] == 0.0 and doc["flat"]["cagr"] == 0.0
    table = {line[:22].strip(): line[22:].split() for line in format_report(res, info).splitlines()[2:]}
    assert table["profit factor"] == ["inf", "n/a", "n/a"]
    assert table["win rate"] == ["100.0%", "n/a", "n/a"]
    assert table["open at the end"] == ["no", "yes", "no"]
    assert table["exposure"] == ["33.3%", "100.0%", "0.0%"]


# --------------------------------------------------------------------------------------------------
# real backtests against an independent computation from positions and equity
# --------------------------------------------------------------------------------------------------

FROM, TO = parse_utc_date_ms("2024-06-01"), parse_utc_date_ms("2024-06-15")


def _real_backtest(candles_2024: pd.DataFrame, mode: str, seed: int):
    """A random-init policy (as `ritmo backtest --random-init` builds it) over two weeks of June 2024."""
    ts = candles_2024["ts_ms"].to_numpy()
    i0, i1 = period_rows(ts, FROM, TO)
    window = candles_2024.iloc[i0 - 1300 : i1 + 1].reset_index(drop=True)
    features = compute_features(window, default_feature_spec())
    j0, _ = period_rows(window["ts_ms"].to_numpy(), FROM, TO)
    bundle = random_bundle(seed, features, slice(0, j0), mode, 0.001)
    obs = build_observations(features, bundle.standardizer, bundle.macro_window, bundle.micro_window)
    return backtest_period(bundle, window, obs, FROM, TO, greedy=False, seed=seed)


def _runs(positions: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs (start, end exclusive, sign) of candles held on one side."""
    sign = np.sign(positions).astype(int)
    runs, start = [], None
    for k, s in enumerate([*sign, 0]):
        if start is not None and s != sign[start]:
            runs.append((start, k, int(sign[start])))
            start = None
        if start is None and s != 0 and k < len(sign):
            start = k
    return runs


@pytest.mark.parametrize(("mode", "seed"), [("long_only", 3), ("long_short", 4)])
def test_real_backtest_against_positions_and_equity(candles_2024: pd.DataFrame, mode: str, seed: int) -> None:
    res = _real_backtest(candles_2024, mode, seed)
    stats = strategy_stats(res)["policy"]
    matched = match_trade_records(res.trades)
    n, equity, positions = len(res.positions), res.policy_equity, res.positions
    runs = _runs(positions)
    closed = [r for r in runs if r[1] < n]
    assert len(closed) >= 20, "the test policy must trade"

    # Round trips and holding time from the positions alone: a trip fills at the open of its first candle
    # and leaves at the open of the first candle after it.
    assert stats.round_trips == len(closed)
    assert stats.open_at_end == (len(runs) > len(closed))
    hours = [(end - start) * CANDLE_MS / H for start, end, _ in closed]
    assert stats.avg_holding_hours == pytest.approx(np.mean(hours), rel=1e-12)
    assert [t.direction for t in matched.trips] == [s for _, _, s in closed]
    assert stats.exposure == np.count_nonzero(positions) / n

    # A trip from flat to flat changes the (all-cash) equity by exactly its net P&L: cash before, cash after.
    flat_to_flat = [
        (i, start, end)
        for i, (start, end, _) in enumerate(closed)
        if (start == 0 or positions[start - 1] == 0) and positions[end] == 0
    ]
    for i, start, end in flat_to_flat:
        assert matched.trips[i].pnl_quote == pytest.approx(equity[end + 1] - equity[start], rel=1e-9, abs=1e-9)
    if mode == "long_only":
        assert len(flat_to_flat) == len(closed)
        pnl = np.array([equity[end + 1] - equity[start] for _, start, end in flat_to_flat])
        assert stats.win_rate == np.mean(pnl > 0)
        assert stats.profit_factor == pytest.approx(pnl[pnl > 0].sum() / -pnl[pnl < 0].sum(), rel=1e-9)
    else:
        assert len(flat_to_flat) < len(closed), "the long_short policy must flip"
    # Every quote that left or joined the account is in a closed trip or in the open lot marked at the last close.
    last_close = float(candles_2024.loc[candles_2024["ts_ms"] == TO - CANDLE_MS, "close"].iloc[0])
    lot = matched.open_lot
    total = sum(t.pnl_quote for t in matched.trips) + (lot.unrealised_pnl_quote(last_close) if lot else 0.0)
    assert total == pytest.approx(equity[-1] - equity[0], rel=1e-9)

    # CAGR: the period's equity ratio compounded over its length in 365-day years.
    assert stats.cagr == pytest.approx((equity[-1] / equity[0]) ** (PERIODS_PER_YEAR / n) - 1, rel=1e-9)
