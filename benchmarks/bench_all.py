"""Every speed and memory figure of the product in one table: each figure, its target, and the anchors measured
in the same run (the `ta` library for the features, stable-baselines3 PPO for training), with the machine and
its load. `make bench` runs it; nothing here asserts a time. The latest table is kept in benchmarks/README.md.

    .venv/bin/python benchmarks/bench_all.py [--skip-year] [--skip-sb3]

Each benchmark runs as its own subprocess (its own peak RSS), one after another, and hands its figures back as
JSON. The year backtest is the whole `ritmo backtest` command, start-up and candle loading included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DATA = REPO.parent / "shared" / "data" / "binance_BTCUSDT_5m_2024.csv.gz"
CHECKPOINT = REPO / "checkpoints" / "default.pt"

# Runs a command and prints its wall time and peak RSS (the children's ru_maxrss of this fresh process).
_MEASURE = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
wall = time.perf_counter() - t0
print(rc, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def run_bench(script: str, *args: str) -> dict[str, Any]:
    """Run benchmarks/<script> with --json and return its figures (its own output goes to stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [sys.executable, str(BENCH / script), *args, "--json", str(out)]
        print(f"running {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=sys.stderr, cwd=REPO)
        return json.loads(out.read_text())


def measure_command(cmd: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MB) of one command."""
    print(f"running {' '.join(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    rc, wall, rss = done.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {rc}")
    return float(wall), float(rss)


def machine() -> str:
    """CPU model, logical CPUs, Python and the load average now."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return f"{cpu}; {os.cpu_count()} logical CPUs; Python {platform.python_version()}"


def load() -> str:
    """The 1, 5 and 15-minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _fmt(value: float | None, unit: str, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f} {unit}".strip()


def _met(value: float | None, target: float, higher_is_better: bool = False) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value >= target if higher_is_better else value <= target) else "**no**"


def table(f: dict[str, Any]) -> list[str]:
    """The markdown table of every figure against its target, with the anchors of the same run."""
    month, year, train, feats = f["month"], f.get("year"), f["train"], f["features"]
    on, off = month["learning"], month.get("frozen")
    year_s = year["learning"]["month_wall_s"] if year else None
    bt_s, bt_mb = f["backtest"]
    # The replays' processes, and a paper tick through ccxt (the live path: ccxt's import is ~53 MB).
    rss = {"month replay": on["peak_rss_mb"], "paper tick via ccxt": month.get("paper", {}).get("peak_rss_mb")}
    if year:
        rss["year replay"] = year["learning"]["peak_rss_mb"]
    rss_txt = "; ".join(f"{name} {_fmt(mb, 'MB', 0)}" for name, mb in rss.items())
    worst_rss = max((mb for mb in rss.values() if mb is not None), default=None)
    sb3 = [train.get(f"sb3_ppo_{n}_envs_steps_s") for n in (1, 8)]
    sb3_txt = "; ".join(
        f"SB3 PPO {n} env{'s' if n > 1 else ''}: {_fmt(r, 'steps/s', 0)}" for n, r in zip((1, 8), sb3, strict=True)
    )
    rows = [
        (
            "tick latency p99, learning on",
            _fmt(on["latency_p99_ms"], "ms", 2),
            "<= 2 ms",
            _met(on["latency_p99_ms"], 2),
        ),
        (
            "month replay with learning (Dec 2024)",
            _fmt(on["month_wall_s"], "s"),
            "<= 10 s",
            _met(on["month_wall_s"], 10),
        ),
        ("year replay with learning (2024)", _fmt(year_s, "s"), "<= 120 s", _met(year_s, 120)),
        (
            "daemon peak RSS, learning on",
            f"{_fmt(worst_rss, 'MB', 0)} (the largest of: {rss_txt})",
            "<= 300 MB",
            _met(worst_rss, 300),
        ),
        (
            "year backtest, whole command",
            f"{bt_s:.2f} s, {bt_mb:.0f} MB",
            "<= 2.0 s, <= 300 MB",
            "yes" if bt_s <= 2.0 and bt_mb <= 300 else "**no**",
        ),
        (
            "features + aggregation for a year",
            _fmt(feats["pipeline_ms"], "ms", 0),
            "<= 300 ms",
            _met(feats["pipeline_ms"], 300),
        ),
        (
            "training, asymmetric, env steps/s (mean)",
            _fmt(train["asymmetric_steps_s_mean"], "", 0),
            ">= 250,000",
            _met(train["asymmetric_steps_s_mean"], 250_000, higher_is_better=True),
        ),
    ]
    ta_ms = _fmt(feats["ta_naive_ms"], "ms", 0)
    anchors = {
        "features + aggregation for a year": f"the 20 indicators with `ta`'s classes: {ta_ms}",
        "training, asymmetric, env steps/s (mean)": sb3_txt,
        "tick latency p99, learning on": (
            f"learning off: p99 {_fmt(off['latency_p99_ms'], 'ms', 2)}, RSS {_fmt(off['peak_rss_mb'], 'MB', 0)}"
            if off
            else ""
        ),
    }
    lines = ["| figure | measured | target | met | anchor, same run |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {value} | {target} | {met} | {anchors.get(name, '')} |" for name, value, target, met in rows]
    return lines


def main() -> None:
    """Run every benchmark and print the one table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-year", action="store_true", help="leave out the year replay (about 2 to 10 minutes)")
    p.add_argument("--skip-sb3", action="store_true", help="leave out the stable-baselines3 PPO anchor")
    args = p.parse_args()
    load_start, t0 = load(), time.perf_counter()
    figures: dict[str, Any] = {"features": run_bench("bench_features.py")}
    backtest = [sys.executable, "-m", "bot", "backtest", "--checkpoint", str(CHECKPOINT), "--data", str(DATA)]
    backtest += ["--from", "2024-01-06", "--to", "2025-01-01", "--json"]
    figures["backtest"] = measure_command(backtest)
    figures["month"] = run_bench("bench_daemon.py", "--checkpoint", str(CHECKPOINT))
    if not args.skip_year:
        year = ("--modes", "learning", "--from", "2024-01-06", "--to", "2025-01-01")
        figures["year"] = run_bench("bench_daemon.py", "--checkpoint", str(CHECKPOINT), *year)
    figures["train"] = run_bench("bench_train.py", *(() if args.skip_sb3 else ("--sb3",)))
    print(f"machine: {machine()}")
    print(f"load average: {load_start} at the start, {load()} at the end ({time.perf_counter() - t0:.0f} s in all)")
    print(f"data: {DATA.name}; checkpoint: {CHECKPOINT.name}\n")
    print("\n".join(table(figures)))


if __name__ == "__main__":
    main()
