"""The observation of the newest candle, kept in step with the candle buffer one candle at a time.

`strategies.incremental.IncrementalFeatures` updates the 20 features and the macro/micro aggregates from its
state and each new candle (about 0.1 ms), instead of recomputing them over the whole 1,265-candle window at
every decision (several ms). It is rebuilt from the buffer's window at start, and whenever candles it has
read leave the buffer other than by being outgrown (a cleared buffer, a hole refetched): then its history is
exactly the window's, as the full recompute's is.

Guard (docs/design.md §3, §8): every `check_every_ticks` ticks, the next decision also recomputes the window's
observation from scratch: a second engine is fed the buffer's whole window (~70 ms, once a week). The running engine has
then seen exactly what a fresh one sees, so the two agree to float32 precision unless running state drifted
(the windows' running sums) or went wrong; if they ever differ beyond `rtol`/`atol`, `feature_drift` is logged,
the recomputed observation is used and the fresh engine replaces the running one. The fresh engine equals the
batch code (`compute_features` + `build_observations`) on every row of a real year (tests/test_incremental_features.py);
the daemon does not run the batch code itself, which would import pandas (~85 MB) for this check.
"""

from __future__ import annotations

import numpy as np
import structlog

from bot.daemon.feed import CandleBuffer
from strategies.bundle import ModelBundle, history_needed
from strategies.incremental import IncrementalFeatures

log = structlog.get_logger(__name__)

# One week of 5-minute ticks between full recomputes (~70 ms each). Rounding cannot accumulate between them (each
# window's running sums are recomputed from its rows every `window` rows), so the guard is there to catch state
# that went wrong; daily, it added ~7% to a replay's wall time.
CHECK_EVERY_TICKS = 7 * 288
DRIFT_RTOL = 1e-5
DRIFT_ATOL = 1e-6

Observation = tuple[np.ndarray, np.ndarray]


class BufferObserver:
    """Follows a `CandleBuffer` with an incremental feature engine; `observation()` is its newest candle's."""

    def __init__(self, bundle: ModelBundle, *, check_every_ticks: int = CHECK_EVERY_TICKS) -> None:
        self.bundle = bundle
        self.history = history_needed(bundle)
        self.check_every_ticks = int(check_every_ticks)
        self.engine = self._new_engine()
        self._spare: IncrementalFeatures | None = None  # the guard's fresh engine, made at its first check
        self._revision: int | None = None
        self._ticks_since_check = 0
        self.rebuilds = 0

    def sync(self, buffer: CandleBuffer) -> None:
        """Feed the engine the candles the buffer gained since the last sync (rebuild when rows were dropped)."""
        self._ticks_since_check += 1
        last = self.engine.last_ts_ms
        row = buffer.index_of(last) if last is not None else None
        if self._revision != buffer.revision or row is None:
            self._rebuild(buffer)
            return
        for i in range(row + 1, len(buffer)):
            c = buffer.candle(i)
            self.engine.update(c.open, c.high, c.low, c.close, c.volume, ts_ms=c.ts_ms)

    def observation(self, buffer: CandleBuffer) -> Observation | None:
        """(macro, micro) float32 (3N,) each of the buffer's newest candle, or None while too short (warm-up)."""
        obs = self.engine.observation()
        if self._ticks_since_check < self.check_every_ticks:
            return obs
        self._ticks_since_check = 0
        fresh = self._spare or self._new_engine()
        fresh.rebuild(buffer.window(self.history))
        full = fresh.observation()
        self._spare = fresh
        if _same(obs, full):
            return obs
        log.warning("feature_drift", incremental_none=obs is None, full_none=full is None, **_gap(obs, full))
        self.engine, self._spare = fresh, self.engine
        self._revision = buffer.revision
        self.rebuilds += 1
        return full

    def _new_engine(self) -> IncrementalFeatures:
        b = self.bundle
        return IncrementalFeatures(b.spec, b.standardizer, b.macro_window, b.micro_window)

    def _rebuild(self, buffer: CandleBuffer) -> None:
        self._revision = buffer.revision
        if len(buffer) == 0:
            self.engine.reset()
            return
        self.engine.rebuild(buffer.window(self.history))
        self.rebuilds += 1


def _same(a: Observation | None, b: Observation | None) -> bool:
    """Both None, or both present and equal within the drift tolerance."""
    if a is None or b is None:
        return a is None and b is None
    return all(np.allclose(x, y, rtol=DRIFT_RTOL, atol=DRIFT_ATOL) for x, y in zip(a, b, strict=True))


def _gap(a: Observation | None, b: Observation | None) -> dict[str, float]:
    """The largest absolute difference between two observations, for the drift log line."""
    if a is None or b is None:
        return {}
    return {"max_abs_diff": float(max(np.max(np.abs(x - y)) for x, y in zip(a, b, strict=True)))}
