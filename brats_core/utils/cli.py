"""Command-line plumbing every script shares: one-line failures (:func:`run_main`, :class:`UsageError`,
:func:`describe_os_error`), logging to the console and the run folder, and the generic flags (``--no_progress``).

The flags of the method scripts (upstream's ``--datapath --savepath --batch_size …``) are in
:mod:`brats_core.apps.arguments`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from brats_core.utils.checkpoint import CheckpointError, StateDictMismatchError


class UsageError(ValueError):
    """A problem with the command line or the files it names, found after parsing: :func:`run_main` reports it in
    one line (``<script>: error: …``, exit status 2) instead of a traceback."""


def run_main(main: Callable[[], int]) -> int:
    """Run a script's ``main()`` and return its exit status.

    Every failure whose message names the file and what to do is printed as one line (``<script>: error: …``,
    exit status 2) instead of a traceback: usage errors, missing or unreadable files, checkpoints that cannot be
    read or do not fit the model, damaged NIfTI files and OS errors (disk full, permissions). Ctrl-C prints one
    line and exits with 130 (every script resumes where it stopped). Anything else is a bug and keeps its traceback.
    """
    name = Path(sys.argv[0]).name
    try:
        return main()
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    except (UsageError, CheckpointError, StateDictMismatchError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # FileNotFoundError, NiftiError, PermissionError, disk full: describe_os_error names them
        print(f"{name}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2


def describe_os_error(err: OSError) -> str:
    """One line for an OS error: our own messages as they are, the system's with the file and the reason."""
    if err.errno is None or err.strerror is None:
        return str(err)  # a message of ours (it names the file)
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror.lower()}" + (f" ({_ERRNO_HINTS[err.errno]})" if err.errno in _ERRNO_HINTS else "")


_ERRNO_HINTS = {
    errno.ENOSPC: "free some space or choose another output folder, then run the same command again",
    errno.EDQUOT: "free some space or choose another output folder, then run the same command again",
    errno.EACCES: "check the permissions or choose another folder",
    errno.EROFS: "choose a writable output folder",
    errno.ELOOP: "a symbolic link points to itself or loops: fix or remove it",
}


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_progress_arg(group: argparse._ActionsContainer, *aliases: str) -> None:
    """``--no_progress`` (``args.no_progress``; ``aliases``: other spellings, e.g. ``--no-progress``): no progress
    bars; a training script logs progress lines (step, loss, time left) instead."""
    group.add_argument(
        *aliases,
        "--no_progress",
        dest="no_progress",
        action="store_true",
        help="no progress bars (a training script logs progress lines with the time left instead)",
    )


def args_dict(args: argparse.Namespace) -> dict[str, Any]:
    """Arguments as plain JSON/``weights_only``-safe values (for checkpoints)."""
    out: dict[str, Any] = {}
    for k, v in vars(args).items():
        if isinstance(v, bool | int | float | str) or v is None:
            out[k] = v
        elif isinstance(v, Path):
            out[k] = str(v)
    return out


class _FolderLogFile(logging.Handler):
    """A log file in an output folder that logging never creates: records wait in memory until the folder exists
    (the tool makes it once its checks have passed), then go to the file in order. A run refused at its checks thus
    leaves no output folder holding nothing but a log file."""

    def __init__(self, path: Path, max_pending: int = 10_000) -> None:
        super().__init__()
        self.path, self.max_pending = path, max_pending
        self.pending: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def _opened(self) -> logging.FileHandler | None:
        if self.file is None and self.path.parent.is_dir():
            self.file = logging.FileHandler(self.path)
            self.file.setFormatter(self.formatter)
            for record in self.pending:
                self.file.emit(record)
            self.pending.clear()
        return self.file

    def emit(self, record: logging.LogRecord) -> None:
        file = self._opened()
        if file is not None:
            file.emit(record)
        elif len(self.pending) < self.max_pending:
            self.pending.append(record)

    def close(self) -> None:
        file = self._opened()  # the folder may have appeared after the last record
        if file is not None:
            file.close()
        super().close()


def setup_logging(savepath: str | Path | None = None, name: str = "log.txt") -> None:
    """Log to stderr and, when given, to ``<savepath>/<name>`` once that folder exists (logging never creates it:
    see :class:`_FolderLogFile`); under ``torchrun`` only rank 0 logs below WARNING and writes the file."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if savepath is not None and main_process:
        if Path(savepath).exists() and not Path(savepath).is_dir():
            raise UsageError(f"{savepath} exists and is not a folder: choose another output folder")
        handlers.append(_FolderLogFile(Path(savepath) / name))
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(message)s",
        handlers=handlers,
        force=True,
    )
