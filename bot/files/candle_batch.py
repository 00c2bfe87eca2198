"""Candle files read as arrays (`CandleBatch`) without pandas: what the daemon's replay loads.

A plain candle CSV (or CSV.gz) -- the header `timestamp,open,high,low,close,volume` and numbers only, as
`save_candles` and `ritmo download` write it -- is parsed by numpy and checked by `validate_candle_arrays`.
Anything else (Parquet, another header, a malformed or invalid file) goes through `bot.files.candles.load_candles`,
which imports pandas and reports every problem in its words. Both give the same arrays: numpy's parser rounds
each decimal to the nearest double, as pandas' round-trip parser does (bit-identical on the five real files of
../shared/data, tests/test_candle_batch.py).

Why: pandas (with pyarrow) adds ~85 MB to a process; the daemon needs neither (docs/design.md §8).
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog

from bot.errors import CandleFileError
from strategies.candles import (
    MAX_EXAMPLES,
    VALUE_COLUMNS,
    CandleBatch,
    CandleValidationError,
    Gap,
    describe_gaps,
    iso_utc,
    validate_candle_arrays,
)

__all__ = ["FILE_COLUMNS", "load_candle_batch", "log_gaps"]

log = structlog.get_logger(__name__)

# The on-disk header (`timestamp` is `ts_ms` in memory), as `save_candles` writes it.
FILE_COLUMNS = ("timestamp", *VALUE_COLUMNS)
PLAIN_HEADER = ",".join(FILE_COLUMNS)
# Float64 holds every integer below 2**53 exactly; epoch milliseconds are ~1.7e12.
_EXACT_INT_LIMIT = 2.0**53


def log_gaps(gaps: Sequence[Gap], **context: object) -> None:
    """Log `candle_gaps` (count, missing candles, first few locations) when there are any."""
    if not gaps:
        return
    log.warning(
        "candle_gaps",
        **context,
        count=len(gaps),
        missing_candles=sum(g.missing for g in gaps),
        first=[f"after {iso_utc(g.after_ts_ms)}: {g.missing} missing" for g in gaps[:MAX_EXAMPLES]],
    )


def load_candle_batch(path: str | os.PathLike[str], *, allow_gaps: bool = True) -> CandleBatch:
    """Load and validate a candle file as arrays: a plain CSV(.gz) with numpy, anything else via `load_candles`."""
    plain = read_plain_csv(Path(path))
    if plain is None:
        from bot.files.candles import load_candles  # imports pandas: Parquet, or a file to explain

        return CandleBatch.from_frame(load_candles(path, allow_gaps=allow_gaps))
    batch, gaps = plain
    if gaps:
        log_gaps(gaps, path=str(path))
        if not allow_gaps:
            raise CandleFileError(path, f"has {describe_gaps(gaps)} and gaps are not allowed here")
    return batch


def read_plain_csv(path: Path) -> tuple[CandleBatch, list[Gap]] | None:
    """A valid plain candle CSV(.gz) as (batch, gaps); None for any other file (even one that is just invalid)."""
    name = path.name.lower()
    if not (name.endswith(".csv") or name.endswith(".csv.gz")):
        return None
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            if f.readline().rstrip("\r\n") != PLAIN_HEADER:
                return None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "input contained no data": an empty file
                table = np.loadtxt(f, delimiter=",", dtype=np.float64, comments=None, ndmin=2)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError):
        return None
    if table.shape[0] == 0 or table.shape[1] != 1 + len(VALUE_COLUMNS):
        return None
    ts_raw = table[:, 0]
    if not bool(np.all(np.abs(ts_raw) < _EXACT_INT_LIMIT)):  # also refuses NaN
        return None
    values = np.ascontiguousarray(table[:, 1:])
    try:
        gaps = validate_candle_arrays(ts_raw, values, line_offset=2)
    except CandleValidationError:
        return None
    return CandleBatch(ts_raw.astype(np.int64), values), gaps
