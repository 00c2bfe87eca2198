"""Training objectives: how a batch of rollouts becomes per-step advantages (pure: tensors in, tensors out).

An objective names three things, all stored in the checkpoint (docs/design.md §6):
  - the reward of one decision step, from the step's log return ln(E_{t+1}/E_t) (fees included);
  - the discount gamma, applied per decision (not per candle once decisions are K candles apart);
  - how returns become advantages: normalised over the batch (the card), or leave-one-out inside groups of
    M rollouts that share a start point and therefore a price path.

Objectives:
  card        the architecture card's: reward = log return, batch-normalised returns. Reproduces the
              checkpoints trained before objectives existed bit for bit.
  log_return  reward = log return (with grouping or the decision interval, unlike `card`).
  excess      benchmark-relative: log return minus the market's log return over the same step, so that in
              long_only being flat costs the market's move ((p - 1) * r - cost in log terms).
  vol_scaled  Zhang, Zohren & Roberts (2019): the log return (fees inside it) scaled by target volatility over
              the market's ex-ante volatility at the decision, so calm and wild weeks weigh alike.
  dsr         the differential Sharpe ratio of Moody & Saffell (1998): each step's marginal contribution to
              an exponentially weighted Sharpe ratio of the episode's returns.
  expected_pnl the exact expected P&L (fees included) of the sampling policy, differentiated analytically
              instead of estimated from samples: the position is a Markov chain over 2-3 states whose
              distribution is tracked step by step (`expected_step_pnl`). The gradient is the policy
              gradient that REINFORCE estimates, without its sampling noise; only the market's noise remains.

Grouped rollouts (group_size M > 1): the batch is G groups of M rollouts on the same price path. A rollout's
advantage at step t is its return-to-go minus the mean return-to-go of the other M - 1 rollouts of its group
at step t (leave-one-out). The market's move is common to the group and cancels, so only what the actions
changed is left. A consequence worth knowing: any reward term that every rollout of a group shares exactly
(the market's return in `excess`) cancels as well, so under grouping `excess` equals `log_return`.
"""

from __future__ import annotations

import numpy as np
import torch

from strategies.candles import CANDLE_MS

OBJECTIVES = ("card", "log_return", "excess", "vol_scaled", "dsr", "expected_pnl")
# Objectives whose shaped reward needs the market's ex-ante volatility at each decision.
NEEDS_VOLATILITY = ("vol_scaled", "dsr")
SAMPLED_OBJECTIVES = OBJECTIVES[:5]  # learned by REINFORCE from sampled rollouts; expected_pnl is analytic


def validate_objective(name: str) -> str:
    """Return `name` if it is a known objective, else raise ValueError naming the valid ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: expected one of {', '.join(OBJECTIVES)}")
    return name


# --- the decision interval ------------------------------------------------------------------------------


def is_decision_candle(ts_ms: np.ndarray | int, decide_every: int) -> np.ndarray | bool:
    """Whether the policy decides at the close of the candle opening at ts_ms: its close instant, counted in
    5-minute candles since the epoch, is divisible by K. A rule of the clock alone, so it survives restarts
    and gaps and is the same in training, backtest, replay and the daemon. K = 1: every candle."""
    k = int(decide_every)
    if k < 1:
        raise ValueError(f"decide_every must be >= 1, got {decide_every!r}")
    idx = np.asarray(ts_ms, dtype=np.int64) // CANDLE_MS + 1
    out = idx % k == 0
    return bool(out) if out.ndim == 0 else out


# --- per-step inputs of the shaped rewards -------------------------------------------------------------


def ex_ante_volatility(close: np.ndarray, window: int, decide_every: int) -> np.ndarray:
    """(T,) float64: std (ddof 0) of the last `window` one-candle log returns ending at each close, scaled to
    one decision interval by sqrt(K); NaN until `window` returns exist. Row t uses closes <= t only."""
    close = np.asarray(close, dtype=np.float64)
    r = np.diff(np.log(close), prepend=np.nan)
    out = np.full(close.shape, np.nan)
    if window < 2 or close.size <= window:
        return out
    csum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(r))])
    csq = np.concatenate([[0.0], np.cumsum(np.nan_to_num(r) ** 2)])
    # rows t >= window: returns r[t-window+1 .. t] (r[0] is NaN, hence the start at window)
    t = np.arange(window, close.size)
    mean = (csum[t + 1] - csum[t + 1 - window]) / window
    var = (csq[t + 1] - csq[t + 1 - window]) / window - mean**2
    out[window:] = np.sqrt(np.maximum(var, 0.0) * decide_every)
    return out


def differential_sharpe(returns: torch.Tensor, eta: float, initial_var: torch.Tensor) -> torch.Tensor:
    """Moody & Saffell's differential Sharpe ratio, step by step within each episode: (B, L) -> (B, L).

    A and B are exponential moving estimates (rate eta) of the first and second moments of the returns,
    starting at A = 0 and B = initial_var (B,), the market's ex-ante variance, so the first steps are not
    divided by zero. D_t = (B_{t-1} dA_t - A_{t-1} dB_t / 2) / (B_{t-1} - A_{t-1}^2)^(3/2), with
    dA_t = R_t - A_{t-1} and dB_t = R_t^2 - B_{t-1}.
    """
    r = returns.to(torch.float64)
    a = torch.zeros(r.shape[0], dtype=torch.float64)
    b = initial_var.to(torch.float64).clamp(min=1e-12)
    out = torch.empty_like(r)
    for t in range(r.shape[1]):
        da = r[:, t] - a
        db = r[:, t] ** 2 - b
        var = (b - a**2).clamp(min=1e-12)
        out[:, t] = (b * da - 0.5 * a * db) / var**1.5
        a = a + eta * da
        b = b + eta * db
    return out


def shaped_rewards(
    objective: str,
    log_returns: torch.Tensor,
    *,
    market_log_returns: torch.Tensor | None = None,
    volatility: torch.Tensor | None = None,
    vol_target: float = 0.01,
    dsr_eta: float = 0.02,
) -> torch.Tensor:
    """Per-step rewards (B, L) float64 of an objective from the steps' log returns (B, L) ln(E_{t+1}/E_t).

    market_log_returns (B, L): ln(close at the step's mark / close at its decision), needed by `excess`;
    volatility (B, L): the market's ex-ante volatility per decision interval at each decision, needed by
    `vol_scaled` and (its first column, squared) by `dsr`.
    """
    validate_objective(objective)
    r = log_returns.to(torch.float64)
    if objective in ("card", "log_return"):
        return r
    if objective == "excess":
        if market_log_returns is None:
            raise ValueError("the excess objective needs market_log_returns")
        return r - market_log_returns.to(torch.float64)
    if volatility is None:
        raise ValueError(f"the {objective} objective needs the ex-ante volatility")
    vol = volatility.to(torch.float64)
    if not bool(torch.isfinite(vol).all()) or not bool((vol > 0).all()):
        raise ValueError("volatility must be finite and positive at every decision")
    if objective == "vol_scaled":
        return r * (vol_target / vol)
    return differential_sharpe(r, dsr_eta, vol[:, 0] ** 2)


# --- returns and advantages ----------------------------------------------------------------------------


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{j>=t} gamma^(j-t) r_j within each episode: (B, L) -> (B, L), one matmul."""
    steps = rewards.shape[1]
    idx = torch.arange(steps, dtype=rewards.dtype)
    expo = idx[:, None] - idx[None, :]  # (j, t) -> j - t
    discount = torch.where(expo >= 0, torch.pow(torch.as_tensor(gamma, dtype=rewards.dtype), expo.clamp(min=0)), 0)
    return rewards @ discount


def advantages(rewards: torch.Tensor, gamma: float, group_size: int = 1) -> torch.Tensor:
    """Advantages (B, L) float32 of rewards (B, L): discounted returns, then baselined.

    group_size 1: (G - mean) / (std + 1e-8) over the whole batch (the card's normalisation).
    group_size M > 1: rows [g*M, (g+1)*M) share a start point; each row's return-to-go minus the mean of the
    other M - 1 rows' at the same step (leave-one-out), then divided by the batch std (+ 1e-8) of those
    differences (a scale only: their mean is already 0 in every group).
    """
    returns = discounted_returns(rewards, gamma)
    if group_size <= 1:
        return ((returns - returns.mean()) / (returns.std() + 1e-8)).float()
    b, steps = returns.shape
    if b % group_size:
        raise ValueError(f"batch of {b} episodes is not a whole number of groups of {group_size}")
    grouped = returns.reshape(b // group_size, group_size, steps)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    adv = (grouped - others_mean).reshape(b, steps)
    return (adv / (adv.std() + 1e-8)).float()


def linear_schedule(start: float, end: float, k: int, updates: int) -> float:
    """start at update 0, end from update `updates` on, linear in between; `updates` <= 0: start always."""
    if updates <= 0:
        return float(start)
    frac = min(max(k / updates, 0.0), 1.0)
    return float(start + (end - start) * frac)


# --- the exact expected P&L of the stochastic policy ----------------------------------------------------


def position_transitions(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(3 positions, 3 actions, 3 positions) one-hot of where each action leads from each position state,
    and (3, 3) |target - position| (the equity fraction traded); position axes are indexed position + 1."""
    from strategies.accounting import target_position
    from strategies.actions import ACTIONS

    allowed = (-1, 0, 1) if mode == "long_short" else (0, 1)
    lead = torch.zeros(3, 3, 3, dtype=torch.float64)
    turnover = torch.zeros(3, 3, dtype=torch.float64)
    for p in (-1, 0, 1):
        for a in ACTIONS:
            target = target_position(a, p, mode) if p in allowed else p
            lead[p + 1, a, target + 1] = 1.0
            turnover[p + 1, a] = abs(target - p)
    return lead, turnover


def expected_step_pnl(
    probs: torch.Tensor,
    gap_returns: torch.Tensor,
    hold_returns: torch.Tensor,
    mode: str,
    commission: float,
    risk_aversion: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected P&L per decision (B, L) of a policy that samples its actions, as a differentiable function of
    its probabilities: the `expected_pnl` objective.

    probs (B, L, 3 positions, 3 actions): the policy at each decision for each position state (index p + 1);
    gap_returns (B, L): the market's return from the decision's close to the fill (the next open), earned by
    the position held before the decision; hold_returns (B, L): from the fill to the close K candles later,
    earned by the position after it. The position is a Markov chain over its 2 or 3 states, so its
    distribution q_t is tracked exactly (episodes start flat): E[P&L_t] = sum_s q_t(s) s gap_t
    + sum_s' q_{t+1}(s') s' hold_t - commission * sum_s q_t(s) sum_a pi(a|s) |target(a, s) - s|.
    Returns are simple returns of equity fractions (no compounding inside a step); the fee term is the exact
    expected turnover of the sampled positions, so a policy that dithers pays for it here as it would live.
    risk_aversion lambda subtracts lambda * E[p_{t+1}^2] * hold_t^2, the step's variance with the realised
    squared return as its estimate: lambda = 0.5 makes each step the second-order expansion of the expected
    log growth, E[ln(1 + p r)] ~ E[p] r - E[p^2] r^2 / 2 (the Kelly criterion), so holding through wild
    hours must be paid for by their expected return.
    Returns (expected P&L (B, L), expected turnover (B, L) as a fraction of equity), float64.
    """
    lead, turnover = position_transitions(mode)
    p = probs.to(torch.float64)
    b, steps = p.shape[:2]
    states = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    q = torch.zeros(b, 3, dtype=torch.float64)
    q[:, 1] = 1.0
    out, traded = [], []
    for t in range(steps):
        pt = p[:, t]  # (B, 3, 3)
        moved = (q * (pt * turnover).sum(-1)).sum(-1)
        q_next = torch.einsum("bs,bsa,sat->bt", q, pt, lead)
        pnl = (q @ states) * gap_returns[:, t] + (q_next @ states) * hold_returns[:, t]
        if risk_aversion:
            pnl = pnl - risk_aversion * (q_next @ states**2) * hold_returns[:, t] ** 2
        out.append(pnl - commission * moved)
        traded.append(moved)
        q = q_next
    return torch.stack(out, dim=1), torch.stack(traded, dim=1)
