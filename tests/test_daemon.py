"""The daemon's tick, in-process: observations equal the offline ones, stale feeds, gaps, the halt, learning.

Helpers here (`make_checkpoint`, `replay_daemon`, `FakeClock`) are shared with test_replay and test_runner.
Every test builds its own small checkpoint (a seeded random PolicyNet with a standardiser fitted on real
candles): the shipped checkpoints/default.pt is not needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import structlog
import torch

from bot.commands.run import Components, build_daemon
from bot.commands.status import resume
from bot.daemon.learner import OnlineLearner
from bot.daemon.market import ReplayMarketData
from bot.daemon.state import EpisodeBatch, open_state_readonly
from bot.daemon.tick import Daemon, checkpoint_dir_for
from bot.errors import ConfigError
from bot.files.checkpoints import load_checkpoint, save_checkpoint
from bot.settings import load_settings, state_db_path
from strategies.bundle import ModelBundle, history_needed, observe
from strategies.candles import CANDLE_MS, CandleBatch, parse_utc_date_ms
from strategies.features import build_observations, compute_features, default_feature_spec, fit_standardizer
from strategies.policy import PolicyNet
from tests.fake_exchange import FakeExchange

DEC1 = parse_utc_date_ms("2024-12-01")


# ---------------------------------------------------------------------------------------------------
# Helpers shared with the other daemon test files.
# ---------------------------------------------------------------------------------------------------


def make_checkpoint(path: Path, candles: pd.DataFrame, *, seed: int = 7, mode: str = "long_short") -> Path:
    """A seeded random policy with a standardiser fitted on the first 30,000 real candles, saved to `path`."""
    spec = default_feature_spec()
    features = compute_features(candles.iloc[:30_000], spec)
    torch.manual_seed(seed)
    bundle = ModelBundle(
        model=PolicyNet(len(spec.names)).eval(),
        spec=spec,
        standardizer=fit_standardizer(features, slice(0, 30_000)),
        position_mode=mode,
        commission=0.001,
    )
    return save_checkpoint(path, bundle)


def settings_env(state_dir: Path, checkpoint: Path, **extra: Any) -> dict[str, str]:
    """RITMO_* settings for a test daemon."""
    env = {
        "RITMO_MODE": "replay",
        "RITMO_STATE_DIR": str(state_dir),
        "RITMO_CHECKPOINT": str(checkpoint),
        "RITMO_SEED": "1",
        "RITMO_LOG_FORMAT": "json",
    }
    env.update({f"RITMO_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def replay_daemon(state_dir: Path, checkpoint: Path, candles: pd.DataFrame, **extra: Any) -> Components:
    """A started daemon over a candle frame with the replay market (next-open fills, no market rules)."""
    settings = load_settings(settings_env(state_dir, checkpoint, **extra), env_file=None)
    return build_daemon(
        settings, ReplayMarketData(CandleBatch.from_frame(candles), settings.symbol), sleep=lambda s: None, rules=None
    )


def run_ticks(daemon: Daemon, first_now_ms: int, n: int) -> list[Any]:
    """n consecutive ticks at now = first_now_ms, +5 min, ..."""
    return [daemon.tick(first_now_ms + i * CANDLE_MS) for i in range(n)]


class FakeClock:
    """Exchange time of a FakeExchange; sleeping advances it (tests run a day of ticks in milliseconds)."""

    def __init__(self, fake: FakeExchange) -> None:
        self.fake = fake
        self.slept: list[float] = []

    def now_ms(self) -> int:
        return self.fake.now_ms

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.fake.advance(round(seconds * 1000))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def _torch_one_thread() -> Iterator[None]:
    """The daemon's torch setting (bot.commands.run.single_threaded_torch), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def candles(candles_2024: pd.DataFrame) -> pd.DataFrame:
    """Nov-Dec 2024 plus enough warm-up (the replays here start on 2024-12-01)."""
    return candles_2024[candles_2024["ts_ms"] >= parse_utc_date_ms("2024-11-01")].reset_index(drop=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "test.pt", candles_2024)


# ---------------------------------------------------------------------------------------------------
# Observations.
# ---------------------------------------------------------------------------------------------------


def test_daemon_observation_equals_offline(candles_2024: pd.DataFrame, checkpoint: Path) -> None:
    """The window observation (what the daemon acts on) vs build_observations over the whole year."""
    bundle = load_checkpoint(checkpoint)
    offline = build_observations(
        compute_features(candles_2024, bundle.spec), bundle.standardizer, bundle.macro_window, bundle.micro_window
    )
    n = history_needed(bundle)
    assert n == 1265
    first = int(np.argmax(offline.valid))
    assert first == n - 1
    rows = [first, first + 1, 5_000, 20_000, 52_345, 80_000, 99_999, len(candles_2024) - 1]
    z_full = bundle.standardizer.transform(compute_features(candles_2024, bundle.spec))
    worst = worst_z = 0.0
    for row in rows:
        window = candles_2024.iloc[row - n + 1 : row + 1]
        got = observe(window, bundle)
        assert got is not None
        macro, micro = got
        worst = max(
            worst, float(np.abs(macro - offline.macro[row]).max()), float(np.abs(micro - offline.micro[row]).max())
        )
        # Underneath the float32 inputs: the standardised float64 features of the window's last 492 rows.
        z_win = bundle.standardizer.transform(compute_features(window, bundle.spec))[-bundle.macro_window :]
        worst_z = max(worst_z, float(np.abs(z_win - z_full[row - bundle.macro_window + 1 : row + 1]).max()))
    print(f"max |daemon - offline|: float32 network inputs {worst:.3g}, float64 standardised features {worst_z:.3g}")
    assert worst < 1e-5 and worst_z < 1e-5
    # One candle fewer than the window needs: no observation (the daemon would not act).
    assert observe(candles_2024.iloc[:first], bundle) is None


# ---------------------------------------------------------------------------------------------------
# Ticks.
# ---------------------------------------------------------------------------------------------------


def test_duplicate_tick_is_a_noop(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    comps = replay_daemon(tmp_path, checkpoint, candles)
    try:
        first = comps.daemon.tick(DEC1)
        assert first is not None and first.ts_ms == DEC1 - CANDLE_MS
        assert comps.daemon.tick(DEC1 + 60_000) is None  # same candle a minute later
        assert comps.store.decision_count() == 1
    finally:
        comps.store.close()


def test_realtime_day_of_ticks_against_the_fake_exchange(
    tmp_path: Path, candles: pd.DataFrame, checkpoint: Path
) -> None:
    """A day of paper ticks on exchange time (ticker fills, Binance's amount rules), in a second or two."""
    from bot.daemon.market import ExchangeMarketData
    from bot.exchange.client import ExchangeClient
    from bot.exchange.rules import MarketRules

    fake = FakeExchange(candles, now_ms=DEC1 + 5_000)
    clock = FakeClock(fake)
    settings = load_settings(settings_env(tmp_path, checkpoint, mode="paper"), env_file=None)
    market = ExchangeMarketData(ExchangeClient(fake, sleep=clock.sleep), "BTC/USDT")
    rules = MarketRules.from_ccxt_market(fake.market("BTC/USDT"), fake.precisionMode)
    comps = build_daemon(settings, market, sleep=clock.sleep, rules=rules)
    try:
        for _ in range(288):
            out = comps.daemon.tick(clock.now_ms())
            assert out is not None and out.status == "acted"
            fake.advance(CANDLE_MS)
        store = comps.store
        assert store.decision_count("acted") == 288
        fills = store.fills()
        assert fills, "a random policy trades"
        for f in fills:
            assert round(f["qty_base"] / 1e-05) * 1e-05 == pytest.approx(f["qty_base"], abs=1e-12)  # the step
            assert f["fee_quote"] == pytest.approx(0.001 * f["qty_base"] * f["price"], rel=1e-12)
        # Fills are at the ticker (the forming candle's price at the fake's clock), not at a close.
        closes = set(candles["close"].tolist())
        assert not any(f["price"] in closes for f in fills)
        assert fake.calls["fetch_ticker"] == len(store.conn.execute("SELECT * FROM orders").fetchall())
    finally:
        comps.store.close()


def test_stale_feed_skips_acting_and_logs(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    last = DEC1 + 10 * CANDLE_MS  # the exchange has candles up to (excluding) this open time
    fake = FakeExchange(candles[candles["ts_ms"] < last], now_ms=DEC1 + 5_000)
    clock = FakeClock(fake)
    settings = load_settings(
        settings_env(tmp_path, checkpoint, mode="paper", episode_steps=288, min_episode_steps=20), env_file=None
    )
    from bot.daemon.market import ExchangeMarketData
    from bot.exchange.client import ExchangeClient

    comps = build_daemon(
        settings, ExchangeMarketData(ExchangeClient(fake, sleep=clock.sleep), "BTC/USDT"), sleep=clock.sleep, rules=None
    )
    daemon, store = comps.daemon, comps.store
    try:
        for _ in range(11):
            assert daemon.tick(clock.now_ms()).status == "acted"
            fake.advance(CANDLE_MS)
        ledger_before = daemon.mem.ledger.to_dict()
        with structlog.testing.capture_logs() as logs:
            out = daemon.tick(clock.now_ms())
        assert out.status == "skipped" and out.reason == "stale_data"
        assert any(e["event"] == "stale_data" for e in logs)
        assert any(e["event"] == "tick" and e["status"] == "skipped" for e in logs)
        assert daemon.mem.ledger.to_dict() == ledger_before
        row = store.last_decision()
        assert (row["status"], row["reason"], row["action"]) == ("skipped", "stale_data", None)
        assert len(clock.slept) == 3  # the feed retried before giving up
        # The exchange catches up: the missed candle is never traded; the next is, and the episode was cut.
        fake.set_candles("BTC/USDT", candles)
        fake.advance(CANDLE_MS)
        with structlog.testing.capture_logs() as logs:
            out = daemon.tick(clock.now_ms())
        assert out.status == "acted" and out.ts_ms == last + CANDLE_MS
        assert store.conn.execute("SELECT status FROM decisions WHERE ts_ms = ?", (last,)).fetchone()[0] == "skipped"
        assert any(e["event"] == "episode_discarded" for e in logs)  # 11 settled steps < 20
        assert store.episode(1)["status"] == "discarded" and store.episode(1)["truncated"] == 1
    finally:
        store.close()


def test_missing_latest_candle_is_backfilled_by_the_retry(
    tmp_path: Path, candles: pd.DataFrame, checkpoint: Path
) -> None:
    from bot.daemon.market import ExchangeMarketData
    from bot.exchange.client import ExchangeClient
    from tests.test_feed import HidingExchange

    fake = HidingExchange(candles, now_ms=DEC1 + 5_000)
    clock = FakeClock(fake)
    settings = load_settings(settings_env(tmp_path, checkpoint, mode="paper"), env_file=None)
    comps = build_daemon(
        settings, ExchangeMarketData(ExchangeClient(fake, sleep=clock.sleep), "BTC/USDT"), sleep=clock.sleep, rules=None
    )
    try:
        comps.daemon.tick(clock.now_ms())
        fake.advance(CANDLE_MS)
        fake.hidden, fake.hide_times = {DEC1}, 1  # not published yet at the first fetch
        out = comps.daemon.tick(clock.now_ms())
        assert out.status == "acted" and out.ts_ms == DEC1 and len(clock.slept) == 1
        np.testing.assert_array_equal(
            comps.daemon.feed.buffer.window(2).column("close"),
            candles.set_index("ts_ms").loc[[DEC1 - CANDLE_MS, DEC1], "close"].to_numpy(),
        )
    finally:
        comps.store.close()


# ---------------------------------------------------------------------------------------------------
# Risk guards.
# ---------------------------------------------------------------------------------------------------


def test_drawdown_halt_latches_flattens_and_survives_restart(
    tmp_path: Path, candles: pd.DataFrame, checkpoint: Path
) -> None:
    comps = replay_daemon(tmp_path, checkpoint, candles, max_drawdown=0.004)
    daemon, store = comps.daemon, comps.store
    try:
        outs = run_ticks(daemon, DEC1, 200)
        halted = [o for o in outs if o.status == "halted"]
        assert halted, "a random policy paying 0.1% per trade loses 0.4% quickly"
        first = halted[0]
        assert first.position_after == 0  # flattened at the halt
        assert all(o.status == "halted" and o.position_after == 0 for o in outs[outs.index(first) :])
        assert [e["kind"] for e in store.events("halt")] == ["halt"]
        n_trades = daemon.mem.ledger.n_trades
        halted_at = first.ts_ms
    finally:
        store.close()
    # Restart: still halted, still flat, no trade, no learning.
    comps = replay_daemon(tmp_path, checkpoint, candles, max_drawdown=0.004)
    daemon, store = comps.daemon, comps.store
    try:
        outs = run_ticks(daemon, DEC1 + 200 * CANDLE_MS, 5)
        assert all(o.status == "halted" for o in outs)
        assert daemon.mem.ledger.n_trades == n_trades
        status = store.get_meta("halt")
        assert status["halted"] and status["since_ts_ms"] == halted_at
        # ritmo resume, while the daemon runs: the next tick trades again with the peak reset.
        result = resume(state_db_path(load_settings(settings_env(tmp_path, checkpoint), env_file=None)))
        assert result["changed"]
        out = daemon.tick(DEC1 + 205 * CANDLE_MS)
        assert out.status == "acted"
        assert [e["kind"] for e in store.events() if e["kind"] in ("halt", "resume")] == ["halt", "resume"]
    finally:
        store.close()


def test_position_mode_mismatch_is_refused(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match="RITMO_POSITION_MODE=long_only"):
        replay_daemon(tmp_path, checkpoint, candles, position_mode="long_only")


# ---------------------------------------------------------------------------------------------------
# Online learning.
# ---------------------------------------------------------------------------------------------------


def test_update_with_non_finite_loss_is_rejected_and_model_kept(tmp_path: Path, checkpoint: Path) -> None:
    bundle = load_checkpoint(checkpoint)
    learner = OnlineLearner(bundle, checkpoint_dir=tmp_path, seed=0, macro_every=11, keep=3)
    before = weights(learner.model)
    rng = np.random.default_rng(0)
    batch = EpisodeBatch(
        1,
        np.arange(10, dtype=np.int64),
        rng.normal(size=(10, 60)).astype(np.float32),
        rng.normal(size=(10, 60)).astype(np.float32),
        np.zeros(10, dtype=np.float32),
        rng.integers(0, 3, 10),
        np.full(10, np.nan),
    )
    out = learner.learn(batch, k=0, macro_updates=0)
    assert out.status == "rejected" and out.checkpoint_path is None
    after = weights(learner.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list(tmp_path.glob("online-*.pt"))
    good = EpisodeBatch(
        *[getattr(batch, f) for f in ("episode_id", "ts_ms", "macro", "micro", "positions", "actions")],
        rng.normal(0, 1e-3, 10),
    )
    out = learner.learn(good, k=1, macro_updates=0)
    assert out.status == "learned" and not out.learn_macro and Path(out.checkpoint_path).is_file()
    assert not all(torch.equal(before[k], learner.model.state_dict()[k]) for k in before)
    # MacroNet was frozen on update 1 (1 % 11 != 0).
    assert all(torch.equal(before[k], learner.model.state_dict()[k]) for k in before if k.startswith("macro."))


def test_learning_off_freezes_the_model(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    comps = replay_daemon(
        tmp_path, checkpoint, candles, episode_steps=24, min_episode_steps=12, online_learning="false"
    )
    try:
        version = comps.daemon.learner.version
        run_ticks(comps.daemon, DEC1, 80)
        statuses = [r[0] for r in comps.store.conn.execute("SELECT status FROM episodes ORDER BY id")]
        assert statuses == ["frozen", "frozen", "frozen", "open"]
        assert comps.store.update_count() == 0 and comps.daemon.learner.version == version
    finally:
        comps.store.close()


def test_truncated_episodes_learn_or_discard(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    comps = replay_daemon(tmp_path, checkpoint, candles, episode_steps=48, min_episode_steps=12)
    daemon, store = comps.daemon, comps.store
    try:
        run_ticks(daemon, DEC1, 30)
        # Downtime: three candles are never seen; the next tick acts on the newest closed candle only.
        now = DEC1 + 33 * CANDLE_MS
        with structlog.testing.capture_logs() as logs:
            out = daemon.tick(now)
        assert out.ts_ms == now - CANDLE_MS
        ep1 = store.episode(1)
        assert (ep1["status"], ep1["truncated"], ep1["settled"], ep1["k"]) == ("truncated_learned", 1, 30, 0)
        assert any(e["event"] == "online_update" for e in logs)
        assert (
            store.conn.execute(
                "SELECT COUNT(*) FROM decisions WHERE ts_ms BETWEEN ? AND ?",
                (DEC1 + 29 * CANDLE_MS, DEC1 + 31 * CANDLE_MS),
            ).fetchone()[0]
            == 0
        )
        run_ticks(daemon, now + CANDLE_MS, 4)  # episode 2 now has 5 steps
        with structlog.testing.capture_logs() as logs:
            daemon.tick(now + 10 * CANDLE_MS)
        assert store.episode(2)["status"] == "discarded"
        assert any(e["event"] == "episode_discarded" and e["settled_steps"] == 5 for e in logs)
        assert store.update_count() == 1
    finally:
        store.close()


def test_restart_mid_episode_continues_exactly(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    """60 ticks in one go == 37 ticks, close (as after a kill), restart, 23 ticks: ledger, steps, weights."""
    extra = {"episode_steps": 12, "min_episode_steps": 6, "macro_every": 2}
    a = replay_daemon(tmp_path / "a", checkpoint, candles, **extra)
    try:
        run_ticks(a.daemon, DEC1, 60)
        ref = (
            a.daemon.mem.ledger.to_dict(),
            a.daemon.mem.k,
            a.daemon.mem.macro_updates,
            weights(a.daemon.learner.model),
        )
        ref_steps = a.store.conn.execute("SELECT episode_id, step, ts_ms, action, reward FROM episode_steps").fetchall()
    finally:
        a.store.close()
    b = replay_daemon(tmp_path / "b", checkpoint, candles, **extra)
    run_ticks(b.daemon, DEC1, 37)  # mid-episode (37 = 3 * 12 + 1), learning happened
    b.store.close()
    b = replay_daemon(tmp_path / "b", checkpoint, candles, **extra)
    try:
        assert b.daemon.loaded.source == "online"
        run_ticks(b.daemon, DEC1 + 37 * CANDLE_MS, 23)
        got = (
            b.daemon.mem.ledger.to_dict(),
            b.daemon.mem.k,
            b.daemon.mem.macro_updates,
            weights(b.daemon.learner.model),
        )
        assert got[:3] == ref[:3]
        assert all(torch.equal(got[3][k], ref[3][k]) for k in ref[3])
        steps = b.store.conn.execute("SELECT episode_id, step, ts_ms, action, reward FROM episode_steps").fetchall()
        assert steps == ref_steps
        assert ref[1] == 4 and ref[2] == 2  # updates k = 0..3, MacroNet on k = 0 and 2
    finally:
        b.store.close()


def test_orphan_deleted_and_fallback_to_previous_checkpoint(
    tmp_path: Path, candles: pd.DataFrame, checkpoint: Path
) -> None:
    extra = {"episode_steps": 12, "min_episode_steps": 6, "keep_checkpoints": 2}
    comps = replay_daemon(tmp_path, checkpoint, candles, **extra)
    run_ticks(comps.daemon, DEC1, 40)  # 3 updates: k = 0, 1, 2
    db = comps.store.path
    comps.store.close()
    ckpt_dir = checkpoint_dir_for(db)
    assert sorted(p.name for p in ckpt_dir.glob("online-*.pt")) == ["online-000001.pt", "online-000002.pt"]
    (ckpt_dir / "online-000003.pt").write_bytes(b"a crash after saving, before recording")
    (ckpt_dir / "online-000002.pt").write_bytes(b"corrupt")
    comps = replay_daemon(tmp_path, checkpoint, candles, **extra)
    try:
        assert not (ckpt_dir / "online-000003.pt").exists()
        assert comps.daemon.loaded.path.name == "online-000001.pt"
        assert comps.store.events("checkpoint_fallback")
        assert comps.daemon.mem.k == 3  # the rhythm counter is the database's
    finally:
        comps.store.close()
    status = open_state_readonly(db)
    try:
        assert status.get_meta("model")["checkpoint_path"].endswith("online-000001.pt")
    finally:
        status.conn.close()


def test_ledger_identity_and_fees_add_up(tmp_path: Path, candles: pd.DataFrame, checkpoint: Path) -> None:
    comps = replay_daemon(tmp_path, checkpoint, candles, slippage_bps=2)
    try:
        outs = run_ticks(comps.daemon, DEC1, 100)
        ledger = comps.daemon.mem.ledger
        fills = comps.store.fills()
        assert sum(f["fee_quote"] for f in fills) == pytest.approx(ledger.fees_quote, rel=1e-12)
        assert sum(o.fee_quote for o in outs) == pytest.approx(ledger.fees_quote, rel=1e-12)
        assert len(fills) == ledger.n_trades
        qty = sum(f["qty_base"] * (1 if f["side"] == "buy" else -1) for f in fills)
        assert qty == pytest.approx(ledger.qty_base, abs=1e-12)
        cash = 10_000.0 - sum(f["notional_quote"] * (1 if f["side"] == "buy" else -1) + f["fee_quote"] for f in fills)
        assert cash == pytest.approx(ledger.cash_quote, rel=1e-9)
        row = comps.store.last_decision()
        assert row["equity_after"] == pytest.approx(ledger.cash_quote + ledger.qty_base * row["close"], rel=1e-15)
        assert math.isfinite(row["equity_after"])
    finally:
        comps.store.close()


def test_crash_between_checkpoint_save_and_record_redoes_the_update(
    tmp_path: Path, candles: pd.DataFrame, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update's checkpoint is on disk but its row is not: on restart the orphan goes and the update is redone."""
    from bot.daemon.state import StateStore

    extra = {"episode_steps": 12, "min_episode_steps": 6}
    ref = replay_daemon(tmp_path / "ref", checkpoint, candles, **extra)
    try:
        run_ticks(ref.daemon, DEC1, 30)
        expected = (ref.daemon.mem.ledger.to_dict(), ref.daemon.mem.k, weights(ref.daemon.learner.model))
    finally:
        ref.store.close()

    comps = replay_daemon(tmp_path / "crash", checkpoint, candles, **extra)
    original = StateStore.record_update

    def crash(self: StateStore, row: dict[str, Any]) -> None:
        if row["k"] == 1:
            raise KeyboardInterrupt("power cut")  # after online-000001.pt was written, before its row
        original(self, row)

    monkeypatch.setattr(StateStore, "record_update", crash)
    with pytest.raises(KeyboardInterrupt):
        run_ticks(comps.daemon, DEC1, 30)
    comps.store.close()  # the process is gone; only the database and the files remain
    monkeypatch.setattr(StateStore, "record_update", original)
    ckpt_dir = checkpoint_dir_for(comps.store.path)
    assert (ckpt_dir / "online-000001.pt").exists()  # the orphan
    comps = replay_daemon(tmp_path / "crash", checkpoint, candles, **extra)
    try:
        assert comps.store.update_count() == 2  # the pending episode's update was redone at start
        # Continue with the ticks the crashed run never made, up to the reference's last one (now = DEC1 + 29 x 5 min).
        first_now = comps.daemon.mem.last_decision_ts_ms + 2 * CANDLE_MS
        run_ticks(comps.daemon, first_now, (DEC1 + 29 * CANDLE_MS - first_now) // CANDLE_MS + 1)
        got = (comps.daemon.mem.ledger.to_dict(), comps.daemon.mem.k, weights(comps.daemon.learner.model))
        assert got[:2] == expected[:2]
        assert all(torch.equal(got[2][k], expected[2][k]) for k in expected[2])
    finally:
        comps.store.close()
