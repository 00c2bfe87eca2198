"""The exchange boundary (issue 10): nothing outside bot/exchange/ reaches ccxt; every exchange call goes through
`ExchangeClient`, whose reads are retried with the one policy and whose orders are sent once.

Checked on the source (ast) of bot/ and strategies/, outside bot/exchange/:
- no import of ccxt (`import ccxt`, `from ccxt... import`, `importlib.import_module("ccxt")`, `__import__`);
- no call of a ccxt API method name except on the client: the names are ccxt.Exchange's unified methods
  (fetch_*, create_*, set_*, load_*, market, amount_to_precision, ...) and Binance's implicit endpoints
  (sapi_get_...), and the client is what the product names `client` (a parameter or local `client`, or an
  attribute `.client`), so today's `self.exchange.fetch_ticker(...)` on a raw ccxt object is caught while
  `frame.set_index(...)` or `store.close()` are not ccxt calls at all;
- no reach into the client for its ccxt object (`.ccxt_exchange`), nor `getattr(x, "fetch_...")` around the rule.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import ccxt
import pytest
from ccxt.abstract.binance import ImplicitAPI as BinanceImplicitAPI
from ccxt.abstract.binanceusdm import ImplicitAPI as BinanceUsdmImplicitAPI

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = REPO / "bot" / "exchange"
# What the product calls the ExchangeClient (tests/test_exchange_boundary.py's convention, see the docstring).
CLIENT_NAME = "client"
# The ExchangeClient attribute holding the ccxt object: bot/exchange/ only.
RAW_ATTRIBUTE = "ccxt_exchange"
# ccxt's unified API among ccxt.Exchange's ~700 methods (the rest are helpers: sum, omit, close, parse_*, ...).
_UNIFIED_RE = re.compile(
    r"^(?:(?:fetch|create|cancel|edit|set|load|watch|un_?watch|borrow|repay|close)_\w+"
    r"|add_margin|reduce_margin|withdraw|transfer|futures_transfer)$"
)
_UNIFIED_EXTRA = {
    "market",
    "market_id",
    "amount_to_precision",
    "price_to_precision",
    "cost_to_precision",
    "currency_to_precision",
    "fee_to_precision",
    "milliseconds",
    "enable_demo_trading",
}


@cache
def ccxt_api_names() -> frozenset[str]:
    """Method names of ccxt's unified API (as binanceusdm has them) and of Binance's implicit REST endpoints."""
    exchange_class = ccxt.binanceusdm  # a subclass of ccxt.binance, itself of ccxt.Exchange
    unified = {
        name
        for name in dir(exchange_class)
        if (_UNIFIED_RE.match(name) or name in _UNIFIED_EXTRA) and callable(getattr(exchange_class, name))
    }
    implicit = {name for api in (BinanceImplicitAPI, BinanceUsdmImplicitAPI) for name in vars(api) if name[0] != "_"}
    return frozenset(unified | implicit)


def _is_client(node: ast.expr) -> bool:
    """`client` or `<anything>.client`: the ExchangeClient by the product's naming."""
    if isinstance(node, ast.Name):
        return node.id == CLIENT_NAME
    return isinstance(node, ast.Attribute) and node.attr == CLIENT_NAME


def _dotted(node: ast.expr) -> str:
    """`a.b.c` for a name or attribute chain, else `<expr>` (a call, a subscript, ...)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "<expr>"


def _is_ccxt_module(name: str) -> bool:
    return name == "ccxt" or name.startswith("ccxt.")


def boundary_violations(source: str, filename: str = "<source>") -> list[str]:
    """Every way `source` reaches ccxt other than through the ExchangeClient, as `file:line: what`."""
    api = ccxt_api_names()
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"imports {a.name}") for a in node.names if _is_ccxt_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_ccxt_module(node.module or ""):
            found.append((node.lineno, f"imports from {node.module}"))
        elif isinstance(node, ast.Attribute) and node.attr == RAW_ATTRIBUTE:
            found.append((node.lineno, f"reaches the client's ccxt object: {_dotted(node)}"))
        elif isinstance(node, ast.Call):
            found += [(node.lineno, what) for what in _call_violations(node, api)]
    return [f"{filename}:{line}: {what}" for line, what in sorted(found)]


def _call_violations(call: ast.Call, api: frozenset[str]) -> list[str]:
    """A ccxt method called on something that is not the client, or ccxt imported by name at run time."""
    func = call.func
    first = call.args[0] if call.args else None
    literal = [a.value for a in call.args[:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if isinstance(func, ast.Attribute) and func.attr in api and not _is_client(func.value):
        return [f"calls ccxt's {func.attr}() on {_dotted(func.value)}, not on the ExchangeClient"]
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name == "getattr" and first is not None and len(literal) == 1 and literal[0] in api and not _is_client(first):
        return [f"getattr(..., {literal[0]!r}) on {_dotted(first)}, not on the ExchangeClient"]
    if name in ("import_module", "__import__") and literal and _is_ccxt_module(literal[0]):
        return [f"imports {literal[0]} at run time"]
    return []


def product_sources() -> list[Path]:
    """The product's modules outside the exchange boundary."""
    paths = sorted([*(REPO / "bot").rglob("*.py"), *(REPO / "strategies").rglob("*.py")])
    return [p for p in paths if BOUNDARY not in p.parents]


# ---- the scanner itself: it catches what it must and nothing else ------------------------------------------

VIOLATIONS = [
    "import ccxt",
    "import ccxt.async_support as ccxt_async",
    "from ccxt.base.errors import NetworkError",
    "import importlib\nccxt = importlib.import_module('ccxt')",
    "ccxt = __import__('ccxt')",
    # What market.py and the brokers did before the client: ccxt calls on the raw exchange object.
    "self.exchange.fetch_ticker(self.symbol)",
    "positions = self.exchange.fetch_positions([self.symbol])",
    "exchange.set_margin_mode('isolated', symbol)",
    "exchange.set_leverage(1, symbol)",
    "step = self.exchange.market(self.symbol)['precision']['amount']",
    "float(exchange.amount_to_precision(symbol, qty))",
    "ex.load_markets()",
    "exchange.create_order(symbol, 'market', 'buy', 0.1, None, params)",
    "exchange.sapi_get_account_apirestrictions()",
    "make_exchange('binance').fetch_balance()",
    "fetch = getattr(exchange, 'fetch_position_mode', None)",
    # Through the client to its ccxt object: caught however it is used.
    "self.client.ccxt_exchange.fetch_balance()",
    "raw = client.ccxt_exchange",
]

CLEAN = [
    "self.client.fetch_ticker(self.symbol, quick=True)",
    "client.market(symbol)",
    "client.set_leverage(1, symbol)",
    "self.client.create_market_order(self.symbol, 'buy', 0.1, coid)",
    "rows = client.fetch_ohlcv_page(symbol, '5m', since_ms, 1)",
    "getattr(client, 'fetch_balance')()",
    "df.sum()\ndf.set_index('ts_ms')\nstore.close()\npd.concat(pages)",
    "journal.set_order_status(coid, 'sent')\njournal.commit()",
    "import logging\nlogging.getLogger('ccxt').setLevel(logging.INFO)",
    "from bot.exchange.client import ExchangeClient, make_exchange",
]


@pytest.mark.parametrize("source", VIOLATIONS)
def test_scanner_catches_every_way_around_the_client(source: str) -> None:
    hits = boundary_violations(source, "bot/x.py")
    assert len(hits) >= 1
    assert all(hit.startswith("bot/x.py:") for hit in hits)


@pytest.mark.parametrize("source", CLEAN)
def test_scanner_leaves_client_calls_and_other_libraries_alone(source: str) -> None:
    assert boundary_violations(source) == []


def test_scanner_reports_the_line_and_the_call() -> None:
    source = "def f(self):\n    x = 1\n    return self.exchange.fetch_ticker(self.symbol)\n"
    assert boundary_violations(source, "bot/daemon/market.py") == [
        "bot/daemon/market.py:3: calls ccxt's fetch_ticker() on self.exchange, not on the ExchangeClient"
    ]


def test_the_ccxt_api_names_come_from_ccxt() -> None:
    names = ccxt_api_names()
    used = {"fetch_ticker", "fetch_ohlcv", "fetch_time", "fetch_balance", "fetch_order", "fetch_my_trades"}
    used |= {"fetch_positions", "fetch_position_mode", "set_margin_mode", "set_leverage", "create_order"}
    used |= {"load_markets", "load_time_difference", "market", "amount_to_precision", "milliseconds"}
    used |= {"sapi_get_account_apirestrictions", "fapiPrivateGetPositionSideDual", "set_sandbox_mode"}
    assert used <= names
    assert all(hasattr(ccxt.binanceusdm, name) for name in names)
    assert not {"close", "sum", "omit", "extend", "sort_by", "keys", "fetch", "set_index", "set_order_status"} & names


# ---- the product -----------------------------------------------------------------------------------------


def test_the_scan_covers_the_product() -> None:
    names = {str(p.relative_to(REPO)) for p in product_sources()}
    assert {"bot/daemon/market.py", "bot/brokers/live.py", "bot/brokers/futures.py", "bot/commands/run.py"} <= names
    assert not any(name.startswith("bot/exchange/") for name in names)


def test_nothing_outside_bot_exchange_reaches_ccxt() -> None:
    hits = [hit for p in product_sources() for hit in boundary_violations(p.read_text(), str(p.relative_to(REPO)))]
    assert hits == [], "\n".join(hits)
