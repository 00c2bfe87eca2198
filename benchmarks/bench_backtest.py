"""Benchmark of a full-year backtest on 5m candles (prints figures, asserts nothing).

    .venv/bin/python benchmarks/bench_backtest.py [--data FILE] [--repeats 3] [--threads N]

Steps, as `ritmo backtest --random-init` runs them:
  0. load the candle file (validated) and build features + observations once (timed once, not the target);
  1. the backtest proper, for a random-init policy over every candle that can be decided on: the first decision
     is taken at the close of the first row with a valid observation (`first_valid_row`), so the period runs
     from the next candle to the end of the file. Timed in two parts, best of `--repeats`:
       (a) policy probabilities for every decision row and every position state (`probs_for_all_positions`);
       (b) the sequential accounting loop (`run_backtest`), sampled and greedy.
     Target: (a) + (b) <= 3 s for the year.
  2. the whole command, `ritmo backtest --checkpoint <--checkpoint> --json` over --from .. --to, as a child process:
     best wall time and its peak resident memory (target <= 2.0 s and <= 300 MB), next to a child that only
     imports numpy, pandas and torch (the floor every run pays before reading a byte).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import best_of, print_machine

from bot.files.candles import load_candles
from strategies.backtest import run_backtest
from strategies.bundle import backtest_period, random_bundle
from strategies.features import build_observations, compute_features, default_feature_spec, first_valid_row
from strategies.policy import probs_for_all_positions

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "binance_BTCUSDT_5m_2024.csv.gz"
TARGET_S = 3.0
SEED = 1
COMMAND_TARGET_S, COMMAND_TARGET_MB = 2.0, 300.0


def run_child(argv: list[str]) -> tuple[float, float]:
    """Wall time (s) and peak resident memory (MB) of one child process, as /usr/bin/time reports them.

    Not this process's own wait4: Linux carries a process's peak RSS across fork and exec, so a child of
    this (large) process would report at least our own size. /usr/bin/time is small and forks the child itself.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "-o", report.name, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}")
        wall, kb = report.read().split()[-2:]
    return float(wall), float(kb) / 1024


def best_child(argv: list[str], repeats: int) -> tuple[float, float]:
    """Best wall time of `repeats` runs of the child, with the peak memory of that run."""
    return min(run_child(argv) for _ in range(repeats))


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="candle CSV(.gz) or Parquet")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "default.pt", help="for step 2")
    parser.add_argument("--from", dest="date_from", default="2024-01-06", help="period start of step 2")
    parser.add_argument("--to", dest="date_to", default="2025-01-01", help="period end of step 2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine()

    # ---- 0. load, features, observations (once) -------------------------------------------------
    t0 = time.perf_counter()
    candles = load_candles(args.data)
    t_load = time.perf_counter() - t0
    ts = candles["ts_ms"].to_numpy()
    first = first_valid_row()
    i0, i1 = first + 1, len(candles)  # decisions at the closes of rows first .. n-2, fills at i0 .. n-1
    t0 = time.perf_counter()
    features = compute_features(candles, default_feature_spec())
    bundle = random_bundle(SEED, features, slice(0, i0), "long_short", 0.001)
    obs = build_observations(features, bundle.standardizer, bundle.macro_window, bundle.micro_window)
    t_obs = time.perf_counter() - t0
    assert obs.valid[first:].all() and not obs.valid[:first].any()
    print(f"\n== data: {args.data.name}, {len(candles):,} candles")
    print(f"load + validate                   {t_load * 1e3:8.1f} ms")
    print(f"features + standardiser + obs     {t_obs * 1e3:8.1f} ms   (once; not part of the target)")
    print(
        f"first valid observation row {first:,}; period = rows {i0:,} .. {i1 - 1:,} = {i1 - i0:,} candles "
        f"({i1 - i0:,} decisions, the last one at the close of the second-to-last candle)"
    )

    # ---- 1. the backtest proper ------------------------------------------------------------------
    macro, micro = torch.from_numpy(obs.macro[i0 - 1 : i1 - 1]), torch.from_numpy(obs.micro[i0 - 1 : i1 - 1])
    period_ts = ts[i0:i1]
    opens, closes = candles["open"].to_numpy()[i0:i1], candles["close"].to_numpy()[i0:i1]

    t_probs, probs_t = best_of(lambda: probs_for_all_positions(bundle.model, macro, micro), args.repeats)
    probs = probs_t.double().numpy()

    def loop(greedy: bool) -> Any:
        return run_backtest(
            probs, period_ts, opens, closes, mode="long_short", commission=0.001, greedy=greedy, seed=SEED
        )

    t_sampled, res_sampled = best_of(lambda: loop(False), args.repeats)
    t_greedy, res_greedy = best_of(lambda: loop(True), args.repeats)
    from_ms, to_ms = int(ts[i0]), int(ts[-1]) + 300_000
    t_whole, res_whole = best_of(
        lambda: backtest_period(bundle, candles, obs, from_ms, to_ms, greedy=False, seed=SEED), args.repeats
    )
    assert res_whole.trades == res_sampled.trades

    n = i1 - i0
    print(f"\n== full-year backtest, random-init policy (seed {SEED}), best of {args.repeats}")
    print(
        f"(a) probs_for_all_positions       {t_probs * 1e3:8.1f} ms   "
        f"({n / t_probs / 1e3:,.0f}k rows/s, 3 position states each)"
    )
    for label, t, res in (("sampled", t_sampled, res_sampled), ("greedy ", t_greedy, res_greedy)):
        m = res.policy
        print(
            f"(b) run_backtest {label}          {t * 1e3:8.1f} ms   ({n / t / 1e3:,.0f}k candles/s; "
            f"{m.n_trades:,} trades, return {m.total_return:+.2%})"
        )
    for label, t in (("sampled", t_sampled), ("greedy ", t_greedy)):
        total = t_probs + t
        verdict = "met" if total <= TARGET_S else "NOT met"
        print(f"(a)+(b) {label}                   {total * 1e3:8.1f} ms   (target <= {TARGET_S:.0f} s; {verdict})")
    print(f"backtest_period end to end        {t_whole * 1e3:8.1f} ms   (sampled; slicing + (a) + (b))")
    print(f"buy-and-hold over the same candles: return {res_sampled.buy_and_hold.total_return:+.2%}")

    # ---- 2. the whole command -------------------------------------------------------------------
    command = [sys.executable, "-m", "bot", "backtest", "--checkpoint", str(args.checkpoint), "--data", str(args.data)]
    command += ["--from", args.date_from, "--to", args.date_to, "--json"]
    t_cmd, mb_cmd = best_child(command, args.repeats)
    t_imp, mb_imp = best_child([sys.executable, "-c", "import numpy, pandas, torch"], args.repeats)
    verdict = "met" if t_cmd <= COMMAND_TARGET_S and mb_cmd <= COMMAND_TARGET_MB else "NOT met"
    period = f"{args.date_from} .. {args.date_to}"
    print(f"\n== ritmo backtest --checkpoint {args.checkpoint.name} {period}, best of {args.repeats}")
    print(
        f"whole command                     {t_cmd * 1e3:8.1f} ms   peak RSS {mb_cmd:6.0f} MB   "
        f"(target <= {COMMAND_TARGET_S:.1f} s and <= {COMMAND_TARGET_MB:.0f} MB; {verdict})"
    )
    print(f"import numpy, pandas, torch only  {t_imp * 1e3:8.1f} ms   peak RSS {mb_imp:6.0f} MB   (the floor)")


if __name__ == "__main__":
    main()
