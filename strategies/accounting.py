"""One accounting for training, backtest and brokers: actions -> target position -> fills, fees, equity.

Semantics (docs/design.md §5):
- Actions: 0 HOLD, 1 BUY, 2 SELL. The position p is the discrete position *state*, the signed fraction
  of equity last traded to: {-1, 0, +1} in `long_short`, {0, +1} in `long_only`. It is not the drifting
  exposure q * price / equity. Cash ratio = 1 - |p|.
- HOLD keeps p. BUY targets +1. SELL targets -1 (`long_short`) or 0 (`long_only`).
- If the target equals the current p, nothing trades: a held position is never rebalanced back to
  exactly p as the price drifts. Rebalancing drift would charge a fee on (almost) every step for a
  decision that said "stay", and would make HOLD anything but free.
- Holdings are units: base quantity q (negative when short) and quote cash C; equity E = C + q * price.
- Moving to target p at reference price P_ref: the trade direction d = sign(p * E_ref / P_ref - q), with
  E_ref = C + q * P_ref; the fill price P = P_ref * (1 + d * slippage_bps / 1e4) (slippage always moves
  the price against us); E = C + q * P; q' = p * E / P; fee = commission * |q' - q| * P, paid from cash:
  C' = C - (q' - q) * P - fee.
  Consequence worth knowing: the fee is not deducted from the size, so right after a buy to +1 the cash
  is slightly negative (-fee) and the exposure a hair above 1x. Brokers that must hold non-negative
  cash (spot) size their exchange orders themselves and book the actual fill with `Ledger.apply_fill`.

`rebalance` is written once, with arithmetic only, so the very same lines run on Python floats (the
scalar `Ledger` used by the backtest and the brokers), numpy arrays and torch tensors (the batched
training environment). That is what "one accounting" means here, and the tests hold the two to 1e-12.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from strategies.actions import ACTIONS, BUY, HOLD, SELL, validate_position_mode

DEFAULT_COMMISSION = 0.001

# Where SELL goes in each mode; the lowest position a mode can hold is the same number.
_SELL_TARGET = {"long_short": -1, "long_only": 0}
_POSITIONS = {"long_short": (-1, 0, 1), "long_only": (0, 1)}

Side = Literal["buy", "sell"]


def target_position(action: Any, position: Any, mode: str) -> Any:
    """Target position after `action` from `position`; ints, numpy arrays or torch tensors, elementwise.

    Written as arithmetic on the comparisons (bool * number) so one expression serves every type:
    HOLD -> position, BUY -> +1, SELL -> -1 (long_short) or 0 (long_only). The result has the type of
    `position` for arrays (an int for ints).
    """
    sell_target = _SELL_TARGET[validate_position_mode(mode)]
    if isinstance(action, int | np.integer) and isinstance(position, int | float | np.integer | np.floating):
        if action not in ACTIONS or isinstance(action, bool):
            raise ValueError(f"unknown action {action!r}: expected 0 HOLD, 1 BUY or 2 SELL")
        if position not in _POSITIONS[mode]:
            raise ValueError(f"position {position!r} is not a {mode} position {_POSITIONS[mode]}")
    else:
        if _any((action < HOLD) | (action > SELL)):
            raise ValueError("actions must be 0 HOLD, 1 BUY or 2 SELL")
        if _any((position < sell_target) | (position > 1)):
            raise ValueError(f"positions must lie in {_POSITIONS[mode]} in {mode} mode")
    return position * (action == HOLD) + (action == BUY) + sell_target * (action == SELL)


def _any(x: Any) -> bool:
    """True if any element of a bool, numpy array or torch tensor is true."""
    return bool(x.any()) if hasattr(x, "any") else bool(x)


def _sign(x: Any) -> Any:
    """Sign of a float (-1, 0, 1 as int), a numpy array or a torch tensor."""
    if isinstance(x, np.ndarray | np.generic):
        return np.sign(x)
    if hasattr(x, "sign"):
        # A torch tensor (Tensor.sign): duck-typed so that the ledger never imports torch (`ritmo serve` and
        # `ritmo status` stay light).
        return x.sign()
    return (x > 0) - (x < 0)


def rebalance(
    cash_quote: Any,
    qty_base: Any,
    target: Any,
    ref_price: Any,
    commission: float,
    slippage_bps: float,
) -> tuple[Any, Any, Any, Any, Any]:
    """Trade to `target` at `ref_price`: (new_cash, new_qty, fee_quote, traded_qty_signed, fill_price).

    Works unchanged on Python floats, numpy arrays and torch float64 tensors (all (B,) or scalars).
    Preconditions, checked by the callers (this is the hot path): ref_price > 0, equity > 0,
    0 <= commission < 1, slippage_bps >= 0. When the traded quantity is 0 it is a no-op (fee 0).
    Callers skip it when target == current position (see the module docstring).
    """
    # Direction at the reference price decides which way slippage moves the fill (always against us).
    direction = _sign(target * (cash_quote + qty_base * ref_price) / ref_price - qty_base)
    fill_price = ref_price * (1 + direction * slippage_bps / 1e4)
    equity = cash_quote + qty_base * fill_price
    traded = target * equity / fill_price - qty_base
    # q + Δq rather than p * E / P: a broker books q + Δq (Ledger.apply_fill), so both stay bit-identical,
    # and closing to flat gives exactly 0.
    new_qty = qty_base + traded
    fee_quote = commission * abs(traded) * fill_price
    new_cash = cash_quote - traded * fill_price - fee_quote
    return new_cash, new_qty, fee_quote, traded, fill_price


@dataclass(frozen=True, slots=True)
class Fill:
    """One executed trade as booked by the ledger."""

    side: Side
    qty_base: float
    """Traded base quantity, positive."""
    price: float
    """Fill price in quote per base unit (after slippage)."""
    fee_quote: float
    notional_quote: float
    """qty_base * price."""
    position_before: int
    position_after: int


@dataclass(slots=True)
class Ledger:
    """Scalar holdings of one account in plain Python floats (backtest, paper and live brokers).

    position is the discrete position state (-1, 0, +1); fees_quote, n_trades and turnover_quote
    accumulate over the ledger's life.
    """

    cash_quote: float
    qty_base: float = 0.0
    position: int = 0
    fees_quote: float = 0.0
    n_trades: int = 0
    turnover_quote: float = 0.0

    @property
    def cash_ratio(self) -> float:
        """1 - |position|, the policy's cash-ratio input."""
        return 1.0 - abs(self.position)

    def equity(self, price: float) -> float:
        """Equity in quote marked at `price`: cash + qty * price."""
        price = float(price)
        if not price > 0:
            raise ValueError(f"price must be positive, got {price!r}")
        return self.cash_quote + self.qty_base * price

    def apply_action(
        self, action: int, ref_price: float, commission: float, slippage_bps: float, mode: str
    ) -> Fill | None:
        """Act on HOLD/BUY/SELL at `ref_price` (e.g. the next open); the Fill, or None if nothing traded."""
        ref_price = float(ref_price)
        if not ref_price > 0:
            raise ValueError(f"reference price must be positive, got {ref_price!r}")
        if not 0 <= commission < 1:
            raise ValueError(f"commission must be in [0, 1), got {commission!r}")
        if not slippage_bps >= 0:
            raise ValueError(f"slippage_bps must be >= 0, got {slippage_bps!r}")
        target = target_position(int(action), self.position, mode)
        if target == self.position:
            return None
        if target != 0 and not self.cash_quote + self.qty_base * ref_price > 0:
            raise ValueError("equity is not positive: the account cannot open a position")
        _, _, fee_quote, traded, fill_price = rebalance(
            self.cash_quote, self.qty_base, target, ref_price, float(commission), float(slippage_bps)
        )
        if traded == 0:  # e.g. a position state change with no holdings left to move
            self.position = target
            return None
        side: Side = "buy" if traded > 0 else "sell"
        return self.apply_fill(side, abs(traded), fill_price, fee_quote, target)

    def apply_fill(self, side: Side, qty_base: float, price: float, fee_quote: float, position_after: int) -> Fill:
        """Book an executed trade (qty positive, fee in quote paid from cash): the one place holdings move.

        For a fill computed by `rebalance` the result is bit-identical to rebalance's new cash and qty:
        C - q*P - fee for a buy, C + q*P - fee for a sell (the same float operations).
        """
        qty_base, price, fee_quote = float(qty_base), float(price), float(fee_quote)
        if not qty_base > 0:
            raise ValueError(f"fill quantity must be positive, got {qty_base!r}")
        if not price > 0:
            raise ValueError(f"fill price must be positive, got {price!r}")
        if not fee_quote >= 0:
            raise ValueError(f"fee must be >= 0, got {fee_quote!r}")
        if position_after not in (-1, 0, 1):
            raise ValueError(f"position_after must be -1, 0 or 1, got {position_after!r}")
        notional = qty_base * price
        if side == "buy":
            self.cash_quote = self.cash_quote - notional - fee_quote
            self.qty_base = self.qty_base + qty_base
        elif side == "sell":
            self.cash_quote = self.cash_quote + notional - fee_quote
            self.qty_base = self.qty_base - qty_base
        else:
            raise ValueError(f"side must be 'buy' or 'sell', got {side!r}")
        before = self.position
        self.position = int(position_after)
        self.fees_quote += fee_quote
        self.turnover_quote += notional
        self.n_trades += 1
        return Fill(side, qty_base, price, fee_quote, notional, before, self.position)

    def to_dict(self) -> dict[str, float | int]:
        """Plain JSON-able values for state persistence."""
        return {
            "cash_quote": float(self.cash_quote),
            "qty_base": float(self.qty_base),
            "position": int(self.position),
            "fees_quote": float(self.fees_quote),
            "n_trades": int(self.n_trades),
            "turnover_quote": float(self.turnover_quote),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        """Inverse of to_dict; raises ValueError on missing, unknown or out-of-range values."""
        fields = ("cash_quote", "qty_base", "position", "fees_quote", "n_trades", "turnover_quote")
        missing = [f for f in fields if f not in data]
        unknown = [k for k in data if k not in fields]
        if missing or unknown:
            raise ValueError(f"ledger state: missing {missing}, unknown {unknown}")
        money = {f: float(data[f]) for f in ("cash_quote", "qty_base", "fees_quote", "turnover_quote")}
        if not all(math.isfinite(v) for v in money.values()):
            raise ValueError(f"ledger state has a non-finite amount: {money}")
        position, n_trades = data["position"], data["n_trades"]
        if position not in (-1, 0, 1) or n_trades != int(n_trades) or n_trades < 0:
            raise ValueError(f"ledger state: bad position {position!r} or n_trades {n_trades!r}")
        if money["fees_quote"] < 0 or money["turnover_quote"] < 0:
            raise ValueError("ledger state: fees and turnover cannot be negative")
        return cls(position=int(position), n_trades=int(n_trades), **money)
