"""`ritmo train` end to end on the real data with tiny settings: files, rhythm, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bot.cli import main
from bot.files.checkpoints import load_checkpoint
from strategies.policy import PolicyNet


def train_args(data_path: Path, out: Path, updates: int, *extra: str) -> list[str]:
    return [
        "train",
        "--data", str(data_path),
        "--train-from", "2024-01-01", "--train-to", "2024-03-01",
        "--valid-from", "2024-03-01", "--valid-to", "2024-03-04",
        "--updates", str(updates),
        "--episodes-per-update", "4",
        "--episode-steps", "16",
        "--macro-every", "3",
        "--validate-every", "2",
        "--seed", "7",
        "--no-progress",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_path: Path) -> Path:
    out = tmp_path_factory.mktemp("straight") / "m.pt"
    assert main(train_args(data_path, out, 6)) == 0
    return out


def test_training_writes_checkpoint_metrics_and_best(straight_run: Path, capsys) -> None:
    out = straight_run
    assert out.is_file() and out.with_suffix(".best.pt").is_file()
    lines = [json.loads(x) for x in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    updates = [x for x in lines if x["type"] == "update"]
    validations = [x for x in lines if x["type"] == "validation"]
    assert [u["k"] for u in updates] == list(range(6))
    assert [v["k"] for v in validations] == [2, 4, 6]
    # the rhythm with macro_every=3: MacroNet learns on k = 0 and 3 only
    assert [("macro" in u["parts"]) for u in updates] == [True, False, False, True, False, False]
    for u in updates:
        assert u["env_steps"] == 4 * 16
        assert set(u) >= {"loss", "mean_reward", "entropy", "action_shares", "grad_norm", "wall_s"}
        assert abs(sum(u["action_shares"].values()) - 1) < 1e-9
    for v in validations:
        assert {"greedy", "sampled", "buy_and_hold", "score"} <= set(v)

    bundle = load_checkpoint(out)
    assert bundle.rhythm == {"schedule": "asymmetric", "macro_every": 3, "k": 6, "macro_updates": 2, "rest_updates": 6}
    assert bundle.metadata["seed"] == 7 and bundle.metadata["train_period"][0].startswith("2024-01-01")
    assert bundle.train_config["episodes_per_update"] == 4
    torch.manual_seed(7)
    init = PolicyNet(20).state_dict()
    trained = bundle.model.state_dict()
    assert all(not torch.equal(init[k], trained[k]) for k in init), "every part must have learned"


def test_same_command_gives_the_same_weights(straight_run: Path, tmp_path: Path, data_path: Path) -> None:
    again = tmp_path / "again.pt"
    assert main(train_args(data_path, again, 6)) == 0
    a, b = load_checkpoint(straight_run).model.state_dict(), load_checkpoint(again).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_the_count_and_matches_a_straight_run(
    straight_run: Path, tmp_path: Path, data_path: Path
) -> None:
    first = tmp_path / "first.pt"
    assert main(train_args(data_path, first, 4)) == 0
    resumed = tmp_path / "resumed.pt"
    assert main(train_args(data_path, resumed, 6, "--resume", str(first))) == 0
    r = load_checkpoint(resumed)
    assert r.rhythm["k"] == 6 and r.rhythm["macro_updates"] == 2
    a, b = load_checkpoint(straight_run).model.state_dict(), r.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resume must continue exactly where the run stopped"


def test_resume_refuses_a_different_mode_and_bad_periods(
    straight_run: Path, tmp_path: Path, data_path: Path, capsys
) -> None:
    code = main(
        train_args(data_path, tmp_path / "x.pt", 8, "--resume", str(straight_run), "--position-mode", "long_only")
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "position mode is long_short, expected long_only" in err[0]

    bad = train_args(data_path, tmp_path / "y.pt", 2)
    bad[bad.index("--valid-from") + 1] = "2024-02-01"
    assert main(bad) == 2  # an impossible period is a usage error
    assert "validation period must start at or after the end of the training period" in capsys.readouterr().err
