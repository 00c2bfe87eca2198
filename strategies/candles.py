"""Candles as arrays (`CandleBatch`) and as DataFrames: validation, gap finding, the one converter for exchange
rows, UTC date parsing.

Pure code (no I/O, no clock): a candle is `(ts_ms, open, high, low, close, volume)` where `ts_ms` is the
candle's open time in UTC epoch milliseconds, on a 5-minute boundary. A candle is closed when
`ts_ms + CANDLE_MS <= now_ms`.

pandas is imported inside the functions that take or build a DataFrame, never at module level: the daemon works
on arrays only and stays ~85 MB lighter without it (docs/design.md §8).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

CANDLE_MS = 300_000
PRICE_COLUMNS = ("open", "high", "low", "close")
VALUE_COLUMNS = (*PRICE_COLUMNS, "volume")
COLUMNS = ("ts_ms", *VALUE_COLUMNS)

# How many example locations an error message or a gap report lists before "...".
MAX_EXAMPLES = 3
# Epoch ms before 1973 are almost surely seconds: used only to add a hint to the error message.
_SECONDS_HINT_BELOW = 100_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class CandleValidationError(ValueError):
    """Candles break an invariant; `problem` is one line saying what and where."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True)
class Gap:
    """Missing candles: `missing` candles absent right after the candle opened at `after_ts_ms`."""

    after_ts_ms: int
    missing: int

    @property
    def first_missing_ts_ms(self) -> int:
        """Open time of the first missing candle."""
        return self.after_ts_ms + CANDLE_MS

    @property
    def last_missing_ts_ms(self) -> int:
        """Open time of the last missing candle."""
        return self.after_ts_ms + self.missing * CANDLE_MS

    def __str__(self) -> str:
        return f"{self.missing} missing from {iso_utc(self.first_missing_ts_ms)}"


def iso_utc(ts_ms: int) -> str:
    """Epoch milliseconds as an ISO 8601 UTC string, e.g. `2024-01-01T00:05:00Z`."""
    dt = datetime.fromtimestamp(int(ts_ms) / 1000, tz=UTC)
    text = dt.isoformat(timespec="milliseconds" if int(ts_ms) % 1000 else "seconds")
    return text.replace("+00:00", "Z")


def parse_utc_date_ms(s: str) -> int:
    """Parse `YYYY-MM-DD` or an ISO datetime (naive means UTC) into epoch milliseconds."""
    text = str(s).strip()
    try:
        if not text:
            raise ValueError("empty")
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"invalid date {s!r}: expected YYYY-MM-DD or an ISO datetime such as 2024-01-31T12:00 (UTC)"
        ) from None
    # A naive time is UTC by the project's convention; an explicit offset is honoured, not ignored.
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    # Integer arithmetic on timedeltas: exact, unlike float seconds * 1000.
    return (dt - _EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True)
class CandleBatch:
    """Candles as parallel arrays, oldest first: ts_ms (n,) int64 and values (n, 5) float64 OHLCV."""

    ts_ms: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.ts_ms.shape[0])

    @classmethod
    def empty(cls) -> CandleBatch:
        """No candles."""
        return cls(np.empty(0, dtype=np.int64), np.empty((0, len(VALUE_COLUMNS)), dtype=np.float64))

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> CandleBatch:
        """From a canonical candle frame (ts_ms + OHLCV columns)."""
        return cls(
            np.ascontiguousarray(df["ts_ms"].to_numpy(dtype=np.int64)),
            np.ascontiguousarray(df[list(VALUE_COLUMNS)].to_numpy(dtype=np.float64)),
        )

    def column(self, name: str) -> np.ndarray:
        """One value column (n,) by name (`open` ... `volume`), a view."""
        return self.values[:, VALUE_COLUMNS.index(name)]

    def to_frame(self) -> pd.DataFrame:
        """The canonical candle frame (ts_ms int64 + float64 OHLCV, fresh index); imports pandas."""
        import pandas as pd

        frame = {"ts_ms": np.asarray(self.ts_ms, dtype=np.int64)}
        frame.update({c: np.asarray(self.values[:, j], dtype=np.float64) for j, c in enumerate(VALUE_COLUMNS)})
        return pd.DataFrame(frame)


def empty_candles() -> pd.DataFrame:
    """An empty candle frame with the canonical columns and dtypes."""
    return CandleBatch.empty().to_frame()


def _number_or_nan(x: object) -> float:
    """A value of an exchange row as a float; None, text that is no number, or anything else odd: NaN."""
    if isinstance(x, bool) or x is None:
        return math.nan
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def last_copy_rows(ts_ms: np.ndarray) -> np.ndarray:
    """Rows (int) that keep the last copy of each open time in ts_ms (n,), in time order."""
    first_in_reversed = np.unique(ts_ms[::-1], return_index=True)[1]
    return len(ts_ms) - 1 - first_in_reversed


def _whole_ms(t: object) -> int:
    """An exchange row's timestamp as int epoch ms; ValueError unless it is a whole, finite number."""
    if isinstance(t, int) and not isinstance(t, bool):
        return t
    try:
        f = float(t)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        f = math.nan
    if isinstance(t, bool) or not math.isfinite(f) or f != math.floor(f):
        raise ValueError(f"OHLCV timestamp {t!r} is not a whole number of milliseconds")
    return int(f)


def ohlcv_batch(rows: Iterable[Sequence[object]], now_ms: int) -> CandleBatch:
    """Turn ccxt OHLCV rows into canonical candles: cast, de-duplicate (last wins), sort, closed only.

    A timestamp that is not a whole number raises ValueError; any other value that is not a number becomes NaN
    (an exchange's missing volume), which validation then refuses loudly.
    """
    rows = [list(r)[:6] for r in rows]
    if not rows:
        return CandleBatch.empty()
    if any(len(r) < 6 for r in rows):
        raise ValueError("an OHLCV row has fewer than 6 fields (timestamp, open, high, low, close, volume)")
    ts = np.array([_whole_ms(r[0]) for r in rows], dtype=np.int64)
    values = np.array([[_number_or_nan(x) for x in r[1:6]] for r in rows], dtype=np.float64)
    # The last copy of a candle is the freshest one the exchange sent.
    keep = last_copy_rows(ts)
    # The exchange's last row is usually the still-forming candle: its OHLCV would still change.
    keep = keep[ts[keep] + CANDLE_MS <= int(now_ms)]
    return CandleBatch(np.ascontiguousarray(ts[keep]), np.ascontiguousarray(values[keep]))


def slice_period(df: pd.DataFrame, from_ms: int | None = None, to_ms: int | None = None) -> pd.DataFrame:
    """Candles with `from_ms <= ts_ms < to_ms` (either bound may be None), index reset."""
    ts = df["ts_ms"].to_numpy()
    mask = np.ones(len(df), dtype=bool)
    if from_ms is not None:
        mask &= ts >= int(from_ms)
    if to_ms is not None:
        mask &= ts < int(to_ms)
    return df[mask].reset_index(drop=True)


def find_gaps(df: pd.DataFrame) -> list[Gap]:
    """Missing candles in sorted, 5-minute-aligned candles, as `Gap(after_ts_ms, missing)`."""
    return gaps_in(df["ts_ms"].to_numpy(dtype="int64"))


def gaps_in(ts_ms: np.ndarray) -> list[Gap]:
    """Missing candles between sorted, 5-minute-aligned open times (n,) int64, as `Gap(after_ts_ms, missing)`."""
    ts = np.asarray(ts_ms, dtype=np.int64)
    if len(ts) < 2:
        return []
    steps = np.diff(ts)
    idx = np.flatnonzero(steps > CANDLE_MS)
    return [Gap(int(ts[i]), int(steps[i] // CANDLE_MS) - 1) for i in idx]


def describe_gaps(gaps: Sequence[Gap], limit: int = MAX_EXAMPLES) -> str:
    """One line listing the first few gaps, e.g. `2 gaps (3 missing candles): 1 missing from ...`."""
    if not gaps:
        return "no gaps"
    missing = sum(g.missing for g in gaps)
    shown = "; ".join(str(g) for g in gaps[:limit])
    more = "; ..." if len(gaps) > limit else ""
    return f"{len(gaps)} gap(s) ({missing} missing candles): {shown}{more}"


def _locators(line_offset: int | None) -> tuple[Callable[..., str], Callable[..., str]]:
    """`where(i, ts=None)` names one row (`row i` or `line i + line_offset`, with its UTC time when ts is given);
    `examples(idx, ts, detail=None)` names the first few rows of idx."""

    def where(i: int, ts: np.ndarray | None = None) -> str:
        loc = f"line {i + line_offset}" if line_offset is not None else f"row {i}"
        return f"{loc} ({iso_utc(int(ts[i]))})" if ts is not None else loc

    def examples(idx: np.ndarray, ts: np.ndarray | None, detail: Callable[[int], str] | None = None) -> str:
        parts = []
        for i in idx[:MAX_EXAMPLES]:
            part = where(int(i), ts)
            parts.append(f"{part}: {detail(int(i))}" if detail else part)
        more = ", ..." if len(idx) > MAX_EXAMPLES else ""
        return ", ".join(parts) + more

    return where, examples


def validate_candles(df: pd.DataFrame, *, line_offset: int | None = None) -> list[Gap]:
    """Check every candle invariant, raising CandleValidationError; return the gaps (not errors).

    Locations read `row i` (0-based data row) or, with `line_offset`, `line i + line_offset`
    (2 for a CSV file with one header line), followed by the candle's UTC time when it is known.
    """
    import pandas as pd

    _, examples = _locators(line_offset)

    if len(df) == 0:
        raise CandleValidationError("no candles (empty)")

    cols = [str(c) for c in df.columns]
    missing = [c for c in COLUMNS if c not in cols]
    extra = [c for c in cols if c not in COLUMNS]
    if missing or extra or len(set(cols)) != len(cols):
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected column(s) {', '.join(extra)}")
        if len(set(cols)) != len(cols):
            parts.append("repeated column name(s)")
        raise CandleValidationError(f"{'; '.join(parts)} (expected exactly {', '.join(COLUMNS)})")

    # Numeric: every value must parse as a number; report the first few that do not.
    values: dict[str, np.ndarray] = {}
    for col in COLUMNS:
        series = df[col]
        if pd.api.types.is_bool_dtype(series):
            raise CandleValidationError(f"non-numeric (boolean) column {col}")
        if pd.api.types.is_datetime64_any_dtype(series) or isinstance(series.dtype, pd.PeriodDtype):
            # to_numeric would quietly turn datetimes into nanoseconds: refuse instead of guessing.
            raise CandleValidationError(
                f"column {col} holds datetimes ({series.dtype}); expected integer epoch milliseconds"
            )
        if not pd.api.types.is_numeric_dtype(series):
            coerced = pd.to_numeric(series, errors="coerce")
            bad = np.flatnonzero(coerced.isna().to_numpy() & series.notna().to_numpy())
            if len(bad):
                raise CandleValidationError(
                    f"non-numeric value(s) in column {col} at "
                    + examples(bad, None, lambda i, s=series: repr(s.iloc[i]))
                )
            series = coerced
        values[col] = series.to_numpy(dtype="float64")
    # Integer columns are used as they are; whole-number floats (< 2**53 for any real epoch ms) are exact.
    ts_raw = df["ts_ms"].to_numpy(dtype="int64") if pd.api.types.is_integer_dtype(df["ts_ms"]) else values["ts_ms"]
    return validate_candle_arrays(ts_raw, np.column_stack([values[c] for c in VALUE_COLUMNS]), line_offset=line_offset)


def validate_candle_arrays(ts_ms: np.ndarray, values: np.ndarray, *, line_offset: int | None = None) -> list[Gap]:
    """`validate_candles`' checks of the numbers: ts_ms (n,) int64 or float64, values (n, 5) float64 OHLCV.

    Raises CandleValidationError naming the first few bad rows (as `validate_candles`); returns the gaps.
    """
    where, examples = _locators(line_offset)

    if len(ts_ms) == 0:
        raise CandleValidationError("no candles (empty)")
    int_ts = np.issubdtype(np.asarray(ts_ms).dtype, np.integer)
    cols = {"ts_ms": np.asarray(ts_ms, dtype="float64")} | {
        c: np.asarray(values[:, j], dtype="float64") for j, c in enumerate(VALUE_COLUMNS)
    }

    for col in COLUMNS:
        bad = np.flatnonzero(~np.isfinite(cols[col]))
        if len(bad):
            raise CandleValidationError(
                f"{len(bad)} missing (NaN) or infinite value(s) in column {col} at " + examples(bad, None)
            )

    raw_ts = cols["ts_ms"]
    bad = np.flatnonzero(raw_ts != np.round(raw_ts))
    if len(bad):
        raise CandleValidationError(
            "timestamp(s) are not whole milliseconds at " + examples(bad, None, lambda i: repr(float(raw_ts[i])))
        )
    ts = np.asarray(ts_ms, dtype="int64") if int_ts else raw_ts.astype("int64")

    bad = np.flatnonzero(ts % CANDLE_MS != 0)
    if len(bad):
        hint = ""
        if np.abs(ts[bad[0]]) < _SECONDS_HINT_BELOW:
            hint = " (these look like seconds; timestamps must be epoch milliseconds)"
        raise CandleValidationError(
            f"{len(bad)} timestamp(s) not on a 5-minute boundary, first at "
            + examples(bad, ts, lambda i: str(int(ts[i])))
            + hint
        )

    if len(ts) > 1:
        steps = np.diff(ts)
        back = np.flatnonzero(steps < 0)
        if len(back):
            i = int(back[0]) + 1
            raise CandleValidationError(f"rows not sorted by time: {where(i, ts)} comes after {where(i - 1, ts)}")
        dup = np.flatnonzero(steps == 0) + 1
        if len(dup):
            raise CandleValidationError(
                f"{len(dup)} duplicate timestamp(s): " + examples(dup, ts, lambda i: f"same time as {where(i - 1)}")
            )
        median_step = int(np.median(steps))
        if median_step != CANDLE_MS:
            # A steady larger step is another interval (15m, 1h), not a string of exchange outages.
            first_odd = int(np.flatnonzero(steps != CANDLE_MS)[0])
            raise CandleValidationError(
                f"candle interval looks like {median_step / 60_000:g} minutes (median step), "
                f"expected 5 minutes; first step that is not 5 minutes: after {where(first_odd, ts)}"
            )

    for col in PRICE_COLUMNS:
        bad = np.flatnonzero(cols[col] <= 0)
        if len(bad):
            v = cols[col]
            raise CandleValidationError(
                f"{len(bad)} non-positive {col} price(s) at " + examples(bad, ts, lambda i, v=v: f"{v[i]:g}")
            )
    vol = cols["volume"]
    bad = np.flatnonzero(vol < 0)
    if len(bad):
        raise CandleValidationError(f"{len(bad)} negative volume(s) at " + examples(bad, ts, lambda i: f"{vol[i]:g}"))

    o, h, low, c = (cols[k] for k in PRICE_COLUMNS)
    bad = np.flatnonzero((h < np.maximum(o, c)) | (low > np.minimum(o, c)))
    if len(bad):
        raise CandleValidationError(
            f"{len(bad)} candle(s) with inconsistent OHLC (need high >= max(open, close) >= "
            "min(open, close) >= low) at "
            + examples(bad, ts, lambda i: f"open={o[i]:g} high={h[i]:g} low={low[i]:g} close={c[i]:g}")
        )

    return gaps_in(ts)
