"""Train MaM with the pinned nnU-Net v2 (upstream's ``nnUNetv2_train`` / ``run_training.py`` flags, §8.6).

    python MaM/train.py 138 3d_fullres_multiencoder_recon 0 [-tr nnUNetTrainerMissingReconBaseline] [--c]

The trainer class is instantiated directly (no nnU-Net class discovery, nothing copied into site-packages). Folders
come from nnU-Net's environment variables ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``; results go
to ``$nnUNet_results/Dataset138_MaM/nnUNetTrainerMissingReconBaseline__nnUNetPlans__3d_fullres_multiencoder_recon/
fold_0``. ``--c`` continues from ``checkpoint_final`` / ``checkpoint_latest`` / ``checkpoint_best`` as nnU-Net does.

Added flags (upstream recipe by default): ``--num_epochs``, ``--num_iterations_per_epoch``,
``--num_val_iterations_per_epoch``, ``--val_epochs``, ``--val_csv``, ``--seed``.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Sequence

import numpy as np
import torch

from brats_core.modalities import parse_mam_mask
from MaM.prepare_dataset import CONFIGURATION, PLANS, TRAINER


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="MaM/train.py", description=__doc__.splitlines()[0])
    p.add_argument("dataset_name_or_id", nargs="?", default="138", help="dataset name or id (default 138)")
    p.add_argument("configuration", nargs="?", default=CONFIGURATION, help=f"default {CONFIGURATION}")
    p.add_argument("fold", nargs="?", default="0", help="fold of splits_final.json (default 0 = the paper split)")
    p.add_argument("-tr", default=TRAINER, help=f"trainer name; only {TRAINER} exists here")
    p.add_argument("-p", default=PLANS, help="plans identifier")
    p.add_argument("-pretrained_weights", default=None, help="checkpoint to initialise the network from")
    p.add_argument("-mask", nargs="+", default=None,
                   help="one scenario for every case of the final validation, MaM order FLAIR,T1,T1ce,T2 "
                        "(e.g. 1,1,1,1); default: each case's scenario from val15splits.csv")  # fmt: skip
    p.add_argument("-num_gpus", type=int, default=1, help="only 1 is supported")
    p.add_argument("--use_compressed", action="store_true", help="accepted for compatibility (no effect)")
    p.add_argument("--npz", action="store_true", help="save validation probabilities")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
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


def build_trainer(args: argparse.Namespace, device: torch.device):  # -> nnUNetTrainerMissingReconBaseline
    """Load plans and dataset.json of the preprocessed dataset and instantiate the trainer with the overrides."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from MaM.trainer import nnUNetTrainerMissingReconBaseline

    name = args.dataset_name_or_id
    dataset = maybe_convert_to_dataset_name(name if name.startswith("Dataset") else int(name))
    folder = join(nnUNet_preprocessed, dataset)
    plans_file = join(folder, f"{args.p}.json")
    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f"{plans_file} not found: run MaM/prepare_dataset.py --plan first")
    plans = load_json(plans_file)
    if args.configuration not in plans["configurations"]:
        raise KeyError(
            f"{plans_file} has no configuration {args.configuration!r}; add it with MaM/prepare_dataset.py --add_plans"
        )
    plans["continue_training"] = args.c
    fold = args.fold if args.fold == "all" else int(args.fold)
    trainer = nnUNetTrainerMissingReconBaseline(
        plans=plans, configuration=args.configuration, fold=fold, dataset_json=load_json(join(folder, "dataset.json")),
        device=device,
    )  # fmt: skip
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tr != TRAINER:
        parser.error(f"-tr {args.tr}: this entry point trains {TRAINER} only")
    if args.num_gpus != 1:
        parser.error("-num_gpus: only single-GPU training is supported by MaM/train.py")
    if args.c and args.val:
        parser.error("--c and --val cannot be combined")
    if args.mask is not None:
        try:
            parse_mam_mask(args.mask)
        except ValueError as err:
            parser.error(f"-mask: {err}")
    if args.seed is not None:
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
    if args.device == "cpu":
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())  # as nnU-Net's run_training
        device = torch.device("cpu")
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        device = torch.device("cuda")
    else:
        device = torch.device("mps")

    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.run.run_training import maybe_load_checkpoint

    trainer = build_trainer(args, device)
    maybe_load_checkpoint(trainer, args.c, args.val, args.pretrained_weights)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if not args.val:
        trainer.run_training()
    if args.val_best:
        trainer.load_checkpoint(join(trainer.output_folder, "checkpoint_best.pth"))
    trainer.perform_actual_validation(args.npz)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
