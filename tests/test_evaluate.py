"""`ritmo evaluate`: folds, baselines on the real data, a small end-to-end run, resuming, and test read once."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from bot.cli import main
from bot.offline.walk_forward import Fold, FoldSpec, count_trials, make_folds, parse_fold_spec
from strategies.candles import parse_utc_date_ms as d

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def test_fold_spec_and_walk_forward_folds() -> None:
    assert parse_fold_spec("24/3/3/3") == FoldSpec(24, 3, 3, 3)
    folds = make_folds(d("2021-01-01"), d("2025-01-01"), FoldSpec(24, 3, 3, 3))
    assert len(folds) == 7
    assert folds[0] == Fold(
        0, (d("2021-01-01"), d("2023-01-01")), (d("2023-01-01"), d("2023-04-01")), (d("2023-04-01"), d("2023-07-01"))
    )
    assert folds[-1].test == (d("2024-10-01"), d("2025-01-01"))
    for a, b in itertools.pairwise(folds):
        assert b.test[0] == a.test[1]  # test periods tile the time line without overlap
        assert a.train[1] == a.valid[0] and a.valid[1] == a.test[0]
    # data starting mid-month: the first fold starts at the next month boundary
    assert make_folds(d("2024-01-15"), d("2025-01-01"), FoldSpec(3, 1, 1, 1))[0].train[0] == d("2024-02-01")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--folds", "24/3/3"], "TRAIN/VALID/TEST/STEP"),
        (["--folds", "24/0/3/3"], "TRAIN/VALID/TEST/STEP"),
        (["--folds", "12/3/3/3"], "too little data for one fold"),
        (["--costs", "0.001,x"], "--costs"),
        (["--set", "objective=sharpe"], "unknown objective"),
        (["--set", "bogus=1"], "unknown configuration field"),
        (["--seeds", "0"], "must be >= 1"),
    ],
)
def test_bad_requests_give_one_line_and_exit_2(isolated_process, capsys, argv: list[str], message: str) -> None:
    base = ["evaluate", "--data", str(DATA / "binance_BTCUSDT_5m_2024.csv.gz"), "--out", "ev"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ritmo evaluate: error:") and message in err[0]


def test_baselines_match_the_issue_figures_for_2024() -> None:
    """Buy-and-hold and SMA 1d/5d long_only over 2024 at 0.1% per side, next-open fills (5-minute Sharpe)."""
    from bot.files.candles import load_candle_files
    from bot.offline.walk_forward import baseline_figures

    candles = load_candle_files([DATA / "binance_BTCUSDT_5m_2023.csv.gz", DATA / "binance_BTCUSDT_5m_2024.csv.gz"])
    base = baseline_figures(candles, (d("2024-01-01"), d("2025-01-01")), "long_only", [0.001])["0.001"]
    assert round(base["buy_and_hold"]["sharpe"], 2) == 1.47
    assert round(base["sma_1d_5d_long_only"]["sharpe"], 2) == 2.05
    assert base["flat"]["total_return"] == 0.0 and base["buy_and_hold"]["n_trades"] == 1
    assert base["sma_1d_5d_long_only"]["n_trades"] > 50


def test_a_small_walk_forward_run_reports_resumes_and_reads_test_once(isolated_process, capsys) -> None:
    argv = ["evaluate", "--data", str(DATA / "binance_BTCUSDT_5m_2024.csv.gz"), "--folds", "6/1/1/3"]
    argv += ["--seeds", "2", "--workers", "1", "--validate-every", "1", "--costs", "0,0.001"]
    argv += ["--set", "updates=2", "--set", "episodes_per_update=4", "--set", "episode_steps=12"]
    argv += ["--set", 'objective="expected_pnl"', "--set", "decide_every=12", "--set", 'position_mode="long_only"']
    argv += ["--trials", "trials.jsonl", "--out", "ev", "--no-progress"]
    assert main(argv) == 0
    headline = json.loads(capsys.readouterr().out)
    assert headline["split"] == "valid" and headline["n_trials"] == 2
    results = json.loads(Path("ev/results.json").read_text())
    assert [f["index"] for f in results["folds"]] == [0, 1]
    pooled = results["pooled"]["valid"]
    assert set(pooled) == {"0.0", "0.001"}
    pol = pooled["0.001"]["policy"]
    # the same trades at both costs, so costs only lower the result
    assert pol["total_return"] < pooled["0.0"]["policy"]["total_return"]
    assert set(pooled["0.001"]["baselines"]) >= {"flat", "buy_and_hold", "sma_1d_5d_long_only", "random"}
    for name in ("report.md", "equity.png", "sharpe.png"):
        assert Path("ev", name).stat().st_size > 1000
    assert "## Targets" in Path("ev/report.md").read_text()
    units = sorted(Path("ev/units").glob("*/result.json"))
    assert len(units) == 4
    mtimes = [u.stat().st_mtime_ns for u in units]

    # resumed: a finished (fold, seed) is not retrained or recomputed
    assert main([*argv, "--no-record"]) == 0
    assert json.loads(capsys.readouterr().out)["policy_return"] == headline["policy_return"]
    assert [u.stat().st_mtime_ns for u in units] == mtimes

    # the test folds, read once: the trained units are reused, only their test backtests are added
    models = sorted(Path("ev/units").glob("*/model.best.pt"))
    trained = [m.stat().st_mtime_ns for m in models]
    assert main([*argv, "--split", "test"]) == 0
    capsys.readouterr()
    assert [m.stat().st_mtime_ns for m in models] == trained
    results = json.loads(Path("ev/results.json").read_text())
    assert results["splits"] == ["valid", "test"]
    trials = [json.loads(line) for line in Path("trials.jsonl").read_text().splitlines()]
    assert [t["split"] for t in trials] == ["valid", "test"] and count_trials(trials) == 2

    # ... once: a second reading of the same configuration's test folds is refused
    assert main([*argv, "--split", "test"]) == 2
    assert "read already" in capsys.readouterr().err


def test_a_cached_unit_is_never_reused_for_other_months(tmp_path: Path) -> None:
    """Fold 1 of two fold specs has the same index and other months: other folders, and a mismatch refused."""
    from bot.offline.walk_forward import EvaluateError, run_unit, unit_name

    a = make_folds(d("2021-01-01"), d("2025-01-01"), FoldSpec(24, 3, 3, 3))[1]
    b = make_folds(d("2021-01-01"), d("2025-01-01"), FoldSpec(24, 3, 3, 6))[1]
    assert a.index == b.index == 1 and unit_name("h", a, 0) != unit_name("h", b, 0)
    unit = tmp_path / unit_name("h", b, 0)
    unit.mkdir()
    stale = {"periods": [list(a.train), list(a.valid), list(a.test)], "splits": {"valid": {}}}
    (unit / "result.json").write_text(json.dumps(stale))
    task = {"dir": str(unit), "fold": 1, "train": b.train, "valid": b.valid, "test": b.test, "splits": ["valid"]}
    with pytest.raises(EvaluateError, match="other periods"):
        run_unit(task)
