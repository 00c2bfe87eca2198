"""Logging: structlog for our code, the standard library's logging (ccxt, APScheduler, urllib3) routed
through the same renderer, and secrets masked on the way out.

Output is one JSON object per line on stdout (journald) unless stdout is a TTY, where structlog's
ConsoleRenderer is used; `RITMO_LOG_FORMAT` forces either. Every record, ours or a library's, goes
through one `ProcessorFormatter`, so redaction happens in one place and twice over: on the event dict
(field values, nested strings, the formatted exception) and on the final rendered line (anything a
renderer added, e.g. the repr of an object passed as a field).

journald priorities (docs/design.md §8): when the stream is connected to the journal, every line starts with
its syslog priority, `<3>` for an error, `<4>` a warning, `<6>` info, `<7>` debug. systemd strips the prefix
and stores the line at that priority (`SyslogLevelPrefix=`, on by default), so `journalctl -u ritmo -p
warning` shows exactly the warnings and errors, ours and the libraries'. The stream is the journal when
`$JOURNAL_STREAM` ("DEV:INODE", set by systemd) names its file descriptor, as systemd.exec(5) documents; a
terminal, a pipe or a file never sees a prefix.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

MASK = "***"
# ccxt logs each request's headers (the API key among them) at DEBUG on its own logger.
_NEVER_DEBUG_LOGGERS = ("ccxt",)
# Shorter "secrets" are not credentials (and masking e.g. "abc" everywhere would garble every line).
_MIN_SECRET_LEN = 4
# Field names whose values are always masked, whatever they hold.
_SECRET_FIELD_RE = re.compile(
    r"^(api[_-]?key|apikey|secret|api[_-]?secret|password|passphrase|signature|token"
    r"|private[_-]?key|listen[_-]?key)$",
    re.IGNORECASE,
)
# `name=value`, `name: value`, `'name': 'value'` (ccxt logs header dicts as reprs) and JSON forms.
# (A Binance listenKey grants read access to the account's user-data stream.)
_SECRET_PAIR_RE = re.compile(
    r"""(?ix)
    ((?<![a-z0-9])(?:x-mbx-apikey|api[_-]?key|apikey|api[_-]?secret|secret|signature|password|passphrase|
          private[_-]?key|listen[_-]?key|access[_-]?token|token)
       ['"]?\s*[:=]\s*['"]?)
    (?!\*\*\*)                 # already masked
    [^'"\s,;&}\])]+
    """
)
# The marker by which configure_logging recognises the handler it installed earlier.
_HANDLER_NAME = "ritmo"
_LEADING_KEYS = ("timestamp", "level", "event", "logger")
# syslog priorities (sd-daemon(3)) of the standard library's levels, highest level first.
_SYSLOG_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_SYSLOG_DEBUG = 7


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG (and below) 7."""
    for threshold, priority in _SYSLOG_PRIORITIES:
        if levelno >= threshold:
            return priority
    return _SYSLOG_DEBUG


def is_journal_stream(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` is connected to journald: its file's device and inode are the ones in $JOURNAL_STREAM.

    systemd sets JOURNAL_STREAM for a service whose stdout or stderr goes to the journal; a child whose
    output was redirected elsewhere inherits the variable, hence the comparison with the descriptor itself.
    """
    raw = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = raw.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no descriptor (StringIO), closed, detached
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def journal_prefix(stream: TextIO, levelno: int) -> str:
    """`<N>` for a line of this level written to `stream` when it is the journal, else ""."""
    return f"<{syslog_priority(levelno)}>" if is_journal_stream(stream) else ""


class _JournalPriorityFormatter(structlog.stdlib.ProcessorFormatter):
    """ProcessorFormatter that starts every output line with the record's `<N>` syslog priority.

    Every line, not only the first: a console-rendered traceback spans several lines and journald stores
    each line as an entry of its own.
    """

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class Redactor:
    """Masks known secret values and common credential patterns in strings and event dicts."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        variants: set[str] = set()
        for secret in secrets:
            if not secret or len(secret) < _MIN_SECRET_LEN:
                continue
            # The URL-encoded form too: a secret may travel in a query string.
            variants.update({secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)})
        # Longest first, so a secret containing another is masked whole.
        ordered = sorted(variants, key=len, reverse=True)
        self._secrets_re = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def text(self, value: str) -> str:
        """Mask secrets and credential patterns inside one string."""
        if self._secrets_re is not None:
            value = self._secrets_re.sub(MASK, value)
        return _SECRET_PAIR_RE.sub(lambda m: m.group(1) + MASK, value)

    def value(self, value: Any, key: str = "") -> Any:
        """Mask a field value: secret-named fields wholly, containers recursively, strings by content."""
        if key and _SECRET_FIELD_RE.match(key) and value not in (None, ""):
            return MASK
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v) for v in value]
        # Other objects are rendered (repr/str) later and caught by the pass over the final line.
        return value

    def event_dict(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        """structlog processor: redact every field except the record plumbing and exc_info tuples."""
        return {k: (v if k.startswith("_") or k == "exc_info" else self.value(v, k)) for k, v in event_dict.items()}

    def rendered(self, logger: WrappedLogger, method_name: str, line: Any) -> Any:
        """structlog processor placed after the renderer: redact the final line."""
        return self.text(line) if isinstance(line, str) else line


class _NoDebugFilter(logging.Filter):
    """Drops DEBUG records of ccxt even if someone lowers its logger's level after configure_logging."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            return True
        return not any(record.name == n or record.name.startswith(n + ".") for n in _NEVER_DEBUG_LOGGERS)


def _lead_with_standard_keys(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Put timestamp, level, event and logger first, so `journalctl -o cat` lines read left to right."""
    lead = {k: event_dict[k] for k in _LEADING_KEYS if k in event_dict}
    return {**lead, **{k: v for k, v in event_dict.items() if k not in lead}}


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def configure_logging(
    fmt: str = "auto", level: str = "INFO", stream: TextIO | None = None, secrets: Iterable[str] = ()
) -> None:
    """Set up structlog and the standard library's logging; safe to call again (it replaces itself)."""
    stream = sys.stdout if stream is None else stream
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r}: expected auto, json or console")
    if fmt == "auto":
        fmt = "console" if _is_tty(stream) else "json"
    level_no = logging.getLevelName(level.upper())
    if not isinstance(level_no, int):
        raise ValueError(f"unknown log level {level!r}")
    redactor = Redactor(secrets)

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # Runs on records from plain `logging` loggers (ccxt, apscheduler, urllib3) before rendering.
    foreign_pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        timestamper,
    ]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        ordering: list[Processor] = [_lead_with_standard_keys]
    else:
        # No colours when console output is forced into a pipe or journald.
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(stream))
        ordering = []  # ConsoleRenderer lays out timestamp, level and event itself
    # Decided once here: systemd does not move a running service's output to or from the journal.
    formatter_class = _JournalPriorityFormatter if is_journal_stream(stream) else structlog.stdlib.ProcessorFormatter
    formatter = formatter_class(
        foreign_pre_chain=foreign_pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Render the traceback to text first so that the redactor sees the exception's message.
            structlog.processors.format_exc_info,
            redactor.event_dict,
            *ordering,
            renderer,
            redactor.rendered,
        ],
    )

    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    handler.addFilter(_NoDebugFilter())

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_no)
    for name in _NEVER_DEBUG_LOGGERS:
        logging.getLogger(name).setLevel(max(level_no, logging.INFO))

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.PositionalArgumentsFormatter(),
            timestamper,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Off so that calling configure_logging again (tests, the CLI after reading settings) takes
        # effect on loggers already created at import time; one line per 5-minute tick costs nothing.
        cache_logger_on_first_use=False,
    )
