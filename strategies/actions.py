"""The vocabulary every part shares: action codes and position modes (no torch, so any module can import it)."""

from __future__ import annotations

HOLD, BUY, SELL = 0, 1, 2
ACTIONS = (HOLD, BUY, SELL)
ACTION_NAMES = ("HOLD", "BUY", "SELL")
POSITION_MODES = ("long_short", "long_only")


def validate_position_mode(mode: str) -> str:
    """Return `mode` if it is a known position mode, else raise ValueError naming the valid ones."""
    if not isinstance(mode, str) or mode not in POSITION_MODES:
        raise ValueError(f"unknown position mode {mode!r}: expected one of {', '.join(POSITION_MODES)}")
    return mode
