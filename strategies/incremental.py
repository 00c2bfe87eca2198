"""Incremental features: the 20 per-candle features and the macro/micro observation of the newest candle,
updated from the previous state and one new candle in O(1) (bounded by the indicators' own windows, tens of
candles, never by the 1,265-candle history).

Pure code, like strategies/features.py: floats and arrays in, arrays out.

`IncrementalFeatures` reproduces `compute_features(candles)` row by row when fed the same candles one by
one from the same first candle: each indicator mirrors the arithmetic of the batch code, in the same order,
so that most values are bit-identical:
- pandas' `ewm(adjust=False)` (RSI, MACD, EMA, Wilder's ATR/ADX) with its seeds, min_periods and its
  `(old_wt * y + alpha * x) / (old_wt + alpha)` update (`_Ewm`);
- pandas' compensated running-sum `rolling().mean()` (CCI's numerator; `_RollingMean`);
- numpy's summation order for window means and sums: numpy's own 1-D `sum` and `einsum` (fused multiply-adds)
  on a contiguous window in time order (`_Window`, a doubled ring), or the same pairwise order in Python
  (`_pairwise_sum`) for short lists;
- the NaN warm-up rows and the `_neutral` 0/0 rules of features.py.
The state is a pure function of the candles fed since the last `rebuild`: rebuilding from a buffer and
feeding the same candles gives the same values as `compute_features` on that buffer plus those candles.

The observation keeps, per window (macro 492, micro 60), running sums of the standardised rows, shifted by a
reference close to the window mean (no cancellation in the variance) and recomputed from the window every
`window` rows (rounding cannot drift); `[mean, std ddof 0, last]` as float32, or None while a window is
incomplete or holds a non-finite value, `last_observation`'s rule.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from strategies.candles import VALUE_COLUMNS, CandleBatch
from strategies.features import (
    MACRO_WINDOW,
    MICRO_WINDOW,
    STD_FLOOR,
    FeatureSpec,
    Standardizer,
    default_feature_spec,
    warmup_candles,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["IncrementalFeatures", "WindowAggregate"]

NAN = math.nan
_LOGRET = re.compile(r"logret_([1-9][0-9]*)")
# numpy's pairwise summation: blocks of up to 128 values are summed with 8 interleaved accumulators.
_PW_BLOCK = 128


# ---------------------------------------------------------------------------------------------------
# Arithmetic helpers that reproduce numpy/pandas results in plain Python floats
# ---------------------------------------------------------------------------------------------------


def _div(a: float, b: float) -> float:
    """a / b with numpy's IEEE result under errstate(ignore): +-inf for x/0, NaN for 0/0 or NaN."""
    try:
        return a / b
    except ZeroDivisionError:
        if a != a or a == 0.0:
            return NAN
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _log(x: float) -> float:
    """np.log of a scalar: -inf at 0, NaN below 0 or for NaN (math.log raises there)."""
    if x > 0.0:
        return math.log(x)
    return -math.inf if x == 0.0 else NAN


def _pairwise_sum(xs: Sequence[float]) -> float:
    """Sum in numpy's order (pairwise, 8 accumulators per block), so window means are bit-identical."""
    n = len(xs)
    if n < 8:
        s = 0.0
        for x in xs:
            s += x
        return s
    if n <= _PW_BLOCK:
        r0, r1, r2, r3, r4, r5, r6, r7 = xs[:8]
        end = n - n % 8
        for i in range(8, end, 8):
            r0 += xs[i]
            r1 += xs[i + 1]
            r2 += xs[i + 2]
            r3 += xs[i + 3]
            r4 += xs[i + 4]
            r5 += xs[i + 5]
            r6 += xs[i + 6]
            r7 += xs[i + 7]
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        for i in range(end, n):
            res += xs[i]
        return res
    half = n // 2
    half -= half % 8
    return _pairwise_sum(xs[:half]) + _pairwise_sum(xs[half:])


def _mean_std(window: np.ndarray) -> tuple[float, float]:
    """`indicators.rolling_mean_std` of one full window (w,) in time order: (mean, std ddof 0)."""
    w = window.shape[0]
    # numpy's own 1-D sum and einsum: the same summation order (and fused multiply-adds) as the batch rows.
    m = float(window.sum()) / w
    dev = window - m
    s = math.sqrt(float(np.einsum("i,i->", dev, dev)) / w)
    # The batch code's flat-window rule: identical values give exactly (value, 0).
    if not (s > 1e-9 * abs(m)) and bool((window == window[0]).all()):
        return float(window[0]), 0.0
    return m, s


class _Window:
    """The last `size` values as a contiguous view in time order: a doubled ring (O(1) push, no copy)."""

    __slots__ = ("buf", "count", "pos", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = np.zeros(2 * size)
        self.pos = 0
        self.count = 0

    def push(self, x: float) -> None:
        """Append x, dropping the oldest value beyond `size`."""
        p = self.pos
        self.buf[p] = x
        self.buf[p + self.size] = x
        self.pos = p + 1 if p + 1 < self.size else 0
        if self.count < self.size:
            self.count += 1

    @property
    def full(self) -> bool:
        """Whether `size` values have been pushed."""
        return self.count == self.size

    def view(self) -> np.ndarray:
        """The last `size` values (size,), oldest first (only meaningful once full)."""
        return self.buf[self.pos : self.pos + self.size]


class _Ewm:
    """pandas `Series.ewm(com=com, adjust=False, min_periods=min_periods).mean()`, one value at a time.

    Same operations as pandas' Cython loop (ignore_na=False), so the values are bit-identical.
    """

    __slots__ = ("alpha", "factor", "min_periods", "nobs", "old_wt", "weighted")

    def __init__(self, com: float, min_periods: int = 0) -> None:
        self.alpha = 1.0 / (1.0 + com)
        self.factor = 1.0 - self.alpha
        self.min_periods = max(int(min_periods), 1)
        self.weighted = NAN
        self.old_wt = 1.0
        self.nobs = 0

    def step(self, x: float) -> float:
        """Feed one value (NaN = missing); the average, NaN before min_periods observations."""
        observed = x == x
        self.nobs += observed
        w = self.weighted
        if w == w:
            self.old_wt *= self.factor
            if observed:
                if w != x:
                    self.weighted = (self.old_wt * w + self.alpha * x) / (self.old_wt + self.alpha)
                self.old_wt = 1.0
        elif observed:
            self.weighted = x
        return self.weighted if self.nobs >= self.min_periods else NAN


def _alpha_com(alpha: float) -> float:
    """pandas' centre of mass for ewm(alpha=...)."""
    return (1.0 - alpha) / alpha


def _span_com(span: int) -> float:
    """pandas' centre of mass for ewm(span=...)."""
    return float((span - 1) / 2)


class _Wilder:
    """`indicators._wilder`: NaN before `seed_row`, the seed (mean of the values collected) there, then Wilder."""

    __slots__ = ("collect_from", "collected", "ewm", "row", "seed_row", "window")

    def __init__(self, window: int, seed_row: int, collect_from: int) -> None:
        self.window, self.seed_row, self.collect_from = window, seed_row, collect_from
        self.ewm = _Ewm(_alpha_com(1.0 / window))
        self.collected: list[float] = []
        self.row = -1

    def step(self, x: float) -> float:
        """Feed the value of the next row; the smoothed value (NaN before the seed row)."""
        self.row += 1
        if self.row < self.seed_row:
            if self.row >= self.collect_from:
                self.collected.append(x)
            return NAN
        if self.row == self.seed_row:
            self.collected.append(x)
            seed = _pairwise_sum(self.collected) / self.window
            self.collected = []
            return self.ewm.step(seed)
        return self.ewm.step(x)


class _RollingMean:
    """pandas `rolling(window, min_periods=window).mean()` (Kahan-compensated add/remove), bit-identical."""

    __slots__ = ("comp_add", "comp_remove", "neg_ct", "nobs", "prev", "same", "sum", "values", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.values: deque[float] = deque()
        self.nobs = self.neg_ct = self.same = 0
        self.sum = self.comp_add = self.comp_remove = 0.0
        self.prev = NAN

    def step(self, x: float) -> float:
        """Feed one value; the mean of the last `window` values (NaN while fewer)."""
        if len(self.values) == self.window:
            old = self.values.popleft()
            if old == old:
                self.nobs -= 1
                y = -old - self.comp_remove
                t = self.sum + y
                self.comp_remove = t - self.sum - y
                self.sum = t
                self.neg_ct -= math.copysign(1.0, old) < 0
        self.values.append(x)
        if x == x:
            self.nobs += 1
            y = x - self.comp_add
            t = self.sum + y
            self.comp_add = t - self.sum - y
            self.sum = t
            self.neg_ct += math.copysign(1.0, x) < 0
            self.same = self.same + 1 if x == self.prev else 1
            self.prev = x
        if self.nobs < self.window or self.nobs == 0:
            return NAN
        result = self.sum / self.nobs
        if self.same >= self.nobs:
            return self.prev
        if self.neg_ct == 0 and result < 0:
            return 0.0
        if self.neg_ct == self.nobs and result > 0:
            return 0.0
        return result


# ---------------------------------------------------------------------------------------------------
# Indicators: one object per indicator, `step(o, h, l, c, v)` -> tuple of outputs for that candle
# ---------------------------------------------------------------------------------------------------


class _Indicator(Protocol):
    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]: ...


class _LogRet:
    """ln(close_t / close_{t-k}); NaN for the first k rows."""

    def __init__(self, k: int) -> None:
        self.closes: deque[float] = deque(maxlen=k + 1)

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        self.closes.append(c)
        if len(self.closes) < self.closes.maxlen:  # type: ignore[operator]
            return (NAN,)
        return (_log(c / self.closes[0]),)


class _Shape:
    """body, upper_wick, lower_wick, range, all relative to the close."""

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        return ((c - o) / c, (h - max(o, c)) / c, (min(o, c) - lo) / c, (h - lo) / c)


class _Rsi:
    """ta's RSI rescaled to -1..1: Wilder averages of up/down moves (row 0 counts as a zero move)."""

    def __init__(self, window: int) -> None:
        self.up = _Ewm(_alpha_com(1.0 / window), window)
        self.down = _Ewm(_alpha_com(1.0 / window), window)
        self.prev = NAN

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        diff = c - self.prev
        self.prev = c
        up = self.up.step(diff if diff > 0 else 0.0)
        down = self.down.step(-(diff if diff < 0 else 0.0))
        rsi = 100.0 if down == 0 else 100 - (100 / (1 + _div(up, down)))
        return ((rsi - 50.0) / 50.0,)


class _Stoch:
    """ta's stochastic %K rescaled to -1..1; a flat window (0/0) is 0."""

    def __init__(self, window: int) -> None:
        self.lows: deque[float] = deque(maxlen=window)
        self.highs: deque[float] = deque(maxlen=window)

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        self.lows.append(lo)
        self.highs.append(h)
        if len(self.lows) < self.lows.maxlen:  # type: ignore[operator]
            return (NAN,)
        smin, smax = min(self.lows), max(self.highs)
        k = (_div(100 * (c - smin), smax - smin) - 50.0) / 50.0
        return (0.0 if k != k else k,)


class _Macd:
    """ta's MACD histogram (macd - signal) relative to the close."""

    def __init__(self, fast: int, slow: int, sign: int) -> None:
        self.fast = _Ewm(_span_com(fast), fast)
        self.slow = _Ewm(_span_com(slow), slow)
        self.signal = _Ewm(_span_com(sign), sign)

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        macd = self.fast.step(c) - self.slow.step(c)
        return ((macd - self.signal.step(macd)) / c,)


class _Cci:
    """`indicators.commodity_channel_index` / scale; a flat window (0/0) is 0."""

    def __init__(self, window: int, constant: float, scale: float) -> None:
        self.window, self.constant, self.scale = window, constant, scale
        self.mean = _RollingMean(window)
        self.tps = _Window(window)

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        tp = (h + lo + c) / 3.0
        self.tps.push(tp)
        deviation = tp - self.mean.step(tp)
        if not self.tps.full:
            return (NAN,)
        tps = self.tps.view()
        # Mean absolute deviation as ta's np.mean(np.abs(x - np.mean(x))), numpy's summation order.
        m = float(tps.sum()) / self.window
        mad = float(np.abs(tps - m).sum()) / self.window
        cci = _div(deviation, self.constant * mad) / self.scale
        return (0.0 if cci != cci else cci,)


class _Mfi:
    """`indicators.money_flow_index` rescaled to -1..1 (row 0 is a zero flow); no flow either way is 0."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.flows: deque[float] = deque(maxlen=window)
        self.prev_tp = NAN

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        tp = (h + lo + c) / 3.0
        up_down = 1.0 if tp > self.prev_tp else (-1.0 if tp < self.prev_tp else 0.0)
        self.prev_tp = tp
        self.flows.append(tp * v * up_down)
        if len(self.flows) < self.window:
            return (NAN,)
        pos = _pairwise_sum([f if f >= 0.0 else 0.0 for f in self.flows])
        neg = abs(_pairwise_sum([f if f < 0.0 else 0.0 for f in self.flows]))
        mfi = (100 - (100 / (1 + _div(pos, neg))) - 50.0) / 50.0
        return (0.0 if mfi != mfi else mfi,)


class _Adx:
    """`indicators.average_directional_index`: (ADX / 100, (+DI - -DI) / 100)."""

    def __init__(self, window: int) -> None:
        self.window = window
        # Smoothed TR, +DM, -DM seeded at row `window` with the mean of rows 1..window.
        self.tr, self.pos, self.neg = (_Wilder(window, window, 1) for _ in range(3))
        # ADX seeded at row 2*window - 1 with the mean of DX over rows window..2*window-1.
        self.adx = _Wilder(window, 2 * window - 1, window)
        self.prev: tuple[float, float, float] | None = None

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        if self.prev is None:
            tr = pos = neg = NAN
        else:
            ph, pl, pc = self.prev
            tr = max(h, pc) - min(lo, pc)
            up, down = h - ph, pl - lo
            pos = up if (up > down and up > 0) else 0.0
            neg = down if (down > up and down > 0) else 0.0
        self.prev = (h, lo, c)
        s_tr, s_pos, s_neg = self.tr.step(tr), self.pos.step(pos), self.neg.step(neg)
        if s_tr != s_tr:  # before the seed row: DI and DX are NaN
            self.adx.step(NAN)
            return (NAN, NAN)
        di_pos = 100 * (s_pos / s_tr) if s_tr != 0 else 0.0
        di_neg = 100 * (s_neg / s_tr) if s_tr != 0 else 0.0
        di_sum = di_pos + di_neg
        dx = 100 * abs((di_pos - di_neg) / di_sum) if di_sum != 0 else 0.0
        return (self.adx.step(dx) / 100.0, (di_pos - di_neg) / 100.0)


class _Atr:
    """`indicators.average_true_range` relative to the close (row 0's true range is high - low)."""

    def __init__(self, window: int) -> None:
        self.atr = _Wilder(window, window - 1, 0)
        self.prev_close = NAN

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        pc = self.prev_close
        self.prev_close = c
        tr = h - lo if pc != pc else max(h - lo, abs(h - pc), abs(lo - pc))
        return (self.atr.step(tr) / c,)


class _Bollinger:
    """(2 %B - 1, band width / middle band); %B of a flat window is 0."""

    def __init__(self, window: int, dev: float) -> None:
        self.dev = dev
        self.closes = _Window(window)

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        self.closes.push(c)
        if not self.closes.full:
            return (NAN, NAN)
        mavg, mstd = _mean_std(self.closes.view())
        hband = mavg + self.dev * mstd
        lband = mavg - self.dev * mstd
        pband = (c - lband) / (hband - lband) if hband != lband else NAN
        pband = 2.0 * pband - 1.0
        return (0.0 if pband != pband else pband, ((hband - lband) / mavg) * 100 / 100.0)


def _zscore(x: float, window: np.ndarray) -> float:
    """`features._rolling_zscore` of the window's last value x: (x - mean) / std, 0 where std == 0."""
    mean, std = _mean_std(window)
    return 0.0 if std == 0.0 else _div(x - mean, std)


class _CloseZ:
    """Z-score of the close in its last `window` closes."""

    def __init__(self, window: int) -> None:
        self.closes = _Window(window)

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        self.closes.push(c)
        if not self.closes.full:
            return (NAN,)
        return (_zscore(c, self.closes.view()),)


class _VolumeZ:
    """`features._volume_z`: z-score of the floored log volume in its last `window` values."""

    def __init__(self, window: int, floor: float) -> None:
        self.floor = floor
        self.volumes: deque[float] = deque(maxlen=window)
        self.logs = _Window(window)

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        self.volumes.append(v)
        if len(self.volumes) < self.volumes.maxlen:  # type: ignore[operator]
            log_vol = NAN  # no floor reference yet
        else:
            ref = max(self.volumes)
            log_vol = 0.0 if ref == 0.0 else _log(max(v, self.floor * ref))
        self.logs.push(log_vol)
        if not self.logs.full:
            return (NAN,)
        return (_zscore(log_vol, self.logs.view()),)


class _EmaRatio:
    """close / EMA(close) - 1 (ta's EMAIndicator: span, adjust=False)."""

    def __init__(self, window: int) -> None:
        self.ema = _Ewm(_span_com(window), window)

    def step(self, o: float, h: float, lo: float, c: float, v: float) -> tuple[float, ...]:
        return (c / self.ema.step(c) - 1.0,)


# name -> (key of the indicator, which may be shared; its factory from params; index of the output)
_Plan = tuple[str, Callable[[dict[str, Any]], _Indicator], int]
_PLANS: dict[str, _Plan] = {
    "body": ("shape", lambda p: _Shape(), 0),
    "upper_wick": ("shape", lambda p: _Shape(), 1),
    "lower_wick": ("shape", lambda p: _Shape(), 2),
    "range": ("shape", lambda p: _Shape(), 3),
    "rsi": ("rsi", lambda p: _Rsi(p["rsi_window"]), 0),
    "stoch_k": ("stoch", lambda p: _Stoch(p["stoch_window"]), 0),
    "macd_diff": ("macd", lambda p: _Macd(p["macd_fast"], p["macd_slow"], p["macd_signal"]), 0),
    "cci": ("cci", lambda p: _Cci(p["cci_window"], p["cci_constant"], p["cci_scale"]), 0),
    "mfi": ("mfi", lambda p: _Mfi(p["mfi_window"]), 0),
    "adx": ("adx", lambda p: _Adx(p["adx_window"]), 0),
    "di_diff": ("adx", lambda p: _Adx(p["adx_window"]), 1),
    "atr": ("atr", lambda p: _Atr(p["atr_window"]), 0),
    "bb_pband": ("bollinger", lambda p: _Bollinger(p["bb_window"], p["bb_dev"]), 0),
    "bb_width": ("bollinger", lambda p: _Bollinger(p["bb_window"], p["bb_dev"]), 1),
    "close_z": ("close_z", lambda p: _CloseZ(p["zscore_window"]), 0),
    "volume_z": ("volume_z", lambda p: _VolumeZ(p["volume_window"], p["volume_floor"]), 0),
    "ema_ratio": ("ema", lambda p: _EmaRatio(p["ema_window"]), 0),
}


def _plan(name: str) -> _Plan:
    """The plan of one feature name (`logret_<k>` for any k >= 1)."""
    match = _LOGRET.fullmatch(name)
    if match:
        k = int(match.group(1))
        return (name, lambda p: _LogRet(k), 0)
    try:
        return _PLANS[name]
    except KeyError:
        raise ValueError(f"no incremental version of feature {name!r}") from None


# ---------------------------------------------------------------------------------------------------
# Window aggregate of standardised rows
# ---------------------------------------------------------------------------------------------------


class WindowAggregate:
    """[mean, std ddof 0, last] of the last `window` rows of (N,) vectors, O(N) per row.

    Running sums of d = row - shift and d^2 over the window; `shift` is reset to the window mean and the sums
    recomputed from the window every `window` rows, so the variance has no cancellation and rounding cannot
    accumulate. A window with fewer than `window` rows or any non-finite value has no aggregate.
    """

    def __init__(self, window: int, n: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self.rows = np.zeros((self.window, n))
        """Ring buffer (window, N) of the rows; non-finite rows are stored as zeros (counted in `bad`)."""
        self.terms = np.zeros((self.window, 2, n))
        """Ring buffer (window, 2, N) of each row's [d, d^2]; zeros for a non-finite row (adds nothing)."""
        self.finite = [False] * self.window
        self.pos = 0
        self.count = 0
        self.bad = 0
        self.shift = np.zeros(n)
        self.sums = np.zeros((2, n))
        """(2, N): [sum d, sum d^2] over the window."""
        self.last = np.zeros(n)

    def push(self, row: np.ndarray) -> None:
        """Append one row (N,) float64, dropping the oldest beyond `window`."""
        i = self.pos
        if self.count == self.window:
            self.sums -= self.terms[i]  # a non-finite row's terms are zeros
            self.bad -= not self.finite[i]
        else:
            self.count += 1
        # A finite sum proves every value finite (cheaper than isfinite().all()); otherwise check exactly,
        # since a sum can also overflow.
        ok = math.isfinite(float(row.sum())) or bool(np.isfinite(row).all())
        self.finite[i] = ok
        self.last = row
        terms = self.terms[i]
        if ok:
            self.rows[i] = row
            np.subtract(row, self.shift, out=terms[0])
            np.multiply(terms[0], terms[0], out=terms[1])
            self.sums += terms
        else:
            self.rows[i] = 0.0
            terms[:] = 0.0
            self.bad += 1
        self.pos = i + 1 if i + 1 < self.window else 0
        if self.pos == 0:
            self._resync()

    def _resync(self) -> None:
        """Recompute the terms and sums from the window's rows, shifted by their mean (once per `window` rows)."""
        # Called when the ring is full (pos wrapped to 0).
        finite = np.array(self.finite)
        if finite.any():
            self.shift = self.rows[finite].mean(axis=0)
        d = self.rows - self.shift
        d[~finite] = 0.0
        self.terms[:, 0] = d
        self.terms[:, 1] = d * d
        self.sums = self.terms.sum(axis=0)

    def aggregate(self, dtype: type = np.float64) -> np.ndarray | None:
        """[mean (N), std (N), last (N)] (3N,) of `dtype`, or None if the window is incomplete or not finite."""
        if self.count < self.window or self.bad:
            return None
        n = self.shift.shape[0]
        moments = self.sums / self.window
        m, var = moments[0], moments[1]
        var -= m * m
        np.maximum(var, 0.0, out=var)  # rounding can leave a tiny negative variance
        out = np.empty(3 * n, dtype=dtype)
        out[:n] = self.shift + m
        out[n : 2 * n] = np.sqrt(var)
        out[2 * n :] = self.last
        return out


# ---------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------


def _candle_values(candles: pd.DataFrame | CandleBatch | np.ndarray) -> np.ndarray:
    """Candles as an (n, 5) float64 array of open, high, low, close, volume (batch, DataFrame columns or array)."""
    if isinstance(candles, CandleBatch):
        return np.asarray(candles.values, dtype=np.float64)
    if not isinstance(candles, np.ndarray) and hasattr(candles, "columns"):  # a DataFrame (pandas not imported)
        missing = [c for c in VALUE_COLUMNS if c not in candles.columns]
        if missing:
            raise ValueError(f"candles lack columns {missing}")
        return np.column_stack([candles[c].to_numpy(dtype=np.float64) for c in VALUE_COLUMNS])
    values = np.asarray(candles, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(VALUE_COLUMNS):
        raise ValueError(f"expected (n, 5) open, high, low, close, volume, got shape {values.shape}")
    return values


def _newest_ts_ms(candles: pd.DataFrame | CandleBatch | np.ndarray) -> int | None:
    """The newest open time of a batch or of a DataFrame with a ts_ms column; None for a bare array or no rows."""
    if isinstance(candles, CandleBatch):
        return int(candles.ts_ms[-1]) if len(candles) else None
    if hasattr(candles, "columns") and "ts_ms" in candles.columns and len(candles):
        return int(candles["ts_ms"].iloc[-1])
    return None


class IncrementalFeatures:
    """`compute_features` and the newest candle's observation, one candle at a time.

    Feed every closed candle once, in time order, with `update` (or `update_candle`); `rebuild(candles)` resets
    the state to that history (at start, after a gap backfill). The features after candles c_0..c_t are
    `compute_features(c_0..c_t)[t]`. With a standardizer, `observation()` is the newest candle's
    (macro, micro), as `build_observations` on the same candles.
    """

    def __init__(
        self,
        spec: FeatureSpec | None = None,
        standardizer: Standardizer | None = None,
        macro_window: int = MACRO_WINDOW,
        micro_window: int = MICRO_WINDOW,
        candles: pd.DataFrame | CandleBatch | np.ndarray | None = None,
    ) -> None:
        self.spec = spec or default_feature_spec()
        self.standardizer = standardizer
        if standardizer is not None and standardizer.mean.shape != (self.spec.n_features,):
            raise ValueError(f"standardizer has {standardizer.mean.shape[0]} features, spec {self.spec.n_features}")
        self.macro_window, self.micro_window = int(macro_window), int(micro_window)
        self._plans = [_plan(name) for name in self.spec.names]
        self._first_row = warmup_candles(self.spec) - 1
        if standardizer is not None:
            # The exact arithmetic of Standardizer.transform, with the floored std computed once.
            self._z_mean = standardizer.mean
            self._z_std = np.maximum(standardizer.std, STD_FLOOR)
        self.reset()
        if candles is not None:
            self.rebuild(candles)

    @property
    def n_features(self) -> int:
        """Number of features N."""
        return self.spec.n_features

    @property
    def rows_seen(self) -> int:
        """Candles fed since the last reset/rebuild (the batch row index of the newest one, plus one)."""
        return self._row + 1

    @property
    def last_ts_ms(self) -> int | None:
        """Open time of the newest candle fed with a ts_ms (None if none was given since the last reset)."""
        return self._last_ts_ms

    def reset(self) -> None:
        """Forget every candle: the state of an empty history."""
        indicators: dict[str, _Indicator] = {}
        for key, make, _ in self._plans:
            if key not in indicators:
                indicators[key] = make(self.spec.params)
        self._indicators = list(indicators.values())
        order = list(indicators)
        self._picks = [(order.index(key), j) for key, _, j in self._plans]
        self._row = -1
        self._last_ts_ms: int | None = None
        self._features = np.full(self.n_features, np.nan)
        n = self.n_features
        self._macro = WindowAggregate(self.macro_window, n) if self.standardizer is not None else None
        self._micro = WindowAggregate(self.micro_window, n) if self.standardizer is not None else None

    def rebuild(self, candles: pd.DataFrame | CandleBatch | np.ndarray) -> np.ndarray:
        """Reset and feed `candles` (CandleBatch, DataFrame with OHLCV columns, or (n, 5) array); features (n, N).

        O(n) (about 75 us per candle); a batch's ts_ms, or a DataFrame's ts_ms column, sets `last_ts_ms`.
        """
        self.reset()
        values = _candle_values(candles)
        out = np.empty((len(values), self.n_features))
        for i, (o, h, lo, c, v) in enumerate(values.tolist()):
            out[i] = self.update(o, h, lo, c, v)
        newest = _newest_ts_ms(candles)
        if newest is not None:
            self._last_ts_ms = newest
        return out

    def update(
        self, open_: float, high: float, low: float, close: float, volume: float, ts_ms: int | None = None
    ) -> np.ndarray:
        """Feed the next closed candle; its feature row (N,) float64 (compute_features' row; NaN in warm-up).

        With ts_ms, a candle not newer than the last one fed raises ValueError (fed twice or out of order).
        """
        if ts_ms is not None:
            if self._last_ts_ms is not None and ts_ms <= self._last_ts_ms:
                raise ValueError(f"candle {ts_ms} is not newer than the last one fed ({self._last_ts_ms})")
            self._last_ts_ms = int(ts_ms)
        self._row += 1
        outs = [ind.step(open_, high, low, close, volume) for ind in self._indicators]
        if self._row < self._first_row:
            row = np.full(self.n_features, np.nan)
        else:
            row = np.array([outs[i][j] for i, j in self._picks])
        self._features = row
        if self._macro is not None and self._micro is not None:
            z = (row - self._z_mean) / self._z_std
            self._macro.push(z)
            self._micro.push(z)
        return row.copy()

    def update_candle(self, candle: Any) -> np.ndarray:
        """`update` from an object with ts_ms, open, high, low, close, volume attributes (e.g. the feed's Candle)."""
        return self.update(candle.open, candle.high, candle.low, candle.close, candle.volume, ts_ms=candle.ts_ms)

    @property
    def features(self) -> np.ndarray:
        """The newest candle's feature row (N,) (NaN before any candle and in warm-up); a copy."""
        return self._features.copy()

    def observation(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(macro, micro) float32 (3N,) each of the newest candle, or None (window incomplete or not finite)."""
        if self._macro is None or self._micro is None:
            raise ValueError("IncrementalFeatures was built without a standardizer: no observation")
        macro = self._macro.aggregate(np.float32)
        micro = self._micro.aggregate(np.float32) if macro is not None else None
        if macro is None or micro is None:
            return None
        return macro, micro
