"""The daemon's work: `Daemon.tick(now_ms)`, the same function under the scheduler, `--once` and replay.

One tick acts on t = the newest candle closed at now_ms (exchange time). The checkpoint's decision interval
K (`decide_every`, 1 for checkpoints from before it) says which ticks decide: those on a candle t with
`is_decision_candle(t, K)` (its close instant, in 5-minute candles since the epoch, divisible by K), the rule
of `ritmo backtest` and of training. The other ticks are `kept`: they mark equity and watch the drawdown but
hold the position, sample nothing and add no episode step. K = 1: every tick decides, as always.

Each phase is a method of `Daemon` (`tick` runs them; `_tick_in_tx` is the part inside the transaction):
  1. feed      (`tick`) fetch newly closed candles into the bounded buffer; backfill holes; if candle t is
               still missing after retries the tick is `skipped` (stale_data, `_skip_stale`): nothing is traded,
               ever, for t.
  -- one SQLite transaction from here (BEGIN IMMEDIATE; `ritmo resume` serialises with it) --
  1b. commands (`_apply_commands`) the operator's pending commands, oldest first (docs/design.md §13): pause,
               resume and clear_halt take effect at once (before the halt is read, so a cleared halt trades at
               this very tick); flatten sets the target flat and is applied by `_record` once the position is
               flat, or stays pending when the tick cannot trade (a skip, a paused broker). Then, at the first
               tick of a UTC day, the previous day's summary (`_daily_summary`).
  2. settle    (`_settle`) the previous step's reward ln(E_{t'+K} / E_{t'}), once candle t'+K has closed.
  3. episodes  (`_close_episodes`) a full episode (L settled steps) closes `pending` (its update runs after the
               commit); a break in the chain of decisions K candles apart (downtime, a skipped decision tick)
               truncates the open episode: pending if it has >= MIN_EPISODE_STEPS settled steps, else discarded.
  4. orders    (`_check_orders`) orders an earlier tick left open are settled first; an order still unresolved,
               or one already sent for candle t, makes the tick a skip.
  5. mark      (`_mark`) equity at t's close, peak equity, drawdown guard (a latched halt flattens and stops
               trading and learning until `ritmo resume`; on a kept tick too).
  6. observe   (`_observe`, decision ticks only) the observation of candle t from the incremental feature engine
               (bot/daemon/observer.py), which follows every closed candle (synced right after the feed) and
               equals the recompute over the last `first_valid_row + 1` candles ending at t (checked daily).
  7. decide    (`_decide`) eval-mode probabilities (the backtest's `probs_for_all_positions`); action sampled
               with the uniform keyed by (seed, t) or greedy; target position; MAX_POSITION_QUOTE caps the
               notional.
  8. execute   (`_execute`) the broker records the order intent, fills it (paper) and books it in the ledger.
  9. record    (`_record`) order status, fill, episode step (with the decision close and the ex-ante volatility
               the counterfactual update needs), decision, ledger, peak, halt, last candle -> COMMIT.
  -- after the commit --
 10. learn     (`_learn_pending`) a pending episode becomes one REINFORCE update; the new checkpoint is saved,
               then recorded (second transaction) and acts from the next tick.
 11. log       one canonical `tick` line.

Phases 2-5 write before the order is sent on purpose: a live broker commits the transaction with the order
intent before sending, so the settlement (measured on the ledger before this tick's trade), the episodes closed
and a halt are durable with it; a restart after a crash there must not settle on a ledger the fill has moved.

Events and notifications: every event goes through `_event` (and each fill through `_notify`), which writes
the events row and, when notifications are on, the outbox row in the same transaction; the outbox sender
(bot/daemon/outbox.py) delivers them after the commit, so a slow service never delays a tick.

Crash safety: the in-memory state is a cache of the database: it is (re)loaded by `start()` and after any
failed tick, so a restart continues exactly where the last committed tick left off. A tick whose candle
already has a decision row is a no-op (the decisions primary key forbids acting twice on one candle).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from bot.brokers.base import Broker, Decision, ExecutionResult
from bot.clock import wall_ms
from bot.daemon.alerts import message_for
from bot.daemon.feed import Candle, CandleFeed, FeedUpdate, last_closed_open_ms
from bot.daemon.halt import clear_halt, marked_equity
from bot.daemon.learner import LoadedModel, OnlineLearner, UpdateOutcome
from bot.daemon.observer import BufferObserver
from bot.daemon.state import KEEP_EPISODE_BLOBS, StateStore
from bot.errors import TemporaryExchangeError
from strategies.accounting import Ledger, target_position
from strategies.actions import ACTION_NAMES, HOLD
from strategies.bundle import ModelBundle, history_needed
from strategies.candles import CANDLE_MS, iso_utc
from strategies.objectives import ex_ante_volatility, is_decision_candle
from strategies.policy import decision_uniforms, greedy_action, probs_for_all_positions, sample_action

log = structlog.get_logger(__name__)

DAY_MS = 86_400_000


@dataclass(frozen=True)
class DaemonConfig:
    """What the daemon needs from the settings (and the replay command line)."""

    symbol: str
    mode: str
    position_mode: str
    seed: int = 0
    greedy: bool = False
    episode_steps: int = 288
    min_episode_steps: int = 48
    macro_every: int = 11
    online_learning: bool = True
    max_drawdown: float = 0.5
    max_position_quote: float | None = None
    commission: float = 0.001
    slippage_bps: float = 0.0
    initial_cash: float = 10_000.0
    keep_checkpoints: int = 5
    notify: bool = False
    """Write notifications to the outbox (RITMO_NOTIFY_URLS set and not a replay: a replayed year must not
    flood the operator)."""

    @classmethod
    def from_settings(cls, settings: Any, position_mode: str, **overrides: Any) -> DaemonConfig:
        """Build from `bot.settings.Settings` (+ command-line overrides)."""
        values = {
            "symbol": settings.symbol,
            "mode": settings.mode,
            "position_mode": position_mode,
            "seed": settings.seed,
            "episode_steps": settings.episode_steps,
            "min_episode_steps": settings.min_episode_steps,
            "macro_every": settings.macro_every,
            "online_learning": settings.online_learning,
            "max_drawdown": settings.max_drawdown,
            "max_position_quote": settings.max_position_quote,
            "commission": settings.commission,
            "slippage_bps": settings.slippage_bps,
            "initial_cash": settings.paper_balance,
            "keep_checkpoints": settings.keep_checkpoints,
            "notify": bool(getattr(settings, "notify_urls", ())) and settings.mode != "replay",
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class TickOutcome:
    """What one tick did (also the fields of the canonical `tick` log line)."""

    ts_ms: int
    status: str  # acted | rejected | halted | skipped | kept
    action: int | None
    probs: tuple[float, float, float] | None
    position_before: int
    position_after: int
    equity: float | None
    fee_quote: float
    model_version: str
    episode_id: int | None
    episode_step: int | None
    k: int
    latency_ms: float
    """Candles in -> decision recorded and committed (no network)."""
    feed_ms: float
    update: UpdateOutcome | None = None
    reason: str | None = None


@dataclass
class _Episode:
    id: int
    steps: int
    settled: int
    last_ts_ms: int | None


@dataclass
class _Unsettled:
    episode_id: int
    step: int
    ts_ms: int
    equity_before: float


# A tick that trades nothing (the target is the position held).
_NO_ORDER = ExecutionResult("none")


@dataclass
class _TickWork:
    """One tick's working values, handed from phase to phase; `_record` writes them."""

    t: int
    t_in: float
    """perf_counter when the candles were in: the tick's latency runs from here."""
    candle: Candle
    decides: bool
    position_before: int
    halt: dict[str, Any]
    peak: float | None
    equity_before: float = math.nan
    halted: bool = False
    macro: np.ndarray | None = None
    micro: np.ndarray | None = None
    probs: tuple[float, float, float] | None = None
    action: int = HOLD
    target: int = 0
    reason: str = "policy"
    result: ExecutionResult = _NO_ORDER
    position_after: int = 0
    equity_after: float = math.nan
    status: str = ""
    reject_reason: str | None = None
    episode_id: int | None = None
    episode_step: int | None = None
    paused: bool = False
    """The operator paused new entries (meta `paused`): the policy may close or reduce, never open or grow."""
    flatten: list[dict[str, Any]] = field(default_factory=list)
    """Pending flatten commands this tick executes (the target is flat); applied by `_record`."""


@dataclass
class _Memory:
    """The cache of the database the tick works with."""

    ledger: Ledger
    last_decision_ts_ms: int | None
    episode: _Episode | None
    unsettled: _Unsettled | None
    k: int
    macro_updates: int
    model: dict[str, Any] = field(default_factory=dict)


class Daemon:
    """Ticks a policy over closed candles with a broker, a state store and an online learner."""

    def __init__(
        self,
        config: DaemonConfig,
        store: StateStore,
        feed: CandleFeed,
        broker: Broker,
        learner: OnlineLearner,
        loaded: LoadedModel,
        *,
        perf_counter: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config
        self.store = store
        self.feed = feed
        self.broker = broker
        self.learner = learner
        self.loaded = loaded
        self._perf = perf_counter
        self.history = history_needed(learner.bundle)
        self.observer = BufferObserver(learner.bundle)
        self.decide_every = int(learner.bundle.decide_every)
        self.mem: _Memory | None = None

    @property
    def bundle(self) -> ModelBundle:
        """The acting model bundle."""
        return self.learner.bundle

    # --- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Initialise or load the state, reconcile orders left by a crash, run updates a crash left pending."""
        meta = self.store.all_meta()
        with self.store.transaction():
            if "ledger" not in meta:
                self._create_state()
            else:
                self._check_compatible(meta)
            self._record_start()
            self._reconcile_at_start()
        self._restore()
        self._learn_pending()

    def _create_state(self) -> None:
        """A new state: the broker's opening ledger, peak, rhythm and the settings the state is bound to."""
        cfg, store = self.config, self.store
        rhythm = self.bundle.rhythm
        opening, opening_equity = self.broker.opening_ledger(float(cfg.initial_cash))
        store.set_meta_many(
            {
                "ledger": opening.to_dict(),
                "initial_cash": opening_equity,
                "peak_equity": opening_equity,
                "halt": {"halted": False},
                "rhythm": {"k": int(rhythm.get("k", 0)), "macro_updates": int(rhythm.get("macro_updates", 0))},
                "position_mode": cfg.position_mode,
                "seed": cfg.seed,
                "episode_steps": cfg.episode_steps,
                "decide_every": self.decide_every,
                # The fee rate the state trades at: `ritmo status` charges its buy-and-hold comparison the same.
                "commission": cfg.commission,
            }
        )
        self._event(
            "state_created",
            {"initial_equity": opening_equity, "ledger": opening.to_dict(), "position_mode": cfg.position_mode},
        )

    def _record_start(self) -> None:
        """Record the acting model, the learning guard and a `start` event."""
        self.store.set_meta_many(
            {
                "model": {
                    "version": self.loaded.version,
                    "checkpoint_path": str(self.loaded.path),
                    "source": self.loaded.source,
                    "objective": self.bundle.objective,
                    "decide_every": self.decide_every,
                },
                "learning_guard": asdict(self.learner.guard),
            }
        )
        ledger = Ledger.from_dict(self.store.get_meta("ledger"))
        last = self.store.get_meta("last_candle") or {}
        self._event(
            "start",
            {
                "model_version": self.loaded.version,
                "checkpoint": str(self.loaded.path),
                "mode": self.config.mode,
                "equity": marked_equity(ledger, last),
                "position": ledger.position,
                "halted": bool((self.store.get_meta("halt") or {}).get("halted")),
                "paused": bool((self.store.get_meta("paused") or {}).get("paused")),
            },
        )

    def _reconcile_at_start(self) -> None:
        """Book what the exchange did with orders a crash left open, then adopt its balances; save the ledger."""
        store = self.store
        ledger = Ledger.from_dict(store.get_meta("ledger"))
        pending = store.pending_orders()
        if pending:
            self.broker.reconcile(store, pending, ledger)
        # After the fills that happened while the daemon was down are booked: the exchange's balances win.
        check = self.broker.check_balances(ledger)
        if check is not None:
            check = {**check, "checked_at_ms": wall_ms()}
            store.set_meta("balance_check", check)
            if check.get("adjusted"):
                self._event("ledger_adjusted", check)
        store.set_meta("ledger", ledger.to_dict())
        # A fresh broker's breaker is closed whatever the last run left: not a transition to report.
        self._save_broker_status(transitions=False)

    def _check_balances(self, ledger: Ledger, t: int) -> None:
        """Adopt the exchange's balances beyond dust (futures funding) before deciding; a failed read is skipped."""
        try:
            check = self.broker.check_balances(ledger)
        except TemporaryExchangeError as exc:
            # The pre-flight read of an order will meet the same outage and pause it; nothing to decide here.
            log.warning("balance_check_failed", error=str(exc))
            return
        if check is None:
            return
        self.store.set_meta("balance_check", {**check, "checked_at_ms": wall_ms()})
        if check.get("adjusted"):
            self._event("ledger_adjusted", check, candle_ts_ms=t)
            self.store.set_meta("ledger", ledger.to_dict())

    def _save_broker_status(self, *, transitions: bool = True) -> None:
        """Save the broker's status (live: the circuit breaker); record the breaker opening or closing."""
        status = self.broker.status()
        if status is None:
            return
        if transitions:
            previous = (self.store.get_meta("broker") or {}).get("breaker") or {}
            breaker = status.get("breaker") or {}
            was, now = previous.get("state") or "closed", breaker.get("state")
            # Only the edges of an outage: open <-> half_open trials every cooldown would repeat the alarm.
            if now == "open" and was == "closed":
                self._event("breaker_open", breaker, self.mem.last_decision_ts_ms if self.mem else None)
            elif now == "closed" and was in ("open", "half_open"):
                self._event("breaker_closed", breaker, self.mem.last_decision_ts_ms if self.mem else None)
        self.store.set_meta("broker", status)

    def _check_compatible(self, meta: dict[str, Any]) -> None:
        cfg, store = self.config, self.store
        if meta.get("position_mode") != cfg.position_mode:
            from bot.errors import ConfigError

            raise ConfigError(
                f"the state {store.path} was traded in {meta.get('position_mode')} mode but the model is "
                f"{cfg.position_mode}: use a matching checkpoint or another RITMO_STATE_DIR"
            )
        if meta.get("seed") != cfg.seed:
            log.warning("seed_changed", old=meta.get("seed"), new=cfg.seed)
            self._event("seed_changed", {"old": meta.get("seed"), "new": cfg.seed})
            store.set_meta("seed", cfg.seed)
        if meta.get("episode_steps") != cfg.episode_steps:
            log.warning("episode_steps_changed", old=meta.get("episode_steps"), new=cfg.episode_steps)
            store.set_meta("episode_steps", cfg.episode_steps)
        old_k = int(meta.get("decide_every", 1))  # states from before the decision interval decided every candle
        if old_k != self.decide_every:
            # The open episode's steps are old_k candles apart: its chain and its settlement no longer hold.
            log.warning("decide_every_changed", old=old_k, new=self.decide_every)
            self._event("decide_every_changed", {"old": old_k, "new": self.decide_every})
            ep = store.open_episode()
            if ep is not None:
                store.close_episode(int(ep["id"]), "discarded", truncated=True, reason="decide_every_changed")
            store.set_meta("decide_every", self.decide_every)

    def _restore(self) -> None:
        """(Re)load the in-memory cache from the database."""
        store = self.store
        meta = store.all_meta()
        last = store.last_decision()
        ep = store.open_episode()
        episode = None
        if ep is not None:
            row = store.conn.execute(
                "SELECT MAX(ts_ms) FROM episode_steps WHERE episode_id = ?", (ep["id"],)
            ).fetchone()
            episode = _Episode(int(ep["id"]), int(ep["steps"]), int(ep["settled"]), row[0])
        un = store.unsettled_step()
        unsettled = (
            _Unsettled(int(un["episode_id"]), int(un["step"]), int(un["ts_ms"]), float(un["equity_before"]))
            if un
            else None
        )
        rhythm = meta.get("rhythm", {})
        self.mem = _Memory(
            ledger=Ledger.from_dict(meta["ledger"]),
            last_decision_ts_ms=None if last is None else int(last["ts_ms"]),
            episode=episode,
            unsettled=unsettled,
            k=int(rhythm.get("k", 0)),
            macro_updates=int(rhythm.get("macro_updates", 0)),
            model=dict(meta.get("model", {})),
        )

    # --- tick -----------------------------------------------------------------------------------

    def tick(self, now_ms: int) -> TickOutcome | None:
        """Act on the newest candle closed at now_ms (exchange time); None if it was decided on already."""
        assert self.mem is not None, "start() first"
        t = last_closed_open_ms(now_ms)
        if self.mem.last_decision_ts_ms is not None and t <= self.mem.last_decision_ts_ms:
            log.info("tick_duplicate", ts=iso_utc(t), last=iso_utc(self.mem.last_decision_ts_ms))
            return None
        with structlog.contextvars.bound_contextvars(candle=iso_utc(t)):
            t0 = self._perf()
            upd = self.feed.update(now_ms)  # feed: the network part, outside the transaction
            t_in = self._perf()
            self.observer.sync(self.feed.buffer)  # the features follow every closed candle, decided on or not
            try:
                with self.store.transaction():
                    outcome = self._tick_in_tx(t, upd, t_in)
            except BaseException:
                # The transaction rolled back: the cache may be ahead of the database, so reload it.
                self._restore()
                raise
            latency_ms = (self._perf() - t_in) * 1e3
            outcome = replace(outcome, latency_ms=latency_ms, feed_ms=(t_in - t0) * 1e3)
            # Every tick looks for pending episodes (one indexed query): also those a halt or a crash left.
            update = self._learn_pending()
            if update is not None:
                outcome = replace(outcome, update=update)
            self._log_tick(outcome)
            return outcome

    def _tick_in_tx(self, t: int, upd: FeedUpdate, t_in: float) -> TickOutcome:
        """The tick inside its transaction: settle, close episodes, then feed → observe → decide → execute → record.

        The order of the writes is the crash-safety order: what precedes `_execute` is committed with the order
        intent when a live broker commits it before sending (the step settled on the ledger before this tick's
        trade, the episodes it closes, a halt); `_record` writes the rest, committed when the tick returns.
        """
        assert self.mem is not None
        # Commands first: a clear_halt or a pause takes effect at this tick (the halt is read after it).
        flatten = self._apply_commands(t)
        self._daily_summary(t)
        halt = self.store.get_meta("halt") or {"halted": False}
        peak = self.store.get_meta("peak_equity")
        position_before = self.mem.ledger.position
        self._settle(t)
        self._close_episodes(t, stale=upd.is_stale)
        if upd.is_stale:
            return self._skip_stale(t, upd, position_before, t_in)
        candle = self.feed.buffer.last()
        self.broker.note_close(candle.close)
        skip = self._check_orders(t, candle, t_in)
        if skip is not None:
            return skip
        decides = bool(is_decision_candle(t, self.decide_every))
        w = _TickWork(t, t_in, candle, decides, position_before, halt, peak)
        w.paused = bool((self.store.get_meta("paused") or {}).get("paused"))
        w.flatten = flatten
        self._mark(w)
        obs = None
        if decides:
            obs = self._observe()
            if obs is None:
                return self._record_skip(t, "warmup", position_before, t_in, candle.close)
        self._decide(w, obs)
        self._execute(w)
        return self._record(w)

    # --- before deciding: settlement, episodes, feed and order checks, marking ------------------

    def _settle(self, t: int) -> None:
        """Settle the previous step's reward ln(E_{t'+K} / E_{t'}) once its settling candle t'+K has closed."""
        mem = self.mem
        assert mem is not None
        un = mem.unsettled
        # Between decisions the step's settling candle (t' + K) has not closed yet: it is held, not settled.
        if un is None or t < un.ts_ms + self.decide_every * CANDLE_MS:
            return
        nxt = self._settling_candle(un.ts_ms)
        if nxt is None:
            return
        # The ledger still holds the position of step t' (this tick has not traded yet): E_{t'+K} is its mark.
        reward = math.log(mem.ledger.equity(nxt.close) / un.equity_before)
        self.store.settle_step(
            un.episode_id, un.step, reward, next_open=self._next_open(un.ts_ms), settle_close=nxt.close
        )
        if mem.episode is not None and mem.episode.id == un.episode_id:
            mem.episode.settled += 1
        mem.unsettled = None

    def _close_episodes(self, t: int, *, stale: bool) -> None:
        """Close the open episode when it is full and settled, or truncate it at a break in the decision chain."""
        mem = self.mem
        assert mem is not None
        ep = mem.episode
        if ep is None:
            return
        if ep.steps >= self.config.episode_steps and ep.settled >= ep.steps:
            self._close_episode(ep, truncated=False, reason=None)
        elif ep.last_ts_ms is not None and ep.last_ts_ms + self.decide_every * CANDLE_MS < t:
            # The decision due at last + K candles was never taken (K = 1: any candle missed).
            self._close_episode(ep, truncated=True, reason="stale_data" if stale else "gap")

    def _skip_stale(self, t: int, upd: FeedUpdate, position: int, t_in: float) -> TickOutcome:
        """A stale feed (candle t still missing after retries): record the skip, act on nothing."""
        log.warning(
            "stale_data",
            expected=iso_utc(upd.expected_ts_ms),
            latest=iso_utc(upd.latest_ts_ms) if upd.latest_ts_ms is not None else None,
            attempts=upd.attempts,
            error=upd.error,
        )
        return self._record_skip(t, "stale_data", position, t_in)

    def _check_orders(self, t: int, candle: Candle, t_in: float) -> TickOutcome | None:
        """Settle orders left open, adopt the exchange's balances; a skip when candle t must not be acted on."""
        store, mem = self.store, self.mem
        assert mem is not None
        ledger = mem.ledger
        pending = store.pending_orders()
        if pending:
            # Orders an ambiguous send left `unknown` (live): settle them before anything else is decided.
            self.broker.reconcile(store, pending, ledger)
            store.set_meta("ledger", ledger.to_dict())
            unresolved = [str(r["client_order_id"]) for r in store.pending_orders()]
            if unresolved:
                # The exchange could not tell what became of an order: a new one could double the position.
                log.error("orders_unresolved", orders=unresolved, action="no new order until they are settled")
                self._save_broker_status()
                return self._record_skip(t, "order_unresolved", ledger.position, t_in, candle.close)
        if self.broker.balance_check_each_tick:
            self._check_balances(ledger, t)
        already_ordered = store.orders_for_candle(t)
        if already_ordered:
            # A previous run sent (or meant to send) an order for this candle and died before recording the
            # decision; reconciliation (at start) has booked what the exchange did and saved the ledger.
            # Never act on one candle twice.
            log.warning("candle_already_ordered", ts=iso_utc(t), orders=already_ordered)
            self._save_broker_status()
            return self._record_skip(t, "order_recovered_after_restart", ledger.position, t_in, candle.close)
        return None

    def _mark(self, w: _TickWork) -> None:
        """Mark equity at t's close and the peak; the drawdown guard latches a halt that closes the episode."""
        cfg, mem = self.config, self.mem
        assert mem is not None
        w.equity_before = mem.ledger.equity(w.candle.close)
        peak = w.equity_before if w.peak is None else max(float(w.peak), w.equity_before)
        w.peak = peak
        w.halted = bool(w.halt.get("halted"))
        if not w.halted and w.equity_before < peak * (1.0 - cfg.max_drawdown):
            w.halted = True
            w.halt = {
                "halted": True,
                "reason": (
                    f"drawdown {1 - w.equity_before / peak:.2%} from peak {peak:.2f} exceeds {cfg.max_drawdown:.2%}"
                ),
                "since_ts_ms": w.t,
                "equity": w.equity_before,
                "peak_equity": peak,
            }
            log.error("halt", reason=w.halt["reason"], equity=w.equity_before, peak_equity=peak)
            self._event("halt", w.halt, candle_ts_ms=w.t)
        if w.halted and mem.episode is not None:
            self._close_episode(mem.episode, truncated=True, reason="halted", force_discard=True)

    # --- observe, decide, execute ---------------------------------------------------------------

    def _observe(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The observation (macro, micro) of the newest candle, or None while the buffer is too short (warm-up)."""
        buffer = self.feed.buffer
        obs = self.observer.observation(buffer)
        if obs is None:
            log.warning("observation_unavailable", candles=len(buffer), needed=self.history)
        return obs

    def _decide(self, w: _TickWork, obs: tuple[np.ndarray, np.ndarray] | None) -> None:
        """The policy's probabilities and action (given an observation), the target position and its reason."""
        cfg, mem = self.config, self.mem
        assert mem is not None
        position = mem.ledger.position
        if obs is not None:
            w.macro, w.micro = obs
            w.probs, w.action = self._policy(w.t, w.macro, w.micro, position)
        if w.halted:
            w.target, w.reason = 0, "halt"
        elif w.flatten:
            w.target, w.reason = 0, "flatten"
        elif w.decides:
            w.target, w.reason = int(target_position(w.action, position, cfg.position_mode)), "policy"
            if w.paused and w.target not in (0, position):
                # No new entry while paused: flat stays flat, a flip stops at flat; exits and holds go through.
                w.target, w.reason = 0, "paused"
        else:
            w.target, w.reason = position, "between_decisions"

    def _policy(
        self, t: int, macro: np.ndarray, micro: np.ndarray, position: int
    ) -> tuple[tuple[float, float, float], int]:
        """Eval-mode probabilities for the current position state and the action drawn (or taken greedily)."""
        table = probs_for_all_positions(
            self.learner.model, torch.from_numpy(macro[None]), torch.from_numpy(micro[None])
        )
        probs_row = table[0, position + 1].double().numpy()
        probs = (float(probs_row[0]), float(probs_row[1]), float(probs_row[2]))
        if self.config.greedy:
            return probs, greedy_action(probs_row)
        return probs, sample_action(probs_row, float(decision_uniforms(self.config.seed, t)))

    def _execute(self, w: _TickWork) -> None:
        """The broker records the order intent (live: commits it), trades to the target and books the ledger."""
        mem = self.mem
        assert mem is not None
        if w.target == mem.ledger.position:
            return
        # Between decisions nothing was evaluated: a halt's flattening order carries NaN probabilities.
        decision = Decision(
            self.config.symbol,
            w.t,
            w.probs or (math.nan,) * 3,
            w.action,
            w.position_before,
            self.learner.version,
            w.reason,
        )
        ref_price, ref_source = self.feed.market.fill_reference(w.candle)
        w.result = self.broker.execute(decision, w.target, mem.ledger, ref_price, self.store, ref_source=ref_source)

    # --- record ---------------------------------------------------------------------------------

    def _record(self, w: _TickWork) -> TickOutcome:
        """Every write of the tick's outcome: order status, fills, episode step, decision row, ledger and meta."""
        store, mem = self.store, self.mem
        assert mem is not None
        result = w.result
        if result.intent is not None:
            store.set_order_status(result.intent.client_order_id, result.status, result.reject_reason)
            for fill in result.fills:
                store.insert_fill(result.intent.client_order_id, w.t, fill)
        w.position_after = mem.ledger.position
        w.equity_after = mem.ledger.equity(w.candle.close)
        w.status, w.reject_reason = _status(w)
        for fill in result.fills:
            self._notify_trade(w, fill)
        if w.flatten:
            self._finish_flatten(w)
        if not w.halted and w.macro is not None and w.micro is not None:
            self._add_step(w, w.macro, w.micro)
        store.insert_decision(self._decision_row(w))
        store.set_meta_many(
            {
                "ledger": mem.ledger.to_dict(),
                "peak_equity": w.peak,
                "halt": w.halt,
                "last_candle": {"ts_ms": w.t, "close": w.candle.close},
            }
        )
        self._save_broker_status()
        mem.last_decision_ts_ms = w.t
        return self._outcome(w)

    def _add_step(self, w: _TickWork, macro: np.ndarray, micro: np.ndarray) -> None:
        """Append the decision to the open episode (opening one), with what settling and learning need."""
        mem = self.mem
        assert mem is not None
        if mem.episode is None:
            mem.episode = _Episode(self.store.create_episode(w.t), 0, 0, None)
        ep = mem.episode
        w.episode_id, w.episode_step = ep.id, ep.steps
        self.store.add_step(
            ep.id,
            ep.steps,
            w.t,
            macro,
            micro,
            w.position_before,
            w.action,
            w.equity_before,
            decision_close=w.candle.close,
            volatility=self._ex_ante_volatility(),
        )
        mem.unsettled = _Unsettled(ep.id, ep.steps, w.t, w.equity_before)
        ep.steps += 1
        ep.last_ts_ms = w.t

    def _decision_row(self, w: _TickWork) -> dict[str, Any]:
        """The decisions-table row of an acted, rejected, halted or kept tick."""
        result, probs = w.result, w.probs
        return {
            "ts_ms": w.t,
            "status": w.status,
            "action": w.action,
            "p_hold": probs[0] if probs else None,
            "p_buy": probs[1] if probs else None,
            "p_sell": probs[2] if probs else None,
            "model_version": self.learner.version,
            "position_before": w.position_before,
            "target_position": w.target,
            "position_after": w.position_after,
            "close": w.candle.close,
            "fill_price": result.fill_price,
            "qty_base": sum(f.qty_base for f in result.fills),
            "fee_quote": result.fee_quote,
            "equity_before": w.equity_before,
            "equity_after": w.equity_after,
            "episode_id": w.episode_id,
            "episode_step": w.episode_step,
            "reason": w.reject_reason
            if result.status in ("rejected", "paused", "unknown")
            else (None if w.reason == "policy" else w.reason),
            "latency_ms": (self._perf() - w.t_in) * 1e3,
        }

    def _outcome(self, w: _TickWork) -> TickOutcome:
        """What the recorded tick did (latency and feed time are filled in after the commit)."""
        mem = self.mem
        assert mem is not None
        return TickOutcome(
            ts_ms=w.t,
            status=w.status,
            action=w.action,
            probs=w.probs,
            position_before=w.position_before,
            position_after=w.position_after,
            equity=w.equity_after,
            fee_quote=w.result.fee_quote,
            model_version=self.learner.version,
            episode_id=w.episode_id,
            episode_step=w.episode_step,
            k=mem.k,
            latency_ms=0.0,
            feed_ms=0.0,
            reason=w.reject_reason or (None if w.halted or w.reason == "policy" else w.reason),
        )

    def _ex_ante_volatility(self) -> float | None:
        """The market's ex-ante volatility per decision interval at the newest close (the checkpoint's
        vol_window of one-candle log returns, as training computes it); None if the buffer is too short."""
        window = int(self.learner.train_config.vol_window)
        closes = self.feed.buffer.closes(window + 1)
        vol = float(ex_ante_volatility(closes, window, self.decide_every)[-1])
        return vol if math.isfinite(vol) and vol > 0 else None

    def _settling_candle(self, step_ts_ms: int) -> Candle | None:
        """The candle whose close settles the step decided on step_ts_ms: normally candle t + K (K = 1: the next).

        If the exchange never produced it (an outage hole inside the buffer), the first candle after it
        was due. If the buffer no longer reaches back to the step (a downtime longer than the window, after
        which it was refilled), None: the step cannot be settled and is left out of learning.
        """
        buffer = self.feed.buffer
        due = step_ts_ms + self.decide_every * CANDLE_MS
        row = buffer.index_of(due)
        if row is not None:
            return buffer.candle(row)
        if len(buffer) and int(buffer.ts_ms[0]) <= step_ts_ms:
            return buffer.first_after(due - CANDLE_MS)
        return None

    def _next_open(self, step_ts_ms: int) -> float | None:
        """The open of the candle after the step's (a replay's and the backtest's fill price), if held."""
        buffer = self.feed.buffer
        row = buffer.index_of(step_ts_ms + CANDLE_MS)
        if row is not None:
            return buffer.candle(row).open
        nxt = buffer.first_after(step_ts_ms) if len(buffer) and int(buffer.ts_ms[0]) <= step_ts_ms else None
        return None if nxt is None else nxt.open

    def _record_skip(self, t: int, reason: str, position: int, t_in: float, close: float | None = None) -> TickOutcome:
        """Record a tick that acts on nothing (stale feed, warm-up, orders to settle): its decision row only."""
        mem = self.mem
        assert mem is not None
        last = self.feed.buffer.last_ts_ms
        equity = None
        if last is not None:
            last_close = self.feed.buffer.last().close
            equity = mem.ledger.equity(last_close)
            self.store.set_meta("last_candle", {"ts_ms": last, "close": last_close})
        self.store.insert_decision(
            {
                "ts_ms": t,
                "status": "skipped",
                "model_version": self.learner.version,
                "position_before": position,
                "position_after": position,
                "close": close,
                "equity_before": equity,
                "equity_after": equity,
                "reason": reason,
                "latency_ms": (self._perf() - t_in) * 1e3,
            }
        )
        mem.last_decision_ts_ms = t
        return TickOutcome(
            t,
            "skipped",
            None,
            None,
            position,
            position,
            equity,
            0.0,
            self.learner.version,
            None,
            None,
            mem.k,
            0.0,
            0.0,
            reason=reason,
        )

    def _close_episode(self, ep: _Episode, *, truncated: bool, reason: str | None, force_discard: bool = False) -> bool:
        """Close the open episode; True when it awaits an update (status pending)."""
        cfg, mem = self.config, self.mem
        assert mem is not None
        min_steps = max(cfg.min_episode_steps, 2)  # returns are normalised over the steps: one is not enough
        if force_discard or (truncated and ep.settled < min_steps) or ep.settled < 2:
            status = "discarded"
            log.warning(
                "episode_discarded", episode_id=ep.id, settled_steps=ep.settled, min_steps=min_steps, reason=reason
            )
        elif not cfg.online_learning:
            status = "frozen"
        else:
            status = "pending"
        self.store.close_episode(ep.id, status, truncated=truncated, reason=reason)
        log.info(
            "episode_closed", episode_id=ep.id, status=status, steps=ep.steps, settled=ep.settled, truncated=truncated
        )
        mem.episode = None
        # A step still unsettled when its episode closes (a truncation) is left out of the update for good.
        if mem.unsettled is not None and mem.unsettled.episode_id == ep.id:
            mem.unsettled = None
        return status == "pending"

    # --- learning -------------------------------------------------------------------------------

    def _learn_pending(self) -> UpdateOutcome | None:
        """Run the update of every pending episode (normally one); record each after its checkpoint is saved."""
        store = self.store
        assert self.mem is not None
        halt = store.get_meta("halt") or {}
        if halt.get("halted"):
            return None
        last: UpdateOutcome | None = None
        for ep in store.pending_episodes():
            if not self.config.online_learning:
                with store.transaction():
                    store.finish_episode(int(ep["id"]), "frozen", None, "online learning off")
                continue
            last = self._learn_episode(ep)
        return last

    def _learn_episode(self, ep: dict[str, Any]) -> UpdateOutcome:
        """One pending episode's update: learn (the learner saves the checkpoint), record it, prune, log."""
        mem = self.mem
        assert mem is not None
        batch = self.store.episode_batch(int(ep["id"]))
        outcome = self.learner.learn(batch, mem.k, mem.macro_updates)
        learned = outcome.status == "learned"
        # A rejected or rolled-back update leaves the episode `rejected` (its update does not apply); the
        # updates row says which. k advances either way: the row holds k, and its seeds are spent (redoing
        # them on the same episode would give the same update). macro_updates counts applied updates only.
        status = ("truncated_learned" if ep["truncated"] else "learned") if learned else "rejected"
        self._record_update(outcome, status, learned)
        if learned:
            self.learner.prune(self.store.checkpoint_refs())
        _log_update(outcome, status)
        return outcome

    def _record_update(self, outcome: UpdateOutcome, status: str, learned: bool) -> None:
        """Record an update in its own transaction (row, episode, rhythm, new model), then advance the cache."""
        store, mem = self.store, self.mem
        assert mem is not None
        k_next = mem.k + 1
        macro_next = mem.macro_updates + int(learned and outcome.learn_macro)
        with store.transaction():
            store.record_update(_update_row(outcome))
            if outcome.status == "rolled_back":
                self._event("update_rolled_back", _rollback_detail(outcome), mem.last_decision_ts_ms)
            store.finish_episode(outcome.episode_id, status, outcome.k, outcome.reason)
            store.set_meta("rhythm", {"k": k_next, "macro_updates": macro_next})
            if learned:
                model = {
                    "version": outcome.model_version,
                    "checkpoint_path": outcome.checkpoint_path,
                    "source": "online",
                    "objective": self.bundle.objective,
                    "decide_every": self.decide_every,
                }
                store.set_meta("model", model)
                mem.model = model
            store.prune_episode_blobs(outcome.episode_id - KEEP_EPISODE_BLOBS)
        mem.k, mem.macro_updates = k_next, macro_next

    # --- operator commands (docs/design.md §13) ---------------------------------------------------------

    def _apply_commands(self, t: int) -> list[dict[str, Any]]:
        """Apply the pending commands oldest first (inside the tick's transaction); the pending flattens.

        pause, resume and clear_halt are applied here; a flatten is returned for this tick to execute and is
        applied (or left pending) by `_record`. A tick that is a skip returns before `_record`: its flattens
        stay pending for the next tick that can trade. A tick that raises rolls all of it back.
        """
        flatten: list[dict[str, Any]] = []
        for cmd in self.store.pending_commands():
            kind = cmd["kind"]
            if kind == "flatten":
                flatten.append(cmd)
            elif kind == "pause":
                self._finish_command(cmd, "applied", self._set_paused(cmd, True), t)
            elif kind == "resume":
                self._finish_command(cmd, "applied", self._set_paused(cmd, False), t)
            elif kind == "clear_halt":
                self._finish_command(cmd, "applied", self._clear_halt(cmd, t), t)
            else:  # the table's CHECK constraint admits no other kind; a hand-edited row can never apply
                self._finish_command(cmd, "rejected", {"reason": f"unknown command {kind!r}"}, t)
        return flatten

    def _set_paused(self, cmd: dict[str, Any], paused: bool) -> dict[str, Any]:
        """pause / resume: the meta `paused`; a pause that is already in force (or a resume without one) is a no-op."""
        current = self.store.get_meta("paused") or {"paused": False}
        if bool(current.get("paused")) == paused:
            return {"changed": False, "paused": paused}
        self.store.set_meta(
            "paused",
            {"paused": paused, "by": cmd["requested_by"], "at_ms": wall_ms(), "command_id": int(cmd["id"])},
        )
        return {"changed": True, "paused": paused}

    def _clear_halt(self, cmd: dict[str, Any], t: int) -> dict[str, Any]:
        """clear_halt: what `ritmo resume` does (halt cleared, peak reset to the current equity, `resume` event)."""
        assert self.mem is not None
        detail = clear_halt(self.store, self.mem.ledger, {"by": cmd["requested_by"], "command_id": cmd["id"]})
        if detail is None:
            return {"changed": False, "halted": False}
        self._event("resume", detail, candle_ts_ms=t)
        return {
            "changed": True,
            "previous_reason": detail["previous"].get("reason"),
            "peak_equity": detail["peak_equity_reset_to"],
        }

    def _finish_flatten(self, w: _TickWork) -> None:
        """Apply this tick's flatten commands once the position is flat; a paused or ambiguous order leaves them
        pending (the next tick tries again), an order the broker refused rejects them (never retried blindly)."""
        mem = self.mem
        assert mem is not None
        result = w.result
        if result.status == "rejected":
            outcome = {"reason": f"flatten order refused: {result.reject_reason}", "position": mem.ledger.position}
            for cmd in w.flatten:
                self._finish_command(cmd, "rejected", outcome, w.t)
            return
        if result.status in ("paused", "unknown") or mem.ledger.position != 0:
            log.warning("command_deferred", kind="flatten", ids=[c["id"] for c in w.flatten], order=result.status)
            return
        outcome = {
            "changed": w.position_before != 0,
            "position_before": w.position_before,
            "client_order_id": result.intent.client_order_id if result.intent else None,
            "qty_base": sum(f.qty_base for f in result.fills),
            "fill_price": result.fill_price,
            "fee_quote": result.fee_quote,
        }
        for cmd in w.flatten:
            self._finish_command(cmd, "applied", outcome, w.t)

    def _finish_command(self, cmd: dict[str, Any], status: str, result: dict[str, Any], t: int) -> None:
        """Audit one command: its row (status, candle, result), a `command` event (notified), a log line."""
        self.store.finish_command(int(cmd["id"]), status, result, candle_ts_ms=t)
        detail = {
            "id": int(cmd["id"]),
            "kind": cmd["kind"],
            "requested_by": cmd["requested_by"],
            "requested_at_ms": cmd["requested_at_ms"],
            "status": status,
            "result": result,
        }
        (log.info if status == "applied" else log.warning)(
            "command_applied" if status == "applied" else "command_rejected",
            id=detail["id"],
            kind=cmd["kind"],
            requested_by=cmd["requested_by"],
            result=result,
        )
        self._event("command", detail, candle_ts_ms=t)

    # --- events and notifications ---------------------------------------------------------------

    def _event(self, kind: str, detail: dict[str, Any] | None = None, candle_ts_ms: int | None = None) -> None:
        """The one way the daemon records an event: the events row and (notifications on) its outbox row, in the
        caller's transaction, so an event and its notification commit or roll back together."""
        self.store.add_event(kind, detail, candle_ts_ms=candle_ts_ms)
        self._notify(kind, detail or {})

    def _notify(self, kind: str, detail: dict[str, Any]) -> None:
        """Queue the notification of an event or fill (when notifications are on and the kind is notified)."""
        if not self.config.notify:
            return
        message = message_for(kind, detail, {"mode": self.config.mode, "symbol": self.config.symbol})
        if message is not None:
            title, body, level = message
            self.store.enqueue_notification(kind, title, body, level)

    def _notify_trade(self, w: _TickWork, fill: Any) -> None:
        """A `trade` notification per fill (the fills table is the record: no events row)."""
        self._notify(
            "trade",
            {
                "side": fill.side,
                "qty_base": fill.qty_base,
                "price": fill.price,
                "fee_quote": fill.fee_quote,
                "position_before": fill.position_before,
                "position_after": fill.position_after,
                "reason": w.reason,
                "equity": w.equity_after,
                "candle_ts_ms": w.t,
            },
        )

    def _daily_summary(self, t: int) -> None:
        """At the first tick of a UTC day, the previous day's summary (an event, once per day: meta key
        `daily_summary` holds the last day summarised, so a restart does not repeat it)."""
        day_start = t - t % DAY_MS
        prev_start = day_start - DAY_MS
        done = self.store.get_meta("daily_summary") or {}
        if int(done.get("day_start_ms", -1)) >= prev_start:
            return
        day = iso_utc(prev_start)[:10]
        self.store.set_meta("daily_summary", {"day": day, "day_start_ms": prev_start})
        activity = self.store.day_activity(prev_start, day_start)
        if activity is None:  # the daemon did not run that day: nothing to sum up
            return
        start = activity["equity_start"]
        pnl = activity["equity"] - start if start else None
        detail = {
            "day": day,
            **activity,
            "pnl_quote": pnl,
            "pnl_pct": 100.0 * pnl / start if pnl is not None and start else None,
        }
        log.info("daily_summary", **detail)
        self._event("daily_summary", detail, candle_ts_ms=t)

    def record_stop(self, reason: str, exit_code: int = 0) -> None:
        """Record (and notify) the daemon's stop: `ritmo run` calls it after the last tick, before closing the state."""
        store = self.store
        with store.transaction():
            ledger = Ledger.from_dict(store.get_meta("ledger"))
            last = store.get_meta("last_candle") or {}
            detail = {
                "reason": reason,
                "exit_code": int(exit_code),
                "equity": marked_equity(ledger, last),
                "position": ledger.position,
            }
            self._event("stop", detail, candle_ts_ms=last.get("ts_ms"))

    # --- end of a replay ------------------------------------------------------------------------

    def mark_end(self, end_ms: int) -> dict[str, Any]:
        """Mark the ledger at the close of the last candle before end_ms (a replay's end; nothing is traded)."""
        mem = self.mem
        assert mem is not None
        self.feed.update(end_ms)
        candle = self.feed.buffer.last()
        equity = mem.ledger.equity(candle.close)
        summary = {
            "ts_ms": candle.ts_ms,
            "close": candle.close,
            "equity": equity,
            "position": mem.ledger.position,
            "fees_quote": mem.ledger.fees_quote,
            "n_trades": mem.ledger.n_trades,
            "k": mem.k,
            "macro_updates": mem.macro_updates,
        }
        with self.store.transaction():
            self.store.set_meta("last_candle", {"ts_ms": candle.ts_ms, "close": candle.close})
            self._event("mark", summary, candle_ts_ms=candle.ts_ms)
        return summary

    # --- logging --------------------------------------------------------------------------------

    def _log_tick(self, o: TickOutcome) -> None:
        L = self.config.episode_steps
        log.info(
            "tick",
            ts=iso_utc(o.ts_ms),
            status=o.status,
            action=ACTION_NAMES[o.action] if o.action is not None else None,
            probs=[round(p, 6) for p in o.probs] if o.probs else None,
            position_before=o.position_before,
            position_after=o.position_after,
            equity=round(o.equity, 6) if o.equity is not None else None,
            fee_quote=round(o.fee_quote, 8),
            model_version=o.model_version,
            episode_id=o.episode_id,
            episode_step=None if o.episode_step is None else f"{o.episode_step + 1}/{L}",
            k=self.mem.k if self.mem else o.k,
            latency_ms=round(o.latency_ms, 3),
            feed_ms=round(o.feed_ms, 3),
            reason=o.reason,
        )

    def status_line(self, o: TickOutcome) -> str:
        """One line for systemd's STATUS=."""
        act = ACTION_NAMES[o.action] if o.action is not None else "-"
        eq = f"{o.equity:.2f}" if o.equity is not None else "?"
        return f"{iso_utc(o.ts_ms)} {o.status} {act} position={o.position_after} equity={eq} k={o.k}"


def _status(w: _TickWork) -> tuple[str, str | None]:
    """The tick's status, and why its order did not fill (rejected, paused, outcome unknown) if it did not."""
    result = w.result
    if w.halted:
        status = "halted"
    elif result.status in ("rejected", "paused"):
        status = "rejected"
    else:
        status = "acted" if w.decides else "kept"
    reject_reason = result.reject_reason
    if result.status == "paused":
        reject_reason = f"paused: {result.reject_reason}"
    elif result.status == "unknown":
        reject_reason = f"order outcome unknown, reconciled next tick: {result.reject_reason}"
    return status, reject_reason


def _log_update(outcome: UpdateOutcome, status: str) -> None:
    """The canonical `online_update` line of one update."""
    log.info(
        "online_update",
        k=outcome.k,
        episode_id=outcome.episode_id,
        status=status,
        parts=outcome.parts,
        steps=outcome.steps,
        loss=outcome.loss,
        method=outcome.method,
        entropy=None if outcome.after is None else round(outcome.after.entropy, 6),
        max_trade_prob=None if outcome.after is None else round(outcome.after.max_trade_prob, 6),
        wall_ms=round(outcome.wall_ms, 1),
        model_version=outcome.model_version,
        checkpoint=outcome.checkpoint_path,
    )


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _update_row(o: UpdateOutcome) -> dict[str, Any]:
    """The updates-table row of one online update (non-finite figures as NULL)."""
    return {
        "k": o.k,
        "episode_id": o.episode_id,
        "status": o.status,
        "parts": ",".join(o.parts),
        "steps": o.steps,
        "loss": _finite_or_none(o.loss),
        "applied": int(o.applied),
        "checkpoint_path": o.checkpoint_path,
        "model_version": o.model_version,
        "wall_ms": o.wall_ms,
        "reason": o.reason,
        "method": o.method,
        "entropy_before": _finite_or_none(o.before.entropy) if o.before else None,
        "entropy_after": _finite_or_none(o.after.entropy) if o.after else None,
        "trade_prob_before": _finite_or_none(o.before.max_trade_prob) if o.before else None,
        "trade_prob_after": _finite_or_none(o.after.max_trade_prob) if o.after else None,
    }


def _rollback_detail(o: UpdateOutcome) -> dict[str, Any]:
    """The `update_rolled_back` event's detail: which update, why, and the guard's figures."""
    row = _update_row(o)
    detail = {key: row[key] for key in ("k", "episode_id", "reason", "method", "loss")}
    detail.update(
        entropy_before=row["entropy_before"],
        entropy_after=row["entropy_after"],
        max_trade_prob_before=row["trade_prob_before"],
        max_trade_prob_after=row["trade_prob_after"],
    )
    return detail


def checkpoint_dir_for(state_db: Path) -> Path:
    """Online checkpoints of one state database: STATE_DIR/checkpoints/<db name without suffix>/."""
    return state_db.parent / "checkpoints" / state_db.stem


__all__ = ["HOLD", "Daemon", "DaemonConfig", "TickOutcome", "checkpoint_dir_for"]
