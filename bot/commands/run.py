"""`ritmo run`: the daemon process (paper or live trading on the exchange's data, `--once`, or `--replay FILE`).

Start-up: settings (a bad one exits 78 with one line) -> logging with the secrets to mask -> state database
(locked: one daemon per state) -> model (the newest online checkpoint the state references, else
RITMO_CHECKPOINT; the position mode must match RITMO_POSITION_MODE when set) -> warm-up (>= 1265 closed
candles, exchange time from `fetch_time`) -> READY=1 -> APScheduler `BlockingScheduler` (UTC) with a cron
trigger `minute=*/5, second=RITMO_TICK_DELAY_S`, coalesce, one instance, explicit misfire grace time.
The first tick is the next scheduled one: a decision taken minutes after its candle closed would fill at a
price the policy never saw. `--once` ticks immediately on the newest closed candle and exits.

This module wires: settings, components (`build_daemon`), the live broker factory. The loops, signals and
the watchdog are in bot/daemon/service.py; on a stop the state is closed and the process exits 0 (or the
code of what stopped it).

Replay: the same `Daemon.tick` over a candle file with a simulated clock at now = F, F+5m, ..., T-5m (the
first decision is on the candle closing at F, as `ritmo backtest --from F --to T`), paper fills at the next
candle's open and no exchange order rules (so a replay books exactly what the backtest books); at the end
the ledger is marked at the close of the last candle before T. A replay restarted on its state continues
after the last recorded decision, so a killed replay ends exactly like an uninterrupted one.

Start-up (docs/design.md §8): an unreachable exchange (network, DNS, timeouts, 5xx) is waited out with capped
backoff (`StartWaiter`); only configuration (78) and authentication (77) problems, and an exchange that
refuses a start-up request for good (1), end the process. Until the first tick a stop signal ends start-up at
once: SIGTERM exits 0, Ctrl-C 130 (0 once the daemon announced itself while waiting). A state database this
run created is removed again if the run ends before it holds a decision, so a failed start leaves no empty
state behind (an existing state is never removed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from bot import notify
from bot.brokers.base import Broker
from bot.brokers.paper import PaperBroker
from bot.clock import wall_ms
from bot.daemon.feed import CandleFeed
from bot.daemon.learner import LearningGuard, OnlineLearner, load_model
from bot.daemon.market import ExchangeClock, ExchangeMarketData, MarketData, ReplayMarketData, SimClock
from bot.daemon.outbox import OutboxSender, notify_auth_failure
from bot.daemon.service import (
    StartInterrupted,
    StartWaiter,
    StopSignal,
    announce_ready,
    replay_ticks,
    run_scheduled,
    single_threaded_torch,
)
from bot.daemon.state import StateStore, open_state
from bot.errors import (
    AuthenticationExchangeError,
    ConfigError,
    RitmoError,
    TemporaryExchangeError,
    UnknownSymbolError,
    UsageError,
)
from bot.exchange.rules import MarketRules
from bot.logs import configure_logging
from bot.offline.periods import clip_to_data, earliest_from_ms, minute_text, parse_period, warm_up_problem
from bot.settings import Settings, load_settings, state_db_path, validate_live
from strategies.candles import CANDLE_MS, iso_utc

if TYPE_CHECKING:
    # Replays never load the exchange module (nor ccxt): run_realtime imports it when it runs.
    from bot.exchange.client import ExchangeClient

log = structlog.get_logger(__name__)

# Feed retries of a missing latest candle, and the pause between them (real time).
FEED_RETRIES = 3
FEED_RETRY_DELAY_S = 2.0
# The files of one state database (docs/design.md §9): removed together when a failed start created them.
STATE_FILE_SUFFIXES = ("", "-wal", "-shm", ".lock")
# How long a stopping daemon waits for the notifications still due (its own stop among them).
SENDER_FLUSH_S = 5.0
# bot/exchange/client.py's check_symbol says this when the exchange does not list the symbol.


class ReplayError(RitmoError):
    """The replay cannot run on this state as asked (exit 1); impossible periods are UsageErrors (exit 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo run`."""
    p.add_argument("--once", action="store_true", help="warm up, tick once on the newest closed candle, exit")
    p.add_argument("--replay", type=Path, metavar="FILE", help="replay a candle file with a simulated clock")
    p.add_argument("--from", dest="date_from", help="replay: first decision at this instant (UTC date/time)")
    p.add_argument("--to", dest="date_to", help="replay: end of the period, exclusive (UTC date/time)")
    p.add_argument(
        "--speed", default="max", help="replay: 'max' (as fast as possible) or a speed-up factor over real time"
    )
    p.add_argument("--seed", type=int, default=None, help="decision/learner seed (default RITMO_SEED)")
    p.add_argument("--state-dir", type=Path, default=None, help="state directory (default RITMO_STATE_DIR)")
    p.add_argument("--checkpoint", type=Path, default=None, help="starting checkpoint (default RITMO_CHECKPOINT)")
    p.add_argument(
        "--online-learning",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="learn from closed episodes (default RITMO_ONLINE_LEARNING)",
    )
    p.add_argument("--greedy", action="store_true", help="take the most probable action instead of sampling")
    p.add_argument("--env-file", default=".env", help="settings file (default .env; the environment wins)")


# ---------------------------------------------------------------------------------------------------
# Settings and components.
# ---------------------------------------------------------------------------------------------------


def resolve_settings(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    """Settings from .env/environment with the command line's overrides applied."""
    settings = load_settings(env, env_file=args.env_file)
    overrides: dict[str, Any] = {}
    if args.replay is not None:
        overrides["mode"] = "replay"
    if args.state_dir is not None:
        overrides["state_dir"] = args.state_dir
    if args.checkpoint is not None:
        overrides["checkpoint"] = args.checkpoint
    if args.seed is not None:
        if args.seed < 0:
            raise ConfigError(f"--seed {args.seed} is invalid: expected an integer >= 0")
        overrides["seed"] = args.seed
    if args.online_learning is not None:
        overrides["online_learning"] = args.online_learning
    settings = dataclasses.replace(settings, **overrides)
    if settings.mode == "replay" and args.replay is None:
        raise ConfigError("RITMO_MODE=replay needs a data file: ritmo run --replay FILE --from D --to D")
    if args.replay is None and (args.date_from or args.date_to):
        raise ConfigError("--from/--to only apply to a replay (--replay FILE)")
    if settings.mode == "live":
        validate_live(settings)
        if settings.exchange not in ("binance", "binanceusdm"):
            raise ConfigError(
                f"RITMO_EXCHANGE={settings.exchange}: live trading runs on Binance spot (binance, long_only) or "
                "Binance USD-M futures (binanceusdm, 1x isolated, long_only or long_short) only"
            )
        if settings.exchange == "binanceusdm" and ":" not in settings.symbol:
            raise ConfigError(
                f"RITMO_SYMBOL={settings.symbol}: on binanceusdm a perpetual is BASE/QUOTE:SETTLE, e.g. BTC/USDT:USDT"
            )
        if args.greedy:
            raise ConfigError("--greedy is for paper and replay runs; live mode samples as it was trained")
    return settings


def _configure_logging(settings: Settings) -> None:
    configure_logging(settings.log_format, settings.log_level, secrets=settings.secret_values())
    if settings.log_level != "DEBUG":
        # APScheduler logs every job start and end at INFO, Apprise every message it sends: the tick line and
        # notification_sent already say it, once.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        logging.getLogger("apprise").setLevel(logging.WARNING)


@dataclasses.dataclass
class Components:
    """An assembled daemon and what it was assembled from."""

    daemon: Any
    store: StateStore


def build_daemon(
    settings: Settings,
    market: MarketData,
    *,
    sleep: Callable[[float], None],
    rules: MarketRules | None,
    greedy: bool = False,
    feed_retries: int = FEED_RETRIES,
    feed_retry_delay_s: float = FEED_RETRY_DELAY_S,
    before_start: Callable[[StateStore], None] | None = None,
    make_broker: Callable[[str], Broker] | None = None,
) -> Components:
    """Open the state, load the model, assemble feed, broker, learner and daemon, and start it.

    `make_broker(position_mode)` builds the broker once the model's position mode is known (live); default
    a PaperBroker.
    """
    from bot.daemon.tick import Daemon, DaemonConfig, checkpoint_dir_for
    from strategies.bundle import history_needed

    db = state_db_path(settings)
    store = open_state(db, mode=settings.mode, symbol=settings.symbol, durable=settings.mode != "replay")
    try:
        if before_start is not None:
            before_start(store)
        ckpt_dir = checkpoint_dir_for(db)
        has_online = bool(store.checkpoint_refs())
        if not has_online and not Path(settings.checkpoint).is_file():
            raise ConfigError(f"RITMO_CHECKPOINT={str(settings.checkpoint)!r} is invalid: file not found")
        loaded, optim = load_model(store, ckpt_dir, settings.checkpoint, expect_mode=settings.position_mode or None)
        log.info(
            "model_loaded",
            source=loaded.source,
            path=str(loaded.path),
            model_version=loaded.version,
            position_mode=loaded.bundle.position_mode,
            objective=loaded.bundle.objective,
            decide_every=loaded.bundle.decide_every,
        )
        learner = OnlineLearner(
            loaded.bundle,
            checkpoint_dir=ckpt_dir,
            seed=settings.seed,
            macro_every=settings.macro_every,
            keep=settings.keep_checkpoints,
            optimizer_state=optim,
            learning=settings.online_learning,
            guard=LearningGuard(settings.guard_min_entropy, settings.guard_min_trade_prob),
            commission=settings.commission,
            slippage_bps=settings.slippage_bps,
        )
        config = DaemonConfig.from_settings(settings, loaded.bundle.position_mode, greedy=greedy)
        feed = CandleFeed(
            market,
            history=history_needed(loaded.bundle),
            retries=feed_retries,
            retry_delay_s=feed_retry_delay_s,
            sleep=sleep,
        )
        broker: Broker
        if make_broker is not None:
            broker = make_broker(loaded.bundle.position_mode)
        else:
            broker = PaperBroker(
                symbol=settings.symbol,
                commission=settings.commission,
                slippage_bps=settings.slippage_bps,
                rules=rules,
                max_position_quote=settings.max_position_quote,
            )
        daemon = Daemon(config, store, feed, broker, learner, loaded)
        daemon.start()
    except BaseException:
        store.close()
        raise
    return Components(daemon, store)


# ---------------------------------------------------------------------------------------------------
# Replay: period -> market -> daemon -> start -> ticks (bot.daemon.service) -> end.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReplayPlan:
    """What a replay is asked to do: the file, [from_ms, to_ms) and the speed (None: as fast as possible)."""

    path: Path
    from_ms: int
    to_ms: int
    speed: float | None


def run_replay(settings: Settings, args: argparse.Namespace, stop: StopSignal) -> int:
    """Replay a candle file over [--from, --to) with the daemon's own tick."""
    plan = replay_plan(args)
    market, plan = _replay_market(plan, settings.symbol)
    clock = SimClock(plan.from_ms)
    check_seed = functools.partial(_check_replay_seed, settings.seed)
    comps = build_daemon(settings, market, sleep=clock.sleep, rules=None, greedy=args.greedy, before_start=check_seed)
    try:
        start_ms = _start_replay(comps, market, plan, settings)
        stop.started()
        announce_ready()
        wall0 = time.perf_counter()
        ticks, next_ms = replay_ticks(comps.daemon, clock, start_ms, plan.to_ms, plan.speed, stop)
        if stop.is_set() and next_ms < plan.to_ms:
            log.info("stopped", signal=stop.signum, ticks=ticks, next=iso_utc(next_ms))
        else:
            _finish_replay(comps, plan, ticks, time.perf_counter() - wall0)
        notify.notify_stopping()
    finally:
        comps.store.close()
    return 0


def replay_plan(args: argparse.Namespace) -> ReplayPlan:
    """The replay's file, period and speed from the command line; UsageError when they are impossible."""
    if not args.date_from or not args.date_to:
        raise UsageError("--replay needs --from and --to")
    from_ms, to_ms = parse_period(args.date_from, args.date_to)
    if from_ms % CANDLE_MS or to_ms % CANDLE_MS:
        raise UsageError("--from and --to must lie on 5-minute boundaries")
    return ReplayPlan(Path(args.replay), from_ms, to_ms, _parse_speed(args.speed))


def _replay_market(plan: ReplayPlan, symbol: str) -> tuple[ReplayMarketData, ReplayPlan]:
    """The file's market data, and the plan with a --to past the end of the file clipped to it (logged).

    The last tick at now = T - 5 min decides the candle before it and fills at the open of the candle at
    T - 5 min, so the file must reach T - 5 min: a later --to is clipped, as `ritmo backtest` clips it.
    """
    from bot.files.candle_batch import load_candle_batch

    market = ReplayMarketData(load_candle_batch(plan.path), symbol)
    data_end_ms = market.last_ts_ms + CANDLE_MS
    if plan.from_ms >= data_end_ms:
        raise UsageError(
            f"--from {minute_text(plan.from_ms)} is after the end of {plan.path} "
            f"(its last candle opens {minute_text(market.last_ts_ms)} UTC)"
        )
    to_ms = clip_to_data(plan.to_ms, data_end_ms, source=str(plan.path))
    return market, dataclasses.replace(plan, to_ms=to_ms)


def _check_replay_seed(seed: int, store: StateStore) -> None:
    """A replay state continues only with the seed it was run with (its decisions depend on it)."""
    stored = store.get_meta("seed")
    if stored is not None and stored != seed:
        raise ConfigError(
            f"the replay state {store.path} was run with seed {stored}: pass --seed {stored} to continue it, "
            "or use another --state-dir"
        )


def _start_replay(comps: Components, market: ReplayMarketData, plan: ReplayPlan, settings: Settings) -> int:
    """Check the warm-up, record the replay in the state; the first tick's time (after the last decision)."""
    from strategies.bundle import history_needed

    daemon, store = comps.daemon, comps.store
    history = history_needed(daemon.bundle)
    if market.rows_before(plan.from_ms) < history:
        ts = market.closed_candles(market.first_ts_ms, market.last_ts_ms + CANDLE_MS).ts_ms
        raise UsageError(
            f"not enough history before --from {minute_text(plan.from_ms)} in {plan.path}: "
            + warm_up_problem(history, earliest_from_ms(ts, history), "this file")
        )
    last = daemon.mem.last_decision_ts_ms
    _check_replay_continues(store, plan, last)
    with store.transaction():
        store.set_meta("replay", {"file": str(plan.path), "from_ms": plan.from_ms, "to_ms": plan.to_ms})
    start_ms = plan.from_ms if last is None else max(plan.from_ms, last + 2 * CANDLE_MS)
    log.info(
        "replay_start",
        file=str(plan.path),
        start=iso_utc(plan.from_ms),
        end=iso_utc(plan.to_ms),
        resume_at=iso_utc(start_ms),
        seed=settings.seed,
        online_learning=settings.online_learning,
    )
    return start_ms


def _check_replay_continues(store: StateStore, plan: ReplayPlan, last_ts_ms: int | None) -> None:
    """A replay state continues a replay of the same period (a restart after a kill), or moves on to a later one.

    The tick at now = F decides the candle opening at F - 5 min; a state whose last decision is on that candle
    or later has already lived past --from, and replaying F again would rewrite its history.
    """
    if last_ts_ms is None or last_ts_ms + CANDLE_MS < plan.from_ms:
        return
    recorded = store.get_meta("replay") or {}
    if (recorded.get("from_ms"), recorded.get("to_ms")) == (plan.from_ms, plan.to_ms):
        return  # the same replay, restarted: it continues after its last decision
    resume_ms = last_ts_ms + 2 * CANDLE_MS
    raise ReplayError(
        f"the replay state {store.path} is already later than --from {minute_text(plan.from_ms)}: its last decision "
        f"is on the candle of {minute_text(last_ts_ms)} UTC; continue it with --from {minute_text(resume_ms)} "
        "or later, or replay into another --state-dir"
    )


def _finish_replay(comps: Components, plan: ReplayPlan, ticks: int, wall_s: float) -> None:
    """Mark the ledger at the end of the period and log the replay's summary."""
    summary = comps.daemon.mark_end(plan.to_ms)
    log.info(
        "replay_done",
        ticks=ticks,
        wall_s=round(wall_s, 3),
        equity=summary["equity"],
        position=summary["position"],
        n_trades=summary["n_trades"],
        fees_quote=summary["fees_quote"],
        k=summary["k"],
        macro_updates=summary["macro_updates"],
        updates=comps.store.update_count(),
    )


def _parse_speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"--speed {text!r} is invalid: expected 'max' or a positive speed-up factor")
    return value


# ---------------------------------------------------------------------------------------------------
# Real time (paper).
# ---------------------------------------------------------------------------------------------------


def run_realtime(
    settings: Settings,
    *,
    once: bool,
    greedy: bool,
    stop: StopSignal,
    client: ExchangeClient | None = None,
    clock: Any | None = None,
    trigger: Any | None = None,
    local_ms: Callable[[], int] = wall_ms,
    feed_retry_delay_s: float = FEED_RETRY_DELAY_S,
    env_file: str | Path | None = ".env",
    waiter: StartWaiter | None = None,
) -> int:
    """Paper or live trading on the exchange's market data: warm up, then tick on the scheduler (or once).

    Each start-up step that needs the exchange (connect, live start checks, warm-up) runs under `waiter`,
    which waits out an unreachable exchange (docs/design.md §8).
    """
    from bot.exchange.client import exchange_from_settings, make_exchange

    live = settings.mode == "live"
    waiter = waiter or StartWaiter()
    if client is None:
        # Paper reads public market data only: it is never given the keys.
        client = (
            exchange_from_settings(settings)
            if live
            else make_exchange(settings.exchange, dict(settings.exchange_config))
        )
    sleep = clock.sleep if clock is not None else time.sleep
    to_sync = None
    if clock is None:
        clock = to_sync = ExchangeClock(client, local_ms=local_ms)
    rules = waiter.call(lambda: _connect_exchange(client, settings.symbol, to_sync), "connect")
    market = ExchangeMarketData(client, settings.symbol)
    make_broker = live_broker_factory(settings, client, clock, env_file=env_file) if live else None
    comps = waiter.call(
        lambda: build_daemon(
            settings,
            market,
            sleep=sleep,
            rules=rules,
            greedy=greedy,
            feed_retry_delay_s=feed_retry_delay_s,
            make_broker=make_broker,
        ),
        "start",
    )
    daemon, store = comps.daemon, comps.store
    # Notifications the daemon writes into the outbox are sent by this thread (docs/design.md §13).
    sender = OutboxSender(store.path, settings.notify_urls).start() if daemon.config.notify else None
    exit_code = 0
    stop_reason = "once" if once else "signal"
    try:
        warm = waiter.call(lambda: _warm_up(daemon, clock), "warm_up")
        log.info(
            "warmed_up",
            candles=len(daemon.feed.buffer),
            latest=iso_utc(warm.latest_ts_ms) if warm.latest_ts_ms is not None else None,
            exchange=client.id,
            symbol=settings.symbol,
            mode=settings.mode,
            start_attempts=waiter.attempts,
        )
        stop.started()
        announce_ready()
        if waiter.waited:
            # Replace the "waiting for the exchange" line systemd shows until the first tick sets its own.
            notify.notify_status(f"warmed up after waiting for the exchange: {settings.symbol} {settings.mode}")
        if once:
            outcome = daemon.tick(clock.now_ms())
            notify.notify_watchdog()
            if outcome is None:
                log.info("once_nothing_to_do", reason="the newest closed candle was decided on already")
            notify.notify_stopping()
            return 0
        exit_code = run_scheduled(settings, daemon, clock, stop, trigger, local_ms)
        if exit_code != 0:
            stop_reason = f"stopped with exit code {exit_code}"
        notify.notify_stopping()
        log.info("stopped", signal=stop.signum, exit_code=exit_code)
    except BaseException:
        stop_reason = "start-up or tick failed"
        raise
    finally:
        if not once:
            # A --once run (cron) would notify a start and a stop every time it runs: only the daemon's stop counts.
            with contextlib.suppress(sqlite3.Error):
                daemon.record_stop(stop_reason, exit_code)
        if sender is not None:
            sender.stop(flush_timeout_s=SENDER_FLUSH_S)
        store.close()
    return exit_code


def _connect_exchange(client: ExchangeClient, symbol: str, clock: ExchangeClock | None) -> MarketRules:
    """The start-up reads: markets (the symbol must be listed), the exchange's clock, the symbol's order rules.

    An unlisted symbol is a configuration error (78: restarting cannot fix RITMO_SYMBOL); other refusals are
    operational (1: systemd restarts the unit a few times, then leaves it failed for a human).
    """
    try:
        client.check_symbol(symbol)
    except UnknownSymbolError as exc:
        raise ConfigError(f"RITMO_SYMBOL={symbol!r} is invalid: {exc}") from None
    if clock is not None:
        clock.sync()
    return client.market_rules(symbol)


def _warm_up(daemon: Any, clock: Any) -> Any:
    """Fill the feed's buffer; TemporaryExchangeError (so the start waits) when the exchange could not fill it."""
    warm = daemon.feed.update(clock.now_ms())
    held, needed = len(daemon.feed.buffer), daemon.feed.history
    if warm.error is not None and held < needed:
        raise TemporaryExchangeError(f"warm-up holds {held} of {needed} candles: {warm.error}")
    return warm


def live_broker_factory(
    settings: Settings, client: ExchangeClient, clock: Any, *, env_file: str | Path | None
) -> Callable[[str], Broker]:
    """A `make_broker` for build_daemon: live start checks, then the live broker for the model's position mode.

    binance (spot) -> LiveBroker; binanceusdm (USD-M futures, 1x isolated set by check_live_start, one-way mode
    checked here) -> FuturesBroker.
    """

    def make(position_mode: str) -> Broker:
        from bot.brokers.futures import FuturesBroker, check_one_way_mode
        from bot.brokers.live import LiveBroker, check_live_start

        check_live_start(settings, client, position_mode=position_mode, env_file=env_file)
        is_usdm = client.id == "binanceusdm"
        if is_usdm:
            check_one_way_mode(client, settings.symbol)
        assert settings.max_position_quote is not None  # validate_live refuses live mode without a cap
        log.warning(
            "live_trading",
            exchange=client.id,
            symbol=settings.symbol,
            sandbox=settings.sandbox,
            max_position_quote=settings.max_position_quote,
            position_mode=position_mode,
        )
        broker_class = FuturesBroker if is_usdm else LiveBroker
        return broker_class(
            client,
            symbol=settings.symbol,
            max_position_quote=settings.max_position_quote,
            commission=settings.commission,
            position_mode=position_mode,
            sleep=clock.sleep,
            clock_ms=clock.now_ms,
        )

    return make


# ---------------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def removing_unused_new_state(db: Path) -> Iterator[None]:
    """Remove the state database again if this run created it and ends (failing or stopped) before it holds a
    decision: the next start then begins as cleanly as this one did. An existing state is never touched."""
    created = not any(Path(f"{db}{suffix}").exists() for suffix in STATE_FILE_SUFFIXES)
    try:
        yield
    finally:
        if created and _holds_no_decision(db):
            for suffix in STATE_FILE_SUFFIXES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{db}{suffix}")
            log.info("state_removed", path=str(db), reason="created by a start that ended before its first decision")


def _holds_no_decision(db: Path) -> bool:
    """Whether the database at `db` exists and records nothing an operator could need: no decision, no order, no
    fill, no command (False when it cannot be read: keep it). An order intent is committed before its decision
    row, so a first tick that sent an order and then failed keeps its state."""
    if not db.is_file():
        return Path(f"{db}.lock").exists()  # only the lock file was made
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return not any(
                conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]
                for table in ("decisions", "orders", "fills", "commands")
            )
    except sqlite3.Error:
        return False


def main(args: argparse.Namespace) -> int:
    """Run `ritmo run`."""
    settings = resolve_settings(args)
    _configure_logging(settings)
    # Until the first tick a signal ends start-up wherever it is (service.StartInterrupted).
    stop = StopSignal().install(interrupt_start=True)
    try:
        single_threaded_torch()
        log.info("starting", settings=settings.redacted(), once=bool(args.once), replay=str(args.replay or ""))
        try:
            with removing_unused_new_state(state_db_path(settings)):
                if args.replay is not None:
                    return run_replay(settings, args, stop)
                return run_realtime(settings, once=args.once, greedy=args.greedy, stop=stop, env_file=args.env_file)
        except AuthenticationExchangeError as exc:
            # Exit 77 stops the unit for good: the operator must hear of it (best effort, a few seconds at most).
            notify_auth_failure(settings, str(exc), exit_code=exc.exit_code)
            raise
    except StartInterrupted as exc:
        if exc.signum == signal.SIGINT and not exc.waiting:
            # Ctrl-C before the daemon was up: the CLI prints "ritmo run: interrupted" and exits 130.
            raise KeyboardInterrupt from None
        log.info("stopped", signal=exc.signum, phase="start", waiting=exc.waiting)
        notify.notify_stopping()
        return 0
    finally:
        stop.restore()
