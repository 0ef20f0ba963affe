"""Train IM-Fuse (upstream ``IMFuse/train_poly.py``): RAdam, poly learning rate, upstream's loss and validation epochs.

    python IMFuse/train_poly.py --datapath <preprocessed> --num_epochs 1000 --dataname BRATS2023 \
        --savepath <run> --mamba_skip --interleaved_tokenization
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch

from brats_core.apps.arguments import add_data_args, add_preset_arg, add_runtime_args, add_train_args
from brats_core.apps.scripts import add_val_args, select_val_epochs, train_from_args
from brats_core.data.transforms import rfnet_augmentation
from brats_core.engine.training import PolyLR, seed_everything
from brats_core.nn.losses import FusedSeparateDeepLoss
from brats_core.registry import build_method
from brats_core.utils.cli import run_main, setup_logging

log = logging.getLogger("IMFuse.train_poly")


def upstream_val_epochs(num_epochs: int) -> list[int]:
    """Upstream's validation epochs (1-based): every 50 up to 200, every 100 up to 800, 850, 900, every 10 up to 950,
    then every 5 (50, 100, 150, 200, 300, …, 800, 850, 900, 910, …, 950, 955, …, 1000 for 1000 epochs)."""

    def due(e: int) -> bool:
        step = 50 if e <= 200 else 100 if e <= 800 else 50 if e <= 900 else 10 if e <= 950 else 5
        return e % step == 0

    return [e for e in range(1, num_epochs + 1) if due(e)]


def build_parser(
    prog: str = "IMFuse/train_poly.py",
    description: str = __doc__.splitlines()[0],
    lr: float = 2e-4,
    first_skip: bool = True,
) -> argparse.ArgumentParser:
    """The upstream flags; ``train.py`` has another learning rate and no ``--first_skip``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_data_args(p, savepath_required=True)
    add_train_args(p, batch_size=1, lr=lr, weight_decay=3e-5, num_epochs=1000, seed=999)
    add_runtime_args(p)
    g = p.add_argument_group("IM-Fuse")
    g.add_argument("--mamba_skip", action="store_true", help="fuse the skip connections with Mamba fusion blocks")
    g.add_argument(
        "--interleaved_tokenization", action="store_true", help="I-MFB: interleave the 5 tokens per position"
    )
    if first_skip:
        g.add_argument(
            "--first_skip",
            action="store_true",
            help="train upstream's IMFuse.IMFuse (level-1 skip) instead of the default IMFuse_no1skip.Model",
        )
    g.add_argument("--region_fusion_start_epoch", type=int, default=0, help="epoch from which the fused loss counts")
    add_preset_arg(g, "imfuse")
    g.add_argument("--patch_size", type=int, default=None, help="training patch (default: the preset's, paper 128)")
    add_val_args(g)
    g.add_argument("--pretrain", default=None, help=argparse.SUPPRESS)  # accepted for compatibility; unused upstream
    return p


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None, cosine: bool = False) -> int:
    """Parse the flags and train; ``cosine`` selects ``train.py``'s schedule instead of the poly one."""
    args = (parser or build_parser()).parse_args(argv)
    setup_logging(args.savepath, "train.txt")
    if args.pretrain:
        log.warning("--pretrain is accepted for compatibility but unused, as upstream")
    seed_everything(args.seed)
    overrides = {
        "first_skip": getattr(args, "first_skip", False),
        "mamba_skip": args.mamba_skip,
        "interleaved_tokenization": args.interleaved_tokenization,
    }
    if args.patch_size:
        overrides["patch_size"] = args.patch_size
    model = build_method("imfuse", args.preset, **overrides)
    optimizer = torch.optim.RAdam(
        model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay
    )
    val_epochs = select_val_epochs(upstream_val_epochs(args.num_epochs), args.num_epochs, args.debug, args.val_every)
    train_from_args(
        args,
        model,
        FusedSeparateDeepLoss(args.region_fusion_start_epoch, args.reference_quirks),
        optimizer,
        transform=rfnet_augmentation(model.patch_size, reference_quirks=args.reference_quirks),
        scheduler=(
            # train.py: cosine over 100 epochs, stepped per epoch, so the rate cycles every 200 epochs
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100, eta_min=5e-6)
            if cosine
            else PolyLR(optimizer, args.num_epochs)
        ),
        val_epochs=val_epochs,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
