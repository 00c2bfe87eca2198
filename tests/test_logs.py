"""Logging: JSON lines or console, the standard library routed through structlog, secrets never printed."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from bot.logs import Redactor, configure_logging

KEY = "kEy1234567890ABCDEFghijklmnopQRSTUV"
SECRET = "sEcReT0987654321zyxwvuTSRQPONMLKJi"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave the root logger and structlog as other tests expect them."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    ccxt_level = logging.getLogger("ccxt").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("ccxt").setLevel(ccxt_level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def log_everything() -> None:
    """Emit the secrets through every path a real run could take."""
    log = structlog.get_logger("bot.test")
    log.info("order_sent", api_key=KEY, headers={"X-MBX-APIKEY": KEY}, note=f"key is {KEY}")
    log.debug("request", url=f"https://api.binance.com/api/v3/order?apiKey={KEY}&signature=abcdef0123456789")
    log.warning("nested", payload={"deep": [f"secret={SECRET}", {"k": (KEY,)}]})
    ccxt = logging.getLogger("ccxt.base.exchange")
    headers = {"X-MBX-APIKEY": KEY, "Content-Type": "application/json"}
    ccxt.debug("POST https://api.binance.com/api/v3/order, Request: %s %s", headers, "a=1")
    ccxt.info("POST https://api.binance.com/api/v3/order, Request: %s", headers)
    ccxt.warning("retrying with secret %s", SECRET)
    logging.getLogger("urllib3.connectionpool").debug(
        'https://api.binance.com:443 "GET /api/v3/account?timestamp=1&signature=deadbeefcafe HTTP/1.1" 200'
    )
    logging.getLogger("apscheduler.scheduler").info("Scheduler started")
    try:
        raise RuntimeError(f"exchange said: invalid key {KEY} / {SECRET}")
    except RuntimeError:
        log.exception("tick_failed")
        ccxt.exception("ccxt_failed")
    with structlog.contextvars.bound_contextvars(candle_ts_ms=1_733_011_200_000, secret=SECRET):
        log.info("tick")


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.parametrize("level", ["DEBUG", "INFO"])
def test_no_secret_in_output(fmt: str, level: str) -> None:
    out = io.StringIO()
    configure_logging(fmt=fmt, level=level, stream=out, secrets=[KEY, SECRET])
    log_everything()
    text = out.getvalue()
    assert "tick_failed" in text and "ccxt_failed" in text and "Scheduler started" in text
    assert KEY not in text and SECRET not in text
    assert "abcdef0123456789" not in text and "deadbeefcafe" not in text
    # Key fragments too (a secret cut by some renderer would still leak part of it).
    assert KEY[:16] not in text and SECRET[-16:] not in text
    assert "***" in text


def test_json_lines_one_object_per_line() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="DEBUG", stream=out, secrets=[KEY, SECRET])
    log_everything()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records, "nothing logged"
    for record in records:
        assert {"timestamp", "level", "event"} <= record.keys()
        assert record["timestamp"].endswith("Z")
    by_event = {r["event"]: r for r in records}
    assert by_event["order_sent"]["api_key"] == "***"
    assert by_event["order_sent"]["logger"] == "bot.test"
    assert by_event["tick"]["candle_ts_ms"] == 1_733_011_200_000
    assert "RuntimeError" in by_event["tick_failed"]["exception"]
    assert "RuntimeError" in by_event["ccxt_failed"]["exception"]
    assert by_event["Scheduler started"]["logger"] == "apscheduler.scheduler"
    assert by_event["Scheduler started"]["level"] == "info"


def test_ccxt_never_logs_debug() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="DEBUG", stream=out)
    assert logging.getLogger("ccxt").getEffectiveLevel() >= logging.INFO
    assert logging.getLogger("ccxt.base.exchange").getEffectiveLevel() >= logging.INFO
    # Even if some code lowers it again later, the handler drops ccxt's DEBUG records.
    logging.getLogger("ccxt.base.exchange").setLevel(logging.DEBUG)
    try:
        logging.getLogger("ccxt.base.exchange").debug("headers")
        logging.getLogger("bot.other").debug("ours")
    finally:
        logging.getLogger("ccxt.base.exchange").setLevel(logging.NOTSET)
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == ["ours"]


def test_level_filters() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="WARNING", stream=out)
    structlog.get_logger().info("hidden")
    logging.getLogger("apscheduler").info("hidden too")
    structlog.get_logger().warning("shown")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["shown"]


def test_console_mode_and_auto_detection() -> None:
    tty = FakeTTY()
    configure_logging(fmt="auto", stream=tty)
    structlog.get_logger().info("hello_console", n=1)
    text = tty.getvalue()
    assert "hello_console" in text and "n" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])

    pipe = io.StringIO()
    configure_logging(fmt="auto", stream=pipe)
    structlog.get_logger().info("hello_json", n=1)
    assert json.loads(pipe.getvalue())["n"] == 1

    forced = io.StringIO()
    configure_logging(fmt="console", stream=forced)
    structlog.get_logger().info("plain")
    assert "plain" in forced.getvalue() and "\x1b[" not in forced.getvalue()


def test_idempotent() -> None:
    out = io.StringIO()
    for _ in range(3):
        configure_logging(fmt="json", stream=out)
    logger = structlog.get_logger()
    logger.info("once")
    logging.getLogger("apscheduler").warning("once_too")
    assert len(out.getvalue().splitlines()) == 2
    # Reconfiguring changes loggers created earlier too (no cached configuration).
    out2 = io.StringIO()
    configure_logging(fmt="json", stream=out2)
    logger.info("moved")
    assert "moved" in out2.getvalue() and "moved" not in out.getvalue()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        configure_logging(fmt="xml")
    with pytest.raises(ValueError):
        configure_logging(level="LOUD")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /x?timestamp=1&signature=0a1b2c HTTP/1.1", "GET /x?timestamp=1&signature=*** HTTP/1.1"),
        ("{'X-MBX-APIKEY': 'abcDEF123', 'Accept': 'x'}", "{'X-MBX-APIKEY': '***', 'Accept': 'x'}"),
        ('{"apiKey": "abc", "secret": "def"}', '{"apiKey": "***", "secret": "***"}'),
        ("password=hunter2; user=bob", "password=***; user=bob"),
        ("signature_ok: True", "signature_ok: True"),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_redactor_patterns(text: str, expected: str) -> None:
    assert Redactor().text(text) == expected


def test_redactor_known_values_and_url_encoding() -> None:
    r = Redactor(["a+b/c=d12345", "", "abc"])
    assert r.text("x a+b/c=d12345 y a%2Bb%2Fc%3Dd12345 z abc") == "x *** y *** z abc"
    assert r.value({"api_secret": "anything", "list": ("a+b/c=d12345",)}) == {
        "api_secret": "***",
        "list": ["***"],
    }
