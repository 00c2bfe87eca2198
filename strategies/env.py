"""Vectorised trading environment: B episodes stepped in lockstep as torch tensors (float64 money).

Timing (docs/design.md §2, §5): episode b starts flat at the close of candle s_b = start_idx[b]; its decision t
is taken at the close of candle s_b + t, filled at the open of candle s_b + t + 1 and marked at that
candle's close. The reward of step t is r_t = ln(E_{t+1} / E_t), with E_t = C_t + q_t * close[s_b + t]
(before the decision's fill) and E_{t+1} after it, fees included.

Fills use `strategies.accounting.target_position` and `rebalance`, the same code the scalar `Ledger`
(backtest, brokers) runs, so both agree to rounding; only rows whose target differs from their current
position trade, the others keep their holdings bit for bit and pay nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from strategies.accounting import DEFAULT_COMMISSION, rebalance, target_position
from strategies.actions import ACTIONS, validate_position_mode


class EnvState(NamedTuple):
    """What the policy sees of the account, plus where each episode stands in the data."""

    position: torch.Tensor
    """(B,) float32 in {-1, 0, 1}: the position state."""
    cash_ratio: torch.Tensor
    """(B,) float32: 1 - |position|."""
    candle_idx: torch.Tensor
    """(B,) int64: the candle whose close the next decision follows (features use rows <= it)."""


def _price_tensor(name: str, prices: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Prices as a 1-D float64 tensor, all finite and positive, else ValueError."""
    t = torch.as_tensor(prices).to(torch.float64)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (T,), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(f"{name} must be finite and positive")
    return t


def _after_reset(attr: str, doc: str) -> property:
    """A read-only view of the state tensor `attr`, refused before `reset`."""

    def get(env: VectorTradingEnv) -> torch.Tensor:
        env._require_reset()
        return getattr(env, attr)

    return property(get, doc=doc)


class VectorTradingEnv:
    """B trading episodes over one price series, stepped together (no Python loop over B)."""

    def __init__(
        self,
        open_prices: torch.Tensor | np.ndarray,
        close_prices: torch.Tensor | np.ndarray,
        mode: str,
        commission: float = DEFAULT_COMMISSION,
        slippage_bps: float = 0.0,
        initial_cash: float = 1.0,
        decide_every: int = 1,
    ) -> None:
        """Prices (T,) of the data the episodes run on; money in quote units starting at initial_cash.

        decide_every = K: one step is one decision; it fills at the next open and the position is then held
        for K candles, so step t of an episode starting at row s fills at open[s + t*K + 1] and is marked at
        close[s + (t+1)*K]. K = 1 is the card's one decision per candle.
        """
        self.mode = validate_position_mode(mode)
        self._open = _price_tensor("open_prices", open_prices)
        self._close = _price_tensor("close_prices", close_prices).to(self._open.device)
        if self._open.shape != self._close.shape:
            raise ValueError(
                f"open_prices and close_prices differ in length: {self._open.shape[0]} vs {self._close.shape[0]}"
            )
        if self._open.shape[0] < 2:
            raise ValueError("need at least 2 candles: a decision at one close and its fill at the next open")
        if not 0 <= commission < 1:
            raise ValueError(f"commission must be in [0, 1), got {commission!r}")
        if not slippage_bps >= 0:
            raise ValueError(f"slippage_bps must be >= 0, got {slippage_bps!r}")
        if not initial_cash > 0:
            raise ValueError(f"initial_cash must be positive, got {initial_cash!r}")
        if int(decide_every) < 1:
            raise ValueError(f"decide_every must be >= 1, got {decide_every!r}")
        self.decide_every = int(decide_every)
        self.commission = float(commission)
        self.slippage_bps = float(slippage_bps)
        # row (position + 1) * 3 + action -> target_position(action, position); a position the mode cannot
        # hold (-1 in long_only) maps to itself and is never reached.
        allowed = (-1, 0, 1) if self.mode == "long_short" else (0, 1)
        self._target_table = torch.tensor(
            [
                float(target_position(a, p, self.mode)) if p in allowed else float(p)
                for p in (-1, 0, 1)
                for a in ACTIONS
            ],
            dtype=torch.float32,
            device=self._open.device,
        )
        self.initial_cash = float(initial_cash)
        self._start: torch.Tensor | None = None
        self._t = 0

    @property
    def n_candles(self) -> int:
        """T, the length of the price series."""
        return int(self._open.shape[0])

    def max_steps(self, start_idx: torch.Tensor) -> torch.Tensor:
        """(B,) int64: how many steps an episode starting at each index can take before the data ends."""
        return (self.n_candles - 1 - torch.as_tensor(start_idx, dtype=torch.int64)) // self.decide_every

    # ---- episode control ------------------------------------------------------------------------------

    def reset(self, start_idx: torch.Tensor, initial_position: torch.Tensor | None = None) -> EnvState:
        """Start B episodes at candles start_idx (B,): flat (cash = initial_cash, qty 0), or already holding
        `initial_position` (B,) in {-1, 0, 1} of the initial equity at the start candle's close, with no fee
        (the position is inherited, not traded: training's "exploring starts" option)."""
        start = torch.as_tensor(start_idx)
        if start.ndim != 1 or start.shape[0] == 0:
            raise ValueError(f"start_idx must be a non-empty 1-D tensor (B,), got shape {tuple(start.shape)}")
        if start.dtype.is_floating_point or start.dtype == torch.bool:
            raise ValueError(f"start_idx must be an integer tensor, got {start.dtype}")
        start = start.to(device=self._open.device, dtype=torch.int64)
        if bool((start < 0).any()) or bool((start > self.n_candles - 2).any()):
            raise ValueError(f"start_idx must lie in [0, {self.n_candles - 2}] so that at least one step fits the data")
        b = start.shape[0]
        f64 = {"dtype": torch.float64, "device": self._open.device}
        self._start = start
        self._t = 0
        # The episode may take at most this many steps: the first episode to run out of data decides.
        self._steps_left = int(self.max_steps(start).min())
        self._cash = torch.full((b,), self.initial_cash, **f64)
        self._qty = torch.zeros(b, **f64)
        self._position = torch.zeros(b, dtype=torch.float32, device=self._open.device)
        if initial_position is not None:
            pos = torch.as_tensor(initial_position, dtype=torch.float32, device=self._open.device)
            allowed = (-1.0, 0.0, 1.0) if self.mode == "long_short" else (0.0, 1.0)
            if pos.shape != start.shape or not bool(torch.isin(pos, torch.tensor(allowed)).all()):
                raise ValueError(f"initial_position must be (B,) with values in {allowed} in {self.mode} mode")
            self._position = pos
            self._qty = pos.double() * self.initial_cash / self._close[start]
            self._cash = self._cash - self._qty * self._close[start]
        self._equity = self._cash + self._qty * self._close[start]
        self._fees = torch.zeros(b, **f64)
        self._turnover = torch.zeros(b, **f64)
        self._n_trades = torch.zeros(b, dtype=torch.int64, device=self._open.device)
        return self.state()

    def step(self, actions: torch.Tensor) -> torch.Tensor:
        """Fill actions (B,) at the next open, mark at the next close; rewards (B,) = ln(E_{t+1}/E_t)."""
        start = self._require_reset()
        actions = torch.as_tensor(actions, device=self._open.device)
        if actions.shape != start.shape:
            raise ValueError(f"actions must have shape {tuple(start.shape)}, got {tuple(actions.shape)}")
        if actions.dtype.is_floating_point or actions.dtype == torch.bool:
            raise ValueError(f"actions must be an integer tensor (0 HOLD, 1 BUY, 2 SELL), got {actions.dtype}")
        if self._steps_left <= 0:
            raise ValueError(
                f"step {self._t} would fill beyond the last candle ({self.n_candles - 1}); "
                "check max_steps(start_idx) before choosing the episode length"
            )
        if int(actions.min()) < 0 or int(actions.max()) > 2:
            raise ValueError("actions must be 0 HOLD, 1 BUY or 2 SELL")
        k = self.decide_every
        nxt = start + self._t * k + 1  # the fill: the open right after the decision
        mark = start + (self._t + 1) * k  # the close at which the next decision is taken
        # target_position evaluated once per (position, action) pair at construction: one lookup per step
        # instead of a dozen elementwise ops (this loop is the training rollout's hot path).
        target = self._target_table[(self._position.long() + 1) * 3 + actions]
        new_cash, new_qty, fee, traded, fill_price = rebalance(
            self._cash, self._qty, target, self._open[nxt], self.commission, self.slippage_bps
        )
        # Only a changed target trades (no rebalancing of drift); the Ledger books nothing when Δq is 0.
        booked = (target != self._position) & (traded != 0)
        self._cash = torch.where(booked, new_cash, self._cash)
        self._qty = torch.where(booked, new_qty, self._qty)
        self._fees = self._fees + torch.where(booked, fee, 0.0)
        self._turnover = self._turnover + torch.where(booked, traded.abs() * fill_price, 0.0)
        self._n_trades = self._n_trades + booked.to(torch.int64)
        self._position = target.to(torch.float32)  # equal to the old position wherever target == p

        equity_next = self._cash + self._qty * self._close[mark]
        if not bool((equity_next > 0).all()):
            bad = torch.nonzero(equity_next <= 0).flatten().tolist()[:5]
            raise RuntimeError(f"equity fell to <= 0 in episode(s) {bad} at step {self._t}: log reward undefined")
        rewards = torch.log(equity_next / self._equity)
        self._equity = equity_next
        self._t += 1
        self._steps_left -= 1
        return rewards

    def state(self) -> EnvState:
        """Position (B,), cash ratio (B,) and current decision candle (B,)."""
        start = self._require_reset()
        return EnvState(self._position.clone(), self.cash_ratio, start + self._t * self.decide_every)

    def _require_reset(self) -> torch.Tensor:
        if self._start is None:
            raise RuntimeError("call reset(start_idx) before stepping the environment")
        return self._start

    # ---- views (B,) -------------------------------------------------------------------------------------

    @property
    def t(self) -> int:
        """Steps taken since reset (the same for all episodes)."""
        return self._t

    @property
    def candle_idx(self) -> torch.Tensor:
        """(B,) int64: the candle whose close the next decision follows."""
        return self._require_reset() + self._t * self.decide_every

    position = _after_reset("_position", "(B,) float32 in {-1, 0, 1}.")

    @property
    def cash_ratio(self) -> torch.Tensor:
        """(B,) float32: 1 - |position|."""
        self._require_reset()
        return 1.0 - self._position.abs()

    equity = _after_reset("_equity", "(B,) float64: cash + qty * close of the current decision candle.")
    cash_quote = _after_reset("_cash", "(B,) float64.")
    qty_base = _after_reset("_qty", "(B,) float64, negative when short.")
    fees_paid = _after_reset("_fees", "(B,) float64: fees in quote since reset.")
    turnover_quote = _after_reset("_turnover", "(B,) float64: traded notional in quote since reset.")
    n_trades = _after_reset("_n_trades", "(B,) int64: fills since reset.")
