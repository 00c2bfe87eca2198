"""Backtest a policy over a period with the shared accounting, next to buy-and-hold and flat (pure code).

Timeline (docs/design.md §2, §5). The period is candles i0 .. i1-1 (open times in [from, to)). The account is flat
with `initial_cash` at the close of candle i0-1, which is the instant `from`. The decision taken at the
close of candle t (using only candles <= t) fills at the open of t+1; equity is marked at every close.
So decisions are taken at the closes of i0-1 .. i1-2 (one per period candle) and the equity curve has
one point at `from` plus one per period candle close. Nothing is sold at the end: every strategy is
marked to market at the last close, so no one pays an exit fee the others do not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from strategies.accounting import Ledger
from strategies.actions import BUY, HOLD, SELL
from strategies.candles import CANDLE_MS
from strategies.objectives import is_decision_candle
from strategies.policy import decision_uniforms

PERIODS_PER_YEAR = 365 * 288  # 5-minute candles in a 365-day year, for annualising Sharpe and Sortino


@dataclass(frozen=True)
class TradeRecord:
    """One executed trade of a backtest."""

    ts_ms: int  # open time of the candle whose open was the fill
    side: str
    qty_base: float
    price: float
    fee_quote: float
    position_after: float


@dataclass
class Metrics:
    """Summary figures of one equity curve; see README "Backtest JSON keys"."""

    total_return: float
    final_equity: float
    sharpe: float
    sortino: float
    max_drawdown: float
    n_trades: int
    turnover: float
    fees_quote: float
    share_long: float
    share_short: float
    share_flat: float

    def to_dict(self) -> dict:
        """JSON-able dict with non-finite numbers turned into None."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class BacktestResult:
    """Equity curves, trades and metrics of a policy, buy-and-hold and flat over the same candles."""

    equity_ts_ms: np.ndarray  # (n+1,) close instants: from, then each period candle's close
    policy_equity: np.ndarray  # (n+1,)
    hold_equity: np.ndarray  # (n+1,)
    flat_equity: np.ndarray  # (n+1,)
    positions: np.ndarray  # (n,) position held during each period candle
    actions: np.ndarray  # (n,) action taken at each decision
    trades: list[TradeRecord] = field(default_factory=list)
    hold_trades: list[TradeRecord] = field(default_factory=list)  # buy-and-hold's one buy at the first open
    policy: Metrics | None = None
    buy_and_hold: Metrics | None = None
    flat: Metrics | None = None


def equity_metrics(
    equity: np.ndarray, positions: np.ndarray, n_trades: int, turnover_quote: float, fees_quote: float
) -> Metrics:
    """Metrics from an equity curve (n+1,) and the positions held over its n steps (n,)."""
    equity = np.asarray(equity, dtype=np.float64)
    r = np.diff(np.log(equity))
    if r.size > 1 and r.std() > 0:
        sharpe = float(r.mean() / r.std() * math.sqrt(PERIODS_PER_YEAR))
    else:
        sharpe = float("nan")
    downside = float(np.sqrt(np.mean(np.minimum(r, 0.0) ** 2))) if r.size else 0.0
    sortino = float(r.mean() / downside * math.sqrt(PERIODS_PER_YEAR)) if downside > 0 else float("nan")
    peak = np.maximum.accumulate(equity)
    max_dd = float(np.max(1.0 - equity / peak)) if equity.size else 0.0
    n = max(positions.size, 1)
    return Metrics(
        total_return=float(equity[-1] / equity[0] - 1.0),
        final_equity=float(equity[-1]),
        sharpe=sharpe,
        sortino=sortino,
        max_drawdown=max_dd,
        n_trades=int(n_trades),
        turnover=float(turnover_quote / equity[0]),
        fees_quote=float(fees_quote),
        share_long=float(np.count_nonzero(positions > 0) / n),
        share_short=float(np.count_nonzero(positions < 0) / n),
        share_flat=float(np.count_nonzero(positions == 0) / n),
    )


def run_backtest(
    probs: np.ndarray,
    ts_ms: np.ndarray,
    open_prices: np.ndarray,
    close_prices: np.ndarray,
    *,
    greedy: bool = False,
    seed: int = 0,
    decide_every: int = 1,
    **account: Any,
) -> BacktestResult:
    """Run the policy sequentially over one period.

    probs: (n, 3 positions, 3 actions) eval-mode probabilities for the decisions at the closes of
      candles i0-1 .. i1-2 (row k is the decision whose fill is at the open of period candle k);
    ts_ms, open_prices, close_prices: (n,) the period candles i0 .. i1-1.
    The decision's uniform number is keyed by the open time of the candle it is taken on (ts_ms[k] - 5 min).
    decide_every = K: only candles that `is_decision_candle` names decide; the others keep the position (HOLD).
    account: mode, commission, slippage_bps, initial_cash, passed to `run_actions` as it takes them.
    """
    n = int(ts_ms.shape[0])
    if not (probs.shape[0] == n == open_prices.shape[0] == close_prices.shape[0]):
        raise ValueError("probs, ts_ms, open_prices and close_prices must have the same length")
    if n == 0:
        raise ValueError("the backtest period holds no candles")
    decision_ts = np.asarray(ts_ms, dtype=np.int64) - CANDLE_MS
    if greedy:
        actions = np.argmax(probs, axis=2)  # (n, 3): the greedy action for each position state
    else:
        u = decision_uniforms(seed, decision_ts)
        cdf = np.cumsum(probs, axis=2)
        # inverse CDF for every position state at once; the loop below only picks the row it needs
        actions = (u[:, None, None] >= cdf[:, :, :2]).sum(axis=2)
    if decide_every > 1:
        actions = np.where(np.asarray(is_decision_candle(decision_ts, decide_every))[:, None], actions, HOLD)
    return run_actions(actions, ts_ms, open_prices, close_prices, **account)


def run_actions(
    actions: np.ndarray,
    ts_ms: np.ndarray,
    open_prices: np.ndarray,
    close_prices: np.ndarray,
    *,
    mode: str,
    commission: float,
    slippage_bps: float = 0.0,
    initial_cash: float = 10_000.0,
) -> BacktestResult:
    """Run fixed actions over one period with the shared accounting, beside buy-and-hold and flat.

    actions: (n, 3) the action for each position state (index position + 1) at each decision, or (n,) one
    action whatever the position (a baseline rule); the other arguments as in `run_backtest`.
    The ledger is called only at the rows where it can trade or raise (`_stop_rows`); in between, positions and
    marks are filled in with numpy, bit-identical to calling it at every candle.
    """
    n = int(ts_ms.shape[0])
    actions = np.asarray(actions, dtype=np.int64)
    if actions.ndim == 1:
        actions = np.repeat(actions[:, None], 3, axis=1)
    if actions.shape != (n, 3) or n == 0 or not (n == open_prices.shape[0] == close_prices.shape[0]):
        raise ValueError("actions must be (n, 3) or (n,) for n period candles, with prices of the same length")
    decision_ts = np.asarray(ts_ms, dtype=np.int64) - CANDLE_MS
    closes = np.asarray(close_prices, dtype=np.float64)
    stops = _stop_rows(actions, open_prices, close_prices, mode)

    ledger = Ledger(cash_quote=float(initial_cash))
    equity = np.empty(n + 1)
    equity[0] = float(initial_cash)
    positions = np.empty(n)
    trades: list[TradeRecord] = []
    k = 0
    while k < n:
        # Until the next stop row the position cannot change: hold it and mark to market in one step, with
        # the very float operations of Ledger.equity (cash + qty * close).
        pos = ledger.position
        after = stops[pos + 1]
        j = int(after[np.searchsorted(after, k)]) if after.size and after[-1] >= k else n
        positions[k:j] = float(pos)
        equity[k + 1 : j + 1] = ledger.cash_quote + ledger.qty_base * closes[k:j]
        if j == n:
            break
        fill = ledger.apply_action(int(actions[j, pos + 1]), open_prices[j], commission, slippage_bps, mode)
        if fill is not None:
            trades.append(
                TradeRecord(int(ts_ms[j]), fill.side, fill.qty_base, fill.price, fill.fee_quote, fill.position_after)
            )
        positions[j] = float(ledger.position)
        equity[j + 1] = ledger.equity(closes[j])
        k = j + 1
    held_before = np.concatenate([[0], positions[:-1]]).astype(np.int64)
    taken = actions[np.arange(n), held_before + 1]  # (n,) the action read for the position held

    hold_equity, hold_metrics, hold_trades = _buy_and_hold(
        ts_ms, open_prices, close_prices, commission, slippage_bps, initial_cash, mode
    )
    flat_equity = np.full(n + 1, float(initial_cash))
    result = BacktestResult(
        equity_ts_ms=np.concatenate([[decision_ts[0] + 300_000], np.asarray(ts_ms, dtype=np.int64) + 300_000]),
        policy_equity=equity,
        hold_equity=hold_equity,
        flat_equity=flat_equity,
        positions=positions,
        actions=taken,
        trades=trades,
        hold_trades=hold_trades,
    )
    result.policy = equity_metrics(equity, positions, len(trades), ledger.turnover_quote, ledger.fees_quote)
    result.buy_and_hold = hold_metrics
    result.flat = equity_metrics(flat_equity, np.zeros(n), 0, 0.0, 0.0)
    return result


def _stop_rows(actions: np.ndarray, open_prices: np.ndarray, close_prices: np.ndarray, mode: str) -> list[np.ndarray]:
    """For each position state -1, 0, +1: the sorted rows where `run_actions` must call the ledger.

    Those are the rows whose action would move that state, plus every row where the ledger would raise (an
    unknown action, a price that is not positive) and row 0 (where it checks mode, commission and slippage),
    so the errors are the ledger's own, at the same row. Between stop rows the ledger would return None
    without touching anything, so skipping those calls changes nothing. actions: (n, 3) int64.
    """
    sell_target = -1 if mode == "long_short" else 0
    always = ~(np.asarray(open_prices) > 0) | ~(np.asarray(close_prices) > 0)
    always[0] = True
    stops = []
    for state in (-1, 0, 1):
        a = actions[:, state + 1]
        target = np.where(a == BUY, 1, np.where(a == SELL, sell_target, state))
        unknown = (a < HOLD) | (a > SELL)
        stops.append(np.flatnonzero((target != state) | unknown | always))
    return stops


def _buy_and_hold(
    ts_ms: np.ndarray,
    open_prices: np.ndarray,
    close_prices: np.ndarray,
    commission: float,
    slippage_bps: float,
    initial_cash: float,
    mode: str,
) -> tuple[np.ndarray, Metrics, list[TradeRecord]]:
    """Buy at the first period open with the same accounting, hold, mark at every close; also its one trade."""
    ledger = Ledger(cash_quote=float(initial_cash))
    fill = ledger.apply_action(BUY, float(open_prices[0]), commission, slippage_bps, mode)
    equity = np.concatenate([[initial_cash], ledger.cash_quote + ledger.qty_base * np.asarray(close_prices)])
    metrics = equity_metrics(
        equity, np.ones(len(close_prices)), ledger.n_trades, ledger.turnover_quote, ledger.fees_quote
    )
    trades = []
    if fill is not None:
        trades.append(
            TradeRecord(int(ts_ms[0]), fill.side, fill.qty_base, fill.price, fill.fee_quote, fill.position_after)
        )
    return equity, metrics, trades


def period_rows(ts_ms: np.ndarray, from_ms: int, to_ms: int) -> tuple[int, int]:
    """Row range [i0, i1) of the candles whose open time lies in [from_ms, to_ms)."""
    ts = np.asarray(ts_ms, dtype=np.int64)
    i0 = int(np.searchsorted(ts, from_ms, side="left"))
    i1 = int(np.searchsorted(ts, to_ms, side="left"))
    return i0, i1
