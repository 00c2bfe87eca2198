"""Live order execution: `LiveBroker` (the `Broker` protocol on a real exchange), reconciliation, start checks.

Flow of one decision (`execute`, called by the daemon inside the tick's transaction):
  circuit breaker open?            -> "paused": nothing sent, nothing recorded
  size with `rebalance` (as PaperBroker), cap at MAX_POSITION_QUOTE, clamp to the free balance (pre-flight
  read: also proves the exchange answers before anything is committed), amount_to_precision (`_fit_to_balance`),
  extra order parameters (`_order_params`: none on spot, reduceOnly on a futures close),
  min amount / min notional        -> "rejected" (never sent)
  fat finger (notional above the cap, reference price too far from the last close) -> "rejected" + order_refused
  record_intent + commit           (durable before anything leaves the process)
  status sent + commit             (durable just before the send: a crash now leaves `sent`, reconciled on start)
  create_market_order, exactly once, price=None
    ok        -> fills from the response (or fetch_my_trades by order id), fees to quote, Ledger.apply_fill
    ok, but not final (a futures answer NEW) -> as ambiguous
    rejected  -> "rejected"
    ambiguous -> "unknown", then look the order up by client id (and recent trades) for a grace period:
                 found -> book its fills ("filled"); not found -> stays "unknown", NEVER re-sent here
    auth      -> status rejected, committed, AuthenticationExchangeError (exit 77)

Fees: a quote fee is paid from cash; a base fee reduces the base received (a buy books qty net of the fee, a
sell books qty plus the fee, each with the fee's quote value as `fee_quote`), so the ledger's base and quote
equal the exchange's; a BNB fee is converted at the BNB/quote ticker (retried read) and counted in the fill's
`fee_quote` and `ledger.fees_quote`, but NOT taken from cash: BNB is held outside the ledger, whose cash stays
equal to the exchange's quote balance.

Client order ids come from `bot.brokers.base.client_order_id` (the one PaperBroker, hence the daemon, already uses),
so paper and live states name orders the same way. Every exchange call goes through the `ExchangeClient`
(bot/exchange/client.py): its reads are retried there, its order is sent once.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from bot.brokers.base import Broker, Decision, ExecutionResult, OrderIntent, OrderJournal, TradeRequest
from bot.clock import wall_ms
from bot.errors import (
    AuthenticationExchangeError,
    ConfigError,
    ExchangeError,
    OperationalExchangeError,
    TemporaryExchangeError,
)
from bot.exchange.breaker import CircuitBreaker
from bot.exchange.client import (
    ORDER_AMBIGUOUS,
    ORDER_AUTH,
    ORDER_REJECTED,
    ExchangeClient,
    classify_order_error,
    fee_to_quote,
)
from bot.settings import validate_live
from strategies.accounting import Fill, Ledger, Side, rebalance

log = structlog.get_logger(__name__)

# Order statuses of ccxt after which an order's fills are final (a market order never rests on the book).
_FINAL_ORDER_STATUSES = ("closed", "canceled", "cancelled", "expired", "rejected")
# Tolerance on the notional cap: the sizing already targets the cap; this only catches a sizing bug.
_CAP_TOLERANCE = 1.001
# Balance differences up to this many quote units are rounding, not a discrepancy.
DUST_QUOTE = 1.0
# Trades are searched from this long before the intent: the local and the exchange clocks may disagree.
TRADES_LOOKBACK_MS = 60_000


class LiveJournal(OrderJournal, Protocol):
    """The parts of the state store reconciliation needs beyond OrderJournal (bot.daemon.state.StateStore has them)."""

    def insert_fill(self, client_order_id: str, decision_ts_ms: int, fill: Fill, trade_id: str | None = None) -> None:
        """Record one fill of an order."""
        ...

    def fills(self) -> list[dict[str, Any]]:
        """Every recorded fill."""
        ...


def _base_quote(symbol: str) -> tuple[str, str]:
    """(base, quote) of a ccxt symbol (BASE/QUOTE or BASE/QUOTE:SETTLE)."""
    base, _, quote = symbol.split(":", 1)[0].partition("/")
    return base, quote


class LiveBroker(Broker):
    """Executes decisions as market orders on the exchange; never sends an order twice."""

    # Spot balances move only by ritmo's own fills (booked) or by a human (adopted at the next start).
    balance_check_each_tick = False

    def __init__(
        self,
        client: ExchangeClient,
        *,
        symbol: str,
        max_position_quote: float,
        commission: float = 0.001,
        position_mode: str = "long_only",
        max_price_deviation: float = 0.03,
        cash_buffer: float = 0.002,
        breaker: CircuitBreaker | None = None,
        lookup_attempts: int = 3,
        lookup_interval_s: float = 3.0,
        sleep: Callable[[float], None] = time.sleep,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        if not (max_position_quote and max_position_quote > 0):
            raise ValueError("max_position_quote must be > 0: live trading needs a cap")
        if not 0 <= commission < 1:
            raise ValueError("commission must be in [0, 1)")
        if not 0 < max_price_deviation < 1:
            raise ValueError("max_price_deviation must be in (0, 1)")
        if lookup_attempts < 1:
            raise ValueError("lookup_attempts must be >= 1")
        self.client = client
        self.symbol = symbol
        self.max_position_quote = float(max_position_quote)
        self.commission = float(commission)
        self.position_mode = position_mode
        self.max_price_deviation = float(max_price_deviation)
        # A market buy fills a little above the reference price: leave this fraction of cash unspent.
        self.cash_buffer = float(cash_buffer)
        # Waits between order lookups; the client's reads wait with their own sleep.
        self._sleep = sleep
        self._clock_ms = clock_ms or wall_ms
        self.breaker = breaker or CircuitBreaker(clock=self._clock_ms, secrets=client.secrets)
        self.lookup_attempts = int(lookup_attempts)
        self.lookup_interval_s = float(lookup_interval_s)
        self.last_close: float | None = None
        self.base, self.quote = _base_quote(symbol)

    # --- inputs and state for the daemon and `ritmo status` -------------------------------------

    def note_close(self, close: float) -> None:
        """The just-closed candle's close: the fat-finger guard's anchor (the daemon calls this every tick)."""
        self.last_close = float(close)

    def breaker_state(self) -> dict[str, Any]:
        """The circuit breaker's JSON-able state for `ritmo status`."""
        return self.breaker.state()

    def status(self) -> dict[str, Any] | None:
        """Broker state for `ritmo status`: the circuit breaker."""
        return {"kind": "live", "exchange": self.client.id, "breaker": self.breaker_state()}

    def _dust_quote(self) -> float:
        """A holding worth less than this cannot be sold (the minimum notional): it is no position."""
        return max(DUST_QUOTE, float(self.client.min_notional(self.symbol) or 0.0))

    def opening_ledger(self, initial_cash: float) -> tuple[Ledger, float]:
        """A new state's ledger: the account's base and quote balances (the account must be ritmo's alone).

        Refuses an account whose base holding is worth more than the cap: ritmo would sell it on its first
        SELL, and that holding is very likely the user's own, not ritmo's.
        """
        totals = self._read(self.client.fetch_balance).get("total") or {}
        qty, cash = float(totals.get(self.base) or 0.0), float(totals.get(self.quote) or 0.0)
        price = self.last_close or self._ticker_last(self.symbol)
        self._refuse_holding_above_cap(qty, price)
        position = 1 if qty * price > self._dust_quote() else 0
        log.info(
            "ledger_opened_from_exchange", qty_base=qty, cash_quote=cash, price=price, position=position, base=self.base
        )
        return Ledger(cash_quote=cash, qty_base=qty, position=position), cash + qty * price

    def _refuse_holding_above_cap(self, qty: float, price: float) -> None:
        """ConfigError when a new state would open on a holding worth more than the cap (most likely the user's)."""
        if abs(qty) * price > self.max_position_quote * _CAP_TOLERANCE:
            raise ConfigError(
                f"the account holds {qty:g} {self.base} (~{abs(qty) * price:.2f} {self.quote}), more than "
                f"RITMO_MAX_POSITION_QUOTE={self.max_position_quote:g}: ritmo trades the whole {self.base} "
                "holding of its account; use a dedicated sub-account, or raise the cap if this holding is ritmo's"
            )

    def check_balances(self, ledger: Ledger) -> dict[str, Any] | None:
        """Compare the ledger with the exchange's balances; beyond dust the exchange wins (logged loudly)."""
        price = self.last_close or self._ticker_last(self.symbol)
        return self._read(
            lambda: reconcile_balance(
                self.client, ledger, self.symbol, DUST_QUOTE, price=price, position_dust_quote=self._dust_quote()
            )
        )

    # --- exchange calls, each reported to the breaker --------------------------------------------

    def _read(self, fn: Callable[[], Any]) -> Any:
        """Run one (already retried) read; a temporary failure counts against the breaker."""
        try:
            out = fn()
        except TemporaryExchangeError as exc:
            self.breaker.record_failure(exc)
            raise
        self.breaker.record_success()
        return out

    def _ticker_last(self, symbol: str) -> float:
        """The last traded price of `symbol` (retried read)."""
        ticker = self._read(lambda: self.client.fetch_ticker(symbol))
        price = ticker.get("last") or ticker.get("close")
        if not price or not float(price) > 0:
            raise TemporaryExchangeError(f"{symbol} ticker has no last price")
        return float(price)

    def _free(self) -> dict[str, float]:
        """Free balance per currency (retried read)."""
        raw = self._read(self.client.fetch_balance)
        return {str(k): float(v or 0.0) for k, v in (raw.get("free") or {}).items()}

    # --- execute -------------------------------------------------------------------------------

    def _trade(self, req: TradeRequest, ledger: Ledger, journal: OrderJournal) -> ExecutionResult:
        """Trade the ledger to `target_position` with one market order; mutates `ledger` by the fills it books."""
        decision, target_position, coid = req.decision, req.target_position, req.coid
        ref_price, ref_source = req.ref_price, req.ref_source
        if self.position_mode == "long_only" and target_position < 0:
            raise ValueError("long_only: a spot account cannot go short")
        if self.breaker.is_open:
            return self._paused(decision, ref_price, ref_source, "circuit breaker open")

        # --- size (the shared accounting, as PaperBroker) ----------------------------------------
        target = self._capped_target(req, ledger)
        if target is None:
            return self._reject(req, journal, 0.0, "buy", "equity is not positive")
        _, _, _, traded, _ = rebalance(ledger.cash_quote, ledger.qty_base, target, ref_price, self.commission, 0.0)
        if traded == 0:
            ledger.position = target_position
            return req.nothing()
        if target_position == 0 and abs(ledger.qty_base) * ref_price < self._dust_quote():
            # Below the minimum notional a holding cannot be sold: it is dust, and the position is flat already
            # (otherwise a halt or a SELL would be refused again on every tick).
            log.info("dust_left", qty_base=ledger.qty_base, ref_price=ref_price, client_order_id=coid)
            ledger.position = 0
            return ExecutionResult("none", ref_price=ref_price, ref_source=ref_source)
        side: Side = "buy" if traded > 0 else "sell"

        # --- pre-flight read: the exchange answers, and the order fits the free balance ------------
        try:
            qty = self._fit_to_balance(side, abs(float(traded)), ref_price, ledger)
        except TemporaryExchangeError as exc:
            return self._paused(decision, ref_price, ref_source, f"exchange unavailable: {exc}")
        params = self._order_params(side, qty, ledger)
        reason = self._rules_problem(qty, ref_price, params)
        if reason is not None:
            return self._reject(req, journal, qty, side, reason)
        refusal = self._fat_finger(side, qty, ref_price, ledger)
        if refusal is not None:
            log.error(
                "order_refused", client_order_id=coid, side=side, qty_base=qty, ref_price=ref_price, reason=refusal
            )
            return self._reject(req, journal, qty, side, f"refused: {refusal}")

        # --- intent durable, then sent durable, then the one send -------------------------------
        intent = OrderIntent(coid, self.symbol, decision.ts_ms, side, qty, ref_price, target_position, decision.reason)
        journal.record_intent(intent)
        journal.commit()
        # `sent` is committed BEFORE the request leaves: after a crash right here the order may or may not
        # exist, and `sent` makes reconciliation look it up instead of abandoning it as a never-sent intent.
        journal.set_order_status(coid, "sent")
        journal.commit()
        sent_at_ms = self._clock_ms()
        try:
            order = self.client.create_market_order(self.symbol, side, qty, coid, params=params)
        except ExchangeError as exc:
            return self._order_failed(exc, intent, ledger, journal, ref_source, sent_at_ms)
        if str(order.get("status")) not in _FINAL_ORDER_STATUSES:
            # The order exists but its fills are not known yet (Binance futures may answer NEW): find it by
            # client id like any ambiguous send, never re-send.
            pending = OperationalExchangeError(f"order {order.get('id')} answered {order.get('status')!r}, not final")
            pending.order_outcome = ORDER_AMBIGUOUS  # type: ignore[attr-defined]
            return self._order_failed(pending, intent, ledger, journal, ref_source, sent_at_ms)
        self.breaker.record_success()
        fills = self._book_order(order, intent, ledger)
        log.info(
            "order_filled",
            client_order_id=coid,
            side=side,
            qty_base=sum(f.qty_base for f in fills),
            ordered_qty_base=qty,
            fee_quote=sum(f.fee_quote for f in fills),
            exchange_order_id=str(order.get("id")),
            order_params=params or None,
        )
        status = "filled" if fills else "rejected"
        return ExecutionResult(
            status, intent, tuple(fills), None if fills else "order filled nothing", ref_price, ref_source
        )

    def _fit_to_balance(self, side: Side, qty: float, ref_price: float, ledger: Ledger) -> float:
        """`qty` cut to the free balance (a pre-flight read) and truncated to the amount step.

        Spot holds no negative cash: a buy's fee (if charged in quote) and a small price move must fit the
        free quote; a sell cannot exceed the base held. Raises TemporaryExchangeError if the read fails.
        """
        free = self._free()
        if side == "buy":
            cash = min(ledger.cash_quote, free.get(self.quote, 0.0))
            qty = min(qty, max(0.0, cash) / (ref_price * (1 + self.commission) * (1 + self.cash_buffer)))
        else:
            qty = min(qty, max(0.0, min(ledger.qty_base, free.get(self.base, 0.0))))
        return self.client.amount_to_precision(self.symbol, qty)

    def _order_params(self, side: Side, qty: float, ledger: Ledger) -> dict[str, Any]:
        """Extra ccxt parameters of the order (spot: none; futures: reduceOnly on a close)."""
        return {}

    def _rules_problem(self, qty: float, price: float, params: Mapping[str, Any] | None = None) -> str | None:
        """Why the exchange would refuse this amount (checked here: ccxt does not, Binance answers -1013)."""
        if not qty > 0:
            return "amount below the amount step"
        lo = self.client.min_amount(self.symbol)
        if lo is not None and qty < lo:
            return f"amount {qty} below the minimum amount {lo} (LOT_SIZE)"
        notional = self.client.min_notional(self.symbol)
        if notional is not None and qty * price < notional:
            return f"notional {qty * price:.8g} below the minimum notional {notional} (NOTIONAL)"
        return None

    def _fat_finger(self, side: Side, qty: float, ref_price: float, ledger: Ledger) -> str | None:
        """Why this order looks like a fat finger (None if it does not)."""
        q_after = ledger.qty_base + (qty if side == "buy" else -qty)
        # Only an order that grows the exposure can breach the cap: a flattening sell must always pass.
        if abs(q_after) > abs(ledger.qty_base) and abs(q_after) * ref_price > self.max_position_quote * _CAP_TOLERANCE:
            return f"position notional {abs(q_after) * ref_price:.2f} above the cap {self.max_position_quote:g}"
        anchor = self.last_close
        if anchor is None:
            try:
                anchor = self._ticker_last(self.symbol)
            except TemporaryExchangeError as exc:
                return f"no price to check the reference against: {exc}"
        deviation = abs(ref_price / anchor - 1.0)
        if deviation > self.max_price_deviation:
            return f"reference price {ref_price:g} is {deviation:.2%} away from the last close {anchor:g}"
        return None

    def _paused(self, decision: Decision, ref_price: float, ref_source: str, why: str) -> ExecutionResult:
        log.warning("trading_paused", candle_ts_ms=decision.ts_ms, reason=why, breaker=self.breaker.state()["state"])
        return ExecutionResult("paused", None, (), why, ref_price, ref_source)

    def _order_failed(
        self,
        exc: ExchangeError,
        intent: OrderIntent,
        ledger: Ledger,
        journal: OrderJournal,
        ref_source: str,
        sent_at_ms: int,
    ) -> ExecutionResult:
        """Act on a failed send by its classification; never re-send."""
        outcome = classify_order_error(exc)
        coid = intent.client_order_id
        if isinstance(exc, TemporaryExchangeError):
            self.breaker.record_failure(exc)
        else:
            self.breaker.record_success()  # a refusal is an answer
        if outcome == ORDER_AUTH:
            journal.set_order_status(coid, "rejected", "authentication refused")
            journal.commit()
            log.error("order_auth_failed", client_order_id=coid, error=str(exc))
            raise AuthenticationExchangeError(str(exc)) from None
        if outcome == ORDER_REJECTED:
            log.warning(
                "order_rejected", client_order_id=coid, side=intent.side, qty_base=intent.qty_base, reason=str(exc)
            )
            return ExecutionResult("rejected", intent, (), str(exc), intent.ref_price, ref_source)
        # Ambiguous: the order may have executed. Find it; do not send anything.
        journal.set_order_status(coid, "unknown", str(exc))
        journal.commit()
        log.warning("order_ambiguous", client_order_id=coid, error=str(exc), lookups=self.lookup_attempts)
        order = None
        for attempt in range(1, self.lookup_attempts + 1):
            self._sleep(self.lookup_interval_s)
            try:
                order = self._find_order(coid, sent_at_ms)
            except TemporaryExchangeError as lookup_exc:
                log.warning("order_lookup_failed", client_order_id=coid, attempt=attempt, error=str(lookup_exc))
                continue
            if order is not None and str(order.get("status")) in _FINAL_ORDER_STATUSES:
                break
            order = None
        if order is None:
            log.error(
                "order_unresolved",
                client_order_id=coid,
                reason="ambiguous send, not found after the grace period: left unknown, reconciled on next start",
            )
            return ExecutionResult("unknown", intent, (), str(exc), intent.ref_price, ref_source)
        fills = self._book_order(order, intent, ledger)
        log.warning("order_found_after_ambiguous_send", client_order_id=coid, fills=len(fills))
        status = "filled" if fills else "rejected"
        return ExecutionResult(status, intent, tuple(fills), None if fills else str(exc), intent.ref_price, ref_source)

    # --- finding orders and turning them into fills ----------------------------------------------

    def _find_order(self, coid: str, since_ms: int | None) -> dict[str, Any] | None:
        """The order with this client id: by lookup, else among our trades since `since_ms` (retried reads)."""
        order = self._read(lambda: self.client.fetch_order_by_client_id(self.symbol, coid))
        if order is not None:
            return order
        if since_ms is None:
            return None
        # Binance lets a filled market order's client id be reused and shows only the newest: the trades
        # since the send, looked up by their order id, are the second witness.
        since = max(0, since_ms - TRADES_LOOKBACK_MS)
        trades = self._read(lambda: self.client.fetch_my_trades(self.symbol, since_ms=since))
        for order_id in dict.fromkeys(str(t.get("order")) for t in trades if t.get("order") is not None):
            candidate = self._read(lambda oid=order_id: self.client.fetch_order(oid, self.symbol))
            if candidate and candidate.get("clientOrderId") == coid:
                return candidate
        return None

    def _order_trades(self, order: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The order's trades: from the response, else fetch_my_trades by order id, else one synthetic trade."""
        trades = [dict(t) for t in (order.get("trades") or [])]
        filled = float(order.get("filled") or 0.0)
        if trades or not filled > 0:
            return trades
        if order.get("id") is not None:
            trades = self._read(lambda: self.client.fetch_my_trades(self.symbol, order_id=str(order["id"])))
            trades = [dict(t) for t in trades if str(t.get("order", order["id"])) == str(order["id"])]
        if trades:
            return trades
        price = order.get("average") or order.get("price")
        if not price and order.get("cost"):
            price = float(order["cost"]) / filled
        fees = order.get("fees") or ([order["fee"]] if order.get("fee") else [])
        return [{"id": None, "amount": filled, "price": float(price or 0.0), "fees": fees}]

    def _book_order(self, order: Mapping[str, Any], intent: OrderIntent, ledger: Ledger) -> list[Fill]:
        """Book every trade of `order` in the ledger (partial fills as filled); the booked fills."""
        fills = []
        for trade in self._order_trades(order):
            fill = self._book_trade(trade, intent, ledger)
            if fill is not None:
                fills.append(fill)
        return fills

    def _book_trade(self, trade: Mapping[str, Any], intent: OrderIntent, ledger: Ledger) -> Fill | None:
        """One exchange trade into the ledger, fees in quote, base fees netted from the base quantity."""
        qty = float(trade.get("amount") or 0.0)
        price = float(trade.get("price") or 0.0)
        if not (qty > 0 and price > 0):
            return None
        fees = trade.get("fees") or ([trade["fee"]] if trade.get("fee") else [])
        fee_quote_cash = 0.0  # paid from the ledger's cash (quote and base fees)
        fee_quote_outside = 0.0  # paid from an asset outside the ledger (BNB)
        base_fee = 0.0
        for fee in fees:
            if not fee or not float(fee.get("cost") or 0.0):
                continue
            currency = str(fee.get("currency") or "")
            if currency == self.base:
                base_fee += float(fee["cost"])
                fee_quote_cash += fee_to_quote(fee, self.symbol, price)
            elif currency == self.quote:
                fee_quote_cash += fee_to_quote(fee, self.symbol, price)
            else:
                rate = self._ticker_last(f"{currency}/{self.quote}")
                fee_quote_outside += fee_to_quote(fee, self.symbol, price, {currency: rate})
        side: Side = intent.side
        # Base fee: a buy receives qty - fee; a sell gives up qty + fee. Booking that quantity at the fill
        # price with the fee's quote value as the fee leaves cash moved by exactly qty * price, as on the exchange.
        booked_qty = qty - base_fee if side == "buy" else qty + base_fee
        if not booked_qty > 0:
            return None
        position_after = intent.target_position
        if position_after == 0:
            # A partly filled order to flat leaves a holding: the position stays until what is left is dust.
            left = ledger.qty_base + (booked_qty if side == "buy" else -booked_qty)
            if abs(left) * price >= self._dust_quote():
                position_after = 1 if left > 0 else -1
        fill = ledger.apply_fill(side, booked_qty, price, fee_quote_cash, position_after)
        if fee_quote_outside:
            # BNB is not a ledger holding: count the fee, leave cash equal to the exchange's quote balance.
            ledger.fees_quote += fee_quote_outside
            fill = replace(fill, fee_quote=fill.fee_quote + fee_quote_outside)
        return fill

    # --- reconcile -------------------------------------------------------------------------------

    def reconcile(self, journal: OrderJournal, pending: list[dict[str, Any]], ledger: Ledger) -> None:
        """Resolve orders left intent/sent/unknown: book what executed (once), close what never did."""
        booked = _booked_client_ids(journal)
        for row in pending:
            coid = str(row["client_order_id"])
            status = str(row["status"])
            since_ms = int(row.get("created_at_ms") or 0) or None
            try:
                order = self._find_order(coid, since_ms)
            except TemporaryExchangeError as exc:
                # Leave it pending: deciding without the exchange's answer could double or lose a fill.
                log.error("reconcile_lookup_failed", client_order_id=coid, status=status, error=str(exc))
                continue
            if order is not None and str(order.get("status")) not in _FINAL_ORDER_STATUSES:
                log.warning("reconcile_order_open", client_order_id=coid, order_status=str(order.get("status")))
                continue
            if order is None:
                detail = "never sent: abandoned" if status == "intent" else "not found on the exchange"
                journal.set_order_status(coid, "rejected", detail)
                log.warning("order_abandoned", client_order_id=coid, status=status, detail=detail)
                continue
            if coid in booked:
                journal.set_order_status(coid, "filled", "fills already recorded")
                log.info("reconcile_already_booked", client_order_id=coid)
                continue
            intent = OrderIntent(
                coid,
                str(row["symbol"]),
                int(row["decision_ts_ms"]),
                row["side"],
                float(row["qty_base"]),
                float(row["ref_price"]),
                int(row["target_position"]),
                str(row["reason"]),
                int(row.get("attempt") or 0),
            )
            trades = self._order_trades(order)
            fills = []
            for trade in trades:
                fill = self._book_trade(trade, intent, ledger)
                if fill is None:
                    continue
                fills.append(fill)
                insert = getattr(journal, "insert_fill", None)
                if insert is not None:
                    tid = trade.get("id")
                    insert(coid, intent.decision_ts_ms, fill, None if tid is None else str(tid))
            journal.set_order_status(coid, "filled" if fills else "rejected", "reconciled on start")
            log.warning(
                "order_reconciled",
                client_order_id=coid,
                was=status,
                fills=len(fills),
                qty_base=sum(f.qty_base for f in fills),
                fee_quote=sum(f.fee_quote for f in fills),
            )


def _booked_client_ids(journal: Any) -> set[str]:
    """Client ids that already have a fill recorded (reconciliation books an order's fills once)."""
    fills = getattr(journal, "fills", None)
    if fills is None:
        return set()
    return {str(f["client_order_id"]) for f in fills()}


def reconcile_balance(
    client: ExchangeClient,
    ledger: Ledger,
    symbol: str,
    dust_quote: float = DUST_QUOTE,
    *,
    price: float | None = None,
    position_dust_quote: float | None = None,
) -> dict[str, Any]:
    """Set the ledger's base and quote to the exchange's balances when they differ beyond dust (exchange wins)."""
    base, quote = _base_quote(symbol)
    totals = client.fetch_balance().get("total") or {}
    ex_base, ex_quote = float(totals.get(base) or 0.0), float(totals.get(quote) or 0.0)
    if price is None:
        ticker = client.fetch_ticker(symbol)
        price = float(ticker.get("last") or ticker.get("close") or 0.0)
    base_diff_quote = abs(ex_base - ledger.qty_base) * price
    quote_diff = abs(ex_quote - ledger.cash_quote)
    out: dict[str, Any] = {
        "adjusted": False,
        "ledger_qty_base": ledger.qty_base,
        "exchange_qty_base": ex_base,
        "ledger_cash_quote": ledger.cash_quote,
        "exchange_cash_quote": ex_quote,
        "price": price,
    }
    if base_diff_quote <= dust_quote and quote_diff <= dust_quote:
        log.info("ledger_matches_exchange", **out)
        return out
    position_before = ledger.position
    ledger.qty_base = ex_base
    ledger.cash_quote = ex_quote
    # The position state follows the holdings: a long beyond dust (what cannot be sold) is +1, else flat.
    pos_dust = dust_quote if position_dust_quote is None else position_dust_quote
    ledger.position = 1 if ex_base * price > pos_dust else (-1 if ex_base * price < -pos_dust else 0)
    out.update(adjusted=True, position_before=position_before, position_after=ledger.position)
    log.error("ledger_adjusted", action="the exchange's balances win", **out)
    return out


def check_live_start(
    settings: Any,
    client: ExchangeClient,
    *,
    position_mode: str | None = None,
    env_file: str | Path | None = ".env",
) -> None:
    """Refuse to start live trading without its prerequisites; set 1x isolated margin on USD-M futures."""
    validate_live(settings)
    mode = position_mode or settings.position_mode or "long_only"
    exchange_id = client.id
    is_usdm = exchange_id == "binanceusdm"
    if mode == "long_short" and not is_usdm:
        raise ConfigError(
            f"long_short cannot trade live on {exchange_id} spot: use a long_only checkpoint, or binanceusdm "
            "(USD-M futures, 1x isolated)"
        )
    if is_usdm:
        _futures_1x_isolated(client, settings.symbol)
    client.check_key_permissions()
    _warn_env_permissions(env_file)


def _futures_1x_isolated(client: ExchangeClient, symbol: str) -> None:
    """Set leverage 1 and isolated margin explicitly (never rely on the account's defaults)."""
    # Binance -4046 "No need to change margin type" (False): already isolated, which is what we want.
    if client.set_margin_mode("isolated", symbol):
        log.info("futures_setting", setting="margin_mode", symbol=symbol, value="isolated")
    if client.set_leverage(1, symbol):
        log.info("futures_setting", setting="leverage", symbol=symbol, value=1)


def _warn_env_permissions(env_file: str | Path | None) -> bool:
    """Warn when the settings file (API keys) is readable by group or others; True if it warned."""
    if env_file is None:
        return False
    path = Path(env_file)
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "env_file_permissions",
            path=str(path),
            mode=oct(stat.S_IMODE(mode)),
            fix=f"chmod 600 {path}",
        )
        return True
    return False


__all__ = [
    "LiveBroker",
    "LiveJournal",
    "check_live_start",
    "reconcile_balance",
]
