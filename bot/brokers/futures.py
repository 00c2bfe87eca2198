"""Live execution on Binance USD-M futures (ccxt `binanceusdm`, a linear perpetual such as BTC/USDT:USDT).

`FuturesBroker` is a `LiveBroker`: the same sizing (`rebalance`, the cap, the fat-finger guard), the same intent
and `sent` committed before the one send, ambiguous failures looked up by client id and recent trades and never
re-sent, reconciliation on start and the circuit breaker. What differs on a 1x isolated one-way futures account:

Accounting. The ledger's convention (a short sale adds its proceeds to cash, qty_base < 0, equity = cash +
qty * price) IS the futures account. With a position of signed size q at average entry price e and the wallet
balance W, the margin balance is W + q * (P - e) (the unrealised PnL of a linear contract), so with

    ledger cash = W - q * e,    ledger qty = q

ledger equity = margin balance at every price. Fills keep it so: opening d at p leaves W (less the fee) and adds
d * p to q * e, as the ledger's cash pays d * p; closing d realises d * (p - e) into W, as the ledger's cash gets
d * p back. Funding payments move W alone: check_balances adopts them beyond dust (the exchange wins), as on spot.

Orders. Market orders in base units (contract size 1, checked). `reduceOnly` exactly when the order only
shrinks the position (a close); never on an order that opens exposure. A flip (long -> short) is ONE order of
|q| + |q'|: one intent and one client id, so the never-twice machinery is unchanged, and in one-way mode Binance
passes the position through zero in that order. The opening part is clamped to the margin available once the
closing part has released the position's (the account's margin balance; the account is ritmo's alone), at 1x.
Binance waives the minimum notional for reduce-only orders (-4164 "... unless you choose reduce only"), so a
close is only refused below the minimum quantity: below that a position cannot exist on the exchange, it is dust.
Binance futures answer a market order without fills or fees (newOrderRespType RESULT): the fees come from
fetch_my_trades by order id, polled while the exchange has not shown them yet. An answer that is not final (NEW)
goes down the ambiguous path: looked up by client id, booked when final, else left `unknown` for reconciliation.

Fees are charged in USDT (from the wallet: from the ledger's cash) or in BNB (outside the ledger: counted in
`fees_quote` at the BNB perpetual's last price, as spot counts BNB). There is no base-asset fee on USD-M.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import structlog

from bot.brokers.base import OrderIntent
from bot.brokers.live import _CAP_TOLERANCE, DUST_QUOTE, LiveBroker
from bot.errors import ConfigError, OperationalExchangeError
from bot.exchange.client import ExchangeClient, fee_to_quote
from strategies.accounting import Fill, Ledger, Side

log = structlog.get_logger(__name__)

# Float noise must not truncate a whole amount step away (0.013 stored as 0.012999999999999999 would close
# only 0.012 and leave 0.001 BTC open): amounts are nudged up by this fraction before ccxt truncates them.
_AMOUNT_NUDGE = 1e-9

# Binance's "assuming price" of a short opening: the margin of a market sell is taken at last * (1 + 0.15%).
_SHORT_MARGIN_MARKUP = 0.0015

HEDGE_MODE_FIX = (
    "the Binance USD-M account is in hedge mode (dual-side positions); ritmo's orders need one-way mode. "
    "With no open position or order, switch it: Binance Futures > Preferences > Position Mode > One-way Mode "
    "(API: POST /fapi/v1/positionSide/dual dualSidePosition=false; ccxt: set_position_mode(False))"
)


def check_one_way_mode(client: ExchangeClient, symbol: str | None = None) -> None:
    """Refuse a futures account in hedge mode (Binance GET /fapi/v1/positionSide/dual) with how to switch it."""
    mode = client.fetch_position_mode(symbol)
    # ccxt: {'info': {'dualSidePosition': bool}, 'hedged': bool}; anything but an explicit False is refused.
    if (mode or {}).get("hedged") is not False:
        log.error("futures_hedge_mode", exchange=client.id, hedged=(mode or {}).get("hedged"))
        raise ConfigError(HEDGE_MODE_FIX)
    log.info("futures_setting", setting="position_mode", value="one_way")


def wallet_balance(balance: Mapping[str, Any], asset: str) -> float:
    """The futures wallet balance of `asset` from ccxt.binanceusdm's fetch_balance (its `info`).

    ccxt's unified fields are NOT the wallet: fetch_balance reads GET /fapi/v3/account (ccxt 4.5.90
    binance.py:4075) and parse_balance_custom's linear branch sets free = availableBalance, used = initialMargin,
    total = marginBalance, i.e. wallet + unrealised PnL (binance.py:4017-4019). The wallet is that `assets`
    entry's `walletBalance` (cross wallet plus every isolated wallet); GET /fapi/v2/balance (a list) names it
    `balance`.
    """
    info = balance.get("info")
    entries = info.get("assets") if isinstance(info, Mapping) else info
    if not isinstance(entries, list):
        raise OperationalExchangeError("fetch_balance: no futures assets in the answer, cannot read the wallet balance")
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("asset") == asset:
            value = entry.get("walletBalance", entry.get("balance"))
            if value is None:
                raise OperationalExchangeError(f"fetch_balance: {asset} has no walletBalance")
            return float(value)
    return 0.0  # the asset was never in this futures wallet


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def only_reduces(qty_base: float, side: Side, qty: float) -> bool:
    """True when an order of `qty` on `side` shrinks the position `qty_base` without crossing zero (reduceOnly)."""
    if qty_base == 0 or not qty > 0:
        return False
    opposite = (qty_base > 0) == (side == "sell")
    return opposite and qty <= abs(qty_base) * (1 + _AMOUNT_NUDGE)


class FuturesBroker(LiveBroker):
    """Executes decisions as market orders on a Binance USD-M perpetual, 1x isolated, one-way; never sends twice."""

    # Funding moves the wallet every 8 hours, and a liquidation closes the position: the daemon adopts the
    # exchange's position and wallet before every decision (two reads per 5-minute tick).
    balance_check_each_tick = True

    def __init__(
        self, client: ExchangeClient, *, symbol: str, position_mode: str = "long_short", **kwargs: Any
    ) -> None:
        if ":" not in symbol:
            raise ConfigError(f"symbol {symbol!r}: a USD-M perpetual is named BASE/QUOTE:SETTLE, e.g. BTC/USDT:USDT")
        if position_mode not in ("long_only", "long_short"):
            raise ValueError(f"position_mode must be long_only or long_short, got {position_mode!r}")
        super().__init__(client, symbol=symbol, position_mode=position_mode, **kwargs)
        self.settle = symbol.split(":", 1)[1]
        if self.settle != self.quote:
            raise ConfigError(f"symbol {symbol!r}: only linear contracts settled in the quote currency are supported")
        self._is_ready = False

    def status(self) -> dict[str, Any] | None:
        """Broker state for `ritmo status`: the circuit breaker, and the market kind."""
        return {**(super().status() or {}), "market": "usdm_futures", "position_mode": self.position_mode}

    # --- start checks and exchange reads ---------------------------------------------------------

    def _ensure_ready(self) -> None:
        """Once: the symbol is a linear contract of size 1, and the account is in one-way position mode."""
        if self._is_ready:
            return
        market = self.client.market(self.symbol)
        if not (market.get("contract") and market.get("linear")):
            raise ConfigError(f"{self.symbol} on {self.client.id} is not a linear futures contract")
        # Amounts are sent in contracts; ritmo's are base units, the same only for a contract size of 1.
        if float(market.get("contractSize") or 1.0) != 1.0:
            raise ConfigError(f"{self.symbol}: contract size {market.get('contractSize')} is not 1")
        self._read(lambda: check_one_way_mode(self.client, self.symbol))
        self._is_ready = True

    def _min_qty(self) -> float:
        """The smallest amount an order may have (LOT_SIZE minQty, else the amount step)."""
        lo = self.client.min_amount(self.symbol)
        step = (self.client.market(self.symbol).get("precision") or {}).get("amount")
        return float(lo or step or 0.0)

    def _position(self) -> tuple[float, float]:
        """(signed size in base units, entry price) of the symbol's position; (0.0, 0.0) when flat."""
        positions = self._read(lambda: self.client.fetch_positions([self.symbol]))
        # ccxt drops flat positions (entryPrice 0) from binance's positionRisk: none left means flat.
        mine = [p for p in positions or [] if p.get("symbol") == self.symbol and float(p.get("contracts") or 0.0)]
        if any(p.get("hedged") for p in mine) or len(mine) > 1:
            raise ConfigError(HEDGE_MODE_FIX)
        if not mine:
            return 0.0, 0.0
        pos = mine[0]
        if pos.get("marginMode") == "cross":
            raise ConfigError(
                f"the {self.symbol} position is in cross margin: ritmo trades 1x isolated; close it (or let ritmo's "
                "start set isolated margin on a flat symbol)"
            )
        size = float(pos["contracts"]) * float(pos.get("contractSize") or 1.0)
        entry = float(pos.get("entryPrice") or 0.0)
        if pos.get("side") not in ("long", "short") or not entry > 0:
            raise OperationalExchangeError(f"fetch_positions: unreadable {self.symbol} position {pos.get('info')!r}")
        return (size if pos["side"] == "long" else -size), entry

    def _account(self) -> tuple[float, float, float]:
        """(wallet balance, available balance, margin balance) of the settle asset, from one fetch_balance."""
        raw = self._read(self.client.fetch_balance)
        free = float((raw.get("free") or {}).get(self.settle) or 0.0)
        margin = float((raw.get("total") or {}).get(self.settle) or 0.0)
        return wallet_balance(raw, self.settle), free, margin

    def _exchange_ledger(self) -> tuple[float, float, float]:
        """(qty_base, cash_quote, wallet) the exchange implies: q and W - q * entry."""
        qty, entry = self._position()
        wallet, _, _ = self._account()
        return qty, wallet - qty * entry, wallet

    def _position_state(self, qty: float) -> int:
        """-1, 0 or +1: any position of at least half the minimum quantity counts (Binance holds no smaller)."""
        return _sign(qty) if abs(qty) >= self._min_qty() / 2 else 0

    # --- opening and checking the ledger ---------------------------------------------------------

    def opening_ledger(self, initial_cash: float) -> tuple[Ledger, float]:
        """A new state's ledger from the account: cash = wallet - q * entry, qty = the position (signed)."""
        self._ensure_ready()
        qty, cash, wallet = self._exchange_ledger()
        price = self.last_close or self._ticker_last(self.symbol)
        self._refuse_holding_above_cap(qty, price)
        if qty < 0 and self.position_mode == "long_only":
            raise ConfigError(f"the account holds a {self.base} short but the model is long_only: close it first")
        ledger = Ledger(cash_quote=cash, qty_base=qty, position=self._position_state(qty))
        log.info(
            "ledger_opened_from_exchange",
            qty_base=qty,
            cash_quote=cash,
            wallet_quote=wallet,
            price=price,
            position=ledger.position,
            base=self.base,
        )
        return ledger, ledger.equity(price)

    def check_balances(self, ledger: Ledger) -> dict[str, Any] | None:
        """Compare the ledger with the position and wallet; beyond dust the exchange wins (funding, fills)."""
        self._ensure_ready()
        qty, cash, wallet = self._exchange_ledger()
        price = self.last_close or self._ticker_last(self.symbol)
        out: dict[str, Any] = {
            "adjusted": False,
            "ledger_qty_base": ledger.qty_base,
            "exchange_qty_base": qty,
            "ledger_cash_quote": ledger.cash_quote,
            "exchange_cash_quote": cash,
            "exchange_wallet_quote": wallet,
            "price": price,
        }
        if abs(qty - ledger.qty_base) * price <= DUST_QUOTE and abs(cash - ledger.cash_quote) <= DUST_QUOTE:
            log.info("ledger_matches_exchange", **out)
            return out
        position_before = ledger.position
        ledger.qty_base, ledger.cash_quote = qty, cash
        ledger.position = self._position_state(qty)
        out.update(adjusted=True, position_before=position_before, position_after=ledger.position)
        log.error("ledger_adjusted", action="the exchange's position and wallet win", **out)
        return out

    # --- execute ---------------------------------------------------------------------------------

    def _fit_to_balance(self, side: Side, qty: float, ref_price: float, ledger: Ledger) -> float:
        """`qty` with its opening part cut to the margin at 1x (pre-flight read), truncated to the amount step."""
        self._ensure_ready()
        _, free, margin_balance = self._account()
        qty = self._clamp(side, qty, ref_price, ledger.qty_base, free, margin_balance)
        return self.client.amount_to_precision(self.symbol, qty * (1 + _AMOUNT_NUDGE))

    def _order_params(self, side: Side, qty: float, ledger: Ledger) -> dict[str, Any]:
        """reduceOnly exactly when the order only shrinks the position (never when it opens exposure)."""
        return {"reduceOnly": True} if only_reduces(ledger.qty_base, side, qty) else {}

    def _dust_quote(self) -> float:
        """Below half the minimum quantity a position cannot exist on Binance: that much is dust."""
        return self._min_qty() / 2 * (self.last_close or self._ticker_last(self.symbol))

    def _clamp(self, side: Side, qty: float, ref_price: float, qty_base: float, free: float, margin: float) -> float:
        """`qty` with its opening part (beyond closing the position) cut to the margin available at 1x."""
        is_opposite = qty_base != 0 and (qty_base > 0) == (side == "sell")
        closing = min(qty, abs(qty_base)) if is_opposite else 0.0
        opening = qty - closing
        if not opening > 0:
            return qty
        # A flip first releases the whole position: its isolated margin and PnL come back, so the margin
        # balance is available (the account is ritmo's alone); otherwise the available balance is. Binance's
        # one-way margin requirement counts the resulting position, not the order ("How to Calculate the
        # Margin Requirement", Binance futures FAQ).
        available = (margin if closing > 0 else free) - closing * ref_price * self.commission
        # Binance prices a short opening at max(last * 1.0015, mark) for its margin ("cost required to open").
        margin_price = ref_price * (1 + _SHORT_MARGIN_MARKUP if side == "sell" else 1.0)
        max_opening = max(0.0, available) / (margin_price * (1 + self.commission) * (1 + self.cash_buffer))
        return closing + min(opening, max_opening)

    def _rules_problem(self, qty: float, price: float, params: Mapping[str, Any] | None = None) -> str | None:
        """Why Binance would refuse this amount; a reduce-only order is exempt from the minimum notional."""
        if not (params or {}).get("reduceOnly"):
            return super()._rules_problem(qty, price, params)
        if not qty > 0:
            return "amount below the amount step"
        lo = self.client.min_amount(self.symbol)
        if lo is not None and qty < lo:
            return f"amount {qty} below the minimum amount {lo} (LOT_SIZE)"
        return None

    def _fat_finger(self, side: Side, qty: float, ref_price: float, ledger: Ledger) -> str | None:
        """As spot, and a flip counts as new exposure: its resulting position must fit the cap too."""
        q_after = ledger.qty_base + (qty if side == "buy" else -qty)
        is_flip = q_after * ledger.qty_base < 0
        if is_flip and abs(q_after) * ref_price > self.max_position_quote * _CAP_TOLERANCE:
            return f"position notional {abs(q_after) * ref_price:.2f} above the cap {self.max_position_quote:g}"
        return super()._fat_finger(side, qty, ref_price, ledger)

    # --- trades into the ledger ------------------------------------------------------------------

    def _order_trades(self, order: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The order's trades: Binance futures answers carry none, so fetch_my_trades by order id, polled."""
        trades = [dict(t) for t in (order.get("trades") or [])]
        filled = float(order.get("filled") or 0.0)
        if trades or not filled > 0:
            return trades
        order_id = order.get("id")
        if order_id is not None:
            for attempt in range(self.lookup_attempts):
                if attempt:
                    self._sleep(self.lookup_interval_s)  # userTrades may lag the order by a moment
                found = self._read(lambda: self.client.fetch_my_trades(self.symbol, order_id=str(order_id)))
                trades = [dict(t) for t in found if str(t.get("order", order_id)) == str(order_id)]
                if sum(float(t.get("amount") or 0.0) for t in trades) >= filled * (1 - _AMOUNT_NUDGE):
                    return trades
        # Not shown in time: book the order as one trade at its average price with the fee estimated at the
        # market's taker rate; check_balances corrects the difference from the wallet beyond dust.
        price = float(order.get("average") or 0.0) or float(order.get("cost") or 0.0) / filled
        rate = float(self.client.market(self.symbol).get("taker") or self.commission)
        fee = rate * filled * price
        log.warning(
            "order_trades_missing", exchange_order_id=str(order_id), filled=filled, seen=len(trades), fee_estimated=fee
        )
        return [{"id": None, "amount": filled, "price": price, "fees": [{"cost": fee, "currency": self.settle}]}]

    def _book_trade(self, trade: Mapping[str, Any], intent: OrderIntent, ledger: Ledger) -> Fill | None:
        """One futures trade into the ledger: USDT fees from cash, BNB fees counted outside, position from holdings."""
        qty = float(trade.get("amount") or 0.0)
        price = float(trade.get("price") or 0.0)
        if not (qty > 0 and price > 0):
            return None
        fee_cash = 0.0  # paid from the wallet, i.e. the ledger's cash (negative: a maker rebate)
        fee_outside = 0.0  # paid from an asset outside the ledger (BNB)
        for fee in trade.get("fees") or ([trade["fee"]] if trade.get("fee") else []):
            if not fee or not float(fee.get("cost") or 0.0):
                continue
            currency = str(fee.get("currency") or "")
            if currency == self.settle:
                fee_cash += float(fee["cost"])
            elif currency == self.base:
                # USD-M charges no base-asset fee; were one reported, it is priced at the fill, not from cash.
                fee_outside += fee_to_quote(fee, self.symbol, price)
            else:
                # BNB: at its perpetual's last price (binanceusdm lists BNB/USDT:USDT, not the spot pair).
                rate = self._ticker_last(f"{currency}/{self.settle}:{self.settle}")
                fee_outside += fee_to_quote(fee, self.symbol, price, {currency: rate})
        side: Side = intent.side
        qty_after = ledger.qty_base + (qty if side == "buy" else -qty)
        # The position state is the sign of the holdings (the target once filled): a partial fill of a close
        # or of a flip leaves the old side, which is what the exchange holds.
        fill = ledger.apply_fill(side, qty, price, max(fee_cash, 0.0), self._position_state(qty_after))
        if fee_cash < 0:  # a rebate is paid into the wallet; apply_fill takes fees >= 0 only
            ledger.cash_quote -= fee_cash
            ledger.fees_quote += fee_cash
        ledger.fees_quote += fee_outside
        if fee_cash < 0 or fee_outside:
            fill = replace(fill, fee_quote=fill.fee_quote + min(fee_cash, 0.0) + fee_outside)
        return fill


__all__ = ["HEDGE_MODE_FIX", "FuturesBroker", "check_one_way_mode", "only_reduces", "wallet_balance"]
