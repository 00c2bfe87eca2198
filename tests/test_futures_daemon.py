"""The live daemon on Binance USD-M futures (long_short): ticks of a policy that flips often, on the fake futures
account, with funding payments; the ledger equals the account after every tick."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from bot.files.checkpoints import load_checkpoint, save_checkpoint
from tests.fake_futures import SYMBOL, FakeFutures, ledger_cash
from tests.test_daemon import make_checkpoint
from tests.test_live_daemon_faults import CAP, KEY, SECRET, START, Live


@pytest.fixture(autouse=True)
def _isolated(isolated_process: None) -> None:
    """Process state isolated (tests/conftest.py); the daemon's one torch thread."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def flipping_ckpt(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    """A long_short random policy that rarely holds: BUY or SELL with ~47% each, so it flips long <-> short."""
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "flip.pt", candles_2024, mode="long_short", seed=5)
    bundle = load_checkpoint(path)
    with torch.no_grad():
        bundle.model.head.net[-1].weight.mul_(0.01)
        bundle.model.head.net[-1].bias.copy_(torch.tensor([-2.0, 0.0, 0.0]))
    return save_checkpoint(path, bundle)


@pytest.fixture
def candles(candles_2024: pd.DataFrame) -> pd.DataFrame:
    """The warm-up before 2024-12-01 and a day to trade."""
    ts = candles_2024["ts_ms"]
    return candles_2024[(ts >= START - 7 * 86_400_000) & (ts < START + 2 * 86_400_000)].reset_index(drop=True)


def futures_fake(candles: pd.DataFrame, wallet: float = 10_000.0) -> FakeFutures:
    """A fresh USD-M account (cross 20x, as Binance opens one) with the real candles, keys set."""
    fake = FakeFutures(now_ms=START, wallet=wallet, min_notional="5")
    fake.set_candles(SYMBOL, candles)
    fake.apiKey, fake.secret = KEY, SECRET
    return fake


def assert_matches(live: Live, fake: FakeFutures) -> dict[str, Any]:
    """The stored ledger is the account: qty = the position, cash = wallet - q * entry, position = its sign."""
    ledger = live.ledger()
    qty, _ = fake.position()
    assert ledger["qty_base"] == pytest.approx(qty, abs=1e-12)
    assert ledger["cash_quote"] == pytest.approx(ledger_cash(fake), abs=1e-6)
    assert ledger["position"] == (qty > 0) - (qty < 0)
    return ledger


def test_long_short_daemon_flips_and_tracks_the_futures_account(
    tmp_path: Path, candles: pd.DataFrame, flipping_ckpt: Path
) -> None:
    fake = futures_fake(candles)
    live = Live(
        tmp_path / "state",
        flipping_ckpt,
        candles,
        fake,  # type: ignore[arg-type]
        exchange="binanceusdm",
        symbol=SYMBOL,
    )
    assert (fake.margin_mode, fake.leverage) == ("isolated", 1)  # set explicitly at start
    positions = []
    for i in range(96):
        if i == 40:
            assert fake.position()[0] != 0, "the policy should hold a position here"
            fake.pay_funding(-3.25)  # paid by the position's side: the wallet moves, nothing else
        out = live.tick()
        assert out is not None and out.status in ("acted", "rejected"), out
        ledger = assert_matches(live, fake)
        positions.append(ledger["position"])
        # Exposure never exceeds the cap (RITMO_MAX_POSITION_QUOTE) beyond the 3% price guard.
        close = live.store.get_meta("last_candle")["close"]
        assert abs(ledger["qty_base"]) * close <= CAP * 1.03
    flips = sum(1 for a, b in itertools.pairwise(positions) if a * b < 0)
    assert flips >= 5 and -1 in positions and 1 in positions, positions
    orders = live.orders()
    assert all(o["status"] == "filled" for o in orders.values())
    per_candle = Counter(o["decision_ts_ms"] for o in orders.values())
    assert max(per_candle.values()) == 1
    # Every reduce-only order only shrank the position (Binance would have refused it otherwise: -2022).
    assert len(fake.raw_orders) == len(orders)
    adjusted = [e for e in live.events() if e["event"] == "ledger_adjusted"]
    assert len(adjusted) == 1 and adjusted[0]["exchange_cash_quote"] - adjusted[0]["ledger_cash_quote"] == (
        pytest.approx(-3.25, abs=1e-6)
    )
    status = live.store.get_meta("broker")
    assert status["market"] == "usdm_futures" and status["breaker"]["state"] == "closed"
    live.store.close()


def test_hedge_mode_account_is_refused_before_any_order(
    tmp_path: Path, candles: pd.DataFrame, flipping_ckpt: Path
) -> None:
    from bot.errors import ConfigError

    fake = futures_fake(candles)
    fake.hedged = True
    with pytest.raises(ConfigError, match="hedge mode"):
        Live(tmp_path / "state", flipping_ckpt, candles, fake, exchange="binanceusdm", symbol=SYMBOL)  # type: ignore[arg-type]
    assert fake.raw_orders == []
