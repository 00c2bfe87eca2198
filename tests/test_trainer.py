"""REINFORCE with the 1:10 rhythm: which parts learn on which update, determinism, returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies.objectives import discounted_returns
from strategies.policy import PolicyNet
from strategies.trainer import TrainConfig, Trainer, is_macro_update


@pytest.fixture(scope="module")
def market(candles_2024):
    """Standardised observations and prices for the first quarter of 2024 (keeps the tests fast)."""
    from strategies.features import build_observations, compute_features, fit_standardizer

    candles = candles_2024.iloc[: 288 * 40].reset_index(drop=True)
    feats = compute_features(candles)
    obs = build_observations(feats, fit_standardizer(feats, slice(0, len(candles))))
    first = int(np.argmax(obs.valid))
    steps = 24
    starts = np.arange(first, len(candles) - steps - 1)
    return {
        "macro": torch.from_numpy(obs.macro),
        "micro": torch.from_numpy(obs.micro),
        "open": torch.from_numpy(candles["open"].to_numpy()),
        "close": torch.from_numpy(candles["close"].to_numpy()),
        "starts": torch.from_numpy(starts),
        "steps": steps,
    }


def make_trainer(market, schedule: str = "asymmetric", seed: int = 0, macro_every: int = 11) -> Trainer:
    torch.manual_seed(seed)
    cfg = TrainConfig(
        episodes_per_update=8, episode_steps=market["steps"], schedule=schedule, macro_every=macro_every, seed=seed
    )
    return Trainer(
        model=PolicyNet(20),
        cfg=cfg,
        macro_x=market["macro"],
        micro_x=market["micro"],
        open_prices=market["open"],
        close_prices=market["close"],
        start_rows=market["starts"],
        generator=torch.Generator().manual_seed(seed),
    )


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_is_macro_update_counts_one_in_eleven() -> None:
    flags = [is_macro_update(k, "asymmetric", 11) for k in range(33)]
    assert [k for k, f in enumerate(flags) if f] == [0, 11, 22]
    assert all(is_macro_update(k, "symmetric", 11) for k in range(33))


def test_asymmetric_rhythm_freezes_macro_bit_for_bit(market) -> None:
    tr = make_trainer(market)
    for k in range(23):
        macro0, micro0, head0 = snapshot(tr.model.macro), snapshot(tr.model.micro), snapshot(tr.model.head)
        line = tr.update()
        assert line["k"] == k and line["applied"]
        macro_changed = not identical(macro0, snapshot(tr.model.macro))
        assert macro_changed == (k % 11 == 0), f"update {k}: MacroNet changed={macro_changed}"
        assert not identical(micro0, snapshot(tr.model.micro)), f"update {k}: MicroNet did not learn"
        assert not identical(head0, snapshot(tr.model.head)), f"update {k}: head did not learn"
        assert line["parts"] == (["macro", "micro", "head"] if k % 11 == 0 else ["micro", "head"])
    # Adam's own step counter: MacroNet stepped on k = 0, 11, 22 only; the rest on all 23 updates
    macro_steps = {int(s["step"]) for s in tr.opt_macro.state_dict()["state"].values()}
    rest_steps = {int(s["step"]) for s in tr.opt_rest.state_dict()["state"].values()}
    assert macro_steps == {3} and rest_steps == {23}
    assert (tr.rhythm.k, tr.rhythm.macro_updates, tr.rhythm.rest_updates) == (23, 3, 23)


def test_frozen_macro_gets_no_gradient(market) -> None:
    tr = make_trainer(market)
    tr.update()  # k = 0 learns everything
    tr.update()  # k = 1: MacroNet frozen
    assert all(p.grad is None for p in tr.model.macro.parameters())
    assert all(p.grad is not None for p in tr.model.micro.parameters())


def test_symmetric_changes_every_part_every_time(market) -> None:
    tr = make_trainer(market, schedule="symmetric")
    for _ in range(4):
        before = [snapshot(getattr(tr.model, n)) for n in ("macro", "micro", "head")]
        tr.update()
        after = [snapshot(getattr(tr.model, n)) for n in ("macro", "micro", "head")]
        assert not any(identical(a, b) for a, b in zip(before, after, strict=True))
    assert tr.rhythm.macro_updates == 4


def test_same_seed_same_weights_other_seed_other_weights(market) -> None:
    runs = []
    for seed in (5, 5, 6):
        tr = make_trainer(market, seed=seed)
        for _ in range(3):
            tr.update()
        runs.append(tr.model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_resume_from_saved_state_continues_exactly(market) -> None:
    straight = make_trainer(market, seed=3)
    for _ in range(4):
        straight.update()

    first = make_trainer(market, seed=3)
    for _ in range(2):
        first.update()
    saved_weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    saved_opt = first.optimizer_state()
    resumed = make_trainer(market, seed=3)
    resumed.model.load_state_dict(saved_weights)
    resumed.load_optimizer_state(saved_opt)
    resumed.rhythm = type(first.rhythm)(first.rhythm.k, first.rhythm.macro_updates, first.rhythm.rest_updates)
    for _ in range(2):
        resumed.update()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rollout_rewards_are_the_accounting_log_returns(market) -> None:
    tr = make_trainer(market)
    ro = tr.rollout()
    assert ro.rewards.shape == (8, market["steps"]) and torch.isfinite(ro.rewards).all()
    # an episode that never trades has zero reward; one that holds a position earns its log price moves
    assert set(ro.actions.unique().tolist()) <= {0, 1, 2}
    assert set(ro.positions.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (ro.positions[:, 0] == 0).all(), "every episode starts flat"


def test_discounted_returns_match_the_loop() -> None:
    rewards = torch.randn(3, 10, dtype=torch.float64)
    got = discounted_returns(rewards, 0.9)
    want = torch.zeros_like(rewards)
    running = torch.zeros(3, dtype=torch.float64)
    for t in reversed(range(10)):
        running = rewards[:, t] + 0.9 * running
        want[:, t] = running
    torch.testing.assert_close(got, want)


def test_bad_config_is_refused(market) -> None:
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="sometimes").validate()
    with pytest.raises(ValueError, match="macro_every"):
        TrainConfig(macro_every=0).validate()
    with pytest.raises(ValueError, match="no episode fits"):
        Trainer(
            model=PolicyNet(20),
            cfg=TrainConfig(),
            macro_x=market["macro"],
            micro_x=market["micro"],
            open_prices=market["open"],
            close_prices=market["close"],
            start_rows=torch.empty(0, dtype=torch.int64),
        )
