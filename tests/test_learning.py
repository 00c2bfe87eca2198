"""Learning past the fee barrier: the card reproduces the shipped run, the decision interval, grouped rollouts,
the exploration floor and the expected-P&L objective, on the real 2024 candles."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from strategies.accounting import Ledger
from strategies.backtest import run_backtest
from strategies.env import VectorTradingEnv
from strategies.objectives import is_decision_candle
from strategies.policy import PolicyNet, decision_uniforms, sample_action
from strategies.trainer import TrainConfig, Trainer, changes_position_table, episode_start_rows

REPO = Path(__file__).resolve().parent.parent
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC


@pytest.fixture(scope="module")
def market(candles_2024):
    """Observations and prices of the first 60 days of 2024 (keeps the tests fast)."""
    from strategies.features import build_observations, compute_features, fit_standardizer

    candles = candles_2024.iloc[: 288 * 60].reset_index(drop=True)
    feats = compute_features(candles)
    obs = build_observations(feats, fit_standardizer(feats, slice(0, len(candles))))
    return {"candles": candles, "obs": obs, "ts": candles["ts_ms"].to_numpy()}


def make_trainer(market, **kw) -> Trainer:
    cfg = TrainConfig(**{"episodes_per_update": 8, "episode_steps": 12, "seed": 0, **kw})
    ts, obs = market["ts"], market["obs"]
    starts = episode_start_rows(ts, obs.valid, 0, len(ts), cfg.episode_steps, cfg.decide_every)
    torch.manual_seed(cfg.seed)
    return Trainer(
        model=PolicyNet(20),
        cfg=cfg,
        macro_x=torch.from_numpy(obs.macro),
        micro_x=torch.from_numpy(obs.micro),
        open_prices=torch.from_numpy(market["candles"]["open"].to_numpy()),
        close_prices=torch.from_numpy(market["candles"]["close"].to_numpy()),
        start_rows=torch.from_numpy(starts),
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def test_card_objective_reproduces_the_shipped_card_run(isolated_process, data_path: Path) -> None:
    """The first three updates of checkpoints/card-exact.pt's command give its recorded losses to the bit."""
    from bot.cli import main

    ref_file = REPO / "checkpoints" / "card-exact.metrics.jsonl"
    with ref_file.open() as fh:
        ref = [json.loads(next(fh)) for _ in range(3)]
    out = Path("card.pt")
    argv = ["train", "--data", str(data_path), "--train-from", "2024-01-01", "--train-to", "2024-11-01"]
    argv += ["--valid-from", "2024-11-01", "--valid-to", "2024-11-02", "--updates", "3", "--seed", "1"]
    argv += ["--validate-every", "1000", "--out", str(out), "--no-progress", "--threads", "2"]
    assert main(argv) == 0
    got = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    got = [g for g in got if g["type"] == "update"]
    for r, g in zip(ref, got, strict=True):
        assert (g["k"], g["loss"], g["entropy"], g["grad_norm"]) == (r["k"], r["loss"], r["entropy"], r["grad_norm"])


def test_env_with_a_decision_interval_fills_next_open_and_marks_k_candles_later() -> None:
    rng = np.random.default_rng(0)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 40)))
    opens = np.concatenate([[100.0], closes[:-1] * (1 + rng.normal(0, 0.001, 39))])
    k, start = 4, 3
    env = VectorTradingEnv(opens, closes, "long_short", commission=0.001, decide_every=k)
    env.reset(torch.tensor([start]))
    assert int(env.max_steps(torch.tensor([start]))[0]) == (40 - 1 - start) // k
    ledger = Ledger(cash_quote=1.0)
    actions = [1, 0, 2, 1, 0]
    for t, a in enumerate(actions):
        assert int(env.candle_idx[0]) == start + t * k
        e0 = ledger.equity(closes[start + t * k])
        ledger.apply_action(a, opens[start + t * k + 1], 0.001, 0.0, "long_short")
        r = float(env.step(torch.tensor([a]))[0])
        assert r == pytest.approx(np.log(ledger.equity(closes[start + (t + 1) * k]) / e0), abs=1e-12)
    assert int(env.n_trades[0]) == ledger.n_trades == 3  # buy, flip short, flip long


def test_episode_starts_sit_on_the_grid_and_never_span_a_gap() -> None:
    ts = T0 + np.arange(600) * 300_000
    ts[400:] += 3 * 300_000  # a 3-candle gap after row 399
    valid = np.ones(600, dtype=bool)
    valid[:50] = False
    starts = episode_start_rows(ts, valid, 0, 600, steps=5, decide_every=12)
    assert starts.size > 0
    assert np.all(is_decision_candle(ts[starts], 12))
    assert starts.min() >= 50
    for s in starts:
        assert not (s < 400 <= s + 5 * 12)  # the rows s .. s+60 hold no gap
        assert s + 5 * 12 <= 599
    assert max(s for s in starts if s < 400) == 335  # the last grid row with 60 contiguous rows after it


def test_grouped_rollouts_share_their_start_and_the_cost_curriculum_ramps(market) -> None:
    tr = make_trainer(
        market, objective="log_return", decide_every=12, group_size=4, cost_curriculum_updates=4, episode_steps=6
    )
    ro = tr.rollout()
    starts = ro.rows[:, 0].reshape(2, 4)
    assert torch.all(starts == starts[:, :1])
    assert torch.all(ro.rows[:, 1] - ro.rows[:, 0] == 12)
    commissions = [tr.update()["commission"] for _ in range(6)]
    assert commissions == pytest.approx([0.0, 0.00025, 0.0005, 0.00075, 0.001, 0.001])


def test_the_trade_floor_lifts_the_probability_of_trading(market) -> None:
    def p_change_after(floor: float) -> float:
        tr = make_trainer(
            market, objective="log_return", decide_every=12, group_size=4, trade_floor=floor, lr_rest=5e-3
        )
        with torch.no_grad():  # a policy that seldom trades: HOLD's logit above the others
            tr.model.head.net[-1].bias.copy_(torch.tensor([3.0, -1.0, -1.0]))
        for _ in range(10):
            tr.update()
        return tr.update()["p_change"]

    low, lifted = p_change_after(0.0), p_change_after(0.3)
    assert lifted > 0.12 and lifted > 2 * low, (low, lifted)


def test_expected_pnl_learns_under_the_rhythm(market) -> None:
    tr = make_trainer(market, objective="expected_pnl", decide_every=12, episode_steps=24)
    before = [p.detach().clone() for p in tr.model.macro.parameters()]
    first = tr.update()
    after_macro = [p.detach().clone() for p in tr.model.macro.parameters()]
    assert first["parts"] == ["macro", "micro", "head"] and first["applied"]
    assert not all(torch.equal(a, b) for a, b in zip(before, after_macro, strict=True))
    head = [p.detach().clone() for p in tr.model.head.parameters()]
    second = tr.update()
    assert second["parts"] == ["micro", "head"]
    assert all(torch.equal(a, b) for a, b in zip(after_macro, tr.model.macro.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(head, tr.model.head.parameters(), strict=True))
    assert first["turnover_per_episode"] > 0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"decide_every": 12}, "card objective"),
        ({"objective": "log_return", "group_size": 3}, "multiple of group_size"),
        ({"objective": "expected_pnl", "group_size": 2}, "analytic"),
        ({"objective": "sharpe"}, "unknown objective"),
        ({"objective": "log_return", "trade_floor": 1.5}, "trade_floor"),
    ],
)
def test_bad_learning_settings_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw).validate()


def test_backtest_decides_only_on_the_grid(market) -> None:
    candles = market["candles"]
    n = 2000
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(n, 3))
    ts = candles["ts_ms"].to_numpy()[-n:]
    kw = {"mode": "long_short", "commission": 0.001, "seed": 1}
    o, c = candles["open"].to_numpy()[-n:], candles["close"].to_numpy()[-n:]
    res = run_backtest(probs, ts, o, c, decide_every=12, **kw)
    decided_at = ts - 300_000
    changed = np.flatnonzero(np.diff(np.concatenate([[0.0], res.positions])) != 0)
    assert changed.size > 20
    assert np.all(is_decision_candle(decided_at[changed], 12))
    # on the grid the action is the one sampled for (seed, candle time) from the held position's row; off it HOLD
    u = decision_uniforms(1, decided_at)
    held = np.concatenate([[0.0], res.positions[:-1]]).astype(int)
    grid = np.asarray(is_decision_candle(decided_at, 12))
    for i in range(n):
        want = sample_action(probs[i, held[i] + 1], float(u[i])) if grid[i] else 0
        assert res.actions[i] == want


def test_checkpoints_keep_the_decision_interval_and_old_ones_read_as_one(tmp_path: Path) -> None:
    from bot.files.checkpoints import bundle_to_payload, load_checkpoint, save_checkpoint

    old = load_checkpoint(REPO / "checkpoints" / "card-exact.pt")
    assert old.decide_every == 1 and old.objective == "card"
    new = dataclasses.replace(old, decide_every=24, train_config={**old.train_config, "objective": "expected_pnl"})
    path = save_checkpoint(tmp_path / "k24.pt", new)
    back = load_checkpoint(path)
    assert back.decide_every == 24 and back.objective == "expected_pnl"
    payload = bundle_to_payload(old)
    del payload["decide_every"]
    torch.save(payload, tmp_path / "legacy.pt")
    assert load_checkpoint(tmp_path / "legacy.pt").decide_every == 1
    assert changes_position_table("long_only")[1].tolist() == [0.0, 1.0, 0.0]
