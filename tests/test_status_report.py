"""`ritmo status`'s operator figures on a real replay: entry price, unrealised P&L, P&L in %, today's and the last
7 days' P&L, buy-and-hold since the start, the paused flag; and a fresh state with no decisions.

Expected values are computed here from the state's own tables (fills, decisions) with plain arithmetic.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bot.cli import main as cli_main
from bot.commands.status import format_status
from bot.daemon.report import collect_status
from bot.daemon.state import open_state, open_state_for_update, open_state_readonly
from strategies.accounting import Ledger
from strategies.candles import CANDLE_MS, iso_utc, parse_utc_date_ms
from tests.conftest import process_isolation
from tests.test_daemon import make_checkpoint
from tests.test_replay import replay_args

DAY_MS = 86_400_000
DATE_FROM, DATE_TO, SEED = "2024-12-01", "2024-12-04", 5


@contextlib.contextmanager
def in_process(cwd: Path) -> Iterator[io.StringIO]:
    """Run `ritmo` in-process (isolated as in tests/conftest.py) with its stdout captured."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, process_isolation(mp, cwd), contextlib.redirect_stdout(out):
        yield out


def ritmo(cwd: Path, *argv: str) -> tuple[int, str]:
    """`ritmo argv` in-process: (exit code, stdout)."""
    with in_process(cwd) as out:
        code = cli_main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> dict[str, Any]:
    """A 3-day long_short replay (learning off) of a seeded random policy that trades; its tables and status."""
    root = tmp_path_factory.mktemp("status-report")
    checkpoint = make_checkpoint(root / "c.pt", candles_2024, mode="long_short")
    state = root / "state"
    code, _ = ritmo(root, *replay_args(state, checkpoint, DATE_FROM, DATE_TO, SEED), "--no-online-learning")
    assert code == 0
    code, out = ritmo(root, "status", "--json", "--state-dir", str(state))
    assert code == 0
    (db,) = state.glob("*.sqlite")
    store = open_state_readonly(db)
    try:
        fills = store.fills()
        decisions = store.conn.execute("SELECT ts_ms, status, close, equity_after FROM decisions ORDER BY ts_ms")
        decisions = [dict(zip(("ts_ms", "status", "close", "equity_after"), r, strict=True)) for r in decisions]
        meta = store.all_meta()
    finally:
        store.conn.close()
    return {
        "root": root,
        "state": state,
        "db": db,
        "status": json.loads(out),
        "fills": fills,
        "decisions": decisions,
        "meta": meta,
    }


def test_entry_price_and_unrealised_pnl_from_the_fills(replay: dict[str, Any]) -> None:
    s, fills, meta = replay["status"], replay["fills"], replay["meta"]
    ledger = Ledger.from_dict(meta["ledger"])
    assert ledger.position != 0, "the replay must end holding a position"
    # Each position change of a replay is one fill: the open position was built by the last fill that changed it.
    opening = [f for f in fills if f["position_before"] != f["position_after"] == ledger.position][-1]
    assert s["entry_price"] == opening["price"]
    assert s["entry_ts"] == iso_utc(opening["decision_ts_ms"] + CANDLE_MS)
    # The opening fill's fee is shared between the lot it closed (if it flipped) and the one it opened.
    opened_qty = abs(ledger.qty_base)
    entry_fee = opening["fee_quote"] * opened_qty / opening["qty_base"]
    close = meta["last_candle"]["close"]
    direction = 1 if ledger.position > 0 else -1
    assert s["entry_fees_quote"] == pytest.approx(entry_fee, rel=1e-9)
    assert s["unrealised_pnl_quote"] == pytest.approx(
        direction * (close - opening["price"]) * opened_qty - entry_fee, rel=1e-9
    )


def test_realised_plus_unrealised_is_the_profit(replay: dict[str, Any]) -> None:
    """Marked the same way as the equity (entry fees in, no exit fee), the two add up to the profit."""
    s = replay["status"]
    assert s["realised_pnl_quote"] + s["unrealised_pnl_quote"] == pytest.approx(s["profit_quote"], rel=1e-9)
    assert s["pnl_pct"] == pytest.approx((s["equity"] / s["initial_cash"] - 1) * 100, rel=1e-12)


def test_today_and_7_days_from_the_decisions_table(replay: dict[str, Any]) -> None:
    s, decisions, meta = replay["status"], replay["decisions"], replay["meta"]
    last_ts = meta["last_candle"]["ts_ms"]
    today = parse_utc_date_ms(iso_utc(last_ts)[:10])  # the UTC day of the last candle
    assert iso_utc(today) == "2024-12-03T00:00:00Z"
    # The equity marked at 00:00 is the one of the candle that closed then, 23:55 the day before.
    mark = next(d for d in decisions if d["ts_ms"] == today - CANDLE_MS)
    assert s["pnl_today_since"] == "2024-12-03T00:00:00Z"
    assert s["pnl_today_quote"] == pytest.approx(s["equity"] - mark["equity_after"], rel=1e-12)
    assert s["pnl_today_pct"] == pytest.approx((s["equity"] / mark["equity_after"] - 1) * 100, rel=1e-12)
    # Seven days back reaches before the state's first tick: the comparison is with the initial cash.
    assert decisions[0]["ts_ms"] + CANDLE_MS > today - 6 * DAY_MS
    assert s["pnl_7d_since"] == "2024-11-27T00:00:00Z"
    assert s["pnl_7d_quote"] == pytest.approx(s["equity"] - s["initial_cash"], rel=1e-12)


def test_buy_and_hold_since_the_start(replay: dict[str, Any]) -> None:
    s, decisions, fills, meta = replay["status"], replay["decisions"], replay["fills"], replay["meta"]
    first = next(d for d in decisions if d["status"] != "skipped" and d["close"] is not None)
    rate = sum(f["fee_quote"] for f in fills) / sum(f["notional_quote"] for f in fills)
    assert rate == pytest.approx(0.001, rel=1e-9)  # the replay's commission, read back from its fills
    cash, last_close = s["initial_cash"], meta["last_candle"]["close"]
    # q = C / P bought at the first close, the fee c * C paid from cash: E = C * (close / P - c)
    equity = cash * (last_close / first["close"] - rate)
    b = s["buy_hold"]
    assert (b["start_close"], b["start_ts"], b["fee_basis"]) == (first["close"], "2024-12-01T00:00:00Z", "settings")
    assert b["equity"] == pytest.approx(equity, rel=1e-9)
    assert b["profit_quote"] == pytest.approx(equity - cash, rel=1e-9)
    assert b["pct"] == pytest.approx((equity / cash - 1) * 100, rel=1e-9)
    assert b["fee_quote"] == pytest.approx(rate * cash, rel=1e-9)


def test_text_output_has_the_new_lines(replay: dict[str, Any]) -> None:
    code, out = ritmo(replay["root"], "status", "--state-dir", str(replay["state"]))
    assert code == 0
    lines = {line[:12].strip(): line[13:] for line in out.splitlines()}
    s = replay["status"]
    assert lines["entry"].startswith(f"price {s['entry_price']:,.2f} since {s['entry_ts']}  unrealised ")
    assert "exit fee not deducted" in lines["entry"]
    assert lines["p&l"].startswith(f"today {s['pnl_today_quote']:+,.2f} ({s['pnl_today_pct']:+.2f}%) since ")
    assert f"7 days {s['pnl_7d_quote']:+,.2f}" in lines["p&l"]
    assert lines["buy&hold"].startswith(f"equity {s['buy_hold']['equity']:,.2f}")
    assert f"({s['pnl_pct']:+.2f}%)" in lines["equity"]
    assert lines["paused"] == "no"


def test_paused_shows_who_and_since(replay: dict[str, Any], tmp_path: Path) -> None:
    db = tmp_path / replay["db"].name
    shutil.copy(replay["db"], db)
    at_ms = parse_utc_date_ms("2024-12-03T12:00")
    store = open_state_for_update(db)
    try:
        with store.transaction():
            store.set_meta("paused", {"paused": True, "by": "api:alice", "at_ms": at_ms, "command_id": 7})
    finally:
        store.conn.close()
    code, out = ritmo(tmp_path, "status", "--state-dir", str(tmp_path))
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("paused"))
    assert line.split(None, 1)[1].startswith("yes since 2024-12-03T12:00:00Z by api:alice (command 7)")
    code, out = ritmo(tmp_path, "status", "--json", "--state-dir", str(tmp_path))
    assert json.loads(out)["paused"] == {
        "paused": True,
        "by": "api:alice",
        "since": "2024-12-03T12:00:00Z",
        "at_ms": at_ms,
        "command_id": 7,
    }


@pytest.mark.parametrize("with_ledger", [True, False])
def test_a_fresh_state_reports_nulls_and_n_a(tmp_path: Path, with_ledger: bool) -> None:
    """Created (with its opening ledger, as the daemon's first start writes it, or not even that), no decision yet."""
    store = open_state(tmp_path / "paper-BTC-USDT.sqlite", mode="paper", symbol="BTC/USDT", lock=False)
    try:
        if with_ledger:
            with store.transaction():
                store.set_meta_many({"ledger": Ledger(cash_quote=1000.0).to_dict(), "initial_cash": 1000.0})
        s = collect_status(store)
    finally:
        store.close()
    for key in ("entry_price", "unrealised_pnl_quote", "pnl_today_quote", "pnl_7d_quote", "buy_hold"):
        assert s[key] is None, key
    assert s["pnl_pct"] == (0.0 if with_ledger else None)
    assert s["realised_pnl_quote"] == 0.0 and s["paused"]["paused"] is False
    text = format_status(s)
    assert "entry        n/a (flat)" in text and "buy&hold     n/a (no decision yet)" in text
    assert "p&l          today n/a (n/a) since n/a  7 days n/a (n/a) since n/a" in text
    json.dumps(s)
