"""The package map's arrows that must never exist (docs/design.md §1), checked on the source and at import time.

- The core (`strategies/`) reaches no exchange, database, wall clock or command line: it imports nothing from
  `bot`, ccxt, sqlite3, argparse, the scheduler or the logging stack, and never reads the wall clock.
- Learning (`bot/daemon/learner.py`) reaches no exchange or broker, not even through what it imports.
- Data (`bot/files/`, `bot/daemon/feed.py`) does not trade: no broker, no ccxt.
- A command is wiring: no library module imports `bot.commands`, and no command imports another.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE_FORBIDDEN = ("bot", "ccxt", "sqlite3", "argparse", "apscheduler", "dotenv", "structlog", "socket", "urllib")
WALL_CLOCK_CALLS = {("time", "time"), ("time", "time_ns"), ("datetime", "now"), ("datetime", "utcnow")}


def imported_modules(source: str, module: str = "") -> set[str]:
    """Every module a source imports, at top level or inside a function (relative imports resolved from the
    source's own dotted `module` name)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = ".".join(module.split(".")[: -node.level])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def wall_clock_calls(source: str) -> list[str]:
    """Calls like `time.time()` or `datetime.now()` in a source (reading the wall clock)."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if (name, node.func.attr) in WALL_CLOCK_CALLS:
                hits.append(f"{name}.{node.func.attr}")
    return hits


def _reaches(modules: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in roots))


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def _sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _loaded_after_import(module: str) -> set[str]:
    """sys.modules after importing `module` in a fresh interpreter (what it reaches, transitively)."""
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return set(out.stdout.split())


def test_scanner_sees_top_level_lazy_and_relative_imports() -> None:
    src = "import ccxt\nfrom bot.errors import X\ndef f():\n    from .brokers import live\n"
    found = imported_modules(src, module="bot.daemon.tick")
    assert {"ccxt", "bot.errors", "bot.daemon.brokers.live"} <= found
    assert _reaches(found, ("bot",)) == ["bot.daemon.brokers", "bot.daemon.brokers.live", "bot.errors", "bot.errors.X"]
    assert wall_clock_calls("import time\nt = time.time()\nd = datetime.datetime.now()\np = time.perf_counter()") == [
        "time.time",
        "datetime.now",
    ]


@pytest.mark.parametrize("path", _sources("strategies"), ids=lambda p: p.name)
def test_the_core_reaches_no_exchange_database_clock_or_cli(path: Path) -> None:
    source = path.read_text()
    assert _reaches(imported_modules(source, _module_name(path)), CORE_FORBIDDEN) == []
    assert wall_clock_calls(source) == []


def test_learning_reaches_no_exchange_or_broker() -> None:
    direct = imported_modules((REPO / "bot/daemon/learner.py").read_text(), "bot.daemon.learner")
    assert _reaches(direct, ("bot.exchange", "bot.brokers", "ccxt")) == []
    assert _reaches(_loaded_after_import("bot.daemon.learner"), ("bot.exchange", "bot.brokers", "ccxt")) == []


@pytest.mark.parametrize("module", ["bot.files.candles", "bot.files.checkpoints", "bot.daemon.feed"])
def test_data_does_not_trade(module: str) -> None:
    assert _reaches(_loaded_after_import(module), ("bot.brokers", "ccxt")) == []


@pytest.mark.parametrize("path", _sources("bot"), ids=lambda p: str(p.relative_to(REPO / "bot")))
def test_commands_are_wiring_that_nothing_imports(path: Path) -> None:
    name = _module_name(path)
    if name == "bot.cli":
        return  # the command line dispatches to the commands
    commands = _reaches(imported_modules(path.read_text(), name), ("bot.commands",))
    assert commands == [], f"{name} imports {commands}"
