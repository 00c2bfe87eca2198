"""Periods on the command line (docs/design.md §12): parsed, checked against the data, clipped where they overrun it.

One place for the rules every command follows: a date that does not parse, a period that ends before it starts
or lies wholly outside the data is a usage error (exit 2); a `--to` past the end of the data is clipped to it
with a warning (`period_clipped`) and the period actually used is shown; a `--from` inside the warm-up names
the earliest `--from` the file allows, as a date.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from bot.errors import UsageError
from strategies.candles import CANDLE_MS, parse_utc_date_ms

log = structlog.get_logger(__name__)


def parse_date(option: str, text: str) -> int:
    """A UTC date or ISO date-time given to `option`, as epoch ms; UsageError naming the option when it is bad."""
    try:
        return parse_utc_date_ms(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def parse_period(
    date_from: str, date_to: str, *, from_option: str = "--from", to_option: str = "--to"
) -> tuple[int, int]:
    """[from, to) in epoch ms from two dates; UsageError unless both parse and `to` is after `from`."""
    from_ms, to_ms = parse_date(from_option, date_from), parse_date(to_option, date_to)
    check_order(from_ms, to_ms, from_option=from_option, to_option=to_option)
    return from_ms, to_ms


def check_order(from_ms: int, to_ms: int, *, from_option: str = "--from", to_option: str = "--to") -> None:
    """UsageError unless the period [from_ms, to_ms) is not empty."""
    if to_ms <= from_ms:
        raise UsageError(
            f"{to_option} must be after {from_option}: {to_option} {minute_text(to_ms)} is not after "
            f"{from_option} {minute_text(from_ms)} (UTC)"
        )


def minute_text(ts_ms: int) -> str:
    """A UTC instant as the command line accepts it back: `2024-01-05 09:25` (seconds only when not zero)."""
    dt = datetime.fromtimestamp(int(ts_ms) / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S" if dt.second or dt.microsecond else "%Y-%m-%d %H:%M")


def clip_to_data(to_ms: int, data_end_ms: int, *, option: str = "--to", source: str = "") -> int:
    """`to_ms`, or the end of the data (exclusive) when `to_ms` is past it; the clip is logged as a warning."""
    if to_ms <= data_end_ms:
        return to_ms
    log.warning(
        "period_clipped",
        option=option,
        requested=minute_text(to_ms),
        used=minute_text(data_end_ms),
        reason="the data ends there",
        data=source,
    )
    return data_end_ms


def earliest_from_ms(ts_ms: Sequence[int], history: int) -> int | None:
    """The earliest period start whose first decision has `history` candles up to it: one candle after the
    `history`-th candle of the data opens; None when the data holds fewer candles."""
    if len(ts_ms) < history or history < 1:
        return None
    return int(ts_ms[history - 1]) + CANDLE_MS


def warm_up_problem(history: int, earliest_ms: int | None, source: str) -> str:
    """The sentence that names the warm-up needed and the earliest `--from` the data allows, as a date."""
    need = f"the first decision needs {history} candles of history"
    if earliest_ms is None:
        return f"{need}: {source} holds fewer candles than that"
    return f"{need}: the earliest --from for {source} is {minute_text(earliest_ms)} (UTC)"
