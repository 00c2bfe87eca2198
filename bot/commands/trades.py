"""`ritmo trades`: the fills of a state, with the P&L each closing fill realised, as a table, CSV or JSON.

Reads the state database read-only, like `ritmo status` (same arguments to choose it), so it works while the
daemon runs. A fill's time is the close of the candle it was decided on: a replay fills at the next candle's
open, which is that instant, and paper and live send the order right after that close (docs/design.md §5).
The realised P&L is computed over every fill of the state (strategies/trade_stats.py) before the period is
applied, so a fill in the period that closes a position opened before it still carries its P&L.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from bot.daemon.report import find_state_db, match_state_fills
from bot.daemon.state import open_state_readonly
from bot.errors import ConfigError, RitmoError
from bot.offline.periods import check_order, parse_date
from bot.settings import MODES
from strategies.candles import CANDLE_MS, iso_utc

# Columns of --csv and keys of --json, in this order.
COLUMNS = (
    "time_utc",
    "ts_ms",
    "side",
    "qty_base",
    "price",
    "notional_quote",
    "fee_quote",
    "position_before",
    "position_after",
    "client_order_id",
    "realised_pnl_quote",
    "entry_price",
    "decision_ts_ms",
    "trade_id",
)


class TradesFileError(RitmoError):
    """The --csv file cannot be written; the message names the path and the problem (exit 1)."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo trades`: the same choice of state as `ritmo status`, the period, the output."""
    p.add_argument("--json", action="store_true", help="print the fills as one JSON list")
    p.add_argument("--state-dir", type=Path, default=None, help="state directory (default RITMO_STATE_DIR)")
    p.add_argument("--mode", choices=MODES, default=None, help="state of this mode (default RITMO_MODE)")
    p.add_argument("--symbol", default=None, help="state of this symbol (default RITMO_SYMBOL)")
    p.add_argument("--env-file", default=".env", help="settings file (default .env; the environment wins)")
    p.add_argument("--from", dest="date_from", default=None, help="first fill time, UTC date or date-time")
    p.add_argument("--to", dest="date_to", default=None, help="end of the period, exclusive (UTC date or date-time)")
    p.add_argument("--csv", type=Path, default=None, help="write the fills to this CSV file")


def period_ms(date_from: str | None, date_to: str | None) -> tuple[int | None, int | None]:
    """--from and --to as epoch ms (None where not given); a bad or reversed period is a usage error."""
    from_ms = parse_date("--from", date_from) if date_from is not None else None
    to_ms = parse_date("--to", date_to) if date_to is not None else None
    if from_ms is not None and to_ms is not None:
        check_order(from_ms, to_ms)
    return from_ms, to_ms


def fill_rows(fills: list[dict[str, Any]], from_ms: int | None = None, to_ms: int | None = None) -> list[dict]:
    """The fills (oldest first) as report rows, each with its realised P&L, restricted to [from_ms, to_ms)."""
    matched = match_state_fills(fills)
    rows = []
    for f, pnl in zip(fills, matched.fills, strict=True):
        ts_ms = int(f["decision_ts_ms"]) + CANDLE_MS
        if (from_ms is not None and ts_ms < from_ms) or (to_ms is not None and ts_ms >= to_ms):
            continue
        rows.append(
            {
                "time_utc": iso_utc(ts_ms),
                "ts_ms": ts_ms,
                "side": f["side"],
                "qty_base": f["qty_base"],
                "price": f["price"],
                "notional_quote": f["notional_quote"],
                "fee_quote": f["fee_quote"],
                "position_before": f["position_before"],
                "position_after": f["position_after"],
                "client_order_id": f["client_order_id"],
                "realised_pnl_quote": pnl.realised_pnl_quote,
                # The entry price of the lot this fill reduced (closing fills), else of the lot after it.
                "entry_price": pnl.closed_entry_price if pnl.closed_entry_price is not None else pnl.entry_price,
                "decision_ts_ms": f["decision_ts_ms"],
                "trade_id": f["trade_id"],
            }
        )
    return rows


def summary(rows: list[dict]) -> dict[str, Any]:
    """Counts, fees and realised P&L of the listed fills."""
    realised = [r["realised_pnl_quote"] for r in rows if r["realised_pnl_quote"] is not None]
    return {
        "fills": len(rows),
        "buys": sum(r["side"] == "buy" for r in rows),
        "sells": sum(r["side"] == "sell" for r in rows),
        "notional_quote": sum(r["notional_quote"] for r in rows),
        "fees_quote": sum(r["fee_quote"] for r in rows),
        "closing_fills": len(realised),
        "realised_pnl_quote": sum(realised),
    }


def format_summary(s: dict[str, Any]) -> str:
    """The summary line at the end of the table (and after --csv)."""
    return (
        f"{s['fills']} fills ({s['buys']} buys, {s['sells']} sells)  notional {s['notional_quote']:,.2f}  "
        f"fees {s['fees_quote']:,.2f}  realised P&L {s['realised_pnl_quote']:+,.2f} over {s['closing_fills']} "
        "closing fills (net of entry and exit fees)"
    )


def format_table(rows: list[dict]) -> str:
    """The fills as a fixed-width table."""
    header = (
        f"{'time (UTC)':20s} {'side':4s} {'qty':>12s} {'price':>12s} {'notional':>12s} {'fee':>9s} "
        f"{'pos':>6s}  {'realised P&L':>12s}  client order id"
    )
    lines = [header]
    for r in rows:
        pnl = "" if r["realised_pnl_quote"] is None else f"{r['realised_pnl_quote']:+,.2f}"
        pos = f"{r['position_before']:+d}->{r['position_after']:+d}".replace("+0", "0")
        lines.append(
            f"{r['time_utc']:20s} {r['side']:4s} {r['qty_base']:12.6f} {r['price']:12,.2f} "
            f"{r['notional_quote']:12,.2f} {r['fee_quote']:9,.4f} {pos:>6s}  {pnl:>12s}  {r['client_order_id']}"
        )
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    """The rows as CSV (floats in full precision, parent folders created); one error naming the path otherwise."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as `ritmo backtest --trades` does
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(COLUMNS)
            for r in rows:
                w.writerow(["" if r[c] is None else repr(r[c]) if isinstance(r[c], float) else r[c] for c in COLUMNS])
    except OSError as exc:
        raise TradesFileError(path, f"cannot write the CSV ({exc.strerror or exc})") from None


def main(args: argparse.Namespace) -> int:
    """Run `ritmo trades`."""
    if args.mode is not None and args.mode not in MODES:
        raise ConfigError(f"--mode {args.mode!r}: expected one of {', '.join(MODES)}")
    from_ms, to_ms = period_ms(args.date_from, args.date_to)
    store = open_state_readonly(
        find_state_db(env_file=args.env_file, state_dir=args.state_dir, mode=args.mode, symbol=args.symbol)
    )
    try:
        rows = fill_rows(store.fills(), from_ms, to_ms)
    finally:
        store.conn.close()
    if args.csv is not None:
        write_csv(rows, args.csv)
    if args.json:
        json.dump(rows, sys.stdout)
        sys.stdout.write("\n")
        return 0
    if args.csv is None:
        print(format_table(rows))
    else:
        print(f"wrote {len(rows)} fills to {args.csv}")
    print(format_summary(summary(rows)))
    return 0
