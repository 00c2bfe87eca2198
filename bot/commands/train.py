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

from bot.errors import RitmoError
from bot.files.candles import load_candle_files
from bot.files.checkpoints import load_checkpoint, save_checkpoint
from strategies.actions import POSITION_MODES
from strategies.backtest import period_rows
from strategies.bundle import ModelBundle, PeriodError, backtest_period
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
from strategies.objectives import OBJECTIVES
from strategies.policy import PolicyNet
from strategies.trainer import SCHEDULES, START_POSITIONS, RhythmState, TrainConfig, Trainer, episode_start_rows

log = structlog.get_logger("ritmo.train")

VALIDATION_SEEDS = (0, 1, 2)
VALIDATION_SCORE = "mean over sampling seeds 0, 1, 2 of the validation log return ln(E_end/E_start), net of fees"


class TrainError(RitmoError):
    """Training cannot run as asked."""


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


def _date(label: str, value: str) -> int:
    try:
        return parse_utc_date_ms(value)
    except ValueError as exc:
        raise TrainError(f"{label}: {exc}") from None


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


TRAIN_FIELDS = [f for f in TrainConfig.__dataclass_fields__]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the command line asks for (every TrainConfig field has an option of the same name)."""
    cfg = TrainConfig(**{name: getattr(args, name) for name in TRAIN_FIELDS})
    try:
        cfg.validate()
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    return cfg


def main(args: argparse.Namespace) -> int:
    """Run `ritmo train`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    if args.validate_every < 1:
        raise TrainError("--validate-every must be >= 1")
    train_from, train_to = _date("--train-from", args.train_from), _date("--train-to", args.train_to)
    valid_from, valid_to = _date("--valid-from", args.valid_from), _date("--valid-to", args.valid_to)
    if train_to <= train_from or valid_to <= valid_from:
        raise TrainError("each period must end after it starts")
    if valid_from < train_to:
        raise TrainError("the validation period must start at or after the end of the training period")
    candles = load_candle_files(args.data)
    spec = default_feature_spec()
    features = compute_features(candles, spec)
    resume_bundle = None
    if args.resume:
        resume_bundle = load_checkpoint(
            args.resume, expect_spec=spec, expect_mode=cfg.position_mode, expect_windows=(MACRO_WINDOW, MICRO_WINDOW)
        )
    try:
        summary = fit(
            cfg,
            candles,
            features,
            (train_from, train_to),
            (valid_from, valid_to),
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


def fit(
    cfg: TrainConfig,
    candles: pd.DataFrame,
    features: np.ndarray,
    train_period: tuple[int, int],
    valid_period: tuple[int, int],
    *,
    out: Path,
    validate_every: int,
    data_label: str,
    resume_bundle: ModelBundle | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train on candles in train_period, validate every `validate_every` updates; write NAME.pt, NAME.best.pt and
    NAME.metrics.jsonl beside `out`; return the run's summary. features (n, N) are compute_features(candles)."""
    train_from, train_to = train_period
    valid_from, valid_to = valid_period
    ts = candles["ts_ms"].to_numpy()
    spec = default_feature_spec()
    t0, t1 = period_rows(ts, train_from, train_to)
    if t1 - t0 < 2:
        raise TrainError("the training period holds no candles of the data file")
    if resume_bundle is not None:
        standardizer = resume_bundle.standardizer
    else:
        standardizer = fit_standardizer(features, slice(t0, t1))
    obs = build_observations(features, standardizer, MACRO_WINDOW, MICRO_WINDOW)
    starts = episode_start_rows(ts, obs.valid, t0, t1, cfg.episode_steps, cfg.decide_every)
    if starts.size == 0:
        raise TrainError(
            "no episode fits in the training period after the feature warm-up "
            f"({cfg.episode_steps} decisions x {cfg.decide_every} candles, without crossing a gap)"
        )

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
        if resume_bundle.objective != cfg.objective or resume_bundle.decide_every != cfg.decide_every:
            raise TrainError(
                f"--resume: checkpoint objective {resume_bundle.objective} (decide every "
                f"{resume_bundle.decide_every}), asked for {cfg.objective} (decide every {cfg.decide_every})"
            )
        rhythm = RhythmState(int(r["k"]), int(r.get("macro_updates", 0)), int(r.get("rest_updates", 0)))
    try:
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
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    if resume_bundle is not None and resume_bundle.optimizers:
        trainer.load_optimizer_state(resume_bundle.optimizers)

    out.parent.mkdir(parents=True, exist_ok=True)
    metrics_path = out.with_suffix(".metrics.jsonl")
    best_path = out.with_suffix(".best.pt")
    best_score = -math.inf
    if resume_bundle is not None:
        best_score = float(resume_bundle.metadata.get("best_valid_score", -math.inf))
    metadata_base = {
        "data": data_label,
        "train_period": [_iso(train_from), _iso(train_to)],
        "valid_period": [_iso(valid_from), _iso(valid_to)],
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
            decide_every=cfg.decide_every,
            rhythm={
                "schedule": cfg.schedule,
                "macro_every": cfg.macro_every,
                "k": trainer.rhythm.k,
                "macro_updates": trainer.rhythm.macro_updates,
                "rest_updates": trainer.rhythm.rest_updates,
            },
            optimizers=trainer.optimizer_state(),
            train_config=cfg.to_dict() | {"validate_every": validate_every},
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
        objective=cfg.objective,
        decide_every=cfg.decide_every,
        batch=cfg.episodes_per_update,
        group_size=cfg.group_size,
        steps=cfg.episode_steps,
        episode_starts=int(starts.size),
    )
    bar = None
    if progress:
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
            if k_done % validate_every == 0 or k_done == cfg.updates:
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
                    sampled_trades=last_valid["sampled"]["n_trades_mean"],
                    hold_return=last_valid["buy_and_hold"]["total_return"],
                )
    if bar is not None:
        bar.close()
    save_checkpoint(out, make_bundle(last_valid))
    return {
        "out": str(out),
        "best": str(best_path),
        "metrics": str(metrics_path),
        "updates": trainer.rhythm.k,
        "macro_updates": trainer.rhythm.macro_updates,
        "train_seconds": round(train_seconds, 2),
        "best_valid_score": best_score,
        "validation": last_valid,
    }


def _iso(ts_ms: int) -> str:
    return pd.Timestamp(ts_ms, unit="ms", tz="UTC").isoformat()
