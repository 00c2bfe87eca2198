"""The wall clock in the unit every timestamp of ritmo uses: epoch milliseconds, UTC."""

from __future__ import annotations

import time


def wall_ms() -> int:
    """The local wall clock, epoch ms (exchange time is `bot.daemon.market.ExchangeClock`)."""
    return time.time_ns() // 1_000_000
