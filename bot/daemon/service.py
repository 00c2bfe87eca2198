"""Running an assembled daemon: the replay's tick loop, the scheduler's (a tick a few seconds after every
5-minute close), the stop signals and systemd's watchdog (docs/design.md §8).

Threads and signals: the tick runs in the scheduler's single worker thread, which blocks SIGTERM/SIGINT so
the kernel delivers them to the main thread. The handler (main thread) sets the stop flag and calls
`scheduler.shutdown(wait=False)`; `start()` then returns in the main thread, which waits for the tick in
flight (the tick lock) before the caller closes the state. A tick that fails is logged (`tick_failed`) and
retried at the next candle; three failures in a row, or an authentication error (exit 77), stop the daemon
so systemd can restart it or a human can look.

Start-up (docs/design.md §8): until the first tick, a stop signal raises `StartInterrupted` in the main thread
wherever start-up is (importing, loading the model, a request in flight, a wait): start-up has nothing to
finish. `StartWaiter` rides out an unreachable exchange at start: capped exponential backoff, `start_waiting`
logged, READY=1 (once) and STATUS= sent to systemd, the watchdog fed while it sleeps.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from bot import notify
from bot.errors import AuthenticationExchangeError, RitmoError, TemporaryExchangeError
from bot.settings import Settings
from strategies.candles import CANDLE_MS

if TYPE_CHECKING:
    from bot.daemon.market import SimClock
    from bot.daemon.tick import Daemon

log = structlog.get_logger(__name__)

# Consecutive failed ticks after which the daemon stops (exit 1; systemd restarts it after RestartSec).
MAX_TICK_FAILURES = 3


# A replay pings systemd's watchdog at most this often (its ticks run hundreds of times a second).
REPLAY_WATCHDOG_EVERY_S = 1.0

# Waiting for an unreachable exchange at start: 5 s, 10 s, 20 s ... at most 5 minutes between attempts.
# Each attempt is itself a read retried a few times (bot/exchange/client.py), so the exchange is not hammered.
START_RETRY_FIRST_S = 5.0
START_RETRY_MAX_S = 300.0
# Longest sleep between two watchdog pings while waiting when $WATCHDOG_USEC is not set (not under systemd).
START_WAIT_SLICE_S = 30.0

T = TypeVar("T")


class StartInterrupted(BaseException):
    """A stop signal arrived during start-up (raised in the main thread by the signal handler).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it. `waiting`
    says whether the daemon had announced itself (READY=1) while waiting for the exchange.
    """

    def __init__(self, signum: int, waiting: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.waiting = waiting


class StopSignal:
    """SIGTERM/SIGINT -> a stop flag (and a callback run in the main thread, e.g. the scheduler's shutdown)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self.on_stop: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}

    def install(self, *, interrupt_start: bool = False) -> StopSignal:
        """Install the handlers (main thread only); `interrupt_start`: a signal raises StartInterrupted until
        `started()` is called."""
        if interrupt_start:
            self.on_stop = self._interrupt
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def started(self) -> None:
        """Start-up is over: from now on a signal only sets the flag (and runs `on_stop`), so a tick finishes."""
        if self.on_stop != self._interrupt:
            return
        self.on_stop = None
        if self.is_set():
            # The handler ran but its exception was lost (raised inside a `finally` or a library's except
            # clause): still a stop during start-up.
            assert self.signum is not None
            raise StartInterrupted(self.signum)

    def _interrupt(self) -> None:
        assert self.signum is not None
        raise StartInterrupted(self.signum)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        # Runs in the main thread between two bytecodes: only set flags and call the callback.
        self.signum = signum
        self.event.set()
        if self.on_stop is not None:
            self.on_stop()

    def is_set(self) -> bool:
        """Whether a stop was requested."""
        return self.event.is_set()


def _block_stop_signals() -> None:
    """Worker-thread initializer: leave SIGTERM/SIGINT to the main thread (which handles them at once)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})


def _request_stop_from_worker() -> None:
    """Stop the daemon from a worker thread: the process signal is delivered to (and handled by) the main thread."""
    os.kill(os.getpid(), signal.SIGTERM)


def make_trigger(settings: Settings) -> Any:
    """Cron trigger a few seconds after every 5-minute close, in UTC."""
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger(minute="*/5", second=settings.tick_delay_s, timezone=UTC)


def make_scheduler(settings: Settings) -> Any:
    """BlockingScheduler in UTC, one worker thread that leaves the stop signals to the main thread."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.blocking import BlockingScheduler

    executor = ThreadPoolExecutor(1, pool_kwargs={"initializer": _block_stop_signals})
    return BlockingScheduler(
        timezone=UTC,
        executors={"default": executor},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": settings.misfire_grace_s},
    )


def run_scheduled(
    settings: Settings,
    daemon: Daemon,
    clock: Any,
    stop: StopSignal,
    trigger: Any | None,
    local_ms: Callable[[], int],
) -> int:
    scheduler = make_scheduler(settings)
    tick_lock = threading.Lock()
    state = {"failures": 0, "exit_code": 0}

    def job() -> None:
        with tick_lock:
            if stop.is_set():
                return
            try:
                outcome = daemon.tick(_tick_now(clock, local_ms))
                state["failures"] = 0
            except AuthenticationExchangeError as exc:
                log.error("tick_failed", error=str(exc), action="stopping: check the API key and its permissions")
                state["exit_code"] = exc.exit_code
                _request_stop_from_worker()
                return
            except Exception as exc:
                state["failures"] += 1
                log.exception("tick_failed", error=str(exc), consecutive=state["failures"])
                if state["failures"] >= MAX_TICK_FAILURES:
                    state["exit_code"] = exc.exit_code if isinstance(exc, RitmoError) else 1
                    _request_stop_from_worker()
                return
            notify.notify_watchdog()
            if outcome is not None:
                notify.notify_status(daemon.status_line(outcome))

    def check_stop_at_start() -> None:
        # A signal that arrived between installing the handler and start() found no scheduler to shut down.
        if stop.is_set():
            _request_stop_from_worker()

    def shutdown() -> None:
        from apscheduler.schedulers import SchedulerNotRunningError

        with contextlib.suppress(SchedulerNotRunningError):
            scheduler.shutdown(wait=False)

    scheduler.add_job(
        job,
        trigger or make_trigger(settings),
        id="tick",
        coalesce=True,
        max_instances=1,
        misfire_grace_time=settings.misfire_grace_s,
    )
    scheduler.add_job(check_stop_at_start, id="check_stop")
    stop.on_stop = shutdown
    if not stop.is_set():
        log.info("scheduler_start", tick_delay_s=settings.tick_delay_s, misfire_grace_s=settings.misfire_grace_s)
        scheduler.start()
    # Back in the main thread: let the tick in flight finish (and its state commit) before leaving.
    with tick_lock:
        pass
    return int(state["exit_code"])


def _tick_now(clock: Any, local_ms: Callable[[], int]) -> int:
    """Exchange time for a scheduled tick; waits briefly if the exchange's clock is behind the local boundary."""
    now = clock.now_ms()
    boundary = (local_ms() // CANDLE_MS) * CANDLE_MS
    behind_ms = boundary + 1000 - now
    if 0 < behind_ms <= 60_000:
        # The local clock says the candle closed but the exchange's does not yet: wait for the exchange.
        clock.sleep(behind_ms / 1000)
        now = clock.now_ms()
    return now


def single_threaded_torch() -> None:
    """One intra-op thread for torch in the daemon.

    Its work is one 1-row forward per tick and one 288-row update per day: too small to split, and torch's
    OpenMP workers spin between ops, fighting the feature code (numpy/pandas) for the cores. Measured on 2
    busy cores: a 1-row forward took ~33 ms with 2 threads and ~0.9 ms with 1.
    """
    import torch

    torch.set_num_threads(1)


def replay_ticks(
    daemon: Daemon, clock: SimClock, start_ms: int, to_ms: int, speed: float | None, stop: StopSignal
) -> tuple[int, int]:
    """Tick at start_ms, +5 min, ... up to to_ms (exclusive) on the simulated clock, until a stop is asked;
    `speed` slows it to that multiple of real time. Returns (ticks done, the time of the next tick)."""
    ticks, now = 0, start_ms
    last_ping = -math.inf
    while now < to_ms and not stop.is_set():
        clock.set(now)
        daemon.tick(now)
        ticks += 1
        # Hundreds of ticks a second: ping the watchdog at most once a second, not per tick.
        if time.monotonic() - last_ping >= REPLAY_WATCHDOG_EVERY_S:
            notify.notify_watchdog()
            last_ping = time.monotonic()
        now += CANDLE_MS
        if speed is not None:
            time.sleep(CANDLE_MS / 1000 / speed)
    return ticks, now


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """systemd's watchdog interval ($WATCHDOG_USEC, set when WatchdogSec= is on and meant for this process)."""
    environ = os.environ if env is None else env
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class StartWaiter:
    """Runs the start-up steps that need the exchange, waiting out an unreachable one (docs/design.md §8).

    `call(step, phase)` returns step()'s value; a TemporaryExchangeError (network, DNS, timeouts, 5xx, rate
    limits) is logged as `start_waiting` and retried after 5 s, 10 s, 20 s ... capped at 5 minutes. On the first
    wait the daemon tells systemd READY=1 (so `systemctl start`, deploy tools and boot are not held for as long
    as the network is down, and the unit's TimeoutStartSec never fires on a patient wait) and from then on a
    STATUS= line per attempt; it sleeps in slices of at most half the watchdog interval and pings WATCHDOG=1
    after each. Any other error propagates at once: configuration (78), authentication (77), operational (1).
    A stop signal while waiting raises StartInterrupted(waiting=True): the caller exits 0.
    """

    def __init__(
        self,
        *,
        first_s: float | None = None,
        max_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        env: Mapping[str, str] | None = None,
    ) -> None:
        # Module constants read at call time, so a test can shorten them.
        self.first_s = START_RETRY_FIRST_S if first_s is None else first_s
        self.max_s = START_RETRY_MAX_S if max_s is None else max_s
        self._sleep = sleep
        self._monotonic = monotonic
        watchdog_s = watchdog_interval_s(env)
        self.slice_s = START_WAIT_SLICE_S if watchdog_s is None else min(START_WAIT_SLICE_S, watchdog_s / 2)
        self.attempts = 0
        self.waited = False

    def delay_s(self, failures: int) -> float:
        """The wait after the n-th failed attempt in a row (n >= 1): first_s doubled each time, at most max_s."""
        return min(self.max_s, self.first_s * 2 ** min(failures - 1, 30))

    def call(self, step: Callable[[], T], phase: str) -> T:
        """step(), retried while the exchange is unreachable."""
        failures = 0
        while True:
            self.attempts += 1
            try:
                return self._guarded(step)
            except TemporaryExchangeError as exc:
                failures += 1
                self._wait(phase, failures, exc)

    def _guarded(self, step: Callable[[], T]) -> T:
        try:
            return step()
        except StartInterrupted as exc:
            raise StartInterrupted(exc.signum, waiting=self.waited) from None

    def _wait(self, phase: str, failures: int, exc: TemporaryExchangeError) -> None:
        delay = self.delay_s(failures)
        log.warning("start_waiting", phase=phase, attempt=failures, retry_in_s=delay, error=str(exc))
        if not self.waited:
            # Up, though not warm: see the class docstring and the unit's comment on TimeoutStartSec.
            self.waited = True
            notify.notify_ready()
        notify.notify_status(
            f"waiting for the exchange ({phase}): attempt {failures} failed, next in {delay:g} s: {exc}"
        )
        notify.notify_watchdog()
        deadline = self._monotonic() + delay
        while (left := deadline - self._monotonic()) > 0:
            self._guarded(lambda: self._sleep(min(left, self.slice_s)))
            notify.notify_watchdog()


def announce_ready() -> None:
    """Start-up is over: freeze what it allocated out of the garbage collector's reach, then READY=1.

    The modules, the model and the warm buffer are hundreds of thousands of long-lived objects; without the
    freeze every full collection walks them all and stalls the tick it lands on (measured ~120 ms on 2 cores,
    against a p99 tick of ~8 ms).
    """
    gc.freeze()
    notify.notify_ready()
