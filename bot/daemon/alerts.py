"""What an operator is told: an event of the daemon turned into a notification's title, body and level (pure).

`message_for(kind, detail, context)` maps the events the daemon records (and each fill) to
`(title, body, level)`, or None for events that are not worth a message (state_created, mark, ...). Titles
start with the mode and symbol, so one chat can follow several daemons: "ritmo paper BTC/USDT: halt".
Levels are Apprise's notify types: info, success, warning, failure. Nothing here does I/O; the daemon
writes the result to the outbox in the transaction of the event, and bot/daemon/outbox.py sends it
(docs/design.md §13).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

Message = tuple[str, str, str]
"""(title, body, level) of one notification."""

LEVELS = ("info", "success", "warning", "failure")
POSITION_NAMES = {-1: "short", 0: "flat", 1: "long"}


def title_prefix(context: Mapping[str, Any]) -> str:
    """'ritmo MODE SYMBOL': the start of every title."""
    return f"ritmo {context.get('mode', '?')} {context.get('symbol', '?')}"


def message_for(kind: str, detail: Mapping[str, Any], context: Mapping[str, Any]) -> Message | None:
    """The notification of one event (title, body, level), or None when the event is not notified."""
    render = _RENDERERS.get(kind)
    if render is None:
        return None
    out = render(detail, context)
    if out is None:
        return None
    what, body, level = out
    assert level in LEVELS, level
    return f"{title_prefix(context)}: {what}", body, level


# --- one renderer per event kind: (what, body, level) or None ---------------------------------------------

_Rendered = tuple[str, str, str] | None


def _trade(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    side = str(d.get("side", "?"))
    qty, price = d.get("qty_base"), d.get("price")
    base = str(c.get("symbol", "")).split("/")[0] or "base"
    lines = [
        f"{side} {_num(qty)} {base} at {_num(price)}",
        f"fee: {_num(d.get('fee_quote'))}",
        f"position: {_pos(d.get('position_before'))} -> {_pos(d.get('position_after'))}",
    ]
    if d.get("reason") not in (None, "policy"):
        lines.append(f"reason: {d['reason']}")
    if d.get("equity") is not None:
        lines.append(f"equity: {_num(d['equity'])}")
    if d.get("candle_ts_ms") is not None:
        lines.append(f"candle: {_iso(d['candle_ts_ms'])}")
    return f"{side} {_num(qty)} {base} @ {_num(price)}", "\n".join(lines), "info"


def _halt(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    lines = [
        str(d.get("reason", "drawdown guard")),
        f"equity: {_num(d.get('equity'))}, peak: {_num(d.get('peak_equity'))}",
        "The position is flattened and trading stops until the halt is cleared (ritmo resume, or clear halt).",
    ]
    return "HALTED", "\n".join(lines), "failure"


def _resume(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    previous = d.get("previous") or {}
    by = d.get("by")
    lines = [
        f"previous halt: {previous.get('reason', '?')}",
        f"peak equity reset to {_num(d.get('peak_equity_reset_to'))}",
    ]
    if by:
        lines.append(f"by: {by}")
    return "halt cleared", "\n".join(lines), "success"


def _breaker_open(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    lines = [
        f"{d.get('failures', '?')} exchange failures in a row: trading paused",
        f"half-opens at: {_iso(d.get('half_opens_at_ms'))}",
    ]
    if d.get("last_error"):
        lines.append(f"last error: {d['last_error']}")
    return "circuit breaker OPEN", "\n".join(lines), "warning"


def _breaker_closed(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    return "circuit breaker closed", f"the exchange answers again: trading resumes (trips: {d.get('trips')})", "success"


def _ledger_adjusted(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    lines = [
        "The exchange's balances differ from the ledger beyond dust: the exchange wins.",
        f"base: {_num(d.get('ledger_qty_base'))} -> {_num(d.get('exchange_qty_base'))}",
        f"quote: {_num(d.get('ledger_cash_quote'))} -> {_num(d.get('exchange_cash_quote'))}",
        f"position: {_pos(d.get('position_before'))} -> {_pos(d.get('position_after'))}",
    ]
    return "ledger adjusted", "\n".join(lines), "warning"


def _auth_failure(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    body = f"{d.get('error', 'authentication failed')}\nritmo exited {d.get('exit_code', 77)}: check the API key."
    return "authentication FAILED", body, "failure"


def _start(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    lines = [f"model: {d.get('model_version', '?')}"]
    if d.get("equity") is not None:
        lines.append(f"equity: {_num(d['equity'])}, position: {_pos(d.get('position'))}")
    for key in ("halted", "paused"):
        if d.get(key):
            lines.append(f"{key}: yes")
    return "started", "\n".join(lines), "info"


def _stop(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    code = int(d.get("exit_code") or 0)
    lines = [f"reason: {d.get('reason', '?')}", f"exit code: {code}"]
    if d.get("equity") is not None:
        lines.append(f"equity: {_num(d['equity'])}, position: {_pos(d.get('position'))}")
    return "stopped", "\n".join(lines), "info" if code == 0 else "warning"


def _rolled_back(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    lines = [
        f"update k={d.get('k')} (episode {d.get('episode_id')}) rolled back: {d.get('reason')}",
        f"entropy: {_num(d.get('entropy_before'))} -> {_num(d.get('entropy_after'))}",
        f"max trade probability: {_num(d.get('max_trade_prob_before'))} -> {_num(d.get('max_trade_prob_after'))}",
        "The previous model keeps trading.",
    ]
    return "online update rolled back", "\n".join(lines), "warning"


def _command(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    kind, status = str(d.get("kind", "?")), str(d.get("status", "?"))
    result = d.get("result") or {}
    if kind == "clear_halt" and status == "applied" and result.get("changed"):
        return None  # the `resume` event of the same transaction says it ("halt cleared")
    lines = [f"command #{d.get('id')} {kind} by {d.get('requested_by', '?')}: {status}"]
    lines += [f"{k}: {v}" for k, v in result.items()]
    return f"{kind} {status}", "\n".join(lines), "info" if status == "applied" else "warning"


def _daily_summary(d: Mapping[str, Any], c: Mapping[str, Any]) -> _Rendered:
    pnl, pct = d.get("pnl_quote"), d.get("pnl_pct")
    sign = "+" if isinstance(pnl, int | float) and pnl >= 0 else ""
    pct_text = f" ({sign}{pct:.2f}%)" if isinstance(pct, int | float) else ""
    lines = [
        f"P&L: {sign}{_num(pnl)}{pct_text}",
        f"trades: {d.get('trades', 0)}, fees: {_num(d.get('fees_quote'))}",
        f"equity: {_num(d.get('equity_start'))} -> {_num(d.get('equity'))}",
        f"position: {_pos(d.get('position'))}",
    ]
    return f"daily summary {d.get('day', '?')}", "\n".join(lines), "info"


_RENDERERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], _Rendered]] = {
    "trade": _trade,
    "halt": _halt,
    "resume": _resume,
    "breaker_open": _breaker_open,
    "breaker_closed": _breaker_closed,
    "ledger_adjusted": _ledger_adjusted,
    "auth_failure": _auth_failure,
    "start": _start,
    "stop": _stop,
    "update_rolled_back": _rolled_back,
    "command": _command,
    "daily_summary": _daily_summary,
}
NOTIFIED_KINDS = frozenset(_RENDERERS)
"""Event kinds that can produce a notification."""


# --- formatting -------------------------------------------------------------------------------------------


def _num(x: Any) -> str:
    """A number for a human: 2 decimals from 100 on, 6 significant digits below; '?' when missing."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return "?" if x is None else str(x)
    if abs(x) >= 100:
        return f"{x:,.2f}"
    return f"{x:.6g}"


def _pos(p: Any) -> str:
    return POSITION_NAMES.get(p, "?") if isinstance(p, int) else "?"


def _iso(ts_ms: Any) -> str:
    if not isinstance(ts_ms, int | float):
        return "?"
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


__all__ = ["LEVELS", "NOTIFIED_KINDS", "Message", "message_for", "title_prefix"]
