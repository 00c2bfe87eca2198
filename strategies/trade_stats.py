"""Round trips, realised P&L and trade statistics from fills, positions and equity (pure code; docs/design.md §5).

Used by `ritmo trades` (the realised P&L of each fill), `ritmo status` (the entry price of the open position)
and `ritmo backtest` (win rate, profit factor, CAGR, average holding time, exposure).

Definitions:
- **Lot**: the position built since the account was last flat or flipped. Its entry price is the
  quantity-weighted average price of the fills that built it; the fees of those fills are its entry fees.
- **Round trip**: from leaving flat to returning flat. A flip (long to short or back in one fill) closes one
  round trip and opens the next at the same fill: the part of the fill's quantity that closes the old lot
  (and that share of its fee) belongs to the old trip, the rest to the new one.
- **Realised P&L** of a fill that reduces or closes a lot, net of both fees:
  d * (price - entry) * closed_qty - exit fee share - entry fee share, where d = +1 long, -1 short, the exit
  fee share is fee * closed_qty / qty and the entry fee share is the lot's entry fees in proportion to the
  quantity closed (all of what is left of them when the fill closes the lot). A round trip's P&L is the
  sum over its reducing fills, so the entry and exit fees are each counted once.
- Flat and flipped are read from the fills' position states, not from quantities: a broker that floors
  amounts to the exchange's step can close to flat and leave dust, which then belongs to no lot (its cost is
  not counted). A position that changed outside the fills (a ledger adjusted to the exchange's balances)
  ends the lot without a round trip.
- **An open lot at the end** is not a round trip: it counts in exposure and in the equity (marked to market,
  so in CAGR), not in win rate, profit factor or holding time; `TradeStats.open_at_end` says it exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

HOUR_MS = 3_600_000
YEAR_MS = 365 * 24 * HOUR_MS  # the 365-day year of strategies/backtest.PERIODS_PER_YEAR


@dataclass(frozen=True)
class FillPnl:
    """What one fill did to the lot: the P&L it realised and the lot's entry price after it."""

    realised_pnl_quote: float | None
    """Net of both fees; None for a fill that only opens or adds."""
    closed_qty_base: float
    """Quantity of the lot this fill closed (0 when it only opens or adds)."""
    closed_entry_price: float | None
    """Entry price of the lot it reduced (None when it closed nothing)."""
    entry_price: float | None
    """Entry price of the lot held after the fill (None when flat)."""


@dataclass(frozen=True)
class RoundTrip:
    """One closed round trip."""

    direction: int  # +1 long, -1 short
    entry_ts_ms: int  # time of the fill that opened it
    exit_ts_ms: int  # time of the fill that closed it
    entry_price: float  # quantity-weighted average of the opening fills
    qty_base: float  # the largest quantity the lot held
    pnl_quote: float  # net of its entry and exit fees
    fees_quote: float  # its share of entry and exit fees

    @property
    def holding_hours(self) -> float:
        """Hours from the opening fill to the closing fill."""
        return (self.exit_ts_ms - self.entry_ts_ms) / HOUR_MS


@dataclass(frozen=True)
class OpenLot:
    """The position still held after the last fill."""

    direction: int
    entry_ts_ms: int
    entry_price: float
    qty_base: float
    entry_fees_quote: float  # the lot's share of the fees of the fills that built it
    realised_pnl_quote: float  # P&L already realised by fills that reduced it without closing it

    def unrealised_pnl_quote(self, mark_price: float) -> float:
        """P&L of the lot marked at `mark_price`, net of its entry fees; no exit fee is deducted."""
        return self.direction * (mark_price - self.entry_price) * self.qty_base - self.entry_fees_quote


@dataclass(frozen=True)
class MatchedFills:
    """The fills matched into lots: one FillPnl per fill, the closed round trips, the lot still open."""

    fills: list[FillPnl]
    trips: list[RoundTrip]
    open_lot: OpenLot | None


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def match_fills(
    ts_ms: Sequence[int],
    side: Sequence[str],
    qty_base: Sequence[float],
    price: Sequence[float],
    fee_quote: Sequence[float],
    position_before: Sequence[int],
    position_after: Sequence[int],
) -> MatchedFills:
    """Match fills (oldest first) into lots and round trips with average-cost accounting (module docstring)."""
    n = len(ts_ms)
    if not all(len(a) == n for a in (side, qty_base, price, fee_quote, position_before, position_after)):
        raise ValueError("every fill column must have the same length")
    out: list[FillPnl] = []
    trips: list[RoundTrip] = []
    d = 0  # direction of the open lot
    lot_qty = lot_cost = lot_fees = 0.0  # open quantity, its sum of qty * entry price, its entry fees not yet realised
    # The trip of the open lot: start, largest quantity, P&L and fees realised so far, its opening fills' qty * price.
    start_ts, peak_qty, trip_pnl, trip_fees, opened_cost, opened_total = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    for i in range(n):
        s = 1 if side[i] == "buy" else -1 if side[i] == "sell" else 0
        if s == 0:
            raise ValueError(f"fill {i}: side must be 'buy' or 'sell', got {side[i]!r}")
        q, p, fee = float(qty_base[i]), float(price[i]), float(fee_quote[i])
        if not (q > 0 and p > 0 and fee >= 0):
            raise ValueError(f"fill {i}: quantity and price must be positive and the fee >= 0")
        before, after = _sign(int(position_before[i])), _sign(int(position_after[i]))
        if d != 0 and before != d:
            # The position changed outside the fills (ledger adjusted): the lot is gone, with no round trip.
            d, lot_qty, lot_cost, lot_fees = 0, 0.0, 0.0, 0.0
        realised: float | None = None
        closed = 0.0
        closed_entry: float | None = None
        opened_qty, opened_fee = 0.0, 0.0
        if d == 0 or s == d:
            if after == s:  # opens or adds (a fill that leaves the account flat here moves dust: no lot)
                opened_qty, opened_fee = q, fee
        else:
            # Reduces, closes or flips the lot.
            closed = min(q, lot_qty)
            # No quantity left in the lot (fills sold more than they bought): only the fees count.
            closed_entry = lot_cost / lot_qty if lot_qty > 0 else p
            ends = after != d  # flat or flipped: the lot is over, whatever dust is left
            exit_fee = fee * closed / q
            entry_fee = lot_fees if ends or lot_qty <= closed else lot_fees * closed / lot_qty
            realised = d * (p - closed_entry) * closed - exit_fee - entry_fee
            trip_pnl += realised
            trip_fees += exit_fee + entry_fee
            if ends:
                entry = opened_cost / opened_total if opened_total > 0 else p
                trips.append(RoundTrip(d, start_ts, int(ts_ms[i]), entry, peak_qty, trip_pnl, trip_fees))
                d, lot_qty, lot_cost, lot_fees = 0, 0.0, 0.0, 0.0
                if after == s and q > closed:  # a flip: the rest of the fill opens the next lot
                    opened_qty, opened_fee = q - closed, fee - exit_fee
            else:
                lot_cost -= closed_entry * closed
                lot_qty -= closed
                lot_fees -= entry_fee
        if opened_qty > 0:
            if d == 0:
                d, start_ts, peak_qty, trip_pnl, trip_fees, opened_cost, opened_total = s, int(ts_ms[i]), 0, 0, 0, 0, 0
            lot_qty += opened_qty
            lot_cost += opened_qty * p
            lot_fees += opened_fee
            opened_cost += opened_qty * p
            opened_total += opened_qty
            peak_qty = max(peak_qty, lot_qty)
        out.append(FillPnl(realised, closed, closed_entry, lot_cost / lot_qty if d != 0 and lot_qty > 0 else None))

    open_lot = None
    if d != 0 and lot_qty > 0:
        open_lot = OpenLot(d, start_ts, lot_cost / lot_qty, lot_qty, lot_fees, trip_pnl)
    return MatchedFills(out, trips, open_lot)


def match_trade_records(trades: Sequence[Any]) -> MatchedFills:
    """`match_fills` over a backtest's trades (objects with ts_ms, side, qty_base, price, fee_quote,
    position_after), the first starting flat; each trade's position before is the previous one's after."""
    after = [int(t.position_after) for t in trades]
    return match_fills(
        [int(t.ts_ms) for t in trades],
        [t.side for t in trades],
        [t.qty_base for t in trades],
        [t.price for t in trades],
        [t.fee_quote for t in trades],
        [0, *after][: len(after)],
        after,
    )


@dataclass(frozen=True)
class TradeStats:
    """Round-trip and exposure figures of one strategy over a period; see the module docstring."""

    round_trips: int
    wins: int
    win_rate: float  # wins / round_trips; NaN without round trips
    gross_profit_quote: float  # sum of the winning round trips' net P&L
    gross_loss_quote: float  # minus the sum of the losing round trips' net P&L (>= 0)
    profit_factor: float  # gross_profit / gross_loss; inf without losses, NaN without either
    avg_holding_hours: float  # mean over round trips; NaN without round trips
    exposure: float  # share of candles with a non-zero position
    cagr: float  # (E_end / E_start) ** (1 / years) - 1, years = period length / 365 days
    years: float
    open_at_end: bool  # a lot is still open at the end (not a round trip)

    def to_dict(self) -> dict:
        """JSON-able dict with non-finite numbers turned into None."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def cagr(start_equity: float, end_equity: float, years: float) -> float:
    """Compound annual growth rate: (end / start) ** (1 / years) - 1; -1 when the account is wiped out.

    A period shorter than a year is compounded up to a year like any other: +1% in a week reads as about
    +68% a year. Too large to represent is inf; a period of no length is NaN.
    """
    if not (years > 0 and start_equity > 0):
        return float("nan")
    if end_equity <= 0:
        return -1.0
    log_growth = math.log(end_equity / start_equity) / years
    return math.expm1(log_growth) if log_growth < 700 else float("inf")


def trade_stats(
    matched: MatchedFills, positions: np.ndarray, equity: np.ndarray, equity_ts_ms: np.ndarray
) -> TradeStats:
    """Win rate, profit factor, holding time (closed round trips), exposure (positions) and CAGR (equity curve).

    positions: (n,) the position held during each candle; equity: (n+1,) marks at the period start and at
    each candle's close, at the instants equity_ts_ms (n+1,).
    """
    positions = np.asarray(positions, dtype=np.float64)
    equity = np.asarray(equity, dtype=np.float64)
    pnl = np.array([t.pnl_quote for t in matched.trips], dtype=np.float64)
    wins = int(np.count_nonzero(pnl > 0))
    gross_profit = float(pnl[pnl > 0].sum())
    gross_loss = 0.0 - float(pnl[pnl < 0].sum())  # 0.0 - x: no -0.0 without losses
    if gross_loss > 0:
        profit_factor = gross_profit / gross_loss
    else:
        profit_factor = float("inf") if gross_profit > 0 else float("nan")
    hours = [t.holding_hours for t in matched.trips]
    years = float(int(equity_ts_ms[-1]) - int(equity_ts_ms[0])) / YEAR_MS
    return TradeStats(
        round_trips=len(matched.trips),
        wins=wins,
        win_rate=wins / len(pnl) if pnl.size else float("nan"),
        gross_profit_quote=gross_profit,
        gross_loss_quote=gross_loss,
        profit_factor=profit_factor,
        avg_holding_hours=float(np.mean(hours)) if hours else float("nan"),
        exposure=float(np.count_nonzero(positions != 0) / max(positions.size, 1)),
        cagr=cagr(float(equity[0]), float(equity[-1]), years),
        years=years,
        open_at_end=matched.open_lot is not None,
    )
