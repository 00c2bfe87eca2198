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
import math
import sys
from pathlib import Path
from typing import Any

from bot.clock import wall_ms
from bot.daemon.state import StateStore, open_state_for_update, open_state_readonly
from bot.errors import ConfigError
from bot.settings import MODES, load_settings, state_db_path
from strategies.accounting import Ledger
from strategies.actions import ACTION_NAMES
from strategies.candles import iso_utc


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo status` and `ritmo resume`."""
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--state-dir", type=Path, default=None, help="state directory (default RITMO_STATE_DIR)")
    p.add_argument("--mode", choices=MODES, default=None, help="state of this mode (default RITMO_MODE)")
    p.add_argument("--symbol", default=None, help="state of this symbol (default RITMO_SYMBOL)")
    p.add_argument("--env-file", default=".env", help="settings file (default .env; the environment wins)")


def resolve_db_path(args: argparse.Namespace) -> Path:
    """The state database these arguments and the settings point at."""
    settings = load_settings(env_file=args.env_file)
    changes: dict[str, Any] = {}
    if args.state_dir is not None:
        changes["state_dir"] = args.state_dir
    if args.mode is not None:
        changes["mode"] = args.mode
    if args.symbol is not None:
        changes["symbol"] = args.symbol
    if changes:
        import dataclasses

        settings = dataclasses.replace(settings, **changes)
    path = state_db_path(settings)
    if args.mode is None and not path.exists() and args.state_dir is not None:
        # A state dir with exactly one database (e.g. a replay's) needs no --mode/--symbol.
        found = sorted(Path(args.state_dir).glob("*.sqlite"))
        if len(found) == 1:
            return found[0]
    return path


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def collect_status(store: StateStore) -> dict[str, Any]:
    """Everything `ritmo status` reports, as a JSON-able dict."""
    meta = store.all_meta()
    ledger = Ledger.from_dict(meta["ledger"]) if "ledger" in meta else None
    last_candle = meta.get("last_candle") or {}
    initial = meta.get("initial_cash")
    equity = None
    if ledger is not None:
        equity = ledger.equity(last_candle["close"]) if last_candle.get("close") else ledger.cash_quote
    last = store.last_decision()
    last_decision = None
    if last is not None:
        last_decision = {
            "ts": iso_utc(last["ts_ms"]),
            "ts_ms": last["ts_ms"],
            "status": last["status"],
            "action": ACTION_NAMES[last["action"]] if last["action"] is not None else None,
            "probs": (
                {"hold": last["p_hold"], "buy": last["p_buy"], "sell": last["p_sell"]}
                if last["p_hold"] is not None
                else None
            ),
            "position_before": last["position_before"],
            "position_after": last["position_after"],
            "fee_quote": last["fee_quote"],
            "reason": last["reason"],
            "latency_ms": last["latency_ms"],
        }
    episode = store.open_episode()
    steps_per_episode = meta.get("episode_steps")
    counts = dict(store.conn.execute("SELECT status, COUNT(*) FROM episodes GROUP BY status").fetchall())
    decisions = dict(store.conn.execute("SELECT status, COUNT(*) FROM decisions GROUP BY status").fetchall())
    rhythm = meta.get("rhythm") or {}
    halt = meta.get("halt") or {"halted": False}
    model = meta.get("model") or {}
    return {
        "state": str(store.path),
        "mode": meta.get("mode"),
        "symbol": meta.get("symbol"),
        "position_mode": meta.get("position_mode"),
        "position": ledger.position if ledger else None,
        "qty_base": ledger.qty_base if ledger else None,
        "cash_quote": ledger.cash_quote if ledger else None,
        "equity": equity,
        "initial_cash": initial,
        "profit_quote": (equity - initial) if equity is not None and initial is not None else None,
        "fees_quote": ledger.fees_quote if ledger else None,
        "n_trades": ledger.n_trades if ledger else None,
        "peak_equity": meta.get("peak_equity"),
        "last_candle": (
            {"ts": iso_utc(last_candle["ts_ms"]), "ts_ms": last_candle["ts_ms"], "close": last_candle.get("close")}
            if last_candle
            else None
        ),
        "decisions": decisions,
        "last_decision": last_decision,
        "episode": {
            "id": episode["id"] if episode else None,
            "step": episode["steps"] if episode else 0,
            "steps": steps_per_episode,
            "settled": episode["settled"] if episode else 0,
            "counts": counts,
        },
        "rhythm": {"k": rhythm.get("k"), "macro_updates": rhythm.get("macro_updates")},
        "updates": {"learned": store.update_count("learned"), "rejected": store.update_count("rejected")},
        "learning_guard": _guard_status(store, meta.get("learning_guard") or {}),
        "model": {
            "version": model.get("version"),
            "checkpoint_path": model.get("checkpoint_path"),
            "source": model.get("source"),
            "objective": model.get("objective"),
            "decide_every": meta.get("decide_every", 1),
        },
        "halt": {
            "halted": bool(halt.get("halted")),
            "reason": halt.get("reason"),
            "since": iso_utc(halt["since_ts_ms"]) if halt.get("since_ts_ms") else None,
        },
        "seed": meta.get("seed"),
        "replay": meta.get("replay"),
        "broker": _broker_status(meta.get("broker")),
        "balance_check": meta.get("balance_check"),
        "orders": {
            "by_status": dict(store.conn.execute("SELECT status, COUNT(*) FROM orders GROUP BY status").fetchall()),
            "pending": [
                {k: o[k] for k in ("client_order_id", "side", "qty_base", "status", "detail")}
                for o in store.pending_orders()
            ],
        },
    }


def _guard_status(store: StateStore, floors: dict[str, Any]) -> dict[str, Any]:
    """The learning guard: its floors, how many updates it rolled back, the last rollback, the newest figures."""
    event = store.last_event("update_rolled_back")
    last_rollback = None
    if event is not None:
        detail = event["detail"]
        last_rollback = {
            "k": detail.get("k"),
            "episode_id": detail.get("episode_id"),
            "reason": detail.get("reason"),
            "at": iso_utc(event["at_ms"]),
            "candle": iso_utc(event["candle_ts_ms"]) if event["candle_ts_ms"] is not None else None,
        }
    row = store.last_update()
    last_update = None
    if row is not None:
        last_update = {
            "k": row["k"],
            "status": row["status"],
            "method": row["method"],
            "entropy_after": row["entropy_after"],
            "max_trade_prob_after": row["trade_prob_after"],
        }
    return {
        "min_entropy": floors.get("min_entropy"),
        "min_trade_prob": floors.get("min_trade_prob"),
        "rolled_back": store.update_count("rolled_back"),
        "last_rollback": last_rollback,
        "last_update": last_update,
    }


def _broker_status(broker: dict[str, Any] | None) -> dict[str, Any] | None:
    """The live broker's circuit breaker, as last written by the daemon (None for paper and replay)."""
    if not broker:
        return None
    breaker = dict(broker.get("breaker") or {})
    for key in ("since_ms", "half_opens_at_ms"):
        if breaker.get(key):
            breaker[key.removesuffix("_ms")] = iso_utc(int(breaker[key]))
    return {**broker, "breaker": breaker}


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
        f"equity       {money(s['equity'])}  profit {money(s['profit_quote'])} (net of fees)  "
        f"fees {money(s['fees_quote'])}  trades {s['n_trades']}",
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


def resume(path: Path) -> dict[str, Any]:
    """Clear a halt (recorded as an event); returns the new halt state. Works while the daemon runs."""
    store = open_state_for_update(path)
    try:
        with store.transaction():
            halt = store.get_meta("halt") or {"halted": False}
            if not halt.get("halted"):
                return {"halted": False, "changed": False}
            ledger = Ledger.from_dict(store.get_meta("ledger"))
            last = store.get_meta("last_candle") or {}
            equity = ledger.equity(last["close"]) if last.get("close") else ledger.cash_quote
            new = {"halted": False, "resumed_at_ms": wall_ms(), "previous_reason": halt.get("reason")}
            store.set_meta_many({"halt": new, "peak_equity": equity})
            store.add_event("resume", {"previous": halt, "peak_equity_reset_to": equity})
        return {"halted": False, "changed": True, "previous_reason": halt.get("reason"), "peak_equity": equity}
    finally:
        store.conn.close()


def main(args: argparse.Namespace) -> int:
    """Run `ritmo status` or `ritmo resume` (the subcommand name decides)."""
    if args.mode is not None and args.mode not in MODES:
        raise ConfigError(f"--mode {args.mode!r}: expected one of {', '.join(MODES)}")
    path = resolve_db_path(args)
    if args.command == "resume":
        result = resume(path)
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
        json.dump({k: _finite(v) for k, v in status.items()}, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(format_status(status))
    return 0
