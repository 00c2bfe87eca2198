"""The dashboard in a real browser: headless Chromium over `ritmo serve` and a state made by a real replay.

The rendered numbers must be exactly `ritmo status --json`'s (each carries the API's raw value in data-value),
and a click on "pause" must reach the daemon: the command is queued, and applied by the next stretch of replay
on the same state. A full-page screenshot is kept in test-artifacts/dashboard.png (also when a check fails).
Skipped only when Playwright or Chromium is missing (CI installs both: `apt-get install chromium`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from strategies.candles import parse_utc_date_ms
from tests.test_serve import STATE_ID, TOKEN, clean_env, free_port, run_replay, wait_for_server

REPO = Path(__file__).resolve().parent.parent
ARTIFACT = REPO / "test-artifacts" / "dashboard.png"
CHROMIUM = Path(os.environ.get("RITMO_CHROMIUM") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# The first stretch ends on a decision candle (the checkpoint decides every 4 hours), so the last decision has
# probabilities; the second continues exactly where it ended.
FIRST = ("2024-01-06", "2024-01-12T00:05")
SECOND = ("2024-01-12T00:05", "2024-01-13T00:05")

# CI (.ci/run) installs Chromium and sets RITMO_REQUIRE_BROWSER=1: there a missing browser fails, never skips.
_REQUIRED = os.environ.get("RITMO_REQUIRE_BROWSER") == "1"
_MISSING = None
try:
    from playwright import sync_api
except ImportError:
    _MISSING = "playwright not installed (pip install -e '.[dev]')"
if _MISSING is None and not CHROMIUM.is_file():
    _MISSING = f"Chromium not found at {CHROMIUM}: apt-get install chromium, or set RITMO_CHROMIUM to its binary"
if _MISSING is not None:
    if _REQUIRED:
        raise RuntimeError(f"RITMO_REQUIRE_BROWSER=1 but {_MISSING}")
    pytest.skip(_MISSING, allow_module_level=True)


def get(url: str) -> Any:
    """GET a JSON answer."""
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def status_json(state: Path) -> dict[str, Any]:
    """`ritmo status --json` for the state, as its own process."""
    out = subprocess.run(
        [sys.executable, "-m", "bot", "status", "--json", "--state-dir", str(state)],
        cwd=state.parent, env=clean_env(), capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)


def path_value(obj: Any, path: str) -> Any:
    for key in path.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A state after the first stretch of replay, and `ritmo serve` over it with a token (its base URL)."""
    state = tmp_path / "state"
    run_replay(state, *FIRST)
    port = free_port()
    env = clean_env(RITMO_API_TOKEN=TOKEN, RITMO_LOG_FORMAT="json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--state-dir", str(state), "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(f"{base}/api/states", proc)
        yield base, state
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert TOKEN not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# data-field -> how its text must read for the value (money and probabilities: the value to the digits shown).
MONEY = ("equity", "profit_quote", "fees_quote", "cash_quote", "entry_price", "unrealised_pnl_quote",
         "pnl_today_quote", "pnl_7d_quote", "buy_hold.equity", "buy_hold.profit_quote")  # fmt: skip
PROBS = ("last_decision.probs.hold", "last_decision.probs.buy", "last_decision.probs.sell")
POSITIONS = {1: "long", 0: "flat", -1: "short"}


def check_rendered(page: Any, status: dict[str, Any]) -> None:
    """Every shown figure carries the status's exact value and reads as that value, rounded as displayed."""

    def field(name: str) -> tuple[Any, str]:
        node = page.locator(f'#state-view [data-field="{name}"]')
        return json.loads(node.get_attribute("data-value")), node.inner_text().strip()

    for name in (*MONEY, *PROBS, "pnl_pct", "buy_hold.pct", "qty_base"):
        expected = path_value(status, name)
        value, text = field(name)
        assert value == expected, name
        if expected is None:
            assert text == "n/a", name
            continue
        digits = 3 if name in PROBS else 6 if name == "qty_base" else 2
        shown = float(text.replace(",", "").replace("%", "").replace("+", ""))
        assert abs(shown - expected) <= 0.5 * 10**-digits + 1e-9, (name, text, expected)
    for name in ("equity", "profit_quote", "n_trades", "position", *PROBS):
        assert path_value(status, name) is not None, name  # the replay gives every headline a value
    value, text = field("position")
    assert value == status["position"] and text == POSITIONS[status["position"]]
    value, text = field("n_trades")
    assert value == status["n_trades"] and text == str(status["n_trades"])
    value, text = field("last_decision.ts")
    assert value == text == status["last_decision"]["ts"]
    # The decisions table starts with the same decision and the same probabilities.
    first = page.locator("#decisions-table tbody tr").first
    assert int(first.get_attribute("data-ts-ms")) == status["last_decision"]["ts_ms"]
    for col, key in (("p_hold", "hold"), ("p_buy", "buy"), ("p_sell", "sell")):
        cell = first.locator(f'td[data-col="{col}"]')
        assert json.loads(cell.get_attribute("data-value")) == status["last_decision"]["probs"][key]
    # One row per fill (fewer than the 50 shown), as many as the ledger counts.
    assert page.locator("#trades-table tbody tr").count() == status["n_trades"]


def test_dashboard_matches_status_and_pause_reaches_the_daemon(server: tuple[str, Path]) -> None:
    base, state = server
    status = status_json(state)
    assert get(f"{base}/api/{STATE_ID}/status") == status
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
        # Nothing but the server itself: a CDN request would fail here (and on a server without internet).
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base) else route.abort())
        try:
            # The list of states first, then its link to the state's page.
            page.goto(f"{base}/")
            page.wait_for_selector(f'#states-table tr[data-state-id="{STATE_ID}"]', timeout=15_000)
            listed = page.locator(f'#states-table tr[data-state-id="{STATE_ID}"] td').nth(4)
            assert json.loads(listed.get_attribute("data-value")) == status["equity"]
            page.click(f'#states-table a[href="/s/{STATE_ID}"]')
            page.wait_for_url(f"{base}/s/{STATE_ID}")
            page.wait_for_selector('body[data-loaded="1"]', timeout=15_000)
            check_rendered(page, status)
            curve = get(f"{base}/api/{STATE_ID}/equity?max_points=800")
            chart = page.locator("#equity-chart")
            assert int(chart.get_attribute("data-points")) == curve["count"] > 100
            assert chart.locator('polyline[data-series="equity"]').count() == 1
            assert page.locator("#badge-halt").inner_text() == "trading"

            # Pause, with the token typed into the page: queued, pending, with who asked.
            page.fill("#token", TOKEN)
            page.click('button[data-command="pause"]')
            page.wait_for_selector("#command-message[data-command-id]", timeout=10_000)
            command_id = int(page.locator("#command-message").get_attribute("data-command-id"))
            (command,) = get(f"{base}/api/{STATE_ID}/commands")["items"]
            assert command["id"] == command_id and command["kind"] == "pause" and command["status"] == "pending"
            assert command["requested_by"] == "api:127.0.0.1 (dashboard)"
            assert page.evaluate("sessionStorage.getItem('ritmo.apiToken')") == TOKEN

            # The daemon runs on: its next tick applies the command, in that tick's transaction.
            run_replay(state, *SECOND)
            (command,) = get(f"{base}/api/{STATE_ID}/commands")["items"]
            assert command["status"] == "applied" and command["applied_at_ms"] is not None
            assert command["candle_ts_ms"] == parse_utc_date_ms("2024-01-12T00:00")  # the first candle it ticked on
            after = status_json(state)
            if "paused" in after:
                assert after["paused"]["paused"] is True

            page.reload()
            page.wait_for_selector('body[data-loaded="1"]', timeout=15_000)
            row = page.locator(f'#commands-table tr[data-command-id="{command_id}"]')
            assert row.get_attribute("data-status") == "applied"
            assert json.loads(page.locator("#paused-field").get_attribute("data-value")) is True
            assert page.locator("#badge-paused").is_visible()
            check_rendered(page, after)
            assert problems == []
        finally:
            page.screenshot(path=str(ARTIFACT), full_page=True)
            browser.close()
