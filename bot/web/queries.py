"""Read-only queries of `ritmo serve` over the daemon's state databases (docs/design.md §13).

Every request opens its own connection with a read-only URI (`file:...?mode=ro`) and `PRAGMA query_only`,
reads inside one short deferred transaction (one consistent snapshot for the whole answer) and closes it: no
connection is held between requests, so the WAL can always be checkpointed and a tick is never waited on.
In WAL mode readers never block the writer, and the writer never blocks readers; the busy timeout only
covers the rare moments SQLite itself needs (opening while the last writer closes and checkpoints).

The only write of `ritmo serve` is a control command (`queue_command`): one row in `commands`, in one short
transaction on a separate connection, through `StateStore.add_command`.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.daemon.report import buy_hold_ledger, collect_status
from bot.daemon.state import COMMAND_KINDS, SCHEMA_VERSION, StateStore, open_state_for_update
from bot.errors import RitmoError
from strategies.accounting import Ledger
from strategies.actions import ACTION_NAMES
from strategies.candles import iso_utc

# A read waits at most this long for SQLite's own locks (a tick never holds readers off in WAL mode).
READ_BUSY_TIMEOUT_MS = 5_000
# A command insert waits this long for the daemon's write transaction (a tick, or a live order's round trip).
WRITE_BUSY_TIMEOUT_MS = 15_000
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class ApiError(Exception):
    """An answer other than 200: its HTTP status and a one-line message for the JSON body."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


@dataclass(frozen=True)
class StateRef:
    """One state database served: its id in URLs (the file stem) and its path."""

    id: str
    path: Path


class StateCatalog:
    """The state databases `ritmo serve` is pointed at, looked up afresh on every call.

    A directory serves every `*.sqlite` in it and in its direct subdirectories (the per-symbol template
    `ritmo@.service` keeps `/var/lib/ritmo/<instance>/`), so a state the daemon creates after `ritmo serve`
    started appears without a restart. Files named explicitly are served even before they exist (503 until then).
    """

    def __init__(self, dirs: Sequence[Path] = (), files: Sequence[Path] = ()) -> None:
        self.dirs = tuple(Path(d) for d in dirs)
        self.files = tuple(Path(f) for f in files)

    def refs(self) -> list[StateRef]:
        """Every state served, with unique URL-safe ids."""
        paths: list[Path] = list(self.files)
        for d in self.dirs:
            paths += sorted(d.glob("*.sqlite")) + sorted(d.glob("*/*.sqlite"))
        refs: list[StateRef] = []
        seen: set[str] = set()
        for path in dict.fromkeys(paths):  # a file named twice is served once
            base = _ID_UNSAFE.sub("_", path.stem) or "state"
            state_id = base
            if state_id in seen:  # the same mode and symbol in two instances' directories
                state_id = _ID_UNSAFE.sub("_", f"{path.parent.name}.{path.stem}")
            n = 2
            while state_id in seen:
                state_id, n = f"{base}.{n}", n + 1
            seen.add(state_id)
            refs.append(StateRef(state_id, path))
        return refs

    def get(self, state_id: str) -> StateRef:
        """The state with this id; 404 when there is none."""
        for ref in self.refs():
            if ref.id == state_id:
                return ref
        raise ApiError(404, f"unknown state {state_id!r}: GET /api/states lists the states served")


@contextlib.contextmanager
def read_snapshot(path: Path) -> Iterator[StateStore]:
    """A read-only StateStore over one consistent snapshot of the database; closed on exit."""
    if not path.is_file():
        raise ApiError(503, f"no state database at {path} yet (the daemon creates it at its first start)")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise ApiError(503, f"state {path} cannot be opened read-only: {exc}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {READ_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA query_only = ON")
        conn.execute("BEGIN")  # deferred: the first read takes the snapshot every later query of this request sees
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version != SCHEMA_VERSION:
            raise ApiError(
                503,
                f"state {path} has schema version {version}; this ritmo serves version {SCHEMA_VERSION} "
                + ("(the daemon upgrades it at its next start)" if version < SCHEMA_VERSION else "(upgrade ritmo)"),
            )
        yield StateStore(conn, path)
    except sqlite3.OperationalError as exc:
        # Busy beyond the timeout, or the -shm file cannot be created (no write access to the directory).
        raise ApiError(503, f"state {path} cannot be read right now: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise ApiError(503, f"state {path} cannot be read: {exc}") from None
    finally:
        conn.close()  # ends the read transaction


def queue_command(path: Path, kind: str, requested_by: str) -> dict[str, Any]:
    """Insert one control command for the daemon's next tick (the only write of `ritmo serve`); the new row."""
    if kind not in COMMAND_KINDS:
        raise ApiError(400, f"kind {kind!r}: expected one of {', '.join(COMMAND_KINDS)}")
    if not path.is_file():
        raise ApiError(503, f"no state database at {path} yet (the daemon creates it at its first start)")
    try:
        store = open_state_for_update(path)
    except sqlite3.Error as exc:
        raise ApiError(503, f"state {path} cannot be opened for the command: {exc}") from None
    except RitmoError as exc:  # StateError: an older or newer schema, a directory it cannot write
        raise ApiError(503, str(exc)) from None
    try:
        store.conn.execute(f"PRAGMA busy_timeout = {WRITE_BUSY_TIMEOUT_MS}")
        with store.transaction():
            command_id = store.add_command(kind, requested_by)
            row = _rows(store.conn.execute("SELECT * FROM commands WHERE id = ?", (command_id,)))[0]
    except sqlite3.OperationalError as exc:
        raise ApiError(503, f"state {path} is busy, the command was not queued; try again ({exc})") from None
    finally:
        store.conn.close()
    return _command(row)


# ---------------------------------------------------------------------------------------------------
# Paging
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """Which rows of a list: keyset cursors on the list's id, a half-open time range, order and size."""

    limit: int = DEFAULT_LIMIT
    before_id: int | None = None
    after_id: int | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    descending: bool = True


def _paged(
    conn: sqlite3.Connection,
    *,
    select: str,
    id_expr: str,
    time_expr: str,
    page: Page,
    where: Sequence[str] = (),
    args: Sequence[Any] = (),
) -> tuple[list[dict[str, Any]], dict[str, int] | None]:
    """Run a keyset-paged SELECT; the rows and the cursor of the next page (None on the last page)."""
    clauses, values = list(where), list(args)
    for clause, value in (
        (f"{id_expr} < ?", page.before_id),
        (f"{id_expr} > ?", page.after_id),
        (f"{time_expr} >= ?", page.from_ms),
        (f"{time_expr} < ?", page.to_ms),
    ):
        if value is not None:
            clauses.append(clause)
            values.append(value)
    sql = select + (" WHERE " + " AND ".join(clauses) if clauses else "")
    sql += f" ORDER BY {id_expr} {'DESC' if page.descending else 'ASC'} LIMIT ?"
    # One row more than asked tells whether another page exists.
    rows = _rows(conn.execute(sql, (*values, page.limit + 1)))
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    cursor = None
    if more:
        cursor = {"before_id": rows[-1]["id"]} if page.descending else {"after_id": rows[-1]["id"]}
    return rows, cursor


def _listing(items: list[dict[str, Any]], cursor: dict[str, int] | None, page: Page) -> dict[str, Any]:
    return {"count": len(items), "limit": page.limit, "next": cursor, "items": items}


def _rows(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _iso(ts_ms: int | None) -> str | None:
    return None if ts_ms is None else iso_utc(int(ts_ms))


def _json_text(text: str | None) -> Any:
    """A JSON column's value (the raw text if it is not JSON)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---------------------------------------------------------------------------------------------------
# One function per route
# ---------------------------------------------------------------------------------------------------


def status(store: StateStore) -> dict[str, Any]:
    """Exactly what `ritmo status --json` reports (`collect_status`)."""
    return collect_status(store)


def state_summary(store: StateStore) -> dict[str, Any]:
    """The few figures the list of states shows, from `collect_status`."""
    s = collect_status(store)
    last = s.get("last_candle") or {}
    return {
        "mode": s.get("mode"),
        "symbol": s.get("symbol"),
        "position_mode": s.get("position_mode"),
        "position": s.get("position"),
        "equity": s.get("equity"),
        "profit_quote": s.get("profit_quote"),
        "n_trades": s.get("n_trades"),
        "halted": s["halt"]["halted"],
        "paused": bool((store.get_meta("paused") or {}).get("paused")),
        "last_candle_ts": last.get("ts"),
    }


def trades(store: StateStore, page: Page) -> dict[str, Any]:
    """Fills, newest first; the time range is on the decision candle (`decision_ts_ms`)."""
    rows, cursor = _paged(
        store.conn,
        select="SELECT id, client_order_id, decision_ts_ms, side, qty_base, price, fee_quote, notional_quote,"
        " position_before, position_after, trade_id, created_at_ms FROM fills",
        id_expr="id",
        time_expr="decision_ts_ms",
        page=page,
    )
    for r in rows:
        r["decision_ts"] = _iso(r["decision_ts_ms"])
    return _listing(rows, cursor, page)


def orders(store: StateStore, page: Page, statuses: Sequence[str] = ()) -> dict[str, Any]:
    """Orders, newest first (id = insertion order); time range on the decision candle."""
    where, args = _in_clause("status", statuses)
    rows, cursor = _paged(
        store.conn,
        select="SELECT rowid AS id, client_order_id, decision_ts_ms, symbol, side, qty_base, ref_price,"
        " target_position, reason, attempt, status, detail, exchange_order_id, created_at_ms, updated_at_ms"
        " FROM orders",
        id_expr="rowid",
        time_expr="decision_ts_ms",
        page=page,
        where=where,
        args=args,
    )
    for r in rows:
        r["decision_ts"] = _iso(r["decision_ts_ms"])
    return _listing(rows, cursor, page)


def decisions(store: StateStore, page: Page, statuses: Sequence[str] = (), decided: bool = False) -> dict[str, Any]:
    """One row per ticked candle (id = candle open ts_ms), newest first; `decided`: only rows with probabilities."""
    where, args = _in_clause("status", statuses)
    if decided:
        where.append("p_hold IS NOT NULL")
    rows, cursor = _paged(
        store.conn,
        select="SELECT ts_ms AS id, ts_ms, status, action, p_hold, p_buy, p_sell, model_version, position_before,"
        " target_position, position_after, close, fill_price, qty_base, fee_quote, equity_before, equity_after,"
        " episode_id, episode_step, reason, latency_ms FROM decisions",
        id_expr="ts_ms",
        time_expr="ts_ms",
        page=page,
        where=where,
        args=args,
    )
    for r in rows:
        r["ts"] = _iso(r["ts_ms"])
        r["action"] = ACTION_NAMES[r["action"]] if r["action"] is not None else None
    return _listing(rows, cursor, page)


def equity_curve(store: StateStore, from_ms: int | None, to_ms: int | None, max_points: int) -> dict[str, Any]:
    """Equity marked at every tick's close beside buy-and-hold since the start, downsampled to `max_points`.

    Buy-and-hold is `ritmo status`'s (`buy_hold`: the initial cash bought at the close of the first decided
    candle with one buy fee, through the shared accounting) marked at each close, so the curve's last point
    equals the status. The ledger's final mark (at the last close, after the last tick's row) is the last point.
    """
    status = collect_status(store)
    initial = status.get("initial_cash")
    where, args = ["equity_after IS NOT NULL"], []
    if from_ms is not None:
        where.append("ts_ms >= ?")
        args.append(from_ms)
    if to_ms is not None:
        where.append("ts_ms < ?")
        args.append(to_ms)
    rows = store.conn.execute(
        f"SELECT ts_ms, equity_after, close FROM decisions WHERE {' AND '.join(where)} ORDER BY ts_ms", args
    ).fetchall()
    last = status.get("last_candle") or {}
    in_range = last.get("ts_ms") is not None and (to_ms is None or last["ts_ms"] < to_ms)
    in_range = in_range and (from_ms is None or last["ts_ms"] >= from_ms)
    if in_range and status.get("equity") is not None and (not rows or rows[-1][0] < last["ts_ms"]):
        rows.append((last["ts_ms"], status["equity"], last.get("close")))
    total = len(rows)
    rows = [rows[i] for i in downsample_indices(total, max_points)]
    holder = _buy_hold_ledger(status)
    points = []
    for ts_ms, equity, close in rows:
        buy_hold = holder.equity(close) if holder is not None and close is not None else None
        points.append({"ts_ms": ts_ms, "equity": equity, "close": close, "buy_hold": buy_hold})
    bh = status.get("buy_hold") or {}
    return {
        "initial_cash": initial,
        "buy_hold_start": bh.get("start_ts"),
        "buy_hold_start_close": bh.get("start_close"),
        "total_points": total,
        "count": len(points),
        "points": points,
    }


def _buy_hold_ledger(status: dict[str, Any]) -> Ledger | None:
    """The ledger of `ritmo status`'s buy-and-hold (None before the first decision)."""
    bh, initial = status.get("buy_hold"), status.get("initial_cash")
    if not bh or initial is None or not bh.get("start_close"):
        return None
    return buy_hold_ledger(float(initial), float(bh["start_close"]), float(bh.get("commission") or 0.0))


def downsample_indices(n: int, max_points: int) -> list[int]:
    """At most `max_points` evenly spaced indices of range(n), always keeping the first and the last."""
    if n <= max_points:
        return list(range(n))
    step = (n - 1) / (max_points - 1)
    return sorted({round(i * step) for i in range(max_points)})


def learning(store: StateStore, page: Page, statuses: Sequence[str] = ()) -> dict[str, Any]:
    """Online updates by k (loss, parts, guard figures), the rhythm counters and the guard's rollbacks."""
    where, args = _in_clause("u.status", statuses)
    rows, cursor = _paged(
        store.conn,
        select="SELECT u.k AS id, u.k, u.episode_id, u.status, u.parts, u.steps, u.loss, u.applied, u.model_version,"
        " u.method, u.reason, u.entropy_before, u.entropy_after, u.trade_prob_before, u.trade_prob_after, u.wall_ms,"
        " u.created_at_ms, e.end_ts_ms AS candle_ts_ms FROM updates u LEFT JOIN episodes e ON e.id = u.episode_id",
        id_expr="u.k",
        time_expr="u.created_at_ms",
        page=page,
        where=where,
        args=args,
    )
    for r in rows:
        r["macro"] = "macro" in (r["parts"] or "").split(",")
        r["candle_ts"] = _iso(r["candle_ts_ms"])
    rhythm = store.get_meta("rhythm") or {}
    counts = dict(store.conn.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall())
    rollbacks = _rows(
        store.conn.execute(
            "SELECT id, at_ms, candle_ts_ms, detail FROM events WHERE kind = 'update_rolled_back'"
            " ORDER BY id DESC LIMIT 20"
        )
    )
    for r in rollbacks:
        r["detail"] = _json_text(r["detail"])
    return {
        **_listing(rows, cursor, page),
        "rhythm": {"k": rhythm.get("k"), "macro_updates": rhythm.get("macro_updates")},
        "counts": counts,
        "rollbacks": rollbacks,
    }


def events(store: StateStore, page: Page, kinds: Sequence[str] = ()) -> dict[str, Any]:
    """Operator events (halts, breaker, balance checks, rollbacks, commands...), newest first; range on at_ms."""
    where, args = _in_clause("kind", kinds)
    rows, cursor = _paged(
        store.conn,
        select="SELECT id, at_ms, candle_ts_ms, kind, detail FROM events",
        id_expr="id",
        time_expr="at_ms",
        page=page,
        where=where,
        args=args,
    )
    for r in rows:
        r["detail"] = _json_text(r["detail"])
        r["at"] = _iso(r["at_ms"])
    return _listing(rows, cursor, page)


def commands(store: StateStore, page: Page, statuses: Sequence[str] = ()) -> dict[str, Any]:
    """Control commands with their status, newest first; the daemon's `paused` flag; range on requested_at_ms."""
    where, args = _in_clause("status", statuses)
    rows, cursor = _paged(
        store.conn,
        select="SELECT * FROM commands",
        id_expr="id",
        time_expr="requested_at_ms",
        page=page,
        where=where,
        args=args,
    )
    pending = store.conn.execute("SELECT COUNT(*) FROM commands WHERE status = 'pending'").fetchone()[0]
    return {
        **_listing([_command(r) for r in rows], cursor, page),
        "pending": int(pending),
        "paused": store.get_meta("paused"),
    }


def _command(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **row,
        "result": _json_text(row.get("result")),
        "requested_at": _iso(row.get("requested_at_ms")),
        "applied_at": _iso(row.get("applied_at_ms")),
    }


def _in_clause(column: str, values: Sequence[str]) -> tuple[list[str], list[Any]]:
    if not values:
        return [], []
    return [f"{column} IN ({', '.join('?' for _ in values)})"], list(values)
