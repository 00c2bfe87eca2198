"""Exchange history into a candle file: fetch closed 5-minute candles from an exchange into a candle file, resumably.

- Pages through `fetch_ohlcv` (at most 1000 candles per call), keeps open times in `[since, until)`,
  and never stores the still-forming candle (closed by exchange time, `fetch_time`).
- Resumes from what the output file already holds: the file is validated, and the exchange's copy of
  its last candle must match it (otherwise it holds another symbol or exchange: clear error). Data in
  the file is never dropped, so a file that already reaches before `since` keeps its older candles, and
  a `since` after the file's end does not leave a hole: the file stays contiguous from its last candle.
  A `since` before the file's first candle is refused (no prepending), unless the exchange has nothing
  earlier either (a `since` before the market's listing).
- Saves progress atomically every few pages, and once more when interrupted (error or Ctrl-C), so a
  crash loses at most `flush_every_pages` pages and a rerun continues where the file ends.
- Gaps (exchange outages: Binance misses a few 5m candles in its history) are reported, never filled.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import structlog
from tqdm import tqdm

from bot.errors import CandleFileError, ConfigError
from bot.exchange.client import MAX_OHLCV_LIMIT, SUPPORTED_TIMEFRAME, ExchangeClient, check_timeframe
from bot.files.candles import load_candles_with_gaps, log_gaps, save_candles
from strategies.candles import (
    CANDLE_MS,
    PRICE_COLUMNS,
    Gap,
    describe_gaps,
    empty_candles,
    find_gaps,
    iso_utc,
)

log = structlog.get_logger(__name__)


# Progress is written every this many pages (1000 candles each): a crash loses at most this much.
FLUSH_EVERY_PAGES = 10


# The file's last candle and the exchange's copy of it must agree this closely to continue the file.
SEAM_RTOL = 1e-6


@dataclass(frozen=True)
class DownloadResult:
    """What a download did: the file, its span, what was added, API calls made and the gaps found."""

    path: Path
    symbol: str
    timeframe: str
    rows_total: int
    rows_added: int
    first_ts_ms: int | None
    last_ts_ms: int | None
    api_calls: int
    resumed: bool
    gaps: tuple[Gap, ...]


def _align_up(ts_ms: int) -> int:
    return -(-int(ts_ms) // CANDLE_MS) * CANDLE_MS


def _check_seam(path: Path, last: pd.Series, page: pd.DataFrame, exchange_id: str, symbol: str) -> None:
    """Refuse to append when the exchange's copy of the file's last candle differs from the file's."""
    where = f"{exchange_id} {symbol} {SUPPORTED_TIMEFRAME}"
    last_ts_ms = int(last["ts_ms"])
    if len(page) == 0 or int(page["ts_ms"].iloc[0]) != last_ts_ms:
        raise CandleFileError(
            path,
            f"does not continue {where}: the exchange has no candle at the file's last time "
            f"{iso_utc(last_ts_ms)} (file from another exchange or symbol?); use another --out file",
        )
    theirs = page.iloc[0]
    mine = np.array([float(last[c]) for c in PRICE_COLUMNS])
    other = np.array([float(theirs[c]) for c in PRICE_COLUMNS])
    if not np.allclose(mine, other, rtol=SEAM_RTOL, atol=0.0):
        raise CandleFileError(
            path,
            f"does not continue {where}: its last candle {iso_utc(last_ts_ms)} has "
            f"open/high/low/close {'/'.join(f'{x:g}' for x in mine)} but the exchange has "
            f"{'/'.join(f'{x:g}' for x in other)} (file from another exchange or symbol?); "
            "use another --out file",
        )


def download_candles(
    client: ExchangeClient,
    symbol: str,
    timeframe: str,
    since_ms: int | None,
    until_ms: int | None,
    out_path: str | Path,
    *,
    progress: bool = True,
    now_ms: int | None = None,
    flush_every_pages: int = FLUSH_EVERY_PAGES,
) -> DownloadResult:
    """Download closed candles with open times in [since_ms, until_ms) to out_path, resuming the file."""
    out_path = Path(out_path)
    check_timeframe(timeframe)
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise ConfigError(f"empty period: since {iso_utc(since_ms)} is not before until {iso_utc(until_ms)}")
    if flush_every_pages < 1:
        raise ValueError("flush_every_pages must be >= 1")
    if since_ms is None and not out_path.exists():
        raise ConfigError(f"a start time (--since) is needed: {out_path} does not exist yet")
    client.check_symbol(symbol)
    if now_ms is None:
        now_ms = client.server_time_ms()
    api_calls = 0

    # ---- where to start: a fresh file at since_ms, or the existing file's last candle ----------------
    base = empty_candles()
    last_row: pd.Series | None = None
    if out_path.exists():
        base, _ = load_candles_with_gaps(out_path)
        first_ts_ms, last_ts_ms = int(base["ts_ms"].iloc[0]), int(base["ts_ms"].iloc[-1])
        if last_ts_ms + CANDLE_MS > now_ms:
            raise CandleFileError(
                out_path,
                f"last candle {iso_utc(last_ts_ms)} is not closed yet at exchange time {iso_utc(now_ms)}: "
                "it holds candles this exchange has not closed (another source, or a clock far off?)",
            )
        if since_ms is not None and _align_up(since_ms) < first_ts_ms:
            # Only fine when the exchange has nothing earlier either (e.g. since before the listing).
            head = client.fetch_ohlcv_page(symbol, timeframe, _align_up(since_ms), 1)
            api_calls += 1
            if head and int(head[0][0]) < first_ts_ms:
                raise CandleFileError(
                    out_path,
                    f"starts at {iso_utc(first_ts_ms)} but {client.id} has {symbol} candles from "
                    f"{iso_utc(int(head[0][0]))} on: a download cannot prepend to an existing file; "
                    f"use another --out file, or --since {iso_utc(first_ts_ms)} or later",
                )
        last_row = base.iloc[-1]
        # Fetch from the last candle itself: the exchange's copy of it proves the file is the same market.
        start_ms = last_ts_ms
        log.info(
            "download_resume",
            path=str(out_path),
            rows=len(base),
            first=iso_utc(first_ts_ms),
            last=iso_utc(last_ts_ms),
        )
    else:
        assert since_ms is not None  # checked above, before any request
        start_ms = _align_up(since_ms)

    # ---- page, save every few pages and on interruption -------------------------------------------
    end_ms = now_ms - CANDLE_MS + 1  # open times below this are closed
    if until_ms is not None:
        end_ms = min(end_ms, until_ms)
    first_new_ms = start_ms + CANDLE_MS if last_row is not None else start_ms
    expected = max(0, -(-(end_ms - first_new_ms) // CANDLE_MS))
    rows_before = len(base)
    pending: list[pd.DataFrame] = []
    pages_since_flush = 0

    def flush() -> None:
        nonlocal base, pending, pages_since_flush
        pages_since_flush = 0
        new = [p for p in pending if len(p)]
        pending = []
        if not new:
            return
        # Skipping an empty base keeps pandas from warning about concatenating empty frames.
        combined = pd.concat([base, *new] if len(base) else new, ignore_index=True)
        save_candles(combined, out_path)  # validates: never writes duplicates or disorder
        base = combined
        log.info(
            "download_progress",
            path=str(out_path),
            rows=len(base),
            last=iso_utc(int(base["ts_ms"].iloc[-1])),
        )

    bar = tqdm(
        total=expected,
        unit="candle",
        desc=f"{symbol} {timeframe}",
        disable=not progress or not sys.stderr.isatty(),
        file=sys.stderr,
    )
    try:
        if expected > 0:
            pages = client.iter_closed_candle_pages(
                symbol, start_ms, now_ms, until_ms=until_ms, timeframe=timeframe, limit=MAX_OHLCV_LIMIT
            )
            for batch in pages:
                page = batch.to_frame()
                api_calls += 1
                if last_row is not None:
                    _check_seam(out_path, last_row, page, client.id, symbol)
                    page = page.iloc[1:].reset_index(drop=True)
                    last_row = None
                pending.append(page)
                bar.update(len(page))
                pages_since_flush += 1
                if pages_since_flush >= flush_every_pages:
                    flush()
    except BaseException as exc:
        # Keep what was fetched: the rerun then resumes after it. The original error still propagates.
        try:
            flush()
        except Exception as flush_exc:
            log.error("download_save_failed", path=str(out_path), error=str(flush_exc))
        log.warning("download_interrupted", path=str(out_path), rows=len(base), error_class=type(exc).__name__)
        raise
    finally:
        bar.close()
    flush()

    gaps = tuple(find_gaps(base))
    log_gaps(gaps, path=str(out_path), symbol=symbol)
    result = DownloadResult(
        path=out_path,
        symbol=symbol,
        timeframe=timeframe,
        rows_total=len(base),
        rows_added=len(base) - rows_before,
        first_ts_ms=int(base["ts_ms"].iloc[0]) if len(base) else None,
        last_ts_ms=int(base["ts_ms"].iloc[-1]) if len(base) else None,
        api_calls=api_calls,
        resumed=rows_before > 0,
        gaps=gaps,
    )
    log.info(
        "download_done",
        path=str(out_path),
        symbol=symbol,
        rows=result.rows_total,
        added=result.rows_added,
        first=iso_utc(result.first_ts_ms) if result.first_ts_ms is not None else None,
        last=iso_utc(result.last_ts_ms) if result.last_ts_ms is not None else None,
        api_calls=api_calls,
        gaps=describe_gaps(gaps),
    )
    return result
