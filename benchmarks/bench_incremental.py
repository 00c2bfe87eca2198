"""Incremental features against the daemon's windowed recompute, per tick, on real candles (prints, asserts nothing).

    .venv/bin/python benchmarks/bench_incremental.py [--data FILE] [--ticks 2000] [--windowed-ticks 200] [--repeats 3]

A CandleBuffer as the daemon's feed holds the candles; per tick, after appending the newest candle:
  1. windowed (today): `observe(buffer.window(1265), bundle)`, i.e. compute_features + standardise +
     last_observation over the whole window;
  2. incremental: `IncrementalFeatures.update(candle)` then `.observation()` (and update alone);
  3. the start-up / gap cost: `IncrementalFeatures.rebuild(buffer.window(1265))`.
Times are the best of `--repeats` runs over the same ticks (a shared machine's noise only adds time), per tick.
Also printed: the largest difference between the two observations over the ticks timed (the windowed one
restarts the EWMs at the window's first candle: ~1e-12 relative by design, then float32 rounding), which is
what a periodic full-recompute guard in the daemon should tolerate.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bot.daemon.feed import CandleBuffer
from strategies.bundle import history_needed, observe, random_bundle
from strategies.candles import VALUE_COLUMNS, CandleBatch
from strategies.features import compute_features
from strategies.incremental import IncrementalFeatures

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "binance_BTCUSDT_5m_2024.csv.gz"
FIT_ROWS = slice(0, 274 * 288)  # Jan-Sep 2024


def load_candles(path: Path) -> pd.DataFrame:
    """The candle file as ts_ms (int64) + open, high, low, close, volume (float64)."""
    df = pd.read_csv(path).rename(columns={"timestamp": "ts_ms"})
    df["ts_ms"] = df["ts_ms"].astype("int64")
    return df.astype({c: "float64" for c in VALUE_COLUMNS})


def _buffer(df: pd.DataFrame, start: int, history: int) -> CandleBuffer:
    """A daemon-sized buffer holding the `history` candles before row `start`."""
    buf = CandleBuffer(history + 135)
    buf.extend(CandleBatch.from_frame(df.iloc[start - history : start]))
    return buf


def time_windowed(df: pd.DataFrame, bundle, start: int, ticks: int) -> tuple[float, list]:
    """Seconds for `ticks` windowed ticks from row `start`, and their observations."""
    history = history_needed(bundle)
    buf = _buffer(df, start, history)
    batches = [CandleBatch.from_frame(df.iloc[i : i + 1]) for i in range(start, start + ticks)]
    obs = []
    t0 = time.perf_counter()
    for batch in batches:
        buf.extend(batch)
        obs.append(observe(buf.window(history).to_frame(), bundle))
    return time.perf_counter() - t0, obs


def time_incremental(df: pd.DataFrame, bundle, start: int, ticks: int, with_obs: bool) -> tuple[float, float, list]:
    """(seconds to rebuild from the buffer, seconds for `ticks` updates, their observations)."""
    history = history_needed(bundle)
    buf = _buffer(df, start, history)
    rows = df[list(VALUE_COLUMNS)].to_numpy()[start : start + ticks].tolist()
    engine = IncrementalFeatures(bundle.spec, bundle.standardizer, bundle.macro_window, bundle.micro_window)
    t0 = time.perf_counter()
    engine.rebuild(buf.window(history))
    t_rebuild = time.perf_counter() - t0
    obs = []
    t0 = time.perf_counter()
    if with_obs:
        for o, h, lo, c, v in rows:
            engine.update(o, h, lo, c, v)
            obs.append(engine.observation())
    else:
        for o, h, lo, c, v in rows:
            engine.update(o, h, lo, c, v)
    return t_rebuild, time.perf_counter() - t0, obs


def main() -> None:
    """Run the comparison and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="candle CSV(.gz)")
    parser.add_argument("--ticks", type=int, default=2000, help="incremental ticks timed")
    parser.add_argument("--windowed-ticks", type=int, default=200, help="windowed ticks timed (slow)")
    parser.add_argument("--start", type=int, default=80_000, help="row of the first tick")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is reported")
    args = parser.parse_args()

    df = load_candles(args.data)
    bundle = random_bundle(0, compute_features(df), FIT_ROWS, "long_short", 0.001)
    print(f"== {len(df):,} candles; history {history_needed(bundle)}; load average {os.getloadavg()[0]:.2f}")

    win = [time_windowed(df, bundle, args.start, args.windowed_ticks) for _ in range(args.repeats)]
    t_win = min(t for t, _ in win) / args.windowed_ticks
    inc = [time_incremental(df, bundle, args.start, args.ticks, True) for _ in range(args.repeats)]
    t_inc = min(t for _, t, _ in inc) / args.ticks
    t_rebuild = min(r for r, _, _ in inc)
    upd = [time_incremental(df, bundle, args.start, args.ticks, False) for _ in range(args.repeats)]
    t_upd = min(t for _, t, _ in upd) / args.ticks

    print(f"windowed   observe(buffer.window(1265))      {t_win * 1e6:10.1f} us/tick")
    print(f"incremental update + observation()          {t_inc * 1e6:10.1f} us/tick   ({t_win / t_inc:.0f}x faster)")
    print(f"incremental update alone (20 features)       {t_upd * 1e6:10.1f} us/tick")
    print(f"incremental rebuild from the 1265-candle buffer {t_rebuild * 1e3:7.1f} ms (start-up, after a gap)")

    diffs = []
    for a, b in zip(win[0][1], inc[0][2][: args.windowed_ticks], strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            diffs.append(max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(a, b, strict=True)))
    print(f"max |incremental - windowed| over {len(diffs)} observations: {max(diffs):.3g} (float32 values)")
    # After all the incremental ticks: the engine's EWM seeds are `ticks` candles older than the window's.
    end = args.start + args.ticks
    window_obs = observe(_buffer(df, end, history_needed(bundle)).window(history_needed(bundle)).to_frame(), bundle)
    last = inc[0][2][-1]
    assert window_obs is not None and last is not None
    gap = max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(last, window_obs, strict=True))
    print(f"max |incremental - windowed| at tick {args.ticks} (seeds {args.ticks} candles apart): {gap:.3g}")
    load = os.getloadavg()[0]
    print(f"load average at end {load:.2f}")


if __name__ == "__main__":
    main()
