"""`ritmo trades`: being built (issue 11)."""

from __future__ import annotations

import argparse

from bot.errors import RitmoError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo trades`."""


def main(args: argparse.Namespace) -> int:
    """Run `ritmo trades`."""
    raise RitmoError("ritmo trades is being built")
