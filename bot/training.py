"""`ritmo train`: offline REINFORCE on a candle file, with validation backtests, metrics and checkpoints.

Files written beside `--out NAME.pt`:
  NAME.pt              the last state (also saved at every validation, so a crash loses little)
  NAME.best.pt         the state with the best validation score so far (see VALIDATION_SCORE)
  NAME.metrics.jsonl   one JSON line per update ("type": "update") and per validation ("type": "validation")
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import structlog
import torch

from bot.backtesting import backtest_period
from bot.candle_files import load_candles
from bot.checkpoints import ModelBundle, load_checkpoint, save_checkpoint
from bot.errors import RitmoError
from strategies.accounting import POSITION_MODES
from strategies.backtest import period_rows
from strategies.candles import parse_utc_date_ms
from strategies.features import (
    MACRO_WINDOW,
    MICRO_WINDOW,
    Observations,
    build_observations,
    compute_features,
    default_feature_spec,
    fit_standardizer,
)
from strategies.policy import PolicyNet
from strategies.trainer import SCHEDULES, START_POSITIONS, RhythmState, TrainConfig, Trainer

log = structlog.get_logger("ritmo.train")

VALIDATION_SEEDS = (0, 1, 2)
VALIDATION_SCORE = "mean over sampling seeds 0, 1, 2 of the validation log return ln(E_end/E_start), net of fees"


class TrainError(RitmoError):
    """Training cannot run as asked."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo train`."""
    d = TrainConfig()
    p.add_argument("--data", type=Path, required=True, help="candle file (CSV, CSV.gz or Parquet)")
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
    p.add_argument("--validate-every", type=int, default=100, help="V: updates between validation backtests")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write, e.g. checkpoints/NAME.pt")
    p.add_argument("--resume", type=Path, help="continue from this checkpoint (rhythm, optimisers, sampler)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _date(label: str, value: str) -> int:
    try:
        return parse_utc_date_ms(value)
    except ValueError as exc:
        raise TrainError(f"{label}: {exc}") from None


def episode_start_rows(obs: Observations, ts_ms: np.ndarray, from_ms: int, to_ms: int, steps: int) -> np.ndarray:
    """Decision rows s where an episode of `steps` decisions fits: fills and marks at rows s+1 .. s+steps inside
    [from, to), and valid observations at rows s .. s+steps-1."""
    i0, i1 = period_rows(ts_ms, from_ms, to_ms)
    lo, hi = max(i0 - 1, 0), i1 - 1 - steps  # s+1 >= i0 and s+steps <= i1-1
    if hi < lo:
        return np.empty(0, dtype=np.int64)
    valid = obs.valid.astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(valid)])
    starts = np.arange(lo, hi + 1)
    all_valid = (csum[starts + steps] - csum[starts]) == steps
    return starts[all_valid]


def _finite_mean(values: list[float]) -> float | None:
    """Mean of the finite values, or None (JSON null) when there are none (e.g. Sharpe of a flat policy)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def validate(bundle: ModelBundle, candles: pd.DataFrame, obs: Observations, from_ms: int, to_ms: int) -> dict[str, Any]:
    """Greedy and sampled validation backtests; `score` is VALIDATION_SCORE."""
    out: dict[str, Any] = {}
    greedy = backtest_period(bundle, candles, obs, from_ms, to_ms, greedy=True, seed=0)
    assert greedy.policy and greedy.buy_and_hold
    out["greedy"] = greedy.policy.to_dict()
    sampled = []
    for seed in VALIDATION_SEEDS:
        res = backtest_period(bundle, candles, obs, from_ms, to_ms, greedy=False, seed=seed)
        assert res.policy
        sampled.append(res.policy)
    out["sampled"] = {
        "seeds": list(VALIDATION_SEEDS),
        "total_return_mean": float(np.mean([m.total_return for m in sampled])),
        "sharpe_mean": _finite_mean([m.sharpe for m in sampled]),
        "n_trades_mean": float(np.mean([m.n_trades for m in sampled])),
        "max_drawdown_mean": float(np.mean([m.max_drawdown for m in sampled])),
    }
    out["buy_and_hold"] = greedy.buy_and_hold.to_dict()
    out["score"] = float(np.mean([math.log1p(m.total_return) for m in sampled]))
    return out


def _code_version() -> str:
    import subprocess

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return rev or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(args: argparse.Namespace) -> int:
    """Run `ritmo train`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        updates=args.updates,
        episodes_per_update=args.episodes_per_update,
        episode_steps=args.episode_steps,
        schedule=args.schedule,
        macro_every=args.macro_every,
        lr_macro=args.lr_macro,
        lr_rest=args.lr_rest,
        gamma=args.gamma,
        entropy_coef=args.entropy_coef,
        grad_clip=args.grad_clip,
        position_mode=args.position_mode,
        commission=args.commission,
        slippage_bps=args.slippage_bps,
        seed=args.seed,
        start_position=args.start_position,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    if args.validate_every < 1:
        raise TrainError("--validate-every must be >= 1")
    train_from, train_to = _date("--train-from", args.train_from), _date("--train-to", args.train_to)
    valid_from, valid_to = _date("--valid-from", args.valid_from), _date("--valid-to", args.valid_to)
    if train_to <= train_from or valid_to <= valid_from:
        raise TrainError("each period must end after it starts")
    if valid_from < train_to:
        raise TrainError("the validation period must start at or after the end of the training period")

    candles = load_candles(args.data)
    ts = candles["ts_ms"].to_numpy()
    spec = default_feature_spec()
    features = compute_features(candles, spec)
    t0, t1 = period_rows(ts, train_from, train_to)
    if t1 - t0 < 2:
        raise TrainError("the training period holds no candles of the data file")

    resume_bundle = None
    if args.resume:
        resume_bundle = load_checkpoint(
            args.resume, expect_spec=spec, expect_mode=cfg.position_mode, expect_windows=(MACRO_WINDOW, MICRO_WINDOW)
        )
        standardizer = resume_bundle.standardizer
    else:
        standardizer = fit_standardizer(features, slice(t0, t1))
    obs = build_observations(features, standardizer, MACRO_WINDOW, MICRO_WINDOW)
    starts = episode_start_rows(obs, ts, train_from, train_to, cfg.episode_steps)
    if starts.size == 0:
        raise TrainError("no episode fits in the training period after the feature warm-up")

    torch.manual_seed(cfg.seed)
    model = PolicyNet(len(spec.names))
    generator = torch.Generator().manual_seed(cfg.seed)
    rhythm = RhythmState()
    if resume_bundle is not None:
        model.load_state_dict(resume_bundle.model.state_dict())
        r = resume_bundle.rhythm
        if r.get("schedule") != cfg.schedule or int(r.get("macro_every", 0)) != cfg.macro_every:
            raise TrainError(
                f"--resume: checkpoint rhythm is {r.get('schedule')}/{r.get('macro_every')}, "
                f"asked for {cfg.schedule}/{cfg.macro_every}"
            )
        rhythm = RhythmState(int(r["k"]), int(r.get("macro_updates", 0)), int(r.get("rest_updates", 0)))
    trainer = Trainer(
        model=model,
        cfg=cfg,
        macro_x=torch.from_numpy(obs.macro),
        micro_x=torch.from_numpy(obs.micro),
        open_prices=torch.from_numpy(candles["open"].to_numpy(np.float64)),
        close_prices=torch.from_numpy(candles["close"].to_numpy(np.float64)),
        start_rows=torch.from_numpy(starts),
        rhythm=rhythm,
        generator=generator,
    )
    if resume_bundle is not None and resume_bundle.optimizers:
        trainer.load_optimizer_state(resume_bundle.optimizers)

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics_path = out.with_suffix(".metrics.jsonl")
    best_path = out.with_suffix(".best.pt")
    best_score = -math.inf
    if resume_bundle is not None:
        best_score = float(resume_bundle.metadata.get("best_valid_score", -math.inf))
    metadata_base = {
        "data": str(args.data),
        "train_period": [
            pd.Timestamp(train_from, unit="ms", tz="UTC").isoformat(),
            pd.Timestamp(train_to, unit="ms", tz="UTC").isoformat(),
        ],
        "valid_period": [
            pd.Timestamp(valid_from, unit="ms", tz="UTC").isoformat(),
            pd.Timestamp(valid_to, unit="ms", tz="UTC").isoformat(),
        ],
        "seed": cfg.seed,
        "code_version": _code_version(),
        "torch": str(torch.__version__),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "validation_score": VALIDATION_SCORE,
        "episode_starts": int(starts.size),
    }
    train_seconds = float(resume_bundle.metadata.get("train_seconds", 0.0)) if resume_bundle else 0.0

    def make_bundle(valid: dict[str, Any] | None) -> ModelBundle:
        meta = dict(metadata_base, train_seconds=round(train_seconds, 2), best_valid_score=best_score)
        if valid is not None:
            meta["validation"] = valid
        return ModelBundle(
            model=model,
            spec=spec,
            standardizer=standardizer,
            position_mode=cfg.position_mode,
            commission=cfg.commission,
            rhythm={
                "schedule": cfg.schedule,
                "macro_every": cfg.macro_every,
                "k": trainer.rhythm.k,
                "macro_updates": trainer.rhythm.macro_updates,
                "rest_updates": trainer.rhythm.rest_updates,
            },
            optimizers=trainer.optimizer_state(),
            train_config=cfg.to_dict() | {"validate_every": args.validate_every},
            metadata=meta,
        )

    remaining = cfg.updates - trainer.rhythm.k
    if remaining <= 0:
        raise TrainError(f"--updates {cfg.updates}: the checkpoint has already done {trainer.rhythm.k} updates")
    log.info(
        "train_start",
        updates=cfg.updates,
        start_k=trainer.rhythm.k,
        schedule=cfg.schedule,
        batch=cfg.episodes_per_update,
        steps=cfg.episode_steps,
        episode_starts=int(starts.size),
    )
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.updates, initial=trainer.rhythm.k, unit="upd", file=sys.stderr, disable=not sys.stderr.isatty()
        )
    last_valid: dict[str, Any] | None = None
    running_reward = None
    with metrics_path.open("a") as metrics_file:
        for _ in range(remaining):
            line = trainer.update()
            train_seconds += line["wall_s"]
            line = {"type": "update", **line}
            metrics_file.write(json.dumps(line) + "\n")
            r = line["mean_episode_log_return"]
            running_reward = r if running_reward is None else 0.95 * running_reward + 0.05 * r
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    reward=f"{running_reward:+.4f}",
                    entropy=f"{line['entropy']:.3f}",
                    steps_s=f"{line['env_steps'] / max(line['wall_s'], 1e-9):,.0f}",
                )
            k_done = trainer.rhythm.k
            if k_done % args.validate_every == 0 or k_done == cfg.updates:
                last_valid = validate(make_bundle(None), candles, obs, valid_from, valid_to)
                metrics_file.write(json.dumps({"type": "validation", "k": k_done, **last_valid}) + "\n")
                metrics_file.flush()
                if last_valid["score"] > best_score:
                    best_score = last_valid["score"]
                    save_checkpoint(best_path, make_bundle(last_valid))
                save_checkpoint(out, make_bundle(last_valid))
                log.info(
                    "validation",
                    k=k_done,
                    score=round(last_valid["score"], 5),
                    greedy_return=last_valid["greedy"]["total_return"],
                    sampled_return=last_valid["sampled"]["total_return_mean"],
                    hold_return=last_valid["buy_and_hold"]["total_return"],
                )
    if bar is not None:
        bar.close()
    save_checkpoint(out, make_bundle(last_valid))
    print(
        json.dumps(
            {
                "out": str(out),
                "best": str(best_path),
                "metrics": str(metrics_path),
                "updates": trainer.rhythm.k,
                "macro_updates": trainer.rhythm.macro_updates,
                "train_seconds": round(train_seconds, 2),
                "validation": last_valid,
            },
            default=str,
        )
    )
    return 0
