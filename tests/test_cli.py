"""The `ritmo` command line, run in-process through `bot.cli.main` (plus one real `python -m bot` process).

What a user sees is tested: exit codes, one JSON object on stdout for `--json`, the files `--plot` and
`--trades` write, and exactly one `ritmo <command>: error: ...` line on stderr (never a traceback) for
every bad input.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import structlog

from bot.cli import main
from bot.files.checkpoints import save_checkpoint
from strategies.bundle import random_bundle
from strategies.candles import CANDLE_MS, parse_utc_date_ms
from strategies.features import compute_features, default_feature_spec, first_valid_row

REPO = Path(__file__).resolve().parent.parent
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
HEADER = "timestamp,open,high,low,close,volume"
METRIC_KEYS = {
    "total_return",
    "sharpe",
    "sortino",
    "max_drawdown",
    "n_trades",
    "turnover",
    "fees_quote",
    "share_long",
    "share_short",
    "share_flat",
}
TRADES_HEADER = ["time_utc", "ts_ms", "side", "qty_base", "price", "fee_quote", "position_after"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ERROR_PREFIX = "ritmo backtest: error: "


def _run(argv: list[str]) -> tuple[int, str, str]:
    """`ritmo argv` in-process: (exit code, stdout, stderr). SystemExit (argparse) counts as an exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _backtest_argv(data: Path, date_from: str = "2024-01-01", date_to: str = "2024-01-02", *extra: str) -> list[str]:
    """argv of `ritmo backtest --random-init` on `data` over [date_from, date_to), plus `extra`."""
    return ["backtest", "--random-init", "--data", str(data), "--from", date_from, "--to", date_to, *extra]


def _assert_one_error_line(code: int, out: str, err: str, *needles: str, expected_code: int = 1) -> str:
    """Exit 1 (or `expected_code`: 2 for usage errors), nothing on stdout, one stderr line `ritmo backtest:
    error: ...` holding every needle."""
    assert "Traceback" not in out + err, err
    assert code == expected_code, (code, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(ERROR_PREFIX), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------


def test_info_prints_the_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith("  ")}
    assert rows["MacroNet"] == "48,512"
    assert rows["MicroNet"] == "5,984"
    assert rows["decision"] == "29,315"
    assert rows["total"] == "83,811"


def test_info_json_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == {"macro": 48_512, "micro": 5_984, "head": 29_315, "total": 83_811}
    assert info["n_features"] == len(info["features"]) == 20
    assert (info["macro_window"], info["micro_window"]) == (492, 60)


def test_python_dash_m_bot_is_the_same_command() -> None:
    """The one real process: `python -m bot` is wired to the same entry point."""
    proc = subprocess.run(
        [sys.executable, "-m", "bot", "info", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["parameters"]["total"] == 83_811


# --------------------------------------------------------------------------------------------------
# backtest on the real data: --json, --plot, --trades
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(data_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `ritmo backtest --random-init --seed 1 ... --json --plot --trades` over 2024-11-01 .. 11-08."""
    tmp = tmp_path_factory.mktemp("demo")
    png, trades = tmp / "out.png", tmp / "sub" / "t.csv"
    argv = _backtest_argv(data_path, "2024-11-01", "2024-11-08", "--seed", "1", "--json")
    code, out, err = _run([*argv, "--plot", str(png), "--trades", str(trades)])
    return {"code": code, "out": out, "err": err, "png": png, "trades": trades}


def test_backtest_json_is_one_object_with_every_metric(demo_run: dict[str, Any]) -> None:
    assert demo_run["code"] == 0, demo_run["err"]
    out = demo_run["out"]
    assert out.endswith("\n") and out.count("\n") == 1, "exactly one line of JSON on stdout"
    doc = json.loads(out)
    for name in ("policy", "buy_and_hold", "flat"):
        assert set(doc[name]) >= METRIC_KEYS, (name, METRIC_KEYS - set(doc[name]))
    assert doc["candles"] == 7 * 288
    assert (doc["seed"], doc["greedy"], doc["model"]) == (1, False, "random-init")
    assert (doc["position_mode"], doc["commission"], doc["slippage_bps"]) == ("long_short", 0.001, 0.0)
    assert doc["from"].startswith("2024-11-01T00:00") and doc["to"].startswith("2024-11-08T00:00")


def test_backtest_json_values_are_sane(demo_run: dict[str, Any], candles_2024: pd.DataFrame) -> None:
    doc = json.loads(demo_run["out"])
    cash = doc["initial_cash"]
    for name in ("policy", "buy_and_hold", "flat"):
        m = doc[name]
        assert m["share_long"] + m["share_short"] + m["share_flat"] == pytest.approx(1.0, abs=1e-12)
        assert 0.0 <= m["max_drawdown"] < 1.0
        assert m["final_equity"] == pytest.approx(cash * (1 + m["total_return"]), rel=1e-12)
        # no slippage: every fee is commission x notional, so fees = commission x turnover x initial cash
        assert m["fees_quote"] == pytest.approx(0.001 * m["turnover"] * cash, rel=1e-9, abs=1e-12)

    ts = candles_2024["ts_ms"].to_numpy()
    i0 = int(np.searchsorted(ts, parse_utc_date_ms("2024-11-01")))
    i1 = int(np.searchsorted(ts, parse_utc_date_ms("2024-11-08")))
    open_first, close_last = candles_2024["open"].iloc[i0], candles_2024["close"].iloc[i1 - 1]
    bh = doc["buy_and_hold"]
    # The shared ledger buys q = C/P at the first open and pays the fee c*q*P = c*C from cash (cash ends at -c*C),
    # so E_end = C*(close/open - c): the return is close/open - 1 - c, not close/open*(1 - c) - 1 (fee from size).
    assert bh["total_return"] == pytest.approx(close_last / open_first - 1.0 - 0.001, abs=1e-9)
    assert (bh["n_trades"], bh["share_long"]) == (1, 1.0)
    assert bh["turnover"] == pytest.approx(1.0, rel=1e-12) and bh["fees_quote"] == pytest.approx(10.0, rel=1e-12)
    assert bh["sharpe"] is not None and math.isfinite(bh["sharpe"])

    flat = doc["flat"]
    assert flat["sharpe"] is None and flat["sortino"] is None  # NaN becomes JSON null
    assert (flat["total_return"], flat["n_trades"], flat["fees_quote"], flat["share_flat"]) == (0.0, 0, 0.0, 1.0)

    policy = doc["policy"]
    assert policy["n_trades"] > 0 and policy["sharpe"] is not None


def test_backtest_plot_is_a_png(demo_run: dict[str, Any]) -> None:
    data = demo_run["png"].read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_backtest_trades_csv_has_one_row_per_trade(demo_run: dict[str, Any], candles_2024: pd.DataFrame) -> None:
    doc = json.loads(demo_run["out"])
    with demo_run["trades"].open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == TRADES_HEADER
    trades = [dict(zip(TRADES_HEADER, r, strict=True)) for r in rows[1:]]
    assert len(trades) == doc["policy"]["n_trades"]
    opens = dict(zip(candles_2024["ts_ms"].tolist(), candles_2024["open"].tolist(), strict=True))
    start, end = parse_utc_date_ms("2024-11-01"), parse_utc_date_ms("2024-11-08")
    position = 0
    for t in trades:
        ts_ms = int(t["ts_ms"])
        assert start <= ts_ms < end
        assert pd.Timestamp(t["time_utc"]) == pd.Timestamp(ts_ms, unit="ms", tz="UTC")
        assert float(t["price"]) == opens[ts_ms]  # fills at the open, no slippage
        assert float(t["fee_quote"]) == pytest.approx(0.001 * float(t["qty_base"]) * float(t["price"]), rel=1e-12)
        after = int(float(t["position_after"]))
        assert t["side"] == ("buy" if after > position else "sell")
        position = after
    assert sum(float(t["fee_quote"]) for t in trades) == pytest.approx(doc["policy"]["fees_quote"], rel=1e-12)


def test_backtest_table_output(data_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_backtest_argv(data_path, "2024-11-01", "2024-11-02", "--greedy"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "policy" in captured.out and "buy&hold" in captured.out and "greedy" in captured.out
    assert "n/a" in captured.out  # flat's Sharpe
    assert captured.err == ""


# --------------------------------------------------------------------------------------------------
# bad input: one line, exit 1, no traceback
# --------------------------------------------------------------------------------------------------


def _valid_rows(n: int = 6) -> list[list[Any]]:
    """n valid, consecutive 5m candles from T0, as file rows."""
    rows = []
    for i in range(n):
        o = 100.0 + i
        rows.append([T0 + i * CANDLE_MS, o, o + 2, o - 1, o + 1, 10.5 + i])
    return rows


def _csv_text(rows: list[list[Any]], header: str = HEADER) -> str:
    """CSV text of `rows` under `header`."""
    return "\n".join([header, *(",".join(str(v) for v in r) for r in rows)]) + "\n"


def _csv_file(edit: Callable[[list[list[Any]]], None] | None = None, header: str = HEADER) -> Callable[[Path], Path]:
    """A writer of candles.csv: the valid rows, edited by `edit`."""

    def write(tmp: Path) -> Path:
        rows = _valid_rows()
        if edit:
            edit(rows)
        path = tmp / "candles.csv"
        path.write_text(_csv_text(rows, header))
        return path

    return write


def _raw_file(name: str, data: bytes) -> Callable[[Path], Path]:
    """A writer of a file `name` holding exactly `data`."""

    def write(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(data)
        return path

    return write


def _set(i: int, col: int, value: Any) -> Callable[[list[list[Any]]], None]:
    """An edit that sets rows[i][col] = value."""

    def edit(rows: list[list[Any]]) -> None:
        rows[i][col] = value

    return edit


def _swap(rows: list[list[Any]]) -> None:
    """Two candles out of time order."""
    rows[2], rows[3] = rows[3], rows[2]


def _duplicate(rows: list[list[Any]]) -> None:
    """One candle twice."""
    rows.insert(3, list(rows[2]))


def _off_boundary(rows: list[list[Any]]) -> None:
    """One timestamp a minute off the 5-minute grid."""
    rows[4][0] = rows[4][0] + 60_000


def _no_volume(rows: list[list[Any]]) -> None:
    """Drop the volume column."""
    for r in rows:
        del r[5]


def _directory(tmp: Path) -> Path:
    """A directory where the file should be."""
    path = tmp / "dir.csv"
    path.mkdir()
    return path


MALFORMED: list[tuple[str, Callable[[Path], Path], str]] = [
    ("missing-column", _csv_file(_no_volume, "timestamp,open,high,low,close"), "missing column(s) volume"),
    ("non-numeric", _csv_file(_set(3, 4, "abc")), "non-numeric value(s) in column close"),
    ("nan", _csv_file(_set(3, 2, "")), "missing (NaN)"),
    ("unsorted", _csv_file(_swap), "not sorted"),
    ("duplicates", _csv_file(_duplicate), "duplicate timestamp"),
    ("off-boundary", _csv_file(_off_boundary), "not on a 5-minute boundary"),
    ("negative-price", _csv_file(_set(1, 3, -5)), "non-positive low"),
    ("inconsistent-ohlc", _csv_file(_set(2, 2, 50.0)), "inconsistent OHLC"),
    ("empty-file", _raw_file("empty.csv", b""), "empty file"),
    ("header-only", _raw_file("header.csv", (HEADER + "\n").encode()), "no candles"),
    ("missing-file", lambda tmp: tmp / "nowhere.csv.gz", "file not found"),
    ("corrupt-gzip", _raw_file("bad.csv.gz", b"\x1f\x8b\x08\x00 this is not gzip"), "gzip"),
    ("wrong-extension", _raw_file("candles.txt", b"x"), "unknown file extension"),
    ("directory", _directory, "directory"),
]


@pytest.mark.parametrize(("writer", "problem"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_candle_file_is_one_clear_line(tmp_path: Path, writer: Callable[[Path], Path], problem: str) -> None:
    path = writer(tmp_path)
    code, out, err = _run(_backtest_argv(path))
    _assert_one_error_line(code, out, err, str(path), problem)


@pytest.mark.parametrize(
    ("date_from", "date_to", "problem"),
    [
        ("2024-13-01", "2024-12-01", "invalid date '2024-13-01'"),
        ("2024-11-01", "2024-02-30", "invalid date '2024-02-30'"),
        ("yesterday", "2024-12-01", "invalid date 'yesterday'"),
        ("2024-11-08", "2024-11-01", "--to must be after --from"),
        ("2024-11-01", "2024-11-01", "--to must be after --from"),
    ],
)
def test_bad_dates_are_one_clear_line(data_path: Path, date_from: str, date_to: str, problem: str) -> None:
    """Dates that do not parse and reversed or empty periods are usage errors: exit 2."""
    code, out, err = _run(_backtest_argv(data_path, date_from, date_to))
    _assert_one_error_line(code, out, err, problem, expected_code=2)


@pytest.mark.parametrize(("date_from", "date_to"), [("2025-03-01", "2025-04-01"), ("2023-01-01", "2023-06-01")])
def test_period_outside_the_data_is_one_clear_line(data_path: Path, date_from: str, date_to: str) -> None:
    code, out, err = _run(_backtest_argv(data_path, date_from, date_to))
    _assert_one_error_line(
        code, out, err, "holds no candles", "(it holds 2024-01-01 00:00 .. 2025-01-01 00:00 UTC)", expected_code=2
    )


def test_a_to_past_the_data_is_clipped_and_shown(data_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--to after the last candle: a warning `period_clipped` on stderr, the period used in the output."""
    code, out, err = _run(_backtest_argv(data_path, "2024-12-30", "2025-03-01", "--json"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["to"] == "2025-01-01T00:00:00+00:00" and doc["candles"] == 2 * 288
    warnings = [json.loads(line) for line in err.splitlines() if "period_clipped" in line]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert warnings[0]["requested"] == "2025-03-01 00:00" and warnings[0]["used"] == "2025-01-01 00:00"
    code, out, err = _run(_backtest_argv(data_path, "2024-12-30", "2025-03-01"))
    assert code == 0 and out.startswith("backtest 2024-12-30T00:00:00+00:00 .. 2025-01-01T00:00:00+00:00"), out


@pytest.fixture(scope="module")
def short_history_file(candles_2024: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid real-data file holding 200 candles: far too little history for any decision."""
    path = tmp_path_factory.mktemp("short") / "short.csv"
    candles_2024.iloc[:200].rename(columns={"ts_ms": "timestamp"}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def checkpoint_file(candles_2024: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init long_only policy saved as a checkpoint."""
    features = compute_features(candles_2024.iloc[:2000], default_feature_spec())
    bundle = random_bundle(3, features, slice(0, 2000), "long_only", 0.001)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "policy.pt", bundle)


@pytest.mark.parametrize("where", ["short-file", "before-data", "inside-warm-up"])
def test_not_enough_warm_up_with_random_init_is_one_clear_line(
    data_path: Path, short_history_file: Path, where: str
) -> None:
    data, date_from, date_to = {
        "short-file": (short_history_file, "2024-01-01T10:00", "2024-01-01T12:00"),
        "before-data": (data_path, "2023-12-01", "2024-01-10"),
        "inside-warm-up": (data_path, "2024-01-02", "2024-01-10"),
    }[where]
    code, out, err = _run(_backtest_argv(data, date_from, date_to))
    line = _assert_one_error_line(code, out, err, "warm-up", "1265 candles of history", expected_code=2)
    if where == "short-file":
        assert "this data holds fewer candles than that" in line
    else:  # the earliest --from: one candle after the 1265th candle of the file
        assert "the earliest --from for this data is 2024-01-05 09:25 (UTC)" in line


def test_not_enough_warm_up_with_a_checkpoint_is_one_clear_line(
    candles_2024: pd.DataFrame, short_history_file: Path, checkpoint_file: Path, data_path: Path
) -> None:
    argv = ["backtest", "--checkpoint", str(checkpoint_file), "--data", str(short_history_file)]
    code, out, err = _run([*argv, "--from", "2024-01-01T10:00", "--to", "2024-01-01T12:00"])
    _assert_one_error_line(code, out, err, "warm-up", expected_code=2)
    # one candle later than the first possible start runs fine; the first impossible one is refused
    first_ok = pd.Timestamp(int(candles_2024["ts_ms"].iloc[first_valid_row() + 1]), unit="ms").isoformat()
    one_short = pd.Timestamp(int(candles_2024["ts_ms"].iloc[first_valid_row()]), unit="ms").isoformat()
    argv = ["backtest", "--checkpoint", str(checkpoint_file), "--data", str(data_path), "--to", "2024-01-06", "--json"]
    code, out, err = _run([*argv, "--from", first_ok])
    assert code == 0, err
    assert json.loads(out)["position_mode"] == "long_only"
    code, out, err = _run([*argv, "--from", one_short])
    first_ok_text = pd.Timestamp(first_ok).strftime("%Y-%m-%d %H:%M")
    _assert_one_error_line(
        code, out, err, "warm-up", f"earliest --from for this data is {first_ok_text}", expected_code=2
    )


@pytest.mark.parametrize("problem", ["missing", "garbage", "mode"])
def test_checkpoint_problems_are_one_clear_line(
    data_path: Path, checkpoint_file: Path, tmp_path: Path, problem: str
) -> None:
    path, extra, needle = {
        "missing": (tmp_path / "none.pt", [], "file not found"),
        "garbage": (tmp_path / "bad.pt", [], "cannot be read"),
        "mode": (checkpoint_file, ["--mode", "long_short"], "differs from the checkpoint"),
    }[problem]
    if problem == "garbage":
        path.write_bytes(b"not a torch file")
    argv = ["backtest", "--checkpoint", str(path), "--data", str(data_path), "--from", "2024-11-01"]
    code, out, err = _run([*argv, "--to", "2024-11-02", *extra])
    # A --mode the checkpoint contradicts is a usage error (2); an unreadable checkpoint a runtime one (1).
    _assert_one_error_line(code, out, err, needle, expected_code=2 if problem == "mode" else 1)


@pytest.mark.parametrize(
    "extra",
    [
        ["--commission", "-0.1"],
        ["--commission", "1.5"],
        ["--commission", "nan"],
        ["--slippage-bps", "-5"],
        ["--slippage-bps", "20000"],  # >= 10,000 bps: a sell fills at a price <= 0
        ["--initial-cash", "0"],
        ["--initial-cash", "-100"],
    ],
    ids=lambda extra: "".join(extra),
)
def test_bad_numbers_are_one_clear_line(data_path: Path, extra: list[str]) -> None:
    code, out, err = _run(_backtest_argv(data_path, "2024-11-01", "2024-11-02", *extra))
    # Usage errors (2): argparse's own (usage line(s), then `ritmo backtest: error: argument --x: ...`) or ours.
    assert code == 2, (code, err)
    assert "Traceback" not in out + err and out == ""
    assert err.splitlines()[-1].startswith(ERROR_PREFIX) and extra[0] in err.splitlines()[-1]


def test_long_only_random_init_never_shorts(data_path: Path) -> None:
    code, out, err = _run(_backtest_argv(data_path, "2024-11-01", "2024-11-03", "--mode", "long_only", "--json"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["position_mode"] == "long_only"
    assert doc["policy"]["share_short"] == 0.0 and doc["policy"]["n_trades"] > 0


@contextlib.contextmanager
def _fresh_process_logging() -> Iterator[None]:
    """structlog as an unconfigured `ritmo` process has it (PrintLogger on stdout), restored afterwards."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stdout))
    try:
        yield
    finally:
        structlog.configure(**saved)


def test_json_stdout_stays_pure_when_the_file_has_a_gap(candles_2024: pd.DataFrame, tmp_path: Path) -> None:
    frame = candles_2024.iloc[:1700].drop(index=1600).rename(columns={"ts_ms": "timestamp"})
    path = tmp_path / "gap.csv"
    frame.to_csv(path, index=False)
    date_from = pd.Timestamp(int(candles_2024["ts_ms"].iloc[1400]), unit="ms").isoformat()
    with _fresh_process_logging():
        code, out, err = _run(_backtest_argv(path, date_from, "2024-01-07", "--json"))
    assert code == 0, err
    assert out.count("\n") == 1, out[:300]
    json.loads(out)


def test_download_without_out_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["download", "--since", "2024-01-01"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: ritmo download" in err and "--out" in err and "required" in err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "usage: ritmo" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"ritmo {importlib.metadata.version('ritmo')}\n"
