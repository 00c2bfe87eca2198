"""Shared fixtures: the real 2024 BTC/USDT 5m candles from ../shared/data (never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_2024 = REPO.parent / "shared" / "data" / "binance_BTCUSDT_5m_2024.csv.gz"


@pytest.fixture(scope="session")
def data_path() -> Path:
    """Path of the real 2024 candle file."""
    if not DATA_2024.exists():
        pytest.fail(f"real data missing: {DATA_2024} (../shared must sit beside the repo)")
    return DATA_2024


@pytest.fixture(scope="session")
def candles_2024(data_path: Path) -> pd.DataFrame:
    """The whole 2024 year: columns ts_ms (int64), open, high, low, close, volume (float64)."""
    df = pd.read_csv(data_path)
    df = df.rename(columns={"timestamp": "ts_ms"})
    df["ts_ms"] = df["ts_ms"].astype("int64")
    for col in ("open", "high", "low", "close", "volume"):
        df[col] = df[col].astype("float64")
    return df
