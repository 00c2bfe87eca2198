"""File-system problems as one line (docs/design.md §12): output paths checked before the work that fills them.

A command that will write a file (`--plot`, `--trades`, `--out`) checks at its start that the file can be
created, so an unwritable path costs seconds, not the hours of the backtest, training or download before it.
The check makes the missing parent directories (the command would make them anyway) and creates and removes a
probe file there: permission bits alone do not tell (root ignores them, a read-only mount does not), trying does.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from bot.errors import RitmoError


class OutputPathError(RitmoError):
    """A command's own output file cannot be written (exit 1); the message names the option and the path."""


def os_problem(exc: OSError) -> str:
    """The problem an OSError reports, in words ("Permission denied", "Read-only file system", ...)."""
    if isinstance(exc, FileExistsError | NotADirectoryError) and exc.filename:
        # mkdir says "File exists" or "Not a directory" about the path it was given: name the file in the way.
        blocker = _file_in_the_way(Path(os.fsdecode(exc.filename)))
        if blocker is not None:
            return f"{blocker} is a file, not a directory"
    if exc.errno is not None and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _file_in_the_way(path: Path) -> Path | None:
    """The first component of `path` (from the root) that exists and is not a directory, if any."""
    for candidate in [*reversed(path.parents), path]:
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def probe_directory(directory: Path) -> None:
    """Make `directory` (and its parents) and prove a file can be created in it; OSError when not."""
    directory.mkdir(parents=True, exist_ok=True)
    if not directory.is_dir():  # mkdir(exist_ok=True) accepts a symlink to a file on some systems
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
    fd, probe = tempfile.mkstemp(prefix=".ritmo-probe-", dir=directory)
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Path, option: str) -> None:
    """OutputPathError unless `path` can be written: its directory exists or can be made, and is writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"cannot write {option} {path}: it is a directory")
    try:
        probe_directory(path.parent if str(path.parent) else Path("."))
    except OSError as exc:
        raise OutputPathError(f"cannot write {option} {path}: {os_problem(exc)}") from None


def check_output_dir(path: Path, option: str) -> None:
    """OutputPathError unless the directory `path` exists or can be made, and files can be created in it."""
    try:
        probe_directory(Path(path))
    except OSError as exc:
        raise OutputPathError(f"cannot write {option} {path}: {os_problem(exc)}") from None
