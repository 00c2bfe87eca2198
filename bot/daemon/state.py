"""The daemon's state: one SQLite database per mode and symbol (`settings.state_db_path`), WAL mode.

Tables (schema version in `PRAGMA user_version`; a database newer than this code is refused):
  meta           key -> JSON value: ledger, peak equity, halt, rhythm (k, macro updates), model (version,
                 checkpoint path), last candle seen (ts, close), seed, mode/symbol/position mode, settings
                 that must not change under a running state (episode steps), replay parameters.
  decisions      one row per candle ticked on (ts_ms PK: a replayed tick cannot act twice): status
                 acted|rejected|halted|skipped|kept (kept: a candle between two decisions of a checkpoint
                 with decide_every K > 1: equity marked, position held, no probabilities), probabilities,
                 action, model version, position and equity before/after, close, fill price, fee, episode
                 step, latency.
  orders         client_order_id PK, status intent|sent|filled|rejected|unknown (live reconciles on start).
  fills          one row per fill: price, qty, fee (quote), side, position after.
  episodes       id, status open|pending|learned|truncated_learned|discarded|rejected|frozen, steps, k
                 (rejected: its update did not apply, either rejected or rolled back by the learning guard).
  episode_steps  (episode_id, step): observation blobs (float32 macro + micro), position, action, equity
                 before the step's fill, reward (NULL until candle t+K closes); since v3 also the prices the
                 counterfactual online update replays: the decision candle's close, the next candle's open,
                 the settling close (candle t+K) and the ex-ante volatility at the decision (NULL in older rows).
  updates        k PK: one row per online update: status learned|rejected|rolled_back (v3), parts, loss,
                 applied, checkpoint path, model version; since v3 the reason, the update's method (card,
                 group, card_fallback) and the learning guard's figures before and after it.
  events         start, stop, halt, resume, gaps, checkpoint fallbacks: what an operator wants to read back.

Durability: every write of a tick happens inside one `BEGIN IMMEDIATE ... COMMIT`. In WAL mode a
committed transaction is in the WAL file before COMMIT returns, so `kill -9` at any instant leaves either
the whole tick or none of it. `synchronous=FULL` (paper, live) also fsyncs the WAL on every commit, so a
power cut loses nothing committed either; replays use NORMAL (durable against a process kill, which is what
the crash test exercises; a power cut could lose the last ticks of a replay, which can simply be re-run).

Threads: APScheduler runs the tick in a worker thread. The connection is opened with
check_same_thread=False and used by one thread at a time (the daemon's tick lock serialises start-up,
ticks and shutdown); Python's sqlite3 module is built threadsafe (serialized) anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bot.clock import wall_ms
from bot.errors import ConfigError, RitmoError
from bot.files.paths import os_problem, probe_directory
from strategies.accounting import Fill

if TYPE_CHECKING:  # the journal records brokers' intents; the state itself never trades
    from bot.brokers.base import OrderIntent

SCHEMA_VERSION = 4

# The columns after `status` of the decisions table, the same in every schema version.
_DECISION_COLUMNS = """    action INTEGER CHECK (action IN (0, 1, 2)),
    p_hold REAL, p_buy REAL, p_sell REAL,
    model_version TEXT,
    position_before INTEGER NOT NULL,
    target_position INTEGER,
    position_after INTEGER NOT NULL,
    close REAL,
    fill_price REAL,
    qty_base REAL NOT NULL DEFAULT 0,
    fee_quote REAL NOT NULL DEFAULT 0,
    equity_before REAL,
    equity_after REAL,
    episode_id INTEGER,
    episode_step INTEGER,
    reason TEXT,
    latency_ms REAL,
    created_at_ms INTEGER NOT NULL"""

# The columns after `status` of the updates table as v1 created them (v3 appends the guard's).
_UPDATE_COLUMNS = """    parts TEXT NOT NULL,
    steps INTEGER NOT NULL,
    loss REAL,
    applied INTEGER NOT NULL,
    checkpoint_path TEXT,
    model_version TEXT,
    wall_ms REAL,
    created_at_ms INTEGER NOT NULL"""

_SCHEMA_V1 = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE decisions (
    ts_ms INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('acted', 'rejected', 'halted', 'skipped')),
{decision_columns}
);

CREATE TABLE orders (
    client_order_id TEXT PRIMARY KEY,
    decision_ts_ms INTEGER NOT NULL,
    symbol TEXT NOT NULL,
    side TEXT NOT NULL CHECK (side IN ('buy', 'sell')),
    qty_base REAL NOT NULL,
    ref_price REAL NOT NULL,
    target_position INTEGER NOT NULL,
    reason TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL CHECK (status IN ('intent', 'sent', 'filled', 'rejected', 'unknown')),
    detail TEXT,
    exchange_order_id TEXT,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX orders_status ON orders (status) WHERE status IN ('intent', 'sent', 'unknown');

CREATE TABLE fills (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client_order_id TEXT NOT NULL REFERENCES orders (client_order_id),
    decision_ts_ms INTEGER NOT NULL,
    side TEXT NOT NULL CHECK (side IN ('buy', 'sell')),
    qty_base REAL NOT NULL,
    price REAL NOT NULL,
    fee_quote REAL NOT NULL,
    notional_quote REAL NOT NULL,
    position_before INTEGER NOT NULL,
    position_after INTEGER NOT NULL,
    trade_id TEXT,
    created_at_ms INTEGER NOT NULL
);

CREATE TABLE episodes (
    id INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN
        ('open', 'pending', 'learned', 'truncated_learned', 'discarded', 'rejected', 'frozen')),
    start_ts_ms INTEGER NOT NULL,
    end_ts_ms INTEGER,
    steps INTEGER NOT NULL DEFAULT 0,
    settled INTEGER NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0,
    k INTEGER,
    reason TEXT,
    closed_at_ms INTEGER
);
CREATE INDEX episodes_status ON episodes (status) WHERE status IN ('open', 'pending');

CREATE TABLE episode_steps (
    episode_id INTEGER NOT NULL REFERENCES episodes (id),
    step INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL UNIQUE,
    macro BLOB,
    micro BLOB,
    position INTEGER NOT NULL,
    action INTEGER NOT NULL,
    equity_before REAL NOT NULL,
    reward REAL,
    PRIMARY KEY (episode_id, step)
) WITHOUT ROWID;

CREATE TABLE updates (
    k INTEGER PRIMARY KEY,
    episode_id INTEGER NOT NULL REFERENCES episodes (id),
    status TEXT NOT NULL CHECK (status IN ('learned', 'rejected')),
{update_columns}
);

CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    candle_ts_ms INTEGER,
    kind TEXT NOT NULL,
    detail TEXT
);
""".replace("{decision_columns}", _DECISION_COLUMNS).replace("{update_columns}", _UPDATE_COLUMNS)

# v3: the decision interval (decisions status `kept`), the counterfactual online update (the prices of each
# step) and the learning guard (updates status `rolled_back`, its figures). SQLite cannot change a CHECK
# constraint in place, so decisions and updates are rebuilt; no foreign key points at either of them.
_MIGRATION_V3 = """
CREATE TABLE decisions_v3 (
    ts_ms INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('acted', 'rejected', 'halted', 'skipped', 'kept')),
{decision_columns}
);
INSERT INTO decisions_v3 SELECT ts_ms, status, action, p_hold, p_buy, p_sell, model_version, position_before,
    target_position, position_after, close, fill_price, qty_base, fee_quote, equity_before, equity_after,
    episode_id, episode_step, reason, latency_ms, created_at_ms FROM decisions;
DROP TABLE decisions;
ALTER TABLE decisions_v3 RENAME TO decisions;

CREATE TABLE updates_v3 (
    k INTEGER PRIMARY KEY,
    episode_id INTEGER NOT NULL REFERENCES episodes (id),
    status TEXT NOT NULL CHECK (status IN ('learned', 'rejected', 'rolled_back')),
{update_columns},
    reason TEXT,
    method TEXT,
    entropy_before REAL,
    entropy_after REAL,
    trade_prob_before REAL,
    trade_prob_after REAL
);
INSERT INTO updates_v3 (k, episode_id, status, parts, steps, loss, applied, checkpoint_path, model_version,
    wall_ms, created_at_ms) SELECT k, episode_id, status, parts, steps, loss, applied, checkpoint_path,
    model_version, wall_ms, created_at_ms FROM updates;
DROP TABLE updates;
ALTER TABLE updates_v3 RENAME TO updates;

ALTER TABLE episode_steps ADD COLUMN decision_close REAL;
ALTER TABLE episode_steps ADD COLUMN next_open REAL;
ALTER TABLE episode_steps ADD COLUMN settle_close REAL;
ALTER TABLE episode_steps ADD COLUMN volatility REAL
""".replace("{decision_columns}", _DECISION_COLUMNS).replace("{update_columns}", _UPDATE_COLUMNS)

# v4: the operator's cockpit. `commands`: control actions (`ritmo serve`, the CLI) that the daemon applies at
# its next tick, in the tick's transaction, with who asked and when. `outbox`: notifications written in the
# transaction of what they report and sent by a background thread with retries (docs/design.md §13).
_MIGRATION_V4 = """
CREATE TABLE commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('pause', 'resume', 'flatten', 'clear_halt')),
    requested_by TEXT NOT NULL,
    requested_at_ms INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'applied', 'rejected')),
    applied_at_ms INTEGER,
    candle_ts_ms INTEGER,
    result TEXT
);
CREATE INDEX commands_pending ON commands (id) WHERE status = 'pending';

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    level TEXT NOT NULL DEFAULT 'info' CHECK (level IN ('info', 'success', 'warning', 'failure')),
    created_at_ms INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    sent_at_ms INTEGER
);
CREATE INDEX outbox_due ON outbox (next_attempt_ms) WHERE status = 'pending';
CREATE INDEX events_kind ON events (kind, id)
"""

# version reached -> SQL that upgrades from the previous version (a new database gets v1, then each of these).
MIGRATIONS: dict[int, str] = {
    # Live crash recovery asks, every tick, whether the candle already has an order.
    2: "CREATE INDEX orders_decision ON orders (decision_ts_ms)",
    3: _MIGRATION_V3,
    4: _MIGRATION_V4,
}

# Blobs of episodes older than this many episodes are dropped once learned: they are only needed for
# the update, and a year of 5-minute steps would otherwise be ~50 MB of observations.
KEEP_EPISODE_BLOBS = 10

# Control commands an operator may queue for the daemon (docs/design.md §13).
COMMAND_KINDS = ("pause", "resume", "flatten", "clear_halt")


class StateError(RitmoError):
    """The state database cannot be used (newer schema, other mode/symbol, locked by another daemon)."""


@dataclass(frozen=True)
class EpisodeBatch:
    """The settled steps of one episode, ready for a REINFORCE update."""

    episode_id: int
    ts_ms: np.ndarray  # (L,) int64
    macro: np.ndarray  # (L, 3N) float32
    micro: np.ndarray  # (L, 3N) float32
    positions: np.ndarray  # (L,) float32
    actions: np.ndarray  # (L,) int64
    rewards: np.ndarray  # (L,) float64
    # The prices the counterfactual update replays, (L,) float64 each, NaN in steps stored before schema v3
    # (None when not loaded): the decision candle's close, the next candle's open (the replay/backtest fill),
    # the settling close (candle t+K) and the market's ex-ante volatility per decision interval.
    decision_close: np.ndarray | None = None
    next_open: np.ndarray | None = None
    settle_close: np.ndarray | None = None
    volatility: np.ndarray | None = None

    def has_prices(self) -> bool:
        """Whether every step carries finite, positive decision close, next open and settling close."""
        cols = (self.decision_close, self.next_open, self.settle_close)
        if any(c is None or c.shape != self.actions.shape for c in cols):
            return False
        return all(bool(np.isfinite(c).all() and (c > 0).all()) for c in cols)  # type: ignore[union-attr]

    def has_volatility(self) -> bool:
        """Whether every step carries a finite, positive ex-ante volatility."""
        v = self.volatility
        return v is not None and v.shape == self.actions.shape and bool(np.isfinite(v).all() and (v > 0).all())


class StateStore:
    """Typed access to the state database; every daemon write goes through `transaction()`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, lock_fd: int | None = None) -> None:
        self.conn = conn
        self.path = path
        self._lock_fd = lock_fd
        self._in_tx = False

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint the WAL into the database file (best effort) and close; release the daemon lock."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StateStore]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception): the unit of crash safety."""
        if self._in_tx:
            raise RuntimeError("nested state transaction")
        self.conn.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield self
        except BaseException:
            self._in_tx = False
            self.conn.execute("ROLLBACK")
            raise
        self._in_tx = False
        self.conn.execute("COMMIT")

    def commit(self) -> None:
        """Commit what the open transaction holds and continue in a new one (live: intent before send)."""
        if not self._in_tx:
            return
        self.conn.execute("COMMIT")
        self.conn.execute("BEGIN IMMEDIATE")

    # --- meta -----------------------------------------------------------------------------------

    def get_meta(self, key: str, default: Any = None) -> Any:
        """A JSON value of the meta table."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def all_meta(self) -> dict[str, Any]:
        """Every meta value."""
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def set_meta(self, key: str, value: Any) -> None:
        """Set a JSON value (exact float round trip: json uses repr)."""
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value, allow_nan=False)),
        )

    def set_meta_many(self, values: dict[str, Any]) -> None:
        """Set several meta values."""
        self.conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(k, json.dumps(v, allow_nan=False)) for k, v in values.items()],
        )

    # --- decisions ------------------------------------------------------------------------------

    def insert_decision(self, row: dict[str, Any]) -> None:
        """Insert one decision (IntegrityError if this candle was already decided on)."""
        row = {**row, "created_at_ms": row.get("created_at_ms") or wall_ms()}
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.conn.execute(f"INSERT INTO decisions ({cols}) VALUES ({marks})", tuple(row.values()))

    def last_decision(self) -> dict[str, Any] | None:
        """The newest decision row, as a dict."""
        cur = self.conn.execute("SELECT * FROM decisions ORDER BY ts_ms DESC LIMIT 1")
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row, strict=True))

    def decision_count(self, status: str | None = None) -> int:
        """Number of decisions (of one status)."""
        if status is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM decisions").fetchone()[0])
        return int(self.conn.execute("SELECT COUNT(*) FROM decisions WHERE status = ?", (status,)).fetchone()[0])

    # --- orders and fills (the OrderJournal of the brokers) -------------------------------------

    def record_intent(self, intent: OrderIntent) -> None:
        """Insert an order intent with status `intent`."""
        now = wall_ms()
        self.conn.execute(
            "INSERT INTO orders (client_order_id, decision_ts_ms, symbol, side, qty_base, ref_price,"
            " target_position, reason, attempt, status, created_at_ms, updated_at_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'intent', ?, ?)",
            (
                intent.client_order_id,
                intent.decision_ts_ms,
                intent.symbol,
                intent.side,
                intent.qty_base,
                intent.ref_price,
                intent.target_position,
                intent.reason,
                intent.attempt,
                now,
                now,
            ),
        )

    def set_order_status(self, client_order_id: str, status: str, detail: str | None = None) -> None:
        """Move an order to a new status."""
        cur = self.conn.execute(
            "UPDATE orders SET status = ?, detail = COALESCE(?, detail), updated_at_ms = ? WHERE client_order_id = ?",
            (status, detail, wall_ms(), client_order_id),
        )
        if cur.rowcount != 1:
            raise StateError(f"order {client_order_id} is not in the state database")

    def orders_for_candle(self, decision_ts_ms: int) -> list[str]:
        """Client ids of the orders recorded for the decision on this candle."""
        cur = self.conn.execute(
            "SELECT client_order_id FROM orders WHERE decision_ts_ms = ? ORDER BY created_at_ms", (decision_ts_ms,)
        )
        return [str(r[0]) for r in cur.fetchall()]

    def pending_orders(self) -> list[dict[str, Any]]:
        """Orders left in intent/sent/unknown (a crash between intent and result; live reconciles them)."""
        cur = self.conn.execute(
            "SELECT * FROM orders WHERE status IN ('intent', 'sent', 'unknown') ORDER BY created_at_ms"
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def insert_fill(self, client_order_id: str, decision_ts_ms: int, fill: Fill, trade_id: str | None = None) -> None:
        """Record one fill of an order."""
        self.conn.execute(
            "INSERT INTO fills (client_order_id, decision_ts_ms, side, qty_base, price, fee_quote, notional_quote,"
            " position_before, position_after, trade_id, created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                client_order_id,
                decision_ts_ms,
                fill.side,
                fill.qty_base,
                fill.price,
                fill.fee_quote,
                fill.notional_quote,
                fill.position_before,
                fill.position_after,
                trade_id,
                wall_ms(),
            ),
        )

    def fills(self) -> list[dict[str, Any]]:
        """Every fill, oldest first."""
        cur = self.conn.execute("SELECT * FROM fills ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    # --- episodes -------------------------------------------------------------------------------

    def open_episode(self) -> dict[str, Any] | None:
        """The open episode, if any."""
        return self._one("SELECT * FROM episodes WHERE status = 'open' ORDER BY id DESC LIMIT 1")

    def episode(self, episode_id: int) -> dict[str, Any] | None:
        """One episode row."""
        return self._one("SELECT * FROM episodes WHERE id = ?", (episode_id,))

    def pending_episodes(self) -> list[dict[str, Any]]:
        """Closed episodes waiting for their update (a crash between the tick and the update)."""
        cur = self.conn.execute("SELECT * FROM episodes WHERE status = 'pending' ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def create_episode(self, start_ts_ms: int) -> int:
        """A new open episode; returns its id."""
        cur = self.conn.execute("INSERT INTO episodes (status, start_ts_ms) VALUES ('open', ?)", (start_ts_ms,))
        return int(cur.lastrowid or 0)

    def add_step(
        self,
        episode_id: int,
        step: int,
        ts_ms: int,
        macro: np.ndarray,
        micro: np.ndarray,
        position: int,
        action: int,
        equity_before: float,
        *,
        decision_close: float | None = None,
        volatility: float | None = None,
    ) -> None:
        """Append a decision step (reward still unknown) to an episode."""
        self.conn.execute(
            "INSERT INTO episode_steps (episode_id, step, ts_ms, macro, micro, position, action, equity_before,"
            " decision_close, volatility) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                episode_id,
                step,
                ts_ms,
                np.ascontiguousarray(macro, dtype=np.float32).tobytes(),
                np.ascontiguousarray(micro, dtype=np.float32).tobytes(),
                position,
                action,
                equity_before,
                _real(decision_close),
                _real(volatility),
            ),
        )
        self.conn.execute(
            "UPDATE episodes SET steps = steps + 1, end_ts_ms = ? WHERE id = ?",
            (ts_ms, episode_id),
        )

    def settle_step(
        self,
        episode_id: int,
        step: int,
        reward: float,
        *,
        next_open: float | None = None,
        settle_close: float | None = None,
    ) -> None:
        """Set a step's reward (and the prices it was settled with) once its settling candle has closed."""
        cur = self.conn.execute(
            "UPDATE episode_steps SET reward = ?, next_open = ?, settle_close = ?"
            " WHERE episode_id = ? AND step = ? AND reward IS NULL",
            (reward, _real(next_open), _real(settle_close), episode_id, step),
        )
        if cur.rowcount == 1:
            self.conn.execute("UPDATE episodes SET settled = settled + 1 WHERE id = ?", (episode_id,))

    def unsettled_step(self) -> dict[str, Any] | None:
        """The newest step without a reward of the open episode (at most one)."""
        return self._one(
            "SELECT s.episode_id, s.step, s.ts_ms, s.equity_before FROM episode_steps s"
            " JOIN episodes e ON e.id = s.episode_id WHERE s.reward IS NULL AND e.status = 'open'"
            " ORDER BY s.ts_ms DESC LIMIT 1"
        )

    def close_episode(
        self, episode_id: int, status: str, *, truncated: bool = False, reason: str | None = None
    ) -> None:
        """Close an episode (pending = awaiting its update) or finish it (learned, discarded, ...)."""
        self.conn.execute(
            "UPDATE episodes SET status = ?, truncated = MAX(truncated, ?), reason = COALESCE(?, reason),"
            " closed_at_ms = COALESCE(closed_at_ms, ?) WHERE id = ?",
            (status, int(truncated), reason, wall_ms(), episode_id),
        )

    def finish_episode(self, episode_id: int, status: str, k: int | None, reason: str | None = None) -> None:
        """Record the outcome of a pending episode's update."""
        self.conn.execute(
            "UPDATE episodes SET status = ?, k = ?, reason = COALESCE(?, reason) WHERE id = ?",
            (status, k, reason, episode_id),
        )

    def episode_batch(self, episode_id: int) -> EpisodeBatch:
        """The settled steps of an episode in step order (unsettled trailing steps are left out)."""
        rows = self.conn.execute(
            "SELECT ts_ms, macro, micro, position, action, reward, decision_close, next_open, settle_close,"
            " volatility FROM episode_steps WHERE episode_id = ? AND reward IS NOT NULL ORDER BY step",
            (episode_id,),
        ).fetchall()
        if rows and any(r[1] is None for r in rows):
            raise StateError(f"episode {episode_id} has lost its observations (pruned)")
        return EpisodeBatch(
            episode_id=episode_id,
            ts_ms=np.array([r[0] for r in rows], dtype=np.int64),
            macro=np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]) if rows else np.empty((0, 0)),
            micro=np.stack([np.frombuffer(r[2], dtype=np.float32) for r in rows]) if rows else np.empty((0, 0)),
            positions=np.array([r[3] for r in rows], dtype=np.float32),
            actions=np.array([r[4] for r in rows], dtype=np.int64),
            rewards=np.array([r[5] for r in rows], dtype=np.float64),
            decision_close=_column(rows, 6),
            next_open=_column(rows, 7),
            settle_close=_column(rows, 8),
            volatility=_column(rows, 9),
        )

    def prune_episode_blobs(self, keep_after_episode_id: int) -> None:
        """Drop the observation blobs of finished episodes with id <= keep_after_episode_id."""
        self.conn.execute(
            "UPDATE episode_steps SET macro = NULL, micro = NULL WHERE episode_id <= ? AND macro IS NOT NULL"
            " AND episode_id IN (SELECT id FROM episodes WHERE status NOT IN ('open', 'pending'))",
            (keep_after_episode_id,),
        )

    # --- updates and checkpoints ----------------------------------------------------------------

    def record_update(self, row: dict[str, Any]) -> None:
        """One online update (learned or rejected)."""
        row = {**row, "created_at_ms": wall_ms()}
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.conn.execute(f"INSERT INTO updates ({cols}) VALUES ({marks})", tuple(row.values()))

    def checkpoint_refs(self) -> list[tuple[int, str]]:
        """(k, path) of the online checkpoints the database references, newest first."""
        return [
            (int(k), str(p))
            for k, p in self.conn.execute(
                "SELECT k, checkpoint_path FROM updates WHERE checkpoint_path IS NOT NULL ORDER BY k DESC"
            )
        ]

    def last_update(self) -> dict[str, Any] | None:
        """The newest online update row, or None."""
        return self._one("SELECT * FROM updates ORDER BY k DESC LIMIT 1")

    def update_count(self, status: str | None = None) -> int:
        """Number of online updates (of one status)."""
        if status is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0])
        return int(self.conn.execute("SELECT COUNT(*) FROM updates WHERE status = ?", (status,)).fetchone()[0])

    # --- events ---------------------------------------------------------------------------------

    def add_event(self, kind: str, detail: dict[str, Any] | None = None, candle_ts_ms: int | None = None) -> None:
        """Record an operator-visible event."""
        self.conn.execute(
            "INSERT INTO events (at_ms, candle_ts_ms, kind, detail) VALUES (?, ?, ?, ?)",
            (wall_ms(), candle_ts_ms, kind, json.dumps(detail or {}, default=str)),
        )

    def last_event(self, kind: str) -> dict[str, Any] | None:
        """The newest event of one kind, or None."""
        row = self.conn.execute(
            "SELECT id, at_ms, candle_ts_ms, kind, detail FROM events WHERE kind = ? ORDER BY id DESC LIMIT 1",
            (kind,),
        ).fetchone()
        if row is None:
            return None
        return {"id": row[0], "at_ms": row[1], "candle_ts_ms": row[2], "kind": row[3], "detail": json.loads(row[4])}

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Events, oldest first (of one kind)."""
        sql = "SELECT id, at_ms, candle_ts_ms, kind, detail FROM events"
        args: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            args = (kind,)
        rows = self.conn.execute(sql + " ORDER BY id", args).fetchall()
        return [
            {"id": r[0], "at_ms": r[1], "candle_ts_ms": r[2], "kind": r[3], "detail": json.loads(r[4] or "{}")}
            for r in rows
        ]

    # --- operator commands and notifications (docs/design.md §13) --------------------------------

    def add_command(self, kind: str, requested_by: str) -> int:
        """Queue a control command (pause, resume, flatten, clear_halt) for the daemon's next tick; its id."""
        if kind not in COMMAND_KINDS:
            raise ValueError(f"unknown command {kind!r}: expected one of {', '.join(COMMAND_KINDS)}")
        cur = self.conn.execute(
            "INSERT INTO commands (kind, requested_by, requested_at_ms) VALUES (?, ?, ?)",
            (kind, requested_by, wall_ms()),
        )
        return int(cur.lastrowid or 0)

    def pending_commands(self) -> list[dict[str, Any]]:
        """Commands not applied yet, oldest first."""
        return self.commands("pending")

    def finish_command(
        self, command_id: int, status: str, result: dict[str, Any] | None = None, candle_ts_ms: int | None = None
    ) -> None:
        """Mark a command applied (or rejected, with the reason in `result`)."""
        self.conn.execute(
            "UPDATE commands SET status = ?, applied_at_ms = ?, candle_ts_ms = ?, result = ? WHERE id = ?",
            (status, wall_ms(), candle_ts_ms, json.dumps(result or {}, default=str), command_id),
        )

    def enqueue_notification(self, kind: str, title: str, body: str, level: str = "info") -> None:
        """Put one notification in the outbox (sent after the commit by the outbox sender)."""
        now = wall_ms()
        self.conn.execute(
            "INSERT INTO outbox (kind, title, body, level, created_at_ms, next_attempt_ms) VALUES (?, ?, ?, ?, ?, ?)",
            (kind, title, body, level, now, now),
        )

    def commands(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every command (of one status), oldest first, with `result` decoded."""
        rows = self._rows_of("commands", status)
        for row in rows:
            row["result"] = None if row["result"] is None else json.loads(row["result"])
        return rows

    def day_activity(self, start_ms: int, end_ms: int) -> dict[str, Any] | None:
        """What the daemon did on candles opened in [start_ms, end_ms): the equity at its start and end, the
        position at its end, fills and fees; None when no candle of it was marked (the daemon was down)."""
        last = self._one(
            "SELECT equity_after, position_after FROM decisions WHERE ts_ms >= ? AND ts_ms < ?"
            " AND equity_after IS NOT NULL ORDER BY ts_ms DESC LIMIT 1",
            (start_ms, end_ms),
        )
        if last is None:
            return None
        # The equity the day started from: the last mark before it, else the first mark in it.
        before = self.conn.execute(
            "SELECT equity_after FROM decisions WHERE ts_ms < ? AND equity_after IS NOT NULL ORDER BY ts_ms DESC"
            " LIMIT 1",
            (start_ms,),
        ).fetchone()
        if before is None:
            before = self.conn.execute(
                "SELECT equity_before FROM decisions WHERE ts_ms >= ? AND ts_ms < ? AND equity_before IS NOT NULL"
                " ORDER BY ts_ms LIMIT 1",
                (start_ms, end_ms),
            ).fetchone()
        trades, fees = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(fee_quote), 0) FROM fills WHERE decision_ts_ms >= ? AND decision_ts_ms < ?",
            (start_ms, end_ms),
        ).fetchone()
        return {
            "equity_start": None if before is None else float(before[0]),
            "equity": float(last["equity_after"]),
            "position": int(last["position_after"]),
            "trades": int(trades),
            "fees_quote": float(fees),
        }

    def outbox(self, status: str | None = None) -> list[dict[str, Any]]:
        """Outbox rows (of one status), oldest first."""
        return self._rows_of("outbox", status)

    def due_notifications(self, now_ms: int, limit: int = 20) -> list[dict[str, Any]]:
        """Pending notifications whose next attempt is due, oldest first."""
        cur = self.conn.execute(
            "SELECT * FROM outbox WHERE status = 'pending' AND next_attempt_ms <= ? ORDER BY id LIMIT ?",
            (now_ms, limit),
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def claim_notification(self, outbox_id: int, now_ms: int, retry_at_ms: int) -> int | None:
        """Count one more attempt of a due notification and push its next attempt to retry_at_ms (before the
        send, so a crash mid-send is counted and retried later, not at once); its attempts, or None if it is
        no longer due (sent or claimed meanwhile)."""
        cur = self.conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = ?"
            " WHERE id = ? AND status = 'pending' AND next_attempt_ms <= ?",
            (retry_at_ms, outbox_id, now_ms),
        )
        if cur.rowcount != 1:
            return None
        return int(self.conn.execute("SELECT attempts FROM outbox WHERE id = ?", (outbox_id,)).fetchone()[0])

    def finish_notification(self, outbox_id: int, status: str, now_ms: int, error: str | None = None) -> None:
        """Mark a notification sent, failed (given up) or, with status pending, record its last error."""
        self.conn.execute(
            "UPDATE outbox SET status = ?, last_error = COALESCE(?, last_error),"
            " sent_at_ms = CASE WHEN ? = 'sent' THEN ? ELSE sent_at_ms END WHERE id = ?",
            (status, error, status, now_ms, outbox_id),
        )

    # --- helpers --------------------------------------------------------------------------------

    def _rows_of(self, table: str, status: str | None) -> list[dict[str, Any]]:
        """Every row of `commands` or `outbox` (of one status), oldest first, as dicts."""
        assert table in ("commands", "outbox")
        sql, args = f"SELECT * FROM {table}", ()
        if status is not None:
            sql, args = sql + " WHERE status = ?", (status,)
        cur = self.conn.execute(sql + " ORDER BY id", args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        cur = self.conn.execute(sql, args)
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row, strict=True))


def _real(value: float | None) -> float | None:
    """A REAL column's value: None for a missing or non-finite number (SQLite has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


def _column(rows: list[Any], i: int) -> np.ndarray:
    """Column i of the rows as float64, NaN where NULL."""
    return np.array([np.nan if r[i] is None else r[i] for r in rows], dtype=np.float64)


def _connect(path: Path, *, durable: bool, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    if not readonly:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StateError(f"state {path}: cannot switch to WAL journal mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema, or upgrade it step by step; refuse a database written by a newer ritmo."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StateError(
            f"state {path} has schema version {version}, newer than this ritmo understands ({SCHEMA_VERSION}): "
            "upgrade ritmo, or point RITMO_STATE_DIR elsewhere"
        )
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            tables = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
            if tables:
                raise StateError(f"state {path} is an SQLite file but not a ritmo state database")
            for statement in _statements(_SCHEMA_V1):
                conn.execute(statement)
            version = 1
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _statements(MIGRATIONS[target]):
                conn.execute(statement)
        # user_version is part of the transaction: a crash mid-migration leaves the old version intact.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """Split a schema script into statements (executescript would COMMIT the open transaction)."""
    return [s.strip() for s in script.split(";") if s.strip()]


def _lock(path: Path) -> int:
    """An exclusive lock on `<db>.lock`: two daemons on one state would trade twice."""
    try:
        fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StateError(f"state {path} is in use by another ritmo process (lock {path}.lock)") from None
    return fd


def open_state(
    path: str | Path,
    *,
    mode: str,
    symbol: str,
    durable: bool = True,
    lock: bool = True,
) -> StateStore:
    """Open (creating if needed) the state database of one mode and symbol; refuses another's database."""
    path = Path(path)
    try:
        probe_directory(path.parent)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    lock_fd = _lock(path) if lock else None
    try:
        try:
            conn = _connect(path, durable=durable)
            _migrate(conn, path)
        except sqlite3.OperationalError as exc:
            # The directory is writable (probed above), so the database file itself is read-only or unopenable.
            raise ConfigError(f"cannot write state database {path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise StateError(f"state {path}: cannot be read as a ritmo state database ({exc})") from None
        store = StateStore(conn, path, lock_fd)
        stored = (store.get_meta("mode"), store.get_meta("symbol"))
        if stored == (None, None):
            with store.transaction():
                store.set_meta_many({"mode": mode, "symbol": symbol, "created_at_ms": wall_ms()})
        elif stored != (mode, symbol):
            raise StateError(
                f"state {path} belongs to mode={stored[0]} symbol={stored[1]}, not mode={mode} symbol={symbol}"
            )
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    return store


def _unwritable(path: Path, exc: OSError) -> ConfigError:
    """The one-line error for a state directory that cannot be made or written: a settings problem (exit 78)."""
    return ConfigError(f"cannot write state directory {path.parent}: {os_problem(exc)}")


def open_state_readonly(path: str | Path) -> StateStore:
    """Open an existing state database for reading (`ritmo status`): no lock, no schema change."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"no state database at {path} (has the daemon run with this mode, symbol and state dir?)")
    try:
        conn = _connect(path, durable=False, readonly=not os.access(path.parent, os.W_OK))
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise StateError(f"state {path}: cannot be read ({exc})") from None
    if version != SCHEMA_VERSION:
        conn.close()
        raise StateError(f"state {path} has schema version {version}; this ritmo reads version {SCHEMA_VERSION}")
    return StateStore(conn, path)


def open_state_for_update(path: str | Path, *, durable: bool = True) -> StateStore:
    """Open an existing state database for a small write beside the daemon (`ritmo resume`, a command, the
    outbox sender): no daemon lock taken. `durable=False` (synchronous NORMAL) where a write lost to a power
    cut is harmless."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"no state database at {path} (has the daemon run with this mode, symbol and state dir?)")
    try:
        conn = _connect(path, durable=durable)
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.OperationalError as exc:
        raise StateError(f"cannot write state database {path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise StateError(f"state {path}: cannot be read ({exc})") from None
    if version != SCHEMA_VERSION:
        conn.close()
        raise StateError(f"state {path} has schema version {version}; this ritmo writes version {SCHEMA_VERSION}")
    return StateStore(conn, path)
