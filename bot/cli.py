"""The `ritmo` command line (same as `python -m bot`): download, train, backtest, run, status, info."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from bot.errors import EXIT_RUNTIME, RitmoError

# Exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

# subcommand -> (module with add_arguments(parser) and main(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("bot.commands.download", "download exchange candles into a CSV/Parquet file (resumable)"),
    "train": ("bot.commands.train", "train a policy offline with REINFORCE and the 1:10 rhythm"),
    "backtest": ("bot.commands.backtest", "backtest a policy over a period, beside buy-and-hold and flat"),
    "evaluate": ("bot.commands.evaluate", "walk-forward evaluation of a training configuration against baselines"),
    "info": ("bot.commands.info", "parameter counts per part, features, checkpoint metadata"),
    "run": ("bot.commands.run", "run the daemon: paper trading, --once, or --replay FILE"),
    "status": ("bot.commands.status", "what the daemon's state says: position, equity, episode, rhythm, halt"),
    "resume": ("bot.commands.status", "clear a drawdown halt so trading resumes at the next candle"),
    "trades": ("bot.commands.trades", "the fills of a state: time, side, quantity, price, fee, P&L"),
    "serve": ("bot.commands.serve", "web dashboard and JSON API over the daemon's state, with control actions"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser with one subparser per command.

    Only the module of the command named in `argv` is imported (all of them when `argv` is None): importing
    every command would load ccxt, pyarrow and matplotlib into a replay or `status` that never uses them
    (~56 MB of a daemon's resident memory).
    """
    chosen = _command_in(argv) if argv is not None else None
    parser = argparse.ArgumentParser(prog="ritmo", description="ritmo: RL trading daemon for 5-minute candles")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv is None or name == chosen:
            module = _import_command(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def _import_command(module_name: str) -> ModuleType:
    """Import a command's module with Ctrl-C held back until the import is done, then raised.

    A KeyboardInterrupt raised while torch's C++ start-up code is calling into Python aborts the whole process
    ("terminate called after throwing an instance of 'pybind11::error_already_set'", SIGABRT) instead of
    unwinding; so SIGINT only sets a flag during the import, and the interrupt is raised after it.
    """
    if threading.current_thread() is not threading.main_thread() or not callable(signal.getsignal(signal.SIGINT)):
        return importlib.import_module(module_name)  # SIGINT ignored (or not ours to touch): nothing to defer
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        module = importlib.import_module(module_name)
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return module


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv (the first non-option word), if it is one of ours."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def version() -> str:
    """ritmo's version: the installed distribution's, else pyproject.toml's (a source checkout run in place)."""
    from importlib import metadata

    try:
        return metadata.version("ritmo")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class _VersionAction(argparse.Action):
    """`ritmo --version`: looked up only when asked (reading the package metadata costs every other command)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None) -> None:
        print(f"ritmo {version()}")
        parser.exit()


def _error_line(command: str, text: str) -> None:
    """Print `ritmo COMMAND: text` on stderr; at journald's priority err when stderr is the journal."""
    from bot.logs import journal_prefix

    print(f"{journal_prefix(sys.stderr, logging.ERROR)}ritmo {command}: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run the command, turn our errors into one line and an exit code.

    Ctrl-C at any point, the imports of the chosen command (torch: seconds) included, is one line and 130.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv) or "?"
    try:
        args = build_parser(argv).parse_args(argv)
        command = args.command
        if getattr(args._module, "CONFIGURES_LOGGING", False) is False:
            from bot.logs import configure_logging

            # Offline commands print results (JSON, tables) on stdout: their logs go to stderr.
            configure_logging(fmt=os.environ.get("RITMO_LOG_FORMAT", "auto") or "auto", stream=sys.stderr)
        return int(args._module.main(args) or 0)
    except RitmoError as exc:
        _error_line(command, f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _error_line(command, "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_RUNTIME


if __name__ == "__main__":
    raise SystemExit(main())
