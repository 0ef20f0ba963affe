"""Shared command-line argument groups.

Upstream's snake_case flags (``--datapath --dataname --savepath --resume --batch_size --num_epochs --lr
--weight_decay --seed --iter_per_epoch``) keep their names and meaning; each method script sets its own defaults.
Added for every method: ``--device``, ``--workers``, ``--amp``, ``--split_dir``, ``--max_steps`` and
``--reference-quirks``. Nothing here is a hard-coded path: defaults are relative to ``--datapath``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, StateDictMismatchError
from .modalities import parse_scenarios
from .registry import method_info


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


def add_data_args(parser: argparse.ArgumentParser, savepath_required: bool = False) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--datapath", required=True, help="preprocessed data folder (vol/, seg/, meta/ from preprocess.py)")
    g.add_argument(
        "--dataname",
        default="BRATS2023",
        help="data set name, recorded in the checkpoint (upstream needed BRATS2023 to pick its lists)",
    )
    g.add_argument(
        "--split_dir",
        default=None,
        help="folder with train.txt, val15splits.csv, test15splits.csv (default: <datapath>/splits)",
    )
    g.add_argument("--savepath", required=savepath_required, default=None, help="output folder")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: CUDA when available")
    g.add_argument("--workers", "--num_workers", dest="workers", type=int, default=4, help="data-loader workers")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA (Mamba blocks stay fp32)")
    g.add_argument(
        "--reference-quirks",
        "--reference_quirks",
        dest="reference_quirks",
        action="store_true",
        help="reproduce upstream's number-changing quirks (see the method README)",
    )


def add_train_args(
    parser: argparse.ArgumentParser,
    *,
    batch_size: int,
    lr: float,
    weight_decay: float,
    num_epochs: int,
    seed: int = 999,
    iter_per_epoch: int | None = None,
) -> None:
    """The training flags, with the method's upstream defaults."""
    g = parser.add_argument_group("training")
    g.add_argument("--batch_size", "-batch_size", type=int, default=batch_size)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument("--num_epochs", type=int, default=num_epochs)
    g.add_argument(
        "--iter_per_epoch",
        type=int,
        default=iter_per_epoch,
        help="optimiser steps per epoch (default: the number of training cases, as upstream)",
    )
    g.add_argument("--seed", type=int, default=seed)
    g.add_argument("--resume", default=None, help="checkpoint to continue from (ours or upstream's)")
    add_train_overwrite_arg(g)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimiser steps (smoke runs)")
    add_compile_arg(g)
    add_progress_arg(g)


def add_preset_arg(group: argparse._ActionsContainer, method: str, choices: Sequence[str] | None = None) -> None:
    """``--preset``: the model size, one of the registry's presets of ``method`` (``paper`` = the published size,
    the default; ``tiny`` = the CPU tests' and demo's), or of ``choices``, a subset of them, when given."""
    presets = list(method_info(method).presets)
    if choices is not None:
        unknown = [c for c in choices if c not in presets]
        if unknown:
            raise ValueError(f"{method}: {unknown} are not registered presets ({', '.join(presets)})")
        presets = list(choices)
    group.add_argument(
        "--preset", default="paper", choices=presets, help="model size: paper (published) or tiny (CPU tests, demo)"
    )


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


def add_train_overwrite_arg(group: argparse._ArgumentGroup) -> None:
    """``--overwrite``: start afresh in a ``--savepath`` that holds a run (see ``training.claim_run_folder``)."""
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an output folder that holds one: its checkpoints and TensorBoard logs are deleted "
        "(without it such a folder is refused; a run is continued with --resume)",
    )


def add_compile_arg(group: argparse._ArgumentGroup) -> None:
    """``--compile``: torch.compile the training forward (see ``FitConfig.compile``)."""
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model for training: the first steps compile (minutes), later ones may be faster; "
        "the Mamba scans stay eager",
    )


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    from .metrics import LESION_WISE_HELP  # imported here: the command-line helpers need no metrics otherwise

    g = parser.add_argument_group("evaluation")
    g.add_argument(
        "--scenarios",
        default="all",
        help="'all' or a comma list of names (flair+t1ce), bit strings (1100) or indices 1-15",
    )
    g.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (paper: 0.5)")
    g.add_argument(
        "--blend", default="uniform", choices=["uniform", "gaussian"], help="window blending (paper: uniform)"
    )
    g.add_argument("--tta", action="store_true", help="average over the 8 flips (not in the paper protocol)")
    g.add_argument("--sw_batch_size", type=int, default=1, help="windows per forward pass")
    g.add_argument(
        "--no_encode_once",
        action="store_true",
        help="run 15 independent passes instead of encoding each window once (identical results)",
    )
    g.add_argument(
        "--scenario_batch",
        type=int,
        default=1,
        help="decode this many scenarios of a window in one batch: faster where the decoder dominates, but results "
        "may differ from the paper protocol's by float rounding; 1 (default) is bit-exact",
    )
    g.add_argument("--no_hd95", action="store_true", help="skip HD95 (faster)")
    g.add_argument("--lesion_wise", action="store_true", help=LESION_WISE_HELP)
    g.add_argument(
        "--save_nifti", action="store_true", help="write predicted label maps as NIfTI in the original image geometry"
    )
    add_overwrite_arg(g)


def add_overwrite_arg(group: argparse._ActionsContainer) -> None:
    """``--overwrite``: replace the results in ``--savepath`` (see ``evaluation.claim_results_folder``)."""
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the results already in --savepath (without it, a folder holding another model's or other "
        "settings' results is refused; the same evaluation resumes)",
    )


def split_dir(args: argparse.Namespace) -> Path:
    return Path(args.split_dir) if args.split_dir else Path(args.datapath) / "splits"


def check_scenarios(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        args.scenario_list = parse_scenarios(args.scenarios)
    except ValueError as err:
        parser.error(str(err))
    if getattr(args, "scenario_batch", 1) < 1:
        parser.error(f"--scenario_batch must be >= 1, got {args.scenario_batch}")


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
