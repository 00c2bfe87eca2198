"""journald priorities: a line written to the journal starts with its `<N>` syslog priority, any other never does.

systemd tells a service that its stdout goes to the journal by setting $JOURNAL_STREAM to the stream's
"DEVICE:INODE"; with its default `SyslogLevelPrefix=yes` the journal strips a leading `<N>` and stores the line
at priority N. These tests run real processes whose stdout (or stderr) is a file and set $JOURNAL_STREAM to
that file's device and inode, exactly what systemd's check sees; no journald is needed (none runs here).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PREFIX_RE = re.compile(r"^<(\d)>")

EMIT = """
import logging, sys
import structlog
from bot.logs import configure_logging
configure_logging(fmt=sys.argv[1], level="DEBUG")
log = structlog.get_logger("bot.test")
log.debug("our_debug")
log.info("our_info", n=1)
log.warning("our_warning", reason="a <4> inside a value")
log.error("our_error")
log.critical("our_critical")
logging.getLogger("apscheduler.scheduler").info("Scheduler started")
logging.getLogger("ccxt.base.exchange").warning("exchange said %s", "slow down")
logging.getLogger("urllib3.connectionpool").error("connection refused")
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("tick_failed")
"""
# event -> syslog priority (sd-daemon(3)): DEBUG 7, INFO 6, WARNING 4, ERROR 3, CRITICAL 2
EXPECTED = {
    "our_debug": 7,
    "our_info": 6,
    "our_warning": 4,
    "our_error": 3,
    "our_critical": 2,
    "Scheduler started": 6,
    "exchange said slow down": 4,
    "connection refused": 3,
    "tick_failed": 3,
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RITMO_") and k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _journal_stream_of(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def _emit(tmp_path: Path, fmt: str, journal_stream: str | None) -> list[str]:
    """Run EMIT with stdout redirected to a file; $JOURNAL_STREAM set to `journal_stream` ("self": that file)."""
    out = tmp_path / f"stdout-{fmt}.txt"
    out.touch()
    extra = {} if journal_stream is None else {"JOURNAL_STREAM": _journal_stream_of(out)}
    if journal_stream not in (None, "self"):
        extra["JOURNAL_STREAM"] = journal_stream
    with out.open("w") as fh:
        subprocess.run(
            [sys.executable, "-c", EMIT, fmt], env=_env(**extra), stdout=fh, stderr=subprocess.PIPE, check=True
        )
    return out.read_text().splitlines()


def test_json_lines_carry_their_priority_to_the_journal(tmp_path: Path) -> None:
    lines = _emit(tmp_path, "json", "self")
    assert len(lines) == len(EXPECTED)
    seen = {}
    for line in lines:
        match = PREFIX_RE.match(line)
        assert match, line
        record = json.loads(line[match.end() :])  # the JSON stays valid once systemd strips the prefix
        seen[record["event"]] = int(match.group(1))
    assert seen == EXPECTED
    # Only the line's start is touched: a "<4>" inside a value is the value's.
    warning = next(json.loads(line[3:]) for line in lines if "our_warning" in line)
    assert warning["reason"] == "a <4> inside a value"


def test_console_lines_all_carry_the_priority(tmp_path: Path) -> None:
    """A console-rendered traceback spans lines, and journald stores each as an entry: each gets the prefix."""
    lines = _emit(tmp_path, "console", "self")
    assert len(lines) > len(EXPECTED)  # the traceback's lines
    assert all(PREFIX_RE.match(line) for line in lines), lines
    traceback_lines = [line for line in lines if "RuntimeError" in line or "Traceback" in line]
    assert traceback_lines and all(line.startswith("<3>") for line in traceback_lines)


@pytest.mark.parametrize("journal_stream", [None, "1:2", "garbage", "other"])
def test_no_prefix_unless_the_stream_is_the_journal(tmp_path: Path, journal_stream: str | None) -> None:
    """Without $JOURNAL_STREAM, or naming another file (a child whose output was redirected), no prefix."""
    if journal_stream == "other":
        other = tmp_path / "other"
        other.touch()
        journal_stream = _journal_stream_of(other)
    lines = _emit(tmp_path, "json", journal_stream)
    assert len(lines) == len(EXPECTED)
    for line in lines:
        assert not PREFIX_RE.match(line), line
        json.loads(line)


def test_the_fatal_error_line_is_an_error_in_the_journal(tmp_path: Path) -> None:
    """`ritmo run: error: ...` on stderr is stored at priority err, so `journalctl -p warning` shows why it stopped."""
    err = tmp_path / "stderr.txt"
    err.touch()
    with err.open("w") as fh:
        done = subprocess.run(
            [sys.executable, "-m", "bot", "run", "--once"],
            env=_env(RITMO_MODE="bogus", JOURNAL_STREAM=_journal_stream_of(err)),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=fh,
            text=True,
            check=False,
        )
    assert done.returncode == 78
    assert err.read_text().splitlines() == [
        "<3>ritmo run: error: RITMO_MODE='bogus' is invalid: expected one of paper, live, replay"
    ]
    # The same run on a terminal-like stream (no $JOURNAL_STREAM) has no prefix.
    done = subprocess.run(
        [sys.executable, "-m", "bot", "run", "--once"],
        env=_env(RITMO_MODE="bogus"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stderr.startswith("ritmo run: error: RITMO_MODE")
