"""`ritmo status` (what the daemon's state says) and `ritmo resume` (clear a drawdown halt).

Both read the settings only for the defaults of mode, symbol and state directory (never the API keys: a
live state can be inspected without them). `status` opens the database read-only and takes no lock, so it
works while the daemon runs (WAL readers never block the writer). `resume` writes the cleared halt and a
`resume` event in one transaction; a running daemon re-reads the halt inside every tick's transaction, so it
resumes at the next candle, flat, with the peak equity reset to the current equity (otherwise the very same
drawdown would halt it again at once).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bot.daemon.alerts import message_for
from bot.daemon.halt import clear_halt
from bot.daemon.report import collect_status, find_state_db, finite
from bot.daemon.state import open_state_for_update, open_state_readonly
from bot.errors import ConfigError
from bot.settings import MODES, Settings, load_settings
from strategies.accounting import Ledger


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo status` and `ritmo resume`."""
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--state-dir", type=Path, default=None, help="state directory (default RITMO_STATE_DIR)")
    p.add_argument("--mode", choices=MODES, default=None, help="state of this mode (default RITMO_MODE)")
    p.add_argument("--symbol", default=None, help="state of this symbol (default RITMO_SYMBOL)")
    p.add_argument("--env-file", default=".env", help="settings file (default .env; the environment wins)")


def format_status(s: dict[str, Any]) -> str:
    """A readable summary."""

    def money(x: Any) -> str:
        return "n/a" if x is None else f"{x:,.2f}"

    last = s["last_decision"]
    probs = last["probs"] if last else None
    lines = [
        f"state        {s['state']}",
        f"mode         {s['mode']}  symbol {s['symbol']}  ({s['position_mode']})",
        f"position     {s['position']}  qty {s['qty_base']}  cash {money(s['cash_quote'])}",
        f"equity       {money(s['equity'])}  profit {_signed(s['profit_quote'])} ({_signed_pct(s['pnl_pct'])}) "
        f"(net of fees)  fees {money(s['fees_quote'])}  trades {s['n_trades']}",
        f"entry        {_format_entry(s)}",
        f"p&l          today {_signed(s['pnl_today_quote'])} ({_signed_pct(s['pnl_today_pct'])}) since "
        f"{s['pnl_today_since'] or 'n/a'}  7 days {_signed(s['pnl_7d_quote'])} ({_signed_pct(s['pnl_7d_pct'])}) "
        f"since {s['pnl_7d_since'] or 'n/a'}  realised {_signed(s['realised_pnl_quote'])}",
        f"buy&hold     {_format_buy_hold(s['buy_hold'])}",
        f"last candle  {s['last_candle']['ts'] if s['last_candle'] else 'none'}"
        + (f"  close {s['last_candle']['close']}" if s["last_candle"] else ""),
    ]
    if last:
        p = f"  p(hold/buy/sell) {probs['hold']:.3f}/{probs['buy']:.3f}/{probs['sell']:.3f}" if probs else ""
        lines.append(f"last decision {last['ts']} {last['status']} {last['action'] or '-'}{p}")
    ep = s["episode"]
    closed = ", ".join(f"{k} {v}" for k, v in ep["counts"].items())
    guard = s["learning_guard"]
    m = s["model"]
    lines += [
        f"episode      {ep['id'] or '-'}: step {ep['step']}/{ep['steps']} decisions  ({closed or 'none yet'})",
        f"rhythm       k={s['rhythm']['k']}  macro updates {s['rhythm']['macro_updates']}  "
        f"(online updates learned {s['updates']['learned']}, rejected {s['updates']['rejected']}, "
        f"rolled back {guard['rolled_back']})",
        f"model        {m['version']}  {m['checkpoint_path']} ({m['source']})  "
        f"objective {m['objective'] or 'card'}, decides every {m['decide_every']} candle(s)",
        f"guard        {_format_guard(guard)}",
        "halt         "
        + (
            f"HALTED since {s['halt']['since']}: {s['halt']['reason']} (ritmo resume clears it)"
            if s["halt"]["halted"]
            else "no"
        ),
        f"paused       {_format_paused(s['paused'])}",
    ]
    broker = s.get("broker")
    if broker:
        b = broker["breaker"]
        if b.get("state") == "open":
            state = f"OPEN (trading paused) since {b.get('since')}, retries from {b.get('half_opens_at')}"
        elif b.get("state") == "half_open":
            state = "HALF-OPEN (the next order is a trial)"
        else:
            state = "closed (trading)"
        err = f"  last error: {b['last_error']}" if b.get("last_error") else ""
        lines.append(f"exchange     {broker.get('exchange')}  circuit breaker {state}  trips {b.get('trips', 0)}{err}")
    check = s.get("balance_check")
    if check:
        if check.get("adjusted"):
            lines.append(
                f"balances     ADJUSTED to the exchange at start: qty {check['ledger_qty_base']} -> "
                f"{check['exchange_qty_base']}, cash {money(check['ledger_cash_quote'])} -> "
                f"{money(check['exchange_cash_quote'])}"
            )
        else:
            lines.append("balances     ledger matched the exchange at start")
    pending = s.get("orders", {}).get("pending") or []
    for o in pending:
        lines.append(
            f"order        {o['client_order_id']} {o['side']} {o['qty_base']} {o['status']}: {o['detail'] or ''}"
        )
    return "\n".join(lines)


def _signed(x: float | None) -> str:
    """A quote amount with its sign, n/a for None."""
    return "n/a" if x is None else f"{x:+,.2f}"


def _signed_pct(x: float | None) -> str:
    """A percentage with its sign, n/a for None."""
    return "n/a" if x is None else f"{x:+.2f}%"


def _format_entry(s: dict[str, Any]) -> str:
    """The entry line: entry price and unrealised P&L of the open position."""
    if s["entry_price"] is None:
        return "n/a (flat)" if not s["position"] else "n/a (no recorded fills built this position)"
    return (
        f"price {s['entry_price']:,.2f} since {s['entry_ts']}  unrealised {_signed(s['unrealised_pnl_quote'])} "
        "(at the last close, entry fees in, exit fee not deducted)"
    )


def _format_buy_hold(b: dict[str, Any] | None) -> str:
    """The buy-and-hold line: what the initial cash bought at the first decided close would be worth now."""
    if b is None:
        return "n/a (no decision yet)"
    fee = (
        "gross (no fee: no fills to read a rate from)"
        if b["fee_basis"] == "gross"
        else f"one buy fee at {b['commission']:.6g} (from the {b['fee_basis']})"
    )
    return (
        f"equity {b['equity']:,.2f}  profit {_signed(b['profit_quote'])} ({_signed_pct(b['pct'])})  "
        f"bought at the close {b['start_close']:,.2f} of {b['start_ts']}, {fee}"
    )


def _format_paused(p: dict[str, Any]) -> str:
    """The paused line: whether an operator paused new entries, since when and who."""
    if not p["paused"]:
        return "no"
    command = f" (command {p['command_id']})" if p.get("command_id") is not None else ""
    return f"yes since {p['since'] or '?'} by {p['by'] or '?'}{command}: no new entries, exits still go through"


def _format_guard(g: dict[str, Any]) -> str:
    """The learning guard's line: floors, the newest update's figures, the last rollback."""
    floors = "floors not recorded yet (written at the daemon's next start)"
    if g["min_entropy"] is not None:
        floors = f"floors entropy {g['min_entropy']} nats, p(trade) {g['min_trade_prob']}"
    last = g["last_update"]
    figures = ""
    if last and last["entropy_after"] is not None and last["max_trade_prob_after"] is not None:
        figures = (
            f"; update k={last['k']} ({last['status']}): entropy {last['entropy_after']:.4g} nats, "
            f"max p(trade) {last['max_trade_prob_after']:.4g}"
        )
    rb = g["last_rollback"]
    rollback = "; no rollback"
    if rb:
        candle = f" (candle {rb['candle']})" if rb["candle"] else ""
        rollback = f"; last rollback k={rb['k']} at {rb['at']}{candle}: {rb['reason']}"
    return floors + figures + rollback


def resume(path: Path, settings: Settings | None = None) -> dict[str, Any]:
    """Clear a halt (a `resume` event, notified when notifications are on); the new halt state. Works while the
    daemon runs: its next tick reads the cleared halt inside its own transaction."""
    store = open_state_for_update(path)
    try:
        with store.transaction():
            detail = clear_halt(store, Ledger.from_dict(store.get_meta("ledger")), {"by": "cli"})
            if detail is None:
                return {"halted": False, "changed": False}
            store.add_event("resume", detail)
            if settings is not None and settings.notify_urls and store.get_meta("mode") != "replay":
                context = {"mode": store.get_meta("mode"), "symbol": store.get_meta("symbol")}
                message = message_for("resume", detail, context)
                if message is not None:
                    # Sent by the running daemon's outbox sender (or at its next start).
                    store.enqueue_notification("resume", *message)
        previous = detail["previous"].get("reason")
        return {
            "halted": False,
            "changed": True,
            "previous_reason": previous,
            "peak_equity": detail["peak_equity_reset_to"],
        }
    finally:
        store.conn.close()


def main(args: argparse.Namespace) -> int:
    """Run `ritmo status` or `ritmo resume` (the subcommand name decides)."""
    if args.mode is not None and args.mode not in MODES:
        raise ConfigError(f"--mode {args.mode!r}: expected one of {', '.join(MODES)}")
    path = find_state_db(env_file=args.env_file, state_dir=args.state_dir, mode=args.mode, symbol=args.symbol)
    if args.command == "resume":
        result = resume(path, load_settings(env_file=args.env_file))
        if args.json:
            json.dump(result, sys.stdout)
            sys.stdout.write("\n")
        elif result["changed"]:
            print(f"halt cleared ({result['previous_reason']}); trading resumes at the next candle")
        else:
            print("not halted: nothing to resume")
        return 0
    store = open_state_readonly(path)
    try:
        status = collect_status(store)
    finally:
        store.conn.close()
    if args.json:
        json.dump(finite(status), sys.stdout, default=str, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(format_status(status))
    return 0
