"""A fake Binance USD-M futures exchange (ccxt `binanceusdm`), one-way mode, no network.

It keeps a futures account the way Binance does and answers with Binance's own JSON, parsed by a real
`ccxt.binanceusdm` instance (used only as a parser: it never sends a request). So the structures the broker
sees are exactly ccxt's for those answers: markets from an exchangeInfo entry (`parse_market`), balances from
GET /fapi/v3/account (`parse_balance_custom`: free = availableBalance, used = initialMargin, total =
marginBalance; the wallet balance only in `info`), positions from GET /fapi/v3/positionRisk
(`parse_position_risk`, flat ones dropped as ccxt's fetch_positions_risk does), orders from POST/GET
/fapi/v1/order with newOrderRespType RESULT (`parse_order`: no fills, no fee), trades from GET
/fapi/v1/userTrades (`parse_trade`: commission, commissionAsset), and errors from Binance's error bodies
through ccxt's own `handle_errors` on a fapi URL (e.g. -2022 "ReduceOnly Order is rejected." -> InvalidOrder).

The account (Decimal arithmetic): a cross wallet, one position on the symbol (signed size, average entry
price, isolated wallet), BNB for fees when `fee_asset="BNB"`. Isolated margin at leverage L: opening d at p
moves d*p/L from the cross wallet into the isolated wallet; closing d realises d*(p - entry) (sign of the
position) and releases its share of the isolated wallet; fees leave the cross wallet (or the BNB wallet).
walletBalance = cross + isolated; marginBalance = walletBalance + unrealised PnL at the mark (the ticker);
availableBalance = cross. An order is checked like Binance checks it: amount step and MARKET_LOT_SIZE
(-1111/-4005), reduceOnly that would open or flip (-2022), minimum notional unless reduceOnly (-4164), the
margin of the opening part (a short's at last * 1.0015, Binance's "assuming price") plus the fee against
what is available once the closing part released its margin (-2019), hedge mode without positionSide
(-4061). A new account is cross at 20x, as Binance's default: ritmo's start check sets isolated and 1x.

Faults and the clock come from tests.fake_exchange.FakeExchange (fail_next, fail_after_execute, down_for,
rate_limit_next, partial_fill_next, order_visibility_lag_ms, fills_per_order), plus `answer_new_next` (a
market order answered NEW, executed behind the answer) and `pay_funding`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import ROUND_DOWN, Decimal
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import ccxt

from tests.fake_exchange import FakeExchange, _dec

SYMBOL = "BTC/USDT:USDT"
BNB_SYMBOL = "BNB/USDT:USDT"
FAPI = "https://fapi.binance.com"


def _exchange_info(base: str, quote: str, *, step: str, min_notional: str, tick: str) -> dict[str, Any]:
    """One symbol of GET /fapi/v1/exchangeInfo, as Binance lists a USDT-margined perpetual."""
    return {
        "symbol": f"{base}{quote}",
        "pair": f"{base}{quote}",
        "contractType": "PERPETUAL",
        "deliveryDate": 4133404800000,
        "onboardDate": 1569398400000,
        "status": "TRADING",
        "baseAsset": base,
        "quoteAsset": quote,
        "marginAsset": quote,
        "pricePrecision": 2,
        "quantityPrecision": 3,
        "baseAssetPrecision": 8,
        "quotePrecision": 8,
        "underlyingType": "COIN",
        "triggerProtect": "0.0500",
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": "0.01", "maxPrice": "4529764", "tickSize": tick},
            {"filterType": "LOT_SIZE", "minQty": step, "maxQty": "1000", "stepSize": step},
            {"filterType": "MARKET_LOT_SIZE", "minQty": step, "maxQty": "120", "stepSize": step},
            {"filterType": "MIN_NOTIONAL", "notional": min_notional},
        ],
        "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
    }


def _s(x: Decimal) -> str:
    """A Decimal as Binance writes numbers: a plain string."""
    return f"{x.normalize():f}" if x != 0 else "0"


class FakeFutures(FakeExchange):
    """In-memory Binance USD-M futures account for one symbol, answering through ccxt's own parsers."""

    def __init__(
        self,
        *,
        symbol: str = SYMBOL,
        now_ms: int | None = None,
        wallet: float = 1_000.0,
        fee_rate: float = 0.0005,
        fee_asset: str = "USDT",
        bnb: float = 0.0,
        bnb_price: float = 600.0,
        bnb_fee_rate: float = 0.000450,
        min_notional: str = "100",
    ) -> None:
        super().__init__(
            symbol=symbol, now_ms=now_ms, exchange_id="binanceusdm", extra_symbols=(), balances={}, fee_rate=fee_rate
        )
        if fee_asset not in ("USDT", "BNB"):
            raise ValueError("fee_asset must be USDT or BNB (Binance futures charge the margin asset or BNB)")
        self.fee_asset = fee_asset
        self.bnb_fee_rate = float(bnb_fee_rate)
        self.has.update({"fetchPositions": True, "fetchPositionMode": True, "setLeverage": True, "setMarginMode": True})
        # A real ccxt.binanceusdm, used only to parse Binance's JSON into ccxt's structures (never connects).
        self.parser = ccxt.binanceusdm({"enableRateLimit": False})
        base, quote = symbol.split(":")[0].split("/")
        infos = [_exchange_info(base, quote, step="0.001", min_notional=min_notional, tick="0.10")]
        infos.append(_exchange_info("BNB", quote, step="0.01", min_notional="5", tick="0.010"))
        self.parser.set_markets([self.parser.parse_market(i) for i in infos])
        self.markets = dict(self.parser.markets)
        self.symbol = symbol
        self.settle = quote
        # Account: cross wallet, the symbol's one-way position, its isolated wallet, BNB for fees.
        self.cross = _dec(wallet)
        self.qty = Decimal(0)  # signed, base units (contract size 1)
        self.entry = Decimal(0)
        self.isolated_wallet = Decimal(0)
        self.bnb = _dec(bnb)
        self.set_ticker_price(BNB_SYMBOL, bnb_price)
        # Binance's defaults for a new account: cross margin, leverage 20, one-way mode.
        self.margin_mode = "cross"
        self.leverage = 20
        self.hedged = False
        self._answer_new = 0
        # Binance's JSON of every order (as GET /fapi/v1/order shows it) and trade (GET /fapi/v1/userTrades).
        self.raw_orders: list[dict[str, Any]] = []
        self.raw_trades: list[dict[str, Any]] = []
        self.http_log: list[tuple[str, str, dict[str, str]]] = []

    # -- test controls ------------------------------------------------------------------------------

    def wallet_balance(self) -> float:
        """The USDT walletBalance Binance reports (cross + isolated wallets), for assertions."""
        return float(self.cross + self.isolated_wallet)

    def balance(self, currency: str) -> float:
        """The wallet balance of USDT or BNB, for assertions."""
        return float(self.bnb) if currency == "BNB" else self.wallet_balance()

    def position(self) -> tuple[float, float]:
        """(signed size, entry price) of the symbol's position, for assertions."""
        return float(self.qty), float(self.entry)

    def set_balance(self, currency: str, free: float, used: float = 0.0) -> None:
        """Set the cross wallet (USDT) or the BNB wallet."""
        if currency == "BNB":
            self.bnb = _dec(free)
        else:
            self.cross = _dec(free)

    def pay_funding(self, amount: float) -> None:
        """A funding payment (negative: paid), settled into the position's isolated wallet as Binance does."""
        if self.qty == 0:
            raise ValueError("no position, no funding")
        self.isolated_wallet += _dec(amount)

    def answer_new_next(self, times: int = 1) -> None:
        """The next market orders execute, but the answer says NEW with nothing filled yet."""
        self._answer_new += times

    def binance_error(self, code: int, msg: str, path: str = "/fapi/v1/order") -> ccxt.BaseError:
        """The exception ccxt.binanceusdm raises for this Binance error body on a fapi URL."""
        body = json.dumps({"code": code, "msg": msg}, separators=(",", ":"))
        try:
            self.parser.handle_errors(400, "Bad Request", FAPI + path, "POST", {}, body, json.loads(body), {}, "")
        except ccxt.BaseError as exc:
            return exc
        raise AssertionError(f"ccxt raised nothing for {body}")

    # -- account state as Binance reports it --------------------------------------------------------

    def _mark(self) -> Decimal:
        price = self._last_price(self.symbol)
        if price is None:
            raise ccxt.ExchangeError(f"{self.id} fake: no price for {self.symbol}")
        return _dec(price)

    def _upnl(self) -> Decimal:
        return self.qty * (self._mark() - self.entry) if self.qty else Decimal(0)

    def _position_risk(self) -> dict[str, Any]:
        """GET /fapi/v3/positionRisk's entry for the symbol (one-way mode: positionSide BOTH)."""
        mark = self._mark()
        upnl = self._upnl()
        notional = self.qty * mark
        initial = abs(notional) / self.leverage
        isolated = self.margin_mode == "isolated"
        return {
            "symbol": self.market(self.symbol)["id"],
            "positionSide": "BOTH",
            "positionAmt": _s(self.qty),
            "entryPrice": _s(self.entry),
            "breakEvenPrice": _s(self.entry),
            "markPrice": _s(mark),
            "unRealizedProfit": _s(upnl),
            "liquidationPrice": "0",
            "isolatedMargin": _s(self.isolated_wallet + upnl) if isolated else "0",
            "notional": _s(notional),
            "marginAsset": self.settle,
            "isolatedWallet": _s(self.isolated_wallet) if isolated else "0",
            "initialMargin": _s(initial),
            "maintMargin": _s(abs(notional) * Decimal("0.004")),
            "positionInitialMargin": _s(initial),
            "openOrderInitialMargin": "0",
            "adl": 0,
            "bidNotional": "0",
            "askNotional": "0",
            "updateTime": self.now_ms,
        }

    def _account(self) -> dict[str, Any]:
        """GET /fapi/v3/account (single-asset mode), the answer ccxt.binanceusdm's fetch_balance parses."""
        upnl = self._upnl()
        wallet = self.cross + self.isolated_wallet
        initial = abs(self.qty * self._mark()) / self.leverage
        usdt = {
            "asset": self.settle,
            "walletBalance": _s(wallet),
            "unrealizedProfit": _s(upnl),
            "marginBalance": _s(wallet + upnl),
            "maintMargin": "0",
            "initialMargin": _s(initial),
            "positionInitialMargin": _s(initial),
            "openOrderInitialMargin": "0",
            "crossWalletBalance": _s(self.cross),
            "crossUnPnl": "0",
            "availableBalance": _s(self.cross),
            "maxWithdrawAmount": _s(self.cross),
            "updateTime": self.now_ms,
        }
        bnb = {
            "asset": "BNB",
            "walletBalance": _s(self.bnb),
            "unrealizedProfit": "0",
            "marginBalance": _s(self.bnb),
            "maintMargin": "0",
            "initialMargin": "0",
            "positionInitialMargin": "0",
            "openOrderInitialMargin": "0",
            "crossWalletBalance": _s(self.bnb),
            "crossUnPnl": "0",
            "availableBalance": _s(self.bnb),
            "maxWithdrawAmount": _s(self.bnb),
            # Binance marks assets never used with updateTime 0; ccxt skips them.
            "updateTime": self.now_ms if self.bnb else 0,
        }
        return {
            "totalInitialMargin": _s(initial),
            "totalWalletBalance": _s(wallet),
            "totalUnrealizedProfit": _s(upnl),
            "totalMarginBalance": _s(wallet + upnl),
            "availableBalance": _s(self.cross),
            "maxWithdrawAmount": _s(self.cross),
            "assets": [usdt, bnb],
            "positions": [],
        }

    # -- ccxt unified API ---------------------------------------------------------------------------

    def amount_to_precision(self, symbol: str, amount: float) -> str:
        """ccxt's own amount_to_precision on the parsed market (TRUNCATE; InvalidOrder below one step)."""
        return str(self.parser.amount_to_precision(symbol, amount))

    def fetch_balance(self, params: dict | None = None) -> dict[str, Any]:
        """ccxt.binanceusdm's balance: parse_balance_custom of GET /fapi/v3/account, type linear."""
        self._enter("fetch_balance", params=dict(params or {}))
        return self.parser.parse_balance_custom(self._account(), "linear", None, False)

    def fetch_positions(self, symbols: list[str] | None = None, params: dict | None = None) -> list[dict[str, Any]]:
        """ccxt.binanceusdm's positions: positionRisk entries with an entry price (open ones) for `symbols`."""
        self._enter("fetch_positions", symbols=symbols)
        raw = [self._position_risk()]
        if self.hedged:
            # Hedge mode lists a LONG and a SHORT side per symbol.
            raw = [{**raw[0], "positionSide": side} for side in ("LONG", "SHORT")]
        out = [self.parser.parse_position_risk(r) for r in raw if Decimal(r["entryPrice"]) > 0]
        if symbols is not None:
            out = [p for p in out if p["symbol"] in symbols]
        return out

    def fetch_position_mode(self, symbol: str | None = None, params: dict | None = None) -> dict[str, Any]:
        """GET /fapi/v1/positionSide/dual as ccxt returns it: {'info': ..., 'hedged': bool}."""
        self._enter("fetch_position_mode", symbol=symbol)
        info = {"dualSidePosition": self.hedged}
        return {"info": info, "hedged": self.hedged}

    def set_margin_mode(self, margin_mode: str, symbol: str | None = None, params: dict | None = None) -> dict:
        """POST /fapi/v1/marginType; ccxt swallows -4046 "No need to change margin type." and returns it."""
        self._enter("set_margin_mode", mode=margin_mode, symbol=symbol)
        mode = margin_mode.lower()
        if mode == self.margin_mode:
            return {"code": -4046, "msg": "No need to change margin type."}
        if self.qty != 0:
            raise self.binance_error(
                -4048, "Margin type cannot be changed if there exists position.", "/fapi/v1/marginType"
            )
        self.margin_mode = mode
        return {"code": 200, "msg": "success"}

    def set_leverage(self, leverage: int, symbol: str | None = None, params: dict | None = None) -> dict:
        """POST /fapi/v1/leverage."""
        self._enter("set_leverage", leverage=leverage, symbol=symbol)
        self.leverage = int(leverage)
        return {"leverage": self.leverage, "maxNotionalValue": "1000000", "symbol": self.market(self.symbol)["id"]}

    def create_order(
        self,
        symbol: str,
        type: str,
        side: str,
        amount: float,
        price: float | None = None,
        params: dict | None = None,
    ) -> dict[str, Any]:
        """A market order in one-way mode, checked and booked like Binance futures; ccxt's parse of the answer."""
        params = dict(params or {})
        self._enter("create_order", symbol=symbol, type=type, side=side, amount=amount, price=price, params=params)
        if type != "market" or price is not None:
            raise ValueError("fake: market orders with price=None only")
        answer = self._place(symbol, side, _dec(amount), params)
        self._exit("create_order")
        return self.parser.parse_order(answer, self.market(symbol))

    def _place(self, symbol: str, side: str, qty: Decimal, params: Mapping[str, Any]) -> dict[str, Any]:
        """POST /fapi/v1/order type MARKET: check, execute, store; Binance's RESULT answer (raw JSON)."""
        market = self.market(symbol)
        if symbol != self.symbol:
            raise ccxt.BadSymbol(f"{self.id} fake trades {self.symbol} only")
        reduce_only = str(params.get("reduceOnly", False)).lower() == "true"
        if self.hedged and params.get("positionSide") in (None, "BOTH"):
            raise self.binance_error(-4061, "Order's position side does not match user's setting.")
        step = _dec(market["precision"]["amount"])
        if qty <= 0 or qty % step != 0:
            raise self.binance_error(-1111, "Precision is over the maximum defined for this asset.")
        if qty < _dec(market["limits"]["amount"]["min"]) or qty > _dec(market["limits"]["market"]["max"]):
            raise self.binance_error(-4005, "Quantity greater than max quantity.")
        fill_price = _dec(self.fill_price) if self.fill_price is not None else self._mark()
        sign = 1 if side == "buy" else -1
        opposite = self.qty != 0 and (self.qty > 0) != (sign > 0)
        closing = min(qty, abs(self.qty)) if opposite else Decimal(0)
        opening = qty - closing
        if reduce_only and opening > 0:
            raise self.binance_error(-2022, "ReduceOnly Order is rejected.")
        min_cost = market["limits"]["cost"]["min"]
        if not reduce_only and min_cost is not None and qty * fill_price < _dec(min_cost):
            raise self.binance_error(
                -4164, f"Order's notional must be no smaller than {min_cost:g} (unless you choose reduce only)."
            )
        if opening > 0:
            # Margin for the opening part, once the closing part has released its margin and realised its PnL.
            released = Decimal(0)
            if closing:
                released = self.isolated_wallet * closing / abs(self.qty) + closing * (fill_price - self.entry) * (
                    1 if self.qty > 0 else -1
                )
            fee = qty * fill_price * _dec(self.fee_rate) if self.fee_asset == "USDT" else Decimal(0)
            # Binance's cost to open: initial margin at the "assuming price", max(last * 1.0015, mark) for a short.
            assumed = fill_price * Decimal("1.0015") if side == "sell" else fill_price
            if opening * assumed / self.leverage + fee > self.cross + released:
                raise self.binance_error(-2019, "Margin is insufficient.")
        ratio = self._partial.popleft() if self._partial else 1.0
        filled = (qty * _dec(ratio) / step).to_integral_value(rounding=ROUND_DOWN) * step if ratio < 1 else qty
        order_id = self._next_order_id
        self._next_order_id += 1
        client_id = params.get("newClientOrderId") or f"x-fake{order_id}"
        raw_trades = self._execute(order_id, side, filled, fill_price, step)
        cum_quote = sum((_dec(t["quoteQty"]) for t in raw_trades), Decimal(0))
        average = cum_quote / filled if filled else Decimal(0)
        raw = {
            "orderId": order_id,
            "symbol": market["id"],
            "status": "FILLED" if filled == qty else "EXPIRED",
            "clientOrderId": client_id,
            "price": "0.00",
            "avgPrice": _s(average),
            "origQty": _s(qty),
            "executedQty": _s(filled),
            "cumQty": _s(filled),
            "cumQuote": _s(cum_quote),
            "timeInForce": "GTC",
            "type": "MARKET",
            "reduceOnly": reduce_only,
            "closePosition": False,
            "side": side.upper(),
            "positionSide": "BOTH",
            "stopPrice": "0.00",
            "workingType": "CONTRACT_PRICE",
            "priceProtect": False,
            "origType": "MARKET",
            "priceMatch": "NONE",
            "selfTradePreventionMode": "EXPIRE_MAKER",
            "goodTillDate": 0,
            "updateTime": self.now_ms,
        }
        # GET /fapi/v1/order adds the creation time; that is what fetch_order answers later.
        self.raw_orders.append({**raw, "time": self.now_ms})
        self.raw_trades.extend(raw_trades)
        self.orders.append(self.parser.parse_order(self.raw_orders[-1], market))
        self.trades.extend(self.parser.parse_trade(t, market) for t in raw_trades)
        if self._answer_new:
            self._answer_new -= 1
            return {**raw, "status": "NEW", "avgPrice": "0.00", "executedQty": "0", "cumQty": "0", "cumQuote": "0"}
        return raw

    def _execute(self, order_id: int, side: str, filled: Decimal, price: Decimal, step: Decimal) -> list[dict]:
        """Book `filled` at `price` (later pieces a tick worse) into the account; the userTrades entries."""
        raw_trades = []
        n = max(1, min(self.fills_per_order, int(filled / step))) if filled > 0 else 0
        piece = (filled / n / step).to_integral_value(rounding=ROUND_DOWN) * step if n else Decimal(0)
        tick = _dec(self.market(self.symbol)["precision"]["price"])
        for i in range(n):
            part = piece if i < n - 1 else filled - piece * (n - 1)
            p = price + tick * i if side == "buy" else price - tick * i
            pnl = self._trade(side, part, p)
            cost = part * p
            if self.fee_asset == "BNB" and self.bnb > 0:
                fee_cur = "BNB"
                fee = (cost * _dec(self.bnb_fee_rate) / _dec(self._last_price(BNB_SYMBOL))).quantize(
                    Decimal("1e-8"), ROUND_DOWN
                )
                self.bnb -= fee
            else:
                fee_cur = self.settle
                fee = (cost * _dec(self.fee_rate)).quantize(Decimal("1e-8"), ROUND_DOWN)
                self.cross -= fee
            raw_trades.append(
                {
                    "symbol": self.market(self.symbol)["id"],
                    "id": self._next_trade_id,
                    "orderId": order_id,
                    "side": side.upper(),
                    "price": _s(p),
                    "qty": _s(part),
                    "realizedPnl": _s(pnl),
                    "marginAsset": self.settle,
                    "quoteQty": _s(cost),
                    "commission": _s(fee),
                    "commissionAsset": fee_cur,
                    "time": self.now_ms,
                    "positionSide": "BOTH",
                    "maker": False,
                    "buyer": side == "buy",
                }
            )
            self._next_trade_id += 1
        return raw_trades

    def _trade(self, side: str, qty: Decimal, price: Decimal) -> Decimal:
        """Move the position by one trade: close first (realise PnL, release margin), then open; the PnL."""
        sign = 1 if side == "buy" else -1
        pnl = Decimal(0)
        if self.qty != 0 and (self.qty > 0) != (sign > 0):
            closing = min(qty, abs(self.qty))
            pos_sign = 1 if self.qty > 0 else -1
            pnl = closing * (price - self.entry) * pos_sign
            released = self.isolated_wallet * closing / abs(self.qty)
            self.isolated_wallet -= released
            self.cross += released + pnl
            self.qty += sign * closing
            qty -= closing
            if self.qty == 0:
                # Rounding dust of the proportional release goes back to the cross wallet with the position.
                self.cross += self.isolated_wallet
                self.isolated_wallet = Decimal(0)
                self.entry = Decimal(0)
        if qty > 0:
            margin = qty * price / self.leverage
            self.entry = (abs(self.qty) * self.entry + qty * price) / (abs(self.qty) + qty)
            self.qty += sign * qty
            self.cross -= margin
            self.isolated_wallet += margin
        return pnl

    def fetch_order(self, id: str | None, symbol: str | None = None, params: dict | None = None) -> dict[str, Any]:
        """By id or origClientOrderId (newest first), as FakeExchange; unknown: -2013 as ccxt raises it."""
        try:
            return super().fetch_order(id, symbol, params)
        except ccxt.OrderNotFound:
            raise self.binance_error(-2013, "Order does not exist.") from None

    # -- HTTP: the real ccxt.binanceusdm client against this account ------------------------------------

    def serve(self, url: str, method: str = "GET", headers: Any = None, body: str | None = None) -> Any:
        """Answer one request of a real ccxt.binanceusdm as Binance would (install as its `fetch`).

        Every request is logged in `http_log` as (method, path, params); a Binance error is raised as the
        exception ccxt's handle_errors makes of it. Faults injected on the unified names apply here too.
        """
        parts = urlsplit(url)
        params = dict(parse_qsl(parts.query)) | dict(parse_qsl(body or ""))
        path = parts.path
        self.http_log.append((method, path, params))
        symbol = next((m["symbol"] for m in self.markets.values() if m["id"] == params.get("symbol")), None)
        if (method, path) == ("POST", "/fapi/v1/order"):
            self._enter("create_order", symbol=symbol, side=params["side"].lower(), params=params)
            if params.get("type") != "MARKET" or "price" in params:
                raise ValueError("fake: MARKET orders without a price only")
            answer = self._place(str(symbol), params["side"].lower(), Decimal(params["quantity"]), params)
            self._exit("create_order")
            return answer
        if (method, path) == ("GET", "/fapi/v1/order"):
            self._enter("fetch_order", params=params)
            found = [
                o
                for o in self.raw_orders
                if str(o["orderId"]) == params.get("orderId") or o["clientOrderId"] == params.get("origClientOrderId")
            ]
            if not found:
                raise self.binance_error(-2013, "Order does not exist.")
            return found[-1]
        if (method, path) == ("GET", "/fapi/v1/userTrades"):
            self._enter("fetch_my_trades", params=params)
            trades = [t for t in self.raw_trades if t["time"] >= int(params.get("startTime", 0))]
            return [t for t in trades if "orderId" not in params or str(t["orderId"]) == params["orderId"]]
        if (method, path) == ("GET", "/fapi/v3/account"):
            self._enter("fetch_balance")
            return self._account()
        if (method, path) == ("GET", "/fapi/v3/positionRisk"):
            self._enter("fetch_positions")
            return [self._position_risk()]
        if (method, path) == ("GET", "/fapi/v1/positionSide/dual"):
            self._enter("fetch_position_mode")
            return {"dualSidePosition": self.hedged}
        if (method, path) == ("GET", "/fapi/v1/leverageBracket"):
            bracket = {"bracket": 1, "initialLeverage": 125, "notionalCap": 50000, "notionalFloor": 0}
            return [{"symbol": "BTCUSDT", "brackets": [{**bracket, "maintMarginRatio": 0.004, "cum": 0.0}]}]
        if (method, path) == ("GET", "/fapi/v1/ticker/24hr"):
            self._enter("fetch_ticker", symbol=symbol)
            last = _s(_dec(self._last_price(str(symbol)) or 0))
            return {"symbol": params.get("symbol"), "lastPrice": last, "closeTime": self.now_ms}
        if (method, path) == ("POST", "/fapi/v1/marginType"):
            mode = params["marginType"].lower().replace("crossed", "cross")
            if mode == self.margin_mode:
                # Binance answers 400 -4046; ccxt's set_margin_mode swallows the MarginModeAlreadySet it makes of it.
                raise self.binance_error(-4046, "No need to change margin type.", path)
            return self.set_margin_mode(mode, symbol)
        if (method, path) == ("POST", "/fapi/v1/leverage"):
            return self.set_leverage(int(params["leverage"]), symbol)
        raise AssertionError(f"fake futures: no route for {method} {path}")


def ledger_cash(fake: FakeFutures) -> float:
    """What the ledger's cash must be for this account: walletBalance - q * entry."""
    qty, entry = fake.position()
    return fake.wallet_balance() - qty * entry


__all__ = ["BNB_SYMBOL", "SYMBOL", "FakeFutures", "ledger_cash"]
