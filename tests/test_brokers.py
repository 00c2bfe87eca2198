"""PaperBroker: the shared accounting, the exchange's amount rules (as ccxt reports Binance's), realtime fills."""

from __future__ import annotations

import math
import random
import re
from typing import Any

import ccxt
import numpy as np
import pytest

from bot.brokers.base import Decision, OrderIntent, client_order_id
from bot.brokers.paper import PaperBroker
from bot.daemon.feed import Candle
from bot.daemon.market import ExchangeMarketData
from bot.exchange.client import ExchangeClient
from bot.exchange.rules import DECIMAL_PLACES, SIGNIFICANT_DIGITS, TICK_SIZE, MarketRules
from strategies.accounting import Ledger, target_position
from strategies.actions import BUY, HOLD, SELL
from tests.fake_exchange import FakeExchange

T = 1_733_011_200_000

# Binance's exchangeInfo entry for BTCUSDT (spot), the filters that matter for market orders.
BINANCE_BTCUSDT = {
    "symbol": "BTCUSDT",
    "status": "TRADING",
    "baseAsset": "BTC",
    "baseAssetPrecision": 8,
    "quoteAsset": "USDT",
    "quotePrecision": 8,
    "quoteAssetPrecision": 8,
    "orderTypes": ["LIMIT", "MARKET"],
    "isSpotTradingAllowed": True,
    "isMarginTradingAllowed": True,
    "permissions": ["SPOT"],
    "filters": [
        {"filterType": "PRICE_FILTER", "minPrice": "0.01000000", "maxPrice": "1000000.00000000", "tickSize": "0.01"},
        {"filterType": "LOT_SIZE", "minQty": "0.00001000", "maxQty": "9000.00000000", "stepSize": "0.00001000"},
        {
            "filterType": "NOTIONAL",
            "minNotional": "5.00000000",
            "applyMinToMarket": True,
            "maxNotional": "9000000.00000000",
            "applyMaxToMarket": False,
            "avgPriceMins": 5,
        },
        {"filterType": "MARKET_LOT_SIZE", "minQty": "0.00000000", "maxQty": "82.10000000", "stepSize": "0.0"},
    ],
}


class Journal:
    """An in-memory OrderJournal."""

    def __init__(self) -> None:
        self.intents: list[OrderIntent] = []
        self.status: dict[str, str] = {}

    def record_intent(self, intent: OrderIntent) -> None:
        self.intents.append(intent)
        self.status[intent.client_order_id] = "intent"

    def set_order_status(self, client_order_id: str, status: str, detail: str | None = None) -> None:
        self.status[client_order_id] = status

    def commit(self) -> None:
        pass


def binance() -> Any:
    """The real ccxt binance class with one market parsed from Binance's own exchangeInfo (no network)."""
    ex = ccxt.binance()
    ex.options["crossMarginPairsData"] = []
    ex.options["isolatedMarginPairsData"] = []
    market = ex.parse_market(BINANCE_BTCUSDT)
    ex.markets = {market["symbol"]: market}
    ex.markets_by_id = {market["id"]: [market]}
    ex.symbols = [market["symbol"]]
    return ex


def decision(action: int, position: int, ts_ms: int = T) -> Decision:
    return Decision("BTC/USDT", ts_ms, (0.2, 0.3, 0.5), action, position, "v")


def test_precision_modes_mirror_ccxt() -> None:
    assert (DECIMAL_PLACES, SIGNIFICANT_DIGITS, TICK_SIZE) == (
        ccxt.DECIMAL_PLACES,
        ccxt.SIGNIFICANT_DIGITS,
        ccxt.TICK_SIZE,
    )
    assert binance().precisionMode == ccxt.TICK_SIZE


def test_rules_from_binance_market() -> None:
    ex = binance()
    rules = MarketRules.from_ccxt_market(ex.market("BTC/USDT"), ex.precisionMode)
    assert rules == MarketRules(amount_step=1e-05, min_amount=1e-05, max_amount=82.1, min_notional=5.0)
    assert ExchangeClient(ex).market_rules("BTC/USDT") == rules
    decimals = {"precision": {"amount": 3}, "limits": {"amount": {"min": 0.001}, "cost": {"min": 10}}}
    assert MarketRules.from_ccxt_market(decimals, DECIMAL_PLACES).amount_step == pytest.approx(0.001)
    with pytest.raises(ValueError):
        MarketRules.from_ccxt_market({"precision": {"amount": 5}}, SIGNIFICANT_DIGITS)


def test_floor_amount_matches_ccxt_amount_to_precision() -> None:
    ex = binance()
    rules = MarketRules.from_ccxt_market(ex.market("BTC/USDT"), ex.precisionMode)
    rng = random.Random(0)
    values = [rng.uniform(1e-5, 3.0) for _ in range(2000)]
    values += [0.00123, 0.1 + 0.2, 0.0012299999999999998, 1.00001, 0.7 * 3, 12.34567891, 2.0000099999999]
    for qty in values:
        assert rules.floor_amount(qty) == float(ex.amount_to_precision("BTC/USDT", qty)), qty


def test_client_order_id_is_deterministic_and_fits_binance() -> None:
    a = client_order_id("BTC/USDT", T, "BUY", 0)
    assert a == client_order_id("BTC/USDT", T, "BUY", 0)
    assert a != client_order_id("BTC/USDT", T, "BUY", 1) != client_order_id("BTC/USDT", T, "SELL", 0)
    longest = client_order_id("1000SHIBUSDTPERP/USDT:USDT", 9_999_999_999_999, "FLATTEN", 99)
    for coid in (a, longest):
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,36}", coid), coid


def test_paper_without_rules_is_the_backtest_accounting_bit_for_bit() -> None:
    """A random walk of actions through PaperBroker equals Ledger.apply_action exactly."""
    rng = np.random.default_rng(1)
    broker = PaperBroker(symbol="BTC/USDT", commission=0.001, slippage_bps=3.0)
    ours, ref = Ledger(cash_quote=10_000.0), Ledger(cash_quote=10_000.0)
    journal = Journal()
    price = 50_000.0
    for i in range(500):
        price *= math.exp(rng.normal(0, 0.01))
        action = int(rng.integers(0, 3))
        target = target_position(action, ours.position, "long_short")
        result = broker.execute(decision(action, ours.position, T + i * 300_000), target, ours, price, journal)
        ref.apply_action(action, price, 0.001, 3.0, "long_short")
        assert ours.to_dict() == ref.to_dict()
        assert (result.status == "filled") == (len(result.fills) == 1)
    assert len(journal.intents) == ref.n_trades > 100


def test_min_notional_rejected_like_binance() -> None:
    ex = binance()
    rules = MarketRules.from_ccxt_market(ex.market("BTC/USDT"), ex.precisionMode)
    broker = PaperBroker(symbol="BTC/USDT", commission=0.001, rules=rules)
    ledger = Ledger(cash_quote=4.0)  # 4 USDT cannot buy the 5 USDT minimum notional
    journal = Journal()
    result = broker.execute(decision(BUY, 0), 1, ledger, 97_000.0, journal)
    assert result.status == "rejected" and "minimum notional" in (result.reject_reason or "")
    assert result.fills == () and ledger.to_dict() == Ledger(cash_quote=4.0).to_dict()
    assert journal.intents[0].client_order_id == result.intent.client_order_id  # the intent is recorded too


def test_amount_below_step_rejected_like_binance() -> None:
    rules = MarketRules(amount_step=1e-05, min_amount=1e-05, min_notional=None)
    broker = PaperBroker(symbol="BTC/USDT", commission=0.0, rules=rules)
    ledger = Ledger(cash_quote=0.5)  # 0.5 / 97000 = 5.2e-06 BTC: below one step
    result = broker.execute(decision(BUY, 0), 1, ledger, 97_000.0, Journal())
    assert result.status == "rejected" and "amount" in (result.reject_reason or "")


def test_amount_is_floored_to_the_step_and_fee_follows() -> None:
    rules = MarketRules(amount_step=1e-05, min_amount=1e-05, min_notional=5.0)
    broker = PaperBroker(symbol="BTC/USDT", commission=0.001, rules=rules)
    ledger = Ledger(cash_quote=10_000.0)
    result = broker.execute(decision(BUY, 0), 1, ledger, 97_123.45, Journal())
    (fill,) = result.fills
    assert fill.qty_base == 0.10296 and fill.qty_base <= 10_000.0 / 97_123.45
    assert fill.fee_quote == pytest.approx(0.001 * fill.qty_base * 97_123.45, rel=1e-15)
    assert ledger.qty_base == fill.qty_base and ledger.position == 1
    # Closing sells exactly what is held: a whole number of steps, nothing left over.
    result = broker.execute(decision(SELL, 1), 0, ledger, 98_000.0, Journal())
    assert result.fills[0].qty_base == 0.10296 and ledger.qty_base == 0.0


def test_position_cap_limits_the_notional() -> None:
    broker = PaperBroker(symbol="BTC/USDT", commission=0.001, max_position_quote=1_000.0)
    ledger = Ledger(cash_quote=10_000.0)
    result = broker.execute(decision(BUY, 0), 1, ledger, 50_000.0, Journal())
    assert result.fills[0].notional_quote == pytest.approx(1_000.0, rel=1e-12)
    assert ledger.position == 1
    result = broker.execute(decision(SELL, 1), -1, ledger, 50_000.0, Journal())
    assert ledger.qty_base * 50_000.0 == pytest.approx(-1_000.0 * (1 - 0.0003), rel=1e-3)


def test_hold_and_same_target_trade_nothing() -> None:
    broker = PaperBroker(symbol="BTC/USDT", commission=0.001)
    ledger = Ledger(cash_quote=10_000.0, qty_base=0.1, position=1)
    journal = Journal()
    assert broker.execute(decision(HOLD, 1), 1, ledger, 50_000.0, journal).status == "none"
    assert broker.execute(decision(BUY, 1), 1, ledger, 50_000.0, journal).status == "none"
    assert journal.intents == []


def test_realtime_fill_at_ticker_price_with_slippage_and_commission() -> None:
    fake = FakeExchange(now_ms=T + 7_000, extra_symbols=("BTC/USDT",))
    fake.ticker_last = 97_500.0
    market = ExchangeMarketData(ExchangeClient(fake), "BTC/USDT")
    candle = Candle(T - 300_000, 97_000.0, 97_600.0, 96_900.0, 97_400.0, 10.0)
    price, source = market.fill_reference(candle)
    assert (price, source) == (97_500.0, "ticker")
    broker = PaperBroker(symbol="BTC/USDT", commission=0.001, slippage_bps=10.0)
    ledger = Ledger(cash_quote=10_000.0)
    result = broker.execute(decision(BUY, 0), 1, ledger, price, Journal(), ref_source=source)
    (fill,) = result.fills
    assert fill.price == pytest.approx(97_500.0 * 1.001, rel=1e-15)  # 10 bps against us on a buy
    assert fill.fee_quote == pytest.approx(0.001 * fill.qty_base * fill.price, rel=1e-15)
    assert ledger.cash_quote == pytest.approx(10_000.0 - fill.qty_base * fill.price - fill.fee_quote, rel=1e-15)
    assert fake.calls["fetch_ticker"] == 1


def test_realtime_fill_falls_back_to_the_close() -> None:
    fake = FakeExchange(now_ms=T + 7_000, extra_symbols=("BTC/USDT",))
    fake.fail_next("fetch_ticker", ccxt.RequestTimeout, times=5)
    market = ExchangeMarketData(ExchangeClient(fake, sleep=lambda s: None), "BTC/USDT")
    candle = Candle(T - 300_000, 97_000.0, 97_600.0, 96_900.0, 97_400.0, 10.0)
    assert market.fill_reference(candle) == (97_400.0, "close")
