"""Shared fixtures: the real 2024 BTC/USDT 5m candles from ../shared/data (never copied into the repo)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import structlog
import torch

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


@contextlib.contextmanager
def process_isolation(mp: pytest.MonkeyPatch, cwd: Path) -> Iterator[None]:
    """Run `ritmo` in-process: no RITMO_* from the environment, cwd changed; logging, signal handlers, torch
    threads and `random` (retry jitter, seeded here) restored afterwards."""
    for key in list(os.environ):
        if key.startswith("RITMO_") or key in ("NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY"):
            mp.delenv(key)
    mp.chdir(cwd)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    threads = torch.get_num_threads()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    state = random.getstate()
    random.seed(20241201)
    try:
        yield
    finally:
        random.setstate(state)
        for s, h in previous.items():
            signal.signal(s, h)
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("apscheduler").setLevel(logging.NOTSET)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        torch.set_num_threads(threads)


@pytest.fixture
def isolated_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """For tests that run `ritmo` in-process, in tmp_path (see process_isolation)."""
    with process_isolation(monkeypatch, tmp_path):
        yield


@pytest.fixture
def localhost_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every connection that is not to 127.0.0.1 / ::1 (or a Unix socket): no test reaches an exchange."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to reach {address!r}: only 127.0.0.1 is allowed")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def assert_secrets_absent(
    secrets: Sequence[str], text: str, root: Path, skip: Callable[[Path], bool] = lambda path: False
) -> None:
    """None of `secrets` is in `text` (logs, errors) or in any file under `root` (state, checkpoints) but `skip`'s."""
    for secret in secrets:
        assert secret not in text
    for path in root.rglob("*"):
        if path.is_file() and not skip(path):
            data = path.read_bytes()
            assert not any(secret.encode() in data for secret in secrets), path
