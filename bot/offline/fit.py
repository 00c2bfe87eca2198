"""One offline training run: REINFORCE on candles, with validation backtests, metrics and checkpoints.

Files written beside `--out NAME.pt`:
  NAME.pt              the last state (also saved at every validation, so a crash loses little)
  NAME.best.pt         the state with the best validation score so far (see VALIDATION_SCORE)
  NAME.metrics.jsonl   one JSON line per update ("type": "update") and per validation ("type": "validation")
"""

from __future__ import annotations

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
from bot.files.checkpoints import save_checkpoint
from strategies.backtest import period_rows
from strategies.bundle import ModelBundle, backtest_period
from strategies.features import (
    MACRO_WINDOW,
    MICRO_WINDOW,
    Observations,
    build_observations,
    default_feature_spec,
    fit_standardizer,
)
from strategies.policy import PolicyNet
from strategies.trainer import RhythmState, TrainConfig, Trainer, episode_start_rows

log = structlog.get_logger("ritmo.train")



VALIDATION_SEEDS = (0, 1, 2)


VALIDATION_SCORE = "mean over sampling seeds 0, 1, 2 of the validation log return ln(E_end/E_start), net of fees"


class TrainError(RitmoError):
    """Training cannot run as asked."""


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
