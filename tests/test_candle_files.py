"""Candle files and the pure candle helpers: validation messages, gaps, round trips, atomic saves."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from structlog.testing import capture_logs

from bot.errors import CandleFileError
from bot.files.candles import find_gaps, load_candles, load_candles_with_gaps, save_candles
from strategies.candles import (
    CANDLE_MS,
    COLUMNS,
    CandleValidationError,
    Gap,
    iso_utc,
    ohlcv_batch,
    parse_utc_date_ms,
    slice_period,
    validate_candles,
)

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
HEADER = "timestamp,open,high,low,close,volume"


def _rows(n: int = 6) -> list[list[object]]:
    """n valid candles from T0, as file rows."""
    rows = []
    for i in range(n):
        o = 100.0 + i
        rows.append([T0 + i * CANDLE_MS, o, o + 2, o - 1, o + 1, 10.5 + i])
    return rows


def _csv(rows: list[list[object]], header: str = HEADER) -> str:
    return header + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows)


def _write(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _edit(edit: Callable[[list[list[object]]], None], header: str = HEADER) -> Callable[[Path], Path]:
    """A case writer: valid rows changed by `edit`, written as CSV to tmp_path/candles.csv."""

    def write(tmp: Path) -> Path:
        rows = _rows()
        edit(rows)
        return _write(tmp / "candles.csv", _csv(rows, header))

    return write


def _set(i: int, col: int, value: object) -> Callable[[list[list[object]]], None]:
    def edit(rows: list[list[object]]) -> None:
        rows[i][col] = value

    return edit


def _swap(rows: list[list[object]]) -> None:
    rows[2], rows[3] = rows[3], rows[2]


def _dup(rows: list[list[object]]) -> None:
    rows.insert(3, list(rows[2]))


def _every_15m(rows: list[list[object]]) -> None:
    for i, r in enumerate(rows):
        r[0] = T0 + i * 3 * CANDLE_MS


def _seconds(rows: list[list[object]]) -> None:
    for r in rows:
        r[0] = int(r[0]) // 1000


def _raw(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(data)
        return path

    return write


def _truncated_gzip(tmp: Path) -> Path:
    path = tmp / "candles.csv.gz"
    data = gzip.compress(_csv(_rows(200)).encode())
    path.write_bytes(data[: len(data) // 2])
    return path


def _datetime_parquet(tmp: Path) -> Path:
    df = pd.DataFrame(_rows(), columns=["timestamp", "open", "high", "low", "close", "volume"])
    df["timestamp"] = pd.to_datetime(df["timestamp"], unit="ms", utc=True)
    path = tmp / "candles.parquet"
    df.to_parquet(path)
    return path


def _extra_field(tmp: Path) -> Path:
    text = _csv(_rows()).splitlines()
    text[3] += ",99"
    return _write(tmp / "candles.csv", "\n".join(text) + "\n")


T2 = iso_utc(T0 + 2 * CANDLE_MS)
T3 = iso_utc(T0 + 3 * CANDLE_MS)

# (case id, writer(tmp_path) -> path, substrings the one-line message must contain)
MALFORMED = [
    (
        "missing_column",
        _edit(lambda rows: [r.pop() for r in rows], "timestamp,open,high,low,close"),
        ["missing column(s) volume"],
    ),
    (
        "extra_column",
        _edit(lambda rows: [r.append(7) for r in rows], HEADER + ",trades"),
        ["unexpected column(s) trades"],
    ),
    ("extra_field_in_a_row", _extra_field, ["malformed CSV", "line 4"]),
    ("ts_ms_header", _edit(lambda rows: None, HEADER.replace("timestamp", "ts_ms")), ["unexpected column ts_ms"]),
    ("non_numeric", _edit(_set(2, 4, "abc")), ["non-numeric", "column close", "line 4", "'abc'"]),
    ("non_numeric_timestamp", _edit(_set(1, 0, "2024-01-01")), ["non-numeric", "column timestamp", "line 3"]),
    ("nan", _edit(_set(3, 5, "")), ["NaN", "column volume", "line 5"]),
    ("unsorted", _edit(_swap), ["not sorted", "line 5", T2]),
    ("duplicate", _edit(_dup), ["duplicate timestamp", "line 5", T2]),
    ("off_boundary", _edit(_set(4, 0, T0 + 4 * CANDLE_MS + 60_000)), ["5-minute boundary", "line 6"]),
    ("mixed_interval_15m", _edit(_every_15m), ["interval looks like 15 minutes", "expected 5 minutes"]),
    ("seconds_not_ms", _edit(_seconds), ["5-minute boundary", "look like seconds"]),
    ("ohlc_high_below_close", _edit(_set(3, 2, 100.0)), ["inconsistent OHLC", "line 5", T3, "high=100"]),
    ("ohlc_low_above_open", _edit(_set(3, 3, 103.5)), ["inconsistent OHLC", "line 5", "low=103.5"]),
    ("zero_price", _edit(_set(1, 1, 0)), ["non-positive open", "line 3"]),
    ("negative_volume", _edit(_set(2, 5, -1)), ["negative volume", "line 4"]),
    ("empty_with_header", lambda tmp: _write(tmp / "candles.csv", HEADER + "\n"), ["empty"]),
    ("empty_zero_bytes", _raw("candles.csv", b""), ["empty file"]),
    ("empty_gz", lambda tmp: _write(tmp / "candles.csv.gz", ""), ["empty file"]),
    ("corrupt_gzip", _raw("candles.csv.gz", b"\x1f\x8b\x08\x00garbage-not-deflate" * 4), ["gzip"]),
    ("not_gzip_at_all", _raw("candles.csv.gz", b"timestamp,open\n1,2\n"), ["gzip"]),
    ("truncated_gzip", _truncated_gzip, ["gzip"]),
    ("gzip_named_csv", lambda tmp: _raw("candles.csv", gzip.compress(_csv(_rows()).encode()))(tmp), ["not a text CSV"]),
    ("datetime_parquet", _datetime_parquet, ["column timestamp holds datetimes", "epoch milliseconds"]),
    ("corrupt_parquet", _raw("candles.parquet", b"PAR1 definitely not parquet"), ["Parquet"]),
    ("missing_file", lambda tmp: tmp / "nope.csv.gz", ["file not found"]),
    ("directory", lambda tmp: (tmp / "dir.csv").mkdir() or tmp / "dir.csv", ["directory"]),
    ("unknown_extension", lambda tmp: _write(tmp / "candles.txt", _csv(_rows())), ["unknown file extension .txt"]),
    ("no_extension", lambda tmp: _write(tmp / "candles", _csv(_rows())), ["unknown file extension"]),
]


@pytest.mark.parametrize(("writer", "expected"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_file_gives_one_clear_line(tmp_path: Path, writer, expected: list[str]) -> None:
    path = writer(tmp_path)
    with pytest.raises(CandleFileError) as info:
        load_candles(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": "), message
    assert "\n" not in message
    assert "Traceback" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    # The original exception is not chained: the CLI prints one line and nothing else.
    assert info.value.__cause__ is None


def test_parquet_with_wrong_columns_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pd.DataFrame({"timestamp": [T0], "open": [1.0], "close": [1.0]}).to_parquet(path)
    with pytest.raises(CandleFileError, match=r"missing column\(s\) high, low, volume"):
        load_candles(path)


def test_gaps_are_reported_with_where(tmp_path: Path) -> None:
    rows = _rows(12)
    # Outages: one candle after row 2, three candles after row 7.
    del rows[8:11]
    del rows[3]
    path = _write(tmp_path / "gappy.csv", _csv(rows))
    with capture_logs() as logs:
        df = load_candles(path)
    assert len(df) == 8
    gaps = find_gaps(df)
    assert gaps == [Gap(T0 + 2 * CANDLE_MS, 1), Gap(T0 + 7 * CANDLE_MS, 3)]
    assert gaps[1].first_missing_ts_ms == T0 + 8 * CANDLE_MS
    assert gaps[1].last_missing_ts_ms == T0 + 10 * CANDLE_MS
    event = next(e for e in logs if e["event"] == "candle_gaps")
    assert event["count"] == 2
    assert event["missing_candles"] == 4
    assert event["path"] == str(path)
    assert event["first"][0].startswith(f"after {iso_utc(T0 + 2 * CANDLE_MS)}")
    # Same answer from the variant that returns gaps instead of logging them.
    assert load_candles_with_gaps(path)[1] == gaps
    expected = r"2 gap\(s\) \(4 missing candles\): 1 missing from 2024-01-01T00:15:00Z; 3 missing from"
    with pytest.raises(CandleFileError, match=expected):
        load_candles(path, allow_gaps=False)


def test_real_file_loads(data_path: Path, candles_2024: pd.DataFrame) -> None:
    df = load_candles(data_path, allow_gaps=False)
    assert len(df) == 105_408
    assert list(df.columns) == list(COLUMNS)
    assert df["ts_ms"].dtype == np.int64
    assert all(df[c].dtype == np.float64 for c in COLUMNS[1:])
    assert iso_utc(df["ts_ms"].iloc[0]) == "2024-01-01T00:00:00Z"
    assert iso_utc(df["ts_ms"].iloc[-1]) == "2024-12-31T23:55:00Z"
    assert df["close"].iloc[0] == 42397.23
    assert df["close"].iloc[-1] == 93576.0
    pd.testing.assert_frame_equal(df, candles_2024)


@pytest.mark.parametrize("name", ["year.parquet", "year.csv.gz"])
def test_real_file_round_trip(tmp_path: Path, data_path: Path, candles_2024: pd.DataFrame, name: str) -> None:
    out = tmp_path / name
    save_candles(candles_2024, out)
    back = load_candles(out)
    pd.testing.assert_frame_equal(back, candles_2024, check_exact=True)
    if name.endswith(".csv.gz"):
        # Same text as the published file: header, decimal strings without needless zeros.
        assert gzip.decompress(out.read_bytes()) == gzip.decompress(data_path.read_bytes())
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left behind


def test_save_writes_plain_decimals(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "ts_ms": [T0],
            "open": [42488.0],
            "high": [42500.5],
            "low": [42000.25],
            "close": [42100.0],
            "volume": [0.00001],
        }
    )
    out = tmp_path / "one.csv"
    save_candles(df, out)
    assert out.read_text() == f"{HEADER}\n{T0},42488,42500.5,42000.25,42100,0.00001\n"
    pd.testing.assert_frame_equal(load_candles(out), df)
    assert out.stat().st_mode & 0o777 == 0o644


def test_save_refuses_invalid_and_keeps_old_file(tmp_path: Path) -> None:
    out = tmp_path / "c.csv.gz"
    good = load_candles(_write(tmp_path / "src.csv", _csv(_rows())))
    save_candles(good, out)
    before = out.read_bytes()
    bad = pd.concat([good, good.iloc[[2]]], ignore_index=True)
    with pytest.raises(CandleFileError, match="refusing to write invalid candles: rows not sorted"):
        save_candles(bad, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv.gz", "src.csv"]
    with pytest.raises(CandleFileError, match="does not exist"):
        save_candles(good, tmp_path / "missing-dir" / "c.csv")
    with pytest.raises(CandleFileError, match="unknown file extension"):
        save_candles(good, tmp_path / "c.json")


# ---- pure helpers (strategies/candles.py) ----------------------------------------------------------


def test_validate_candles_messages_use_rows_without_file() -> None:
    df = pd.DataFrame(_rows(), columns=list(COLUMNS))
    assert validate_candles(df) == []
    df.loc[4, "high"] = 1.0
    with pytest.raises(CandleValidationError, match=r"row 4 \(2024-01-01T00:20:00Z\)") as info:
        validate_candles(df)
    assert isinstance(info.value, ValueError)
    with pytest.raises(CandleValidationError, match="empty"):
        validate_candles(df.iloc[:0])


def test_ohlcv_batch_dedupes_sorts_and_drops_forming() -> None:
    rows = [
        [T0 + CANDLE_MS, 2, 3, 1, 2, 5],
        [T0, 1, 2, 0.5, 1.5, 4],
        [T0 + CANDLE_MS, 2, 4, 1, 3, 6],  # a later copy of the same candle wins
        [T0 + 2 * CANDLE_MS, 3, 3, 3, 3, 1],  # forming at now
    ]
    batch = ohlcv_batch(rows, now_ms=T0 + 2 * CANDLE_MS + 10_000)
    assert batch.ts_ms.tolist() == [T0, T0 + CANDLE_MS]
    assert batch.column("close").tolist() == [1.5, 3.0]
    assert batch.ts_ms.dtype == np.int64 and batch.values.dtype == np.float64
    # Closed exactly at now: kept.
    assert len(ohlcv_batch(rows, now_ms=T0 + 3 * CANDLE_MS)) == 3
    assert list(ohlcv_batch([], now_ms=T0).to_frame().columns) == list(COLUMNS)


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("2024-01-01", T0),
        ("2024-01-01T00:05", T0 + CANDLE_MS),
        ("2024-01-01T00:05:00Z", T0 + CANDLE_MS),
        ("2024-01-01 01:00:00+01:00", T0),
        ("2024-01-01T00:00:00.250", T0 + 250),
    ],
)
def test_parse_utc_date_ms(text: str, expected_ms: int) -> None:
    assert parse_utc_date_ms(text) == expected_ms


@pytest.mark.parametrize("text", ["", "yesterday", "2024-13-01", "2024/01/01", "1704067200000"])
def test_parse_utc_date_ms_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected YYYY-MM-DD"):
        parse_utc_date_ms(text)


def test_slice_period_is_half_open() -> None:
    df = pd.DataFrame(_rows(), columns=list(COLUMNS))
    part = slice_period(df, T0 + CANDLE_MS, T0 + 3 * CANDLE_MS)
    assert part["ts_ms"].tolist() == [T0 + CANDLE_MS, T0 + 2 * CANDLE_MS]
    assert len(slice_period(df, None, None)) == len(df)
