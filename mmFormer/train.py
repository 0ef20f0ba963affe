"""Train mmFormer (upstream ``mmFormer/mmformer/train.py``): Adam (amsgrad), poly LR, fused + separate + deep loss.

    python mmFormer/train.py --batch_size 3 --datapath <preprocessed> --num_epochs 1000 --dataname BRATS2023 \
        --savepath <run>

Upstream never validates: ``<savepath>/model_last.pth`` is the result. ``--val_every N`` validates every N epochs on
``val15splits.csv`` and keeps ``best.pth``; ``--debug`` runs one optimiser step per epoch (upstream) and validates
after every epoch.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch

from brats_core.apps.arguments import add_data_args, add_preset_arg, add_runtime_args, add_train_args, split_dir
from brats_core.apps.scripts import add_val_args, select_val_epochs, train_from_args
from brats_core.data.splits import load_split
from brats_core.data.transforms import rfnet_augmentation
from brats_core.engine.evaluation import check_preprocessed_folder
from brats_core.engine.training import PolyLR, seed_everything
from brats_core.nn.losses import FusedSeparateDeepLoss
from brats_core.registry import build_method
from brats_core.utils.cli import positive_int, run_main, setup_logging

log = logging.getLogger("mmFormer.train")

UPSTREAM_VAL_EPOCHS: tuple[int, ...] = ()
"""Upstream's validation epochs: none (its ``val_check`` list is empty)."""


def build_parser() -> argparse.ArgumentParser:
    """The upstream flags on the shared groups, plus ``--preset``, ``--patch_size``,
    ``--val_every``."""
    p = argparse.ArgumentParser(prog="mmFormer/train.py", description=__doc__.splitlines()[0])
    add_data_args(p, savepath_required=True)
    add_train_args(p, batch_size=1, lr=2e-4, weight_decay=1e-4, num_epochs=1000, seed=999)
    add_runtime_args(p)
    g = p.add_argument_group(
        "mmFormer", "--debug runs one optimiser step per epoch (upstream) and validates after every epoch"
    )
    g.add_argument("--region_fusion_start_epoch", type=int, default=0, help="epoch from which the fused loss counts")
    g.add_argument(
        "--stop_epoch",
        type=positive_int,
        default=None,
        help="end after this many epochs; the poly schedule still spans --num_epochs (upstream)",
    )
    add_preset_arg(g, "mmformer")
    g.add_argument("--patch_size", type=int, default=None, help="training patch (default: the preset's, paper 128)")
    add_val_args(g)
    g.add_argument("--pretrain", default=None, help=argparse.SUPPRESS)  # accepted for compatibility; unused upstream
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and train (see the module docstring)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.savepath, "train.txt")
    if args.pretrain:
        log.warning("--pretrain is accepted for compatibility but unused, as upstream")
    if args.debug and args.iter_per_epoch is None:
        args.iter_per_epoch = 1  # upstream's --debug: one iteration per epoch
    check_preprocessed_folder(args.datapath)  # before the lists: their default place is inside it
    split = load_split(split_dir(args))
    if args.stop_epoch is not None:
        # max_steps counts global steps, which a resumed run restores, so this is an absolute epoch limit
        stop = args.stop_epoch * (args.iter_per_epoch or len(split.train))
        args.max_steps = min(args.max_steps or stop, stop)
    seed_everything(args.seed)
    overrides = {"patch_size": args.patch_size} if args.patch_size else {}
    model = build_method("mmformer", args.preset, **overrides)
    # upstream passes the weight decay through the parameter group: the same coupled L2
    optimizer = torch.optim.Adam(
        model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay, amsgrad=True
    )
    train_from_args(
        args,
        model,
        FusedSeparateDeepLoss(args.region_fusion_start_epoch, args.reference_quirks),
        optimizer,
        transform=rfnet_augmentation(model.patch_size, reference_quirks=args.reference_quirks),
        scheduler=PolyLR(optimizer, args.num_epochs),
        val_epochs=select_val_epochs(UPSTREAM_VAL_EPOCHS, args.num_epochs, args.debug, args.val_every),
        split=split,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
