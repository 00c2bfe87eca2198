"""The paper broker: executes decisions on a simulated ledger at the reference price, with slippage and
commission, through the same accounting as the backtest (docs/design.md §5)."""

from __future__ import annotations

from typing import Any

import structlog

from bot.brokers.base import Broker, ExecutionResult, OrderIntent, OrderJournal, TradeRequest
from bot.exchange.rules import MarketRules
from strategies.accounting import Ledger, Side, rebalance

log = structlog.get_logger(__name__)


class PaperBroker(Broker):
    """Simulated execution at a reference price with slippage and commission, under the market's rules."""

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

    def _trade(self, req: TradeRequest, ledger: Ledger, journal: OrderJournal) -> ExecutionResult:
        """Size with `rebalance`, apply the market rules, record the intent, book the fill."""
        target = self._capped_target(req, ledger)
        if target is None:
            return self._reject(req, journal, 0.0, "buy", "equity is not positive")
        _, _, fee_quote, traded, fill_price = rebalance(
            ledger.cash_quote, ledger.qty_base, target, req.ref_price, self.commission, self.slippage_bps
        )
        if traded == 0:
            # A position-state change with nothing to move (as Ledger.apply_action does).
            ledger.position = req.target_position
            return req.nothing()
        side: Side = "buy" if traded > 0 else "sell"
        qty = abs(traded)
        if self.rules is not None:
            qty = self.rules.floor_amount(qty)
            reason = self.rules.check(qty, fill_price)
            if reason is not None:
                return self._reject(req, journal, qty, side, reason)
            fee_quote = self.commission * qty * fill_price
        d = req.decision
        intent = OrderIntent(req.coid, self.symbol, d.ts_ms, side, qty, req.ref_price, req.target_position, d.reason)
        journal.record_intent(intent)
        fill = ledger.apply_fill(side, qty, fill_price, fee_quote, req.target_position)
        return ExecutionResult("filled", intent, (fill,), ref_price=req.ref_price, ref_source=req.ref_source)

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
