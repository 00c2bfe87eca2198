"""`ritmo backtest`: load candles and a policy, run it over a period, report it beside buy-and-hold and flat."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from bot.errors import RitmoError, UsageError
from bot.files.candles import load_candle_files
from bot.files.checkpoints import load_checkpoint
from bot.files.paths import check_output_file
from bot.offline.periods import clip_to_data, earliest_from_ms, minute_text, parse_period, warm_up_problem
from strategies.actions import POSITION_MODES
from strategies.backtest import BacktestResult, period_rows
from strategies.bundle import PeriodError, backtest_period, random_bundle
from strategies.candles import CANDLE_MS
from strategies.features import (
    build_observations,
    compute_features,
    default_feature_spec,
    first_valid_row,
)
from strategies.trade_stats import TradeStats, match_trade_records, trade_stats

DEFAULT_INITIAL_CASH = 10_000.0


class BacktestError(RitmoError):
    """The backtest cannot run as asked (period, warm-up, checkpoint)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo backtest`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="policy checkpoint (.pt)")
    src.add_argument("--random-init", action="store_true", help="a randomly initialised policy (seeded by --seed)")
    p.add_argument(
        "--data", type=Path, nargs="+", required=True, help="candle file(s) of one market (CSV, CSV.gz, Parquet)"
    )
    p.add_argument("--from", dest="date_from", required=True, help="first candle open time (UTC date/time)")
    p.add_argument("--to", dest="date_to", required=True, help="end of the period, exclusive (UTC date/time)")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--greedy", action="store_true", help="take the most probable action")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and init seed with --random-init)")
    p.add_argument("--mode", choices=POSITION_MODES, default=None, help="position mode for --random-init")
    p.add_argument("--commission", type=float, default=None, help="commission per side (default: checkpoint's)")
    p.add_argument("--slippage-bps", type=float, default=0.0, help="slippage against us, basis points")
    p.add_argument("--initial-cash", type=float, default=DEFAULT_INITIAL_CASH, help="starting quote balance")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", type=Path, help="write the three equity curves to this PNG")
    p.add_argument("--trades", type=Path, help="write every trade to this CSV")


def strategy_stats(result: BacktestResult) -> dict[str, TradeStats]:
    """Round-trip, exposure and CAGR figures of the three strategies (strategies/trade_stats.py)."""
    ts = result.equity_ts_ms
    return {
        "policy": trade_stats(match_trade_records(result.trades), result.positions, result.policy_equity, ts),
        "buy_and_hold": trade_stats(
            match_trade_records(result.hold_trades), np.ones_like(result.positions), result.hold_equity, ts
        ),
        "flat": trade_stats(match_trade_records([]), np.zeros_like(result.positions), result.flat_equity, ts),
    }


def result_to_dict(result: BacktestResult, info: dict) -> dict:
    """The `--json` object: run info plus the three strategies' metrics and trade statistics."""
    assert result.policy and result.buy_and_hold and result.flat
    stats = strategy_stats(result)
    return {
        **info,
        "policy": {**result.policy.to_dict(), **stats["policy"].to_dict()},
        "buy_and_hold": {**result.buy_and_hold.to_dict(), **stats["buy_and_hold"].to_dict()},
        "flat": {**result.flat.to_dict(), **stats["flat"].to_dict()},
    }


def _cell(value: object, fmt: str) -> str:
    """One table cell: NaN is n/a, an infinite value (a profit factor without losses) is inf."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not np.isfinite(value):
        return "n/a" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    return fmt.format(value)


def format_report(result: BacktestResult, info: dict) -> str:
    """A readable table of the three strategies' figures."""
    rows = [
        ("total return", "total_return", "{:+.2%}"),
        ("CAGR", "cagr", "{:+.2%}"),
        ("final equity", "final_equity", "{:,.2f}"),
        ("Sharpe (ann.)", "sharpe", "{:.2f}"),
        ("Sortino (ann.)", "sortino", "{:.2f}"),
        ("max drawdown", "max_drawdown", "{:.2%}"),
        ("trades", "n_trades", "{:d}"),
        ("round trips", "round_trips", "{:d}"),
        ("win rate", "win_rate", "{:.1%}"),
        ("profit factor", "profit_factor", "{:.2f}"),
        ("avg holding (hours)", "avg_holding_hours", "{:.2f}"),
        ("open at the end", "open_at_end", "{}"),
        ("turnover (x equity)", "turnover", "{:.2f}"),
        ("fees paid (quote)", "fees_quote", "{:,.2f}"),
        ("exposure", "exposure", "{:.1%}"),
        ("time long", "share_long", "{:.1%}"),
        ("time short", "share_short", "{:.1%}"),
        ("time flat", "share_flat", "{:.1%}"),
    ]
    stats = strategy_stats(result)
    cols: list[tuple[str, dict]] = [
        (name, {**asdict(metrics), **asdict(stats[key])})
        for name, key, metrics in (
            ("policy", "policy", result.policy),
            ("buy&hold", "buy_and_hold", result.buy_and_hold),
            ("flat", "flat", result.flat),
        )
        if metrics is not None
    ]
    lines = [
        f"backtest {info['from']} .. {info['to']}  candles={info['candles']}  mode={info['position_mode']}  "
        f"commission={info['commission']}  slippage_bps={info['slippage_bps']}  "
        f"{'greedy' if info['greedy'] else 'seed=' + str(info['seed'])}  model={info['model']}",
        f"{'':22s}" + "".join(f"{name:>14s}" for name, _ in cols),
    ]
    for label, key, fmt in rows:
        lines.append(f"{label:22s}" + "".join(f"{_cell(figures[key], fmt):>14s}" for _, figures in cols))
    lines.append("(net of fees; short borrow/funding costs are not modelled; nothing is sold at the end)")
    lines.append(
        "(round trip: flat to flat, or to a flip; a position open at the end is none. Win rate and profit factor "
        "use round trips' P&L net of both fees. CAGR compounds the period's return to a 365-day year.)"
    )
    return "\n".join(lines)


def write_trades_csv(result: BacktestResult, path: Path) -> None:
    """Every trade: time (UTC), side, quantity, price, fee, position after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["time_utc", "ts_ms", "side", "qty_base", "price", "fee_quote", "position_after"])
        for t in result.trades:
            when = pd.Timestamp(t.ts_ms, unit="ms", tz="UTC").isoformat()
            w.writerow([when, t.ts_ms, t.side, repr(t.qty_base), repr(t.price), repr(t.fee_quote), t.position_after])


def plot_equity(result: BacktestResult, path: Path, title: str) -> None:
    """The policy, buy-and-hold and flat equity curves in one PNG with dates on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    when = pd.to_datetime(result.equity_ts_ms, unit="ms", utc=True)
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.plot(when, result.policy_equity, label="policy", lw=1.2)
    ax.plot(when, result.hold_equity, label="buy & hold", lw=1.0)
    ax.plot(when, result.flat_equity, label="flat", lw=1.0, ls="--")
    ax.set_title(title)
    ax.set_ylabel("equity (quote)")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    fig.autofmt_xdate()
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _validate_numbers(args: argparse.Namespace) -> None:
    """Refuse commission, slippage and cash values the accounting cannot take, naming the option."""
    if args.commission is not None and not 0 <= args.commission < 0.05:
        raise UsageError(f"--commission {args.commission}: expected a fraction in [0, 0.05), e.g. 0.001")
    if not 0 <= args.slippage_bps < 10_000:
        raise UsageError(f"--slippage-bps {args.slippage_bps}: expected basis points in [0, 10000)")
    if not (args.initial_cash > 0 and np.isfinite(args.initial_cash)):
        raise UsageError(f"--initial-cash {args.initial_cash}: expected a positive amount")


def _period_in_data(ts: np.ndarray, from_ms: int, to_ms: int, data: str) -> int:
    """The period's end (exclusive), clipped to the end of the data (logged); UsageError when the period holds
    no candle of the data at all."""
    data_end_ms = int(ts[-1]) + CANDLE_MS
    if from_ms >= data_end_ms or to_ms <= int(ts[0]):
        raise UsageError(
            f"the period {minute_text(from_ms)} .. {minute_text(to_ms)} holds no candles of {data} "
            f"(it holds {minute_text(int(ts[0]))} .. {minute_text(data_end_ms)} UTC)"
        )
    return clip_to_data(to_ms, data_end_ms, source=data)


def _warm_up_error(from_ms: int, ts: np.ndarray, history: int) -> UsageError:
    """The one-line error for a --from inside the data's warm-up, naming the earliest valid --from."""
    return UsageError(
        f"not enough warm-up before --from {minute_text(from_ms)}: "
        + warm_up_problem(history, earliest_from_ms(ts, history), "this data")
    )


def main(args: argparse.Namespace) -> int:
    """Run `ritmo backtest`."""
    from_ms, to_ms = parse_period(args.date_from, args.date_to)
    _validate_numbers(args)
    # The output files are checked before the work, not found unwritable after it.
    if args.trades:
        check_output_file(args.trades, "--trades")
    if args.plot:
        check_output_file(args.plot, "--plot")
    candles = load_candle_files(args.data)
    ts = candles["ts_ms"].to_numpy()
    to_ms = _period_in_data(ts, from_ms, to_ms, " ".join(str(p) for p in args.data))
    i0, _ = period_rows(ts, from_ms, to_ms)
    if args.random_init:
        spec = default_feature_spec()
        features = compute_features(candles, spec)
        mode = args.mode or "long_short"
        commission = 0.001 if args.commission is None else args.commission
        if i0 < 1 or not np.isfinite(features[:i0]).all(axis=1).any():
            # --random-init fits its standardisation on the candles before --from; the policy then needs
            # as much history as any checkpoint's.
            raise _warm_up_error(from_ms, ts, first_valid_row(spec) + 1)
        bundle = random_bundle(args.seed, features, slice(0, i0), mode, commission)
    else:
        bundle = load_checkpoint(args.checkpoint)
        if args.mode and args.mode != bundle.position_mode:
            raise UsageError(f"--mode {args.mode} differs from the checkpoint's {bundle.position_mode}")
        features = compute_features(candles, bundle.spec)
    obs = build_observations(features, bundle.standardizer, bundle.macro_window, bundle.micro_window)
    if i0 < 1 or not obs.valid[i0 - 1]:
        first = int(np.argmax(obs.valid)) if obs.valid.any() else len(ts)
        raise _warm_up_error(from_ms, ts, first + 1)
    try:
        result = backtest_period(
            bundle,
            candles,
            obs,
            from_ms,
            to_ms,
            greedy=args.greedy,
            seed=args.seed,
            commission=args.commission,
            slippage_bps=args.slippage_bps,
            initial_cash=args.initial_cash,
        )
    except PeriodError as exc:
        raise BacktestError(str(exc)) from None
    info = {
        "data": " ".join(str(p) for p in args.data),
        "from": pd.Timestamp(from_ms, unit="ms", tz="UTC").isoformat(),
        "to": pd.Timestamp(to_ms, unit="ms", tz="UTC").isoformat(),
        "candles": len(result.positions),
        "position_mode": bundle.position_mode,
        "commission": bundle.commission if args.commission is None else args.commission,
        "slippage_bps": args.slippage_bps,
        "greedy": bool(args.greedy),
        "seed": None if args.greedy else args.seed,
        "model": "random-init" if args.random_init else str(args.checkpoint),
        "model_version": bundle.version(),
        "decide_every": bundle.decide_every,
        "objective": bundle.objective,
        "initial_cash": args.initial_cash,
    }
    if args.trades:
        write_trades_csv(result, args.trades)
    if args.plot:
        plot_equity(result, args.plot, f"{info['model']}  {info['from'][:10]} .. {info['to'][:10]}")
    if args.json:
        json.dump(result_to_dict(result, info), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_report(result, info))
    return 0
