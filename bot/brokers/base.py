"""Order execution behind one seam: the `Broker` protocol; `PaperBroker` (bot/brokers/paper.py) and `LiveBroker`
(bot/brokers/live.py) implement it.

Flow of one decision (the daemon calls this inside the tick's transaction):
  decision + target position + reference price
    -> broker sizes the order with the shared accounting (`strategies.accounting.rebalance`)
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

Market rules: ccxt reports Binance amounts in TICK_SIZE precision mode (`market['precision']['amount']` is
the step, e.g. 1e-05), other exchanges in DECIMAL_PLACES (the number of decimals). Amounts are floored
toward zero to the step, as ccxt's `amount_to_precision` (TRUNCATE) does before an order is sent. In
replay no market rules apply unless given, so a replay books exactly what the backtest books.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Protocol

import structlog

from bot.exchange.rules import CLIENT_ORDER_ID_RE
from strategies.accounting import Fill, Ledger, Side
from strategies.actions import ACTION_NAMES

log = structlog.get_logger(__name__)

# ccxt's precision modes (ccxt.DECIMAL_PLACES, SIGNIFICANT_DIGITS, TICK_SIZE); bot/exchange/client.py is the only
# ccxt importer, so the values are mirrored here and a test holds them equal to ccxt's.
DECIMAL_PLACES = 2
SIGNIFICANT_DIGITS = 3
TICK_SIZE = 4

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
        """The action an order for this decision carries in its client id: FLATTEN for a halt, else the action."""
        return "FLATTEN" if self.reason == "halt" else self.action_name


def checked_ref_price(ref_price: float) -> float:
    """The reference price as a float, refused unless positive and finite (brokers size orders with it)."""
    price = float(ref_price)
    if not (price > 0 and math.isfinite(price)):
        raise ValueError(f"reference price must be positive, got {ref_price!r}")
    return price


def reject_before_send(
    journal: OrderJournal,
    symbol: str,
    decision: Decision,
    coid: str,
    target_position: int,
    ref_price: float,
    qty: float,
    side: Side,
    reason: str,
) -> ExecutionResult:
    """Record the intent of an order refused before it was sent; `rejected` (the daemon records the status)."""
    intent = OrderIntent(coid, symbol, decision.ts_ms, side, qty, ref_price, target_position, decision.reason)
    journal.record_intent(intent)
    log.warning(
        "order_rejected",
        client_order_id=coid,
        side=side,
        qty_base=qty,
        ref_price=ref_price,
        target_position=target_position,
        reason=reason,
    )
    return ExecutionResult("rejected", intent, (), reason, ref_price)


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
class MarketRules:
    """The exchange's order-size rules for one market (from ccxt market info)."""

    amount_step: float | None = None
    """Smallest increment of the base amount; amounts are floored to it."""
    min_amount: float | None = None
    max_amount: float | None = None
    min_notional: float | None = None
    """Minimum amount * price in quote (Binance NOTIONAL / MIN_NOTIONAL)."""

    @classmethod
    def from_ccxt_market(cls, market: dict[str, Any], precision_mode: int = TICK_SIZE) -> MarketRules:
        """Read ccxt's `precision` and `limits` of a market under the exchange's precisionMode."""
        precision = (market.get("precision") or {}).get("amount")
        limits = market.get("limits") or {}
        step: float | None
        if precision is None:
            step = None
        elif precision_mode == TICK_SIZE:
            step = float(precision)
        elif precision_mode == DECIMAL_PLACES:
            step = 10.0 ** -int(precision)
        else:
            # SIGNIFICANT_DIGITS has no fixed step; no exchange we support uses it for amounts.
            raise ValueError(f"unsupported ccxt precision mode {precision_mode} for amounts")

        def limit(kind: str, bound: str) -> float | None:
            value = (limits.get(kind) or {}).get(bound)
            return float(value) if value not in (None, 0) else None

        max_amount = limit("amount", "max")
        # Binance's MARKET_LOT_SIZE (ccxt: limits.market) caps market orders below LOT_SIZE's maximum.
        market_max = limit("market", "max")
        if market_max is not None:
            max_amount = market_max if max_amount is None else min(max_amount, market_max)
        return cls(step, limit("amount", "min"), max_amount, limit("cost", "min"))

    def floor_amount(self, qty_base: float) -> float:
        """qty truncated toward zero to the amount step, exactly as ccxt's amount_to_precision (TRUNCATE).

        Like ccxt, the decimal is the float's shortest repr, so paper and live agree on every amount. (A held
        quantity is always a whole number of steps already, so closing a position loses nothing to float noise.)
        """
        if self.amount_step is None:
            return qty_base
        step = Decimal(repr(self.amount_step))
        q = Decimal(repr(float(qty_base)))
        return float((q / step).to_integral_value(rounding=ROUND_FLOOR) * step)

    def check(self, qty_base: float, price: float) -> str | None:
        """Why the exchange would refuse this order (None if it would accept it)."""
        if qty_base <= 0:
            return f"amount below the amount step {self.amount_step}"
        if self.min_amount is not None and qty_base < self.min_amount:
            return f"amount {qty_base} below the minimum amount {self.min_amount} (LOT_SIZE)"
        if self.max_amount is not None and qty_base > self.max_amount:
            return f"amount {qty_base} above the maximum amount {self.max_amount} (LOT_SIZE)"
        if self.min_notional is not None and qty_base * price < self.min_notional:
            return f"notional {qty_base * price:.8g} below the minimum notional {self.min_notional} (NOTIONAL)"
        return None


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


class Broker(Protocol):
    """Executes a decision's target position and books it in the ledger."""

    balance_check_each_tick: bool
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
        ...

    def reconcile(self, journal: OrderJournal, pending: list[dict[str, Any]], ledger: Ledger) -> None:
        """Resolve orders left `intent`/`sent`/`unknown` by a crash (live looks them up on the exchange)."""
        ...

    def note_close(self, close: float) -> None:
        """The decision candle's close, given every tick before `execute` (live: the fat-finger anchor)."""
        ...

    def opening_ledger(self, initial_cash: float) -> tuple[Ledger, float]:
        """A new state's ledger and its equity in quote (paper: `initial_cash`; live: the exchange's balances)."""
        ...

    def check_balances(self, ledger: Ledger) -> dict[str, Any] | None:
        """Compare with the exchange's balances and adopt them (live); None when there is nothing to check."""
        ...

    def status(self) -> dict[str, Any] | None:
        """JSON-able broker state for `ritmo status` (live: the circuit breaker), or None."""
        ...


