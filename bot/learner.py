"""The online learner: one REINFORCE update per closed episode, under the 1:10 rhythm, with versioned checkpoints.

An episode is L consecutive decisions of the daemon itself. Its update is `strategies.trainer.
policy_gradient_step` on a batch of one episode (returns discounted with gamma 0.99 and normalised over the
episode's steps), with MacroNet learning only when `k % macro_every == 0`. The dropout masks are seeded by
(seed, k), so an update redone after a crash is bit for bit the one an uninterrupted run made.

Optimisers: Adam at 1e-4 (MacroNet) and 5e-4 (MicroNet + head), persisted in every online checkpoint. The
online optimisers start fresh from a training checkpoint: its Adam moments were estimated on batches of
128 episodes and their scale does not carry over to single-episode gradients; they continue across
online checkpoints.

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

import structlog
import torch

from bot.checkpoints import ModelBundle, load_checkpoint, save_checkpoint
from bot.errors import CheckpointError, ConfigError
from bot.state import EpisodeBatch, StateStore
from strategies.trainer import is_macro_update, policy_gradient_step

log = structlog.get_logger(__name__)

GAMMA = 0.99
LR_MACRO = 1e-4
LR_REST = 5e-4
SCHEDULE = "asymmetric"
_ONLINE_RE = re.compile(r"^online-(\d{6,})\.pt$")
# Leftovers of save_checkpoint's temporary files (a crash mid-write).
_TMP_RE = re.compile(r"^\.online-\d+\.pt\..*\.tmp$")


def dropout_seed(seed: int, k: int) -> int:
    """The dropout seed of update k (the offline trainer's formula): a redone update draws the same masks."""
    return int(seed) * 1_000_003 + int(k)


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
class UpdateOutcome:
    """What one online update did."""

    k: int
    episode_id: int
    status: str  # learned | rejected
    learn_macro: bool
    loss: float
    applied: bool
    steps: int
    checkpoint_path: str | None
    model_version: str
    wall_ms: float
    reason: str | None = None

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
    ) -> None:
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.seed = int(seed)
        self.macro_every = int(macro_every)
        self.keep = int(keep)
        self._optimizer_state = optimizer_state
        self._optimizers: tuple[torch.optim.Adam, torch.optim.Adam] | None = None
        if learning:
            # Built at start-up when learning is on: torch.optim imports torch._dynamo (and sympy), ~70 MB and
            # ~3 s, which belong in start-up rather than in the first update's tick. A frozen daemon never pays it.
            self._ensure_optimizers()
        self.version = bundle.version()

    def _ensure_optimizers(self) -> tuple[torch.optim.Adam, torch.optim.Adam]:
        if self._optimizers is None:
            opt_macro = torch.optim.Adam(self.model.macro.parameters(), lr=LR_MACRO)
            rest = list(self.model.micro.parameters()) + list(self.model.head.parameters())
            opt_rest = torch.optim.Adam(rest, lr=LR_REST)
            if self._optimizer_state is not None:
                opt_macro.load_state_dict(self._optimizer_state["macro"])
                opt_rest.load_state_dict(self._optimizer_state["rest"])
            self._optimizers = (opt_macro, opt_rest)
        return self._optimizers

    @property
    def opt_macro(self) -> torch.optim.Adam:
        """Adam over MacroNet (lr 1e-4)."""
        return self._ensure_optimizers()[0]

    @property
    def opt_rest(self) -> torch.optim.Adam:
        """Adam over MicroNet + decision head (lr 5e-4)."""
        return self._ensure_optimizers()[1]

    def learn(self, batch: EpisodeBatch, k: int, macro_updates: int) -> UpdateOutcome:
        """Update k on one episode; on success the new model is saved (not yet recorded) and acts next."""
        t0 = time.perf_counter()
        learn_macro = is_macro_update(k, SCHEDULE, self.macro_every)
        steps = int(batch.actions.shape[0])
        saved = (
            copy.deepcopy(self.model.state_dict()),
            copy.deepcopy(self.opt_macro.state_dict()),
            copy.deepcopy(self.opt_rest.state_dict()),
        )
        stats = policy_gradient_step(
            self.model,
            self.opt_macro,
            self.opt_rest,
            macro_x=torch.from_numpy(batch.macro),
            micro_x=torch.from_numpy(batch.micro),
            positions=torch.from_numpy(batch.positions).reshape(1, -1),
            actions=torch.from_numpy(batch.actions).reshape(1, -1),
            rewards=torch.from_numpy(batch.rewards).reshape(1, -1),
            learn_macro=learn_macro,
            gamma=GAMMA,
            dropout_seed=dropout_seed(self.seed, k),
        )
        finite_weights = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        if not (stats.applied and math.isfinite(stats.loss) and finite_weights):
            self.model.load_state_dict(saved[0])
            self.opt_macro.load_state_dict(saved[1])
            self.opt_rest.load_state_dict(saved[2])
            self.model.eval()
            reason = "non-finite loss or gradient" if not stats.applied else "non-finite weights after the step"
            log.error("update_rejected", k=k, episode_id=batch.episode_id, loss=stats.loss, reason=reason)
            return UpdateOutcome(
                k,
                batch.episode_id,
                "rejected",
                learn_macro,
                stats.loss,
                False,
                steps,
                None,
                self.version,
                (time.perf_counter() - t0) * 1e3,
                reason,
            )
        self.version = self.bundle.version()
        rhythm = {
            "schedule": SCHEDULE,
            "macro_every": self.macro_every,
            "k": k + 1,
            "macro_updates": macro_updates + int(learn_macro),
        }
        online = {"k": k, "episode_id": batch.episode_id, "steps": steps, "seed": self.seed, "loss": stats.loss}
        to_save = replace(
            self.bundle,
            rhythm=rhythm,
            optimizers={"macro": self.opt_macro.state_dict(), "rest": self.opt_rest.state_dict(), "online": True},
            metadata={**self.bundle.metadata, "online": online},
        )
        path = save_checkpoint(self.checkpoint_dir / checkpoint_name(k), to_save)
        return UpdateOutcome(
            k,
            batch.episode_id,
            "learned",
            learn_macro,
            stats.loss,
            True,
            steps,
            str(path),
            self.version,
            (time.perf_counter() - t0) * 1e3,
        )

    def prune(self, refs: list[tuple[int, str]]) -> None:
        """Delete online checkpoints beyond the newest `keep` the database references."""
        for _, path in refs[self.keep :]:
            p = Path(path)
            if p.exists():
                p.unlink()
                log.info("checkpoint_pruned", path=str(p))


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
