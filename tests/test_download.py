"""`ritmo download` against the fake exchange: paging, forming candle, resume, retries, CLI glue."""

from __future__ import annotations

import argparse
from pathlib import Path

import ccxt
import pandas as pd
import pytest
from structlog.testing import capture_logs

import bot.commands.download as download_mod
from bot.commands.download import add_arguments, main
from bot.errors import CandleFileError, ConfigError, OperationalExchangeError, TemporaryExchangeError, UsageError
from bot.exchange.client import ExchangeClient
from bot.files.candles import load_candles, save_candles
from bot.offline.history import download_candles
from strategies.candles import CANDLE_MS, Gap, iso_utc
from tests.fake_exchange import FakeExchange

N = 2_600  # three pages of source candles: 1000 + 1000 + 600 (the last one still forming)
SYMBOL = "BTC/USDT"


class Recorder:
    """Injected sleep: records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def src(candles_2024: pd.DataFrame) -> pd.DataFrame:
    """The first N real candles of 2024."""
    return candles_2024.iloc[:N].reset_index(drop=True)


def _ts(src: pd.DataFrame, i: int) -> int:
    return int(src["ts_ms"].iloc[i])


@pytest.fixture
def fake(src: pd.DataFrame) -> FakeExchange:
    """Serves src; the clock is 2 minutes into the last candle, so it is still forming."""
    return FakeExchange(src, now_ms=_ts(src, N - 1) + 120_000)


def _ohlcv_calls(fake: FakeExchange) -> list[dict]:
    return [kw for name, kw in fake.call_log if name == "fetch_ohlcv"]


def test_full_range_pages_and_drops_forming(tmp_path: Path, src: pd.DataFrame, fake: FakeExchange) -> None:
    out = tmp_path / "btc.csv.gz"
    sleep = Recorder()
    result = download_candles(ExchangeClient(fake, sleep=sleep), SYMBOL, "5m", _ts(src, 0), None, out, progress=False)
    df = load_candles(out)
    # Everything but the forming candle, identical to the source.
    pd.testing.assert_frame_equal(df, src.iloc[: N - 1].reset_index(drop=True))
    calls = _ohlcv_calls(fake)
    assert len(calls) == 3 == result.api_calls
    assert all(kw["limit"] <= 1000 for kw in calls)
    assert [kw["since"] for kw in calls] == [_ts(src, 0), _ts(src, 1000), _ts(src, 2000)]
    assert result.rows_total == result.rows_added == N - 1
    assert result.last_ts_ms == _ts(src, N - 2)
    assert result.gaps == ()
    assert not result.resumed
    assert sleep.delays == []
    # The exchange clock, not the local one, decides what is closed.
    assert fake.calls["fetch_time"] == 1


def test_whole_year_download_is_identical(tmp_path: Path, candles_2024: pd.DataFrame) -> None:
    fake = FakeExchange(candles_2024)  # clock: the last candle has just closed
    out = tmp_path / "2024.parquet"
    result = download_candles(ExchangeClient(fake), SYMBOL, "5m", _ts(candles_2024, 0), None, out, progress=False)
    pd.testing.assert_frame_equal(load_candles(out), candles_2024, check_exact=True)
    assert result.api_calls == fake.calls["fetch_ohlcv"] == 106  # ceil(105,408 / 1000)
    assert all(kw["limit"] == 1000 for kw in _ohlcv_calls(fake))


def test_until_is_exclusive(tmp_path: Path, src: pd.DataFrame, fake: FakeExchange) -> None:
    out = tmp_path / "btc.csv"
    result = download_candles(ExchangeClient(fake), SYMBOL, "5m", _ts(src, 0), _ts(src, 1500), out, progress=False)
    df = load_candles(out)
    assert df["ts_ms"].iloc[-1] == _ts(src, 1499)
    assert len(df) == 1500
    assert result.api_calls == 2


def test_since_is_rounded_up_to_a_candle(tmp_path: Path, src: pd.DataFrame, fake: FakeExchange) -> None:
    out = tmp_path / "btc.parquet"
    download_candles(ExchangeClient(fake), SYMBOL, "5m", _ts(src, 10) + 1, _ts(src, 20), out, progress=False)
    assert load_candles(out)["ts_ms"].tolist() == src["ts_ms"].iloc[11:20].tolist()


def test_resume_after_interruption_gives_exact_data(tmp_path: Path, src: pd.DataFrame, fake: FakeExchange) -> None:
    out = tmp_path / "btc.csv.gz"
    # A non-retryable failure on the third page.
    fake.fail_next("fetch_ohlcv", ccxt.ExchangeError("binance boom"), after=2)
    with pytest.raises(OperationalExchangeError, match="boom"):
        download_candles(ExchangeClient(fake), SYMBOL, "5m", _ts(src, 0), None, out, progress=False)
    partial = load_candles(out)
    pd.testing.assert_frame_equal(partial, src.iloc[:2000].reset_index(drop=True))

    fake.call_log.clear()
    with capture_logs() as logs:
        result = download_candles(ExchangeClient(fake), SYMBOL, "5m", _ts(src, 0), None, out, progress=False)
    df = load_candles(out)
    pd.testing.assert_frame_equal(df, src.iloc[: N - 1].reset_index(drop=True))
    assert df["ts_ms"].is_unique
    assert result.resumed
    assert result.rows_added == N - 1 - 2000
    # It continued from the file's last candle (re-fetched once, to check the file matches the market).
    assert [kw["since"] for kw in _ohlcv_calls(fake)] == [_ts(src, 1999)]
    assert any(e["event"] == "download_resume" for e in logs)

    # A third run has nothing to fetch.
    fake.call_log.clear()
    again = download_candles(ExchangeClient(fake), SYMBOL, "5m", _ts(src, 0), None, out, progress=False)
    assert again.rows_added == 0
    assert _ohlcv_calls(fake) == []


def test_progress_is_on_disk_during_the_download(tmp_path: Path, src: pd.DataFrame) -> None:
    out = tmp_path / "btc.csv"
    seen_rows: list[int] = []

    class Watching(FakeExchange):
        def fetch_ohlcv(self, *args, **kwargs):
            # What a kill -9 right now would leave behind.
            seen_rows.append(len(load_candles(out)) if out.exists() else 0)
            return super().fetch_ohlcv(*args, **kwargs)

    watching = Watching(src, now_ms=_ts(src, N - 1) + 120_000)
    download_candles(
        ExchangeClient(watching), SYMBOL, "5m", _ts(src, 0), None, out, progress=False, flush_every_pages=1
    )
    assert seen_rows == [0, 1000, 2000]


def test_transient_errors_are_retried_with_backoff(tmp_path: Path, src: pd.DataFrame, fake: FakeExchange) -> None:
    out = tmp_path / "btc.csv.gz"
    fake.fail_next("fetch_ohlcv", ccxt.RequestTimeout, times=2, after=1)
    fake.fail_next("fetch_ohlcv", ccxt.ExchangeNotAvailable, times=2)
    fake.fail_next("fetch_time", ccxt.NetworkError, times=1)
    sleep = Recorder()
    with capture_logs() as logs:
        result = download_candles(
            ExchangeClient(fake, sleep=sleep, rng=lambda: 1.0), SYMBOL, "5m", _ts(src, 0), None, out, progress=False
        )
    pd.testing.assert_frame_equal(load_candles(out), src.iloc[: N - 1].reset_index(drop=True))
    # fetch_time: one retry (1 s); second page: four retries, growing and capped (1, 2, 4, 8 s).
    assert sleep.delays == [1.0, 1.0, 2.0, 4.0, 8.0]
    assert fake.calls["fetch_ohlcv"] == 3 + 4
    assert result.api_calls == 3  # pages, not attempts
    retries = [e for e in logs if e["event"] == "exchange_retry"]
    assert [e["error_class"] for e in retries] == [
        "NetworkError",
        "RequestTimeout",
        "RequestTimeout",
        "ExchangeNotAvailable",
        "ExchangeNotAvailable",
    ]


def test_retries_exhausted_then_rerun_completes(tmp_path: Path, src: pd.DataFrame, fake: FakeExchange) -> None:
    out = tmp_path / "btc.csv.gz"
    fake.fail_next("fetch_ohlcv", ccxt.NetworkError, times=5, after=1)
    sleep = Recorder()
    with pytest.raises(TemporaryExchangeError, match="gave up after 5 attempts"):
        download_candles(
            ExchangeClient(fake, sleep=sleep, rng=lambda: 1.0), SYMBOL, "5m", _ts(src, 0), None, out, progress=False
        )
    assert sleep.delays == [1.0, 2.0, 4.0, 8.0]
    assert len(load_candles(out)) == 1000
    download_candles(ExchangeClient(fake, sleep=sleep), SYMBOL, "5m", _ts(src, 0), None, out, progress=False)
    pd.testing.assert_frame_equal(load_candles(out), src.iloc[: N - 1].reset_index(drop=True))


def test_gaps_are_reported_not_filled(tmp_path: Path, src: pd.DataFrame) -> None:
    # Two exchange outages: 1 candle and 3 candles missing.
    holed = src.drop(index=[500, 1700, 1701, 1702]).reset_index(drop=True)
    fake = FakeExchange(holed, now_ms=_ts(src, N - 1) + CANDLE_MS)
    out = tmp_path / "btc.csv.gz"
    with capture_logs() as logs:
        result = download_candles(ExchangeClient(fake), SYMBOL, "5m", _ts(src, 0), None, out, progress=False)
    assert result.gaps == (Gap(_ts(src, 499), 1), Gap(_ts(src, 1699), 3))
    pd.testing.assert_frame_equal(load_candles(out), holed)
    event = next(e for e in logs if e["event"] == "candle_gaps")
    assert event["count"] == 2 and event["missing_candles"] == 4
    assert iso_utc(_ts(src, 499)) in event["first"][0]
    done = next(e for e in logs if e["event"] == "download_done")
    assert done["gaps"].startswith("2 gap(s) (4 missing candles)")


def test_file_of_another_symbol_is_refused(tmp_path: Path, src: pd.DataFrame) -> None:
    eth = src.copy()
    for col in ("open", "high", "low", "close"):
        eth[col] = (eth[col] / 20).round(2)
    fake = FakeExchange({SYMBOL: src, "ETH/USDT": eth}, now_ms=_ts(src, N - 1) + CANDLE_MS)
    out = tmp_path / "data.csv.gz"
    download_candles(ExchangeClient(fake), "ETH/USDT", "5m", _ts(src, 0), _ts(src, 100), out, progress=False)
    before = out.read_bytes()
    expected = "does not continue binance BTC/USDT 5m: its last candle"
    with pytest.raises(CandleFileError, match=expected) as info:
        download_candles(ExchangeClient(fake), SYMBOL, "5m", _ts(src, 0), None, out, progress=False)
    assert str(out) in str(info.value)
    assert out.read_bytes() == before


def test_file_with_another_interval_is_refused(tmp_path: Path, src: pd.DataFrame, fake: FakeExchange) -> None:
    out = tmp_path / "hourly.csv"
    save_candles(src.iloc[:30], out)
    hourly = out.read_text().splitlines()
    # Keep every 12th candle: a 1h file (timestamps still on 5-minute boundaries).
    out.write_text("\n".join([hourly[0], *hourly[1::12]]) + "\n")
    with pytest.raises(CandleFileError, match="interval looks like 60 minutes"):
        download_candles(ExchangeClient(fake), SYMBOL, "5m", _ts(src, 0), None, out, progress=False)


def test_cannot_prepend_but_listing_date_is_fine(tmp_path: Path, src: pd.DataFrame, fake: FakeExchange) -> None:
    out = tmp_path / "btc.csv.gz"
    save_candles(src.iloc[500:1000], out)
    with pytest.raises(CandleFileError, match="cannot prepend"):
        download_candles(ExchangeClient(fake), SYMBOL, "5m", _ts(src, 0), None, out, progress=False)

    # A since before the market's first candle ("listing") is not a reason to refuse a resume.
    listed = tmp_path / "listed.csv.gz"
    save_candles(src.iloc[:1000], listed)
    result = download_candles(
        ExchangeClient(fake), SYMBOL, "5m", _ts(src, 0) - 30 * 86_400_000, None, listed, progress=False
    )
    pd.testing.assert_frame_equal(load_candles(listed), src.iloc[: N - 1].reset_index(drop=True))
    assert result.resumed


def test_unknown_symbol_and_bad_arguments(tmp_path: Path, src: pd.DataFrame, fake: FakeExchange) -> None:
    out = tmp_path / "x.csv"
    with pytest.raises(OperationalExchangeError, match="binance has no market 'BTC/USDX'"):
        download_candles(ExchangeClient(fake), "BTC/USDX", "5m", _ts(src, 0), None, out, progress=False)
    with pytest.raises(ConfigError, match="timeframe '1h' is not supported"):
        download_candles(ExchangeClient(fake), SYMBOL, "1h", _ts(src, 0), None, out, progress=False)
    with pytest.raises(ConfigError, match="empty period"):
        download_candles(ExchangeClient(fake), SYMBOL, "5m", _ts(src, 10), _ts(src, 10), out, progress=False)
    fake.calls.clear()
    with pytest.raises(ConfigError, match="--since"):
        download_candles(ExchangeClient(fake), SYMBOL, "5m", None, None, out, progress=False)
    assert not fake.calls  # refused before any request
    assert not out.exists()


def test_file_reaching_past_exchange_time_is_refused(tmp_path: Path, src: pd.DataFrame, fake: FakeExchange) -> None:
    out = tmp_path / "future.csv"
    save_candles(src, out)  # includes the candle that is still forming on the fake's clock
    with pytest.raises(CandleFileError, match="is not closed yet at exchange time"):
        download_candles(ExchangeClient(fake), SYMBOL, "5m", None, None, out, progress=False)


# ---- CLI glue -------------------------------------------------------------------------------------------


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch, fake: FakeExchange) -> list[tuple[str, dict]]:
    """make_exchange returns the fake and records what it was asked for."""
    made: list[tuple[str, dict]] = []

    def fake_make_exchange(exchange_id: str, config: dict | None = None) -> ExchangeClient:
        made.append((exchange_id, dict(config or {})))
        return ExchangeClient(fake)

    monkeypatch.setattr(download_mod, "make_exchange", fake_make_exchange)
    return made


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ritmo download")
    add_arguments(p)
    return p


def test_cli_parser_and_main(tmp_path: Path, src: pd.DataFrame, patched: list) -> None:
    out = tmp_path / "btc.csv.gz"
    args = _parser().parse_args(
        [
            "--since",
            "2024-01-01",
            "--until",
            "2024-01-02T00:00Z",
            "--out",
            str(out),
            "--exchange-config",
            '{"timeout": 30000}',
        ]
    )
    assert args.exchange == "binance" and args.symbol == "BTC/USDT" and args.timeframe == "5m"
    assert main(args) == 0
    assert patched == [("binance", {"timeout": 30000})]
    df = load_candles(out)
    assert len(df) == 288
    assert iso_utc(df["ts_ms"].iloc[-1]) == "2024-01-01T23:55:00Z"


@pytest.mark.parametrize(
    "argv",
    [
        ["--out", "x.csv", "--timeframe", "1h"],
        ["--out", "x.csv", "--since", "last tuesday"],
        ["--since", "2024-01-01"],  # --out is required
    ],
)
def test_cli_parser_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def _namespace(out: Path, **overrides: object) -> argparse.Namespace:
    values = {
        "exchange": "binance",
        "symbol": SYMBOL,
        "timeframe": "5m",
        "since": "2024-01-01",
        "until": "2024-01-01T01:00",
        "out": str(out),
        "exchange_config": None,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def test_cli_main_with_namespace(tmp_path: Path, patched: list) -> None:
    out = tmp_path / "btc.parquet"
    assert main(_namespace(out)) == 0
    assert len(load_candles(out)) == 12


def test_cli_main_reversed_period_is_a_usage_error(tmp_path: Path, patched: list) -> None:
    with pytest.raises(UsageError, match="--until must be after --since"):
        main(_namespace(tmp_path / "x.csv", since="2024-01-02", until="2024-01-01"))
    assert UsageError.exit_code == 2


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"timeframe": "15m"}, "--timeframe: timeframe '15m' is not supported"),
        ({"since": "2024-02-30"}, "--since: invalid date '2024-02-30'"),
        ({"exchange_config": "{not json"}, "--exchange-config is not valid JSON"),
        ({"exchange_config": "[1, 2]"}, "--exchange-config must be a JSON object"),
    ],
)
def test_cli_main_config_errors(tmp_path: Path, patched: list, overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        main(_namespace(tmp_path / "x.csv", **overrides))
