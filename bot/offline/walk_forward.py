"""Walk-forward evaluation of one training configuration, judged against baselines net of fees.

For each fold (train / validate / test months, stepped forward in time) and each seed, the configuration is
trained on the fold's training months only (the standardiser is fitted there too), its best-on-validation
checkpoint is kept, and the policy (sampled with the seed, as the daemon acts) is backtested on the
fold's validation months and, with `--split test`, on its test months. Beside it, at the same costs: flat,
buy-and-hold, SMA trend rules (1d/5d and 2d/8d, long_only and long_short) and a random policy trading as
often as the policy did. Every figure is computed at each commission of the cost sweep.

Selection discipline (docs/evaluation.md): configurations are compared with `--split valid`; the test months
of a configuration are read once (`--split test`), and the trials registry (`--trials`) counts every
configuration x seed ever evaluated, which is the N of the deflated Sharpe ratio.

Work is resumable: each (fold, seed) writes its result JSON under `--out`, and a finished one is not
recomputed. Independent units run in `--workers` processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import structlog

from bot.errors import EXIT_USAGE, RitmoError
from strategies.candles import CANDLE_MS

log = structlog.get_logger("ritmo.evaluate")


DEFAULT_COSTS = (0.0, 0.0004, 0.001, 0.002)


SMA_RULES = (("sma_1d_5d", 288, 1440), ("sma_2d_8d", 576, 2304))


DAY_MS = 86_400_000


class EvaluateError(RitmoError):
    """The evaluation cannot run as asked: bad fold spec, too little data, bad configuration."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class FoldSpec:
    """Lengths in calendar months: train, validate, test, and the step between two folds."""

    train_months: int
    valid_months: int
    test_months: int
    step_months: int


@dataclass(frozen=True)
class Fold:
    """One walk-forward fold; periods are [from_ms, to_ms) in UTC milliseconds."""

    index: int
    train: tuple[int, int]
    valid: tuple[int, int]
    test: tuple[int, int]

    def period(self, split: str) -> tuple[int, int]:
        """The valid or test period."""
        return self.valid if split == "valid" else self.test


def parse_fold_spec(text: str) -> FoldSpec:
    """'24/3/3/3' -> FoldSpec(train 24, valid 3, test 3, step 3 months); EvaluateError on anything else."""
    parts = text.replace(",", "/").split("/")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise EvaluateError(f"--folds {text!r}: expected TRAIN/VALID/TEST/STEP in whole months >= 1, e.g. 24/3/3/3")
    return FoldSpec(*values)


def _month_start(ts_ms: int) -> pd.Timestamp:
    """The first UTC month boundary at or after ts_ms."""
    t = pd.Timestamp(ts_ms, unit="ms", tz="UTC")
    first = t.normalize().replace(day=1)
    return first if first == t else first + pd.DateOffset(months=1)


def _ms(t: pd.Timestamp) -> int:
    return int(t.value // 1_000_000)


def make_folds(first_ts_ms: int, end_ms: int, spec: FoldSpec, max_folds: int | None = None) -> list[Fold]:
    """Folds whose training starts at the first month boundary of the data and whose test ends by end_ms,
    stepped by spec.step_months; EvaluateError when not even one fits."""
    start = _month_start(first_ts_ms)
    folds: list[Fold] = []
    while max_folds is None or len(folds) < max_folds:
        s = start + pd.DateOffset(months=spec.step_months * len(folds))
        tr_end = s + pd.DateOffset(months=spec.train_months)
        va_end = tr_end + pd.DateOffset(months=spec.valid_months)
        te_end = va_end + pd.DateOffset(months=spec.test_months)
        if _ms(te_end) > end_ms:
            break
        folds.append(Fold(len(folds), (_ms(s), _ms(tr_end)), (_ms(tr_end), _ms(va_end)), (_ms(va_end), _ms(te_end))))
    if not folds:
        months = spec.train_months + spec.valid_months + spec.test_months
        raise EvaluateError(
            f"too little data for one fold: {months} months are needed from {start.date()}, "
            f"the data ends {pd.Timestamp(end_ms, unit='ms', tz='UTC').date()}"
        )
    return folds


# Fields added to TrainConfig after the first registry entries: hashed only when set, so the hashes of the
# configurations recorded before them stay what they were.
_LATER_FIELDS = {"risk_aversion": 0.0}


def config_hash(cfg: dict[str, Any]) -> str:
    """A short stable hash of a training configuration without its seed (which evaluate varies)."""
    kept = {k: v for k, v in cfg.items() if k != "seed" and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    body = json.dumps(dict(sorted(kept.items())), sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:10]


def read_trials(path: Path) -> list[dict[str, Any]]:
    """The registry's lines (one per evaluation run); [] when the file does not exist yet."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count_trials(trials: list[dict[str, Any]]) -> int:
    """Configurations x seeds tried: every seed of every distinct configuration evaluated on validation."""
    seeds: dict[str, set[int]] = {}
    for t in trials:
        seeds.setdefault(t["config_hash"], set()).update(int(s) for s in t["seeds"])
    return sum(len(s) for s in seeds.values())


_DATA_CACHE: dict[str, Any] = {}


def load_data(data_paths: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Candles and features of the data files, cached per process (each worker loads them once)."""
    key = "|".join(data_paths)
    if key not in _DATA_CACHE:
        from bot.files.candles import load_candle_files
        from strategies.features import compute_features

        candles = load_candle_files(data_paths)
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = (candles, compute_features(candles))
    return _DATA_CACHE[key]


def policy_figures(result: Any, commission: float) -> dict[str, Any]:
    """The figures kept of one backtest: metrics, trade statistics and the daily log returns."""
    from strategies.evaluation import daily_log_returns, trade_stats

    days, daily = daily_log_returns(result.equity_ts_ms, result.policy_equity)
    out = result.policy.to_dict()
    out.update(
        trade_stats(
            result.equity_ts_ms,
            result.policy_equity,
            result.positions,
            result.policy.fees_quote,
            result.policy.n_trades,
            commission,
        )
    )
    out["daily"] = {"day_ms": days.tolist(), "log_return": daily.tolist()}
    return out


def unit_name(chash: str, fold: Fold, seed: int) -> str:
    """The cache folder of one (configuration, fold, seed): named by the fold's own dates, not its index, so a
    different fold spec never reuses a unit trained on other months."""
    bounds = (fold.train[0], fold.valid[0], fold.test[0], fold.test[1])  # train | valid | test | end
    days = "-".join(pd.Timestamp(ms, unit="ms", tz="UTC").strftime("%Y%m%d") for ms in bounds)
    return f"{chash}-{days}-seed{seed}"


def _periods(task: dict[str, Any]) -> list[list[int]]:
    return [list(task["train"]), list(task["valid"]), list(task["test"])]


def run_unit(task: dict[str, Any]) -> dict[str, Any]:
    """Train one seed on one fold, then backtest its best-on-validation policy at every cost; cached as JSON."""
    out_dir = Path(task["dir"])
    done = out_dir / "result.json"
    previous = json.loads(done.read_text()) if done.exists() else None
    if previous is not None and previous.get("periods") != _periods(task):
        raise EvaluateError(f"{out_dir}: cached for other periods than fold {task['fold']}; remove it to recompute")
    if previous is not None and set(task["splits"]) <= set(previous["splits"]):
        return previous
    import torch

    from bot.files.checkpoints import load_checkpoint
    from bot.offline.fit import fit
    from strategies.backtest import period_rows, run_actions
    from strategies.bundle import backtest_period
    from strategies.evaluation import random_turnover_actions, switch_prob_for_trades
    from strategies.features import build_observations
    from strategies.objectives import is_decision_candle
    from strategies.trainer import TrainConfig

    torch.set_num_threads(int(task["threads"]))
    candles, features = load_data(task["data"])
    cfg = TrainConfig.from_dict({**task["config"], "seed": int(task["seed"])})
    fold = Fold(task["fold"], tuple(task["train"]), tuple(task["valid"]), tuple(task["test"]))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "model.pt"
    if previous is not None and ckpt.with_suffix(".best.pt").exists():
        # trained already (an earlier run read fewer splits): only the missing splits are backtested
        summary = {k: previous[k] for k in ("train_seconds", "best_valid_score")}
        summary["best"] = str(ckpt.with_suffix(".best.pt"))
    else:
        for stale in (ckpt, ckpt.with_suffix(".best.pt"), ckpt.with_suffix(".metrics.jsonl")):
            stale.unlink(missing_ok=True)  # an interrupted unit restarts from scratch: its seed fixes everything
        summary = fit(
            cfg,
            candles,
            features,
            fold.train,
            fold.valid,
            out=ckpt,
            validate_every=task["validate_every"],
            data_label=" ".join(task["data"]),
        )
    bundle = load_checkpoint(summary["best"])
    obs = build_observations(features, bundle.standardizer, bundle.macro_window, bundle.micro_window)
    ts = candles["ts_ms"].to_numpy()
    result: dict[str, Any] = {
        "periods": _periods(task),
        "fold": fold.index,
        "seed": int(task["seed"]),
        "train_seconds": summary["train_seconds"],
        "best_valid_score": summary["best_valid_score"],
        "best_k": bundle.rhythm.get("k"),
        "splits": {},
    }
    for split in task["splits"]:
        lo, hi = fold.period(split)
        i0, i1 = period_rows(ts, lo, hi)
        grid = np.asarray(is_decision_candle(ts[i0:i1] - CANDLE_MS, bundle.decide_every))
        decisions = int(np.count_nonzero(grid))
        per_cost = {}
        for cost in task["costs"]:
            res = backtest_period(bundle, candles, obs, lo, hi, greedy=False, seed=int(task["seed"]), commission=cost)
            pol = policy_figures(res, cost)
            # A random policy trading as often as this one did, on the same decision grid and at the same cost.
            p_switch = switch_prob_for_trades(res.policy.n_trades, max(decisions, 1))
            rnd_actions = random_turnover_actions(i1 - i0, p_switch, bundle.position_mode, int(task["seed"]))
            rnd_actions = np.where(grid, rnd_actions, 0)
            rnd = run_actions(
                rnd_actions,
                ts[i0:i1],
                candles["open"].to_numpy()[i0:i1],
                candles["close"].to_numpy()[i0:i1],
                mode=bundle.position_mode,
                commission=cost,
            )
            per_cost[str(cost)] = {"policy": pol, "random": policy_figures(rnd, cost)}
        result["splits"][split] = per_cost
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, done)
    return result


def baseline_figures(
    candles: pd.DataFrame, period: tuple[int, int], mode: str, costs: list[float]
) -> dict[str, dict[str, Any]]:
    """Flat, buy-and-hold and the SMA rules over one period at each cost: {cost: {name: figures}}."""
    from strategies.backtest import period_rows, run_actions
    from strategies.evaluation import sma_rule_actions

    ts = candles["ts_ms"].to_numpy()
    i0, i1 = period_rows(ts, *period)
    opens, closes = candles["open"].to_numpy(), candles["close"].to_numpy()
    out: dict[str, dict[str, Any]] = {}
    for cost in costs:
        row: dict[str, Any] = {}
        for name, fast, slow in SMA_RULES:
            for rule_mode in ("long_only", "long_short"):
                # the rule sees all history before the period (closes <= each decision candle only)
                actions = sma_rule_actions(closes[: i1 - 1], fast, slow, rule_mode)[i0 - 1 : i1 - 1]
                res = run_actions(actions, ts[i0:i1], opens[i0:i1], closes[i0:i1], mode=rule_mode, commission=cost)
                row[f"{name}_{rule_mode}"] = policy_figures(res, cost)
        hold = run_actions(np.full(i1 - i0, 1), ts[i0:i1], opens[i0:i1], closes[i0:i1], mode=mode, commission=cost)
        row["buy_and_hold"] = policy_figures(hold, cost)
        flat = run_actions(np.zeros(i1 - i0), ts[i0:i1], opens[i0:i1], closes[i0:i1], mode=mode, commission=cost)
        row["flat"] = policy_figures(flat, cost)
        out[str(cost)] = row
    return out
