"""`ritmo train`: the command line of one offline training run (bot/offline/fit.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import structlog
import torch

from bot.errors import UsageError
from bot.files.candles import load_candle_files
from bot.files.checkpoints import load_checkpoint
from bot.files.paths import check_output_file
from bot.offline.fit import TrainError, fit
from bot.offline.periods import check_order, parse_date
from strategies.actions import POSITION_MODES
from strategies.bundle import ModelBundle, PeriodError
from strategies.features import (
    MACRO_WINDOW,
    MICRO_WINDOW,
    FeatureSpec,
    compute_features,
    default_feature_spec,
)
from strategies.objectives import OBJECTIVES
from strategies.trainer import SCHEDULES, START_POSITIONS, TrainConfig

log = structlog.get_logger("ritmo.train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo train`."""
    d = TrainConfig()
    p.add_argument(
        "--data", type=Path, nargs="+", required=True, help="candle file(s) of one market (CSV, CSV.gz, Parquet)"
    )
    p.add_argument("--train-from", required=True, help="training period start (UTC)")
    p.add_argument("--train-to", required=True, help="training period end, exclusive (UTC)")
    p.add_argument("--valid-from", required=True, help="validation period start (UTC)")
    p.add_argument("--valid-to", required=True, help="validation period end, exclusive (UTC)")
    p.add_argument("--updates", type=int, default=d.updates, help="number of updates K")
    p.add_argument("--episodes-per-update", type=int, default=d.episodes_per_update, help="B")
    p.add_argument("--episode-steps", type=int, default=d.episode_steps, help="L")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--macro-every", type=int, default=d.macro_every)
    p.add_argument("--position-mode", choices=POSITION_MODES, default=d.position_mode)
    p.add_argument("--commission", type=float, default=d.commission)
    p.add_argument("--slippage-bps", type=float, default=d.slippage_bps)
    p.add_argument("--lr-macro", type=float, default=d.lr_macro)
    p.add_argument("--lr-rest", type=float, default=d.lr_rest)
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--entropy-coef", type=float, default=d.entropy_coef, help="entropy bonus (off by default)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient norm clip (0 = off)")
    p.add_argument(
        "--start-position",
        choices=START_POSITIONS,
        default=d.start_position,
        help="training episodes start flat (the card) or holding a random position (exploring starts)",
    )
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective, help="see strategies/objectives.py")
    p.add_argument("--decide-every", type=int, default=d.decide_every, help="K: decide every K candles")
    p.add_argument("--group-size", type=int, default=d.group_size, help="M rollouts per start (leave-one-out)")
    p.add_argument("--vol-window", type=int, default=d.vol_window, help="candles of the ex-ante volatility")
    p.add_argument("--vol-target", type=float, default=d.vol_target, help="vol_scaled: target volatility")
    p.add_argument("--dsr-eta", type=float, default=d.dsr_eta, help="dsr: moment adaptation rate")
    p.add_argument(
        "--cost-curriculum-updates", type=int, default=d.cost_curriculum_updates, help="ramp the commission from 0"
    )
    p.add_argument("--entropy-coef-end", type=float, default=d.entropy_coef_end, help="entropy bonus at the end")
    p.add_argument("--trade-floor", type=float, default=d.trade_floor, help="min p(change position) exploring")
    p.add_argument("--trade-floor-coef", type=float, default=d.trade_floor_coef, help="weight of the floor")
    p.add_argument("--explore-updates", type=int, default=d.explore_updates, help="length of the schedules")
    p.add_argument("--risk-aversion", type=float, default=d.risk_aversion, help="expected_pnl variance penalty")
    p.add_argument("--validate-every", type=int, default=100, help="V: updates between validation backtests")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write, e.g. checkpoints/NAME.pt")
    p.add_argument("--resume", type=Path, help="continue from this checkpoint (rhythm, optimisers, sampler)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


TRAIN_FIELDS = [f for f in TrainConfig.__dataclass_fields__]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the command line asks for (every TrainConfig field has an option of the same name)."""
    cfg = TrainConfig(**{name: getattr(args, name) for name in TRAIN_FIELDS})
    try:
        cfg.validate()
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    return cfg


def periods_from_args(args: argparse.Namespace) -> tuple[tuple[int, int], tuple[int, int]]:
    """The training and validation periods (UTC ms, end exclusive); validation must not precede training's end."""
    train_from, train_to = parse_date("--train-from", args.train_from), parse_date("--train-to", args.train_to)
    valid_from, valid_to = parse_date("--valid-from", args.valid_from), parse_date("--valid-to", args.valid_to)
    check_order(train_from, train_to, from_option="--train-from", to_option="--train-to")
    check_order(valid_from, valid_to, from_option="--valid-from", to_option="--valid-to")
    if valid_from < train_to:
        raise UsageError("the validation period must start at or after the end of the training period")
    return (train_from, train_to), (valid_from, valid_to)


def _resume_bundle(args: argparse.Namespace, cfg: TrainConfig, spec: FeatureSpec) -> ModelBundle | None:
    """The checkpoint --resume continues (it must match the features, position mode and windows), or None."""
    if not args.resume:
        return None
    return load_checkpoint(
        args.resume, expect_spec=spec, expect_mode=cfg.position_mode, expect_windows=(MACRO_WINDOW, MICRO_WINDOW)
    )


def main(args: argparse.Namespace) -> int:
    """Run `ritmo train`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    if args.validate_every < 1:
        raise TrainError("--validate-every must be >= 1")
    train_period, valid_period = periods_from_args(args)
    # Checked before hours of training: the checkpoint, NAME.best.pt and NAME.metrics.jsonl go there.
    check_output_file(args.out, "--out")
    candles = load_candle_files(args.data)
    spec = default_feature_spec()
    features = compute_features(candles, spec)
    resume_bundle = _resume_bundle(args, cfg, spec)
    try:
        summary = fit(
            cfg,
            candles,
            features,
            train_period,
            valid_period,
            out=args.out,
            validate_every=args.validate_every,
            data_label=" ".join(str(p) for p in args.data),
            resume_bundle=resume_bundle,
            progress=not args.no_progress,
        )
    except PeriodError as exc:
        raise TrainError(f"validation period: {exc}") from None
    print(json.dumps(summary, default=str))
    return 0
