"""Fault injection at the DAEMON level in live mode: `Daemon.tick` with a LiveBroker on a FakeExchange.

Each test builds the live daemon as `ritmo run` does (bot.commands.run.build_daemon + live_broker_factory: the live
start checks, the API key's permissions, a LiveBroker, the ledger opened from the exchange's balances) over
real 2024 candles, then ticks it through hours or a day of 5-minute candles with a clock that moves the
fake's (sleeping only advances it: nothing really waits), injecting one fault at a time. The authentication
cases go through `run_realtime` itself (`--once`, and the scheduler).

Every test ends with `assert_books`: no client id sent twice and at most one exchange order per candle;
every exchange order is in the state's `orders` table, filled, with one recorded fill per exchange trade;
no order left pending; the state's ledger (meta "ledger") equals the exchange's balances, its fees equal
the exchange's fees converted to quote, and the daemon's in-memory ledger equals the stored one. And the
fixture that built the daemon checks that the API key and secret appear neither in the captured logs nor in
any file under the state directory.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from bot.commands import run as runner
from bot.daemon import service
from bot.daemon.feed import last_closed_open_ms
from bot.daemon.market import ExchangeMarketData
from bot.daemon.report import collect_status
from bot.daemon.state import StateStore, open_state_readonly
from bot.daemon.tick import Daemon, TickOutcome
from bot.errors import EXIT_NOPERM, AuthenticationExchangeError
from bot.exchange.client import ExchangeClient
from bot.logs import configure_logging
from bot.settings import LIVE_CONFIRM_PHRASE, Settings, load_settings, state_db_path
from strategies.bundle import observe
from strategies.candles import CANDLE_MS, parse_utc_date_ms
from strategies.policy import probs_for_all_positions
from tests.conftest import assert_secrets_absent
from tests.fake_exchange import FakeExchange
from tests.test_daemon import FakeClock, make_checkpoint, settings_env
from tests.test_live_broker import KeyedFake
from tests.test_live_run import buying_checkpoint
from tests.test_runner import SteppingClock

# Known credentials: every test asserts they appear in no log line and no state file.
KEY = "dmnKeyQ7w2E9r4T1y8U5i3O6p0AsDfGhJkLzXcVbNmQwErTyUiOp"
SECRET = "dmnSecretM4n7B1v9C3x6Z2l8K5j0HgFdSaPoIuYtReWqAsDfGhJk"
CAP = 1_000.0  # RITMO_MAX_POSITION_QUOTE on a 10,000 USDT account: ~1,000 USDT per BUY
DEC1 = parse_utc_date_ms("2024-12-01")
START = DEC1 + 5_000  # the first tick: 5 s after the 00:00 close (it acts on the 23:55 candle)
BNB_PRICE = 600.0


# ---------------------------------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(isolated_process: None) -> None:
    """Process state isolated (tests/conftest.py)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def candles(candles_2024: pd.DataFrame) -> pd.DataFrame:
    """2024-11-25 .. 2024-12-03: the 1265-candle warm-up before 2024-12-01 and two days to trade."""
    keep = (candles_2024["ts_ms"] >= parse_utc_date_ms("2024-11-25")) & (
        candles_2024["ts_ms"] < parse_utc_date_ms("2024-12-03")
    )
    return candles_2024[keep].reset_index(drop=True)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    """A seeded random long_only policy: sampled, it trades every few candles."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt", candles_2024, mode="long_only")


@pytest.fixture(scope="module")
def buy_ckpt(tmp_path_factory: pytest.TempPathFactory, candles_2024: pd.DataFrame) -> Path:
    """A long_only policy that always says BUY: one buy, then it holds."""
    return buying_checkpoint(tmp_path_factory.mktemp("ckpt") / "buy.pt", candles_2024)


# ---------------------------------------------------------------------------------------------------
# The live daemon under test.
# ---------------------------------------------------------------------------------------------------


def live_settings(state_dir: Path, checkpoint: Path, **extra: Any) -> Settings:
    """Live settings: confirmation, known keys, the cap, no online learning (the updates cost seconds)."""
    values: dict[str, Any] = {
        "mode": "live",
        "live_confirm": LIVE_CONFIRM_PHRASE,
        "api_key": KEY,
        "api_secret": SECRET,
        "max_position_quote": CAP,
        "online_learning": "false",
    }
    values.update(extra)
    return load_settings(settings_env(state_dir, checkpoint, **values), env_file=None)


def make_fake(candles: pd.DataFrame, **kwargs: Any) -> KeyedFake:
    """A FakeExchange (with Binance's apiRestrictions endpoint) holding 10,000 USDT, keys set, clock at START."""
    kwargs.setdefault("balances", {"USDT": 10_000.0})
    if kwargs.get("fee_asset") == "BNB":
        kwargs.setdefault("bnb_price", BNB_PRICE)
    fake = KeyedFake(candles, now_ms=START, **kwargs)
    fake.apiKey, fake.secret = KEY, SECRET
    return fake


def capture_logs_to(settings: Settings) -> io.StringIO:
    """JSON logs into a buffer, masking the settings' secrets (as `ritmo run` configures them)."""
    out = io.StringIO()
    configure_logging("json", "INFO", stream=out, secrets=settings.secret_values())
    return out


class Live:
    """A started live daemon on a FakeExchange, ticked on 5-minute boundaries of the fake's clock."""

    def __init__(self, state_dir: Path, checkpoint: Path, candles: pd.DataFrame, fake: KeyedFake, **extra: Any):
        self.settings = live_settings(state_dir, checkpoint, **extra)
        self.state_dir = state_dir
        self.out = capture_logs_to(self.settings)
        self.fake = fake
        self.clock = FakeClock(fake)
        # What run_realtime does before the daemon is built (markets, market rules, the live broker factory).
        client = ExchangeClient(fake, sleep=self.clock.sleep)
        client.check_symbol(self.settings.symbol)
        market = ExchangeMarketData(client, self.settings.symbol)
        rules = client.market_rules(self.settings.symbol)
        comps = runner.build_daemon(
            self.settings,
            market,
            sleep=self.clock.sleep,
            rules=rules,
            make_broker=runner.live_broker_factory(self.settings, client, self.clock, env_file=None),
        )
        self.daemon: Daemon = comps.daemon
        self.store: StateStore = comps.store
        self.n = 0  # ticks so far: tick i runs at START + i * 5 min
        self.ledgers: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}  # candle -> ledger before, after

    def tick(self, offset_ms: int = 5_000) -> TickOutcome | None:
        """The next scheduled tick, `offset_ms` after its 5-minute boundary (later if sleeping moved the clock)."""
        boundary = START - 5_000 + self.n * CANDLE_MS
        self.n += 1
        self.fake.now_ms = max(self.fake.now_ms, boundary + offset_ms)
        before = self.ledger()
        out = self.daemon.tick(self.fake.now_ms)
        if out is not None:
            self.ledgers[out.ts_ms] = (before, self.ledger())
        return out

    def run(self, n: int, before_each: Callable[[Live], None] | None = None) -> list[TickOutcome | None]:
        """n consecutive ticks; `before_each(self)` runs before every one (to inject a fault)."""
        outs = []
        for _ in range(n):
            if before_each is not None:
                before_each(self)
            outs.append(self.tick())
        return outs

    def ledger(self) -> dict[str, Any]:
        """The ledger as the state database holds it."""
        return dict(self.store.get_meta("ledger"))

    def decisions(self) -> dict[int, dict[str, Any]]:
        """Decision rows by candle."""
        return {r["ts_ms"]: r for r in rows(self.store, "decisions")}

    def orders(self) -> dict[str, dict[str, Any]]:
        """Order rows by client id."""
        return {r["client_order_id"]: r for r in rows(self.store, "orders")}

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines so far."""
        return [json.loads(line) for line in self.out.getvalue().splitlines() if line.startswith("{")]


@pytest.fixture
def start_live(tmp_path: Path) -> Iterator[Callable[..., Live]]:
    """Build live daemons; afterwards close them and check that no secret reached a log line or a state file."""
    made: list[Live] = []

    def make(checkpoint: Path, candles: pd.DataFrame, fake: KeyedFake | None = None, **extra: Any) -> Live:
        live = Live(tmp_path / f"state{len(made)}", checkpoint, candles, fake or make_fake(candles), **extra)
        made.append(live)
        return live

    yield make
    for live in made:
        live.store.close()
        assert live.events(), "nothing was logged"
        assert_no_secret(live.out.getvalue(), live.state_dir)
        assert "***" not in live.out.getvalue()  # nothing secret-like was even logged (to be masked)


# ---------------------------------------------------------------------------------------------------
# The checks every case ends with.
# ---------------------------------------------------------------------------------------------------


def rows(store: StateStore, table: str) -> list[dict[str, Any]]:
    """Every row of a state table, as dicts."""
    cur = store.conn.execute(f"SELECT * FROM {table}")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def sent_client_ids(fake: FakeExchange) -> list[str]:
    """The client id of every create_order call, in order (whether or not the order executed)."""
    return [kw["params"]["newClientOrderId"] for name, kw in fake.call_log if name == "create_order"]


def fee_in_quote(trade: dict[str, Any], fake: FakeExchange) -> float:
    """An exchange trade's fee in USDT: USDT as is, BTC at the trade's price, BNB at the BNB/USDT ticker."""
    fee = trade["fee"]
    if fee["currency"] == "USDT":
        return fee["cost"]
    if fee["currency"] == "BTC":
        return fee["cost"] * trade["price"]
    return fee["cost"] * fake.ticker_prices[f"{fee['currency']}/USDT"]


def assert_books(store: StateStore, fake: FakeExchange, daemon: Daemon | None = None) -> None:
    """No double order, no lost fill, ledger == exchange balances, fees == the exchange's fees in quote."""
    orders = {r["client_order_id"]: r for r in rows(store, "orders")}
    fills = rows(store, "fills")
    sent = sent_client_ids(fake)
    assert len(sent) == len(set(sent)), f"a client id was sent twice: {Counter(sent).most_common(3)}"
    assert set(sent) <= set(orders), "an order left the process without its intent recorded"
    per_candle = Counter(orders[o["clientOrderId"]]["decision_ts_ms"] for o in fake.orders)
    assert max(per_candle.values(), default=0) <= 1, "two exchange orders for one candle"
    for order in fake.orders:
        row = orders[order["clientOrderId"]]
        assert row["status"] == "filled", row
        assert row["side"] == order["side"]
        booked = [f for f in fills if f["client_order_id"] == order["clientOrderId"]]
        assert len(booked) == len(order["trades"]), f"lost or doubled fill of {order['clientOrderId']}"
        for fill, trade in zip(booked, order["trades"], strict=True):
            assert fill["side"] == trade["side"] and fill["price"] == trade["price"]
            base_fee = trade["fee"]["cost"] if trade["fee"]["currency"] == "BTC" else 0.0
            qty = trade["amount"] - base_fee if trade["side"] == "buy" else trade["amount"] + base_fee
            assert fill["qty_base"] == pytest.approx(qty, abs=1e-12)
            assert fill["fee_quote"] == pytest.approx(fee_in_quote(trade, fake), rel=1e-9, abs=1e-12)
    on_exchange = {o["clientOrderId"] for o in fake.orders}
    assert {f["client_order_id"] for f in fills} == on_exchange, "a fill without an exchange order"
    assert {c for c, r in orders.items() if r["status"] == "filled"} == on_exchange
    assert store.pending_orders() == [], "an order was left pending"
    ledger = store.get_meta("ledger")
    assert ledger["cash_quote"] == pytest.approx(fake.balance("USDT"), abs=1e-6)
    assert ledger["qty_base"] == pytest.approx(fake.balance("BTC"), abs=1e-9)
    assert ledger["fees_quote"] == pytest.approx(sum(fee_in_quote(t, fake) for t in fake.trades), rel=1e-9)
    assert ledger["n_trades"] == len(fake.trades)
    if daemon is not None:
        assert daemon.mem is not None and daemon.mem.ledger.to_dict() == ledger, "cache and database differ"


def assert_no_secret(text: str, root: Path) -> None:
    """Neither the API key nor the secret is in `text` or in any file under `root`."""
    assert_secrets_absent((KEY, SECRET), text, root)


def check(live: Live) -> None:
    """assert_books on a Live."""
    assert_books(live.store, live.fake, live.daemon)


# ---------------------------------------------------------------------------------------------------
# Injecting one fault at a time into a running daemon.
# ---------------------------------------------------------------------------------------------------


@dataclass
class Fault:
    """A fault armed before a tick and consumed by the first call of `method` (then the next one is armed)."""

    name: str
    method: str
    inject: Callable[[FakeExchange], Any]


@dataclass
class Fired:
    """Where a fault struck: the candle of the tick, and the order sent in it (if any)."""

    ts_ms: int
    client_order_id: str | None


class FaultPlan:
    """Arms faults one after the other; records the tick (and the order) each one struck."""

    def __init__(self, faults: list[Fault]) -> None:
        self.todo = list(faults)
        self.armed: Fault | None = None
        self.calls_at_arming = 0
        self.sent_at_arming = 0
        self.fired: dict[str, Fired] = {}

    def __call__(self, live: Live) -> None:
        """Before a tick: note what the previous tick consumed, arm the next fault."""
        fake = live.fake
        if self.armed is not None and fake.calls[self.armed.method] > self.calls_at_arming:
            sent = sent_client_ids(fake)
            coid = sent[self.sent_at_arming] if len(sent) > self.sent_at_arming else None
            ts = live.daemon.mem.last_decision_ts_ms if live.daemon.mem else None
            self.fired[self.armed.name] = Fired(int(ts or 0), coid)
            self.armed = None
        if self.armed is None and self.todo:
            self.armed = self.todo.pop(0)
            self.calls_at_arming = fake.calls[self.armed.method]
            self.sent_at_arming = len(sent_client_ids(fake))
            self.armed.inject(fake)

    @property
    def done(self) -> bool:
        """Every fault has struck."""
        return not self.todo and self.armed is None


# ---------------------------------------------------------------------------------------------------
# 1. The candle feed: holes, duplicates, late candles, the forming candle.
# ---------------------------------------------------------------------------------------------------


def expected_probs(live: Live, served: pd.DataFrame, ts_ms: int, position: int) -> list[float]:
    """P(HOLD, BUY, SELL) from the closed candles the exchange served up to ts_ms (no look-ahead possible)."""
    first = last_closed_open_ms(START) - (live.daemon.history - 1) * CANDLE_MS  # the warm-up window's start
    seen = served.drop_duplicates("ts_ms")
    window = seen[(seen["ts_ms"] >= first) & (seen["ts_ms"] <= ts_ms)].tail(live.daemon.history)
    obs = observe(window.reset_index(drop=True), live.daemon.bundle)
    assert obs is not None
    macro, micro = (torch.from_numpy(x[None]) for x in obs)
    table = probs_for_all_positions(live.daemon.learner.model, macro, micro)
    return [float(p) for p in table[0, position + 1]]


def test_feed_holes_duplicates_late_and_forming_candles(
    start_live: Callable[..., Live], random_ckpt: Path, candles: pd.DataFrame
) -> None:
    """Binance's klines as they really come: a hole in the history that never gets filled, candles repeated in
    one response, the newest candle published late (twice in a row), a recent candle lost for good, and the
    forming candle in every response. Nothing is decided on a forming candle, no decision sees a later candle,
    a missing newest candle skips the tick (stale_data), late candles are backfilled, and trading goes on."""
    at = lambda minutes: DEC1 + minutes * 60_000  # noqa: E731
    ts = candles["ts_ms"]
    lost = ts.isin([at(-600), at(-595), at(-590), at(180)])  # 3 in the warm-up window, 1 at 03:00
    served = candles[~lost]
    repeated = served[served["ts_ms"].isin([at(-3000), at(-2000), at(60), at(65), at(150)])]
    served = pd.concat([served, repeated, repeated]).sort_values("ts_ms", kind="stable").reset_index(drop=True)
    late = served["ts_ms"].isin([at(120), at(125)])  # 02:00 and 02:05 appear only at 02:15

    fake = make_fake(candles)
    fake.set_candles("BTC/USDT", served)
    live = start_live(random_ckpt, candles, fake)
    for i in range(60):
        if i == 25:  # the tick acting on 02:00: it and 02:05 are not published yet
            fake.set_candles("BTC/USDT", served[~late])
        if i == 27:
            fake.set_candles("BTC/USDT", served)
        out = live.tick(offset_ms=0 if i % 10 == 3 else 5_000)  # some ticks right on the boundary
        assert out is not None
        # The forming candle never enters the buffer: the newest candle held is the one decided on.
        assert live.daemon.feed.buffer.last_ts_ms <= out.ts_ms < fake.now_ms - CANDLE_MS + 1

    decisions = live.decisions()
    assert len(decisions) == 60
    skipped = {t: d["reason"] for t, d in decisions.items() if d["status"] == "skipped"}
    # The warm-up window lacks its 3 lost candles: the first 3 ticks wait for 3 more (too few rows to observe).
    warmup = {at(-5): "warmup", at(0): "warmup", at(5): "warmup"}
    assert skipped == {**warmup, at(120): "stale_data", at(125): "stale_data", at(180): "stale_data"}
    assert not [o for o in live.orders().values() if o["decision_ts_ms"] in skipped]
    closes = candles.set_index("ts_ms")["close"]
    for t, d in decisions.items():
        if d["status"] == "skipped":
            continue
        assert d["status"] == "acted", d
        assert d["close"] == closes[t]  # the closed candle's close, never a forming one's
        probs = [d["p_hold"], d["p_buy"], d["p_sell"]]
        assert probs == pytest.approx(expected_probs(live, served, t, d["position_before"]), abs=1e-6)
    # The late candles were backfilled; the lost one left a hole; the repeats were kept once.
    held = set(live.daemon.feed.buffer.ts_ms.tolist())
    assert {at(120), at(125), at(150)} <= held and at(180) not in held
    assert len(held) == len(live.daemon.feed.buffer)
    events = live.events()
    assert [e for e in events if e["event"] == "candle_gap"]
    # Trading went on after every fault.
    traded_after = [o for o in live.orders().values() if o["decision_ts_ms"] > at(185)]
    assert traded_after and all(o["status"] == "filled" for o in traded_after)
    check(live)


# ---------------------------------------------------------------------------------------------------
# 2. Ambiguous sends: timeouts, 5xx, -1007, a reset connection; before and after the order executes.
# ---------------------------------------------------------------------------------------------------


def _not_visible_for(ms: int) -> Callable[[FakeExchange], None]:
    """A timeout after the order executed, and the exchange's order queries lag `ms` behind it."""

    def inject(fake: FakeExchange) -> None:
        fake.fail_after_execute("create_order", "timeout")
        fake.order_visibility_lag_ms = ms

    return inject


# (fault, its injection, the order's final status: filled = it executed, rejected = it never did)
AMBIGUOUS: list[tuple[str, Callable[[FakeExchange], Any], str]] = [
    ("timeout_before_execute", lambda f: f.fail_next("create_order", "timeout"), "rejected"),
    ("timeout_after_execute", lambda f: f.fail_after_execute("create_order", "timeout"), "filled"),
    ("5xx_before_execute", lambda f: f.fail_next("create_order", "500"), "rejected"),
    ("5xx_after_execute", lambda f: f.fail_after_execute("create_order", "500"), "filled"),
    ("1007_before_execute", lambda f: f.fail_next("create_order", "1007"), "rejected"),
    ("1007_after_execute", lambda f: f.fail_after_execute("create_order", "1007"), "filled"),
    ("reset_after_execute", lambda f: f.fail_after_execute("create_order", "reset"), "filled"),
    # Not found during the ~9 s grace period: left unknown, settled by the next tick's reconciliation.
    ("timeout_after_execute_invisible_30s", _not_visible_for(30_000), "filled"),
]


def test_ambiguous_order_errors_over_a_day_are_looked_up_never_resent(
    start_live: Callable[..., Live], random_ckpt: Path, candles: pd.DataFrame
) -> None:
    """A day of trading (288 ticks, ~100 orders) through every way a send can end without an answer: a timeout
    or a 5xx before the matching engine or on the way back, Binance's -1007 "execution status unknown", a reset
    connection, and an order the exchange only shows 30 s after a timeout. Each order is sent once, looked up by
    its client id, booked if it executed, closed if it did not; none is re-sent, no fill is lost."""
    live = start_live(random_ckpt, candles)
    plan = FaultPlan([Fault(name, "create_order", inject) for name, inject, _ in AMBIGUOUS])
    live.run(288, plan)
    assert plan.done
    orders, decisions = live.orders(), live.decisions()
    for name, _, final in AMBIGUOUS:
        fired = plan.fired[name]
        assert fired.client_order_id is not None, name
        row = orders[fired.client_order_id]
        assert row["status"] == final, (name, row)
        on_exchange = [o for o in live.fake.orders if o["clientOrderId"] == fired.client_order_id]
        assert len(on_exchange) == (final == "filled"), name
        decision = decisions[row["decision_ts_ms"]]
        assert decision["status"] == "acted"
        if final == "rejected" or name.endswith("invisible_30s"):
            # Not found within the grace period: the tick recorded the outcome as unknown ...
            assert decision["reason"].startswith("order outcome unknown"), (name, decision)
            # ... and the next tick's reconciliation settled it before deciding anything.
            assert row["detail"] in ("not found on the exchange", "reconciled on start"), (name, row)
            later = decisions[row["decision_ts_ms"] + CANDLE_MS]
            assert later["status"] == "acted"
        else:
            assert decision["reason"] is None and decision["fee_quote"] > 0  # found and booked at once
    invisible = orders[plan.fired["timeout_after_execute_invisible_30s"].client_order_id]
    [fill] = [f for f in rows(live.store, "fills") if f["client_order_id"] == invisible["client_order_id"]]
    assert fill["trade_id"] is not None  # booked by reconciliation, from the exchange's trade
    looked_up = Counter(kw["params"].get("origClientOrderId") for n, kw in live.fake.call_log if n == "fetch_order")
    for name, _, final in AMBIGUOUS:
        # Looked up by client id: once when found at once, 3 times (the grace period) + 1 (next tick) otherwise.
        expected = 1 if final == "filled" and not name.endswith("invisible_30s") else 4
        assert looked_up[plan.fired[name].client_order_id] == expected, name
    assert len(live.fake.orders) > 50  # and trading went on all day
    events = [e["event"] for e in live.events()]
    assert events.count("order_ambiguous") == len(AMBIGUOUS)
    assert events.count("order_reconciled") + events.count("order_abandoned") == 4
    check(live)


def test_order_still_unresolved_at_the_next_tick_blocks_new_orders(
    start_live: Callable[..., Live], buy_ckpt: Path, candles: pd.DataFrame
) -> None:
    """A BUY times out after it executed and the exchange shows it only a minute later; at the next candle the
    order-query endpoint still answers 5xx while balances work. The first order's outcome is unknown, so the
    daemon must not send another BUY on top of it: that would double the position past RITMO_MAX_POSITION_QUOTE
    once the first one is found."""
    live = start_live(buy_ckpt, candles)
    live.fake.fail_after_execute("create_order", "timeout")
    live.fake.order_visibility_lag_ms = 60_000
    assert live.tick().reason.startswith("order outcome unknown")
    live.fake.fail_next("fetch_order", "500", times=5)  # the next tick's lookup gives up
    live.run(3)
    buys = [o for o in live.fake.orders if o["side"] == "buy"]
    assert len(buys) == 1, f"{len(buys)} BUY orders for one position: {[o['clientOrderId'] for o in buys]}"
    assert live.fake.balance("BTC") * buys[0]["price"] <= CAP * 1.001
    check(live)


# ---------------------------------------------------------------------------------------------------
# 3. Rate limits (429 + Retry-After) and IP bans (418) on the reads of a tick; 4. InvalidNonce.
# ---------------------------------------------------------------------------------------------------

# (fault, the call it hits, its injection, the Retry-After the tick must sleep)
READ_LIMITS: list[tuple[str, str, Callable[[FakeExchange], Any], float]] = [
    ("429_candles", "fetch_ohlcv", lambda f: f.rate_limit_next("fetch_ohlcv", 7), 7),
    ("418_candles", "fetch_ohlcv", lambda f: f.rate_limit_next("fetch_ohlcv", 31, status=418), 31),
    ("429_balance", "fetch_balance", lambda f: f.rate_limit_next("fetch_balance", 11), 11),
    ("418_balance", "fetch_balance", lambda f: f.rate_limit_next("fetch_balance", 33, status=418), 33),
    (
        "429_order_lookup",
        "create_order",
        lambda f: (f.fail_after_execute("create_order", "500"), f.rate_limit_next("fetch_order", 13)),
        13,
    ),
    (
        "418_trades_lookup",
        "create_order",
        lambda f: (f.fail_next("create_order", "timeout"), f.rate_limit_next("fetch_my_trades", 17, status=418)),
        17,
    ),
]


def test_rate_limits_and_ip_bans_on_reads_are_honoured(
    start_live: Callable[..., Live], random_ckpt: Path, candles: pd.DataFrame
) -> None:
    """Binance answers 429 Too Many Requests or 418 (IP banned) with a Retry-After header on the candles, the
    balance and the order lookups during live ticks. Each read waits exactly the Retry-After (the injected
    sleep sees it) before retrying; no order is lost or sent twice, and trading continues."""
    live = start_live(random_ckpt, candles)
    plan = FaultPlan([Fault(name, method, inject) for name, method, inject, _ in READ_LIMITS])
    live.run(72, plan)
    assert plan.done
    for name, _, _, retry_after in READ_LIMITS:
        assert retry_after in live.clock.slept, name
    backoffs = [e for e in live.events() if e["event"] == "exchange_backoff"]
    assert sorted(e["retry_after_s"] for e in backoffs) == sorted(r for *_, r in READ_LIMITS)
    # The rate-limited ticks still acted, their orders went through; every order is settled.
    decisions, orders = live.decisions(), live.orders()
    for name in ("429_candles", "418_candles"):
        assert decisions[plan.fired[name].ts_ms]["status"] == "acted", name
    for name in ("429_balance", "418_balance", "429_order_lookup"):
        assert orders[plan.fired[name].client_order_id]["status"] == "filled", name
    assert orders[plan.fired["418_trades_lookup"].client_order_id]["status"] == "rejected"  # never executed
    statuses = Counter(o["status"] for o in orders.values())
    assert set(statuses) <= {"filled", "rejected"} and statuses["filled"] > 10
    check(live)


def test_ip_ban_longer_than_a_read_can_wait_pauses_the_order(
    start_live: Callable[..., Live], buy_ckpt: Path, candles: pd.DataFrame
) -> None:
    """A 418 with Retry-After 600 s on the pre-flight balance read: the read does not hammer the exchange during
    the ban (no retry, no 600 s sleep inside the tick); nothing is sent for that candle, and the next candle buys."""
    live = start_live(buy_ckpt, candles)
    live.fake.rate_limit_next("fetch_balance", 600, status=418)
    calls = live.fake.calls["fetch_balance"]
    first = live.tick()
    assert first.status == "rejected" and first.reason.startswith("paused: exchange unavailable")
    assert live.fake.calls["fetch_balance"] == calls + 1 and 600 not in live.clock.slept
    assert live.fake.calls["create_order"] == 0 and live.orders() == {}
    live.fake.advance(600_000)  # the ban is over
    assert live.tick().status == "acted"
    assert [o["side"] for o in live.fake.orders] == ["buy"]
    check(live)


def test_rate_limit_on_the_ticker_read_is_honoured(
    start_live: Callable[..., Live], buy_ckpt: Path, candles: pd.DataFrame
) -> None:
    """A 429 with Retry-After 9 s on the ticker read that prices the order (right after the decision): the read
    must wait 9 s before retrying, as every other read does, or Binance escalates to a 418 IP ban."""
    live = start_live(buy_ckpt, candles)
    live.fake.rate_limit_next("fetch_ticker", 9)
    assert live.tick().status == "acted"
    assert [o["side"] for o in live.fake.orders] == ["buy"]
    check(live)
    assert 9 in live.clock.slept


def test_invalid_nonce_on_private_calls_resyncs_the_clock(
    start_live: Callable[..., Live], random_ckpt: Path, candles: pd.DataFrame
) -> None:
    """Binance -1021 "Timestamp for this request is outside of the recvWindow" (the host's clock drifted) on the
    pre-flight balance read and on an order lookup: the time offset is re-measured (load_time_difference) and
    the read succeeds at once. On the order itself -1021 is a refusal: rejected, nothing booked, trading goes on."""
    live = start_live(random_ckpt, candles)
    plan = FaultPlan(
        [
            Fault("nonce_balance", "fetch_balance", lambda f: f.fail_next("fetch_balance", "nonce")),
            Fault(
                "nonce_lookup",
                "create_order",
                lambda f: (f.fail_after_execute("create_order", "timeout"), f.fail_next("fetch_order", "nonce")),
            ),
            Fault("nonce_order", "create_order", lambda f: f.fail_next("create_order", "nonce")),
        ]
    )
    live.run(48, plan)
    assert plan.done
    assert live.fake.calls["load_time_difference"] == 2  # once per failed read, then it passed
    resyncs = [e for e in live.events() if e["event"] == "exchange_time_resync"]
    assert [e["op"] for e in resyncs] == ["fetch_balance", "fetch_order_by_client_id"]
    orders = live.orders()
    assert orders[plan.fired["nonce_lookup"].client_order_id]["status"] == "filled"
    refused = orders[plan.fired["nonce_order"].client_order_id]
    assert refused["status"] == "rejected" and "-1021" in refused["detail"]
    before, after = live.ledgers[refused["decision_ts_ms"]]
    assert after == before  # the refused order changed nothing
    assert any(o["status"] == "filled" and o["decision_ts_ms"] > refused["decision_ts_ms"] for o in orders.values())
    check(live)


# ---------------------------------------------------------------------------------------------------
# 5. Orders the exchange refuses.
# ---------------------------------------------------------------------------------------------------

REFUSALS: list[tuple[str, str]] = [
    ("insufficient", "-2010"),  # InsufficientFunds: the account holds less than Binance needs
    ("lot_size", "LOT_SIZE"),  # InvalidOrder: the amount breaks the lot size filter
    ("min_notional", "NOTIONAL"),  # BadRequest -1013: below the minimum notional
]


def test_refused_orders_are_rejected_without_a_ledger_change(
    start_live: Callable[..., Live], random_ckpt: Path, candles: pd.DataFrame
) -> None:
    """Binance refuses an order (-2010 insufficient balance, LOT_SIZE, -1013 NOTIONAL): the decision is recorded
    as rejected with the exchange's reason, the order row is rejected, nothing is looked up or re-sent, the
    ledger does not move, and the daemon keeps ticking and trading."""
    live = start_live(random_ckpt, candles)
    plan = FaultPlan(
        [Fault(kind, "create_order", lambda f, k=kind: f.fail_next("create_order", k)) for kind, _ in REFUSALS]
    )
    live.run(48, plan)
    assert plan.done
    orders, decisions = live.orders(), live.decisions()
    for kind, code in REFUSALS:
        row = orders[plan.fired[kind].client_order_id]
        assert row["status"] == "rejected" and code in row["detail"], (kind, row)
        decision = decisions[row["decision_ts_ms"]]
        assert decision["status"] == "rejected" and code in decision["reason"], (kind, decision)
        assert decision["position_after"] == decision["position_before"] and decision["fee_quote"] == 0
        before, after = live.ledgers[row["decision_ts_ms"]]
        assert after == before, kind
    assert live.fake.calls["fetch_order"] == 0  # a certain refusal needs no lookup
    last_refusal = max(orders[plan.fired[k].client_order_id]["decision_ts_ms"] for k, _ in REFUSALS)
    assert any(o["status"] == "filled" and o["decision_ts_ms"] > last_refusal for o in orders.values())
    check(live)


# ---------------------------------------------------------------------------------------------------
# 6. Authentication errors: exit code 77.
# ---------------------------------------------------------------------------------------------------


def run_once(settings: Settings, fake: FakeExchange) -> int:
    """`ritmo run --once` in-process on the fake exchange (the live start checks included)."""
    clock = FakeClock(fake)
    client = ExchangeClient(fake, sleep=clock.sleep)
    return runner.run_realtime(
        settings, once=True, greedy=False, stop=service.StopSignal(), client=client, clock=clock, env_file=None
    )


def test_authentication_error_on_an_order_stops_with_77_and_recovers(
    tmp_path: Path, buy_ckpt: Path, candles: pd.DataFrame
) -> None:
    """The API key is revoked (-2015) just as the daemon sends a BUY: `ritmo run --once` stops with the
    authentication error (exit code 77), the order is closed as rejected, nothing traded. With the key fixed,
    the restarted daemon does not act on that candle again, and buys on the next one."""
    settings = live_settings(tmp_path / "state", buy_ckpt)
    out = capture_logs_to(settings)
    fake = make_fake(candles)
    fake.fail_next("create_order", "invalid_key")
    with pytest.raises(AuthenticationExchangeError) as info:
        run_once(settings, fake)
    assert info.value.exit_code == EXIT_NOPERM == 77
    assert fake.calls["create_order"] == 1 and fake.orders == []
    assert run_once(settings, fake) == 0  # the same candle: recovered, not acted on twice
    fake.advance(CANDLE_MS)
    assert run_once(settings, fake) == 0
    store = open_state_readonly(state_db_path(settings))
    try:
        decisions = {r["ts_ms"]: r for r in rows(store, "decisions")}
        [refused, bought] = sorted(rows(store, "orders"), key=lambda r: r["decision_ts_ms"])
        assert refused["status"] == "rejected" and refused["detail"] == "authentication refused"
        assert decisions[refused["decision_ts_ms"]]["reason"] == "order_recovered_after_restart"
        assert bought["status"] == "filled" and decisions[bought["decision_ts_ms"]]["status"] == "acted"
        assert [o["clientOrderId"] for o in fake.orders] == [bought["client_order_id"]]
        assert_books(store, fake)
    finally:
        store.close()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e for e in events if e["event"] == "order_auth_failed"]
    assert_no_secret(out.getvalue(), tmp_path / "state")


def test_authentication_error_on_a_private_read_stops_the_scheduler_with_77(
    tmp_path: Path, buy_ckpt: Path, candles: pd.DataFrame
) -> None:
    """The key loses its permissions mid-run: the pre-flight balance read answers -2015 twice (ccxt reports it as
    DDoSProtection once a private call has succeeded). The scheduled daemon (the real APScheduler loop on a
    fast trigger) stops with exit code 77 instead of retrying forever; nothing was sent."""
    from apscheduler.triggers.interval import IntervalTrigger

    settings = live_settings(tmp_path / "state", buy_ckpt)
    out = capture_logs_to(settings)
    fake = make_fake(candles)
    # The start reads the balance twice (opening ledger, balance check); the tick's pre-flight read is the 3rd.
    fake.fail_next("fetch_balance", "invalid_key_after_auth", times=2, after=2)
    clock = SteppingClock(fake)
    stop = service.StopSignal().install()
    try:
        rc = runner.run_realtime(
            settings,
            once=False,
            greedy=False,
            stop=stop,
            client=ExchangeClient(fake, sleep=clock.sleep),
            clock=clock,
            trigger=IntervalTrigger(seconds=0.2, timezone=UTC),
            local_ms=lambda: fake.now_ms,
            env_file=None,
        )
    finally:
        stop.restore()
    assert rc == EXIT_NOPERM == 77
    assert fake.calls["create_order"] == 0 and fake.calls["fetch_balance"] == 4
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    [failed] = [e for e in events if e["event"] == "tick_failed"]
    assert "check the API key" in failed["action"]
    assert events[-1]["event"] == "stopped" and events[-1]["exit_code"] == 77
    store = open_state_readonly(state_db_path(settings))
    try:
        assert rows(store, "orders") == [] and rows(store, "decisions") == []  # the tick rolled back whole
        assert_books(store, fake)
    finally:
        store.close()
    assert_no_secret(out.getvalue(), tmp_path / "state")


def test_withdrawal_enabled_key_is_refused_at_start_with_77(
    tmp_path: Path, buy_ckpt: Path, candles: pd.DataFrame
) -> None:
    """The key can withdraw funds (Binance apiRestrictions enableWithdrawals): the live start check refuses it
    with exit code 77 before anything is read or traded."""
    settings = live_settings(tmp_path / "state", buy_ckpt)
    out = capture_logs_to(settings)
    fake = make_fake(candles)
    fake.can_withdraw = True
    with pytest.raises(AuthenticationExchangeError) as info:
        run_once(settings, fake)
    assert info.value.exit_code == 77
    assert fake.calls["fetch_balance"] == 0 and fake.calls["create_order"] == 0
    assert_no_secret(out.getvalue(), tmp_path / "state")


# ---------------------------------------------------------------------------------------------------
# 7. Partial fills, fees in the base asset and in BNB.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fee_asset", ["received", "BNB"])
def test_partial_fills_and_fees_in_base_or_bnb_keep_ledger_equal_to_balances(
    start_live: Callable[..., Live], random_ckpt: Path, candles: pd.DataFrame, fee_asset: str
) -> None:
    """Six hours of trading where Binance charges the fee in the asset received (BTC on a buy, USDT on a sell)
    or in BNB (until the BNB runs out, then in the asset received, as Binance does), and every fourth order is
    only partly filled (status expired, as a market order the book could not fill). The ledger's BTC and USDT
    equal the exchange's balances throughout; BNB fees count in fees_quote but never in cash."""
    fake = make_fake(candles, fee_asset=fee_asset)
    if fee_asset == "BNB":
        fake.set_balance("BNB", 0.02)  # ~16 orders' fees at 1,000 USDT x 0.075% / 600
    live = start_live(random_ckpt, candles, fake)
    partials = iter([0.5, 0.3, 0.71, 0.5, 0.2, 0.9, 0.5, 0.4])
    armed_at = -1

    def every_fourth_order_partial(live: Live) -> None:
        nonlocal armed_at
        n = fake.calls["create_order"]
        if n % 4 == 3 and n != armed_at:
            ratio = next(partials, None)
            if ratio is not None:
                fake.partial_fill_next(ratio)
                armed_at = n

    for _ in range(72):
        every_fourth_order_partial(live)
        live.tick()
        check(live)  # after every tick, not only at the end
    expired = [o for o in fake.orders if o["status"] == "expired"]
    assert len(expired) >= 5 and all(0 < o["filled"] < o["amount"] for o in expired)
    fee_currencies = Counter(t["fee"]["currency"] for t in fake.trades)
    if fee_asset == "BNB":
        assert fee_currencies["BNB"] >= 10 and fee_currencies["BTC"] + fee_currencies["USDT"] >= 5
        bnb_fees = sum(t["fee"]["cost"] for t in fake.trades if t["fee"]["currency"] == "BNB")
        assert fake.balance("BNB") == pytest.approx(0.02 - bnb_fees, abs=1e-12)
    else:
        assert fee_currencies["BTC"] >= 5 and fee_currencies["USDT"] >= 5
    assert len(fake.orders) > 20


# ---------------------------------------------------------------------------------------------------
# 8. The exchange down for an hour.
# ---------------------------------------------------------------------------------------------------

HOUR_MS = 3_600_000
PRIVATE_API = ("fetch_balance", "create_order", "fetch_order", "fetch_my_trades")


def go_down_for_an_hour(live: Live, methods: tuple[str, ...] | None = None) -> tuple[int, int]:
    """The exchange (or some of its calls) down from the next tick's 5-minute boundary for one hour: the next 12
    ticks fall inside the outage (their retries included); (start, end) of the outage."""
    boundary = START - 5_000 + live.n * CANDLE_MS
    live.fake.now_ms = max(live.fake.now_ms, boundary)
    live.fake.down_for(HOUR_MS, methods=methods)
    return live.fake.now_ms, live.fake.now_ms + HOUR_MS


def test_exchange_down_for_an_hour_skips_ticks_then_resumes(
    start_live: Callable[..., Live], random_ckpt: Path, candles: pd.DataFrame
) -> None:
    """Binance is unreachable for an hour (every call 503). Each tick during the outage finds no new candle and
    is skipped as stale_data, sending nothing; when the exchange is back the missing hour of candles is
    backfilled and trading resumes at the first tick, with the books matching."""
    live = start_live(random_ckpt, candles)
    live.run(12)
    down_from, down_until = go_down_for_an_hour(live)
    calls = Counter(live.fake.calls)
    during = live.run(12)
    assert live.fake.now_ms < down_until
    assert [o.status for o in during] == ["skipped"] * 12
    assert {o.reason for o in during} == {"stale_data"}
    private = {m: live.fake.calls[m] - calls[m] for m in PRIVATE_API}
    assert private == dict.fromkeys(PRIVATE_API, 0)  # not even a balance read: nothing was attempted
    after = live.run(36)
    assert live.fake.now_ms > down_until
    assert all(o.status == "acted" for o in after)
    assert live.daemon.feed.update(live.fake.now_ms).holes == ()  # the outage hour was backfilled
    assert any(o["timestamp"] > down_until for o in live.fake.orders)
    assert not any(down_from <= o["timestamp"] < down_until for o in live.fake.orders)
    assert collect_status(live.store)["broker"]["breaker"]["state"] == "closed"
    check(live)


def test_private_api_down_for_an_hour_opens_the_breaker_then_it_closes_by_itself(
    start_live: Callable[..., Live], buy_ckpt: Path, candles: pd.DataFrame
) -> None:
    """Binance's account and order services are down for an hour while market data still flows: every BUY's
    pre-flight balance read fails, the decision is recorded as paused, and after 5 failures the circuit breaker
    opens (meta "broker" and `ritmo status` show it); while open, nothing is even tried. After the outage the
    breaker half-opens after its cooldown, the trial succeeds, it closes by itself and the BUY goes through."""
    live = start_live(buy_ckpt, candles)
    _, down_until = go_down_for_an_hour(live, PRIVATE_API)
    outs, states = [], []
    for _ in range(12):
        outs.append(live.tick())
        breaker = collect_status(live.store)["broker"]["breaker"]
        assert live.store.get_meta("broker")["breaker"]["state"] == breaker["state"]
        states.append(breaker["state"])
    assert live.fake.now_ms < down_until
    # 5 failed pre-flight reads open it; then a trial per cooldown (5 min) fails and re-opens it.
    assert states[:4] == ["closed"] * 4 and states[4:] == ["open"] * 8
    assert all(o.status == "rejected" and o.reason.startswith("paused") for o in outs)
    assert sum("circuit breaker open" in o.reason for o in outs) >= 3  # open: not even tried
    assert live.fake.calls["create_order"] == 0 and live.orders() == {}
    breaker = collect_status(live.store)["broker"]["breaker"]
    assert breaker["trips"] >= 1 and "ExchangeNotAvailable" in breaker["last_error"] and breaker["half_opens_at"]
    after = live.run(4)
    assert [o.status for o in after] == ["acted"] * 4  # the first tick after the outage is the trial: it buys
    assert [o["side"] for o in live.fake.orders] == ["buy"]
    assert collect_status(live.store)["broker"]["breaker"]["state"] == "closed"
    events = [e["event"] for e in live.events()]
    assert "circuit_open" in events and "circuit_closed" in events
    check(live)


# ---------------------------------------------------------------------------------------------------
# 9. The drawdown halt flattens the live position.
# ---------------------------------------------------------------------------------------------------


def crash_from(candles: pd.DataFrame, ts_ms: int, factor: float) -> pd.DataFrame:
    """The candles with every price from ts_ms on multiplied by `factor` (a sudden market drop)."""
    out = candles.copy()
    later = out["ts_ms"] >= ts_ms
    for col in ("open", "high", "low", "close"):
        out.loc[later, col] = out.loc[later, col] * factor
    return out


def test_drawdown_halt_flattens_the_live_position_with_one_sell(
    start_live: Callable[..., Live], buy_ckpt: Path, candles: pd.DataFrame
) -> None:
    """BTC drops 20% within a candle while the daemon is long ~1,000 USDT of a 10,000 USDT account (a 2% equity
    drawdown, RITMO_MAX_DRAWDOWN=1%): the tick latches the halt and flattens with exactly one sell order
    (client id reason F = FLATTEN); every later tick is halted and sends nothing; `ritmo status` shows the halt."""
    drop_at = DEC1 + 6 * CANDLE_MS
    fake = make_fake(candles)
    fake.set_candles("BTC/USDT", crash_from(candles, drop_at, 0.8))
    live = start_live(buy_ckpt, candles, fake, max_drawdown="0.01")
    outs = live.run(24)
    by_ts = {o.ts_ms: o for o in outs}
    assert by_ts[DEC1 - CANDLE_MS].status == "acted" and by_ts[DEC1 - CANDLE_MS].position_after == 1
    halt_tick = by_ts[drop_at]
    assert halt_tick.status == "halted" and halt_tick.position_before == 1 and halt_tick.position_after == 0
    assert all(o.status == "halted" for o in outs if o.ts_ms > drop_at)
    assert [o["side"] for o in fake.orders] == ["buy", "sell"]
    sell = fake.orders[1]
    assert sell["clientOrderId"].endswith("-F0") and sell["filled"] == pytest.approx(fake.orders[0]["filled"])
    assert fake.balance("BTC") == pytest.approx(0.0, abs=1e-12)
    status = collect_status(live.store)
    assert status["halt"]["halted"] and "drawdown" in status["halt"]["reason"] and status["position"] == 0
    check(live)


def test_partly_filled_flatten_is_completed_on_the_next_tick(
    start_live: Callable[..., Live], buy_ckpt: Path, candles: pd.DataFrame
) -> None:
    """As above, but the flattening market sell only fills 40% (Binance expires the rest: the book was thin
    during the crash). The halt must not stop with 60% of the position still held: the next tick sells the
    rest, and the ledger's position says long until it has."""
    drop_at = DEC1 + 6 * CANDLE_MS
    fake = make_fake(candles)
    fake.set_candles("BTC/USDT", crash_from(candles, drop_at, 0.8))
    live = start_live(buy_ckpt, candles, fake, max_drawdown="0.01")
    live.run(7)
    fake.partial_fill_next(0.4)
    halt_tick = live.tick()
    assert halt_tick.ts_ms == drop_at and halt_tick.status == "halted"
    check(live)
    held_quote = fake.balance("BTC") * fake.orders[-1]["price"]
    assert held_quote > 100  # ~60% of the position is still held after the partial fill ...
    assert live.ledger()["position"] == 1  # ... so the ledger must still say long
    live.run(3)
    assert fake.balance("BTC") * fake.orders[-1]["price"] < 5.0  # the rest was sold
    check(live)
