"""The online learner under the checkpoint's objective (card update, counterfactual group update, fallback),
the learning guard (rollback of an update that collapses the policy) and the state's schema v3 migration."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from bot.cli import main as cli_main
from bot.daemon.learner import (
    LearningGuard,
    OnlineLearner,
    PolicyHealth,
    counterfactual_group,
    dropout_seed,
    guard_verdict,
    rollout_seed,
)
from bot.daemon.state import _SCHEMA_V1, MIGRATIONS, SCHEMA_VERSION, EpisodeBatch, open_state, open_state_readonly
from bot.files.checkpoints import load_checkpoint, save_checkpoint
from strategies.objectives import advantages
from strategies.trainer import TrainConfig, expected_pnl_step, policy_gradient_step
from tests.test_daemon import DEC1, make_checkpoint, replay_daemon, run_ticks, weights

L = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    """A seeded random policy (train_config empty, as in checkpoints from before objectives)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "card.pt", candles_2024)


@pytest.fixture(scope="module")
def candles(candles_2024: pd.DataFrame) -> pd.DataFrame:
    return candles_2024[candles_2024["ts_ms"] >= DEC1 - 40 * 86_400_000].reset_index(drop=True)


def variant(src: Path, dst: Path, bias: tuple[float, float, float] | None = None, **train: Any) -> Path:
    """A copy of a checkpoint with train_config fields overridden and optionally the head's last bias added to."""
    bundle = load_checkpoint(src)
    if bias is not None:
        with torch.no_grad():
            bundle.model.head.net[-1].bias.add_(torch.tensor(bias))
    return save_checkpoint(dst, dataclasses.replace(bundle, train_config={**bundle.train_config, **train}))


def episode(seed: int = 0, steps: int = L, *, prices: bool = True, start_position: float = 0.0) -> EpisodeBatch:
    """A synthetic settled episode: standard-normal observations, a random walk of prices K candles apart."""
    rng = np.random.default_rng(seed)
    closes = 97_000.0 * np.exp(np.cumsum(rng.normal(0, 0.003, steps + 1)))
    positions = np.full(steps, start_position, dtype=np.float32)
    extra: dict[str, Any] = {}
    if prices:
        extra = {
            "decision_close": closes[:-1].copy(),
            "next_open": closes[:-1] * np.exp(rng.normal(0, 2e-4, steps)),
            "settle_close": closes[1:].copy(),
            "volatility": np.full(steps, 0.004),
        }
    return EpisodeBatch(
        7,
        np.arange(steps, dtype=np.int64) * 3_600_000,
        rng.normal(size=(steps, 60)).astype(np.float32),
        rng.normal(size=(steps, 60)).astype(np.float32),
        positions,
        rng.integers(0, 3, steps),
        rng.normal(0, 1e-3, steps),
        **extra,
    )


def learner_for(path: Path, tmp: Path, **kw: Any) -> OnlineLearner:
    return OnlineLearner(load_checkpoint(path), checkpoint_dir=tmp, seed=3, macro_every=11, keep=3, **kw)


def optimizer_states(learner: OnlineLearner) -> tuple[dict[str, Any], dict[str, Any]]:
    return copy.deepcopy(learner.opt_macro.state_dict()), copy.deepcopy(learner.opt_rest.state_dict())


def assert_same_optimizer_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid, st in a["state"].items():
        for name, tensor in st.items():
            assert torch.equal(tensor, b["state"][pid][name]), (pid, name)


# ---------------------------------------------------------------------------------------------------
# The card objective: today's update, bit for bit.
# ---------------------------------------------------------------------------------------------------


def test_card_update_is_the_single_episode_update_bit_for_bit(checkpoint: Path, tmp_path: Path) -> None:
    """An old checkpoint (no objective) learns exactly as before: gamma 0.99, Adam 1e-4 / 5e-4, one episode."""
    learner = learner_for(checkpoint, tmp_path)
    cfg = learner.train_config
    assert (cfg.objective, cfg.gamma, cfg.lr_macro, cfg.lr_rest) == ("card", 0.99, 1e-4, 5e-4)
    ref = load_checkpoint(checkpoint).model.eval()
    opt_macro = torch.optim.Adam(ref.macro.parameters(), lr=1e-4)
    opt_rest = torch.optim.Adam(list(ref.micro.parameters()) + list(ref.head.parameters()), lr=5e-4)
    for k, batch in ((0, episode(1)), (1, episode(2))):
        out = learner.learn(batch, k=k, macro_updates=0)
        assert out.status == "learned" and out.method == "card"
        policy_gradient_step(
            ref,
            opt_macro,
            opt_rest,
            macro_x=torch.from_numpy(batch.macro),
            micro_x=torch.from_numpy(batch.micro),
            positions=torch.from_numpy(batch.positions).reshape(1, -1),
            actions=torch.from_numpy(batch.actions).reshape(1, -1),
            advantages=advantages(torch.from_numpy(batch.rewards).reshape(1, -1), 0.99),
            learn_macro=k % 11 == 0,
            dropout_seed=dropout_seed(3, k),
        )
        got, want = weights(learner.model), weights(ref)
        assert all(torch.equal(got[name], want[name]) for name in want)


def test_hyperparameters_come_from_the_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    path = variant(checkpoint, tmp_path / "v.pt", lr_macro=2e-5, lr_rest=3e-4, gamma=0.9, objective="excess")
    learner = learner_for(path, tmp_path)
    assert learner.opt_macro.param_groups[0]["lr"] == 2e-5 and learner.opt_rest.param_groups[0]["lr"] == 3e-4
    assert learner.objective == "excess" and learner.train_config.gamma == 0.9


# ---------------------------------------------------------------------------------------------------
# Other objectives: a group of counterfactual rollouts over the lived episode.
# ---------------------------------------------------------------------------------------------------


def test_group_update_is_reproducible_and_keyed_by_k(checkpoint: Path, tmp_path: Path) -> None:
    path = variant(checkpoint, tmp_path / "vs.pt", objective="vol_scaled", group_size=4)
    batch = episode(5)
    a, b, c = (learner_for(path, tmp_path / name) for name in "abc")
    outs = [a.learn(batch, k=4, macro_updates=0), b.learn(batch, k=4, macro_updates=0)]
    assert [o.method for o in outs] == ["group", "group"] and outs[0].status == "learned"
    assert outs[0].loss == outs[1].loss
    wa, wb = weights(a.model), weights(b.model)
    assert all(torch.equal(wa[name], wb[name]) for name in wa)  # a redone update is the same update
    c.learn(batch, k=5, macro_updates=0)
    wc = weights(c.model)
    assert not all(torch.equal(wa[name], wc[name]) for name in wa)
    assert rollout_seed(3, 4) != dropout_seed(3, 4)


def test_counterfactual_rollouts_replay_the_lived_prices(checkpoint: Path) -> None:
    """M rollouts start in the lived episode's position on its price path; when they all act alike the
    market's move is common to the group and the leave-one-out advantages vanish."""
    batch = episode(9, start_position=1.0)
    cfg = TrainConfig(objective="log_return", group_size=4)
    hold = load_checkpoint(checkpoint).model.eval()
    with torch.no_grad():
        hold.head.net[-1].bias.add_(torch.tensor([80.0, 0.0, 0.0]))  # HOLD for certain
    group = {"group_size": 4, "mode": "long_short", "commission": 0.001}
    ro, adv = counterfactual_group(hold, batch, cfg, generator=torch.Generator().manual_seed(0), **group)
    assert ro.positions.shape == (4, L) and bool((ro.positions == 1.0).all()) and bool((ro.actions == 0).all())
    # Long and holding: each step earns the market's log return between the decision and the settling close.
    market = np.log(batch.settle_close / batch.decision_close)
    np.testing.assert_allclose(ro.rewards.numpy(), np.broadcast_to(market, (4, L)), rtol=1e-12, atol=1e-15)
    assert float(adv.abs().max()) < 1e-6  # zero up to rounding: the group's common move cancelled

    trader = load_checkpoint(checkpoint).model.eval()
    ro, adv = counterfactual_group(trader, batch, cfg, generator=torch.Generator().manual_seed(0), **group)
    assert bool((ro.positions[:, 0] == 1.0).all()) and int(ro.trades.sum()) > 0
    assert adv.shape == (4, L) and bool(adv.abs().sum() > 0)
    assert torch.allclose(adv.sum(0), torch.zeros(L, dtype=adv.dtype), atol=1e-5)  # leave-one-out: zero mean


def test_expected_pnl_update_uses_the_episode_prices(checkpoint: Path, tmp_path: Path) -> None:
    """expected_pnl learns analytically from the lived episode's stored prices: `expected_pnl_step` exactly."""
    path = variant(checkpoint, tmp_path / "epnl.pt", objective="expected_pnl")
    batch = episode(6)
    learner = learner_for(path, tmp_path / "l", commission=0.0004)
    out = learner.learn(batch, k=2, macro_updates=0)
    assert (out.method, out.status) == ("expected_pnl", "learned")
    ref = load_checkpoint(path).model.eval()
    opt_macro = torch.optim.Adam(ref.macro.parameters(), lr=1e-4)
    opt_rest = torch.optim.Adam(list(ref.micro.parameters()) + list(ref.head.parameters()), lr=5e-4)
    gap = torch.from_numpy(batch.next_open / batch.decision_close - 1).reshape(1, -1)
    hold = torch.from_numpy(batch.settle_close / batch.next_open - 1).reshape(1, -1)
    stats, _ = expected_pnl_step(
        ref,
        opt_macro,
        opt_rest,
        macro_x=torch.from_numpy(batch.macro),
        micro_x=torch.from_numpy(batch.micro),
        gap_returns=gap,
        hold_returns=hold,
        mode="long_short",
        commission=0.0004,
        learn_macro=False,
        dropout_seed=dropout_seed(3, 2),
    )
    assert stats.loss == out.loss
    got, want = weights(learner.model), weights(ref)
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_episode_without_prices_falls_back_to_the_card_update(checkpoint: Path, tmp_path: Path) -> None:
    """Steps recorded before schema v3 carry no prices: the card update on the lived episode, logged."""
    path = variant(checkpoint, tmp_path / "dsr.pt", objective="dsr", group_size=8)
    batch = episode(4, prices=False)
    fallback, card = learner_for(path, tmp_path / "f"), learner_for(checkpoint, tmp_path / "c")
    out = fallback.learn(batch, k=0, macro_updates=0)
    assert out.method == "card_fallback" and out.status == "learned"
    card.learn(batch, k=0, macro_updates=0)
    wf, wc = weights(fallback.model), weights(card.model)
    assert all(torch.equal(wf[name], wc[name]) for name in wf)
    no_vol = dataclasses.replace(episode(4), volatility=np.full(L, np.nan))
    assert learner_for(path, tmp_path / "g").update_method(no_vol) == "card_fallback"  # dsr needs the volatility


# ---------------------------------------------------------------------------------------------------
# The learning guard.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "finite", "expect"),
    [
        ((0.9, 0.5), (0.8, 0.4), True, None),
        ((0.9, 0.5), (0.01, 0.4), True, "entropy fell under the floor"),
        ((0.9, 0.5), (0.6, 1e-5), True, "largest trade probability fell under the floor"),
        ((0.01, 1e-6), (0.001, 1e-9), True, None),  # already collapsed before: not held to the floors
        ((0.05, 0.001), (0.0499, 0.002), True, "entropy"),  # at the floor counts as above it
        ((0.9, 0.5), (0.8, 0.4), False, "non-finite weights"),
        ((0.9, 0.5), (math.nan, math.nan), True, "non-finite policy"),
    ],
)
def test_guard_verdict(
    before: tuple[float, float], after: tuple[float, float], finite: bool, expect: str | None
) -> None:
    why = guard_verdict(PolicyHealth(*before), PolicyHealth(*after), LearningGuard(), finite_weights=finite)
    assert (why is None) if expect is None else (why is not None and expect in why)


def test_update_that_collapses_the_policy_is_rolled_back(checkpoint: Path, tmp_path: Path) -> None:
    """A huge learning rate saturates the head in one Adam step: the update is undone, weights and both
    optimisers exactly as before, no checkpoint written, the acting version unchanged."""
    learner = learner_for(checkpoint, tmp_path)
    assert learner.learn(episode(1), k=0, macro_updates=0).status == "learned"  # Adam moments exist now
    version = learner.version
    for opt in (learner.opt_macro, learner.opt_rest):
        opt.param_groups[0]["lr"] = 10.0
    w_before, (m_before, r_before) = weights(learner.model), optimizer_states(learner)
    out = learner.learn(episode(2), k=1, macro_updates=1)
    assert out.status == "rolled_back" and not out.applied and out.checkpoint_path is None
    assert out.reason is not None and "under the floor" in out.reason
    assert out.before is not None and out.after is not None
    assert out.before.entropy >= 0.05 and (out.after.entropy < 0.05 or out.after.max_trade_prob < 0.001)
    w_after = weights(learner.model)
    assert all(torch.equal(w_before[name], w_after[name]) for name in w_before)
    m_after, r_after = optimizer_states(learner)
    assert_same_optimizer_state(m_before, m_after)
    assert_same_optimizer_state(r_before, r_after)
    assert not (tmp_path / "online-000001.pt").exists() and learner.version == version
    assert not learner.model.training


def test_collapsed_policy_is_not_rolled_back_for_staying_collapsed(checkpoint: Path, tmp_path: Path) -> None:
    """A policy already under both floors (like the shipped card checkpoints) keeps learning."""
    path = variant(checkpoint, tmp_path / "flat.pt", bias=(60.0, 0.0, 0.0))
    learner = learner_for(path, tmp_path)
    batch = episode(3)
    before = learner.health(batch)
    assert before.entropy < 0.05 and before.max_trade_prob < 0.001
    out = learner.learn(batch, k=0, macro_updates=0)
    assert out.status == "learned" and out.after is not None and out.after.entropy < 0.05


def test_daemon_records_a_rollback_and_status_shows_it(
    tmp_path: Path,
    checkpoint: Path,
    candles: pd.DataFrame,
    isolated_process: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A replay whose updates collapse the policy: rolled back, recorded with an event, shown by `ritmo status`;
    the rhythm counter advances, MacroNet's count does not, the initial model keeps acting."""
    path = variant(checkpoint, tmp_path / "hot.pt", lr_macro=10.0, lr_rest=10.0)
    comps = replay_daemon(tmp_path / "state", path, candles, episode_steps=12, min_episode_steps=6)
    store = comps.store
    try:
        initial = weights(comps.daemon.learner.model)
        version = comps.daemon.learner.version
        run_ticks(comps.daemon, DEC1, 14)  # episode 1 closes at tick 13: update k = 0
        assert comps.daemon.mem.k == 1 and comps.daemon.mem.macro_updates == 0
        row = store.conn.execute(
            "SELECT k, status, applied, checkpoint_path, reason, method, entropy_before, entropy_after FROM updates"
        ).fetchone()
        assert row[:4] == (0, "rolled_back", 0, None) and "under the floor" in row[4] and row[5] == "card"
        assert row[6] >= 0.05 > row[7]
        assert store.episode(1)["status"] == "rejected"
        (event,) = store.events("update_rolled_back")
        assert event["detail"]["k"] == 0 and event["detail"]["reason"] == row[4]
        assert event["detail"]["entropy_after"] == row[7]
        assert store.get_meta("model")["source"] == "initial" and comps.daemon.learner.version == version
        now = weights(comps.daemon.learner.model)
        assert all(torch.equal(initial[name], now[name]) for name in initial)
        assert not list((tmp_path / "state" / "checkpoints").rglob("online-*.pt"))
    finally:
        store.close()
    capsys.readouterr()
    assert cli_main(["status", "--json", "--state-dir", str(tmp_path / "state")]) == 0
    s = json.loads(capsys.readouterr().out)
    guard = s["learning_guard"]
    assert guard["rolled_back"] == 1 and guard["min_entropy"] == 0.05 and guard["min_trade_prob"] == 0.001
    assert guard["last_rollback"]["k"] == 0 and "under the floor" in guard["last_rollback"]["reason"]
    assert guard["last_rollback"]["at"] and guard["last_rollback"]["candle"]
    assert guard["last_update"]["status"] == "rolled_back"
    assert s["updates"] == {"learned": 0, "rejected": 0} and s["rhythm"] == {"k": 1, "macro_updates": 0}
    assert cli_main(["status", "--state-dir", str(tmp_path / "state")]) == 0
    text = capsys.readouterr().out
    assert "rolled back 1" in text and "last rollback k=0" in text


def test_bad_guard_setting_stops_with_exit_78(
    tmp_path: Path, isolated_process: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RITMO_GUARD_MIN_TRADE_PROB", "1.5")
    assert cli_main(["run", "--once"]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RITMO_GUARD_MIN_TRADE_PROB" in err[0]


# ---------------------------------------------------------------------------------------------------
# Schema v3.
# ---------------------------------------------------------------------------------------------------


def test_v2_state_migrates_to_the_current_schema_keeping_rows(tmp_path: Path) -> None:
    path = tmp_path / "paper-BTC-USDT.sqlite"
    with sqlite3.connect(path) as conn:
        for script in (_SCHEMA_V1, MIGRATIONS[2]):
            for statement in (s for s in script.split(";") if s.strip()):
                conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('mode', '\"paper\"'), ('symbol', '\"BTC/USDT\"')")
        conn.execute(
            "INSERT INTO decisions (ts_ms, status, action, p_hold, position_before, position_after, created_at_ms)"
            " VALUES (0, 'acted', 1, 0.2, 0, 1, 5)"
        )
        conn.execute("INSERT INTO episodes (id, status, start_ts_ms) VALUES (1, 'pending', 0)")
        blob = np.zeros(60, dtype=np.float32).tobytes()
        for step in range(3):
            row = (step, step * 300_000, blob, blob)
            conn.execute("INSERT INTO episode_steps VALUES (1, ?, ?, ?, ?, 0, 0, 100.0, 0.001)", row)
        conn.execute("INSERT INTO updates VALUES (0, 1, 'learned', 'micro,head', 3, 0.5, 1, 'x.pt', 'v', 1.0, 9)")
        conn.execute("PRAGMA user_version = 2")
    store = open_state(path, mode="paper", symbol="BTC/USDT")
    try:
        # v2 -> v3 -> v4 (the cockpit's commands and outbox tables) in one transaction.
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert store.pending_commands() == []
        assert store.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
        assert store.last_decision()["p_hold"] == 0.2 and store.last_decision()["created_at_ms"] == 5
        update = store.last_update()
        assert (update["status"], update["checkpoint_path"], update["reason"], update["method"]) == (
            "learned",
            "x.pt",
            None,
            None,
        )
        batch = store.episode_batch(1)
        assert batch.rewards.tolist() == [0.001] * 3
        assert np.isnan(batch.decision_close).all() and not batch.has_prices()
        with store.transaction():
            kept = {"ts_ms": 300_000, "status": "kept", "action": 0, "position_before": 0, "position_after": 0}
            store.insert_decision({**kept, "reason": "between_decisions"})
            store.record_update(
                {"k": 1, "episode_id": 1, "status": "rolled_back", "parts": "micro,head", "steps": 3, "applied": 0}
            )
        assert store.decision_count("kept") == 1 and store.update_count("rolled_back") == 1
        assert store.conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        store.close()
    open_state_readonly(path).conn.close()
