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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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
    Standardizer,
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
    standardizer, obs, starts = _prepare(cfg, candles, features, train_period, resume_bundle)
    trainer = _build_trainer(cfg, candles, obs, starts, resume_bundle)
    run = _Run.begin(
        cfg,
        trainer,
        standardizer,
        out=out,
        validate_every=validate_every,
        metadata=_run_metadata(cfg, data_label, train_period, valid_period, int(starts.size)),
        resume_bundle=resume_bundle,
    )
    remaining = cfg.updates - trainer.rhythm.k
    if remaining <= 0:
        raise TrainError(f"--updates {cfg.updates}: the checkpoint has already done {trainer.rhythm.k} updates")
    _log_start(cfg, trainer.rhythm.k, int(starts.size))
    last_valid = _train(run, remaining, candles, obs, valid_period, progress=progress)
    save_checkpoint(out, run.bundle(last_valid))
    return run.summary(last_valid)


# --- prepare --------------------------------------------------------------------------------------


def _prepare(
    cfg: TrainConfig,
    candles: pd.DataFrame,
    features: np.ndarray,
    train_period: tuple[int, int],
    resume_bundle: ModelBundle | None,
) -> tuple[Standardizer, Observations, np.ndarray]:
    """The standardiser (fitted on the training period, or the resumed one), the observations, the episode starts."""
    ts = candles["ts_ms"].to_numpy()
    t0, t1 = period_rows(ts, *train_period)
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
    return standardizer, obs, starts


# --- the trainer ----------------------------------------------------------------------------------


def _build_trainer(
    cfg: TrainConfig,
    candles: pd.DataFrame,
    obs: Observations,
    starts: np.ndarray,
    resume_bundle: ModelBundle | None,
) -> Trainer:
    """A seeded policy (or the resumed one, its rhythm and optimisers) and its trainer over the episode starts."""
    torch.manual_seed(cfg.seed)  # before the policy is built: it draws its initial weights
    model = PolicyNet(len(default_feature_spec().names))
    generator = torch.Generator().manual_seed(cfg.seed)
    rhythm = RhythmState()
    if resume_bundle is not None:
        model.load_state_dict(resume_bundle.model.state_dict())
        rhythm = _resumed_rhythm(cfg, resume_bundle)
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
    return trainer


def _resumed_rhythm(cfg: TrainConfig, resume_bundle: ModelBundle) -> RhythmState:
    """The rhythm a resumed run continues from; TrainError if the checkpoint was trained another way."""
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
    return RhythmState(int(r["k"]), int(r.get("macro_updates", 0)), int(r.get("rest_updates", 0)))


# --- the run's checkpoints ------------------------------------------------------------------------


def _run_metadata(
    cfg: TrainConfig, data_label: str, train_period: tuple[int, int], valid_period: tuple[int, int], n_starts: int
) -> dict[str, Any]:
    """What every checkpoint of the run records about its data, periods, code and machine."""
    return {
        "data": data_label,
        "train_period": [_iso(train_period[0]), _iso(train_period[1])],
        "valid_period": [_iso(valid_period[0]), _iso(valid_period[1])],
        "seed": cfg.seed,
        "code_version": _code_version(),
        "torch": str(torch.__version__),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "validation_score": VALIDATION_SCORE,
        "episode_starts": n_starts,
    }


@dataclass
class _Run:
    """One training run: its trainer, its files and the figures that grow as it trains (time, best score)."""

    cfg: TrainConfig
    trainer: Trainer
    standardizer: Standardizer
    out: Path
    validate_every: int
    metadata: dict[str, Any]
    train_seconds: float
    best_score: float

    @classmethod
    def begin(
        cls,
        cfg: TrainConfig,
        trainer: Trainer,
        standardizer: Standardizer,
        *,
        out: Path,
        validate_every: int,
        metadata: dict[str, Any],
        resume_bundle: ModelBundle | None,
    ) -> _Run:
        """A new run, or the continuation of the resumed checkpoint's (its time and best score carry on)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        best_score = -math.inf
        train_seconds = 0.0
        if resume_bundle is not None:
            best_score = float(resume_bundle.metadata.get("best_valid_score", -math.inf))
            train_seconds = float(resume_bundle.metadata.get("train_seconds", 0.0))
        return cls(cfg, trainer, standardizer, out, validate_every, metadata, train_seconds, best_score)

    @property
    def metrics_path(self) -> Path:
        """NAME.metrics.jsonl."""
        return self.out.with_suffix(".metrics.jsonl")

    @property
    def best_path(self) -> Path:
        """NAME.best.pt."""
        return self.out.with_suffix(".best.pt")

    def bundle(self, valid: dict[str, Any] | None) -> ModelBundle:
        """The run's state as a checkpoint (with the latest validation, if any)."""
        cfg, trainer = self.cfg, self.trainer
        meta = dict(self.metadata, train_seconds=round(self.train_seconds, 2), best_valid_score=self.best_score)
        if valid is not None:
            meta["validation"] = valid
        return ModelBundle(
            model=trainer.model,
            spec=default_feature_spec(),
            standardizer=self.standardizer,
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
            train_config=cfg.to_dict() | {"validate_every": self.validate_every},
            metadata=meta,
        )

    def summary(self, last_valid: dict[str, Any] | None) -> dict[str, Any]:
        """The run's summary (what `ritmo train` prints)."""
        return {
            "out": str(self.out),
            "best": str(self.best_path),
            "metrics": str(self.metrics_path),
            "updates": self.trainer.rhythm.k,
            "macro_updates": self.trainer.rhythm.macro_updates,
            "train_seconds": round(self.train_seconds, 2),
            "best_valid_score": self.best_score,
            "validation": last_valid,
        }


# --- the update loop ------------------------------------------------------------------------------


def _log_start(cfg: TrainConfig, start_k: int, n_starts: int) -> None:
    """The `train_start` line: what the run will do."""
    log.info(
        "train_start",
        updates=cfg.updates,
        start_k=start_k,
        schedule=cfg.schedule,
        objective=cfg.objective,
        decide_every=cfg.decide_every,
        batch=cfg.episodes_per_update,
        group_size=cfg.group_size,
        steps=cfg.episode_steps,
        episode_starts=n_starts,
    )


def _train(
    run: _Run,
    remaining: int,
    candles: pd.DataFrame,
    obs: Observations,
    valid_period: tuple[int, int],
    *,
    progress: bool,
) -> dict[str, Any] | None:
    """Run the remaining updates, one metrics line each, validating every V; the last validation (or None)."""
    cfg, trainer = run.cfg, run.trainer
    bar = _progress_bar(cfg.updates, trainer.rhythm.k) if progress else None
    last_valid: dict[str, Any] | None = None
    running_reward = None
    with run.metrics_path.open("a") as metrics_file:
        for _ in range(remaining):
            line = trainer.update()
            run.train_seconds += line["wall_s"]
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
            if k_done % run.validate_every == 0 or k_done == cfg.updates:
                last_valid = _validate_and_save(run, candles, obs, valid_period, metrics_file)
    if bar is not None:
        bar.close()
    return last_valid


def _progress_bar(total: int, initial: int) -> Any:
    """A tqdm bar on stderr (disabled when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="upd", file=sys.stderr, disable=not sys.stderr.isatty())


def _validate_and_save(
    run: _Run, candles: pd.DataFrame, obs: Observations, valid_period: tuple[int, int], metrics_file: IO[str]
) -> dict[str, Any]:
    """Validate the current policy, write its metrics line, save NAME.best.pt if it is the best so far and NAME.pt."""
    k_done = run.trainer.rhythm.k
    valid = validate(run.bundle(None), candles, obs, *valid_period)
    metrics_file.write(json.dumps({"type": "validation", "k": k_done, **valid}) + "\n")
    metrics_file.flush()
    if valid["score"] > run.best_score:
        run.best_score = valid["score"]
        save_checkpoint(run.best_path, run.bundle(valid))
    save_checkpoint(run.out, run.bundle(valid))
    log.info(
        "validation",
        k=k_done,
        score=round(valid["score"], 5),
        greedy_return=valid["greedy"]["total_return"],
        sampled_return=valid["sampled"]["total_return_mean"],
        sampled_trades=valid["sampled"]["n_trades_mean"],
        hold_return=valid["buy_and_hold"]["total_return"],
    )
    return valid


def _iso(ts_ms: int) -> str:
    return pd.Timestamp(ts_ms, unit="ms", tz="UTC").isoformat()
