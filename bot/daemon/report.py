"""What a state database says, for `ritmo status`, `ritmo trades` and `ritmo serve` (docs/design.md §9, §13).

Read-only: every function takes an open `StateStore` (or its rows) and returns JSON-able values; nothing here
writes. The figures (entry price, unrealised P&L, today's and the last 7 days' P&L, buy-and-hold since the
start) are defined in the README's "Reports" section.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bot.daemon.halt import marked_equity
from bot.daemon.state import StateStore
from bot.settings import load_settings, state_db_path
from strategies.accounting import Ledger
from strategies.actions import ACTION_NAMES, BUY
from strategies.candles import CANDLE_MS, iso_utc
from strategies.trade_stats import MatchedFills, match_fills

DAY_MS = 86_400_000


def find_state_db(
    *, env_file: str | None, state_dir: Path | None = None, mode: str | None = None, symbol: str | None = None
) -> Path:
    """The state database the settings point at, with the command line's state dir, mode and symbol applied.

    A state dir holding exactly one database (a replay's, say) needs no mode or symbol.
    """
    import dataclasses

    settings = load_settings(env_file=env_file)
    changes = {k: v for k, v in {"state_dir": state_dir, "mode": mode, "symbol": symbol}.items() if v is not None}
    if changes:
        settings = dataclasses.replace(settings, **changes)
    path = state_db_path(settings)
    if mode is None and not path.exists() and state_dir is not None:
        found = sorted(Path(state_dir).glob("*.sqlite"))
        if len(found) == 1:
            return found[0]
    return path


def finite(value: Any) -> Any:
    """The value with every non-finite float (NaN, inf) replaced by None, recursively: JSON has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def collect_status(store: StateStore) -> dict[str, Any]:
    """Everything `ritmo status` reports, as a JSON-able dict."""
    meta = store.all_meta()
    ledger = Ledger.from_dict(meta["ledger"]) if "ledger" in meta else None
    last_candle = meta.get("last_candle") or {}
    initial = meta.get("initial_cash")
    equity = None
    if ledger is not None:
        equity = marked_equity(ledger, last_candle)
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
    close = last_candle.get("close")
    fills = store.fills()
    matched = match_state_fills(fills)
    performance = _performance(store, equity, initial, last_candle.get("ts_ms"))
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
        **_position_pnl(ledger, matched, close),
        **performance,
        "buy_hold": _buy_hold(store, meta, fills, initial, close),
        "paused": _paused_status(meta.get("paused")),
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


def match_state_fills(fills: list[dict[str, Any]]) -> MatchedFills:
    """The fills table matched into lots and round trips; a fill's time is its decision candle's close."""
    return match_fills(
        [int(f["decision_ts_ms"]) + CANDLE_MS for f in fills],
        [f["side"] for f in fills],
        [f["qty_base"] for f in fills],
        [f["price"] for f in fills],
        [f["fee_quote"] for f in fills],
        [f["position_before"] for f in fills],
        [f["position_after"] for f in fills],
    )


def _position_pnl(ledger: Ledger | None, matched: MatchedFills, close: float | None) -> dict[str, Any]:
    """Entry price and unrealised P&L of the open position, and the P&L realised by closed lots.

    The entry price is the quantity-weighted average of the fills that built the position since it was last
    flat or flipped (strategies/trade_stats.py). Unrealised P&L = direction x (last close - entry) x the
    ledger's quantity - the lot's entry fees: marked like the equity (the entry fee counted, no exit fee
    deducted), so profit = realised + unrealised when nothing moved the ledger outside its fills. None when
    flat, or when the position was not built by fills this state recorded (a live state adopting a holding).
    """
    realised = sum((f.realised_pnl_quote for f in matched.fills if f.realised_pnl_quote is not None), 0.0)
    lot = matched.open_lot
    held = ledger is not None and ledger.position != 0
    if not held or lot is None or lot.direction != (1 if ledger.position > 0 else -1):  # type: ignore[union-attr]
        return {
            "entry_price": None,
            "entry_ts": None,
            "entry_fees_quote": None,
            "unrealised_pnl_quote": None,
            "realised_pnl_quote": realised,
        }
    assert ledger is not None
    unrealised = None
    if close:
        unrealised = lot.direction * (float(close) - lot.entry_price) * abs(ledger.qty_base) - lot.entry_fees_quote
    return {
        "entry_price": lot.entry_price,
        "entry_ts": iso_utc(lot.entry_ts_ms),
        "entry_fees_quote": lot.entry_fees_quote,
        "unrealised_pnl_quote": unrealised,
        "realised_pnl_quote": realised,
    }


def _pct(now: float | None, then: float | None) -> float | None:
    """(now / then - 1) in percent."""
    if now is None or then is None or not then > 0:
        return None
    return (now / then - 1.0) * 100.0


def _equity_at(store: StateStore, instant_ms: int) -> float | None:
    """Equity marked at the last close at or before `instant_ms` (decisions' equity_after), if any."""
    row = store.conn.execute(
        "SELECT equity_after FROM decisions WHERE ts_ms <= ? AND equity_after IS NOT NULL ORDER BY ts_ms DESC LIMIT 1",
        (instant_ms - CANDLE_MS,),
    ).fetchone()
    return None if row is None else float(row[0])


def _performance(
    store: StateStore, equity: float | None, initial: float | None, last_ts_ms: int | None
) -> dict[str, Any]:
    """P&L in % since the start, today's and the last 7 days' P&L in quote and %.

    "Today" is the UTC day of the last candle's open time (the state's clock, not the wall clock: a replay
    reads the same at any hour, and one that ends at midnight reports its last whole day); its P&L is the
    equity now (marked at the last close) minus the equity marked at the last close at or before 00:00 UTC
    that day. The 7 days are today and the 6 days before it, from 00:00 UTC six days before today. A state
    that started inside the window compares with its initial cash.
    """
    out: dict[str, Any] = {"pnl_pct": _pct(equity, initial)}
    for name, days_back in (("today", 0), ("7d", 6)):
        since = quote = pct = None
        if last_ts_ms is not None and equity is not None:
            start_ms = int(last_ts_ms) // DAY_MS * DAY_MS - days_back * DAY_MS
            then = _equity_at(store, start_ms)
            then = initial if then is None else then
            since = iso_utc(start_ms)
            if then is not None:
                quote, pct = equity - then, _pct(equity, then)
        out[f"pnl_{name}_quote"] = quote
        out[f"pnl_{name}_pct"] = pct
        out[f"pnl_{name}_since"] = since
    return out


def buy_hold_ledger(initial_cash: float, start_close: float, commission: float) -> Ledger:
    """The buy-and-hold comparison's ledger: the initial cash bought at `start_close` with one buy fee."""
    ledger = Ledger(cash_quote=initial_cash)
    ledger.apply_action(BUY, start_close, commission, 0.0, "long_only")
    return ledger


def _buy_hold(
    store: StateStore, meta: dict[str, Any], fills: list[dict[str, Any]], initial: float | None, close: float | None
) -> dict[str, Any] | None:
    """Buy-and-hold since the start: the initial cash bought at the close of the first decided candle, marked
    at the last close, with one buy fee through the shared accounting (docs/design.md §5).

    The fee rate is the state's commission when recorded (meta `commission`), else the effective rate of its
    fills (fees / notional), else none (gross: the state has paid no fee either). None before the first decision.
    """
    if initial is None or not close:
        return None
    row = store.conn.execute(
        "SELECT ts_ms, close FROM decisions WHERE close IS NOT NULL AND status != 'skipped' ORDER BY ts_ms LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    start_ts_ms, start_close = int(row[0]), float(row[1])
    commission, basis = meta.get("commission"), "settings"
    if commission is None:
        notional = sum(f["notional_quote"] for f in fills)
        fees = sum(f["fee_quote"] for f in fills)
        commission, basis = (fees / notional, "fills") if notional > 0 else (0.0, "gross")
    ledger = buy_hold_ledger(float(initial), start_close, float(commission))
    equity = ledger.equity(float(close))
    return {
        "start_ts": iso_utc(start_ts_ms + CANDLE_MS),
        "start_close": start_close,
        "commission": float(commission),
        "fee_basis": basis,
        "fee_quote": ledger.fees_quote,
        "equity": equity,
        "profit_quote": equity - float(initial),
        "pct": _pct(equity, float(initial)),
    }


def _paused_status(paused: dict[str, Any] | None) -> dict[str, Any]:
    """Whether new entries are paused (meta `paused`, written by the daemon when it applies a command)."""
    paused = paused or {}
    at_ms = paused.get("at_ms")
    return {
        "paused": bool(paused.get("paused")),
        "by": paused.get("by"),
        "since": iso_utc(int(at_ms)) if at_ms else None,
        "at_ms": at_ms,
        "command_id": paused.get("command_id"),
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
