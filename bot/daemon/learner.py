"""The online learner: one REINFORCE update per closed episode, under the 1:10 rhythm, with versioned checkpoints.

An episode is L consecutive decisions of the daemon itself (K candles apart under a checkpoint's
`decide_every`). Its hyperparameters come from the checkpoint's own training config
(`TrainConfig.from_dict(bundle.train_config)`: gamma, learning rates, objective, group size, volatility
window...; checkpoints from before those fields give the card's 0.99, 1e-4 and 5e-4). MacroNet learns only
when `k % macro_every == 0`. The dropout masks (and the counterfactual rollouts' uniforms) are seeded by
(seed, k), so an update redone after a crash is bit for bit the one an uninterrupted run made.

How an episode becomes a gradient depends on the checkpoint's objective (the update's `method`):
  card          `policy_gradient_step` on the lived episode alone: discounted returns normalised over its
                steps (the card's update, bit for bit what ritmo always did).
  expected_pnl  `expected_pnl_step` on the lived episode's observations and its stored prices (decision
                close -> next open -> settling close): the exact expected P&L of the sampling policy, as
                in training (which starts its position chain flat; so does this).
  the others    (group) M = max(group_size, 2) counterfactual rollouts resampled from the current policy over
                the lived episode's own observations and price path (decision closes, next opens, settling
                closes, all stored per step), starting from the position the episode started in, with the
                objective's shaped rewards and the leave-one-out advantage. The market's move is common to
                the group and cancels, so one lived episode still gives a usable gradient.
Episodes stored before the prices were (schema < 3), or without the volatility the objective needs, fall back
to the card update (card_fallback). Outside `card`, the entropy bonus and trade floor are the checkpoint's
exploration schedule at k (online k continues training's counter, so normally its end values) and its
gradient clipping applies; the rollouts and expected P&L pay RITMO_COMMISSION (and the rollouts the slippage).

The learning guard: after an update is applied, the new policy is measured on the episode's observations
(the position state of each step): its mean entropy in nats and its largest probability of an action that
changes the position. An update that takes either figure from at or above its floor to below it
(`RITMO_GUARD_MIN_ENTROPY`, `RITMO_GUARD_MIN_TRADE_PROB`), or leaves a non-finite weight, is rolled back:
model and both optimisers restored, no checkpoint written (status rolled_back). A policy that was already
under a floor before the update (the collapsed card checkpoints) is not held to it, or every update would
be rolled back. A non-finite loss or gradient steps nothing at all (status rejected).

Optimisers: Adam at the checkpoint's lr_macro (MacroNet) and lr_rest (MicroNet + head), persisted in every
online checkpoint. The online optimisers start fresh from a training checkpoint: its Adam moments were
estimated on batches of 128 episodes and their scale does not carry over to single-episode gradients; they
continue across online checkpoints.

Checkpoints: the updated model is written atomically (temporary file, fsync, rename) as
`<dir>/online-<k:06d>.pt` and only THEN recorded in the state database, in one transaction with the
update row and the rhythm counter. So the database never references a file that is not complete; a file
the database does not reference (a crash between the two) is an orphan, deleted on start, and its update
is simply redone. On start the newest referenced checkpoint that loads is used (falling back to the
previous ones), else `RITMO_CHECKPOINT`. Only the newest `keep` online checkpoints stay on disk.
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from bot.daemon.state import EpisodeBatch, StateStore
from bot.errors import CheckpointError, ConfigError
from bot.files.checkpoints import load_checkpoint, save_checkpoint
from strategies.bundle import ModelBundle
from strategies.env import VectorTradingEnv
from strategies.objectives import NEEDS_VOLATILITY, advantages
from strategies.optim import Adam
from strategies.policy import PolicyNet, probs_for_all_positions
from strategies.trainer import (
    Rollout,
    StepStats,
    TrainConfig,
    UpdateContext,
    changes_position_table,
    config_rewards,
    dropout_seed,
    expected_objective_step,
    is_macro_update,
    make_optimizers,
    policy_gradient_step,
    sample_rollout,
    sampled_objective_step,
)

log = structlog.get_logger(__name__)

SCHEDULE = "asymmetric"
_ONLINE_RE = re.compile(r"^online-(\d{6,})\.pt$")
# Leftovers of save_checkpoint's temporary files (a crash mid-write).
_TMP_RE = re.compile(r"^\.online-\d+\.pt\..*\.tmp$")


def rollout_seed(seed: int, k: int) -> int:
    """The seed of update k's counterfactual uniforms: (seed, k) like the dropout's, in a disjoint range."""
    return dropout_seed(seed, k) + (1 << 40)


def checkpoint_name(k: int) -> str:
    """File name of the checkpoint written by online update k."""
    return f"online-{int(k):06d}.pt"


@dataclass(frozen=True)
class LoadedModel:
    """The model the daemon starts with and where it came from."""

    bundle: ModelBundle
    path: Path
    source: str
    """online (a checkpoint the state references) or initial (RITMO_CHECKPOINT / --checkpoint)."""
    version: str


@dataclass(frozen=True)
class LearningGuard:
    """Floors of the learning guard; an update that pushes the policy under one is rolled back (0 = off)."""

    min_entropy: float = 0.05
    """mean policy entropy over the episode's steps, nats (a uniform policy has ln 3 = 1.0986)"""
    min_trade_prob: float = 0.001
    """largest probability, over the episode's steps, of an action that changes the position"""


@dataclass(frozen=True)
class PolicyHealth:
    """The guard's two figures for one policy on one episode's observations."""

    entropy: float
    max_trade_prob: float

    def is_finite(self) -> bool:
        """Whether both figures are finite numbers."""
        return math.isfinite(self.entropy) and math.isfinite(self.max_trade_prob)


@dataclass(frozen=True)
class UpdateOutcome:
    """What one online update did."""

    k: int
    episode_id: int
    status: str  # learned | rejected | rolled_back
    learn_macro: bool
    loss: float
    applied: bool
    steps: int
    checkpoint_path: str | None
    model_version: str
    wall_ms: float
    reason: str | None = None
    method: str = "card"
    """card (the lived episode alone), group (counterfactual rollouts) or card_fallback (no stored prices)"""
    before: PolicyHealth | None = None
    """the guard's figures of the policy before the update"""
    after: PolicyHealth | None = None
    """... and after it (for a rolled-back update: of the policy that was discarded)"""

    @property
    def parts(self) -> list[str]:
        """The parts that learned (or would have)."""
        return ["macro", "micro", "head"] if self.learn_macro else ["micro", "head"]


class OnlineLearner:
    """Owns the acting model, both Adam optimisers and the online checkpoint directory."""

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        checkpoint_dir: Path,
        seed: int,
        macro_every: int,
        keep: int,
        optimizer_state: dict[str, Any] | None = None,
        learning: bool = True,
        guard: LearningGuard | None = None,
        commission: float | None = None,
        slippage_bps: float = 0.0,
    ) -> None:
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.train_config = TrainConfig.from_dict(bundle.train_config)
        self.guard = guard if guard is not None else LearningGuard()
        # The counterfactual rollouts pay what the daemon's own fills pay (RITMO_COMMISSION, RITMO_SLIPPAGE_BPS).
        self.commission = float(bundle.commission if commission is None else commission)
        self.slippage_bps = float(slippage_bps)
        self.change_table = changes_position_table(bundle.position_mode)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.seed = int(seed)
        self.macro_every = int(macro_every)
        self.keep = int(keep)
        self._optimizer_state = optimizer_state
        self._optimizers: tuple[Adam, Adam] | None = None
        if learning:
            # Built at start-up when learning is on. strategies.optim.Adam (bit-identical to torch's) because
            # torch.optim.Adam imports torch._dynamo and sympy, ~73 MB and ~3 s the daemon has no use for.
            self._ensure_optimizers()
        self.version = bundle.version()

    def _ensure_optimizers(self) -> tuple[Adam, Adam]:
        if self._optimizers is None:
            opt_macro, opt_rest = make_optimizers(self.model, self.train_config)
            if self._optimizer_state is not None:
                opt_macro.load_state_dict(self._optimizer_state["macro"])
                opt_rest.load_state_dict(self._optimizer_state["rest"])
            self._optimizers = (opt_macro, opt_rest)
        return self._optimizers

    @property
    def opt_macro(self) -> Adam:
        """Adam over MacroNet (the checkpoint's lr_macro, 1e-4 for the card)."""
        return self._ensure_optimizers()[0]

    @property
    def opt_rest(self) -> Adam:
        """Adam over MicroNet + decision head (the checkpoint's lr_rest, 5e-4 for the card)."""
        return self._ensure_optimizers()[1]

    @property
    def objective(self) -> str:
        """The checkpoint's training objective (card for checkpoints from before objectives)."""
        return self.bundle.objective

    def learn(self, batch: EpisodeBatch, k: int, macro_updates: int) -> UpdateOutcome:
        """Update k on one episode; on success the new model is saved (not yet recorded) and acts next."""
        t0 = time.perf_counter()
        learn_macro = is_macro_update(k, SCHEDULE, self.macro_every)
        steps = int(batch.actions.shape[0])
        saved = self._snapshot()
        before = self.health(batch)
        method = self.update_method(batch)
        stats = self._policy_step(batch, k, learn_macro, method)

        def outcome(status: str, reason: str | None, after: PolicyHealth | None, path: str | None) -> UpdateOutcome:
            wall = (time.perf_counter() - t0) * 1e3
            applied = status == "learned"
            return UpdateOutcome(
                k,
                batch.episode_id,
                status,
                learn_macro,
                stats.loss,
                applied,
                steps,
                path,
                self.version,
                wall,
                reason=reason,
                method=method,
                before=before,
                after=after,
            )

        if not (stats.applied and math.isfinite(stats.loss)):
            self._restore(saved)
            reason = "non-finite loss or gradient"
            log.error("update_rejected", k=k, episode_id=batch.episode_id, loss=stats.loss, reason=reason)
            return outcome("rejected", reason, None, None)
        finite_weights = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        after = self.health(batch)
        why = guard_verdict(before, after, self.guard, finite_weights=finite_weights)
        if why is not None:
            self._restore(saved)
            log.error(
                "update_rolled_back",
                k=k,
                episode_id=batch.episode_id,
                reason=why,
                method=method,
                loss=stats.loss,
                entropy_before=before.entropy,
                entropy_after=after.entropy,
                max_trade_prob_before=before.max_trade_prob,
                max_trade_prob_after=after.max_trade_prob,
                min_entropy=self.guard.min_entropy,
                min_trade_prob=self.guard.min_trade_prob,
            )
            return outcome("rolled_back", why, after, None)
        self.version = self.bundle.version()
        path = self._save(batch, k, macro_updates, learn_macro, stats.loss)
        return outcome("learned", None, after, str(path))

    def update_method(self, batch: EpisodeBatch) -> str:
        """card for the card objective; expected_pnl for it, group for the sampled others, when the episode
        carries the prices (and volatility) they need; else card_fallback."""
        if self.objective == "card":
            return "card"
        if batch.has_prices() and (self.objective not in NEEDS_VOLATILITY or batch.has_volatility()):
            return "expected_pnl" if self.objective == "expected_pnl" else "group"
        log.warning(
            "update_objective_fallback",
            episode_id=batch.episode_id,
            objective=self.objective,
            reason="steps without stored prices or volatility (recorded before schema v3?)",
        )
        return "card_fallback"

    def health(self, batch: EpisodeBatch) -> PolicyHealth:
        """The guard's figures of the current policy on the episode's observations and positions."""
        return policy_health(
            self.model,
            torch.from_numpy(batch.macro),
            torch.from_numpy(batch.micro),
            torch.from_numpy(batch.positions),
            self.change_table,
        )

    def _policy_step(self, batch: EpisodeBatch, k: int, learn_macro: bool, method: str) -> StepStats:
        cfg = self.train_config
        if method in ("card", "card_fallback"):
            return policy_gradient_step(
                self.model,
                self.opt_macro,
                self.opt_rest,
                macro_x=torch.from_numpy(batch.macro),
                micro_x=torch.from_numpy(batch.micro),
                positions=torch.from_numpy(batch.positions).reshape(1, -1),
                actions=torch.from_numpy(batch.actions).reshape(1, -1),
                advantages=advantages(torch.from_numpy(batch.rewards).reshape(1, -1), cfg.gamma),
                learn_macro=learn_macro,
                dropout_seed=dropout_seed(self.seed, k),
            )
        # The checkpoint's exploration schedule continues where training left it (online k continues its
        # counter): normally its end values, i.e. the final entropy bonus and no trade floor.
        ctx = UpdateContext(self.model, (self.opt_macro, self.opt_rest), cfg, k, self.seed, learn_macro)
        if method == "expected_pnl":
            macro_x, micro_x = torch.from_numpy(batch.macro), torch.from_numpy(batch.micro)
            gap_hold, mode = episode_fill_returns(batch), self.bundle.position_mode
            stats, _ = expected_objective_step(ctx, macro_x, micro_x, gap_hold, mode, self.commission)
            return stats
        generator = torch.Generator().manual_seed(rollout_seed(self.seed, k))
        ro, adv = counterfactual_group(
            self.model,
            batch,
            cfg,
            group_size=max(cfg.group_size, 2),
            generator=generator,
            mode=self.bundle.position_mode,
            commission=self.commission,
            slippage_bps=self.slippage_bps,
        )
        flat = ro.rows.reshape(-1)
        macro_x, micro_x = torch.from_numpy(batch.macro)[flat], torch.from_numpy(batch.micro)[flat]
        return sampled_objective_step(ctx, macro_x, micro_x, ro, adv, self.change_table)

    def _snapshot(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        return (
            copy.deepcopy(self.model.state_dict()),
            copy.deepcopy(self.opt_macro.state_dict()),
            copy.deepcopy(self.opt_rest.state_dict()),
        )

    def _restore(self, saved: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]) -> None:
        self.model.load_state_dict(saved[0])
        self.opt_macro.load_state_dict(saved[1])
        self.opt_rest.load_state_dict(saved[2])
        self.model.eval()

    def _save(self, batch: EpisodeBatch, k: int, macro_updates: int, learn_macro: bool, loss: float) -> Path:
        rhythm = {
            "schedule": SCHEDULE,
            "macro_every": self.macro_every,
            "k": k + 1,
            "macro_updates": macro_updates + int(learn_macro),
        }
        steps = int(batch.actions.shape[0])
        online = {"k": k, "episode_id": batch.episode_id, "steps": steps, "seed": self.seed, "loss": loss}
        to_save = replace(
            self.bundle,
            rhythm=rhythm,
            optimizers={"macro": self.opt_macro.state_dict(), "rest": self.opt_rest.state_dict(), "online": True},
            metadata={**self.bundle.metadata, "online": online},
        )
        return save_checkpoint(self.checkpoint_dir / checkpoint_name(k), to_save)

    def prune(self, refs: list[tuple[int, str]]) -> None:
        """Delete online checkpoints beyond the newest `keep` the database references."""
        for _, path in refs[self.keep :]:
            p = Path(path)
            if p.exists():
                p.unlink()
                log.info("checkpoint_pruned", path=str(p))


@torch.no_grad()
def policy_health(
    model: PolicyNet,
    macro_x: torch.Tensor,
    micro_x: torch.Tensor,
    positions: torch.Tensor,
    change_table: torch.Tensor,
) -> PolicyHealth:
    """Mean entropy (nats) and largest position-changing probability of the eval-mode policy over L steps.

    macro_x, micro_x (L, 3N); positions (L,) the position state of each step; change_table (3, 3) from
    `changes_position_table`. NaN figures when the weights are not finite.
    """
    if positions.numel() == 0:
        return PolicyHealth(math.nan, math.nan)
    table = probs_for_all_positions(model, macro_x, micro_x).double()  # (L, 3 positions, 3 actions)
    idx = positions.long() + 1
    p = table[torch.arange(idx.numel()), idx]  # (L, 3) for each step's own position state
    entropy = -torch.special.xlogy(p, p).sum(-1).mean()
    trade = (p * change_table.double()[idx]).sum(-1).max()
    return PolicyHealth(float(entropy), float(trade))


def guard_verdict(
    before: PolicyHealth, after: PolicyHealth, guard: LearningGuard, *, finite_weights: bool
) -> str | None:
    """Why the update must be rolled back, or None: non-finite weights, or a figure pushed under its floor.

    A figure already under its floor before the update does not count: a collapsed policy would otherwise
    never learn again.
    """
    if not finite_weights:
        return "non-finite weights after the step"
    if not after.is_finite():
        return "non-finite policy probabilities after the step"
    if after.entropy < guard.min_entropy <= before.entropy:
        return (
            f"entropy fell under the floor: {before.entropy:.4g} -> {after.entropy:.4g} nats "
            f"(RITMO_GUARD_MIN_ENTROPY={guard.min_entropy:g})"
        )
    if after.max_trade_prob < guard.min_trade_prob <= before.max_trade_prob:
        return (
            f"largest trade probability fell under the floor: {before.max_trade_prob:.4g} -> "
            f"{after.max_trade_prob:.4g} (RITMO_GUARD_MIN_TRADE_PROB={guard.min_trade_prob:g})"
        )
    return None


def episode_prices(batch: EpisodeBatch) -> tuple[np.ndarray, np.ndarray]:
    """The lived episode's compact price path (open, close), (L+1,) each, for a K = 1 VectorTradingEnv.

    close[0] is step 0's decision close; step j fills at open[j+1] (the next candle's open) and is marked
    at close[j+1] (its settling close, which is step j+1's decision close in an unbroken episode).
    open[0] is never read by the env; it is set to close[0] so that every price is positive.
    """
    assert batch.decision_close is not None and batch.next_open is not None and batch.settle_close is not None
    first = batch.decision_close[:1]
    return np.concatenate([first, batch.next_open]), np.concatenate([first, batch.settle_close])


def episode_fill_returns(batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L) float64 simple returns of the lived episode for `expected_pnl_step`: decision close -> next open
    (earned by the position before the fill) and next open -> settling close (by the position after it)."""
    assert batch.decision_close is not None and batch.next_open is not None and batch.settle_close is not None
    gap = batch.next_open / batch.decision_close - 1.0
    hold = batch.settle_close / batch.next_open - 1.0
    return torch.from_numpy(gap).reshape(1, -1), torch.from_numpy(hold).reshape(1, -1)


def counterfactual_group(
    model: PolicyNet,
    batch: EpisodeBatch,
    cfg: TrainConfig,
    *,
    group_size: int,
    generator: torch.Generator,
    mode: str,
    commission: float,
    slippage_bps: float = 0.0,
) -> tuple[Rollout, torch.Tensor]:
    """M rollouts of the current policy over the lived episode (its observations and prices), and their
    leave-one-out advantages (M, L) under the checkpoint's objective.

    Every rollout starts in the position the lived episode started in; the uniforms come from `generator`.
    """
    steps = int(batch.actions.shape[0])
    open_prices, close_prices = episode_prices(batch)
    env = VectorTradingEnv(open_prices, close_prices, mode, commission, slippage_bps, decide_every=1)
    uniforms = torch.rand((group_size, steps), generator=generator)
    initial = torch.full((group_size,), float(batch.positions[0]))
    ro = sample_rollout(
        model,
        env,
        torch.from_numpy(batch.macro),
        torch.from_numpy(batch.micro),
        torch.zeros(group_size, dtype=torch.int64),
        steps,
        uniforms,
        initial,
    )
    assert batch.decision_close is not None and batch.settle_close is not None
    market = torch.from_numpy(np.log(batch.settle_close / batch.decision_close)).expand(group_size, steps)
    vol = None
    if cfg.objective in NEEDS_VOLATILITY:
        assert batch.volatility is not None
        vol = torch.from_numpy(batch.volatility).expand(group_size, steps)
    return ro, advantages(config_rewards(cfg, ro.rewards, market, vol), cfg.gamma, group_size)


def delete_orphans(checkpoint_dir: Path, refs: list[tuple[int, str]]) -> list[Path]:
    """Remove online checkpoint files the database does not reference (a crash before the update was recorded)."""
    if not checkpoint_dir.is_dir():
        return []
    known = {Path(p).name for _, p in refs}
    newest_k = refs[0][0] if refs else -1
    removed = []
    for p in sorted(checkpoint_dir.iterdir()):
        m = _ONLINE_RE.match(p.name)
        # Only files newer than the newest recorded update are orphans of a crash; older unreferenced
        # files were pruned already or belong to a rejected fallback, and are left alone.
        if (m and p.name not in known and int(m.group(1)) > newest_k) or _TMP_RE.match(p.name):
            p.unlink()
            removed.append(p)
            log.warning("checkpoint_orphan_deleted", path=str(p))
    return removed


def load_model(
    store: StateStore,
    checkpoint_dir: Path,
    initial_checkpoint: Path,
    *,
    expect_mode: str | None = None,
) -> tuple[LoadedModel, dict[str, Any] | None]:
    """The newest loadable online checkpoint the state references, else the initial one; plus optimizer state."""
    refs = store.checkpoint_refs()
    delete_orphans(checkpoint_dir, refs)
    for i, (k, path) in enumerate(refs):
        try:
            bundle = load_checkpoint(path)
        except CheckpointError as exc:
            log.error("checkpoint_unloadable", k=k, path=path, error=str(exc))
            continue
        if i > 0:
            log.warning("checkpoint_fallback", k=k, path=path, skipped=i)
            with store.transaction():
                store.add_event("checkpoint_fallback", {"k": k, "path": path, "skipped": i})
        _check_mode(bundle, expect_mode, Path(path))
        optim = bundle.optimizers if (bundle.optimizers or {}).get("online") else None
        return LoadedModel(bundle, Path(path), "online", bundle.version()), optim
    path = Path(initial_checkpoint)
    bundle = load_checkpoint(path)
    _check_mode(bundle, expect_mode, path)
    return LoadedModel(bundle, path, "initial", bundle.version()), None


def _check_mode(bundle: ModelBundle, expect_mode: str | None, path: Path) -> None:
    if expect_mode and bundle.position_mode != expect_mode:
        raise ConfigError(
            f"RITMO_POSITION_MODE={expect_mode} does not match the checkpoint {path}, "
            f"which was trained for {bundle.position_mode}: use a {expect_mode} checkpoint or change the setting"
        )
