"""The project's own errors, each carrying the process exit code the CLI returns for it.

Exit codes (documented in the README):
  0  clean stop
  1  runtime error (data, checkpoint, exchange operational problem)
  2  command-line usage error (argparse)
  78 configuration error (EX_CONFIG): systemd units are told not to restart on it
  77 authentication / permission error from the exchange (EX_NOPERM)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_NOPERM = 77
EXIT_CONFIG = 78


class RitmoError(Exception):
    """Base of every error the CLI turns into one clear line and an exit code."""

    exit_code = EXIT_RUNTIME


class UsageError(RitmoError):
    """The command line asks for something impossible (reversed dates, a period outside the data): exit 2."""

    exit_code = EXIT_USAGE


class ConfigError(RitmoError):
    """A setting is missing or invalid; the message names the setting."""

    exit_code = EXIT_CONFIG


class CandleFileError(RitmoError):
    """A candle file is missing or malformed; the message names the file and the problem."""

    exit_code = EXIT_RUNTIME

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class CheckpointError(RitmoError):
    """A checkpoint cannot be read, or does not match what the caller expects."""

    exit_code = EXIT_RUNTIME


class ExchangeError(RitmoError):
    """Base of the exchange errors (mapped from ccxt's exceptions in bot/exchange/client.py)."""

    exit_code = EXIT_RUNTIME


class TemporaryExchangeError(ExchangeError):
    """Network trouble, timeouts, rate limits, 5xx: a read may be retried later."""


class OperationalExchangeError(ExchangeError):
    """The exchange refused the request for a reason a retry will not fix (bad symbol, bad order)."""


class UnknownSymbolError(OperationalExchangeError):
    """The exchange does not list the symbol (at start: a configuration problem, RITMO_SYMBOL)."""


class AuthenticationExchangeError(ExchangeError):
    """Keys or permissions are wrong: stop and ask a human."""

    exit_code = EXIT_NOPERM
