"""Checkpoint files (docs/design.md §7): one `torch.save` dict of plain tensors and JSON-able values, written
atomically.

Loadable with `torch.load(path, weights_only=True)`: no pickled objects, only state dicts, lists, numbers
and strings. They hold a `strategies.bundle.ModelBundle`, what the rest of the code passes around.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from bot.errors import CheckpointError
from strategies.actions import validate_position_mode
from strategies.bundle import ModelBundle
from strategies.features import FeatureSpec, Standardizer
from strategies.policy import PolicyNet

FORMAT_VERSION = 1


def bundle_to_payload(bundle: ModelBundle) -> dict[str, Any]:
    """The dict that is saved: plain tensors and JSON-able values only."""
    return {
        "format_version": FORMAT_VERSION,
        "n_features": bundle.n_features,
        "model": {name: getattr(bundle.model, name).state_dict() for name in ("macro", "micro", "head")},
        "optimizers": bundle.optimizers,
        "feature_spec": bundle.spec.to_dict(),
        "standardizer": bundle.standardizer.to_dict(),
        "macro_window": int(bundle.macro_window),
        "micro_window": int(bundle.micro_window),
        "decide_every": int(bundle.decide_every),
        "position_mode": bundle.position_mode,
        "commission": float(bundle.commission),
        "rhythm": _plain(bundle.rhythm),
        "train_config": _plain(bundle.train_config),
        "metadata": _plain(bundle.metadata),
    }


def _plain(value: dict[str, Any]) -> dict[str, Any]:
    """A JSON round trip: only plain dicts, lists, strings and numbers reach the file (weights_only loads).

    str subclasses such as torch.__version__ would otherwise be pickled as their own class.
    """
    return json.loads(json.dumps(value, default=str, allow_nan=True))


def save_checkpoint(path: str | Path, bundle: ModelBundle) -> Path:
    """Write atomically: temporary file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(bundle_to_payload(bundle), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(
    path: str | Path,
    *,
    expect_spec: FeatureSpec | None = None,
    expect_mode: str | None = None,
    expect_windows: tuple[int, int] | None = None,
) -> ModelBundle:
    """Load a checkpoint; any mismatch with what the caller expects stops with a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a torch file
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise CheckpointError(f"checkpoint {path}: unsupported format version {version!r} (expected {FORMAT_VERSION})")
    try:
        bundle = _payload_to_bundle(payload)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: malformed ({type(exc).__name__}: {exc})") from None
    if expect_spec is not None and bundle.spec != expect_spec:
        raise CheckpointError(
            f"checkpoint {path}: feature spec differs from the expected one "
            f"(checkpoint {list(bundle.spec.names)[:3]}..., expected {list(expect_spec.names)[:3]}...)"
        )
    if expect_mode is not None and bundle.position_mode != expect_mode:
        raise CheckpointError(f"checkpoint {path}: position mode is {bundle.position_mode}, expected {expect_mode}")
    if expect_windows is not None and (bundle.macro_window, bundle.micro_window) != tuple(expect_windows):
        raise CheckpointError(
            f"checkpoint {path}: windows are macro={bundle.macro_window} micro={bundle.micro_window}, "
            f"expected macro={expect_windows[0]} micro={expect_windows[1]}"
        )
    return bundle


def _decide_every(value: Any) -> int:
    """The stored decision interval; absent in checkpoints written before it existed (then 1)."""
    k = int(value)
    if k < 1:
        raise ValueError(f"decide_every must be >= 1, got {k}")
    return k


def _payload_to_bundle(payload: dict[str, Any]) -> ModelBundle:
    n_features = int(payload["n_features"])
    model = PolicyNet(n_features)
    for name in ("macro", "micro", "head"):
        getattr(model, name).load_state_dict(payload["model"][name])
    model.eval()
    mode = str(payload["position_mode"])
    validate_position_mode(mode)
    spec = FeatureSpec.from_dict(payload["feature_spec"])
    if len(spec.names) != n_features:
        raise ValueError(f"feature spec has {len(spec.names)} names but the network expects {n_features}")
    return ModelBundle(
        model=model,
        spec=spec,
        standardizer=Standardizer.from_dict(payload["standardizer"]),
        position_mode=mode,
        commission=float(payload["commission"]),
        macro_window=int(payload["macro_window"]),
        micro_window=int(payload["micro_window"]),
        decide_every=_decide_every(payload.get("decide_every", 1)),
        rhythm=dict(payload["rhythm"]),
        optimizers=payload.get("optimizers"),
        train_config=dict(payload.get("train_config") or {}),
        metadata=dict(payload.get("metadata") or {}),
    )
