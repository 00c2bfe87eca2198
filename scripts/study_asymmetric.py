"""The asymmetric-vs-symmetric study: train both schedules over several seeds, collect validation figures.

    .venv/bin/python scripts/study_asymmetric.py --updates 330 --batch 64 --seeds 1 2 3 --out-dir /tmp/study

Each run is `ritmo train` with the same settings but the schedule and the seed; the figures are the final
validation backtests recorded in each run's metrics file (greedy, and sampled over seeds 0, 1, 2), net of
fees, on 2024-11-01 .. 2025-01-01. Prints a JSON summary (mean and std across seeds per schedule).
Wall time per 11-update cycle measured side by side comes from `benchmarks/bench_train.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bot.cli import main as ritmo  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "binance_BTCUSDT_5m_2024.csv.gz"


def last_validation(metrics: Path) -> dict:
    """The last validation line of a metrics file."""
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    return [x for x in lines if x["type"] == "validation"][-1]


def train_seconds(metrics: Path) -> float:
    """Sum of the update wall times of a run."""
    return sum(json.loads(x)["wall_s"] for x in metrics.read_text().splitlines() if '"type": "update"' in x)


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def main() -> None:
    """Run the grid and print the summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=330)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=288)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--mode", default="long_short")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/ritmo-study"))
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {"asymmetric": [], "symmetric": []}
    for seed in args.seeds:
        for schedule in results:
            out = args.out_dir / f"{schedule}-s{seed}.pt"
            metrics = out.with_suffix(".metrics.jsonl")
            if not metrics.exists() or f'"type": "validation", "k": {args.updates}' not in metrics.read_text():
                metrics.unlink(missing_ok=True)
                code = ritmo([
                    "train", "--data", str(DATA), "--train-from", "2024-01-01", "--train-to", "2024-11-01",
                    "--valid-from", "2024-11-01", "--valid-to", "2025-01-01", "--updates", str(args.updates),
                    "--episodes-per-update", str(args.batch), "--episode-steps", str(args.steps),
                    "--schedule", schedule, "--macro-every", "11", "--validate-every", str(args.updates),
                    "--seed", str(seed), "--position-mode", args.mode, "--no-progress", "--out", str(out),
                ])  # fmt: skip
                if code != 0:
                    raise SystemExit(f"training failed: {schedule} seed {seed}")
            v = last_validation(metrics)
            results[schedule].append({
                "seed": seed,
                "train_seconds": train_seconds(metrics),
                "greedy_return": v["greedy"]["total_return"],
                "greedy_trades": v["greedy"]["n_trades"],
                "greedy_sharpe": v["greedy"]["sharpe"],
                "sampled_return": v["sampled"]["total_return_mean"],
                "sampled_trades": v["sampled"]["n_trades_mean"],
                "score": v["score"],
                "buy_and_hold_return": v["buy_and_hold"]["total_return"],
            })  # fmt: skip
    summary = {
        "settings": vars(args) | {"out_dir": str(args.out_dir)},
        "runs": results,
        "summary": {
            schedule: {
                key: mean_std([r[key] for r in runs])
                for key in ("train_seconds", "greedy_return", "greedy_trades", "sampled_return", "sampled_trades")
            }
            for schedule, runs in results.items()
        },
    }
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
