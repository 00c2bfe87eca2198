"""`ritmo serve`: the JSON API over a state made by a real replay, read-only access, control commands and tokens."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from bot.cli import main as cli_main
from bot.commands.serve import check_bind, is_loopback
from bot.daemon.report import collect_status, finite
from bot.daemon.state import open_state_readonly
from bot.errors import ConfigError
from bot.settings import load_settings
from bot.web import queries
from bot.web.app import LOOPBACK_HOSTS, SECURITY_HEADERS, STATIC_DIR, create_app
from bot.web.queries import StateCatalog
from strategies.candles import iso_utc
from tests.conftest import DATA_2024

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient will move from httpx to httpx2; httpx is what the dev extras install.
    warnings.filterwarnings("ignore", message="Using `httpx` with", category=Warning)
    from starlette.testclient import TestClient

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "checkpoints" / "default.pt"
STATE_ID = "replay-BTC-USDT"
TOKEN = "tok-9f3c1e7a5b2d4c6e8a0b1c2d3e4f5a6b"
# Settings holding every kind of secret: none of these strings may ever leave `ritmo serve`.
SECRET_ENV = {
    "RITMO_API_TOKEN": TOKEN,
    "RITMO_API_KEY": "KEYa1b2c3d4e5f60718293a4b5c6d7e8f9",
    "RITMO_API_SECRET": "SECf9e8d7c6b5a40312a1b2c3d4e5f6a7b8",
    "RITMO_NOTIFY_URLS": "json://hooks.example.invalid/notify-s3cr3t-path-77aa",
}
ROUTES = ("status", "trades", "orders", "decisions", "equity", "learning", "events", "commands")


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without any RITMO_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RITMO_") and k != "NOTIFY_SOCKET"}
    env.update(extra)
    return env


def run_replay(state_dir: Path, date_from: str, date_to: str, seed: int = 3) -> None:
    """`ritmo run --replay` of the real 2024 data with the shipped checkpoint, as its own process.

    Episodes of 6 decisions (the checkpoint decides every 4 hours) so that a few days hold online updates.
    """
    cmd = [
        sys.executable, "-m", "bot", "run", "--replay", str(DATA_2024), "--from", date_from, "--to", date_to,
        "--speed", "max", "--seed", str(seed), "--state-dir", str(state_dir), "--checkpoint", str(CHECKPOINT),
    ]  # fmt: skip
    env = clean_env(RITMO_LOG_FORMAT="json", RITMO_EPISODE_STEPS="6", RITMO_MIN_EPISODE_STEPS="2")
    result = subprocess.run(
        cmd, cwd=state_dir.parent, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


def copy_state(src_dir: Path, dst_dir: Path) -> Path:
    """A consistent copy of the replay's database (SQLite's backup API), for a test that writes."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    (src,) = src_dir.glob("*.sqlite")
    dst = dst_dir / src.name
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    b.close()
    a.close()
    return dst


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state of 10 days of replay: decisions, a few trades, online updates (read-only for the tests)."""
    root = tmp_path_factory.mktemp("serve")
    state = root / "state"
    run_replay(state, "2024-01-06", "2024-01-16")
    return state


@pytest.fixture
def client(state_dir: Path) -> Iterator[TestClient]:
    """A client over the shared state, control commands disabled."""
    with TestClient(create_app(StateCatalog([state_dir]))) as c:
        yield c


@pytest.fixture
def writable(state_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the state's directory, for tests that queue commands."""
    copy_state(state_dir, tmp_path / "state")
    return tmp_path / "state"


def sql(path: Path, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a query on a read-only connection."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


def db_of(state: Path) -> Path:
    (db,) = state.glob("*.sqlite")
    return db


def walk(client: TestClient, path: str, key: str, **params: Any) -> list[Any]:
    """Every item of a paged list, following the `next` cursors; the values of `key`."""
    out: list[Any] = []
    cursor: dict[str, Any] = {}
    for _ in range(10_000):
        r = client.get(path, params={**params, **cursor})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] == len(body["items"]) <= body["limit"]
        out += [item[key] for item in body["items"]]
        if body["next"] is None:
            return out
        cursor = body["next"]
    raise AssertionError("paging never ended")


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def test_status_is_exactly_ritmo_status_json(
    client: TestClient, state_dir: Path, capsys: pytest.CaptureFixture[str], isolated_process: None
) -> None:
    """GET /status equals collect_status and `ritmo status --json` for the same state, key for key."""
    got = client.get(f"/api/{STATE_ID}/status")
    assert got.status_code == 200 and got.headers["content-type"].startswith("application/json")
    store = open_state_readonly(db_of(state_dir))
    try:
        expected = json.loads(json.dumps(finite(collect_status(store)), default=str))
    finally:
        store.conn.close()
    assert got.json() == expected
    capsys.readouterr()
    assert cli_main(["status", "--json", "--state-dir", str(state_dir)]) == 0
    assert got.json() == json.loads(capsys.readouterr().out)
    assert expected["n_trades"] >= 2 and expected["updates"]["learned"] >= 2  # the state has something to show


def test_states_list(client: TestClient, state_dir: Path) -> None:
    body = client.get("/api/states").json()
    assert body["control_enabled"] is False
    (entry,) = body["states"]
    status = client.get(f"/api/{STATE_ID}/status").json()
    assert entry["id"] == STATE_ID and entry["available"] and entry["path"] == str(db_of(state_dir))
    summary = entry["summary"]
    assert summary["equity"] == status["equity"] and summary["n_trades"] == status["n_trades"]
    assert summary["position"] == status["position"] and summary["halted"] is False


def test_decisions_paging_and_ranges(client: TestClient, state_dir: Path) -> None:
    """Keyset pages in both orders cover every row exactly once; from/to as ISO or ms; `to` is exclusive."""
    db = db_of(state_dir)
    all_ts = [r[0] for r in sql(db, "SELECT ts_ms FROM decisions ORDER BY ts_ms DESC")]
    assert len(all_ts) > 2000
    assert walk(client, f"/api/{STATE_ID}/decisions", "ts_ms", limit=1000) == all_ts
    assert walk(client, f"/api/{STATE_ID}/decisions", "ts_ms", limit=700, order="asc") == all_ts[::-1]

    decided = [r[0] for r in sql(db, "SELECT ts_ms FROM decisions WHERE p_hold IS NOT NULL ORDER BY ts_ms DESC")]
    body = client.get(f"/api/{STATE_ID}/decisions?decided=1&limit=1000").json()
    assert [d["ts_ms"] for d in body["items"]] == decided
    first = body["items"][0]
    row = sql(db, "SELECT p_hold, p_buy, p_sell, status FROM decisions WHERE ts_ms = ?", (first["ts_ms"],))[0]
    assert (first["p_hold"], first["p_buy"], first["p_sell"], first["status"]) == row
    assert first["ts"] == iso_utc(first["ts_ms"]) and first["action"] in ("HOLD", "BUY", "SELL")

    lo, hi = sorted(all_ts)[100], sorted(all_ts)[400]
    by_ms = client.get(f"/api/{STATE_ID}/decisions?from={lo}&to={hi}&limit=1000&order=asc").json()
    by_iso = client.get(f"/api/{STATE_ID}/decisions?from={iso_utc(lo)}&to={iso_utc(hi)}&limit=1000&order=asc").json()
    got = [d["ts_ms"] for d in by_ms["items"]]
    assert got == [d["ts_ms"] for d in by_iso["items"]] == [t for t in sorted(all_ts) if lo <= t < hi]
    assert got[0] == lo and hi not in got

    kept = client.get(f"/api/{STATE_ID}/decisions?status=kept&limit=5").json()["items"]
    assert kept and all(d["status"] == "kept" and d["p_hold"] is None for d in kept)


def test_trades_and_orders_paging(client: TestClient, state_dir: Path) -> None:
    db = db_of(state_dir)
    fills = sql(db, "SELECT id, side, qty_base, price, fee_quote, decision_ts_ms FROM fills ORDER BY id DESC")
    assert len(fills) >= 2
    assert walk(client, f"/api/{STATE_ID}/trades", "id", limit=1) == [f[0] for f in fills]
    items = client.get(f"/api/{STATE_ID}/trades").json()["items"]
    assert [(t["id"], t["side"], t["qty_base"], t["price"], t["fee_quote"], t["decision_ts_ms"]) for t in items] == [
        tuple(f) for f in fills
    ]
    newest = fills[0][5]
    ranged = client.get(f"/api/{STATE_ID}/trades?from={newest}").json()["items"]
    assert [t["id"] for t in ranged] == [f[0] for f in fills if f[5] >= newest]

    orders = client.get(f"/api/{STATE_ID}/orders?status=filled").json()["items"]
    assert sorted(o["client_order_id"] for o in orders) == sorted(
        r[0] for r in sql(db, "SELECT client_order_id FROM orders WHERE status = 'filled'")
    )
    assert walk(client, f"/api/{STATE_ID}/orders", "client_order_id", limit=1) == [o["client_order_id"] for o in orders]


def test_equity_curve_against_status(client: TestClient, state_dir: Path) -> None:
    """Every mark, the final one equal to the status; buy-and-hold is status's, marked at each close."""
    status = client.get(f"/api/{STATE_ID}/status").json()
    full = client.get(f"/api/{STATE_ID}/equity?max_points=20000").json()
    marks = sql(db_of(state_dir), "SELECT COUNT(*) FROM decisions WHERE equity_after IS NOT NULL")[0][0]
    points = full["points"]
    assert full["total_points"] == full["count"] == len(points) == marks + 1  # + the ledger's final mark
    assert points[-1]["ts_ms"] == status["last_candle"]["ts_ms"] and points[-1]["equity"] == status["equity"]
    assert points[-1]["buy_hold"] == status["buy_hold"]["equity"]
    assert full["initial_cash"] == status["initial_cash"]
    # Buy-and-hold holds a fixed quantity: its equity is affine in the close.
    a, b = points[10], points[-1]
    slope = (b["buy_hold"] - a["buy_hold"]) / (b["close"] - a["close"])
    for p in points[::97]:
        assert p["buy_hold"] == pytest.approx(b["buy_hold"] + slope * (p["close"] - b["close"]), rel=1e-9)

    small = client.get(f"/api/{STATE_ID}/equity?max_points=10").json()
    assert small["count"] == 10 and small["total_points"] == len(points)
    assert small["points"][0] == points[0] and small["points"][-1] == points[-1]
    ts = [p["ts_ms"] for p in points]
    assert all(p["ts_ms"] in ts for p in small["points"])

    lo, hi = ts[50], ts[60]
    ranged = client.get(f"/api/{STATE_ID}/equity?from={lo}&to={hi}").json()["points"]
    assert ranged == points[50:60]


def test_learning_and_events(client: TestClient, state_dir: Path) -> None:
    status = client.get(f"/api/{STATE_ID}/status").json()
    body = client.get(f"/api/{STATE_ID}/learning?limit=1000").json()
    updates = sql(db_of(state_dir), "SELECT k, status, parts, loss FROM updates ORDER BY k DESC")
    assert [(u["k"], u["status"], u["parts"], u["loss"]) for u in body["items"]] == [tuple(u) for u in updates]
    assert all(u["macro"] == ("macro" in u["parts"].split(",")) for u in body["items"])
    assert body["rhythm"] == status["rhythm"]
    assert body["counts"].get("learned", 0) == status["updates"]["learned"]
    assert walk(client, f"/api/{STATE_ID}/learning", "k", limit=3) == [u[0] for u in updates]

    kinds = {e["kind"] for e in client.get(f"/api/{STATE_ID}/events?limit=1000").json()["items"]}
    assert "start" in kinds
    only = client.get(f"/api/{STATE_ID}/events?kind=start").json()["items"]
    assert only and {e["kind"] for e in only} == {"start"} and isinstance(only[0]["detail"], dict)


@pytest.mark.parametrize(
    "query",
    [
        "trades?limit=0",
        "trades?limit=1001",
        "trades?limit=ten",
        "trades?before_id=x",
        "trades?from=yesterday",
        "trades?from=2024-01-10&to=2024-01-09",
        "trades?order=sideways",
        "trades?limt=5",
        "trades?limit=5&limit=6",
        "decisions?status=maybe",
        "decisions?decided=perhaps",
        "equity?max_points=1",
        "equity?limit=5",
        "events?kind=DROP TABLE",
        "status?from=2024-01-01",
    ],
)
def test_bad_parameters_are_400(client: TestClient, query: str) -> None:
    r = client.get(f"/api/{STATE_ID}/{query}")
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json") and r.json()["error"]


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_state_is_404(client: TestClient, route: str) -> None:
    r = client.get(f"/api/nope/{route}")
    assert r.status_code == 404 and "unknown state 'nope'" in r.json()["error"]


def test_unknown_route_and_page(client: TestClient) -> None:
    r = client.get("/api/replay-BTC-USDT/nothing/here")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    assert client.get("/s/nope").status_code == 404
    assert client.delete(f"/api/{STATE_ID}/commands").status_code == 405


def test_missing_and_old_states_are_503(tmp_path: Path, state_dir: Path) -> None:
    """A state file that does not exist yet, or one of an older schema: a clear 503, never a crash."""
    old = copy_state(state_dir, tmp_path / "old")
    conn = sqlite3.connect(old)
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    catalog = StateCatalog(files=[tmp_path / "later" / "paper-BTC-USDT.sqlite", old])
    with TestClient(create_app(catalog, api_token=TOKEN)) as c:
        r = c.get("/api/paper-BTC-USDT/status")
        assert r.status_code == 503 and "no state database" in r.json()["error"]
        r = c.get(f"/api/{STATE_ID}/trades")
        assert r.status_code == 503 and "schema version 3" in r.json()["error"]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = c.post(f"/api/{STATE_ID}/commands", json={"kind": "pause"}, headers=auth)
        assert r.status_code == 503 and "schema version 3" in r.json()["error"]
        r = c.post("/api/paper-BTC-USDT/commands", json={"kind": "pause"}, headers=auth)
        assert r.status_code == 503 and "no state database" in r.json()["error"]
        states = c.get("/api/states").json()["states"]
        assert [(s["id"], s["available"]) for s in states] == [("paper-BTC-USDT", False), (STATE_ID, False)]


def test_state_ids_are_unique_across_subdirectories(tmp_path: Path, state_dir: Path) -> None:
    copy_state(state_dir, tmp_path / "root")
    copy_state(state_dir, tmp_path / "root" / "BTC-USDT")
    refs = StateCatalog([tmp_path / "root"]).refs()
    assert [r.id for r in refs] == [STATE_ID, f"BTC-USDT.{STATE_ID}"]


# ---------------------------------------------------------------------------------------------------
# Read-only access never waits for the daemon, and the daemon never waits for it
# ---------------------------------------------------------------------------------------------------


def test_reads_do_not_wait_for_a_write_transaction(writable: Path) -> None:
    """While another connection holds the write lock mid-transaction, reads answer at once from the last commit."""
    db = db_of(writable)
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("PRAGMA busy_timeout = 0")
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO events (at_ms, kind, detail) VALUES (1, 'uncommitted_probe', '{}')")
        with TestClient(create_app(StateCatalog([writable]))) as c:
            started = time.monotonic()
            for route in ROUTES:
                assert c.get(f"/api/{STATE_ID}/{route}").status_code == 200
            assert time.monotonic() - started < 3.0  # a blocked read would wait out the 5 s busy timeout
            assert c.get(f"/api/{STATE_ID}/events?kind=uncommitted_probe").json()["items"] == []
            writer.execute("COMMIT")
            assert len(c.get(f"/api/{STATE_ID}/events?kind=uncommitted_probe").json()["items"]) == 1
    finally:
        writer.close()


def test_an_open_read_never_blocks_the_writer(writable: Path) -> None:
    """A snapshot held open by the server does not keep the daemon's BEGIN IMMEDIATE ... COMMIT waiting."""
    db = db_of(writable)
    with queries.read_snapshot(db) as store:
        before = store.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        writer = sqlite3.connect(db, isolation_level=None)
        writer.execute("PRAGMA busy_timeout = 0")  # any wait would raise "database is locked"
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO events (at_ms, kind, detail) VALUES (1, 'tick_probe', '{}')")
        writer.execute("COMMIT")
        writer.close()
        # The reader keeps its snapshot: one request sees one consistent state.
        assert store.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == before
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.conn.execute("DELETE FROM events")


# ---------------------------------------------------------------------------------------------------
# Control commands
# ---------------------------------------------------------------------------------------------------


def test_commands_disabled_without_a_token(writable: Path) -> None:
    with TestClient(create_app(StateCatalog([writable]))) as c:
        r = c.post(f"/api/{STATE_ID}/commands", json={"kind": "pause"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 403
        assert r.json() == {"error": "control actions are disabled: set RITMO_API_TOKEN"}
    assert sql(db_of(writable), "SELECT COUNT(*) FROM commands")[0][0] == 0


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-0000"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"},
     {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer "}],
)  # fmt: skip
def test_commands_refuse_a_missing_or_wrong_token(writable: Path, headers: dict[str, str]) -> None:
    with TestClient(create_app(StateCatalog([writable]), api_token=TOKEN)) as c:
        r = c.post(f"/api/{STATE_ID}/commands", json={"kind": "pause"}, headers=headers)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
    assert sql(db_of(writable), "SELECT COUNT(*) FROM commands")[0][0] == 0


def test_command_queued_with_the_right_token(writable: Path) -> None:
    """202 with the pending row; who asked is recorded; `command_queued` is logged; GET /commands lists it."""
    auth = {"Authorization": f"Bearer {TOKEN}", "X-Ritmo-User": "alice"}
    with (
        TestClient(create_app(StateCatalog([writable]), api_token=TOKEN)) as c,
        structlog.testing.capture_logs() as logs,
    ):
        r = c.post(f"/api/{STATE_ID}/commands", json={"kind": "pause"}, headers=auth)
        assert r.status_code == 202, r.text
        row = r.json()
        assert row["kind"] == "pause" and row["status"] == "pending" and row["applied_at_ms"] is None
        assert row["requested_by"] == "api:testclient (alice)"
        assert abs(row["requested_at_ms"] - time.time() * 1000) < 60_000
        r2 = c.post(f"/api/{STATE_ID}/commands", json={"kind": "flatten"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r2.status_code == 202 and r2.json()["requested_by"] == "api:testclient (testclient)"  # the user agent
        listed = c.get(f"/api/{STATE_ID}/commands").json()
        assert [(x["id"], x["kind"], x["status"]) for x in listed["items"]] == [
            (r2.json()["id"], "flatten", "pending"),
            (row["id"], "pause", "pending"),
        ]
        assert listed["pending"] == 2
        assert c.get(f"/api/{STATE_ID}/commands?status=applied").json()["items"] == []
        for body in ({"kind": "explode"}, {"kind": 1}, [], {"what": "pause"}):
            assert c.post(f"/api/{STATE_ID}/commands", json=body, headers=auth).status_code == 400
        bad = c.post(f"/api/{STATE_ID}/commands", content=b"{pause", headers=auth)
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]
    rows = sql(db_of(writable), "SELECT id, kind, status, requested_by FROM commands ORDER BY id")
    assert rows == [(row["id"], "pause", "pending", "api:testclient (alice)"), (r2.json()["id"], "flatten", "pending",
                    "api:testclient (testclient)")]  # fmt: skip
    queued = [e for e in logs if e["event"] == "command_queued"]
    assert [(e["kind"], e["command_id"], e["state"]) for e in queued] == [
        ("pause", row["id"], STATE_ID),
        ("flatten", r2.json()["id"], STATE_ID),
    ]


def test_command_waits_for_a_tick_in_progress(writable: Path) -> None:
    """A command posted during the daemon's write transaction is queued right after it commits."""
    db = db_of(writable)
    writer = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO events (at_ms, kind, detail) VALUES (1, 'tick', '{}')")
    timer = threading.Timer(0.4, lambda: writer.execute("COMMIT"))
    timer.start()
    try:
        with TestClient(create_app(StateCatalog([writable]), api_token=TOKEN)) as c:
            started = time.monotonic()
            r = c.post(
                f"/api/{STATE_ID}/commands", json={"kind": "resume"}, headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert r.status_code == 202 and time.monotonic() - started >= 0.3
    finally:
        timer.join()
        writer.close()
    assert sql(db, "SELECT kind FROM commands") == [("resume",)]


# ---------------------------------------------------------------------------------------------------
# Secrets, headers, binding
# ---------------------------------------------------------------------------------------------------


def test_no_secret_is_ever_served(writable: Path) -> None:
    """Every route, error and command answer over settings holding a token, exchange keys and a notify URL."""
    settings = load_settings(SECRET_ENV, env_file=None)
    secrets = [*SECRET_ENV.values(), *settings.secret_values()]
    app = create_app(StateCatalog([writable]), api_token=settings.api_token, secrets=settings.secret_values())
    answers = []
    with TestClient(app) as c:
        answers.append(c.get("/"))
        answers.append(c.get(f"/s/{STATE_ID}"))
        answers.append(c.get("/api/states"))
        for route in ROUTES:
            answers += [c.get(f"/api/{STATE_ID}/{route}?limit=1000" if route not in ("status", "equity") else
                              f"/api/{STATE_ID}/{route}"), c.get(f"/api/nope/{route}")]  # fmt: skip
        answers.append(c.post(f"/api/{STATE_ID}/commands", json={"kind": "pause"},
                              headers={"Authorization": f"Bearer {TOKEN}"}))  # fmt: skip
        answers.append(c.post(f"/api/{STATE_ID}/commands", json={"kind": "pause"},
                              headers={"Authorization": f"Bearer {TOKEN[:-1]}"}))  # fmt: skip
        answers.append(c.get(f"/api/{STATE_ID}/commands"))
        for name in ("index.html", "dashboard.js", "dashboard.css"):
            answers.append(c.get(f"/static/{name}"))
    assert [a.status_code for a in answers].count(202) == 1
    for answer in answers:
        text = answer.text + json.dumps(dict(answer.headers))
        for secret in secrets:
            assert secret not in text, (answer.url, secret)
    # The state itself holds none either (the command row records who, never the token).
    data = db_of(writable).read_bytes()
    assert not any(s.encode() in data for s in secrets)


def test_a_secret_in_the_state_is_masked(writable: Path) -> None:
    """Defence in depth: should a secret ever reach the state (an exchange message), it is masked on the way out."""
    conn = sqlite3.connect(db_of(writable))
    conn.execute(
        "INSERT INTO events (at_ms, kind, detail) VALUES (1, 'probe', ?)",
        (json.dumps({"msg": SECRET_ENV["RITMO_API_KEY"]}),),
    )
    conn.commit()
    conn.close()
    with TestClient(create_app(StateCatalog([writable]), secrets=[SECRET_ENV["RITMO_API_KEY"]])) as c:
        (event,) = c.get(f"/api/{STATE_ID}/events?kind=probe").json()["items"]
    assert event["detail"] == {"msg": "***"}


@pytest.mark.parametrize("path", ["/", f"/s/{STATE_ID}", "/api/states", "/static/dashboard.js", "/api/nope/status"])
def test_security_headers(client: TestClient, path: str) -> None:
    r = client.get(path)
    for name, value in SECURITY_HEADERS.items():
        assert r.headers[name] == value
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "server" not in r.headers


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("127.0.0.1:8080", True), ("localhost", True), ("[::1]:8080", True), ("evil.example", False),
     ("127.0.0.1.evil.example:8080", False)],
)  # fmt: skip
def test_loopback_server_refuses_other_host_headers(state_dir: Path, host: str, allowed: bool) -> None:
    """A page on another site that rebinds its name to 127.0.0.1 cannot read the API (DNS rebinding)."""
    with TestClient(create_app(StateCatalog([state_dir]), allowed_hosts=LOOPBACK_HOSTS)) as c:
        r = c.get("/api/states", headers={"Host": host})
    assert (r.status_code == 200) is allowed
    if not allowed:
        assert r.status_code == 400 and "Host" in r.json()["error"]


def test_dashboard_assets_are_local() -> None:
    """No CDN, no third-party script, no inline script: the page works on a server without internet."""
    files = {p.name: p.read_text() for p in STATIC_DIR.iterdir()}
    assert set(files) == {"index.html", "dashboard.js", "dashboard.css"}
    for name, text in files.items():
        urls = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[/\w.-]*", text)]
        assert all(u.startswith("http://www.w3.org/2000/svg") for u in urls), (name, urls)
    html = files["index.html"]
    assert html.count("<script") == 1 and '<script src="/static/dashboard.js" defer></script>' in html


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("example.com", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_non_loopback_bind_without_token_is_refused(
    host: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], isolated_process: None
) -> None:
    assert cli_main(["serve", "--host", host, "--port", "8099", "--state-dir", str(tmp_path)]) == 78
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ritmo serve: error: refusing to serve on")
    assert "RITMO_API_TOKEN" in err


def test_check_bind() -> None:
    """Beyond loopback only with a token; a port out of range is a configuration error."""
    check_bind("0.0.0.0", 8080, TOKEN)
    check_bind("127.0.0.1", 8080, "")
    with pytest.raises(ConfigError, match="RITMO_API_TOKEN"):
        check_bind("::", 8080, "")
    with pytest.raises(ConfigError, match="--port 0"):
        check_bind("127.0.0.1", 0, TOKEN)


def test_serve_module_stays_light() -> None:
    """`ritmo serve` never loads torch, ccxt, the scheduler, the plotting library or the notifier."""
    code = (
        "import sys, bot.commands.serve, bot.web.app; "
        "print(sorted(m for m in ('torch', 'ccxt', 'apscheduler', 'matplotlib', 'apprise') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_server(url: str, proc: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    """Poll `url` until it answers 200, failing early if the server process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ritmo serve exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"ritmo serve did not answer {url} within {timeout_s} s")


# `ritmo serve` as systemd's MemoryDenyWriteExecute=yes runs it (ritmo-serve.service): PR_SET_MDWE (65) with
# PR_MDWE_REFUSE_EXEC_GAIN (1), where the kernel has it (Linux >= 6.3; elsewhere it runs unrestricted).
SERVE_UNDER_MDWE = (
    "import ctypes, runpy, sys; ctypes.CDLL(None).prctl(65, 1, 0, 0, 0); "
    "sys.argv = ['ritmo', *sys.argv[1:]]; runpy.run_module('bot', run_name='__main__')"
)


def test_real_server_stops_cleanly_on_sigterm(state_dir: Path, tmp_path: Path, localhost_only: None) -> None:
    """uvicorn under `ritmo serve` (W^X memory): answers on loopback, JSON logs without the token, SIGTERM -> 0."""
    port = free_port()
    env = clean_env(RITMO_API_TOKEN=TOKEN, RITMO_LOG_FORMAT="json")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_UNDER_MDWE, "serve", "--state-dir", str(state_dir), "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for_server(f"http://127.0.0.1:{port}/api/states", proc)
        for route in ROUTES:  # collect_status and the shared accounting run, as does every query
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{STATE_ID}/{route}", timeout=5) as r:
                assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{STATE_ID}/status", timeout=5) as r:
            assert json.loads(r.read())["state"] == str(db_of(state_dir))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert events[0] == "serve_started" and events[-1] == "serve_stopped", out
    assert TOKEN not in out
