"""`ritmo trades` on a real long_only replay: every fill with its realised P&L (checked by hand from the fills
table), the period filter (--to exclusive), --csv, --json, the summary line, and its errors (exit 2 for a
reversed period, exit 1 naming an unwritable CSV path)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bot.cli import main as cli_main
from bot.daemon.state import open_state, open_state_readonly
from strategies.candles import CANDLE_MS, iso_utc
from tests.conftest import process_isolation
from tests.test_daemon import make_checkpoint
from tests.test_replay import replay_args


def ritmo(cwd: Path, *argv: str) -> tuple[int, str, str]:
    """`ritmo argv` in-process (isolated as in tests/conftest.py): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as mp,
        process_isolation(mp, cwd),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = cli_main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> dict[str, Any]:
    """A 3-day long_only replay (learning off) of a seeded random policy that trades, and its fills table."""
    root = tmp_path_factory.mktemp("trades")
    checkpoint = make_checkpoint(root / "c.pt", candles_2024, mode="long_only")
    state = root / "state"
    code, _, err = ritmo(root, *replay_args(state, checkpoint, "2024-12-01", "2024-12-04", 5), "--no-online-learning")
    assert code == 0, err
    (db,) = state.glob("*.sqlite")
    store = open_state_readonly(db)
    try:
        fills = store.fills()
    finally:
        store.conn.close()
    assert len(fills) >= 50, "the test policy must trade"
    return {"root": root, "state": state, "fills": fills}


def _json(replay: dict[str, Any], *extra: str) -> list[dict[str, Any]]:
    code, out, err = ritmo(replay["root"], "trades", "--json", "--state-dir", str(replay["state"]), *extra)
    assert code == 0, err
    assert out.count("\n") == 1, "one line of JSON"
    return json.loads(out)


def test_every_fill_with_its_realised_pnl(replay: dict[str, Any]) -> None:
    rows, fills = _json(replay), replay["fills"]
    assert len(rows) == len(fills)
    entry: dict[str, Any] | None = None
    for row, f in zip(rows, fills, strict=True):
        fill_ms = f["decision_ts_ms"] + CANDLE_MS  # the decision candle's close
        assert (row["time_utc"], row["ts_ms"]) == (iso_utc(fill_ms), fill_ms)
        for key in (
            "side",
            "qty_base",
            "price",
            "notional_quote",
            "fee_quote",
            "position_before",
            "position_after",
            "client_order_id",
        ):
            assert row[key] == f[key], key
        if f["side"] == "buy":  # long_only: a buy opens from flat, a sell closes all of it
            assert (f["position_before"], f["position_after"]) == (0, 1)
            assert row["realised_pnl_quote"] is None and row["entry_price"] == f["price"]
            entry = f
        else:
            assert entry is not None and (f["position_before"], f["position_after"]) == (1, 0)
            assert f["qty_base"] == entry["qty_base"]
            expected = f["qty_base"] * (f["price"] - entry["price"]) - entry["fee_quote"] - f["fee_quote"]
            assert row["realised_pnl_quote"] == pytest.approx(expected, rel=1e-9, abs=1e-9)
            assert row["entry_price"] == entry["price"]
            entry = None


def test_table_and_summary_line(replay: dict[str, Any]) -> None:
    code, out, _ = ritmo(replay["root"], "trades", "--state-dir", str(replay["state"]))
    assert code == 0
    lines, fills = out.splitlines(), replay["fills"]
    assert lines[0].startswith("time (UTC)") and len(lines) == len(fills) + 2
    assert lines[1].startswith(iso_utc(fills[0]["decision_ts_ms"] + CANDLE_MS))
    assert lines[1].endswith(f" {fills[0]['client_order_id']}")
    buys = sum(f["side"] == "buy" for f in fills)
    realised = sum(r["realised_pnl_quote"] or 0.0 for r in _json(replay))
    fees = sum(f["fee_quote"] for f in fills)
    assert lines[-1].startswith(f"{len(fills)} fills ({buys} buys, {len(fills) - buys} sells)")
    assert f"fees {fees:,.2f}  realised P&L {realised:+,.2f} over {len(fills) - buys} closing fills" in lines[-1]


def test_period_filter_to_is_exclusive(replay: dict[str, Any]) -> None:
    times = [f["decision_ts_ms"] + CANDLE_MS for f in replay["fills"]]
    lo, hi = iso_utc(times[10]), iso_utc(times[20])
    rows = _json(replay, "--from", lo, "--to", hi)
    assert [r["ts_ms"] for r in rows] == [t for t in times if times[10] <= t < times[20]]
    assert rows[0]["ts_ms"] == times[10] and rows[-1]["ts_ms"] < times[20]
    day = _json(replay, "--from", "2024-12-02", "--to", "2024-12-03")
    assert day and all(r["time_utc"].startswith("2024-12-02") for r in day)
    assert len(day) == sum(iso_utc(t).startswith("2024-12-02") for t in times)


def test_csv_holds_the_same_rows(replay: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "new" / "fills.csv"
    code, out, _ = ritmo(replay["root"], "trades", "--state-dir", str(replay["state"]), "--csv", str(path))
    assert code == 0 and out.splitlines()[0] == f"wrote {len(replay['fills'])} fills to {path}"
    with path.open(newline="") as fh:
        got = list(csv.DictReader(fh))
    rows = _json(replay)
    assert len(got) == len(rows)
    for g, r in zip(got, rows, strict=True):
        assert g["time_utc"] == r["time_utc"] and g["client_order_id"] == r["client_order_id"]
        assert float(g["price"]) == r["price"] and float(g["fee_quote"]) == r["fee_quote"]  # full precision
        pnl = r["realised_pnl_quote"]
        assert (g["realised_pnl_quote"] == "") if pnl is None else float(g["realised_pnl_quote"]) == pnl


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            ["--from", "2024-12-03", "--to", "2024-12-02"],
            "--to must be after --from: --to 2024-12-02 00:00 is not after --from 2024-12-03 00:00 (UTC)",
        ),
        (["--from", "2024-12-03", "--to", "2024-12-03"], "must be after"),
        (["--from", "yesterday"], "invalid date 'yesterday'"),
    ],
)
def test_a_bad_period_is_a_usage_error(replay: dict[str, Any], extra: list[str], needle: str) -> None:
    code, out, err = ritmo(replay["root"], "trades", "--state-dir", str(replay["state"]), *extra)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("ritmo trades: error: ") and needle in err


def test_an_unwritable_csv_is_one_line_naming_the_path(replay: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "fills.csv"  # a folder that is a file: not even root can write there
    code, out, err = ritmo(replay["root"], "trades", "--state-dir", str(replay["state"]), "--csv", str(path))
    assert (code, out) == (1, "")
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(f"ritmo trades: error: {path}: cannot write the CSV")


def test_a_state_without_fills(tmp_path: Path) -> None:
    open_state(tmp_path / "paper-BTC-USDT.sqlite", mode="paper", symbol="BTC/USDT", lock=False).close()
    code, out, _ = ritmo(tmp_path, "trades", "--state-dir", str(tmp_path))
    assert code == 0
    assert out.splitlines()[-1].startswith("0 fills (0 buys, 0 sells)")
    code, out, _ = ritmo(tmp_path, "trades", "--json", "--state-dir", str(tmp_path))
    assert (code, json.loads(out)) == (0, [])
