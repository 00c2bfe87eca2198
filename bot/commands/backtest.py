"""`ritmo backtest`: load candles and a policy, run it over a period, report it beside buy-and-hold and flat."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bot.errors import RitmoError
from bot.files.candles import load_candle_files
from bot.files.checkpoints import load_checkpoint
from strategies.actions import POSITION_MODES
from strategies.backtest import BacktestResult, Metrics, period_rows
from strategies.bundle import PeriodError, backtest_period, random_bundle
from strategies.candles import parse_utc_date_ms
from strategies.features import (
    build_observations,
    compute_features,
    default_feature_spec,
    first_valid_row,
)

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


def result_to_dict(result: BacktestResult, info: dict) -> dict:
    """The `--json` object: run info plus the three strategies' metrics."""
    assert result.policy and result.buy_and_hold and result.flat
    return {
        **info,
        "policy": result.policy.to_dict(),
        "buy_and_hold": result.buy_and_hold.to_dict(),
        "flat": result.flat.to_dict(),
    }


def format_report(result: BacktestResult, info: dict) -> str:
    """A readable table of the three strategies' figures."""
    rows = [
        ("total return", "total_return", "{:+.2%}"),
        ("final equity", "final_equity", "{:,.2f}"),
        ("Sharpe (ann.)", "sharpe", "{:.2f}"),
        ("Sortino (ann.)", "sortino", "{:.2f}"),
        ("max drawdown", "max_drawdown", "{:.2%}"),
        ("trades", "n_trades", "{:d}"),
        ("turnover (x equity)", "turnover", "{:.2f}"),
        ("fees paid (quote)", "fees_quote", "{:,.2f}"),
        ("time long", "share_long", "{:.1%}"),
        ("time short", "share_short", "{:.1%}"),
        ("time flat", "share_flat", "{:.1%}"),
    ]
    cols: list[tuple[str, Metrics]] = [
        ("policy", result.policy),
        ("buy&hold", result.buy_and_hold),
        ("flat", result.flat),  # type: ignore[list-item]
    ]
    lines = [
        f"backtest {info['from']} .. {info['to']}  candles={info['candles']}  mode={info['position_mode']}  "
        f"commission={info['commission']}  slippage_bps={info['slippage_bps']}  "
        f"{'greedy' if info['greedy'] else 'seed=' + str(info['seed'])}  model={info['model']}",
        f"{'':22s}" + "".join(f"{name:>14s}" for name, _ in cols),
    ]
    for label, key, fmt in rows:
        cells = []
        for _, metrics in cols:
            value = getattr(metrics, key)
            cells.append(
                f"{'n/a':>14s}" if isinstance(value, float) and not np.isfinite(value) else f"{fmt.format(value):>14s}"
            )
        lines.append(f"{label:22s}" + "".join(cells))
    lines.append("(net of fees; short borrow/funding costs are not modelled; nothing is sold at the end)")
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
        raise BacktestError(f"--commission {args.commission}: expected a fraction in [0, 0.05), e.g. 0.001")
    if not 0 <= args.slippage_bps < 10_000:
        raise BacktestError(f"--slippage-bps {args.slippage_bps}: expected basis points in [0, 10000)")
    if not (args.initial_cash > 0 and np.isfinite(args.initial_cash)):
        raise BacktestError(f"--initial-cash {args.initial_cash}: expected a positive amount")


def main(args: argparse.Namespace) -> int:
    """Run `ritmo backtest`."""
    try:
        from_ms = parse_utc_date_ms(args.date_from)
        to_ms = parse_utc_date_ms(args.date_to)
    except ValueError as exc:
        raise BacktestError(f"--from/--to: {exc}") from None
    if to_ms <= from_ms:
        raise BacktestError("--to must be after --from")
    _validate_numbers(args)
    candles = load_candle_files(args.data)
    ts = candles["ts_ms"].to_numpy()
    i0, _ = period_rows(ts, from_ms, to_ms)
    if args.random_init:
        spec = default_feature_spec()
        features = compute_features(candles, spec)
        mode = args.mode or "long_short"
        commission = 0.001 if args.commission is None else args.commission
        if i0 < 1 or not np.isfinite(features[:i0]).all(axis=1).any():
            raise BacktestError(
                "not enough warm-up before the period start: --random-init fits its standardisation on the "
                f"candles before --from and needs at least {first_valid_row(spec) + 1} of them; start later"
            )
        bundle = random_bundle(args.seed, features, slice(0, i0), mode, commission)
    else:
        bundle = load_checkpoint(args.checkpoint)
        if args.mode and args.mode != bundle.position_mode:
            raise BacktestError(f"--mode {args.mode} differs from the checkpoint's {bundle.position_mode}")
        features = compute_features(candles, bundle.spec)
    obs = build_observations(features, bundle.standardizer, bundle.macro_window, bundle.micro_window)
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
