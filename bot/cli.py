"""The `ritmo` command line (same as `python -m bot`): download, train, backtest, run, status, info."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from bot.errors import EXIT_RUNTIME, RitmoError
from bot.logs import configure_logging

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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv is None or name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv (the first non-option word), if it is one of ours."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run the command, turn our errors into one line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    if getattr(args._module, "CONFIGURES_LOGGING", False) is False:
        # Offline commands print results (JSON, tables) on stdout: their logs go to stderr.
        configure_logging(fmt=os.environ.get("RITMO_LOG_FORMAT", "auto") or "auto", stream=sys.stderr)
    try:
        return int(args._module.main(args) or 0)
    except RitmoError as exc:
        print(f"ritmo {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"ritmo {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_RUNTIME


if __name__ == "__main__":
    raise SystemExit(main())
