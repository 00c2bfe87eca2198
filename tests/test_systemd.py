"""The systemd units: `systemd-analyze verify` is silent and `security --offline=yes` rates them <= 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
# (unit file in the repo, name to analyse it under): a template is only checkable as an instance.
DAEMON_CASES = [("ritmo.service", "ritmo.service"), ("ritmo@.service", "ritmo@BTC-USDT.service")]
# `ritmo serve` (docs/design.md §13): the dashboard and control API, its own hardened unit.
SERVE_CASES = [("ritmo-serve.service", "ritmo-serve.service")]
CASES = DAEMON_CASES + SERVE_CASES
MAX_EXPOSURE = 2.0
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _systemd_version() -> int:
    if SYSTEMD_ANALYZE is None:
        return 0
    out = subprocess.run([SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else 0


needs_analyze = pytest.mark.skipif(
    _systemd_version() < 250,  # security --offline= arrived in systemd 250
    reason="systemd-analyze >= 250 not installed (apt-get install systemd)",
)


def unit_text(name: str) -> str:
    return (UNITS / name).read_text()


def directives(text: str) -> dict[str, list[str]]:
    """Active (uncommented) Key=value lines, values per key in order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def checkable_copy(source: str, target_name: str, tmp_path: Path) -> Path:
    """Copy a unit with ExecStart pointed at an existing binary.

    `systemd-analyze verify` fails when ExecStart's binary is missing, and /opt/ritmo/.venv/bin/ritmo
    exists only on an installed host; the command itself does not affect either check.
    """
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={sys.executable}", unit_text(source))
    path = tmp_path / target_name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------
# Checks on the text: they run everywhere
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [c[0] for c in DAEMON_CASES])
def test_unit_essentials(name: str) -> None:
    d = directives(unit_text(name))
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"]
    assert set(d["RestartPreventExitStatus"][0].split()) == {"77", "78"}
    assert int(d["WatchdogSec"][0]) >= 600  # ticks every 300 s
    assert d["ExecStart"] == ["/opt/ritmo/.venv/bin/ritmo run"]
    assert d["User"] == ["ritmo"] and "StateDirectory" in d
    assert d["UMask"] == ["0077"]
    # torch's oneDNN kernels need writable+executable memory.
    assert "MemoryDenyWriteExecute" not in d
    assert "MemoryDenyWriteExecute=yes is deliberately NOT set" in unit_text(name)


def test_serve_unit_essentials() -> None:
    """Its own process: the daemon's user and state directory, no exchange keys, loopback only, exit 78 final."""
    text = unit_text("ritmo-serve.service")
    d = directives(text)
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["ExecStart"] == ["/opt/ritmo/.venv/bin/ritmo serve"]
    assert d["Restart"] == ["on-failure"] and d["RestartPreventExitStatus"] == ["78"]
    assert d["User"] == ["ritmo"] and d["Group"] == ["ritmo"]
    # The same state directory as ritmo.service (the instances' live below it): SQLite readers need the -shm file.
    assert d["StateDirectory"] == directives(unit_text("ritmo.service"))["StateDirectory"] == ["ritmo"]
    assert "RITMO_STATE_DIR=%S/ritmo" in d["Environment"]
    # Never the daemon's env file (exchange keys): only its own, optional one.
    assert d["EnvironmentFile"] == ["-/etc/ritmo/serve.env"]
    assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"] == ["localhost"]
    assert d["MemoryDenyWriteExecute"] == ["yes"] and d["UMask"] == ["0077"]
    assert "Requires" not in d and "BindsTo" not in d and "ritmo.service" in d["After"][0]
    assert "WatchdogSec" not in d


def test_template_is_per_instance() -> None:
    d = directives(unit_text("ritmo@.service"))
    assert d["EnvironmentFile"] == ["/etc/ritmo/%i.env"]
    assert d["StateDirectory"] == ["ritmo/%i"]
    assert "RITMO_STATE_DIR=%S/ritmo/%i" in d["Environment"]


# ---------------------------------------------------------------------------------------------------
# systemd-analyze
# ---------------------------------------------------------------------------------------------------


@needs_analyze
@pytest.mark.parametrize(("source", "target"), CASES)
def test_verify_is_clean(source: str, target: str, tmp_path: Path) -> None:
    unit = checkable_copy(source, target, tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


@needs_analyze
@pytest.mark.parametrize(("source", "target"), CASES)
def test_security_exposure(source: str, target: str, tmp_path: Path) -> None:
    unit = checkable_copy(source, target, tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"{target}: exposure {exposure} > {MAX_EXPOSURE}\n{result.stdout}"
