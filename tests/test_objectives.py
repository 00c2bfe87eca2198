"""Objectives: decision interval, shaped rewards, advantages and the expected-P&L recursion on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strategies.accounting import Ledger
from strategies.objectives import (
    advantages,
    differential_sharpe,
    discounted_returns,
    ex_ante_volatility,
    expected_step_pnl,
    is_decision_candle,
    linear_schedule,
    shaped_rewards,
    validate_objective,
)

HOUR_MS = 3_600_000


def test_decision_candles_are_the_closes_on_the_k_grid() -> None:
    # K = 12: the candle opening at 00:55 closes at 01:00, a whole hour: decide. 00:50 closes at 00:55: keep.
    t0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
    assert is_decision_candle(t0 + 55 * 60_000, 12) is True
    assert is_decision_candle(t0 + 50 * 60_000, 12) is False
    ts = t0 + np.arange(0, 288) * 300_000
    mask = is_decision_candle(ts, 12)
    assert mask.sum() == 24 and np.all(((ts[mask] + 300_000) % HOUR_MS) == 0)
    assert is_decision_candle(ts, 1).all()
    # a rule of the clock: the same candle decides whatever came before it (restarts, gaps)
    assert list(is_decision_candle(ts[100:], 48)) == list(is_decision_candle(ts, 48)[100:])
    with pytest.raises(ValueError, match="decide_every"):
        is_decision_candle(ts, 0)
    with pytest.raises(ValueError, match="unknown objective"):
        validate_objective("sharpe")


def test_ex_ante_volatility_by_hand_and_without_look_ahead() -> None:
    close = np.array([100.0, 110.0, 99.0, 108.9, 108.9])
    vol = ex_ante_volatility(close, window=2, decide_every=4)
    r = np.diff(np.log(close))
    assert np.isnan(vol[:2]).all()
    assert vol[2] == pytest.approx(np.std(r[0:2]) * 2.0, rel=1e-12)
    assert vol[4] == pytest.approx(np.std(r[2:4]) * 2.0, rel=1e-12)
    rng = np.random.default_rng(1)
    long = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 500)))
    full = ex_ante_volatility(long, 50, 12)
    for t in (60, 200, 499):
        np.testing.assert_allclose(ex_ante_volatility(long[: t + 1], 50, 12)[-1], full[t], rtol=1e-9)


def test_shaped_rewards_by_hand() -> None:
    r = torch.tensor([[0.01, -0.02]], dtype=torch.float64)
    m = torch.tensor([[0.005, 0.01]], dtype=torch.float64)
    vol = torch.tensor([[0.02, 0.04]], dtype=torch.float64)
    assert torch.equal(shaped_rewards("card", r), r)
    excess = shaped_rewards("excess", r, market_log_returns=m)
    torch.testing.assert_close(excess, torch.tensor([[0.005, -0.03]], dtype=torch.float64))
    torch.testing.assert_close(
        shaped_rewards("vol_scaled", r, volatility=vol, vol_target=0.01), torch.tensor([[0.005, -0.005]]).double()
    )
    with pytest.raises(ValueError, match="market_log_returns"):
        shaped_rewards("excess", r)
    with pytest.raises(ValueError, match="positive"):
        shaped_rewards("vol_scaled", r, volatility=torch.zeros_like(r))


def test_differential_sharpe_by_hand() -> None:
    r = torch.tensor([[0.02, -0.01]], dtype=torch.float64)
    eta, b0 = 0.1, 0.0004
    d = differential_sharpe(r, eta, torch.tensor([b0], dtype=torch.float64))
    # step 0: A=0, B=b0 -> D = B*dA / B^1.5 = R / sqrt(b0)
    assert float(d[0, 0]) == pytest.approx(0.02 / math.sqrt(b0))
    a1 = eta * 0.02
    b1 = b0 + eta * (0.02**2 - b0)
    da, db = -0.01 - a1, 0.0001 - b1
    assert float(d[0, 1]) == pytest.approx((b1 * da - 0.5 * a1 * db) / (b1 - a1**2) ** 1.5)
    dsr = shaped_rewards("dsr", r, volatility=torch.tensor([[0.02, 0.5]], dtype=torch.float64), dsr_eta=eta)
    torch.testing.assert_close(dsr, d, rtol=1e-12, atol=0)  # B0 = 0.02**2, the first decision's vol squared


def test_card_advantages_are_the_batch_normalised_returns() -> None:
    rewards = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    returns = discounted_returns(rewards, 0.5)  # [[2, 2], [-0.5, -1]]
    torch.testing.assert_close(returns, torch.tensor([[2.0, 2.0], [-0.5, -1.0]]).double())
    adv = advantages(rewards, 0.5)
    expected = ((returns - returns.mean()) / (returns.std() + 1e-8)).float()
    assert adv.dtype == torch.float32 and torch.equal(adv, expected)


def test_leave_one_out_advantages_by_hand_and_the_market_cancels() -> None:
    # two groups of M = 3, one step, gamma irrelevant
    rewards = torch.tensor([[1.0], [2.0], [6.0], [0.0], [0.0], [3.0]], dtype=torch.float64)
    adv = advantages(rewards, 0.99, group_size=3)
    raw = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(adv, (raw / (raw.std() + 1e-8)).float())
    # a reward every rollout of a group shares (the market's move on the common path) changes nothing
    rng = torch.Generator().manual_seed(0)
    r = torch.randn(8, 5, generator=rng, dtype=torch.float64)
    common = torch.randn(2, 1, 5, generator=rng, dtype=torch.float64).expand(2, 4, 5).reshape(8, 5)
    torch.testing.assert_close(advantages(r + common, 0.9, 4), advantages(r, 0.9, 4))
    with pytest.raises(ValueError, match="groups"):
        advantages(r, 0.9, 3)


def test_linear_schedule() -> None:
    assert linear_schedule(0.1, 0.0, 0, 100) == 0.1
    assert linear_schedule(0.1, 0.0, 50, 100) == pytest.approx(0.05)
    assert linear_schedule(0.1, 0.0, 500, 100) == 0.0
    assert linear_schedule(0.1, 0.0, 500, 0) == 0.1


def _probs(hold: float, buy: float, sell: float) -> torch.Tensor:
    return torch.tensor([hold, buy, sell], dtype=torch.float64).expand(3, 3)


def test_expected_pnl_by_hand_long_only() -> None:
    # step 0 from flat: BUY with 0.5 -> q1 = (flat 0.5, long 0.5); fee 0.5 * c; P&L 0.5 * hold_0
    # step 1: from flat BUY 0.5 again, from long SELL 0.2 -> q2 long = 0.5*0.5 + 0.5*0.8 = 0.65
    probs = torch.stack([_probs(0.5, 0.5, 0.0), _probs(0.3, 0.5, 0.2)])[None]  # (1, 2, 3, 3)
    gap = torch.tensor([[0.0, 0.01]], dtype=torch.float64)
    hold = torch.tensor([[0.02, -0.03]], dtype=torch.float64)
    c = 0.001
    pnl, turnover = expected_step_pnl(probs, gap, hold, "long_only", c)
    assert float(pnl[0, 0]) == pytest.approx(0.5 * 0.02 - c * 0.5)
    moved_1 = 0.5 * 0.5 + 0.5 * 0.2  # flat buys, long sells
    assert float(turnover[0, 1]) == pytest.approx(moved_1)
    assert float(pnl[0, 1]) == pytest.approx(0.5 * 0.01 + 0.65 * -0.03 - c * moved_1)


def test_expected_pnl_by_hand_long_short_flip_costs_two() -> None:
    probs = torch.stack([_probs(0.0, 1.0, 0.0), _probs(0.0, 0.0, 1.0)])[None]  # buy, then flip short
    gap = torch.zeros(1, 2, dtype=torch.float64)
    hold = torch.tensor([[0.01, -0.02]], dtype=torch.float64)
    pnl, turnover = expected_step_pnl(probs, gap, hold, "long_short", 0.001)
    torch.testing.assert_close(turnover, torch.tensor([[1.0, 2.0]]).double())
    torch.testing.assert_close(pnl, torch.tensor([[0.01 - 0.001, 0.02 - 0.002]]).double())


def test_expected_pnl_equals_the_mean_of_sampled_paths() -> None:
    """The recursion is the exact mean of the sampled policy's linear P&L (Monte Carlo within 4 sigma)."""
    g = torch.Generator().manual_seed(3)
    steps, mode, c = 6, "long_short", 0.001
    probs = torch.softmax(torch.randn(1, steps, 3, 3, generator=g, dtype=torch.float64), -1)
    gap = torch.randn(1, steps, generator=g, dtype=torch.float64) * 0.001
    hold = torch.randn(1, steps, generator=g, dtype=torch.float64) * 0.01
    exact = float(expected_step_pnl(probs, gap, hold, mode, c)[0].sum())
    rng = np.random.default_rng(0)
    n = 40_000
    pos = np.zeros(n, dtype=np.int64)
    total = np.zeros(n)
    p = probs[0].numpy()
    for t in range(steps):
        cdf = p[t][pos + 1].cumsum(-1)
        a = (rng.random(n)[:, None] >= cdf[:, :2]).sum(-1)
        new = np.where(a == 0, pos, np.where(a == 1, 1, -1))
        total += pos * gap[0, t].item() + new * hold[0, t].item() - c * np.abs(new - pos)
        pos = new
    assert abs(total.mean() - exact) < 4 * total.std() / math.sqrt(n)


def test_expected_pnl_tracks_the_ledger_to_first_order() -> None:
    """For a deterministic policy the expected P&L is the Ledger's log return up to compounding (small moves)."""
    opens = np.array([100.0, 100.1, 100.3, 100.2])
    closes = np.array([100.0, 100.2, 100.25, 100.4])
    ledger = Ledger(cash_quote=1.0)
    ledger.apply_action(1, opens[1], 0.001, 0.0, "long_only")  # decide at close 0, fill at open 1
    e1 = ledger.equity(closes[1])
    ledger.apply_action(2, opens[2], 0.001, 0.0, "long_only")
    e2 = ledger.equity(closes[2])
    probs = torch.stack([_probs(0.0, 1.0, 0.0), _probs(0.0, 0.0, 1.0)])[None]
    gap = torch.tensor([[opens[1] / closes[0] - 1, opens[2] / closes[1] - 1]])
    hold = torch.tensor([[closes[1] / opens[1] - 1, closes[2] / opens[2] - 1]])
    pnl, _ = expected_step_pnl(probs, gap.double(), hold.double(), "long_only", 0.001)
    assert float(pnl[0, 0]) == pytest.approx(math.log(e1), abs=1e-6)
    assert float(pnl[0, 1]) == pytest.approx(math.log(e2 / e1), abs=1e-5)


def test_risk_aversion_charges_the_held_variance() -> None:
    """lambda * E[p^2] * r^2 per step: a long_short position pays it whichever side it holds."""
    probs = torch.stack([_probs(0.5, 0.25, 0.25)])[None]  # from flat: long 0.25, short 0.25
    gap = torch.zeros(1, 1, dtype=torch.float64)
    hold = torch.tensor([[0.02]], dtype=torch.float64)
    plain, _ = expected_step_pnl(probs, gap, hold, "long_short", 0.0)
    averse, _ = expected_step_pnl(probs, gap, hold, "long_short", 0.0, risk_aversion=0.5)
    assert float(plain[0, 0]) == pytest.approx(0.0)  # the two sides cancel in expectation
    assert float(averse[0, 0]) == pytest.approx(-0.5 * 0.5 * 0.02**2)  # E[p^2] = 0.5
