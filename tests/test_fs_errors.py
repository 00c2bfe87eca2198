"""File-system problems are one line naming the path and the problem, never a traceback (docs/design.md §12):
exit 78 for the state directory (a setting), 1 for a command's own output file, checked before the work.

The tests run as root here, and root ignores permission bits, so `chmod` cannot make a path unwritable. They use
paths that fail for root too: a path under a regular file (the kernel answers ENOTDIR), a regular file where a
directory should be, a directory given where a file should be, and, where the host has one, a sysfs directory
that refuses new files even to root (skipped where it does not).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import DATA_2024
from tests.test_cli import _run
from tests.test_daemon import make_checkpoint

REPO = Path(__file__).resolve().parent.parent
# A directory that exists and refuses new files even to root (sysfs); probed, the test skips where it does not.
SYSFS_DIR = Path("/sys/kernel/mm")


@pytest.fixture(autouse=True)
def _isolated(isolated_process: None, localhost_only: None) -> None:
    """Process state isolated, and nothing but 127.0.0.1 reachable (tests/conftest.py)."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "fs.pt", candles_2024)


def _one_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ritmo {command}: error: "), err
    return lines[0]


def _regular_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


def _sysfs_dir_refuses_root() -> bool:
    try:
        fd = os.open(SYSFS_DIR / "ritmo-probe", os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError:
        return SYSFS_DIR.is_dir()
    os.close(fd)
    os.unlink(SYSFS_DIR / "ritmo-probe")
    return False


# ---------------------------------------------------------------------------------------------------
# The state directory: exit 78.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file", "sysfs"])
def test_unusable_state_directory_is_one_line_and_78(tmp_path: Path, checkpoint: Path, where: str) -> None:
    blocker = _regular_file(tmp_path)
    if where == "under-a-file":
        state_dir, problem = blocker / "state", f"{blocker} is a file, not a directory"
    elif where == "is-a-file":
        state_dir, problem = blocker, f"{blocker} is a file, not a directory"
    else:
        if not _sysfs_dir_refuses_root():
            pytest.skip(f"{SYSFS_DIR} accepts new files here")
        state_dir, problem = SYSFS_DIR, "Permission denied"
    argv = ["run", "--replay", str(DATA_2024), "--from", "2024-12-01", "--to", "2024-12-02"]
    code, _, err = _run([*argv, "--checkpoint", str(checkpoint), "--state-dir", str(state_dir)])
    assert code == 78, err
    line = _one_line(err, "run")
    assert line == f"ritmo run: error: cannot write state directory {state_dir}: {problem}"
    assert blocker.read_text() == "not a directory"  # nothing was written over it


def test_status_on_a_state_directory_that_is_a_file(tmp_path: Path) -> None:
    blocker = _regular_file(tmp_path)
    code, _, err = _run(["status", "--state-dir", str(blocker)])
    assert code != 0
    _one_line(err, "status")


# ---------------------------------------------------------------------------------------------------
# A command's own output: exit 1, checked before the work.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--plot", "--trades"])
def test_backtest_output_is_checked_before_the_backtest(tmp_path: Path, option: str) -> None:
    """The data file does not even exist: the output path is refused first, before any work."""
    blocker = _regular_file(tmp_path)
    target = blocker / "out" / ("equity.png" if option == "--plot" else "trades.csv")
    argv = ["backtest", "--random-init", "--data", str(tmp_path / "missing.csv.gz")]
    code, out, err = _run([*argv, "--from", "2024-11-01", "--to", "2024-11-02", option, str(target)])
    assert code == 1 and out == ""
    line = _one_line(err, "backtest")
    assert line == f"ritmo backtest: error: cannot write {option} {target}: {blocker} is a file, not a directory"


def test_backtest_output_that_is_a_directory(tmp_path: Path, data_path: Path) -> None:
    argv = ["backtest", "--random-init", "--data", str(data_path), "--from", "2024-11-01", "--to", "2024-11-02"]
    code, _, err = _run([*argv, "--trades", str(tmp_path)])
    assert code == 1
    assert _one_line(err, "backtest").endswith(f"cannot write --trades {tmp_path}: it is a directory")


def test_download_out_is_checked_before_any_request(tmp_path: Path) -> None:
    """An unreachable exchange would fail too: the --out error comes first, without a request."""
    blocker = _regular_file(tmp_path)
    argv = ["download", "--since", "2024-01-01", "--until", "2024-01-02", "--out", str(blocker / "x.csv.gz")]
    code, _, err = _run([*argv, "--exchange-config", '{"urls": {"api": {"public": "http://127.0.0.1:9"}}}'])
    assert code == 1
    assert _one_line(err, "download").endswith(f"--out {blocker / 'x.csv.gz'}: {blocker} is a file, not a directory")


def test_train_out_is_checked_before_training(tmp_path: Path) -> None:
    blocker = _regular_file(tmp_path)
    argv = ["train", "--data", str(tmp_path / "missing.csv"), "--out", str(blocker / "ckpt" / "x.pt")]
    argv += ["--train-from", "2024-01-01", "--train-to", "2024-06-01", "--valid-from", "2024-06-01"]
    code, _, err = _run([*argv, "--valid-to", "2024-07-01"])
    assert code == 1
    assert f"cannot write --out {blocker / 'ckpt' / 'x.pt'}: {blocker} is a file" in _one_line(err, "train")


def test_evaluate_out_is_checked_before_the_folds(tmp_path: Path) -> None:
    blocker = _regular_file(tmp_path)
    argv = ["evaluate", "--data", str(tmp_path / "missing.csv"), "--set", "updates=1", "--no-record"]
    code, _, err = _run([*argv, "--out", str(blocker / "eval")])
    assert code == 1
    assert f"cannot write --out {blocker / 'eval'}: {blocker} is a file" in _one_line(err, "evaluate")


# ---------------------------------------------------------------------------------------------------
# Reversed periods are usage errors (2) in every command that takes one.
# ---------------------------------------------------------------------------------------------------


TRAIN = ["train", "--data", "x.csv", "--out", "x.pt"]
VALID_JUNE = ["--valid-from", "2024-06-01", "--valid-to", "2024-07-01"]
VALID_REVERSED = ["--valid-from", "2024-07-01", "--valid-to", "2024-06-15"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["download", "--since", "2024-02-01", "--until", "2024-01-01", "--out", "x.csv"], "--until must be after"),
        (
            [*TRAIN, "--train-from", "2024-06-01", "--train-to", "2024-01-01", *VALID_JUNE],
            "--train-to must be after --train-from",
        ),
        (
            [*TRAIN, "--train-from", "2024-01-01", "--train-to", "2024-06-01", *VALID_REVERSED],
            "--valid-to must be after --valid-from",
        ),
        (["evaluate", "--data", "x.csv", "--out", "o", "--until", "someday"], "--until: invalid date 'someday'"),
    ],
    ids=["download", "train", "train-valid", "evaluate"],
)
def test_impossible_periods_exit_2(argv: list[str], message: str) -> None:
    code, out, err = _run(argv)
    assert code == 2, err
    assert message in _one_line(err, argv[0]) and out == ""


# ---------------------------------------------------------------------------------------------------
# Ctrl-C during start-up.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay_s", [0.3, 0.5, 0.7, 1.0, 1.5])
def test_ctrl_c_while_starting_exits_130_with_one_line(tmp_path: Path, checkpoint: Path, delay_s: float) -> None:
    """SIGINT while `ritmo run` imports torch and loads: "ritmo run: interrupted", 130, no traceback, no state.

    Several moments, since one inside torch's C++ start-up used to abort the process (SIGABRT, see bot/cli.py).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RITMO_")}
    env["PYTHONPATH"] = str(REPO)
    argv = [sys.executable, "-m", "bot", "run", "--replay", str(DATA_2024), "--from", "2024-12-01"]
    argv += ["--to", "2024-12-02", "--checkpoint", str(checkpoint), "--state-dir", str(tmp_path / "state")]
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(delay_s)  # inside the imports (bot.commands.run -> torch) or just after
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err == "ritmo run: interrupted\n"
    assert not list((tmp_path / "state").glob("*.sqlite*")) if (tmp_path / "state").exists() else True
