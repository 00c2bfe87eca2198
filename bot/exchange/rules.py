"""What the exchange accepts, stated without importing ccxt (so paper and replay never load it).

Market rules: ccxt reports Binance amounts in TICK_SIZE precision mode (`market['precision']['amount']` is
the step, e.g. 1e-05), other exchanges in DECIMAL_PLACES (the number of decimals). Amounts are floored
toward zero to the step, as ccxt's `amount_to_precision` (TRUNCATE) does before an order is sent. In
replay no market rules apply unless given, so a replay books exactly what the backtest books.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Any

# Binance's `newClientOrderId` pattern (the exchange accepts `.` as well; ritmo's own ids never use it).
CLIENT_ORDER_ID_RE = re.compile(r"^[.A-Za-z0-9_-]{1,36}$")

# ccxt's precision modes (ccxt.DECIMAL_PLACES, SIGNIFICANT_DIGITS, TICK_SIZE); bot/exchange/client.py is the only
# ccxt importer, so the values are mirrored here and a test holds them equal to ccxt's.
DECIMAL_PLACES = 2
SIGNIFICANT_DIGITS = 3
TICK_SIZE = 4


@dataclass(frozen=True)
class MarketRules:
    """The exchange's order-size rules for one market (from ccxt market info)."""

    amount_step: float | None = None
    """Smallest increment of the base amount; amounts are floored to it."""
    min_amount: float | None = None
    max_amount: float | None = None
    min_notional: float | None = None
    """Minimum amount * price in quote (Binance NOTIONAL / MIN_NOTIONAL)."""

    @classmethod
    def from_ccxt_market(cls, market: dict[str, Any], precision_mode: int = TICK_SIZE) -> MarketRules:
        """Read ccxt's `precision` and `limits` of a market under the exchange's precisionMode."""
        precision = (market.get("precision") or {}).get("amount")
        limits = market.get("limits") or {}
        step: float | None
        if precision is None:
            step = None
        elif precision_mode == TICK_SIZE:
            step = float(precision)
        elif precision_mode == DECIMAL_PLACES:
            step = 10.0 ** -int(precision)
        else:
            # SIGNIFICANT_DIGITS has no fixed step; no exchange we support uses it for amounts.
            raise ValueError(f"unsupported ccxt precision mode {precision_mode} for amounts")

        def limit(kind: str, bound: str) -> float | None:
            value = (limits.get(kind) or {}).get(bound)
            return float(value) if value not in (None, 0) else None

        max_amount = limit("amount", "max")
        # Binance's MARKET_LOT_SIZE (ccxt: limits.market) caps market orders below LOT_SIZE's maximum.
        market_max = limit("market", "max")
        if market_max is not None:
            max_amount = market_max if max_amount is None else min(max_amount, market_max)
        return cls(step, limit("amount", "min"), max_amount, limit("cost", "min"))

    def floor_amount(self, qty_base: float) -> float:
        """qty truncated toward zero to the amount step, exactly as ccxt's amount_to_precision (TRUNCATE).

        Like ccxt, the decimal is the float's shortest repr, so paper and live agree on every amount. (A held
        quantity is always a whole number of steps already, so closing a position loses nothing to float noise.)
        """
        if self.amount_step is None:
            return qty_base
        step = Decimal(repr(self.amount_step))
        q = Decimal(repr(float(qty_base)))
        return float((q / step).to_integral_value(rounding=ROUND_FLOOR) * step)

    def check(self, qty_base: float, price: float) -> str | None:
        """Why the exchange would refuse this order (None if it would accept it)."""
        if qty_base <= 0:
            return f"amount below the amount step {self.amount_step}"
        if self.min_amount is not None and qty_base < self.min_amount:
            return f"amount {qty_base} below the minimum amount {self.min_amount} (LOT_SIZE)"
        if self.max_amount is not None and qty_base > self.max_amount:
            return f"amount {qty_base} above the maximum amount {self.max_amount} (LOT_SIZE)"
        if self.min_notional is not None and qty_base * price < self.min_notional:
            return f"notional {qty_base * price:.8g} below the minimum notional {self.min_notional} (NOTIONAL)"
        return None
