"""The pandas-free candle reader (bot/files/candle_batch.py) and exchange-row converter (strategies.candles):
the same candles, gaps and errors as the pandas path, on the real files of ../shared/data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import structlog

from bot.errors import CandleFileError
from bot.files.candle_batch import load_candle_batch, read_plain_csv
from bot.files.candles import load_candles, load_candles_with_gaps, save_candles
from strategies.candles import CANDLE_MS, CandleBatch, ohlcv_batch, validate_candle_arrays
from tests.conftest import REPO

DATA_DIR = REPO.parent / "shared" / "data"
REAL_FILES = sorted(DATA_DIR.glob("binance_*_5m_*.csv.gz"))
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.int64)


@pytest.mark.parametrize("path", REAL_FILES, ids=[p.name for p in REAL_FILES])
def test_real_files_read_bit_identical_to_the_pandas_reader(path: Path) -> None:
    plain = read_plain_csv(path)
    assert plain is not None, "a well-formed real file must take the numpy path"
    batch, gaps = plain
    df, df_gaps = load_candles_with_gaps(path)
    assert batch.ts_ms.dtype == np.int64 and batch.values.dtype == np.float64
    np.testing.assert_array_equal(batch.ts_ms, df["ts_ms"].to_numpy())
    expected = CandleBatch.from_frame(df)
    np.testing.assert_array_equal(_bits(batch.values), _bits(expected.values))  # every double, bit for bit
    assert gaps == df_gaps


def test_real_gaps_are_logged_or_refused_like_load_candles() -> None:
    gappy = next(p for p in REAL_FILES if load_candles_with_gaps(p)[1])
    with structlog.testing.capture_logs() as logs:
        load_candle_batch(gappy)
    assert next(e for e in logs if e["event"] == "candle_gaps")["path"] == str(gappy)
    with pytest.raises(CandleFileError) as ours:
        load_candle_batch(gappy, allow_gaps=False)
    with pytest.raises(CandleFileError) as theirs:
        load_candles(gappy, allow_gaps=False)
    assert str(ours.value) == str(theirs.value)


def _write(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", newline="") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


ROWS = [f"{T0 + i * CANDLE_MS},{100 + i}.5,{102 + i}.25,{99 + i},{101 + i}.125,{3 * i}.75" for i in range(6)]
HEADER = "timestamp,open,high,low,close,volume"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("unsorted.csv", "\n".join([HEADER, ROWS[1], ROWS[0], *ROWS[2:]]) + "\n"),
        ("word.csv", "\n".join([HEADER, *ROWS[:3], ROWS[3].replace(",103.5,", ",abc,"), *ROWS[4:]]) + "\n"),
        ("short_row.csv.gz", "\n".join([HEADER, *ROWS[:2], ROWS[2].rsplit(",", 1)[0], *ROWS[3:]]) + "\n"),
        ("header.csv", "\n".join(["ts,open,high,low,close,volume", *ROWS]) + "\n"),
        ("empty.csv", HEADER + "\n"),
        ("ohlc.csv", "\n".join([HEADER, *ROWS[:4], f"{T0 + 4 * CANDLE_MS},100,99,98,100,1", ROWS[5]]) + "\n"),
        ("seconds.csv", "\n".join([HEADER, *[r.replace(str(T0), "1704067200", 1) for r in ROWS[:1]]]) + "\n"),
    ],
)
def test_files_the_numpy_path_refuses_fail_with_load_candles_message(tmp_path: Path, name: str, text: str) -> None:
    path = _write(tmp_path / name, text)
    assert read_plain_csv(path) is None
    with pytest.raises(CandleFileError) as ours:
        load_candle_batch(path)
    with pytest.raises(CandleFileError) as theirs:
        load_candles(path)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("name", ["c.csv", "c.csv.gz", "c.parquet"])
def test_every_format_loads_the_same_candles(tmp_path: Path, candles_2024, name: str) -> None:
    df = candles_2024.iloc[1000:1300].reset_index(drop=True)
    save_candles(df, tmp_path / name)
    batch = load_candle_batch(tmp_path / name)
    np.testing.assert_array_equal(batch.ts_ms, df["ts_ms"].to_numpy())
    np.testing.assert_array_equal(_bits(batch.values), _bits(CandleBatch.from_frame(df).values))
    assert (read_plain_csv(tmp_path / name) is None) == name.endswith(".parquet")


def test_missing_file_is_a_candle_file_error(tmp_path: Path) -> None:
    with pytest.raises(CandleFileError, match="file not found"):
        load_candle_batch(tmp_path / "nope.csv.gz")


def test_batch_round_trips_through_a_frame(candles_2024) -> None:
    df = candles_2024.iloc[:50].reset_index(drop=True)
    batch = CandleBatch.from_frame(df)
    back = batch.to_frame()
    assert list(back.columns) == list(df.columns) and back.equals(df)
    np.testing.assert_array_equal(batch.column("close"), df["close"].to_numpy())
    assert len(CandleBatch.empty()) == 0 and CandleBatch.empty().to_frame().empty


def test_validate_candle_arrays_takes_float_timestamps_and_reports_lines() -> None:
    ts = np.array([T0, T0 + CANDLE_MS, T0 + 3 * CANDLE_MS, T0 + 4 * CANDLE_MS, T0 + 5 * CANDLE_MS], dtype=np.float64)
    values = np.array([[1.0, 2.0, 0.5, 1.5, 3.0]] * 5)
    gaps = validate_candle_arrays(ts, values, line_offset=2)
    assert [(g.after_ts_ms, g.missing) for g in gaps] == [(T0 + CANDLE_MS, 1)]
    bad = values.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"1 missing \(NaN\) or infinite value\(s\) in column close at line 3"):
        validate_candle_arrays(ts, bad, line_offset=2)


def test_ohlcv_batch_casts_dedupes_sorts_and_drops_the_forming_candle() -> None:
    rows = [
        [T0 + 2 * CANDLE_MS, 3, 3, 3, 3, 3],  # forming at now
        [T0 + CANDLE_MS, "2.5", 2, 2, 2, None],  # text is a number; a missing volume is NaN
        [T0, 1, 1, 1, 1, 1],
        [T0 + CANDLE_MS, 2, 2, 2, 2, 7, "extra"],  # the later copy wins; fields past the 6th are ignored
        [float(T0 - CANDLE_MS), 0.5, 0.5, 0.5, 0.5, "n/a"],  # a whole float timestamp is fine
    ]
    batch = ohlcv_batch(rows, now_ms=T0 + 2 * CANDLE_MS + 10_000)
    assert batch.ts_ms.tolist() == [T0 - CANDLE_MS, T0, T0 + CANDLE_MS]
    assert batch.values[2].tolist() == [2.0, 2.0, 2.0, 2.0, 7.0]
    assert np.isnan(batch.values[0, 4])
    assert len(ohlcv_batch(rows, now_ms=T0 + 3 * CANDLE_MS)) == 4
    assert len(ohlcv_batch([], now_ms=T0)) == 0


@pytest.mark.parametrize("ts", [T0 + 0.5, None, "soon", float("nan"), True])
def test_ohlcv_batch_refuses_a_timestamp_that_is_not_whole_ms(ts: object) -> None:
    with pytest.raises(ValueError, match="not a whole number of milliseconds"):
        ohlcv_batch([[ts, 1, 1, 1, 1, 1]], now_ms=T0 + 10 * CANDLE_MS)
