"""FuturesBroker on a fake Binance USD-M account (tests/fake_futures.py): ledger == exchange after every step.

"ledger == exchange" means: qty_base is the signed position, cash_quote is walletBalance - q * entry, the
position state is the sign of the position, fees add up to the commissions Binance charged. The fake answers
through a real ccxt.binanceusdm's parsers; the last tests drive the real ccxt.binanceusdm client itself, its HTTP
routed into the fake (no network).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ccxt
import pytest
from structlog.testing import capture_logs

from bot.brokers.base import Decision, ExecutionResult, client_order_id
from bot.brokers.futures import FuturesBroker, check_one_way_mode, only_reduces, wallet_balance
from bot.brokers.live import _futures_1x_isolated
from bot.daemon.state import StateStore, open_state
from bot.errors import ConfigError
from bot.exchange.breaker import CircuitBreaker
from bot.exchange.client import ExchangeClient, make_exchange
from strategies.accounting import Ledger
from strategies.actions import BUY, SELL
from tests.fake_futures import SYMBOL, FakeFutures, ledger_cash
from tests.test_live_broker import execute_in_tick, reconcile

PRICE = 50_000.0
CAP = 500.0
FEE = 0.0005  # Binance USD-M taker fee, the fake's default
KEY = "futKeyX9q2W7e4R1t8Y5u3I6o0PaSdFgHjKlZxCvBnMqWeRtYuIoP"
SECRET = "futSecretZ4x7C1v9B3n6M2q8W5e0RtYuIoPaSdFgHjKlZxCvBnM"


@dataclass
class Env:
    """One futures setup: fake account, broker, state store, ledger opened from the exchange, recorded sleeps."""

    fake: FakeFutures
    broker: FuturesBroker
    store: StateStore
    ledger: Ledger
    sleeps: list[float]

    def candle_ts(self, offset: int = 0) -> int:
        """A candle open time near the fake's clock (distinct per offset)."""
        return (self.fake.now_ms // 300_000 - 1 + offset) * 300_000

    def db_orders(self) -> dict[str, dict[str, Any]]:
        """Order rows of the state database by client id."""
        cur = self.store.conn.execute("SELECT * FROM orders")
        names = [d[0] for d in cur.description]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}

    def sent_params(self) -> list[dict[str, Any]]:
        """The params of every create_order call, in order."""
        return [kw["params"] for name, kw in self.fake.call_log if name == "create_order"]

    def assert_ledger_matches_exchange(self) -> None:
        """Ledger == exchange: signed size, wallet - q * entry, position state, fees charged."""
        qty, _entry = self.fake.position()
        assert self.ledger.qty_base == pytest.approx(qty, abs=1e-12)
        assert self.ledger.cash_quote == pytest.approx(ledger_cash(self.fake), abs=1e-6)
        assert self.ledger.position == (qty > 0) - (qty < 0)
        charged = sum(float(t["commission"]) for t in self.fake.raw_trades if t["commissionAsset"] == "USDT")
        charged += sum(
            float(t["commission"]) * 600.0 for t in self.fake.raw_trades if t["commissionAsset"] == "BNB"
        )  # BNB at the fake's BNB price
        assert self.ledger.fees_quote == pytest.approx(charged, abs=1e-6)


def make_env(
    tmp_path: Path, *, wallet: float = 1_000.0, cap: float = CAP, position_mode: str = "long_short", **kw: Any
) -> Env:
    """A fake account set to 1x isolated (as check_live_start does), a broker, and the ledger opened from it."""
    fake = FakeFutures(now_ms=time.time_ns() // 1_000_000, wallet=wallet, **kw)
    fake.set_ticker_price(SYMBOL, PRICE)
    fake.apiKey, fake.secret = KEY, SECRET
    _futures_1x_isolated(ExchangeClient(fake), SYMBOL)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        fake.advance(int(seconds * 1000))

    clock = lambda: fake.now_ms  # noqa: E731
    broker = FuturesBroker(
        ExchangeClient(fake, sleep=sleep, rng=lambda: 0.5),
        symbol=SYMBOL,
        max_position_quote=cap,
        commission=FEE,
        position_mode=position_mode,
        sleep=sleep,
        clock_ms=clock,
        breaker=CircuitBreaker(threshold=3, cooldown_ms=300_000, clock=clock, secrets=(KEY, SECRET)),
    )
    broker.note_close(PRICE)
    ledger, equity = broker.opening_ledger(0.0)
    assert equity == pytest.approx(wallet)
    store = open_state(tmp_path / "live.db", mode="live", symbol=SYMBOL)
    return Env(fake, broker, store, ledger, sleeps)


def set_price(env: Env, price: float) -> None:
    """The market moves: ticker, mark and the fat-finger anchor."""
    env.fake.set_ticker_price(SYMBOL, price)
    env.broker.note_close(price)


def tick(env: Env, target: int, *, offset: int = 0, ref_price: float | None = None) -> ExecutionResult:
    """What the daemon's tick does with a broker: execute, then record status and fills, in one transaction."""
    ref = env.fake.ticker_prices[SYMBOL] if ref_price is None else ref_price
    action = BUY if target > env.ledger.position else SELL
    d = Decision(SYMBOL, env.candle_ts(offset), (0.2, 0.5, 0.3), action, env.ledger.position, "v1")
    return execute_in_tick(env, d, target, ref)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = make_env(tmp_path)
    yield e
    e.store.close()


# ---- accounting: the ledger's convention is the futures account ------------------------------------------


def test_ledger_cash_is_wallet_minus_size_times_entry_over_random_fills() -> None:
    """Property: after any sequence of fills, ledger cash = wallet - q * entry and ledger equity = marginBalance."""
    rng = random.Random(7)
    fake = FakeFutures(wallet=100_000.0, min_notional="5")
    fake.set_margin_mode("isolated", SYMBOL)
    fake.set_leverage(1, SYMBOL)
    ledger = Ledger(cash_quote=100_000.0)
    for _ in range(200):
        price = round(rng.uniform(30_000, 70_000), 1)
        fake.set_ticker_price(SYMBOL, price)
        side = rng.choice(("buy", "sell"))
        qty = rng.randint(1, 40) / 1000
        order = fake.create_order(SYMBOL, "market", side, qty, None, {})
        for trade in fake.fetch_my_trades(SYMBOL):
            if trade["order"] == order["id"]:
                ledger.apply_fill(side, trade["amount"], trade["price"], trade["fee"]["cost"], 0)
        qty_ex, entry = fake.position()
        assert ledger.qty_base == pytest.approx(qty_ex, abs=1e-9)
        assert ledger.cash_quote == pytest.approx(fake.wallet_balance() - qty_ex * entry, abs=1e-6)
        mark = round(rng.uniform(30_000, 70_000), 1)
        fake.set_ticker_price(SYMBOL, mark)
        # ccxt's `total` for USDT is the margin balance (wallet + unrealised PnL): the ledger's equity.
        assert ledger.equity(mark) == pytest.approx(fake.fetch_balance()["total"]["USDT"], abs=1e-6)


def test_wallet_balance_is_read_from_info_not_from_ccxt_total(env: Env) -> None:
    assert tick(env, 1).status == "filled"
    set_price(env, 52_000.0)
    balance = env.fake.fetch_balance()
    # 0.01 BTC long from 50 000: unrealised +20. ccxt: free = availableBalance, total = marginBalance.
    assert wallet_balance(balance, "USDT") == pytest.approx(999.75)
    assert balance["total"]["USDT"] == pytest.approx(1019.75)
    assert balance["free"]["USDT"] == pytest.approx(499.75)
    assert env.ledger.equity(52_000.0) == pytest.approx(1019.75)


# ---- long -> flat -> short -> long -----------------------------------------------------------------------


def test_long_flat_short_long_hand_computed(env: Env) -> None:
    """Wallet 1000 USDT, cap 500, taker fee 0.05%; every number below is worked out by hand."""
    # Long: 500 / 50 000 = 0.010 BTC; fee 500 x 0.0005 = 0.25; cash = 1000 - 500 - 0.25.
    assert tick(env, 1).status == "filled"
    assert (env.ledger.qty_base, env.ledger.cash_quote) == (pytest.approx(0.01), pytest.approx(499.75))
    assert env.fake.wallet_balance() == pytest.approx(999.75)
    env.assert_ledger_matches_exchange()

    # Flat at 51 000, reduceOnly: PnL +10, fee 510 x 0.0005 = 0.255; wallet = cash = 999.75 + 10 - 0.255.
    set_price(env, 51_000.0)
    assert tick(env, 0, offset=1).status == "filled"
    assert env.ledger.cash_quote == pytest.approx(1009.495) and env.fake.wallet_balance() == pytest.approx(1009.495)
    env.assert_ledger_matches_exchange()

    # Short at 50 000: 0.010 BTC (capped), fee 0.25; wallet 1009.245; cash = wallet + 0.01 x 50 000.
    set_price(env, 50_000.0)
    assert tick(env, -1, offset=2).status == "filled"
    assert env.ledger.qty_base == pytest.approx(-0.01) and env.ledger.position == -1
    assert env.ledger.cash_quote == pytest.approx(1509.245) and env.fake.wallet_balance() == pytest.approx(1009.245)
    env.assert_ledger_matches_exchange()

    # Flip to long at 49 000 in ONE order, not reduceOnly: equity 1509.245 - 490 = 1019.245 > cap, target
    # 500 / 49 000 = 0.010204 BTC, order 0.010 + 0.010204 = 0.020204 -> 0.020 (amount step 0.001).
    # Short PnL +10, fee 980 x 0.0005 = 0.49; wallet 1018.755; new long 0.010 at 49 000; cash = 1018.755 - 490.
    set_price(env, 49_000.0)
    result = tick(env, 1, offset=3)
    assert result.status == "filled" and result.intent is not None and result.intent.qty_base == pytest.approx(0.02)
    assert env.ledger.qty_base == pytest.approx(0.01) and env.ledger.position == 1
    assert env.fake.position() == (pytest.approx(0.01), pytest.approx(49_000.0))
    assert env.ledger.cash_quote == pytest.approx(528.755) and env.fake.wallet_balance() == pytest.approx(1018.755)
    assert env.ledger.fees_quote == pytest.approx(0.25 + 0.255 + 0.25 + 0.49)
    env.assert_ledger_matches_exchange()

    # reduceOnly exactly on the close; the client ids are the daemon's.
    sent = env.sent_params()
    assert [p.get("reduceOnly", False) for p in sent] == [False, True, False, False]
    assert [o["side"] for o in env.fake.orders] == ["buy", "sell", "sell", "buy"]
    assert sent[1]["newClientOrderId"] == client_order_id(SYMBOL, env.candle_ts(1), "SELL")
    assert {r["status"] for r in env.db_orders().values()} == {"filled"}
    assert len(env.store.fills()) == 4
    # And the exchange agrees with itself: nothing to adjust.
    assert env.broker.check_balances(env.ledger)["adjusted"] is False


def test_short_then_flat_uses_reduce_only_buy(env: Env) -> None:
    assert tick(env, -1).status == "filled"
    assert tick(env, 0, offset=1).status == "filled"
    assert env.sent_params()[1]["reduceOnly"] is True and env.fake.orders[1]["side"] == "buy"
    assert env.fake.position() == (0.0, 0.0)
    env.assert_ledger_matches_exchange()


def test_only_reduces_never_marks_an_order_that_opens_exposure() -> None:
    assert only_reduces(0.01, "sell", 0.01) and only_reduces(-0.01, "buy", 0.005)
    assert not only_reduces(0.01, "sell", 0.02)  # a flip opens a short
    assert not only_reduces(0.01, "buy", 0.01)  # grows the long
    assert not only_reduces(0.0, "sell", 0.01)  # opens from flat
    assert only_reduces(0.013000000000000001, "sell", 0.013)  # float noise is no flip


def test_close_below_the_minimum_notional_goes_out_reduce_only(env: Env) -> None:
    # Binance waives the 100 USDT minimum notional for reduce-only orders: a small position still closes.
    assert tick(env, 1).status == "filled"
    set_price(env, 9_000.0)  # 0.01 BTC is now worth 90 USDT
    result = tick(env, 0, offset=1)
    assert result.status == "filled" and env.sent_params()[1]["reduceOnly"] is True
    env.assert_ledger_matches_exchange()


def test_opening_below_the_minimum_notional_is_refused_before_sending(tmp_path: Path) -> None:
    env = make_env(tmp_path, cap=60.0)  # 0.001 BTC = 50 USDT < 100 USDT
    result = tick(env, 1)
    assert result.status == "rejected" and "NOTIONAL" in (result.reject_reason or "")
    assert env.fake.calls["create_order"] == 0
    env.store.close()


# ---- cap, fat finger, margin ------------------------------------------------------------------------------


def test_cap_holds_whatever_the_wallet(tmp_path: Path) -> None:
    env = make_env(tmp_path, wallet=10_000.0)
    assert tick(env, -1).status == "filled"
    assert abs(env.ledger.qty_base) * PRICE <= CAP * 1.0001
    assert env.fake.position()[0] == pytest.approx(-0.01)
    env.assert_ledger_matches_exchange()
    env.store.close()


def test_fat_finger_guards(env: Env) -> None:
    ledger = Ledger(cash_quote=499.75, qty_base=0.01, position=1)
    assert env.broker._fat_finger("buy", 0.01, PRICE, Ledger(cash_quote=1000.0)) is None
    assert env.broker._fat_finger("buy", 0.02, PRICE, Ledger(cash_quote=1000.0)) is not None  # above the cap
    assert env.broker._fat_finger("sell", 0.02, PRICE, ledger) is None  # flip to a 500 USDT short
    assert env.broker._fat_finger("sell", 0.03, PRICE, ledger) is not None  # flip to a 1000 USDT short
    assert env.broker._fat_finger("sell", 0.01, PRICE * 2, Ledger(cash_quote=0, qty_base=0.02)) is not None
    with capture_logs() as logs:
        result = tick(env, -1, ref_price=PRICE * 1.05)  # reference 5% away from the last close
    assert result.status == "rejected" and (result.reject_reason or "").startswith("refused")
    assert env.fake.calls["create_order"] == 0 and [e for e in logs if e["event"] == "order_refused"]


def test_order_is_clamped_to_the_available_margin(tmp_path: Path) -> None:
    # 300 USDT < cap: the whole equity is the target, but at 1x the margin and the fee must fit: 0.005 BTC.
    env = make_env(tmp_path, wallet=300.0)
    assert tick(env, -1).status == "filled"
    assert env.fake.position()[0] == pytest.approx(-0.005)
    assert env.fake.fetch_balance()["free"]["USDT"] >= 0
    env.assert_ledger_matches_exchange()
    env.store.close()


def test_flip_opening_part_uses_the_margin_the_close_releases(tmp_path: Path) -> None:
    # All of a 300 USDT wallet is in the long's isolated margin: the flip's short is paid by the close.
    env = make_env(tmp_path, wallet=300.0)
    assert tick(env, 1).status == "filled"
    assert env.fake.fetch_balance()["free"]["USDT"] < 60
    assert tick(env, -1, offset=1).status == "filled"
    assert env.fake.position()[0] == pytest.approx(-0.005) and env.ledger.position == -1
    env.assert_ledger_matches_exchange()
    env.store.close()


def test_insufficient_margin_refusal_is_rejected_not_looked_up(env: Env) -> None:
    env.fake.fail_next("create_order", env.fake.binance_error(-2019, "Margin is insufficient."))
    with capture_logs() as logs:
        result = tick(env, 1)
    assert result.status == "rejected" and "-2019" in (result.reject_reason or "")
    assert env.fake.calls["fetch_order"] == 0 and env.fake.orders == []
    assert next(iter(env.db_orders().values()))["status"] == "rejected"
    assert [e for e in logs if e["event"] == "order_rejected"]
    env.assert_ledger_matches_exchange()


def test_exchange_refuses_an_opening_beyond_its_margin(env: Env) -> None:
    # The fake itself (not an injected error): a buy needing more than the available USDT is -2019.
    with pytest.raises(ccxt.InsufficientFunds, match="-2019"):
        env.fake.create_order(SYMBOL, "market", "buy", 0.021, None, {})


def test_stale_ledger_close_is_refused_by_reduce_only_never_flips(env: Env) -> None:
    assert tick(env, 1).status == "filled"
    # The position was closed behind ritmo's back (by hand, or liquidated): the ledger still says long.
    env.fake.create_order(SYMBOL, "market", "sell", 0.01, None, {"reduceOnly": True})
    result = tick(env, 0, offset=1)
    assert result.status == "rejected" and "-2022" in (result.reject_reason or "")
    assert env.fake.position() == (0.0, 0.0)  # no short was opened
    # The next balance check adopts the exchange.
    check = env.broker.check_balances(env.ledger)
    assert check["adjusted"] and env.ledger.position == 0 and env.ledger.qty_base == 0.0


# ---- hedge mode, start ------------------------------------------------------------------------------------


def test_hedge_mode_is_refused_with_how_to_switch(tmp_path: Path) -> None:
    fake = FakeFutures()
    fake.set_ticker_price(SYMBOL, PRICE)
    fake.hedged = True
    client = ExchangeClient(fake, sleep=lambda s: None)
    broker = FuturesBroker(client, symbol=SYMBOL, max_position_quote=CAP, sleep=lambda s: None)
    with pytest.raises(ConfigError, match="hedge mode") as info:
        broker.opening_ledger(0.0)
    assert "One-way" in str(info.value) and info.value.exit_code == 78
    with pytest.raises(ConfigError, match="hedge mode"):
        broker.check_balances(Ledger(cash_quote=1000.0))
    with pytest.raises(ConfigError, match="hedge mode"):
        check_one_way_mode(client, SYMBOL)
    fake.hedged = False
    check_one_way_mode(client, SYMBOL)


def test_start_sets_1x_isolated_explicitly(tmp_path: Path) -> None:
    fake = FakeFutures()
    assert (fake.margin_mode, fake.leverage) == ("cross", 20)  # Binance's defaults
    _futures_1x_isolated(ExchangeClient(fake), SYMBOL)
    assert (fake.margin_mode, fake.leverage) == ("isolated", 1)
    _futures_1x_isolated(ExchangeClient(fake), SYMBOL)  # "No need to change margin type" is fine


def test_opening_ledger_adopts_an_existing_position_and_refuses_what_is_not_ritmos(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    assert tick(env, -1).status == "filled"
    ledger, equity = env.broker.opening_ledger(0.0)
    assert (ledger.qty_base, ledger.position) == (pytest.approx(-0.01), -1)
    assert ledger.cash_quote == pytest.approx(ledger_cash(env.fake))
    assert equity == pytest.approx(env.fake.fetch_balance()["total"]["USDT"])
    client = ExchangeClient(env.fake)
    long_only = FuturesBroker(client, symbol=SYMBOL, max_position_quote=CAP, position_mode="long_only")
    with pytest.raises(ConfigError, match="long_only"):
        long_only.opening_ledger(0.0)
    small_cap = FuturesBroker(client, symbol=SYMBOL, max_position_quote=100.0)
    with pytest.raises(ConfigError, match="RITMO_MAX_POSITION_QUOTE"):
        small_cap.opening_ledger(0.0)
    with pytest.raises(ConfigError, match="BTC/USDT:USDT"):
        FuturesBroker(client, symbol="BTC/USDT", max_position_quote=CAP)
    with pytest.raises(ValueError, match="long_only"):
        tick(Env(env.fake, long_only, env.store, Ledger(cash_quote=1000.0), []), -1, offset=1)
    env.store.close()


# ---- ambiguous sends, reconciliation, funding, partial fills ----------------------------------------------


@pytest.mark.parametrize(
    "fault",
    ["timeout_after_execute", "500_after_execute", "answered_new", "500_after_execute_order_not_visible_yet"],
)
def test_ambiguous_send_is_looked_up_never_resent(env: Env, fault: str) -> None:
    assert tick(env, 1).status == "filled"
    if fault == "answered_new":
        env.fake.answer_new_next()
    else:
        env.fake.fail_after_execute("create_order", "timeout" if fault.startswith("timeout") else "500")
    if fault.endswith("not_visible_yet"):
        env.fake.order_visibility_lag_ms = 4_000  # -2013 on the first lookup, found 3 s later
    result = tick(env, -1, offset=1)  # the flip
    assert result.status == "filled"
    assert env.fake.calls["create_order"] == 2 and len(env.fake.orders) == 2  # never re-sent
    assert env.fake.calls["fetch_order"] >= 1  # looked up by client id
    assert result.intent is not None
    assert env.db_orders()[result.intent.client_order_id]["status"] == "filled"
    env.assert_ledger_matches_exchange()


def test_ambiguous_send_that_never_executed_stays_unknown_then_closes(env: Env) -> None:
    env.fake.fail_next("create_order", "timeout")
    result = tick(env, 1)
    assert result.status == "unknown" and env.fake.orders == []
    reconcile(env)
    assert next(iter(env.db_orders().values()))["status"] == "rejected"
    assert env.fake.calls["create_order"] == 1
    env.assert_ledger_matches_exchange()


def test_reconcile_books_an_order_executed_while_down_exactly_once(env: Env) -> None:
    assert tick(env, -1).status == "filled"
    ledger_before = Ledger(**env.ledger.to_dict())
    real = env.fake.create_order

    def executed_then_die(*args: Any, **kwargs: Any) -> dict[str, Any]:
        real(*args, **kwargs)
        raise KeyboardInterrupt  # the process dies between "order sent" and "fill recorded"

    env.fake.create_order = executed_then_die  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        tick(env, 0, offset=1)
    env.fake.create_order = real  # type: ignore[method-assign]
    env.ledger = ledger_before  # the tick's transaction rolled back
    row = next(r for r in env.db_orders().values() if r["status"] == "sent")
    assert env.fake.position() == (0.0, 0.0)  # the close executed
    reconcile(env)
    assert env.db_orders()[row["client_order_id"]]["status"] == "filled"
    assert env.ledger.position == 0 and len(env.store.fills()) == 2
    env.assert_ledger_matches_exchange()
    reconcile(env)
    with env.store.transaction() as store:
        env.broker.reconcile(store, [row | {"status": "sent"}], env.ledger)
    assert len(env.store.fills()) == 2 and len(env.fake.orders) == 2
    env.assert_ledger_matches_exchange()


def test_funding_payment_is_adopted_beyond_dust(env: Env) -> None:
    assert tick(env, -1).status == "filled"
    env.fake.pay_funding(-0.4)  # within dust: no adjustment
    assert env.broker.check_balances(env.ledger)["adjusted"] is False
    env.fake.pay_funding(-2.6)  # 3 USDT paid in all
    cash_before = env.ledger.cash_quote
    with capture_logs() as logs:
        check = env.broker.check_balances(env.ledger)
    assert check["adjusted"] is True and [e for e in logs if e["event"] == "ledger_adjusted"]
    assert env.ledger.cash_quote == pytest.approx(cash_before - 3.0)
    assert env.ledger.qty_base == pytest.approx(-0.01) and env.ledger.position == -1
    assert env.ledger.cash_quote == pytest.approx(ledger_cash(env.fake))
    # Closing afterwards realises the funding-reduced wallet exactly.
    assert tick(env, 0, offset=1).status == "filled"
    assert env.ledger.cash_quote == pytest.approx(env.fake.wallet_balance())


def test_partial_fills_hand_computed(env: Env) -> None:
    # Half of the opening 0.010 fills (Binance expires the rest): 0.005 BTC, fee 250 x 0.0005 = 0.125.
    env.fake.partial_fill_next(0.5)
    result = tick(env, 1)
    assert result.status == "filled" and env.fake.orders[0]["status"] == "expired"
    assert env.ledger.qty_base == pytest.approx(0.005) and env.ledger.position == 1
    assert env.ledger.cash_quote == pytest.approx(1000 - 250 - 0.125)
    env.assert_ledger_matches_exchange()
    # A flip that fills only 0.002 of 0.010 + 0.00x: still long 0.003, so the position state stays long.
    env.fake.partial_fill_next(0.2)
    result = tick(env, -1, offset=1)
    assert result.status == "filled" and env.ledger.position == 1
    assert env.ledger.qty_base == pytest.approx(env.fake.position()[0]) and env.ledger.qty_base > 0
    env.assert_ledger_matches_exchange()
    # The next SELL closes what is left, reduceOnly.
    assert tick(env, 0, offset=2).status == "filled" and env.sent_params()[-1]["reduceOnly"] is True
    assert env.fake.position() == (0.0, 0.0)
    env.assert_ledger_matches_exchange()


def test_several_trades_per_order_and_trades_that_lag(env: Env) -> None:
    env.fake.fills_per_order = 3
    env.fake.order_visibility_lag_ms = 2_500  # userTrades shows the trades 2.5 s after the answer
    assert tick(env, -1).status == "filled"
    assert env.ledger.n_trades == 3 and env.sleeps  # polled, then booked from the real trades
    env.assert_ledger_matches_exchange()


def test_trades_never_shown_book_the_order_with_an_estimated_fee(env: Env) -> None:
    env.fake.order_visibility_lag_ms = 3_600_000
    with capture_logs() as logs:
        assert tick(env, 1).status == "filled"
    assert [e for e in logs if e["event"] == "order_trades_missing"]
    assert env.ledger.fees_quote == pytest.approx(0.25)  # the market's taker rate, as charged here
    env.fake.order_visibility_lag_ms = 0
    env.assert_ledger_matches_exchange()


def test_bnb_fees_are_counted_but_not_taken_from_cash(tmp_path: Path) -> None:
    env = make_env(tmp_path, fee_asset="BNB", bnb=1.0)
    assert tick(env, 1).status == "filled"
    # 500 x 0.00045 / 600 = 0.000375 BNB, worth 0.225 USDT; the USDT wallet pays nothing.
    assert env.fake.balance("BNB") == pytest.approx(1.0 - 0.000375)
    assert env.ledger.fees_quote == pytest.approx(0.225)
    assert env.ledger.cash_quote == pytest.approx(1000.0 - 500.0)
    env.assert_ledger_matches_exchange()
    env.store.close()


def test_status_names_the_market(env: Env) -> None:
    status = env.broker.status()
    assert status is not None and status["market"] == "usdm_futures" and status["exchange"] == "binanceusdm"


# ---- the real ccxt.binanceusdm client, its HTTP answered by the fake ----------------------------------------


def test_real_ccxt_binanceusdm_client_round_trip(tmp_path: Path) -> None:
    fake = FakeFutures(now_ms=time.time_ns() // 1_000_000)
    fake.set_ticker_price(SYMBOL, PRICE)
    real = make_exchange("binanceusdm", {}, api_key=KEY, api_secret=SECRET).ccxt_exchange
    real.set_markets(list(fake.parser.markets.values()))
    real.enableRateLimit = False  # the fake answers at once; nothing leaves the process
    real.fetch = fake.serve  # every HTTP request of the client goes to the fake
    ex = ExchangeClient(real, sleep=lambda s: None)
    _futures_1x_isolated(ex, SYMBOL)  # what check_live_start does, through the real client
    _futures_1x_isolated(ex, SYMBOL)  # -4046 swallowed by ccxt
    assert (fake.margin_mode, fake.leverage) == ("isolated", 1)
    broker = FuturesBroker(ex, symbol=SYMBOL, max_position_quote=CAP, commission=FEE, sleep=lambda s: None)
    broker.note_close(PRICE)
    ledger, _ = broker.opening_ledger(0.0)
    store = open_state(tmp_path / "real.db", mode="live", symbol=SYMBOL)
    env = Env(fake, broker, store, ledger, [])
    env.fake.fail_after_execute("create_order", "500")  # the first order's answer is lost
    for offset, target in enumerate([1, 0, -1, 1]):
        assert tick(env, target, offset=offset).status == "filled"
        env.assert_ledger_matches_exchange()
    posts = [p for m, path, p in fake.http_log if (m, path) == ("POST", "/fapi/v1/order")]
    assert len(posts) == 4  # the lost answer was looked up, not re-sent
    assert [p.get("reduceOnly") for p in posts] == [None, "true", None, None]
    assert all(p["type"] == "MARKET" and "price" not in p and p["newOrderRespType"] == "RESULT" for p in posts)
    assert [p["quantity"] for p in posts] == ["0.01", "0.01", "0.01", "0.02"]
    assert ("GET", "/fapi/v1/positionSide/dual") in [(m, path) for m, path, _ in fake.http_log]
    lookups = [p for m, path, p in fake.http_log if (m, path) == ("GET", "/fapi/v1/order")]
    assert lookups and lookups[0]["origClientOrderId"] == posts[0]["newClientOrderId"]
    assert broker.check_balances(env.ledger)["adjusted"] is False
    store.close()
