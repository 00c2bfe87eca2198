"""Order execution behind one seam: the `Broker` base class; `PaperBroker` (bot/brokers/paper.py) and `LiveBroker`
(bot/brokers/live.py, and its `FuturesBroker`) implement it.

Flow of one decision (the daemon calls this inside the tick's transaction):
  decision + target position + reference price
    -> `Broker.execute`: nothing to do when the ledger is already there; else the reference price is checked,
       the client order id named, and the broker's `_trade` called with that `TradeRequest`, which
    -> sizes the order with the shared accounting (`strategies.accounting.rebalance`)
    -> applies the market's amount step, minimum amount and minimum notional (as the exchange would)
    -> records an `OrderIntent` through the `OrderJournal` (the state store) BEFORE executing it
    -> executes (paper: simulated at the reference price with slippage and commission)
    -> books the fill in the ledger with `Ledger.apply_fill` (the one place holdings move)
    -> returns an `ExecutionResult`; the daemon records the order status, fill, decision and ledger.

Paper writes its intent into the tick's open transaction (there is no outside world to get out of step
with). A LiveBroker calls `journal.commit()` after `record_intent` so the intent is durable before the
order is sent, sets the status to `sent`, then `filled`/`rejected`/`unknown`, and implements `reconcile`
(look pending intents up by client order id on start). Client order ids come from (symbol, candle time,
action, attempt) and fit Binance's `[A-Za-z0-9_-]{1,36}`.

Market rules (`MarketRules`: amount step, minimum amount and notional) live in bot/exchange/rules.py.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from bot.exchange.rules import CLIENT_ORDER_ID_RE
from strategies.accounting import Fill, Ledger, Side
from strategies.actions import ACTION_NAMES

log = structlog.get_logger(__name__)

# Reasons an order is placed: the policy's action, or the drawdown halt flattening the position.
REASON_CODES = {"HOLD": "H", "BUY": "B", "SELL": "S", "FLATTEN": "F"}


def client_order_id(symbol: str, ts_ms: int, action: str, attempt: int = 0) -> str:
    """Deterministic client order id from (symbol, candle open time, action, attempt); <= 36 chars."""
    sym = re.sub(r"[^A-Za-z0-9]", "", symbol)[:12]
    coid = f"rt-{sym}-{int(ts_ms) // 1000}-{REASON_CODES[action]}{int(attempt)}"
    if not CLIENT_ORDER_ID_RE.match(coid):
        raise ValueError(f"client order id {coid!r} does not match {CLIENT_ORDER_ID_RE.pattern}")
    return coid


@dataclass(frozen=True)
class Decision:
    """What the policy decided on one closed candle."""

    symbol: str
    ts_ms: int
    """Open time of the candle decided on (the decision is taken at its close)."""
    probs: tuple[float, float, float]
    """P(HOLD), P(BUY), P(SELL) for the current position state."""
    action: int
    position_before: int
    model_version: str
    reason: str = "policy"
    """policy, or halt (the drawdown guard flattening)."""

    @property
    def action_name(self) -> str:
        """HOLD, BUY or SELL."""
        return ACTION_NAMES[self.action]

    @property
    def order_action(self) -> str:
        """The action an order for this decision carries in its client id: FLATTEN for a halt or an operator's
        flatten command, else the action."""
        return "FLATTEN" if self.reason in ("halt", "flatten") else self.action_name


def checked_ref_price(ref_price: float) -> float:
    """The reference price as a float, refused unless positive and finite (brokers size orders with it)."""
    price = float(ref_price)
    if not (price > 0 and math.isfinite(price)):
        raise ValueError(f"reference price must be positive, got {ref_price!r}")
    return price


def capped_target(
    ledger: Ledger, target_position: int, ref_price: float, max_position_quote: float | None
) -> float | int | None:
    """The target as a fraction of equity with the notional cap applied; None if a position needs equity it lacks.

    Without a cap (or under it) the target is passed as is, so the sizing is bit for bit the backtest's
    (Ledger.apply_action); above the cap the fraction shrinks to cap / equity.
    """
    equity_ref = ledger.cash_quote + ledger.qty_base * ref_price
    if target_position != 0 and not equity_ref > 0:
        return None
    if max_position_quote is not None and target_position != 0 and equity_ref > max_position_quote:
        return target_position * (max_position_quote / equity_ref)
    return target_position


@dataclass(frozen=True)
class OrderIntent:
    """An order about to be executed, recorded before it is (crash safety for live)."""

    client_order_id: str
    symbol: str
    decision_ts_ms: int
    side: Side
    qty_base: float
    ref_price: float
    target_position: int
    reason: str
    attempt: int = 0


@dataclass(frozen=True)
class ExecutionResult:
    """What a broker did with one decision."""

    status: str
    """none (nothing to trade), filled, rejected, unknown (live: ambiguous, to reconcile) or paused (live: the
    circuit breaker is open or the exchange does not answer; nothing was sent or recorded)."""
    intent: OrderIntent | None = None
    fills: tuple[Fill, ...] = field(default_factory=tuple)
    reject_reason: str | None = None
    ref_price: float | None = None
    ref_source: str | None = None

    @property
    def fee_quote(self) -> float:
        """Fees of every fill, in quote."""
        return sum(f.fee_quote for f in self.fills)

    @property
    def fill_price(self) -> float | None:
        """Quantity-weighted average fill price, or None without fills."""
        qty = sum(f.qty_base for f in self.fills)
        return sum(f.qty_base * f.price for f in self.fills) / qty if qty > 0 else None


class OrderJournal(Protocol):
    """Where brokers record intents and order states (the state store)."""

    def record_intent(self, intent: OrderIntent) -> None:
        """Insert the intent with status `intent` (in the current transaction)."""
        ...

    def set_order_status(self, client_order_id: str, status: str, detail: str | None = None) -> None:
        """Move an order to sent, filled, rejected or unknown."""
        ...

    def commit(self) -> None:
        """Make everything recorded so far durable (live: before an order leaves the process)."""
        ...


@dataclass(frozen=True)
class TradeRequest:
    """A decision to move the ledger to `target_position` (not its current one), at a checked reference price,
    under the client order id its order will carry."""

    decision: Decision
    target_position: int
    ref_price: float
    ref_source: str
    coid: str

    def nothing(self) -> ExecutionResult:
        """The result of a position change that moves no quantity."""
        return ExecutionResult("none", ref_price=self.ref_price, ref_source=self.ref_source)


class Broker(ABC):
    """Executes a decision's target position and books it in the ledger (paper, live, futures)."""

    symbol: str
    max_position_quote: float | None
    balance_check_each_tick: bool = False
    """True: the daemon calls check_balances every tick, not only at start (futures: funding moves the wallet)."""

    def execute(
        self,
        decision: Decision,
        target_position: int,
        ledger: Ledger,
        ref_price: float,
        journal: OrderJournal,
        *,
        ref_source: str = "",
    ) -> ExecutionResult:
        """Trade the ledger to `target_position`; mutates `ledger` by the fills it books."""
        if target_position == ledger.position:
            return ExecutionResult("none", ref_price=ref_price, ref_source=ref_source)
        coid = client_order_id(self.symbol, decision.ts_ms, decision.order_action)
        request = TradeRequest(decision, target_position, checked_ref_price(ref_price), ref_source, coid)
        return self._trade(request, ledger, journal)

    @abstractmethod
    def _trade(self, req: TradeRequest, ledger: Ledger, journal: OrderJournal) -> ExecutionResult:
        """Size, check, record the intent of and execute one position change; book its fills in `ledger`."""

    def _capped_target(self, req: TradeRequest, ledger: Ledger) -> float | int | None:
        """The request's target as a fraction of equity under the notional cap (see `capped_target`)."""
        return capped_target(ledger, req.target_position, req.ref_price, self.max_position_quote)

    def _reject(self, req: TradeRequest, journal: OrderJournal, qty: float, side: Side, reason: str) -> ExecutionResult:
        """Record the intent of an order refused before it was sent; `rejected` (the daemon records the status)."""
        d = req.decision
        intent = OrderIntent(req.coid, self.symbol, d.ts_ms, side, qty, req.ref_price, req.target_position, d.reason)
        journal.record_intent(intent)
        log.warning(
            "order_rejected",
            client_order_id=req.coid,
            side=side,
            qty_base=qty,
            ref_price=req.ref_price,
            target_position=req.target_position,
            reason=reason,
        )
        return ExecutionResult("rejected", intent, (), reason, req.ref_price)

    @abstractmethod
    def reconcile(self, journal: OrderJournal, pending: list[dict[str, Any]], ledger: Ledger) -> None:
        """Resolve orders left `intent`/`sent`/`unknown` by a crash (live looks them up on the exchange)."""

    @abstractmethod
    def note_close(self, close: float) -> None:
        """The decision candle's close, given every tick before `execute` (live: the fat-finger anchor)."""

    @abstractmethod
    def opening_ledger(self, initial_cash: float) -> tuple[Ledger, float]:
        """A new state's ledger and its equity in quote (paper: `initial_cash`; live: the exchange's balances)."""

    @abstractmethod
    def check_balances(self, ledger: Ledger) -> dict[str, Any] | None:
        """Compare with the exchange's balances and adopt them (live); None when there is nothing to check."""

    @abstractmethod
    def status(self) -> dict[str, Any] | None:
        """JSON-able broker state for `ritmo status` (live: the circuit breaker), or None."""
