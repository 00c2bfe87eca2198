"""`ritmo serve`: being built (issue 11)."""

from __future__ import annotations

import argparse

from bot.errors import RitmoError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo serve`."""


def main(args: argparse.Namespace) -> int:
    """Run `ritmo serve`."""
    raise RitmoError("ritmo serve is being built")
