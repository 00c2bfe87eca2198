"""Checkpoints: weights_only round trip, atomic writes, clear refusals on mismatch or corruption."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from bot.errors import CheckpointError
from bot.files.checkpoints import load_checkpoint, save_checkpoint
from strategies.bundle import ModelBundle
from strategies.features import MACRO_WINDOW, MICRO_WINDOW, Standardizer, default_feature_spec
from strategies.policy import PolicyNet


def make_bundle(seed: int = 0, mode: str = "long_short") -> ModelBundle:
    torch.manual_seed(seed)
    model = PolicyNet(20)
    spec = default_feature_spec()
    opt = torch.optim.Adam(model.micro.parameters(), lr=5e-4)
    model.micro(torch.randn(4, 60)).sum().backward()
    opt.step()
    return ModelBundle(
        model=model,
        spec=spec,
        standardizer=Standardizer(mean=np.arange(20.0), std=np.ones(20)),
        position_mode=mode,
        commission=0.001,
        rhythm={"schedule": "asymmetric", "macro_every": 11, "k": 7, "macro_updates": 1, "rest_updates": 7},
        optimizers={"rest": opt.state_dict()},
        metadata={"seed": seed, "validation": {"score": -0.01}},
    )


def test_round_trip_is_weights_only_loadable(tmp_path: Path) -> None:
    bundle = make_bundle()
    path = save_checkpoint(tmp_path / "m.pt", bundle)
    raw = torch.load(path, weights_only=True)  # no pickled objects
    assert raw["format_version"] == 1 and raw["n_features"] == 20
    loaded = load_checkpoint(path)
    a, b = bundle.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.spec == bundle.spec
    np.testing.assert_array_equal(loaded.standardizer.mean, bundle.standardizer.mean)
    assert loaded.rhythm == bundle.rhythm
    assert loaded.metadata == bundle.metadata
    assert loaded.version() == bundle.version()
    assert not loaded.model.training
    assert loaded.optimizers is not None and loaded.optimizers["rest"]["state"]


def test_a_crash_during_save_leaves_the_previous_file_loadable(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_bundle(seed=1))
    version_before = load_checkpoint(path).version()

    real_save = torch.save

    def crash_half_way(obj, fh, *args, **kwargs):
        real_save(obj, fh, *args, **kwargs)
        fh.seek(fh.tell() // 2)
        fh.truncate()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, make_bundle(seed=2))
    monkeypatch.undo()
    assert load_checkpoint(path).version() == version_before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"], "the temporary file must be removed"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"expect_mode": "long_only"}, "position mode is long_short, expected long_only"),
        ({"expect_windows": (480, 60)}, "windows are macro=492"),
        (
            {
                "expect_spec": dataclasses.replace(
                    default_feature_spec(), params={**default_feature_spec().params, "rsi_window": 21}
                )
            },
            "feature spec differs",
        ),
    ],
)
def test_mismatch_stops_with_a_clear_message(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = save_checkpoint(tmp_path / "m.pt", make_bundle())
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, **kwargs)
    load_checkpoint(path, expect_mode="long_short", expect_windows=(MACRO_WINDOW, MICRO_WINDOW))


def test_corrupt_missing_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format_version": 99}, foreign)
    with pytest.raises(CheckpointError, match="unsupported format version 99"):
        load_checkpoint(foreign)
    truncated = tmp_path / "trunc.pt"
    save_checkpoint(truncated, make_bundle())
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(truncated)
