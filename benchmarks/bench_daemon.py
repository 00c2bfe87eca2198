"""Daemon benchmark: a month of real candles replayed through `ritmo run --replay` (the real tick code, no network).

Prints, for a run with online learning and one without:
  - tick latency p50 / p99 / max: candles in -> decision recorded and committed (TickOutcome.latency_ms),
    and the feed step before it (the replay market; no network);
  - time per online update of a 288-step episode (policy_gradient_step + atomic checkpoint save + record);
  - total wall time of the month (start-up excluded, then included);
  - peak RSS of the process (VmHWM, bench_common.peak_rss_mb).
Each run is its own subprocess, so its peak RSS is its own. Logs are rendered as JSON (as under systemd) into
/dev/null, so their cost is included. Targets (issue 4): p99 <= 20 ms, update <= 200 ms, month with learning
<= 60 s, RSS <= 400 MB. No asserts: the figures go to benchmarks/README.md.

    .venv/bin/python benchmarks/bench_daemon.py [--checkpoint C] [--from 2024-12-01 --to 2025-01-01]

Without --checkpoint (or if checkpoints/default.pt is missing) a seeded random policy with a standardiser fitted
on Jan-Apr 2024 is used: the network's size and the work per tick are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import peak_rss_mb, write_figures

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "binance_BTCUSDT_5m_2024.csv.gz"


def machine() -> str:
    """CPU model, cores, Python, torch, load average."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    load = os.getloadavg()
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; torch {torch.__version__}; "
        f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def random_checkpoint(path: Path) -> Path:
    """A seeded random policy (same size and work as a trained one)."""
    import torch

    from bot.files.candles import load_candles
    from bot.files.checkpoints import save_checkpoint
    from strategies.bundle import ModelBundle
    from strategies.features import compute_features, default_feature_spec, fit_standardizer
    from strategies.policy import PolicyNet

    df = load_candles(DATA)
    spec = default_feature_spec()
    rows = 35_000
    features = compute_features(df.iloc[:rows], spec)
    torch.manual_seed(7)
    bundle = ModelBundle(
        model=PolicyNet(len(spec.names)).eval(),
        spec=spec,
        standardizer=fit_standardizer(features, slice(0, rows)),
        position_mode="long_short",
        commission=0.001,
    )
    return save_checkpoint(path, bundle)


def child(args: argparse.Namespace) -> None:
    """One replay in this process; prints one JSON line of figures."""
    t_start = time.perf_counter()
    import numpy as np

    from bot.cli import build_parser
    from bot.commands import run as runner
    from bot.daemon import service
    from bot.daemon.tick import Daemon
    from bot.logs import configure_logging

    outcomes = []
    original = Daemon.tick

    def recording_tick(self: Daemon, now_ms: int):  # type: ignore[no-untyped-def]
        out = original(self, now_ms)
        if out is not None:
            # Numbers only: keeping a year of TickOutcome objects would add tens of MB to the measured RSS.
            update_ms = out.update.wall_ms if out.update is not None else None
            outcomes.append((out.latency_ms, out.feed_ms, update_ms, out.ts_ms))
        return out

    Daemon.tick = recording_tick  # type: ignore[method-assign]
    cli = [
        "run",
        "--replay",
        str(args.data),
        "--from",
        args.date_from,
        "--to",
        args.date_to,
        "--speed",
        "max",
        "--seed",
        "1",
        "--state-dir",
        args.state_dir,
        "--checkpoint",
        args.checkpoint,
        "--online-learning" if args.learning else "--no-online-learning",
    ]
    ns = build_parser(cli).parse_args(cli)
    settings = runner.resolve_settings(ns)
    sink = open(os.devnull, "w")  # noqa: SIM115  # lives as long as the process
    configure_logging("json", settings.log_level, stream=sink, secrets=settings.secret_values())
    service.single_threaded_torch()
    t_ready = time.perf_counter()
    runner.run_replay(settings, ns, service.StopSignal())
    t_end = time.perf_counter()

    lat = np.array([o[0] for o in outcomes])
    feed = np.array([o[1] for o in outcomes])
    updates = [o[2] for o in outcomes if o[2] is not None]
    ticks_with_update = np.array([o[0] for o in outcomes if o[2] is not None])
    first_tick_ts_ms = outcomes[0][3] if outcomes else None
    print(
        json.dumps(
            {
                "learning": args.learning,
                "ticks": len(outcomes),
                "latency_p50_ms": float(np.percentile(lat, 50)),
                "latency_p99_ms": float(np.percentile(lat, 99)),
                "latency_max_ms": float(lat.max()),
                "feed_p50_ms": float(np.percentile(feed, 50)),
                "updates": len(updates),
                "update_mean_ms": float(np.mean(updates)) if updates else None,
                "update_max_ms": float(np.max(updates)) if updates else None,
                "tick_with_update_max_ms": float(ticks_with_update.max()) if len(ticks_with_update) else None,
                "month_wall_s": t_end - t_ready,
                "process_wall_s": t_end - t_start,
                "peak_rss_mb": peak_rss_mb(),
                "first_tick": first_tick_ts_ms,
            }
        ),
        flush=True,
    )


PAPER_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from bot.cli import main
from bench_common import peak_rss_mb
code = main(sys.argv[1:])
heavy = sorted(m for m in ("pandas", "pyarrow", "ta", "torch._dynamo", "sympy") if m in sys.modules)
rss = peak_rss_mb()
print(json.dumps({"code": code, "wall_s": time.perf_counter() - t0, "peak_rss_mb": rss, "heavy": heavy}))
"""


def paper_tick(checkpoint: str, tmp: Path) -> dict:
    """Peak RSS of `ritmo run --once` in paper mode with learning on: ccxt.binance against the loopback fake
    (tests/fake_binance.py, serving the 2024 candles), the warm-up backfill, the model, the learner, one tick."""
    import pandas as pd

    sys.path.insert(0, str(REPO))
    from tests.fake_binance import FakeBinance

    candles = pd.read_csv(DATA)
    with FakeBinance(candles=candles) as fake:
        now_ms = time.time_ns() // 1_000_000
        fake.server_offset_ms = (now_ms // 300_000) * 300_000 + 60_000 - now_ms
        env = {k: v for k, v in os.environ.items() if not k.startswith("RITMO_")}
        env.update(
            {
                "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'benchmarks'}",
                "RITMO_MODE": "paper",
                "RITMO_EXCHANGE_CONFIG": json.dumps(fake.ccxt_config(timeout_ms=5_000)),
                "RITMO_CHECKPOINT": checkpoint,
                "RITMO_STATE_DIR": str(tmp / "paper"),
                "RITMO_ONLINE_LEARNING": "true",
                "RITMO_LOG_FORMAT": "json",
            }
        )
        cmd = [sys.executable, "-c", PAPER_CHILD, "run", "--once", "--env-file", str(tmp / "absent.env")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp, check=False)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    if r["code"] != 0:
        print(done.stdout[-3000:], done.stderr[-3000:])
        raise SystemExit("paper tick failed")
    return r


def main() -> None:
    """Run both replays (and the paper tick) in subprocesses and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--from", dest="date_from", default="2024-12-01")
    p.add_argument("--to", dest="date_to", default="2025-01-01")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--modes", default="learning,frozen,paper", help="which runs: learning, frozen, paper")
    p.add_argument("--json", help="also write the figures to this JSON file (bench_all.py)")
    p.add_argument("--child", choices=("learning", "frozen"), help=argparse.SUPPRESS)
    p.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.learning = args.child == "learning"
        child(args)
        return

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        default = REPO / "checkpoints" / "default.pt"
        if checkpoint is None and default.exists():
            checkpoint = str(default)
        if checkpoint is None:
            checkpoint = str(random_checkpoint(Path(tmp) / "random.pt"))
            print("checkpoint: seeded random policy (checkpoints/default.pt not found)")
        else:
            print(f"checkpoint: {checkpoint}")
        print(
            f"replay: {args.data.name} {args.date_from} .. {args.date_to}, seed 1, logs rendered as JSON to /dev/null"
        )
        figures: dict[str, dict] = {}
        for mode in args.modes.split(","):
            if mode == "paper":
                r = paper_tick(checkpoint, Path(tmp))
                figures[mode] = r
                print(
                    f"\n[paper tick, learning on] ccxt.binance -> loopback fake, start-up + one tick: "
                    f"{r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB; heavy modules loaded: "
                    f"{', '.join(r['heavy']) or 'none'}"
                )
                continue
            cmd = [sys.executable, __file__, "--child", mode, "--state-dir", str(Path(tmp) / mode)]
            cmd += [
                "--data",
                str(args.data),
                "--from",
                args.date_from,
                "--to",
                args.date_to,
                "--checkpoint",
                checkpoint,
            ]
            env = {**os.environ, "PYTHONPATH": str(REPO), "RITMO_MAX_DRAWDOWN": "1"}
            env = {k: v for k, v in env.items() if not (k.startswith("RITMO_") and k != "RITMO_MAX_DRAWDOWN")}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:])
                raise SystemExit(f"{mode} run failed")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            figures[mode] = r
            label = "online learning ON " if r["learning"] else "online learning OFF"
            print(f"\n[{label}] {r['ticks']} ticks")
            print(
                f"  tick latency (candles in -> decision committed): p50 {r['latency_p50_ms']:.2f} ms  "
                f"p99 {r['latency_p99_ms']:.2f} ms  max {r['latency_max_ms']:.2f} ms   (target p99 <= 20 ms)"
            )
            print(f"  feed step before it (replay market, no network): p50 {r['feed_p50_ms']:.3f} ms")
            if r["updates"]:
                print(
                    f"  online updates: {r['updates']}, 288 steps each: mean {r['update_mean_ms']:.1f} ms  "
                    f"max {r['update_max_ms']:.1f} ms (target <= 200 ms); "
                    f"the tick that ran one: max {r['tick_with_update_max_ms']:.1f} ms + its update"
                )
            print(
                f"  month: {r['month_wall_s']:.1f} s replay wall time, {r['process_wall_s']:.1f} s with start-up "
                f"(imports, candle file, model){'   (target <= 60 s)' if r['learning'] else ''}"
            )
            print(f"  peak RSS: {r['peak_rss_mb']:.0f} MB (target <= 300 MB)")
        write_figures(args.json, figures)


if __name__ == "__main__":
    main()
