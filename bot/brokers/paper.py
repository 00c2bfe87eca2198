"""The paper broker: executes decisions on a simulated ledger at the reference price, with slippage and
commission, through the same accounting as the backtest (docs/design.md §5)."""

from __future__ import annotations

from typing import Any

import structlog

from bot.brokers.base import (
    Decision,
    ExecutionResult,
    OrderIntent,
    OrderJournal,
    capped_target,
    checked_ref_price,
    client_order_id,
    reject_before_send,
)
from bot.exchange.rules import MarketRules
from strategies.accounting import Ledger, Side, rebalance

log = structlog.get_logger(__name__)


class PaperBroker:
    """Simulated execution at a reference price with slippage and commission, under the market's rules."""

    balance_check_each_tick = False

    def __init__(
        self,
        *,
        symbol: str,
        commission: float,
        slippage_bps: float = 0.0,
        rules: MarketRules | None = None,
        max_position_quote: float | None = None,
    ) -> None:
        if not 0 <= commission < 1:
            raise ValueError("commission must be in [0, 1)")
        if slippage_bps < 0:
            raise ValueError("slippage_bps must be >= 0")
        self.symbol = symbol
        self.commission = float(commission)
        self.slippage_bps = float(slippage_bps)
        self.rules = rules
        self.max_position_quote = max_position_quote

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
        """Size with `rebalance`, apply the market rules, record the intent, book the fill."""
        if target_position == ledger.position:
            return ExecutionResult("none", ref_price=ref_price, ref_source=ref_source)
        ref_price = checked_ref_price(ref_price)
        coid = client_order_id(self.symbol, decision.ts_ms, decision.order_action)
        target = capped_target(ledger, target_position, ref_price, self.max_position_quote)
        if target is None:
            return reject_before_send(
                journal, self.symbol, decision, coid, target_position, ref_price, 0.0, "buy", "equity is not positive"
            )
        _, _, fee_quote, traded, fill_price = rebalance(
            ledger.cash_quote, ledger.qty_base, target, ref_price, self.commission, self.slippage_bps
        )
        if traded == 0:
            # A position-state change with nothing to move (as Ledger.apply_action does).
            ledger.position = target_position
            return ExecutionResult("none", ref_price=ref_price, ref_source=ref_source)
        side: Side = "buy" if traded > 0 else "sell"
        qty = abs(traded)
        if self.rules is not None:
            qty = self.rules.floor_amount(qty)
            reason = self.rules.check(qty, fill_price)
            if reason is not None:
                return reject_before_send(
                    journal, self.symbol, decision, coid, target_position, ref_price, qty, side, reason
                )
            fee_quote = self.commission * qty * fill_price
        intent = OrderIntent(coid, self.symbol, decision.ts_ms, side, qty, ref_price, target_position, decision.reason)
        journal.record_intent(intent)
        fill = ledger.apply_fill(side, qty, fill_price, fee_quote, target_position)
        return ExecutionResult("filled", intent, (fill,), ref_price=ref_price, ref_source=ref_source)

    def note_close(self, close: float) -> None:
        """Paper fills at the reference price it is given: nothing to anchor."""

    def opening_ledger(self, initial_cash: float) -> tuple[Ledger, float]:
        """All cash: RITMO_PAPER_BALANCE in quote."""
        return Ledger(cash_quote=float(initial_cash)), float(initial_cash)

    def check_balances(self, ledger: Ledger) -> dict[str, Any] | None:
        """No exchange account behind a paper ledger."""
        return None

    def status(self) -> dict[str, Any] | None:
        """Paper has no exchange state to show."""
        return None

    def reconcile(self, journal: OrderJournal, pending: list[dict[str, Any]], ledger: Ledger) -> None:
        """Paper intents are written in the tick's own transaction, so none can be left pending."""
        for order in pending:
            # Only a database edited by hand could get here; never guess a fill.
            journal.set_order_status(order["client_order_id"], "unknown", "paper intent without a result")
            log.warning("order_unresolved", client_order_id=order["client_order_id"])
