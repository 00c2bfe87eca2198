"""The vectorised training environment: hand-computed rewards, and agreement with the scalar Ledger."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from strategies.accounting import Ledger
from strategies.actions import BUY, HOLD, POSITION_MODES, SELL
from strategies.env import VectorTradingEnv

C = 0.001


def _env(opens: list[float], closes: list[float], mode: str = "long_only", **kw: float) -> VectorTradingEnv:
    return VectorTradingEnv(
        torch.tensor(opens, dtype=torch.float64), torch.tensor(closes, dtype=torch.float64), mode, **kw
    )


def test_hand_computed_rewards_of_a_long_trade() -> None:
    env = _env([100.0, 100.0, 110.0, 121.0], [100.0, 105.0, 110.0, 121.0], commission=C, initial_cash=1000.0)
    state = env.reset(torch.tensor([0]))
    assert state.position.tolist() == [0.0] and state.cash_ratio.tolist() == [1.0]
    assert state.candle_idx.tolist() == [0] and env.equity.tolist() == [1000.0]
    # t=0 BUY, filled at open[1] = 100: q = 10, fee 1, C = -1; marked at close[1] = 105: E = 1049
    r0 = env.step(torch.tensor([BUY]))
    assert r0.dtype == torch.float64
    assert r0.item() == pytest.approx(math.log(1049 / 1000), abs=1e-15)
    assert env.position.tolist() == [1.0] and env.cash_ratio.tolist() == [0.0]
    # t=1 HOLD: nothing trades; close[2] = 110: E = -1 + 1100 = 1099
    r1 = env.step(torch.tensor([HOLD]))
    assert r1.item() == pytest.approx(math.log(1099 / 1049), abs=1e-15)
    # t=2 SELL (long_only: to flat) at open[3] = 121: fee 0.001 * 1210 = 1.21, C = -1 + 1210 - 1.21 = 1207.79
    r2 = env.step(torch.tensor([SELL]))
    assert r2.item() == pytest.approx(math.log(1207.79 / 1099), abs=1e-15)
    assert env.cash_quote.item() == pytest.approx(1207.79, rel=1e-14)
    assert env.qty_base.tolist() == [0.0]
    assert env.fees_paid.item() == pytest.approx(2.21, rel=1e-14)
    assert env.turnover_quote.item() == pytest.approx(2210.0, rel=1e-14)
    assert env.n_trades.tolist() == [2]
    # the rewards telescope to the log growth of the whole episode
    assert (r0 + r1 + r2).item() == pytest.approx(math.log(1207.79 / 1000), abs=1e-14)


def test_rows_that_do_not_trade_are_untouched_and_free() -> None:
    env = _env([100.0, 101.0, 99.0, 102.0], [100.5, 100.0, 98.0, 103.0], "long_short", commission=C)
    env.reset(torch.tensor([0, 0, 0, 0]))
    env.step(torch.tensor([BUY, SELL, HOLD, BUY]))
    cash, qty, fees = env.cash_quote.clone(), env.qty_base.clone(), env.fees_paid.clone()
    assert env.position.tolist() == [1.0, -1.0, 0.0, 1.0]
    # HOLD everywhere, BUY when long, SELL when short: none of these trade, not even to undo drift
    rewards = env.step(torch.tensor([HOLD, SELL, HOLD, BUY]))
    assert torch.equal(env.qty_base, qty)  # bit for bit
    assert torch.equal(env.cash_quote, cash)
    assert torch.equal(env.fees_paid, fees)
    assert env.n_trades.tolist() == [1, 1, 0, 1]
    assert env.position.tolist() == [1.0, -1.0, 0.0, 1.0]
    # equity tracks the price exactly: E = C + q * close
    assert torch.equal(env.equity, env.cash_quote + env.qty_base * 98.0)
    assert rewards[2].item() == 0.0  # flat earns exactly nothing


@pytest.mark.parametrize("mode", POSITION_MODES)
@pytest.mark.parametrize("slippage_bps", [0.0, 4.0])
def test_env_agrees_with_the_scalar_ledger_on_real_prices(
    candles_2024: pd.DataFrame, mode: str, slippage_bps: float
) -> None:
    """One accounting: B batched episodes and B scalar Ledger loops give the same rewards to 1e-12."""
    window = candles_2024.iloc[60_000:60_200]  # 200 real 5-minute candles
    opens, closes = window["open"].to_numpy(), window["close"].to_numpy()
    gen = torch.Generator().manual_seed(17)
    batch, steps = 32, 150
    start = torch.randint(0, 200 - steps, (batch,), generator=gen)
    # some episodes trade often, some rarely, so that both masks and long holds are exercised
    p_trade = torch.linspace(0.05, 0.9, batch)[:, None]
    trade = torch.rand(batch, steps, generator=gen) < p_trade
    actions = torch.where(trade, torch.randint(1, 3, (batch, steps), generator=gen), HOLD)

    env = VectorTradingEnv(torch.from_numpy(opens), torch.from_numpy(closes), mode, C, slippage_bps, 1.0)
    env.reset(start)
    rewards = torch.stack([env.step(actions[:, t]) for t in range(steps)], dim=1)

    for b in range(batch):
        s = int(start[b])
        led = Ledger(cash_quote=1.0)
        e_prev = led.equity(closes[s])
        for t in range(steps):
            led.apply_action(int(actions[b, t]), opens[s + t + 1], C, slippage_bps, mode)
            e_next = led.equity(closes[s + t + 1])
            assert abs(rewards[b, t].item() - math.log(e_next / e_prev)) <= 1e-12
            e_prev = e_next
        assert env.position[b].item() == led.position
        assert env.n_trades[b].item() == led.n_trades
        for got, want in [
            (env.cash_quote[b], led.cash_quote),
            (env.qty_base[b], led.qty_base),
            (env.fees_paid[b], led.fees_quote),
            (env.turnover_quote[b], led.turnover_quote),
            (env.equity[b], e_prev),
        ]:
            assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert int(env.n_trades.sum()) > 100
    if mode == "long_only":
        assert bool((env.qty_base >= 0).all())


def test_episode_length_is_checked_against_the_data() -> None:
    env = _env([100.0] * 10, [100.0] * 10)
    start = torch.tensor([0, 6])
    assert env.max_steps(start).tolist() == [9, 3]
    env.reset(start)
    for _ in range(3):
        env.step(torch.tensor([BUY, BUY]))
    with pytest.raises(ValueError, match="beyond the last candle"):
        env.step(torch.tensor([HOLD, HOLD]))
    with pytest.raises(ValueError, match="start_idx must lie in"):
        env.reset(torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="start_idx must lie in"):
        env.reset(torch.tensor([-1]))


def test_bad_inputs_are_rejected() -> None:
    ones = torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown position mode 'shorts'"):
        VectorTradingEnv(ones, ones, "shorts")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        prices = ones.clone()
        prices[2] = bad
        with pytest.raises(ValueError, match="finite and positive"):
            VectorTradingEnv(prices, ones, "long_only")
        with pytest.raises(ValueError, match="finite and positive"):
            VectorTradingEnv(ones, prices, "long_only")
    with pytest.raises(ValueError, match="differ in length"):
        VectorTradingEnv(ones, torch.ones(4), "long_only")
    with pytest.raises(ValueError, match="commission"):
        VectorTradingEnv(ones, ones, "long_only", commission=1.5)
    env = VectorTradingEnv(ones, ones, "long_only")
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.tensor([BUY]))
    with pytest.raises(ValueError, match="integer"):
        env.reset(torch.tensor([0.0]))
    env.reset(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.tensor([BUY]))
    with pytest.raises(ValueError, match="integer"):
        env.step(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="actions must be 0 HOLD"):
        env.step(torch.tensor([1, 3]))


def test_short_that_loses_everything_stops_with_a_clear_error() -> None:
    env = _env([100.0, 100.0, 250.0], [100.0, 100.0, 250.0], "long_short", commission=0.0)
    env.reset(torch.tensor([0]))
    env.step(torch.tensor([SELL]))  # short 1x at 100: C = 2, q = -0.01
    with pytest.raises(RuntimeError, match="equity fell to <= 0"):
        env.step(torch.tensor([HOLD]))  # at 250: E = 2 - 2.5 < 0


def test_numpy_prices_are_accepted() -> None:
    env = VectorTradingEnv(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.5, 3.5]), "long_only", commission=0.0)
    env.reset(torch.tensor([0]))
    r = env.step(torch.tensor([BUY]))  # E_0 = 1 (flat); q = 1 / 2 at open 2, marked at 2.5: E_1 = 1.25
    assert r.item() == pytest.approx(math.log(1.25), abs=1e-15)


def test_reset_with_an_inherited_position_holds_it_without_a_fee() -> None:
    """Exploring starts: an episode may begin holding -1/0/+1 of equity, bought at the start close, fee-free."""
    opens = torch.tensor([100.0, 110.0, 121.0], dtype=torch.float64)
    closes = torch.tensor([100.0, 120.0, 100.0], dtype=torch.float64)
    env = VectorTradingEnv(opens, closes, mode="long_short", commission=0.001, initial_cash=1.0)
    env.reset(torch.tensor([0, 0, 0]), torch.tensor([-1.0, 0.0, 1.0]))
    assert env.position.tolist() == [-1.0, 0.0, 1.0]
    rewards = env.step(torch.tensor([0, 0, 0]))  # HOLD: marks 100 -> 120, no trade, no fee
    # long 0.01 units: E = 0 + 0.01 * 120 = 1.2; short: E = 2 - 0.01 * 120 = 0.8; flat: 1
    torch.testing.assert_close(rewards, torch.log(torch.tensor([0.8, 1.0, 1.2], dtype=torch.float64)))
    assert env.fees_paid.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="initial_position"):
        VectorTradingEnv(opens, closes, mode="long_only").reset(torch.tensor([0]), torch.tensor([-1.0]))
