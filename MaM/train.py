"""Train MaM with the pinned nnU-Net v2 (upstream's ``nnUNetv2_train`` / ``run_training.py`` flags).

    python MaM/train.py 138 3d_fullres_multiencoder_recon 0 [-tr nnUNetTrainerMissingReconBaseline] [--c]

The trainer class is instantiated directly (no nnU-Net class discovery, nothing copied into site-packages). Folders
come from nnU-Net's environment variables ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``; results go
to ``$nnUNet_results/Dataset138_MaM/nnUNetTrainerMissingReconBaseline__nnUNetPlans__3d_fullres_multiencoder_recon/
fold_0``. ``--c`` continues from ``checkpoint_final`` / ``checkpoint_latest`` / ``checkpoint_best`` as nnU-Net does.
Every checkpoint (``-pretrained_weights``, ``--c``, ``--val``, ``--val_best``) is read with a weights-only loader
before anything is written, so a hostile file cannot run code: it is refused with a one-line error naming it.

Added flags (upstream recipe by default): ``--num_epochs``, ``--num_iterations_per_epoch``,
``--num_val_iterations_per_epoch``, ``--val_epochs``, ``--val_csv``, ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brats_core.modalities import parse_mam_mask
from brats_core.utils.cli import UsageError, run_main
from brats_core.utils.io import remove_stale_temporaries
from MaM.prepare_dataset import CONFIGURATION, PLANS, TRAINER

RESUME_ORDER: tuple[str, ...] = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
"""The files ``--c`` looks for, in nnU-Net's order (``maybe_load_checkpoint``)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="MaM/train.py", description=__doc__.splitlines()[0])
    p.add_argument("dataset_name_or_id", nargs="?", default="138", help="dataset name or id (default 138)")
    p.add_argument("configuration", nargs="?", default=CONFIGURATION, help=f"default {CONFIGURATION}")
    p.add_argument("fold", nargs="?", default="0", help="fold of splits_final.json (default 0 = the paper split)")
    p.add_argument("-tr", default=TRAINER, help=f"trainer name; only {TRAINER} exists here")
    p.add_argument("-p", default=PLANS, help="plans identifier")
    p.add_argument("-pretrained_weights", default=None,
                   help="nnU-Net checkpoint_*.pth of the same configuration to start a new training from "
                        "(all weights but the segmentation heads, as nnU-Net)")  # fmt: skip
    p.add_argument("-mask", nargs="+", default=None,
                   help="one scenario for every case of the final validation, MaM order FLAIR,T1,T1ce,T2 "
                        "(e.g. 1,1,1,1); default: each case's scenario from val15splits.csv")  # fmt: skip
    p.add_argument("-num_gpus", type=int, default=1, help="only 1 is supported")
    p.add_argument("--use_compressed", action="store_true", help="accepted for compatibility (no effect)")
    p.add_argument("--npz", action="store_true", help="save validation probabilities")
    p.add_argument("--c", action="store_true",
                   help="continue from checkpoint_final, else _latest, else _best.pth (nnU-Net's order)")  # fmt: skip
    p.add_argument("--val", action="store_true", help="only run the final validation")
    p.add_argument("--val_best", action="store_true", help="final validation with checkpoint_best.pth")
    p.add_argument("--disable_checkpointing", action="store_true")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    g = p.add_argument_group("recipe overrides (default: upstream's)")
    g.add_argument("--num_epochs", type=int, default=None, help="upstream 500")
    g.add_argument("--num_iterations_per_epoch", type=int, default=None, help="upstream 150")
    g.add_argument("--num_val_iterations_per_epoch", type=int, default=None, help="upstream 125")
    g.add_argument(
        "--val_epochs",
        default=None,
        help="0-based validation epochs, comma-separated, or 'all' (default: upstream's list + last)",
    )
    g.add_argument("--val_csv", default=None, help="val15splits.csv (default: the preprocessed dataset folder's)")
    g.add_argument("--seed", type=int, default=None, help="seed Python, numpy and torch (nnU-Net is unseeded)")
    return p


def read_plans(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plans and ``dataset.json`` of the preprocessed dataset (``$nnUNet_preprocessed/<dataset>/``)."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = args.dataset_name_or_id
    try:
        dataset = maybe_convert_to_dataset_name(name)
    except (RuntimeError, ValueError) as err:  # unknown or ambiguous id: nnU-Net's message says where it looked
        raise UsageError(f"dataset {name}: {' '.join(str(err).split())}") from err
    folder = Path(nnUNet_preprocessed) / dataset
    plans_file = folder / f"{args.p}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: run MaM/prepare_dataset.py --plan first")
    plans = json.loads(plans_file.read_text())
    if args.configuration not in plans["configurations"]:
        raise UsageError(
            f"{plans_file} has no configuration {args.configuration!r}; add it with MaM/prepare_dataset.py --add_plans"
        )
    return plans, json.loads((folder / "dataset.json").read_text())


def fold_folder(args: argparse.Namespace, plans: dict[str, Any]) -> Path:
    """``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_N``, where the trainer writes."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return Path(get_output_folder(plans["dataset_name"], TRAINER, plans["plans_name"], args.configuration, args.fold))


def checkpoint_to_load(folder: Path, continue_training: bool, validation_only: bool) -> Path | None:
    """The checkpoint nnU-Net's ``maybe_load_checkpoint`` would load: ``--c`` the first of :data:`RESUME_ORDER`
    present (none: a new training, with nnU-Net's warning); ``--val`` ``checkpoint_final.pth``."""
    if continue_training:
        found = next((folder / n for n in RESUME_ORDER if (folder / n).is_file()), None)
        if found is None:
            print(f"WARNING: no checkpoint to continue from in {folder}; starting a new training")
        return found
    if validation_only:
        final = folder / RESUME_ORDER[0]
        if not final.is_file():
            raise FileNotFoundError(f"{final} not found: the training has not finished (continue it with --c)")
        return final
    return None


def build_trainer(
    args: argparse.Namespace, device: torch.device, plans: dict[str, Any], dataset_json: dict[str, Any]
):  # -> nnUNetTrainerMissingReconBaseline
    """Instantiate the trainer with the overrides (this creates the fold folder and its training log)."""
    from MaM.trainer import nnUNetTrainerMissingReconBaseline

    plans = {**plans, "continue_training": args.c}
    fold = args.fold if args.fold == "all" else int(args.fold)
    trainer = nnUNetTrainerMissingReconBaseline(
        plans=plans, configuration=args.configuration, fold=fold, dataset_json=dataset_json, device=device
    )
    for key in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch"):
        if getattr(args, key) is not None:
            setattr(trainer, key, getattr(args, key))
    if args.val_epochs is not None:
        trainer.validation_epochs = (
            set(range(trainer.num_epochs)) if args.val_epochs == "all" else {int(e) for e in args.val_epochs.split(",")}
        )
    trainer.val_csv = args.val_csv
    if args.mask is not None:
        trainer.final_validation_mask = parse_mam_mask(args.mask)
    if args.seed is not None:
        trainer.scenario_rng = random.Random(args.seed)
    if args.disable_checkpointing:
        trainer.disable_checkpointing = True
    return trainer


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors argparse cannot see: other trainers, several GPUs, contradicting flags, nnU-Net's folders."""
    if args.tr != TRAINER:
        parser.error(f"-tr {args.tr}: this entry point trains {TRAINER} only")
    if args.num_gpus != 1:
        parser.error("-num_gpus: only single-GPU training is supported by MaM/train.py")
    if args.c and args.val:
        parser.error("--c and --val cannot be combined")
    if args.pretrained_weights is not None and (args.c or args.val):
        parser.error("-pretrained_weights only starts a new training (not with --c or --val)")
    for variable in ("nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(variable):
            parser.error(f"set the {variable} environment variable (nnU-Net's folders)")
    if args.mask is not None:
        try:
            parse_mam_mask(args.mask)
        except ValueError as err:
            parser.error(f"-mask: {err}")


def select_device(name: str) -> torch.device:
    """The device and thread settings of nnU-Net's ``run_training``."""
    if name == "cpu":
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())
        return torch.device("cpu")
    if name == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        return torch.device("cuda")
    return torch.device("mps")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.seed is not None:
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
    device = select_device(args.device)

    from MaM.trained_model import load_nnunet_checkpoint
    from MaM.trainer import RESUME_KEYS, load_pretrained_weights

    # Every checkpoint is read (weights-only) before the trainer writes anything: a bad file stops the run cleanly.
    pretrained = None
    if args.pretrained_weights is not None:
        pretrained = load_nnunet_checkpoint(args.pretrained_weights, ("network_weights",))
    plans, dataset_json = read_plans(args)
    folder = fold_folder(args, plans)
    remove_stale_temporaries(folder)  # what runs killed while saving a checkpoint left
    resume_file = checkpoint_to_load(folder, args.c, args.val)
    resume = load_nnunet_checkpoint(resume_file, RESUME_KEYS) if resume_file is not None else None

    trainer = build_trainer(args, device, plans, dataset_json)
    if pretrained is not None:
        trainer.initialize()
        load_pretrained_weights(trainer.network, pretrained["network_weights"], args.pretrained_weights)
        trainer.print_to_log_file(f"pretrained weights from {args.pretrained_weights} (segmentation heads not taken)")
    if resume is not None:
        trainer.load_checkpoint(resume, source=str(resume_file))
    pretrained = resume = None  # the CPU copies are not needed during training
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if not args.val:
        trainer.run_training()
    if args.val_best:
        trainer.load_checkpoint(str(folder / "checkpoint_best.pth"))  # read weights-only by the trainer
    trainer.perform_actual_validation(args.npz)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
