"""Train U-HVED (upstream ``UHVED/train_uhved.py``): Adam (amsgrad), LR plateau on the validation loss, upstream's loss.

python UHVED/train_uhved.py --datapath <preprocessed> --num_epochs 400 --dataname BRATS2023 --savepath <run>
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from brats_core.apps.arguments import add_data_args, add_preset_arg, add_runtime_args, add_train_args
from brats_core.apps.scripts import add_val_args, select_val_epochs, train_from_args
from brats_core.data.dataset import load_case
from brats_core.data.splits import Split
from brats_core.data.transforms import rfnet_augmentation
from brats_core.engine.inference import predict_scenarios
from brats_core.engine.training import seed_everything
from brats_core.modalities import Mask
from brats_core.registry import SegModel, build_method
from brats_core.utils.cli import run_main, setup_logging
from UHVED.losses import UHVEDLoss, validation_seg_loss

log = logging.getLogger("UHVED.train_uhved")

UPSTREAM_VAL_EPOCHS: tuple[int, ...] = (
    5, 10, 15, 20, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 90, 100, 110, 125, 150, 175, 200, 225, 250,
    260, 270, 275, 280, 285, 290, 295, 300, 310, 320, 330, 340, 350, 360, 370, 380, 390, 400,
)  # fmt: skip
"""Upstream's hard-coded validation epochs (1-based)."""


def upstream_val_epochs(num_epochs: int) -> list[int]:
    """Validation epochs (1-based) of a ``num_epochs`` run: upstream's list up to 400 (5, 10, 15, 20, 30, 35, …, 75,
    90, 100, 110, 125, 150, …, 250, 260, 270, 275, 280, …, 300, 310, …, 400), then every 10 epochs.

    Upstream's list ends at 400 (its README's run length), so a longer upstream run never validates again and its
    plateau scheduler and ``best.pth`` freeze; continuing every 10 epochs keeps both alive and changes nothing up to
    400 epochs.
    """
    beyond = range(UPSTREAM_VAL_EPOCHS[-1] + 10, num_epochs + 1, 10)
    return [e for e in UPSTREAM_VAL_EPOCHS if e <= num_epochs] + list(beyond)


def validation_loss(
    model: SegModel,
    root: str | Path,
    rows: Sequence[tuple[str, Mask]],
    reference_quirks: bool = False,
    progress: bool = True,
) -> float:
    """Mean over validation cases of :func:`UHVED.losses.validation_seg_loss` on the blended logits of each case
    under its split-file mask (window = patch, overlap 0.5, uniform blending, as upstream's ``test_softmax``).

    Args:
        model: the model (its mode is restored afterwards).
        root: preprocessed data folder.
        rows: ``(case, canonical mask)`` pairs.
        reference_quirks: feed logits to the probability losses, as upstream.
        progress: show a progress bar.

    Returns:
        the mean loss.
    """
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for case, mask in tqdm(rows, desc="validation loss", disable=not progress, leave=False):
            image, label = load_case(root, case)
            if label is None:
                raise FileNotFoundError(f"validation case {case} has no label map under {root}")
            logits = predict_scenarios(model, torch.from_numpy(image)[None], [mask])
            with torch.no_grad():
                label_t = torch.from_numpy(label)[None].to(logits.device)
                total += float(validation_seg_loss(logits, label_t, reference_quirks))
    finally:
        model.train(was_training)
    return total / max(1, len(rows))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="UHVED/train_uhved.py", description=__doc__.splitlines()[0])
    add_data_args(p, savepath_required=True)
    add_train_args(p, batch_size=1, lr=1e-3, weight_decay=1e-5, num_epochs=300, seed=999)
    add_runtime_args(p)
    g = p.add_argument_group("U-HVED")
    add_preset_arg(g, "uhved")
    g.add_argument("--patch_size", type=int, default=None, help="training patch (default: the preset's, paper 112)")
    add_val_args(g)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.savepath, "train.txt")
    seed_everything(args.seed)
    overrides = {"patch_size": args.patch_size} if args.patch_size else {}
    model = build_method("uhved", args.preset, **overrides)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay, amsgrad=True
    )
    # PyTorch defaults as upstream (mode min, factor 0.1, patience 10, rel. threshold 1e-4); the trainer steps it only
    # after validation epochs, with the validation loss below.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)

    def extra_validation(m: SegModel, split: Split) -> Mapping[str, float]:
        loss = validation_loss(m, args.datapath, split.val, args.reference_quirks, progress=not args.no_progress)
        return {"val_loss": loss}

    train_from_args(
        args,
        model,
        UHVEDLoss(args.reference_quirks),
        optimizer,
        transform=rfnet_augmentation(model.patch_size, reference_quirks=args.reference_quirks),
        scheduler=scheduler,
        val_epochs=select_val_epochs(upstream_val_epochs(args.num_epochs), args.num_epochs, args.debug, args.val_every),
        extra_validation=extra_validation,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
