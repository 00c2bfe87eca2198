"""`ritmo evaluate`: the command line of the walk-forward evaluation (bot/offline/walk_forward.py): reads the
configuration, runs the (fold, seed) units in worker processes, writes the report (bot/offline/report.py)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd
import structlog

from bot.offline import walk_forward
from strategies.candles import CANDLE_MS

log = structlog.get_logger("ritmo.evaluate")


# --- the command -----------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo evaluate`."""
    p.add_argument("--data", type=Path, nargs="+", required=True, help="candle file(s) of one market, in any order")
    p.add_argument("--config", type=Path, help="JSON of TrainConfig fields (the rest take their defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one TrainConfig field")
    p.add_argument("--name", help="a name for the configuration in the report and the registry")
    p.add_argument("--note", default="", help="why this configuration is tried (kept in the registry)")
    p.add_argument("--folds", default="24/3/3/3", help="TRAIN/VALID/TEST/STEP months (default 24/3/3/3)")
    p.add_argument("--max-folds", type=int, help="evaluate only the first N folds")
    p.add_argument("--last-folds", type=int, help="evaluate only the last N folds")
    p.add_argument("--until", help="the data used ends here, exclusive (UTC date); default: the end of the data")
    p.add_argument("--seeds", type=int, default=5, help="seeds per fold (>= 1; the issue asks for at least 5)")
    p.add_argument(
        "--costs",
        default=",".join(str(c) for c in walk_forward.DEFAULT_COSTS),
        help="commissions per side for the cost sweep",
    )
    p.add_argument("--split", choices=("valid", "test"), default="valid", help="valid: selection; test: read once")
    p.add_argument("--reread-test", action="store_true", help="allow reading a configuration's test folds again")
    p.add_argument("--validate-every", type=int, default=50, help="updates between validations inside training")
    p.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 4)), help="parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--trials", type=Path, default=Path("docs/evaluation-trials.jsonl"), help="the trials registry")
    p.add_argument("--no-record", action="store_true", help="do not append this run to the trials registry")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, results.json, PNGs, unit caches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig dict: --config file, then --set overrides; validated, EvaluateError on a bad one."""
    from strategies.trainer import TrainConfig

    cfg: dict[str, Any] = {}
    if args.config:
        try:
            cfg = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise walk_forward.EvaluateError(f"--config {args.config}: {exc}") from None
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise walk_forward.EvaluateError(f"--set {item!r}: expected KEY=VALUE")
        cfg[key.strip()] = _parse_value(value.strip())
    unknown = sorted(set(cfg) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise walk_forward.EvaluateError(f"unknown configuration field(s): {', '.join(unknown)}")
    try:
        full = TrainConfig.from_dict(cfg)
        full.validate()
    except (TypeError, ValueError) as exc:
        raise walk_forward.EvaluateError(f"configuration: {exc}") from None
    return full.to_dict()


def _costs(text: str) -> list[float]:
    try:
        costs = [float(c) for c in text.split(",") if c.strip()]
    except ValueError:
        costs = []
    if not costs or any(not 0 <= c < 0.05 for c in costs):
        raise walk_forward.EvaluateError(
            f"--costs {text!r}: expected commas between fractions in [0, 0.05), e.g. 0,0.001"
        )
    return costs


def main(args: argparse.Namespace) -> int:
    """Run `ritmo evaluate`."""
    from bot.files.paths import check_output_dir
    from bot.offline.periods import parse_date

    spec = walk_forward.parse_fold_spec(args.folds)
    until_ms = parse_date("--until", args.until) if args.until else None
    costs = _costs(args.costs)
    if args.seeds < 1 or args.workers < 1 or args.threads < 1 or args.validate_every < 1:
        raise walk_forward.EvaluateError("--seeds, --workers, --threads and --validate-every must be >= 1")
    cfg = load_config(args)
    chash = walk_forward.config_hash(cfg)
    name = args.name or f"{cfg['objective']}-{cfg['position_mode']}-k{cfg['decide_every']}-{chash}"
    trials = walk_forward.read_trials(args.trials)
    if (
        args.split == "test"
        and not args.reread_test
        and any(t["config_hash"] == chash and t["split"] == "test" for t in trials)
    ):
        raise walk_forward.EvaluateError(
            f"the test folds of configuration {chash} ({name}) were read already ({args.trials}); "
            "test folds are read once (--reread-test overrides, and is recorded)"
        )
    # Before the folds are trained (hours): report, results, PNGs and unit caches go under --out.
    check_output_dir(args.out, "--out")
    data = [str(p) for p in args.data]
    candles, _ = walk_forward.load_data(data)
    end_ms = int(candles["ts_ms"].iloc[-1]) + CANDLE_MS
    if until_ms is not None:
        end_ms = min(end_ms, until_ms)
    folds = walk_forward.make_folds(int(candles["ts_ms"].iloc[0]), end_ms, spec, args.max_folds)
    if args.last_folds:
        folds = folds[-args.last_folds :]
    splits = ["valid"] if args.split == "valid" else ["valid", "test"]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tasks = [
        {
            "dir": str(out / "units" / walk_forward.unit_name(chash, f, s)),
            "data": data,
            "config": cfg,
            "seed": s,
            "fold": f.index,
            "train": list(f.train),
            "valid": list(f.valid),
            "test": list(f.test),
            "splits": splits,
            "costs": costs,
            "validate_every": args.validate_every,
            "threads": args.threads,
        }
        for f in folds
        for s in range(args.seeds)
    ]
    log.info("evaluate_start", name=name, config_hash=chash, folds=len(folds), seeds=args.seeds, split=args.split)
    results = _run_all(tasks, args.workers, progress=not args.no_progress)
    baselines = {
        split: {
            f.index: walk_forward.baseline_figures(candles, f.period(split), cfg["position_mode"], costs) for f in folds
        }
        for split in splits
    }
    record = {
        "time_utc": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "name": name,
        "config_hash": chash,
        "config": cfg,
        "split": args.split,
        "folds": args.folds,
        "fold_indices": [f.index for f in folds],
        "seeds": list(range(args.seeds)),
        "note": args.note,
        "out": str(out),
    }
    from bot.offline.report import build_report

    report = build_report(
        name=name,
        config=cfg,
        folds=folds,
        splits=splits,
        costs=costs,
        results=results,
        baselines=baselines,
        n_trials=walk_forward.count_trials([*trials, {"config_hash": chash, "seeds": list(range(args.seeds))}]),
        trial_srs=[sr for t in trials for sr in t.get("valid_daily_sr", [])],
        out=out,
    )
    record["valid_daily_sr"] = report["pooled"]["valid"][str(cfg["commission"])]["policy"]["daily_sr_per_seed"]
    record["summary"] = report["headline"]
    if not args.no_record:
        args.trials.parent.mkdir(parents=True, exist_ok=True)
        with args.trials.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
    print(json.dumps({"out": str(out), "report": str(out / "report.md"), **report["headline"]}, default=str))
    return 0


def _run_all(tasks: list[dict[str, Any]], workers: int, progress: bool) -> list[dict[str, Any]]:
    """Run the units, in parallel processes when workers > 1, with a progress bar; results in task order."""
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="run", file=sys.stderr, disable=not (progress and sys.stderr.isatty()))
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    if workers == 1:
        for i, t in enumerate(tasks):
            results[i] = walk_forward.run_unit(t)
            bar.update(1)
    else:
        # spawn: a clean interpreter per worker (torch and forked OpenMP threads do not mix)
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            futures = {pool.submit(walk_forward.run_unit, t): i for i, t in enumerate(tasks)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)
        except BaseException:
            # Interrupted or failed: stop the workers now, or they would go on training queued units alone.
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        pool.shutdown()
    bar.close()
    return [r for r in results if r is not None]


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
