"""The flags of the method scripts, declared once.

Upstream's snake_case flags (``--datapath --dataname --savepath --resume --batch_size --num_epochs --lr
--weight_decay --seed --iter_per_epoch``) keep their names and meaning; each method script sets its own defaults.
Added for every method: ``--device``, ``--workers``, ``--amp``, ``--split_dir``, ``--max_steps`` and
``--reference-quirks``. Nothing here is a hard-coded path: defaults are relative to ``--datapath``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from brats_core.engine.metrics import LESION_WISE_HELP
from brats_core.modalities import parse_scenarios
from brats_core.registry import method_info
from brats_core.utils.cli import add_progress_arg


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
