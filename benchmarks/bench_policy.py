"""Benchmark of the policy network's forward pass (prints figures, asserts nothing).

    .venv/bin/python benchmarks/bench_policy.py [--threads 2] [--repeats 3]

Eval mode under `torch.no_grad()`, N = 20 features (83,811 parameters), best of `--repeats`:
  1. batch 1: the plain `model(macro, micro, position)` call, as the daemon makes once per closed candle;
  2. batch 4096: the same call on a batch;
  3. `probs_for_all_positions` on 4096 rows (encoders once, the head for all three position states).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from bench_common import print_machine

from strategies.policy import PolicyNet, parameter_counts, probs_for_all_positions

N_FEATURES = 20
BIG_BATCH = 4096


def best_per_call(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Best over `repeats` of the mean wall time (s) of one call, measured over `calls` calls."""
    fn()  # warm-up: first-call allocations and kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def report(label: str, per_call_s: float, rows: int) -> None:
    """One line: microseconds per call and rows per second."""
    print(f"{label:44s} {per_call_s * 1e6:10.1f} µs/call   {rows / per_call_s:12,.0f} rows/s")


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is reported")
    parser.add_argument("--calls", type=int, default=3000, help="calls per run at batch 1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(("numpy", "torch"))

    torch.manual_seed(0)
    model = PolicyNet(N_FEATURES).eval()
    width = 3 * N_FEATURES
    print(f"\n== PolicyNet(N={N_FEATURES}), {parameter_counts(model)['total']:,} parameters, eval mode, no_grad")

    gen = torch.Generator().manual_seed(1)
    macro1, micro1 = torch.randn(1, width, generator=gen), torch.randn(1, width, generator=gen)
    pos1 = torch.tensor([1.0])
    macro_b, micro_b = torch.randn(BIG_BATCH, width, generator=gen), torch.randn(BIG_BATCH, width, generator=gen)
    pos_b = torch.randint(-1, 2, (BIG_BATCH,), generator=gen).float()

    with torch.no_grad():
        t1 = best_per_call(lambda: model(macro1, micro1, pos1), args.calls, args.repeats)
        tb = best_per_call(lambda: model(macro_b, micro_b, pos_b), max(20, args.calls // 100), args.repeats)
    # probs_for_all_positions runs under no_grad itself
    ta = best_per_call(
        lambda: probs_for_all_positions(model, macro_b, micro_b), max(20, args.calls // 100), args.repeats
    )

    report("batch 1, model(macro, micro, position)", t1, 1)
    report(f"batch {BIG_BATCH}, model(macro, micro, position)", tb, BIG_BATCH)
    report(f"batch {BIG_BATCH}, probs_for_all_positions", ta, BIG_BATCH)
    print(
        f"probs_for_all_positions gives 3 position states per row: {3 * BIG_BATCH / ta:,.0f} (row, position) "
        f"probabilities/s = {3 * tb / ta:.1f}x three plain batched calls"
    )
    print(f"a year of 5m candles (105,408 rows) at batch {BIG_BATCH}: ~{105_408 * ta / BIG_BATCH * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
