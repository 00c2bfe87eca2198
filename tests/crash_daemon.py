"""`ritmo` with a SIGKILL planted at one point, for the crash-consistency test (run as a script).

CRASH_KILL_AT names the point; the process appends the point's name to CRASH_KILL_LOG (fsynced)
and sends itself SIGKILL there. Nothing is cleaned up: no finally block, no atexit, no flushed buffer.

Points:
  after_intent_commit   the order intent is durable, `sent` is not yet (LiveBroker's first commit)
  after_sent_commit     `sent` is durable, the order request has not left the process
  after_order_executed  the exchange executed the order and answered; nothing of the answer is recorded
  after_fill_recorded   the fill row is written in the tick's transaction, not committed
  after_tick_commit     the tick committed, before its log line and the online update
  sql:N                 before the N-th SQL statement of the process (anywhere: start, reconcile, tick)
  http:N / http_after:N before / after the N-th HTTP request to the exchange
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def die(point: str) -> None:
    """Record the point, then SIGKILL this process."""
    fd = os.open(os.environ["CRASH_KILL_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, (point + "\n").encode())
    os.fsync(fd)
    os.kill(os.getpid(), signal.SIGKILL)


class _KillingConnection:
    """An sqlite3 connection proxy that dies before its N-th statement."""

    def __init__(self, conn: sqlite3.Connection, point: str, at: int) -> None:
        self._conn, self._point, self._at, self._n = conn, point, at, 0

    def _count(self) -> None:
        self._n += 1
        if self._n == self._at:
            die(self._point)

    def execute(self, *args: Any) -> Any:
        self._count()
        return self._conn.execute(*args)

    def executemany(self, *args: Any) -> Any:
        self._count()
        return self._conn.executemany(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def install(point: str) -> None:
    """Plant the kill at `point`."""
    if not point:
        return
    import bot.daemon.state as state
    import bot.daemon.tick as daemon
    from bot.exchange.client import ExchangeClient

    if point == "after_intent_commit":
        set_status = state.StateStore.set_order_status

        def set_order_status(self: Any, coid: str, status: str, detail: str | None = None) -> None:
            if status == "sent":
                die(point)
            set_status(self, coid, status, detail)

        state.StateStore.set_order_status = set_order_status  # type: ignore[method-assign]
    elif point in ("after_sent_commit", "after_order_executed"):
        create = ExchangeClient.create_market_order

        def create_market_order(self: ExchangeClient, *args: Any, **kwargs: Any) -> Any:
            if point == "after_sent_commit":
                die(point)
            order = create(self, *args, **kwargs)
            die(point)
            return order

        ExchangeClient.create_market_order = create_market_order  # type: ignore[method-assign]
    elif point == "after_fill_recorded":
        insert_fill = state.StateStore.insert_fill

        def insert(self: Any, *args: Any, **kwargs: Any) -> None:
            insert_fill(self, *args, **kwargs)
            die(point)

        state.StateStore.insert_fill = insert  # type: ignore[method-assign]
    elif point == "after_tick_commit":
        daemon.Daemon._log_tick = lambda self, outcome: die(point)  # type: ignore[method-assign]
    elif point.startswith("sql:"):
        at = int(point.split(":")[1])
        connect = state._connect

        def killing_connect(path: Path, **kwargs: Any) -> Any:
            return _KillingConnection(connect(path, **kwargs), point, at)

        state._connect = killing_connect
    elif point.startswith(("http:", "http_after:")):
        import ccxt

        at = int(point.split(":")[1])
        after = point.startswith("http_after:")
        fetch = ccxt.Exchange.fetch
        calls = {"n": 0}

        def counting_fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == at and not after:
                die(point)
            out = fetch(self, *args, **kwargs)
            if calls["n"] == at:
                die(point)
            return out

        ccxt.Exchange.fetch = counting_fetch
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    install(os.environ.get("CRASH_KILL_AT", ""))
    from bot.cli import main

    raise SystemExit(main(sys.argv[1:]))
