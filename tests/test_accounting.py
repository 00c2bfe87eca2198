"""The shared accounting: hand-computed fills and fees, fee identities, one formula for every number type."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from strategies.accounting import Fill, Ledger, rebalance, target_position
from strategies.actions import BUY, HOLD, POSITION_MODES, SELL, validate_position_mode

C = 0.001  # the default commission, 0.1 % per side


def _approx(x: float) -> object:
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# ---- hand-computed fills -------------------------------------------------------------------------


def test_long_round_trip_exact_cash() -> None:
    led = Ledger(cash_quote=1000.0)
    buy = led.apply_action(BUY, 100.0, C, 0.0, "long_only")
    # E = 1000, q' = 1000 / 100 = 10, fee = 0.001 * 10 * 100 = 1, C' = 1000 - 10 * 100 - 1 = -1
    assert buy == Fill("buy", 10.0, 100.0, 1.0, 1000.0, 0, 1)
    assert (led.cash_quote, led.qty_base, led.position) == (-1.0, 10.0, 1)
    sell = led.apply_action(SELL, 110.0, C, 0.0, "long_only")
    # q' = 0, |Δq| = 10, fee = 0.001 * 10 * 110 = 1.1, C' = -1 + 10 * 110 - 1.1 = 1097.9
    assert sell is not None
    assert (sell.side, sell.qty_base, sell.price, sell.position_after) == ("sell", 10.0, 110.0, 0)
    assert sell.fee_quote == _approx(1.1)
    assert led.cash_quote == _approx(1097.9)
    assert led.qty_base == 0.0  # exactly flat: q + (-q)
    assert led.fees_quote == _approx(2.1)
    assert led.turnover_quote == _approx(2100.0)  # 1000 + 1100
    assert led.n_trades == 2
    assert led.equity(123.0) == _approx(1097.9)


def test_flip_short_to_long_pays_fees_on_both_legs() -> None:
    led = Ledger(cash_quote=1000.0)
    led.apply_action(SELL, 100.0, C, 0.0, "long_short")
    # q' = -1000 / 100 = -10, fee = 0.001 * 10 * 100 = 1, C' = 1000 + 1000 - 1 = 1999
    assert (led.cash_quote, led.qty_base, led.position) == (1999.0, -10.0, -1)
    fill = led.apply_action(BUY, 90.0, C, 0.0, "long_short")
    # E = 1999 - 10 * 90 = 1099, q' = 1099 / 90 = 12.2111.., Δq = q' + 10 = 1999 / 90 = 22.2111..
    # (the short's 10 units bought back plus 12.2 new ones), fee = 0.001 * 1999 = 1.999,
    # C' = 1999 - 1999 - 1.999 = -1.999; equity at 90 = 1099 - 1.999 = 1097.001
    assert fill is not None and fill.side == "buy"
    assert fill.qty_base == _approx(1999 / 90)
    assert fill.notional_quote == _approx(1999.0)
    assert fill.fee_quote == _approx(1.999)
    assert (fill.position_before, fill.position_after) == (-1, 1)
    assert led.qty_base == _approx(1099 / 90)
    assert led.cash_quote == _approx(-1.999)
    assert led.equity(90.0) == _approx(1097.001)
    assert led.fees_quote == _approx(2.999)


def test_flip_long_to_short() -> None:
    led = Ledger(cash_quote=1000.0)
    led.apply_action(BUY, 100.0, C, 0.0, "long_short")  # q = 10, C = -1
    fill = led.apply_action(SELL, 100.0, C, 0.0, "long_short")
    # E = -1 + 1000 = 999, q' = -9.99, Δq = -19.99, fee = 0.001 * 19.99 * 100 = 1.999,
    # C' = -1 + 1999 - 1.999 = 1996.001; equity = 1996.001 - 9.99 * 100 = 997.001 = 1000 - 1 - 1.999
    assert fill is not None and fill.side == "sell"
    assert fill.qty_base == _approx(19.99)
    assert fill.fee_quote == _approx(1.999)
    assert led.qty_base == _approx(-9.99)
    assert led.cash_quote == _approx(1996.001)
    assert led.equity(100.0) == _approx(997.001)


def test_hold_costs_nothing_and_equity_tracks_price() -> None:
    led = Ledger(cash_quote=1000.0)
    assert led.apply_action(HOLD, 100.0, C, 0.0, "long_short") is None  # flat HOLD
    led.apply_action(BUY, 100.0, C, 0.0, "long_short")  # q = 10, C = -1
    before = led.to_dict()
    for price in (80.0, 95.5, 130.25, 61.0):
        assert led.apply_action(HOLD, price, C, 25.0, "long_short") is None
        assert led.equity(price) == -1.0 + 10.0 * price  # exactly: no fee, no drift rebalancing
    assert led.to_dict() == before


def test_long_only_sell_goes_flat_and_sell_when_flat_does_nothing() -> None:
    led = Ledger(cash_quote=500.0)
    assert led.apply_action(SELL, 100.0, C, 0.0, "long_only") is None
    assert led.to_dict() == Ledger(cash_quote=500.0).to_dict()
    led.apply_action(BUY, 100.0, C, 0.0, "long_only")
    fill = led.apply_action(SELL, 120.0, C, 0.0, "long_only")
    assert fill is not None and fill.position_after == 0
    assert led.position == 0 and led.qty_base == 0.0
    assert led.apply_action(SELL, 130.0, C, 0.0, "long_only") is None
    assert led.n_trades == 2


def test_buy_when_long_and_sell_when_short_do_nothing() -> None:
    led = Ledger(cash_quote=1000.0)
    led.apply_action(BUY, 100.0, C, 0.0, "long_short")
    state = led.to_dict()
    # at 150 the exposure has drifted to 1500 / 1499 > 1: still no rebalancing trade
    assert led.apply_action(BUY, 150.0, C, 0.0, "long_short") is None
    assert led.to_dict() == state
    led.apply_action(SELL, 150.0, C, 0.0, "long_short")
    state = led.to_dict()
    assert led.apply_action(SELL, 50.0, C, 0.0, "long_short") is None
    assert led.to_dict() == state


def test_slippage_moves_the_fill_against_us_on_both_sides() -> None:
    bps = 10.0  # 0.1 %
    led = Ledger(cash_quote=1000.0)
    buy = led.apply_action(BUY, 100.0, C, bps, "long_only")
    # P = 100 * (1 + 10 / 1e4) = 100.1, q' = 1000 / 100.1, fee = 0.001 * q' * 100.1 = 1
    assert buy is not None and buy.price == _approx(100.1)
    assert led.qty_base == _approx(1000 / 100.1)
    assert buy.fee_quote == _approx(1.0)
    assert led.cash_quote == _approx(-1.0)
    sell = led.apply_action(SELL, 110.0, C, bps, "long_only")
    # P = 110 * (1 - 10 / 1e4) = 109.89, C' = -1 + q * 109.89 * (1 - 0.001)
    assert sell is not None and sell.price == _approx(109.89)
    assert led.cash_quote == _approx(-1.0 + 1000 / 100.1 * 109.89 * 0.999)

    short = Ledger(cash_quote=1000.0)
    s = short.apply_action(SELL, 100.0, C, bps, "long_short")
    assert s is not None and s.price == _approx(99.9)  # a sell fills lower
    b = short.apply_action(BUY, 100.0, C, bps, "long_short")
    assert b is not None and b.price == _approx(100.1)  # a buy fills higher
    # without price change the slippage round trip loses on both legs
    assert short.equity(100.0) < 1000.0 - short.fees_quote


# ---- fee identities ------------------------------------------------------------------------------


def _run(actions: list[int], prices: list[float], commission: float, mode: str) -> tuple[Ledger, list[Fill]]:
    led = Ledger(cash_quote=1000.0)
    fills = []
    for a, p in zip(actions, prices, strict=True):
        f = led.apply_action(a, p, commission, 0.0, mode)
        if f is not None:
            fills.append(f)
    return led, fills


def test_each_fill_lowers_equity_at_the_fill_price_by_its_fee() -> None:
    """E_after(P) = E_before(P) - fee: a fill itself moves only the fee out of equity."""
    rng = random.Random(3)
    led = Ledger(cash_quote=1000.0)
    price = 100.0
    for _ in range(300):
        price *= math.exp(rng.gauss(0.0, 0.02))  # a random walk; i.i.d. jumps would bankrupt a 1x short
        before = led.to_dict()
        fill = led.apply_action(rng.randrange(3), price, C, 7.0, "long_short")
        if fill is not None:
            e_before = before["cash_quote"] + before["qty_base"] * fill.price
            assert led.equity(fill.price) == pytest.approx(e_before - fill.fee_quote, rel=1e-12)


def test_cash_flow_identity_holds_for_any_path() -> None:
    """E_T = E_0 + sum_i Δq_i (P_T - P_i) - sum_i fee_i: gross P&L of the units traded, minus every fee.

    This is the identity "fees add up" that holds for every action sequence, with or without fees.
    """
    rng = random.Random(11)
    prices = [100.0 * math.exp(0.02 * sum(rng.gauss(0, 1) for _ in range(3))) for _ in range(400)]
    actions = [rng.randrange(3) for _ in prices]
    for mode in POSITION_MODES:
        led, fills = _run(actions, prices, C, mode)
        p_end = prices[-1]
        signed = [(f.qty_base if f.side == "buy" else -f.qty_base, f.price) for f in fills]
        gross = sum(dq * (p_end - p) for dq, p in signed)
        fees = sum(f.fee_quote for f in fills)
        assert led.fees_quote == pytest.approx(fees, rel=1e-12)
        assert led.turnover_quote == pytest.approx(sum(f.notional_quote for f in fills), rel=1e-12)
        assert led.n_trades == len(fills) > 10
        assert led.equity(p_end) == pytest.approx(1000.0 + gross - fees, rel=1e-10)


def test_single_round_trip_fees_explain_the_whole_gap() -> None:
    """With one round trip from flat, equity(commission 0) - equity(commission c) = recorded fees, exactly.

    Why exact: fees are paid from cash and never shrink a size, so the opening leg buys E_0 / P_1 units and
    the closing leg sells all of them in both runs: the runs trade identical quantities at identical prices
    and differ only by the fees. 1000 -> buy 10 @ 100 (fee 1) -> sell 10 @ 110 (fee 1.1):
    1100 - 1097.9 = 2.1 = 1 + 1.1.
    """
    actions, prices = [BUY, HOLD, SELL], [100.0, 105.0, 110.0]
    free, _ = _run(actions, prices, 0.0, "long_only")
    paid, _ = _run(actions, prices, C, "long_only")
    assert free.equity(110.0) == _approx(1100.0)
    assert paid.equity(110.0) == _approx(1097.9)
    assert free.equity(110.0) - paid.equity(110.0) == pytest.approx(paid.fees_quote, abs=1e-12)


def test_later_round_trips_compound_the_fees() -> None:
    """After the first trip the gap exceeds the fees: the run that paid fees sizes later trades smaller.

    The exact statement is the cash-flow identity applied to both runs:
    E^0_T - E^c_T = F^c + sum_i (Δq^0_i - Δq^c_i)(P_T - P_i).
    Two trips 100 -> 110 -> 110 -> 121 from 1000:
      free: 1000 -> 1100 -> 1210.
      paid: trip 1 ends at 1097.9 (fees 1 + 1.1); trip 2 buys 1097.9 / 110 = 9.98090.. units (fee 1.0979),
            sells them at 121 for 1207.69 (fee 1.20769): 1205.38441.
      gap 4.61559 = fees 4.40559 + (10 - 9.98090..) * (121 - 110) = 2.1 * 0.1 = 0.21
      (the 2.1 paid in trip 1 missed trip 2's 10 % gain).
    """
    actions, prices = [BUY, SELL, BUY, SELL], [100.0, 110.0, 110.0, 121.0]
    free, free_fills = _run(actions, prices, 0.0, "long_only")
    paid, paid_fills = _run(actions, prices, C, "long_only")
    assert free.equity(121.0) == _approx(1210.0)
    assert paid.equity(121.0) == _approx(1205.38441)
    assert paid.fees_quote == _approx(4.40559)
    gap = free.equity(121.0) - paid.equity(121.0)
    assert gap == pytest.approx(4.61559, abs=1e-9)
    assert gap - paid.fees_quote == pytest.approx(0.21, abs=1e-9)  # not zero: the naive statement fails
    sizing = sum(
        (1 if f0.side == "buy" else -1) * (f0.qty_base - fc.qty_base) * (121.0 - f0.price)
        for f0, fc in zip(free_fills, paid_fills, strict=True)
    )
    assert gap == pytest.approx(paid.fees_quote + sizing, abs=1e-9)


# ---- one formula for every number type -----------------------------------------------------------


@pytest.mark.parametrize("mode", POSITION_MODES)
def test_target_position_table_and_array_types_agree(mode: str) -> None:
    sell = -1 if mode == "long_short" else 0
    positions = (-1, 0, 1) if mode == "long_short" else (0, 1)
    for p in positions:
        assert target_position(HOLD, p, mode) == p
        assert target_position(BUY, p, mode) == 1
        assert target_position(SELL, p, mode) == sell
    grid = [(p, a) for p in positions for a in (HOLD, BUY, SELL)]
    expected = [target_position(a, p, mode) for p, a in grid]
    pos_t = torch.tensor([p for p, _ in grid], dtype=torch.float32)
    act_t = torch.tensor([a for _, a in grid], dtype=torch.int64)
    assert target_position(act_t, pos_t, mode).tolist() == expected
    pos_n, act_n = pos_t.numpy().astype(np.int64), act_t.numpy()
    assert target_position(act_n, pos_n, mode).tolist() == expected


def test_rebalance_is_bit_identical_on_floats_numpy_and_torch() -> None:
    rng = random.Random(5)
    rows = []
    for _ in range(500):
        price = rng.uniform(1e3, 1e5)
        qty = rng.choice([0.0, rng.uniform(-2.0, 2.0)])
        cash = rng.uniform(0.5, 3.0) * 1e4 - qty * price
        rows.append((cash, qty, rng.choice([-1, 0, 1]), price * rng.uniform(0.95, 1.05), rng.choice([0.0, 3.0])))
    commission = 0.00075
    scalar = [rebalance(c, q, p, r, commission, s) for c, q, p, r, s in rows]
    cols = list(zip(*rows, strict=True))
    tensors = rebalance(
        torch.tensor(cols[0], dtype=torch.float64),
        torch.tensor(cols[1], dtype=torch.float64),
        torch.tensor(cols[2], dtype=torch.float32),  # the env keeps positions in float32
        torch.tensor(cols[3], dtype=torch.float64),
        commission,
        torch.tensor(cols[4], dtype=torch.float64),
    )
    arrays = rebalance(*(np.asarray(c, dtype=np.float64) for c in cols[:4]), commission, np.asarray(cols[4]))
    for k in range(5):
        from_floats = [float(row[k]) for row in scalar]
        assert tensors[k].tolist() == from_floats  # exact equality, not approx
        assert arrays[k].tolist() == from_floats


def test_ledger_books_exactly_what_rebalance_computes() -> None:
    rng = random.Random(8)
    led = Ledger(cash_quote=1000.0)
    for _ in range(200):
        price = rng.uniform(90.0, 110.0)
        action = rng.randrange(3)
        target = target_position(action, led.position, "long_short")
        expect = rebalance(led.cash_quote, led.qty_base, target, price, C, 2.0)
        fill = led.apply_action(action, price, C, 2.0, "long_short")
        if fill is not None:
            assert (led.cash_quote, led.qty_base, fill.fee_quote, fill.price) == (
                expect[0],
                expect[1],
                expect[2],
                expect[4],
            )


def test_rebalance_is_a_no_op_when_nothing_needs_trading() -> None:
    assert rebalance(1000.0, 0.0, 0, 100.0, C, 5.0) == (1000.0, 0.0, 0.0, 0.0, 100.0)


# ---- the exchange-style fill and persistence -----------------------------------------------------


def test_apply_fill_books_an_exchange_fill() -> None:
    led = Ledger(cash_quote=1000.0)
    # a broker rounded the amount to 9.98 and paid 0.998 quote commission at 100.05
    fill = led.apply_fill("buy", 9.98, 100.05, 0.998, 1)
    assert fill.notional_quote == _approx(998.499)
    assert led.cash_quote == _approx(1000.0 - 998.499 - 0.998)
    assert (led.qty_base, led.position, led.n_trades) == (9.98, 1, 1)
    led.apply_fill("sell", 9.98, 101.0, 1.00798, 0)
    assert led.qty_base == 0.0
    assert led.cash_quote == _approx(1000.0 - 998.499 - 0.998 + 1007.98 - 1.00798)
    assert led.fees_quote == _approx(0.998 + 1.00798)
    assert led.turnover_quote == _approx(998.499 + 1007.98)
    with pytest.raises(ValueError, match="side"):
        led.apply_fill("hold", 1.0, 100.0, 0.0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quantity"):
        led.apply_fill("buy", 0.0, 100.0, 0.0, 1)
    with pytest.raises(ValueError, match="position_after"):
        led.apply_fill("buy", 1.0, 100.0, 0.0, 2)


def test_ledger_round_trips_through_json() -> None:
    led = Ledger(cash_quote=1000.0)
    led.apply_action(BUY, 101.37, C, 1.5, "long_short")
    state = json.loads(json.dumps(led.to_dict()))
    assert Ledger.from_dict(state) == led
    assert all(type(v) in (float, int) for v in led.to_dict().values())
    # numpy prices in, plain floats out (the backtest indexes numpy arrays)
    led2 = Ledger(cash_quote=1000.0)
    led2.apply_action(BUY, np.float64(101.37), C, 1.5, "long_short")
    assert type(led2.cash_quote) is float and type(led2.qty_base) is float
    with pytest.raises(ValueError, match="missing"):
        Ledger.from_dict({"cash_quote": 1.0})
    with pytest.raises(ValueError, match="position"):
        Ledger.from_dict({**state, "position": 2})
    with pytest.raises(ValueError, match="non-finite"):
        Ledger.from_dict({**state, "cash_quote": float("nan")})


# ---- bad inputs ----------------------------------------------------------------------------------


def test_unknown_mode_is_rejected_with_the_valid_ones_named() -> None:
    assert validate_position_mode("long_only") == "long_only"
    with pytest.raises(ValueError, match=r"unknown position mode 'short_only'.*long_short, long_only"):
        validate_position_mode("short_only")
    with pytest.raises(ValueError, match="unknown position mode"):
        Ledger(cash_quote=1.0).apply_action(BUY, 100.0, C, 0.0, "spot")
    with pytest.raises(ValueError, match="unknown position mode"):
        target_position(torch.tensor([1]), torch.tensor([0.0]), "futures")


@pytest.mark.parametrize("price", [0.0, -5.0, float("nan")])
def test_non_positive_prices_are_rejected(price: float) -> None:
    led = Ledger(cash_quote=1.0)
    with pytest.raises(ValueError, match="positive"):
        led.apply_action(BUY, price, C, 0.0, "long_only")
    with pytest.raises(ValueError, match="positive"):
        led.equity(price)
    with pytest.raises(ValueError, match="positive"):
        led.apply_fill("buy", 1.0, price, 0.0, 1)


def test_bad_actions_costs_and_positions_are_rejected() -> None:
    led = Ledger(cash_quote=1.0)
    with pytest.raises(ValueError, match="action"):
        led.apply_action(3, 100.0, C, 0.0, "long_short")
    with pytest.raises(ValueError, match="commission"):
        led.apply_action(BUY, 100.0, -0.001, 0.0, "long_short")
    with pytest.raises(ValueError, match="slippage"):
        led.apply_action(BUY, 100.0, C, -1.0, "long_short")
    short = Ledger(cash_quote=2.0, qty_base=-0.01, position=-1)
    with pytest.raises(ValueError, match="long_only position"):
        short.apply_action(HOLD, 100.0, C, 0.0, "long_only")  # a short ledger under a long_only policy
    with pytest.raises(ValueError, match="actions"):
        target_position(torch.tensor([0, 3]), torch.tensor([0.0, 0.0]), "long_short")
