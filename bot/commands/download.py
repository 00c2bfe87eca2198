"""`ritmo download`: the command line of `bot.offline.history.download_candles` (what it keeps and refuses is
documented there)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from bot.errors import EXIT_OK, ConfigError, UsageError
from bot.exchange.client import (
    SUPPORTED_TIMEFRAME,
    check_timeframe,
    make_exchange,
)
from bot.files.paths import check_output_file
from bot.offline.history import download_candles
from bot.offline.periods import check_order
from strategies.candles import (
    parse_utc_date_ms,
)

log = structlog.get_logger(__name__)

# ---- command line ---------------------------------------------------------------------------------


def _utc_date_arg(value: str) -> int:
    """argparse type: a UTC date/datetime as epoch ms (a usage error on bad input)."""
    try:
        return parse_utc_date_ms(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `ritmo download` options to a parser."""
    p.add_argument("--exchange", default="binance", help="ccxt exchange id (default: binance)")
    p.add_argument("--symbol", default="BTC/USDT", help="unified market symbol (default: BTC/USDT)")
    p.add_argument(
        "--timeframe",
        default=SUPPORTED_TIMEFRAME,
        choices=[SUPPORTED_TIMEFRAME],
        help="candle interval; only 5m is supported",
    )
    p.add_argument(
        "--since",
        type=_utc_date_arg,
        default=None,
        help="first candle open time, YYYY-MM-DD or ISO datetime, UTC; needed unless --out exists "
        "(then the download resumes after the file's last candle)",
    )
    p.add_argument(
        "--until",
        type=_utc_date_arg,
        default=None,
        help="stop before this open time (exclusive), UTC; default: up to the last closed candle",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="output file: .csv, .csv.gz or .parquet")
    p.add_argument(
        "--exchange-config",
        default=None,
        metavar="JSON",
        help="JSON object merged into the ccxt constructor arguments (URLs, proxies, options)",
    )


def _ms_option(value: object, name: str) -> int | None:
    """An option given as epoch ms (from the parser) or as a date string (a Namespace built by hand)."""
    if value is None:
        return None
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    try:
        return parse_utc_date_ms(str(value))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _exchange_config(value: object) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    try:
        config = json.loads(str(value))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--exchange-config is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError("--exchange-config must be a JSON object, e.g. '{\"timeout\": 30000}'")
    return config


def main(args: argparse.Namespace) -> int:
    """Run `ritmo download` from parsed arguments; errors propagate as RitmoError subclasses."""
    timeframe = getattr(args, "timeframe", SUPPORTED_TIMEFRAME) or SUPPORTED_TIMEFRAME
    try:
        check_timeframe(timeframe)
    except ConfigError as exc:
        raise ConfigError(f"--timeframe: {exc}") from None
    since_ms = _ms_option(getattr(args, "since", None), "--since")
    until_ms = _ms_option(getattr(args, "until", None), "--until")
    if not getattr(args, "out", None):
        raise UsageError("--out FILE is required")
    if since_ms is not None and until_ms is not None:
        check_order(since_ms, until_ms, from_option="--since", to_option="--until")
    # Before the first request: a download of a year takes minutes, and its file must be writable at the end.
    check_output_file(Path(args.out), "--out")
    config = _exchange_config(getattr(args, "exchange_config", None))
    client = make_exchange(getattr(args, "exchange", None) or "binance", config)
    download_candles(
        client,
        getattr(args, "symbol", None) or "BTC/USDT",
        timeframe,
        since_ms,
        until_ms,
        Path(args.out),
    )
    return EXIT_OK
