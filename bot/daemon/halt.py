"""Clearing a latched drawdown halt: the one rule `ritmo resume` and the daemon's `clear_halt` command share
(docs/design.md §8, §13)."""

from __future__ import annotations

from typing import Any

from bot.clock import wall_ms
from bot.daemon.state import StateStore
from strategies.accounting import Ledger


def marked_equity(ledger: Ledger, last_candle: dict[str, Any] | None) -> float:
    """The ledger's equity at the last candle's close (its cash when no candle was marked yet)."""
    close = (last_candle or {}).get("close")
    return ledger.equity(close) if close else ledger.cash_quote


def clear_halt(store: StateStore, ledger: Ledger, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Clear the halt in the caller's transaction, the peak equity reset to the current equity (else the same
    drawdown would halt again at once); the `resume` event's detail, or None when not halted."""
    halt = store.get_meta("halt") or {"halted": False}
    if not halt.get("halted"):
        return None
    equity = marked_equity(ledger, store.get_meta("last_candle"))
    new = {"halted": False, "resumed_at_ms": wall_ms(), "previous_reason": halt.get("reason")}
    store.set_meta_many({"halt": new, "peak_equity": equity})
    return {"previous": halt, "peak_equity_reset_to": equity, **(extra or {})}
