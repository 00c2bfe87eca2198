"""The outbox sender: delivers the notifications the daemon wrote into the state's `outbox` table (docs/design.md §13).

The daemon never talks to a notification service: a tick writes an outbox row in its own transaction (so a
notification exists exactly when what it reports was committed) and this sender, a daemon thread with its
own SQLite connection, sends due `pending` rows through Apprise (Telegram, Discord, Slack, ntfy, e-mail,
webhooks: RITMO_NOTIFY_URLS) after the commit. A slow or dead service delays nothing but its own messages.

One send: a short transaction claims the row (attempts + 1, next attempt pushed back by the backoff), the
network call runs with no transaction open, and a second short transaction marks it `sent`, or leaves it
`pending` with the error for its next attempt, or marks it `failed` once given up. Claiming first means a
crash mid-send is counted and retried after the backoff: delivery is at least once (a crash between the
service's answer and the `sent` mark repeats that one message).

Timeouts: every Apprise call has a deadline for the whole call (`notify(timeout=send_timeout_s)`, which stops
waiting for a service that hangs; Apprise's own per-request socket timeouts, `cto`/`rto` URL arguments, 4 s
each by default, bound the HTTP plugins underneath), so a hanging service cannot block the sender for longer.

Retries: the backoff starts at `backoff_s` (10 s) and doubles per attempt up to `backoff_max_s` (1 h); a
notification is given up (`failed`, logged at error) after `max_attempts` (30) attempts or once it is
`max_age_s` (24 h) old, whichever comes first. Rows survive restarts: a new sender sends what is pending.

Secrets: the URLs are never logged nor stored; `last_error` holds Apprise's status or an exception's type
only (the dashboard serves it). Apprise's own logger ("apprise") goes through ritmo's redacting handler.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from bot.clock import wall_ms
from bot.daemon.alerts import message_for
from bot.daemon.state import open_state_for_update
from strategies.candles import iso_utc

log = structlog.get_logger(__name__)

# Retry schedule and give-up limits (documented above and in docs/design.md §13).
BACKOFF_S = 10.0
BACKOFF_MAX_S = 3600.0
MAX_ATTEMPTS = 30
MAX_AGE_S = 24 * 3600.0
SEND_TIMEOUT_S = 20.0
POLL_S = 2.0


class Notifier:
    """Sends one message to every configured Apprise URL; True when all accepted it (the seam tests replace)."""

    def __init__(self, urls: Sequence[str]) -> None:
        import apprise

        self._apprise = apprise.Apprise()
        for index, url in enumerate(urls):
            # Apprise logs why a URL is unusable (redacted by our handler); the URL itself is never logged here.
            if not self._apprise.add(url):
                log.error("notification_url_invalid", index=index)
        self.count = len(self._apprise)

    def send(self, title: str, body: str, level: str, timeout_s: float) -> tuple[bool, str | None]:
        """Deliver within timeout_s; (ok, error) where error names Apprise's status, never a URL."""
        if self.count == 0:
            return False, "no usable notification URL"
        result = self._apprise.notify(body=body, title=title, notify_type=level, timeout=max(timeout_s, 0.001))
        if bool(result):
            return True, None
        status = getattr(getattr(result, "status", None), "name", None) or "FAILURE"
        return False, f"apprise: {status.lower()}"


class OutboxSender:
    """Background delivery of the outbox's pending notifications, with retries (see the module docstring)."""

    def __init__(
        self,
        db_path: str | Path,
        urls: Sequence[str],
        *,
        poll_s: float = POLL_S,
        send_timeout_s: float = SEND_TIMEOUT_S,
        backoff_s: float = BACKOFF_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        max_attempts: int = MAX_ATTEMPTS,
        max_age_s: float = MAX_AGE_S,
        batch: int = 20,
        clock: Callable[[], int] = wall_ms,
        notifier: Notifier | None = None,
    ) -> None:
        self.db_path = Path(db_path)
        self.poll_s = float(poll_s)
        self.send_timeout_s = float(send_timeout_s)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_attempts = int(max_attempts)
        self.max_age_s = float(max_age_s)
        self.batch = int(batch)
        self._clock = clock
        self._notifier = notifier if notifier is not None else Notifier(urls)
        # Its own connection (the daemon's belongs to the tick). Losing a `sent` mark to a power cut resends one
        # message (at least once): synchronous NORMAL is enough.
        self.store = open_state_for_update(self.db_path, durable=False)
        """The sender's own view of the state (its connection is used by one thread at a time)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> OutboxSender:
        """Start the sender thread (it sends whatever is already pending: nothing is lost across restarts)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ritmo-outbox", daemon=True)
            self._thread.start()
        return self

    def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Stop the thread, then send once more what is due, all within flush_timeout_s (never longer)."""
        deadline = time.monotonic() + max(flush_timeout_s, 0.0)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 0.0))
            if self._thread.is_alive():
                # Stuck in a send that its own timeout will end: its connection stays with it; rows stay pending.
                log.warning("notification_sender_busy", action="pending notifications are sent at the next start")
                return
        if deadline - time.monotonic() > 0.01:
            try:
                self.send_due(deadline=deadline)
            except sqlite3.Error as exc:
                log.warning("notification_flush_failed", error=type(exc).__name__)
        self.store.conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_due(stop_early=True)
            except Exception as exc:  # the sender must outlive a locked database or a plugin's bug
                log.error("notification_sender_error", error=type(exc).__name__)
            self._stop.wait(self.poll_s)

    # --- sending --------------------------------------------------------------------------------

    def send_due(self, *, deadline: float | None = None, stop_early: bool = False) -> int:
        """Send the due pending rows (oldest first) until none is due or the monotonic deadline; the number sent."""
        sent = 0
        while True:
            rows = self.store.due_notifications(self._clock(), self.batch)
            if not rows:
                return sent
            for row in rows:
                if (stop_early and self._stop.is_set()) or (deadline is not None and time.monotonic() >= deadline):
                    return sent
                sent += int(self._send_one(row, deadline))

    def _send_one(self, row: dict[str, Any], deadline: float | None) -> bool:
        """Claim, send (no transaction open), record the outcome; True when it was delivered."""
        store, now = self.store, self._clock()
        outbox_id = int(row["id"])
        retry_at = now + self._backoff_ms(int(row["attempts"]) + 1)
        with store.transaction():
            attempts = store.claim_notification(outbox_id, now, retry_at)
        if attempts is None:
            return False
        timeout_s = self.send_timeout_s
        if deadline is not None:
            timeout_s = min(timeout_s, deadline - time.monotonic())
        try:
            ok, error = self._notifier.send(row["title"], row["body"], row["level"], timeout_s)
        except Exception as exc:  # a plugin raising must not kill the sender; its message might hold a URL
            ok, error = False, f"error: {type(exc).__name__}"
        done_ms = self._clock()
        fields = {"id": outbox_id, "kind": row["kind"], "attempts": attempts}
        with store.transaction():
            if ok:
                store.finish_notification(outbox_id, "sent", done_ms)
            elif attempts >= self.max_attempts or done_ms - int(row["created_at_ms"]) >= self.max_age_s * 1000:
                store.finish_notification(outbox_id, "failed", done_ms, error)
            else:
                store.finish_notification(outbox_id, "pending", done_ms, error)
        if ok:
            log.info("notification_sent", **fields)
        elif attempts >= self.max_attempts or done_ms - int(row["created_at_ms"]) >= self.max_age_s * 1000:
            log.error("notification_failed", **fields, error=error, action="given up")
        else:
            log.warning("notification_retry", **fields, error=error, next_retry=iso_utc(retry_at))
        return ok

    def _backoff_ms(self, attempt: int) -> int:
        """Wait after attempt n (1-based): backoff_s * 2^(n-1), capped at backoff_max_s."""
        return int(1000 * min(self.backoff_s * 2 ** min(attempt - 1, 30), self.backoff_max_s))


def notify_auth_failure(settings: Any, error: str, *, exit_code: int = 77, deadline_s: float = 5.0) -> bool:
    """Tell the operator that start-up failed authentication (exit 77): recorded in the state's outbox when the
    state exists (an `auth_failure` event), then sent within deadline_s; True when delivered. Never raises."""
    from bot.settings import state_db_path

    urls = tuple(getattr(settings, "notify_urls", ()) or ())
    if not urls or settings.mode == "replay":
        return False
    context = {"mode": settings.mode, "symbol": settings.symbol}
    detail = {"error": error, "exit_code": exit_code}
    message = message_for("auth_failure", detail, context)
    assert message is not None
    title, body, level = message
    try:
        path = state_db_path(settings)
        if not path.is_file():
            # No state to keep it in: one direct attempt.
            ok, _ = Notifier(urls).send(title, body, level, deadline_s)
            return ok
        store = open_state_for_update(path)
        try:
            with store.transaction():
                store.add_event("auth_failure", detail)
                store.enqueue_notification("auth_failure", title, body, level)
        finally:
            store.conn.close()
        sender = OutboxSender(path, urls, send_timeout_s=deadline_s)
        try:
            sender.send_due(deadline=time.monotonic() + deadline_s)
            row = sender.store.conn.execute(
                "SELECT status FROM outbox WHERE kind = 'auth_failure' ORDER BY id DESC LIMIT 1"
            ).fetchone()
        finally:
            sender.stop(0.0)
        return row is not None and row[0] == "sent"
    except Exception as exc:  # the exit code is what matters; the notification is best effort
        log.warning("notification_failed", kind="auth_failure", error=type(exc).__name__)
        return False


__all__ = ["Notifier", "OutboxSender", "notify_auth_failure"]
