"""What the benchmark scripts share: best-of timing and the machine description they print first."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time (s) of `repeats` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def print_machine(libs: Sequence[str] = ("numpy", "pandas", "torch")) -> None:
    """Platform, CPUs, library versions and torch's thread settings."""
    import torch

    print("== machine")
    print(f"platform   {platform.platform()}  ({platform.machine()}, {platform.processor() or 'n/a'})")
    print(f"cpus       {os.cpu_count()}   load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"python     {platform.python_version()}")
    print("versions   " + "  ".join(f"{lib} {version(lib)}" for lib in libs))
    print(f"torch      threads {torch.get_num_threads()}, interop threads {torch.get_num_interop_threads()}")
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.75 * cpus:
        # torch's intra-op threads wait for each other at every op: on a shared CPU they stall, not just slow down.
        print(
            f"NOTE       busy machine (load {load:.1f} on {cpus} cpus): multi-threaded torch figures are pessimistic; "
            "compare --threads 1"
        )


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (VmHWM), in MB.

    Not `ru_maxrss`: Linux carries a forked child's high-water mark across exec, so a child started by a
    large parent (one holding torch, pandas and a year of candles) would report the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_figures(path: str | None, figures: dict[str, Any]) -> None:
    """Write a benchmark's figures as JSON to `path` (for `bench_all.py`'s table); nothing without a path."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)
