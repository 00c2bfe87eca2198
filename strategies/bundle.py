"""A trained policy with everything that feeds it (`ModelBundle`), and what it decides: the observation of the
newest candle in a window (the daemon) and its probabilities and backtest over a period (backtest, training,
evaluation). Pure: candles and arrays in, arrays and results out (docs/design.md §3, §4, §7).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from strategies.actions import HOLD
from strategies.backtest import BacktestResult, period_rows, run_backtest
from strategies.candles import CANDLE_MS
from strategies.features import (
    MACRO_WINDOW,
    MICRO_WINDOW,
    FeatureSpec,
    Observations,
    Standardizer,
    compute_features,
    default_feature_spec,
    first_valid_row,
    fit_standardizer,
    last_observation,
)
from strategies.objectives import is_decision_candle
from strategies.policy import N_ACTIONS, PolicyNet, probs_for_all_positions

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_INITIAL_CASH = 10_000.0


class PeriodError(ValueError):
    """A period cannot be backtested as asked (no candles, too little warm-up, undefined features)."""


@dataclass
class ModelBundle:
    """A policy with everything needed to feed it and to keep training it."""

    model: PolicyNet
    spec: FeatureSpec
    standardizer: Standardizer
    position_mode: str
    commission: float
    macro_window: int = MACRO_WINDOW
    micro_window: int = MICRO_WINDOW
    decide_every: int = 1
    """K: the policy decides only at closes whose 5-minute index since the epoch is divisible by K."""
    # rhythm: schedule ("asymmetric"|"symmetric"), macro_every, k (updates done), macro_updates
    rhythm: dict[str, Any] = field(
        default_factory=lambda: {"schedule": "asymmetric", "macro_every": 11, "k": 0, "macro_updates": 0}
    )
    optimizers: dict[str, Any] | None = None  # {"macro": state_dict, "rest": state_dict}
    train_config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def objective(self) -> str:
        """The training objective (strategies/objectives.py); checkpoints from before objectives are `card`."""
        return str(self.train_config.get("objective", "card"))

    @property
    def n_features(self) -> int:
        """Per-candle feature count N."""
        return self.model.n_features

    def version(self) -> str:
        """A short content hash of the weights: names a model in logs and the state database."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().numpy().tobytes())
        return h.hexdigest()[:12]


def history_needed(bundle: ModelBundle) -> int:
    """Candles needed for one observation: first_valid_row(spec, macro window) + 1 (1265 by default)."""
    return first_valid_row(bundle.spec, bundle.macro_window) + 1


def observe(candles: pd.DataFrame, bundle: ModelBundle) -> tuple[np.ndarray, np.ndarray] | None:
    """The observation (macro, micro), float32 (3N,) each, of the last candle of `candles`; None if not valid.

    Features are computed on exactly these candles, standardised with the checkpoint's statistics, and only
    the last row is aggregated ([mean, std ddof 0, last] over the last W and w rows), so the result is a pure
    function of the window: equal to `build_observations` on the whole history up to ~1e-6 (EWM seeds).
    """
    z = bundle.standardizer.transform(compute_features(candles, bundle.spec))
    return last_observation(z, bundle.macro_window, bundle.micro_window)


def random_bundle(seed: int, features: np.ndarray, fit_rows: slice, mode: str, commission: float) -> ModelBundle:
    """A randomly initialised policy; its standardisation is fitted on `fit_rows` (the warm-up before --from)."""
    spec = default_feature_spec()
    torch.manual_seed(seed)
    model = PolicyNet(len(spec.names)).eval()
    return ModelBundle(
        model=model,
        spec=spec,
        standardizer=fit_standardizer(features, fit_rows),
        position_mode=mode,
        commission=commission,
        metadata={"random_init_seed": seed},
    )


def period_probs(bundle: ModelBundle, obs: Observations, i0: int, i1: int) -> np.ndarray:
    """Eval-mode probabilities (i1-i0, 3, 3) for the decisions at the closes of candles i0-1 .. i1-2."""
    _check_period_rows(bundle, obs, i0, i1)
    # Row slices are views (rows i0-1 .. i1-2 are contiguous): no copy of the observation matrices.
    return _probs(bundle, obs.macro[i0 - 1 : i1 - 1], obs.micro[i0 - 1 : i1 - 1])


def _check_period_rows(bundle: ModelBundle, obs: Observations, i0: int, i1: int) -> None:
    """PeriodError unless the observations of the decision rows i0-1 .. i1-2 are all valid."""
    if i0 < 1 or not obs.valid[i0 - 1]:
        first = int(np.argmax(obs.valid)) if obs.valid.any() else None
        need = "more history than the file holds" if first is None else f"the first usable decision is row {first}"
        raise PeriodError(
            f"not enough warm-up before the period start: the first decision needs "
            f"{bundle.macro_window} candles of valid features before it ({need}); start later or add history"
        )
    valid = obs.valid[i0 - 1 : i1 - 1]
    if not valid.all():
        bad = i0 - 1 + int(np.argmin(valid))
        raise PeriodError(f"features are undefined inside the period (row {bad}); the file may have a gap")


def _probs(bundle: ModelBundle, macro: np.ndarray, micro: np.ndarray) -> np.ndarray:
    """Probabilities (m, 3, 3) float64 from float32 observations (m, 3N) x2."""
    return probs_for_all_positions(bundle.model, torch.from_numpy(macro), torch.from_numpy(micro)).double().numpy()


def decision_probs(bundle: ModelBundle, obs: Observations, ts_ms: np.ndarray, i0: int, i1: int) -> np.ndarray:
    """`period_probs`, with the network run only at decision candles: (i1-i0, 3, 3).

    With decide_every K > 1 the policy acts at one candle in K and holds at the others (run_backtest
    imposes HOLD there); those rows are HOLD with probability 1 here, which saves (K-1)/K of the network.
    ts_ms: (n,) open times of all candles (the rows of obs).
    """
    if bundle.decide_every <= 1:
        return period_probs(bundle, obs, i0, i1)
    _check_period_rows(bundle, obs, i0, i1)
    # As run_backtest: decision k is keyed by the candle before period candle k (its open minus 5 minutes).
    decides = np.asarray(is_decision_candle(np.asarray(ts_ms[i0:i1], dtype=np.int64) - CANDLE_MS, bundle.decide_every))
    rows = np.flatnonzero(decides)
    probs = np.zeros((i1 - i0, 3, N_ACTIONS))
    probs[:, :, HOLD] = 1.0
    if rows.size:
        probs[rows] = _probs(bundle, obs.macro[i0 - 1 + rows], obs.micro[i0 - 1 + rows])
    return probs


def backtest_period(
    bundle: ModelBundle,
    candles: pd.DataFrame,
    obs: Observations,
    from_ms: int,
    to_ms: int,
    *,
    greedy: bool,
    seed: int,
    commission: float | None = None,
    slippage_bps: float = 0.0,
    initial_cash: float = DEFAULT_INITIAL_CASH,
) -> BacktestResult:
    """Backtest `bundle` on the candles with open times in [from_ms, to_ms); `obs` cover `candles` row by row."""
    ts = candles["ts_ms"].to_numpy()
    i0, i1 = period_rows(ts, from_ms, to_ms)
    if i1 <= i0:
        raise PeriodError("the period holds no candles of the data file")
    probs = decision_probs(bundle, obs, ts, i0, i1)
    return run_backtest(
        probs,
        ts[i0:i1],
        candles["open"].to_numpy()[i0:i1],
        candles["close"].to_numpy()[i0:i1],
        mode=bundle.position_mode,
        commission=bundle.commission if commission is None else commission,
        slippage_bps=slippage_bps,
        greedy=greedy,
        seed=seed,
        initial_cash=initial_cash,
        decide_every=bundle.decide_every,
    )
