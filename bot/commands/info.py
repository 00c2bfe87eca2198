"""`ritmo info`: parameter counts per part, the feature set, and a checkpoint's metadata."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bot.files.checkpoints import load_checkpoint
from strategies.features import MACRO_WINDOW, MICRO_WINDOW, default_feature_spec
from strategies.policy import PolicyNet, parameter_counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo info`."""
    p.add_argument("--checkpoint", type=Path, help="describe this checkpoint instead of a fresh network")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def describe(checkpoint: Path | None) -> dict[str, Any]:
    """Everything `ritmo info` shows, as a JSON-able dict."""
    if checkpoint is None:
        spec = default_feature_spec()
        model = PolicyNet(len(spec.names))
        return {
            "checkpoint": None,
            "n_features": len(spec.names),
            "features": list(spec.names),
            "macro_window": MACRO_WINDOW,
            "micro_window": MICRO_WINDOW,
            "parameters": parameter_counts(model),
        }
    bundle = load_checkpoint(checkpoint)
    return {
        "checkpoint": str(checkpoint),
        "model_version": bundle.version(),
        "n_features": bundle.n_features,
        "features": list(bundle.spec.names),
        "macro_window": bundle.macro_window,
        "micro_window": bundle.micro_window,
        "position_mode": bundle.position_mode,
        "commission": bundle.commission,
        "objective": bundle.objective,
        "decide_every": bundle.decide_every,
        "rhythm": bundle.rhythm,
        "parameters": parameter_counts(bundle.model),
        "train_config": bundle.train_config,
        "metadata": bundle.metadata,
    }


def main(args: argparse.Namespace) -> int:
    """Run `ritmo info`."""
    info = describe(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    counts = info["parameters"]
    print(f"checkpoint      {info['checkpoint'] or '(none: a freshly initialised network)'}")
    if info.get("model_version"):
        print(f"model version   {info['model_version']}")
        print(f"position mode   {info['position_mode']}   commission {info['commission']}")
        print(f"objective       {info['objective']}   decide every {info['decide_every']} candle(s)")
        print(f"rhythm          {json.dumps(info['rhythm'])}")
    print(f"windows         macro {info['macro_window']} candles, micro {info['micro_window']} candles")
    print(f"features (N={info['n_features']})  {', '.join(info['features'])}")
    print("parameters")
    for part, label in (("macro", "MacroNet"), ("micro", "MicroNet"), ("head", "decision head"), ("total", "total")):
        print(f"  {label:14s} {counts[part]:>8,d}")
    for section in ("train_config", "metadata"):
        if info.get(section):
            print(section)
            for key, value in info[section].items():
                print(f"  {key:22s} {json.dumps(value, default=str)}")
    return 0
