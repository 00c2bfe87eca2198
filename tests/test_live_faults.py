"""Fault injection for the LiveBroker: every fault ends with no double order, no lost fill and the right status.

Each case runs one decision through the daemon's tick shape (tests.test_live_broker.tick) on FakeExchange,
then checks the orders on the exchange, the order row in the state database and ledger == balances.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bot.errors import EXIT_NOPERM, AuthenticationExchangeError
from bot.exchange.breaker import CircuitBreaker
from strategies.actions import BUY, SELL
from tests.fake_exchange import FakeExchange
from tests.test_live_broker import Env, make_env, reconcile, tick

Inject = Callable[[FakeExchange], None]

# (name, injection, expected result status, orders on the exchange afterwards)
AMBIGUOUS_CASES: list[tuple[str, Inject, str, int]] = [
    ("timeout_before_execute", lambda f: f.fail_next("create_order", "timeout"), "unknown", 0),
    ("reset_before_execute", lambda f: f.fail_next("create_order", "reset"), "unknown", 0),
    ("timeout_after_execute", lambda f: f.fail_after_execute("create_order", "timeout"), "filled", 1),
    ("5xx_after_execute", lambda f: f.fail_after_execute("create_order", "500"), "filled", 1),
    ("1007_after_execute", lambda f: f.fail_after_execute("create_order", "1007"), "filled", 1),
    (
        "429_retry_after_on_lookup",
        lambda f: (f.fail_after_execute("create_order", "500"), f.rate_limit_next("fetch_order", 7)),
        "filled",
        1,
    ),
    (
        "418_on_lookup",
        lambda f: (f.fail_after_execute("create_order", "500"), f.rate_limit_next("fetch_order", 30, status=418)),
        "filled",
        1,
    ),
    (
        "nonce_on_lookup",
        lambda f: (f.fail_after_execute("create_order", "timeout"), f.fail_next("fetch_order", "nonce")),
        "filled",
        1,
    ),
    (
        "lookup_down_first_then_found",
        lambda f: (f.fail_after_execute("create_order", "500"), f.fail_next("fetch_order", "500", times=6)),
        "filled",
        1,
    ),
]

REJECTED_CASES: list[tuple[str, Inject]] = [
    ("insufficient_funds", lambda f: f.fail_next("create_order", "insufficient")),
    ("lot_size", lambda f: f.fail_next("create_order", "lot_size")),
    ("min_notional_1013", lambda f: f.fail_next("create_order", "min_notional")),
    ("429_on_order", lambda f: f.rate_limit_next("create_order", 5)),
    ("418_on_order", lambda f: f.rate_limit_next("create_order", 30, status=418)),
    ("nonce_on_order", lambda f: f.fail_next("create_order", "nonce")),
]


def _status(env: Env) -> str:
    [row] = env.db_orders().values()
    return str(row["status"])


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = make_env(tmp_path)
    yield e  # type: ignore[misc]
    e.store.close()


@pytest.mark.parametrize(("name", "inject", "status", "n_orders"), AMBIGUOUS_CASES, ids=[c[0] for c in AMBIGUOUS_CASES])
def test_ambiguous_send_is_looked_up_never_resent(
    env: Env, name: str, inject: Inject, status: str, n_orders: int
) -> None:
    inject(env.fake)
    result = tick(env, BUY)
    assert result.status == status
    assert env.fake.calls["create_order"] == 1  # no double order, whatever happened
    assert len(env.orders()) == n_orders
    assert env.fake.calls["fetch_order"] >= 1  # looked up by client id
    assert _status(env) == status
    env.assert_ledger_matches_exchange()  # no lost fill
    if name == "429_retry_after_on_lookup":
        assert 7 in env.sleeps
    if name == "418_on_lookup":
        assert 30 in env.sleeps
    if name == "nonce_on_lookup":
        assert env.fake.calls["load_time_difference"] == 1
    if status == "unknown":
        # The next start settles it: not on the exchange, so closed; still nothing re-sent.
        reconcile(env)
        assert _status(env) == "rejected"
        assert env.fake.calls["create_order"] == 1 and env.orders() == []
        env.assert_ledger_matches_exchange()


@pytest.mark.parametrize(("name", "inject"), REJECTED_CASES, ids=[c[0] for c in REJECTED_CASES])
def test_refused_order_is_rejected_without_a_fill(env: Env, name: str, inject: Inject) -> None:
    inject(env.fake)
    with capture_logs() as logs:
        result = tick(env, BUY)
    assert result.status == "rejected" and not result.fills
    assert env.fake.calls["create_order"] == 1 and env.orders() == []
    assert env.fake.calls["fetch_order"] == 0  # a certain refusal needs no lookup
    assert _status(env) == "rejected"
    assert [e for e in logs if e["event"] == "order_rejected"]
    assert env.ledger.position == 0
    env.assert_ledger_matches_exchange()
    # The next decision trades normally.
    assert tick(env, BUY, offset=1).status == "filled"
    env.assert_ledger_matches_exchange()


def test_authentication_error_stops_with_exit_77(env: Env) -> None:
    env.fake.fail_next("create_order", "invalid_key")
    with pytest.raises(AuthenticationExchangeError) as info:
        tick(env, BUY)
    assert info.value.exit_code == EXIT_NOPERM
    assert env.orders() == [] and env.fake.calls["create_order"] == 1
    # Committed before raising: the order is closed, not left for reconciliation to guess about.
    assert _status(env) == "rejected"
    env.assert_ledger_matches_exchange()


def test_partial_fill_books_the_filled_quantity(env: Env) -> None:
    env.fake.partial_fill_next(0.5)
    result = tick(env, BUY)
    assert result.status == "filled"
    [order] = env.orders()
    assert order["status"] == "expired" and order["filled"] == pytest.approx(order["amount"] / 2)
    assert env.ledger.qty_base == pytest.approx(order["filled"])
    env.assert_ledger_matches_exchange()


@pytest.mark.parametrize("fee_asset", ["base", "received"])
def test_fee_in_base_asset_keeps_ledger_equal_to_balance(tmp_path: Path, fee_asset: str) -> None:
    env = make_env(tmp_path, fee_asset=fee_asset)
    assert tick(env, BUY).status == "filled"
    env.assert_ledger_matches_exchange()
    [order] = env.orders()
    assert env.ledger.qty_base == pytest.approx(order["filled"] * (1 - 0.001))
    assert env.ledger.fees_quote == pytest.approx(0.001 * order["cost"])
    if fee_asset == "base":
        # Binance charges a sell's fee in the asset received (quote) or BNB, never in the base sold.
        env.fake.fee_asset = "received"
    assert tick(env, SELL, offset=1).status == "filled"
    env.assert_ledger_matches_exchange()
    assert env.ledger.position == 0 and env.ledger.qty_base == pytest.approx(0.0, abs=1e-12)
    env.store.close()


def test_fee_in_bnb_is_converted_to_quote(tmp_path: Path) -> None:
    env = make_env(tmp_path, fee_asset="BNB", bnb_price=600.0)
    env.fake.set_balance("BNB", 1.0)
    result = tick(env, BUY)
    assert result.status == "filled"
    [order] = env.orders()
    [fee] = order["fees"]
    assert fee["currency"] == "BNB"
    assert result.fee_quote == pytest.approx(fee["cost"] * 600.0)
    assert result.fee_quote == pytest.approx(order["cost"] * 0.00075, rel=1e-4)
    assert env.ledger.fees_quote == pytest.approx(result.fee_quote)
    assert env.fake.calls["fetch_ticker"] >= 1  # the BNB/USDT rate
    env.assert_ledger_matches_exchange()  # BNB is outside the ledger: cash == the USDT balance
    env.store.close()


def test_exchange_down_for_an_hour_pauses_then_resumes(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    clock = lambda: env.fake.now_ms  # noqa: E731
    env.broker.breaker = CircuitBreaker(threshold=3, cooldown_ms=900_000, clock=clock)
    env.fake.down_for(3_600_000)
    down_until = env.fake.now_ms + 3_600_000
    statuses, silent_ticks = [], 0
    with capture_logs() as logs:
        while env.fake.now_ms < down_until:
            calls_before = sum(env.fake.calls.values())
            statuses.append(tick(env, BUY).status)
            silent_ticks += sum(env.fake.calls.values()) == calls_before
            env.fake.advance(300_000)  # the next candle
        assert env.fake.calls["create_order"] == 0  # no order while down
        assert env.orders() == [] and env.db_orders() == {}
        assert set(statuses) == {"paused"}
        assert [e for e in logs if e["event"] == "circuit_open"]
        # While open the breaker pauses without touching the exchange; it only lets a trial through per cooldown.
        assert silent_ticks >= len(statuses) // 2
        env.fake.advance(900_000)
        result = tick(env, BUY)
    assert result.status == "filled"
    assert env.broker.breaker_state()["state"] == "closed"
    assert [e for e in logs if e["event"] == "circuit_closed"]
    assert env.fake.calls["create_order"] == 1 and len(env.orders()) == 1
    env.assert_ledger_matches_exchange()
    env.store.close()


def test_every_case_leaves_ledger_equal_to_exchange_over_a_session(env: Env) -> None:
    # A session mixing faults: buy (5xx after execute), sell (timeout before), sell again next candle.
    env.fake.fail_after_execute("create_order", "500")
    assert tick(env, BUY).status == "filled"
    env.fake.fail_next("create_order", "timeout")
    assert tick(env, SELL, offset=1).status == "unknown"
    reconcile(env)
    assert tick(env, SELL, offset=2).status == "filled"
    assert [o["side"] for o in env.orders()] == ["buy", "sell"]
    assert env.fake.calls["create_order"] == 3
    assert env.ledger.qty_base == pytest.approx(0.0, abs=1e-12)
    env.assert_ledger_matches_exchange()
