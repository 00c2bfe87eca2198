"""A small fake of Binance's spot REST API on 127.0.0.1, for tests that drive the REAL ccxt.binance client.

It implements what ccxt needs to load spot markets, read time, candles, tickers, the account and trades,
place MARKET orders and look them up, and read the key's API restrictions, and it checks requests the way
Binance does:
- signed endpoints need the X-MBX-APIKEY header (missing: 401 -2014, wrong: 401 -2015), a `timestamp`
  within `recvWindow` of the server clock (else 400 -1021) and an HMAC-SHA256 `signature` of the query
  string + body with the secret (else 400 -1022);
- orders are checked against the symbol's filters: precision (-1111), LOT_SIZE and NOTIONAL (-1013
  "Filter failure: ..."), balance (-2010 "Account has insufficient balance for requested action."),
  newClientOrderId's format (-1100); MARKET only, by `quantity` (a `quoteOrderQty` is refused loudly,
  since ritmo must never send one); fills carry commission and commissionAsset (the received asset by
  default, as on Binance, or BNB, or a fixed asset); a filled order's client id may be reused;
- lookups of unknown orders answer 400 -2013 "Order does not exist.".
Faults are injected per endpoint (`fail_next`, `fail_next_order`): 429/418 with Retry-After, HTTP 500
before or after executing an order, -1007 after executing, a hang past ccxt's timeout (before or after
executing), a dropped connection, -2015. Balances, orders, trades and every request (with the result of
its signature check) are kept for assertions. `ccxt_config()` is the RITMO_EXCHANGE_CONFIG that points
every Binance API base URL of ccxt at this server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import ccxt

# A known key and secret for tests: they must never appear in logs, exceptions or files.
TEST_API_KEY = "rtTestKey7Qw3ZpLk9VbN2xYc5Hf8Jd4Ms6Ue1Ra0TgWoIyEhKnBvCxLzPqSaDfGhJkL"
TEST_API_SECRET = "rtTestSecret3Nf8Zx2Lq7Wk5Vb9Hc4Jd6Ms1Ue0RaTgYoPiUyTrEwQaSdFgHjKlZxCv"

CANDLE_MS = 300_000
DEFAULT_RECV_WINDOW_MS = 5_000
MAX_RECV_WINDOW_MS = 60_000
CLIENT_ORDER_ID_RE = re.compile(r"^[.A-Za-z0-9_-]{1,36}$")

# Fault kinds of fail_next; *_after_execute ones only make sense on POST /api/v3/order.
FAULT_KINDS = (
    "429",
    "418",
    "500",
    "timeout",
    "reset",
    "-2015",
    "500_after_execute",
    "1007_after_execute",
    "timeout_after_execute",
    "reset_after_execute",
)

_SYMBOLS = {
    # symbol: (base, quote, tickSize, stepSize, minQty, maxQty, marketMaxQty, minNotional)
    "BTCUSDT": ("BTC", "USDT", "0.01", "0.00001", "0.00001", "9000", "100", "5"),
    "BNBUSDT": ("BNB", "USDT", "0.01", "0.001", "0.001", "900000", "5000", "5"),
}


def _fmt(value: Decimal | float | int) -> str:
    """A number as Binance writes it: a string with 8 decimals."""
    return f"{Decimal(str(value)).quantize(Decimal('0.00000001'), rounding=ROUND_DOWN):f}"


@dataclass
class RecordedRequest:
    """One request as the fake server saw it."""

    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    signed: bool = False
    signature_ok: bool | None = None
    status: int = 0
    fault: str | None = None


@dataclass
class _Fault:
    kind: str
    retry_after_s: int | None = None


@dataclass
class _State:
    balances: dict[str, list[Decimal]] = field(default_factory=dict)  # asset -> [free, locked]
    orders: list[dict[str, Any]] = field(default_factory=list)
    trades: list[dict[str, Any]] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)


class _Reply(Exception):
    """Raised inside a handler to answer with an HTTP status and a JSON (or text) body."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _error(status: int, code: int, msg: str) -> _Reply:
    return _Reply(status, {"code": code, "msg": msg})


class FakeBinance:
    """The fake Binance spot REST server; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        *,
        api_key: str = TEST_API_KEY,
        api_secret: str = TEST_API_SECRET,
        price: float = 50_000.0,
        bnb_price: float = 600.0,
        balances: dict[str, float] | None = None,
        fee_rate: float = 0.001,
        fee_asset: str | None = None,
        bnb_fee_rate: float = 0.00075,
        server_offset_ms: int = 0,
        can_withdraw: bool = False,
        ip_restricted: bool = True,
        hang_s: float = 2.0,
        candles: Any = None,
        port: int = 0,
    ) -> None:
        # 0: a free port chosen at start(); a fixed one lets a client be pointed here before the server is up.
        self._bind_port = int(port)
        self.api_key = api_key
        self.api_secret = api_secret
        self.prices: dict[str, Decimal] = {"BTCUSDT": Decimal(str(price)), "BNBUSDT": Decimal(str(bnb_price))}
        # Real candles (a DataFrame with open/high/low/close/volume): BTCUSDT's candle at time ts is row
        # (ts // 5 min) mod len, and its price (ticker, fills) is the close of the last closed candle.
        self.candle_rows = None
        if candles is not None:
            self.candle_rows = candles[["open", "high", "low", "close", "volume"]].to_numpy(dtype=float)
        self.fee_rate = Decimal(str(fee_rate))
        # None: charged in the asset received (Binance's default); "BNB": in BNB while there is enough.
        self.fee_asset = fee_asset
        self.bnb_fee_rate = Decimal(str(bnb_fee_rate))
        # The server's clock runs this far ahead of the local clock (negative: behind).
        self.server_offset_ms = int(server_offset_ms)
        self.can_withdraw = can_withdraw
        self.ip_restricted = ip_restricted
        # False: every signed call answers -2015 even with the right key (a revoked key or a removed IP).
        self.key_enabled = True
        # How long a "timeout" fault holds the answer back: longer than the client's timeout.
        self.hang_s = hang_s
        # Fills per market order (Binance splits a market order over the book levels it takes).
        self.fills_per_order = 1
        self._lock = threading.RLock()
        self._state = _State()
        for asset, amount in (balances if balances is not None else {"USDT": 10_000.0}).items():
            self._state.balances[asset] = [Decimal(str(amount)), Decimal("0")]
        self._faults: dict[tuple[str, str], deque[_Fault]] = defaultdict(deque)
        self._next_order_id = 1000
        self._next_trade_id = 5000
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> FakeBinance:
        """Listen on 127.0.0.1 (on `port`, else a free port), serving from a background thread."""
        handler = type("_BoundHandler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self._bind_port), handler)
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits up to one interval, once per test.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-binance", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hanging handlers are woken up."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeBinance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the server listens on (the fixed port it will listen on, before start())."""
        if self._server is None:
            assert self._bind_port, "start() first"
            return self._bind_port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The server's base URL, http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    def ccxt_config(self, *, timeout_ms: int = 2_000, fast: bool = True) -> dict[str, Any]:
        """RITMO_EXCHANGE_CONFIG for ccxt.binance: every API base URL on this server, no calls we lack.

        Every entry of ccxt's `urls['api']` is replaced (not only the ones we implement), so a call to an
        endpoint this fake lacks lands here as a 404 instead of on the real exchange.
        """
        api = {}
        for name, real in ccxt.binance().describe()["urls"]["api"].items():
            path = urlsplit(real).path if isinstance(real, str) else ""
            api[name] = self.url + path
        config: dict[str, Any] = {
            "urls": {"api": api},
            "timeout": timeout_ms,
            "options": {
                # Spot only: no fapi/dapi exchangeInfo; no /sapi margin pairs; no /sapi/v1/capital/config/getall.
                "fetchMarkets": {"types": ["spot"]},
                "fetchMargins": False,
                "fetchCurrencies": False,
            },
        }
        if fast:
            # ccxt's throttle sleeps rateLimit * cost ms between calls (exchangeInfo costs 20): 1 s in tests.
            config["rateLimit"] = 1
        return config

    # -- test controls and assertions ---------------------------------------------------------------

    def server_ms(self) -> int:
        """The server's clock in epoch ms."""
        return time.time_ns() // 1_000_000 + self.server_offset_ms

    def set_price(self, price: float, symbol: str = "BTCUSDT") -> None:
        """The price the next market order of `symbol` fills at (and the ticker's last)."""
        with self._lock:
            self.prices[symbol] = Decimal(str(price))

    def fail_next(self, path: str, kind: str, *, method: str = "GET", times: int = 1, retry_after_s: int = 2) -> None:
        """Make the next `times` requests to `method path` (e.g. GET /api/v3/account) fail with `kind`."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}")
        with self._lock:
            self._faults[(method.upper(), path)].extend(_Fault(kind, retry_after_s) for _ in range(times))

    def fail_next_order(self, kind: str, *, retry_after_s: int = 2) -> None:
        """Make the next POST /api/v3/order fail with `kind` (e.g. "500_after_execute")."""
        self.fail_next("/api/v3/order", kind, method="POST", retry_after_s=retry_after_s)

    def set_balance(self, asset: str, free: float, locked: float = 0.0) -> None:
        """Set one asset's free and locked balance."""
        with self._lock:
            self._state.balances[asset] = [Decimal(str(free)), Decimal(str(locked))]

    def balance(self, asset: str) -> tuple[float, float]:
        """(free, locked) of an asset."""
        with self._lock:
            free, locked = self._state.balances.get(asset, [Decimal(0), Decimal(0)])
            return float(free), float(locked)

    @property
    def orders(self) -> list[dict[str, Any]]:
        """Every order the server executed, as Binance's order records (oldest first)."""
        with self._lock:
            return [dict(o) for o in self._state.orders]

    @property
    def trades(self) -> list[dict[str, Any]]:
        """Every fill, as Binance's myTrades records (oldest first)."""
        with self._lock:
            return [dict(t) for t in self._state.trades]

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received, in order."""
        with self._lock:
            return list(self._state.requests)

    def requests_to(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        """The requests received for one path (and method)."""
        return [r for r in self.requests if r.path == path and (method is None or r.method == method.upper())]

    # -- request handling (called from handler threads) ---------------------------------------------

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get((method, path))
            return queue.popleft() if queue else None

    def _hang(self) -> None:
        self._stopping.wait(self.hang_s)

    def _check_signed(self, rec: RecordedRequest, headers: Any, total_params: str) -> None:
        """Binance's checks of a SIGNED endpoint: key header, signature, timestamp within recvWindow."""
        rec.signed = True
        key = headers.get("X-MBX-APIKEY")
        if not key:
            raise _error(401, -2014, "API-key format invalid.")
        if not hmac.compare_digest(key, self.api_key) or not self.key_enabled:
            raise _error(401, -2015, "Invalid API-key, IP, or permissions for action.")
        match = re.search(r"(?:^|&)signature=([^&]*)", total_params)
        if match is None:
            raise _error(400, -1102, "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.")
        payload = total_params[: match.start()] + total_params[match.end() :]
        expected = hmac.new(self.api_secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        rec.signature_ok = hmac.compare_digest(expected, match.group(1))
        if not rec.signature_ok:
            raise _error(400, -1022, "Signature for this request is not valid.")
        params = rec.params
        try:
            timestamp = int(params["timestamp"])
        except (KeyError, ValueError):
            raise _error(
                400, -1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed."
            ) from None
        recv_window = int(params.get("recvWindow", DEFAULT_RECV_WINDOW_MS))
        if recv_window > MAX_RECV_WINDOW_MS:
            raise _error(400, -1131, "recvWindow must be less than 60000")
        now = self.server_ms()
        if timestamp > now + 1_000:
            raise _error(400, -1021, "Timestamp for this request was 1000ms ahead of the server's time.")
        if now - timestamp > recv_window:
            raise _error(400, -1021, "Timestamp for this request is outside of the recvWindow.")

    def _symbol(self, params: dict[str, str]) -> str:
        symbol = params.get("symbol")
        if not symbol:
            raise _error(400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        if symbol not in _SYMBOLS:
            raise _error(400, -1121, "Invalid symbol.")
        return symbol

    # -- public endpoints ---------------------------------------------------------------------------

    def _exchange_info(self, params: dict[str, str]) -> Any:
        symbols = []
        for sym, (base, quote, tick, step, min_qty, max_qty, market_max, min_notional) in _SYMBOLS.items():
            symbols.append(
                {
                    "symbol": sym,
                    "status": "TRADING",
                    "baseAsset": base,
                    "baseAssetPrecision": 8,
                    "quoteAsset": quote,
                    "quotePrecision": 8,
                    "quoteAssetPrecision": 8,
                    "baseCommissionPrecision": 8,
                    "quoteCommissionPrecision": 8,
                    "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
                    "icebergAllowed": True,
                    "ocoAllowed": True,
                    "quoteOrderQtyMarketAllowed": True,
                    "allowTrailingStop": True,
                    "cancelReplaceAllowed": True,
                    "isSpotTradingAllowed": True,
                    "isMarginTradingAllowed": False,
                    "filters": [
                        {"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": "1000000.00", "tickSize": tick},
                        {"filterType": "LOT_SIZE", "minQty": min_qty, "maxQty": max_qty, "stepSize": step},
                        {"filterType": "MARKET_LOT_SIZE", "minQty": "0", "maxQty": market_max, "stepSize": "0"},
                        {
                            "filterType": "NOTIONAL",
                            "minNotional": min_notional,
                            "applyMinToMarket": True,
                            "maxNotional": "9000000.00",
                            "applyMaxToMarket": False,
                            "avgPriceMins": 5,
                        },
                    ],
                    "permissions": [],
                    "permissionSets": [["SPOT"]],
                    "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
                    "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
                }
            )
        return {
            "timezone": "UTC",
            "serverTime": self.server_ms(),
            "rateLimits": [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000}],
            "exchangeFilters": [],
            "symbols": symbols,
        }

    def _price(self, symbol: str) -> Decimal:
        """The symbol's price now: with real candles, the close of the last closed candle."""
        if symbol == "BTCUSDT" and self.candle_rows is not None:
            last_closed = self.server_ms() // CANDLE_MS - 1
            return Decimal(f"{self.candle_rows[last_closed % len(self.candle_rows), 3]:.2f}")
        return self.prices[symbol]

    def _real_candle(self, ts_ms: int, now_ms: int) -> list[Any]:
        """Row (ts // 5 min) mod len of the real candles; the forming one is partial."""
        assert self.candle_rows is not None
        o, h, lo, c, v = self.candle_rows[(ts_ms // CANDLE_MS) % len(self.candle_rows)]
        if ts_ms + CANDLE_MS > now_ms:
            frac = (now_ms - ts_ms) / CANDLE_MS
            c, v = o + (c - o) * frac, v * frac
            h, lo = max(o, c), min(o, c)
        return [
            ts_ms,
            f"{o:.2f}",
            f"{h:.2f}",
            f"{lo:.2f}",
            f"{c:.2f}",
            f"{v:.8f}",
            ts_ms + CANDLE_MS - 1,
            f"{v * c:.8f}",
            100,
            f"{v / 2:.8f}",
            f"{v * c / 2:.8f}",
            "0",
        ]

    def _candle(self, symbol: str, ts_ms: int, now_ms: int) -> list[Any]:
        """A deterministic synthetic candle around the symbol's price; the forming one is partial."""
        if symbol == "BTCUSDT" and self.candle_rows is not None:
            return self._real_candle(ts_ms, now_ms)
        price = float(self.prices[symbol])
        i = ts_ms // CANDLE_MS
        open_ = price * (1 + 0.002 * math.sin(i / 7))
        close = price * (1 + 0.002 * math.sin((i + 1) / 7))
        if ts_ms + CANDLE_MS > now_ms:
            close = open_ + (close - open_) * (now_ms - ts_ms) / CANDLE_MS
        high, low = max(open_, close) * 1.0005, min(open_, close) * 0.9995
        return [
            ts_ms,
            f"{open_:.2f}",
            f"{high:.2f}",
            f"{low:.2f}",
            f"{close:.2f}",
            "12.34500000",
            ts_ms + CANDLE_MS - 1,
            "617250.00000000",
            100,
            "6.00000000",
            "300000.00000000",
            "0",
        ]

    def _klines(self, params: dict[str, str]) -> Any:
        symbol = self._symbol(params)
        if params.get("interval") != "5m":
            raise _error(400, -1120, "Invalid interval.")
        limit = min(int(params.get("limit", 500)), 1000)
        now = self.server_ms()
        last_open = now // CANDLE_MS * CANDLE_MS
        end = min(int(params.get("endTime", last_open)), last_open)
        if "startTime" in params:
            first = -(-int(params["startTime"]) // CANDLE_MS) * CANDLE_MS
        else:
            first = end - (limit - 1) * CANDLE_MS
        out = []
        ts = first
        while ts <= end and len(out) < limit:
            out.append(self._candle(symbol, ts, now))
            ts += CANDLE_MS
        return out

    def _ticker_24hr(self, params: dict[str, str]) -> Any:
        symbol = self._symbol(params)
        now = self.server_ms()
        last = _fmt(self._price(symbol))
        return {
            "symbol": symbol,
            "priceChange": "0.00000000",
            "priceChangePercent": "0.000",
            "weightedAvgPrice": last,
            "prevClosePrice": last,
            "lastPrice": last,
            "lastQty": "0.01000000",
            "bidPrice": last,
            "bidQty": "1.00000000",
            "askPrice": last,
            "askQty": "1.00000000",
            "openPrice": last,
            "highPrice": last,
            "lowPrice": last,
            "volume": "1000.00000000",
            "quoteVolume": "50000000.00000000",
            "openTime": now - 86_400_000,
            "closeTime": now,
            "firstId": 1,
            "lastId": 1000,
            "count": 1000,
        }

    def _ticker_price(self, params: dict[str, str]) -> Any:
        symbol = self._symbol(params)
        return {"symbol": symbol, "price": _fmt(self._price(symbol))}

    # -- signed endpoints ---------------------------------------------------------------------------

    def _account(self, params: dict[str, str]) -> Any:
        with self._lock:
            balances = [
                {"asset": a, "free": _fmt(free), "locked": _fmt(locked)}
                for a, (free, locked) in sorted(self._state.balances.items())
            ]
        return {
            "makerCommission": 10,
            "takerCommission": 10,
            "buyerCommission": 0,
            "sellerCommission": 0,
            "commissionRates": {"maker": "0.00100000", "taker": "0.00100000", "buyer": "0", "seller": "0"},
            "canTrade": True,
            "canWithdraw": self.can_withdraw,
            "canDeposit": True,
            "brokered": False,
            "requireSelfTradePrevention": False,
            "preventSor": False,
            "updateTime": self.server_ms(),
            "accountType": "SPOT",
            "balances": balances,
            "permissions": ["SPOT"],
            "uid": 354937868,
        }

    def _api_restrictions(self, params: dict[str, str]) -> Any:
        return {
            "ipRestrict": self.ip_restricted,
            "createTime": 1_704_067_200_000,
            "enableInternalTransfer": False,
            "enableFutures": False,
            "enablePortfolioMarginTrading": False,
            "enableVanillaOptions": False,
            "permitsUniversalTransfer": False,
            "enableReading": True,
            "enableSpotAndMarginTrading": True,
            "enableWithdrawals": self.can_withdraw,
            "enableMargin": False,
        }

    def _new_order(self, params: dict[str, str]) -> dict[str, Any]:
        symbol = self._symbol(params)
        base, quote, _tick, step, min_qty, max_qty, market_max, min_notional = _SYMBOLS[symbol]
        side = params.get("side", "")
        if side not in ("BUY", "SELL"):
            raise _error(400, -1117, "Invalid side.")
        if params.get("type") != "MARKET":
            raise _error(400, -1116, "Invalid orderType.")  # this fake serves MARKET orders only
        if "quoteOrderQty" in params:
            # Binance would take it as a quote amount; ritmo must never send one (ccxt does when price is set).
            raise _error(400, -1106, "Parameter 'quoteOrderQty' sent when not required.")
        client_id = params.get("newClientOrderId") or f"fake{self._next_order_id}"
        if not CLIENT_ORDER_ID_RE.match(client_id):
            raise _error(
                400,
                -1100,
                "Illegal characters found in parameter 'newClientOrderId'; "
                "legal range is '^[\\.A-Z\\:/a-z0-9_-]{1,36}$'.",
            )
        try:
            qty = Decimal(params["quantity"])
        except (KeyError, ArithmeticError):
            raise _error(
                400, -1102, "Mandatory parameter 'quantity' was not sent, was empty/null, or malformed."
            ) from None
        if qty.as_tuple().exponent < -8:  # type: ignore[operator]
            raise _error(400, -1111, "Parameter 'quantity' has too much precision.")
        if qty < Decimal(min_qty) or qty > Decimal(max_qty) or (qty - Decimal(min_qty)) % Decimal(step) != 0:
            raise _error(400, -1013, "Filter failure: LOT_SIZE")
        if qty > Decimal(market_max):
            raise _error(400, -1013, "Filter failure: MARKET_LOT_SIZE")
        with self._lock:
            price = self._price(symbol)
            cost = qty * price
            if cost < Decimal(min_notional):
                raise _error(400, -1013, "Filter failure: NOTIONAL")
            bal = self._state.balances
            for asset in (base, quote, "BNB"):
                bal.setdefault(asset, [Decimal(0), Decimal(0)])
            spend_asset, spend = (quote, cost) if side == "BUY" else (base, qty)
            if bal[spend_asset][0] < spend:
                raise _error(400, -2010, "Account has insufficient balance for requested action.")
            received_asset = base if side == "BUY" else quote
            order_id = self._next_order_id
            self._next_order_id += 1
            now = self.server_ms()
            fills = []
            pieces = self._split(qty, Decimal(step))
            for n, piece in enumerate(pieces):
                fill_price = price + Decimal("0.01") * n  # later book levels are a tick worse for a buyer
                if side == "SELL":
                    fill_price = price - Decimal("0.01") * n
                fill_cost = piece * fill_price
                fee_asset, fee = self._fee(side, piece, fill_cost, base, quote)
                bal[spend_asset][0] -= fill_cost if side == "BUY" else piece
                bal[received_asset][0] += piece if side == "BUY" else fill_cost
                bal[fee_asset][0] -= fee
                trade_id = self._next_trade_id
                self._next_trade_id += 1
                fills.append(
                    {
                        "price": _fmt(fill_price),
                        "qty": _fmt(piece),
                        "commission": _fmt(fee),
                        "commissionAsset": fee_asset,
                        "tradeId": trade_id,
                    }
                )
                self._state.trades.append(
                    {
                        "symbol": symbol,
                        "id": trade_id,
                        "orderId": order_id,
                        "orderListId": -1,
                        "price": _fmt(fill_price),
                        "qty": _fmt(piece),
                        "quoteQty": _fmt(fill_cost),
                        "commission": _fmt(fee),
                        "commissionAsset": fee_asset,
                        "time": now,
                        "isBuyer": side == "BUY",
                        "isMaker": False,
                        "isBestMatch": True,
                    }
                )
            quote_qty = sum((Decimal(f["qty"]) * Decimal(f["price"]) for f in fills), Decimal(0))
            order = {
                "symbol": symbol,
                "orderId": order_id,
                "orderListId": -1,
                "clientOrderId": client_id,
                "price": "0.00000000",
                "origQty": _fmt(qty),
                "executedQty": _fmt(qty),
                "cummulativeQuoteQty": _fmt(quote_qty),
                "status": "FILLED",
                "timeInForce": "GTC",
                "type": "MARKET",
                "side": side,
                "stopPrice": "0.00000000",
                "icebergQty": "0.00000000",
                "time": now,
                "updateTime": now,
                "isWorking": True,
                "workingTime": now,
                "origQuoteOrderQty": "0.00000000",
                "selfTradePreventionMode": "EXPIRE_MAKER",
            }
            self._state.orders.append(order)
        reply = {k: order[k] for k in order if k not in ("time", "updateTime", "isWorking", "stopPrice", "icebergQty")}
        reply.update({"transactTime": now, "fills": fills})
        return reply

    def _split(self, qty: Decimal, step: Decimal) -> list[Decimal]:
        """qty in fills_per_order pieces, each a whole number of steps (the last takes the rest)."""
        n = max(1, min(self.fills_per_order, int(qty / step)))
        piece = (qty / n / step).to_integral_value(rounding=ROUND_DOWN) * step
        return [piece] * (n - 1) + [qty - piece * (n - 1)]

    def _fee(self, side: str, qty: Decimal, cost: Decimal, base: str, quote: str) -> tuple[str, Decimal]:
        """(asset, amount) of the commission on one fill."""
        received = base if side == "BUY" else quote
        if self.fee_asset == "BNB":
            bnb = cost * self.bnb_fee_rate / self.prices["BNBUSDT"]
            bnb = bnb.quantize(Decimal("0.00000001"), rounding=ROUND_DOWN)
            if self._state.balances.get("BNB", [Decimal(0)])[0] >= bnb:
                return "BNB", bnb
            # Not enough BNB: Binance charges the received asset at the normal rate instead.
        asset = self.fee_asset if self.fee_asset not in (None, "BNB") else received
        amount = cost * self.fee_rate if asset == quote else qty * self.fee_rate
        if asset not in (base, quote):
            raise ValueError(f"fee_asset {asset!r} is not BNB, {base} or {quote}")
        return asset, amount.quantize(Decimal("0.00000001"), rounding=ROUND_DOWN)

    def _find_order(self, params: dict[str, str]) -> dict[str, Any]:
        symbol = self._symbol(params)
        with self._lock:
            candidates = [o for o in self._state.orders if o["symbol"] == symbol]
            if "orderId" in params:
                found = [o for o in candidates if str(o["orderId"]) == params["orderId"]]
            elif "origClientOrderId" in params:
                found = [o for o in candidates if o["clientOrderId"] == params["origClientOrderId"]]
            else:
                raise _error(
                    400, -1102, "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!"
                )
            if not found:
                raise _error(400, -2013, "Order does not exist.")
            return dict(found[-1])  # a reused client id finds the newest order

    def _my_trades(self, params: dict[str, str]) -> Any:
        symbol = self._symbol(params)
        limit = min(int(params.get("limit", 500)), 1000)
        with self._lock:
            out = [t for t in self._state.trades if t["symbol"] == symbol]
        if "orderId" in params:
            out = [t for t in out if str(t["orderId"]) == params["orderId"]]
        if "startTime" in params:
            out = [t for t in out if t["time"] >= int(params["startTime"])]
        if "endTime" in params:
            out = [t for t in out if t["time"] <= int(params["endTime"])]
        if "fromId" in params:
            out = [t for t in out if t["id"] >= int(params["fromId"])]
        return [dict(t) for t in out[:limit]]

    def route(self, method: str, path: str) -> tuple[Any, bool] | None:
        """(handler, signed) of an endpoint, or None when this fake does not implement it."""
        routes: dict[tuple[str, str], tuple[Any, bool]] = {
            ("GET", "/api/v3/ping"): (lambda p: {}, False),
            ("GET", "/api/v3/time"): (lambda p: {"serverTime": self.server_ms()}, False),
            ("GET", "/api/v3/exchangeInfo"): (self._exchange_info, False),
            ("GET", "/api/v3/klines"): (self._klines, False),
            ("GET", "/api/v3/ticker/24hr"): (self._ticker_24hr, False),
            ("GET", "/api/v3/ticker/price"): (self._ticker_price, False),
            ("GET", "/api/v3/account"): (self._account, True),
            ("POST", "/api/v3/order"): (self._new_order, True),
            ("GET", "/api/v3/order"): (self._find_order, True),
            ("GET", "/api/v3/myTrades"): (self._my_trades, True),
            ("GET", "/sapi/v1/account/apiRestrictions"): (self._api_restrictions, True),
        }
        return routes.get((method, path))


class _Handler(BaseHTTPRequestHandler):
    """One request: record it, apply an injected fault, check the signature, dispatch, answer JSON."""

    fake: FakeBinance
    server_version = "fake-binance/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean; requests are recorded on the fake instead

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        fake = self.fake
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        # Binance signs "query string + body" as one string; ccxt puts everything in one of the two.
        total = split.query + body
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        params.update(parse_qsl(body, keep_blank_values=True))
        rec = RecordedRequest(method, split.path, params, {k: v for k, v in self.headers.items()})
        with fake._lock:
            fake._state.requests.append(rec)
        fault = fake._take_fault(method, split.path)
        rec.fault = fault.kind if fault else None
        try:
            if fault is not None and not fault.kind.endswith("_after_execute"):
                self._fault_before(fault)
            route = fake.route(method, split.path)
            if route is None:
                raise _Reply(404, f"fake binance: no route {method} {split.path}")
            handler, signed = route
            if signed:
                fake._check_signed(rec, self.headers, total)
            result = handler(params)
            if fault is not None:
                self._fault_after(fault)
            self._send(rec, 200, result)
        except _Reply as reply:
            if reply.status == -1:
                return  # connection dropped on purpose: no answer at all
            self._send(rec, reply.status, reply.body, reply.headers)

    def _fault_before(self, fault: _Fault) -> None:
        fake = self.fake
        if fault.kind == "429":
            raise _Reply(
                429,
                {
                    "code": -1003,
                    "msg": "Too much request weight used; current limit is 6000 request weight per 1 MINUTE. "
                    "Please use WebSocket Streams for live updates to avoid polling the API.",
                },
                {"Retry-After": str(fault.retry_after_s)},
            )
        if fault.kind == "418":
            until = fake.server_ms() + 1000 * int(fault.retry_after_s or 0)
            raise _Reply(
                418,
                {"code": -1003, "msg": f"Way too much request weight used; IP banned until {until}."},
                {"Retry-After": str(fault.retry_after_s)},
            )
        if fault.kind == "500":
            raise _Reply(500, "<html><body><h1>500 Internal Server Error</h1></body></html>")
        if fault.kind == "-2015":
            raise _error(401, -2015, "Invalid API-key, IP, or permissions for action.")
        if fault.kind == "timeout":
            fake._hang()
            raise _Reply(-1, None)
        if fault.kind == "reset":
            self.close_connection = True
            raise _Reply(-1, None)
        raise AssertionError(fault.kind)  # pragma: no cover

    def _fault_after(self, fault: _Fault) -> None:
        """The request was executed; now answer as if something went wrong on the way back."""
        kind = fault.kind.removesuffix("_after_execute")
        if kind == "500":
            raise _Reply(500, "<html><body><h1>500 Internal Server Error</h1></body></html>")
        if kind == "1007":
            raise _error(
                503,
                -1007,
                "Timeout waiting for response from backend server. Send status unknown; execution status unknown.",
            )
        if kind == "timeout":
            self.fake._hang()
            raise _Reply(-1, None)
        if kind == "reset":
            self.close_connection = True
            raise _Reply(-1, None)
        raise AssertionError(fault.kind)  # pragma: no cover

    def _send(self, rec: RecordedRequest, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        rec.status = status
        is_text = isinstance(body, str)
        data = (body if is_text else json.dumps(body)).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if is_text else "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): as on the real exchange, the work is done anyway
