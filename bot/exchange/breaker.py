"""The circuit breaker that pauses trading after repeated exchange failures: pure state logic (the caller reports
outcomes; it makes no exchange call), error texts redacted as the client redacts them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import structlog

from bot.clock import wall_ms
from bot.exchange.client import redact

log = structlog.get_logger(__name__)


class CircuitBreaker:
    """Pauses trading after `threshold` consecutive exchange failures; half-opens after `cooldown_ms`.

    closed -> (threshold failures in a row) -> open: trading paused (`is_open`) -> (cooldown passed) ->
    half_open: the next call is a trial -> success closes it, a failure re-opens it for another cooldown.
    Pure logic: the caller reports outcomes with record_success/record_failure (temporary exchange errors;
    an order the exchange refused is an answer, not a failure) and `clock` returns epoch ms.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __init__(
        self,
        threshold: int = 5,
        cooldown_ms: int = 5 * 60_000,
        *,
        clock: Callable[[], int] = wall_ms,
        secrets: Iterable[str] = (),
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be >= 1")
        if cooldown_ms < 0:
            raise ValueError("cooldown_ms must be >= 0")
        self.threshold = int(threshold)
        self.cooldown_ms = int(cooldown_ms)
        self._clock = clock
        self._secrets = tuple(secrets)
        self._state = self.CLOSED
        self._since_ms: int | None = None
        self._failures = 0
        self._trips = 0
        self._last_error: str | None = None

    def _refresh(self) -> str:
        """The state at the clock's now: an open breaker whose cooldown has passed is half-open."""
        now = self._clock()
        if self._state == self.OPEN and self._since_ms is not None and now - self._since_ms >= self.cooldown_ms:
            self._state = self.HALF_OPEN
            # The moment the cooldown ended, not the moment someone looked.
            self._since_ms += self.cooldown_ms
            log.info("circuit_half_open", failures=self._failures)
        return self._state

    @property
    def is_open(self) -> bool:
        """True while trading is paused (open and cooling down); a half-open breaker lets a trial through."""
        return self._refresh() == self.OPEN

    def record_success(self) -> None:
        """The exchange answered: closes a half-open (or open) breaker and resets the failure count."""
        state = self._refresh()
        if state != self.CLOSED:
            now = self._clock()
            log.info("circuit_closed", after_failures=self._failures, was=state)
            self._state = self.CLOSED
            self._since_ms = now
        self._failures = 0

    def record_failure(self, error: BaseException | str) -> None:
        """One more consecutive exchange failure: opens the breaker at the threshold, or again when half-open."""
        state = self._refresh()
        self._failures += 1
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self._last_error = redact(text, self._secrets)
        if state == self.HALF_OPEN or (state == self.CLOSED and self._failures >= self.threshold):
            self._state = self.OPEN
            self._since_ms = self._clock()
            self._trips += 1
            log.warning(
                "circuit_open",
                failures=self._failures,
                cooldown_s=self.cooldown_ms / 1000,
                was=state,
                last_error=self._last_error,
            )

    def state(self) -> dict[str, Any]:
        """JSON-able state for `ritmo status`: state, is_open, failures, since_ms, last_error, ..."""
        state = self._refresh()
        return {
            "state": state,
            "is_open": state == self.OPEN,
            "failures": self._failures,
            "threshold": self.threshold,
            "since_ms": self._since_ms,
            "half_opens_at_ms": (
                self._since_ms + self.cooldown_ms if state == self.OPEN and self._since_ms is not None else None
            ),
            "trips": self._trips,
            "last_error": self._last_error,
        }
