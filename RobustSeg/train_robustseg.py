"""Train RobustSeg (upstream ``RobustSeg/train_robustseg.py``): Adam (amsgrad), poly LR, wCE + Dice + 0.1·L1 + 0.1·KL.

    python RobustSeg/train_robustseg.py --datapath <preprocessed> --num_epochs 300 --dataname BRATS2023 \
        --savepath <run> --batch_size 1
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from brats_core.apps.rmbts_training import build_train_parser, train_main
from brats_core.utils.cli import run_main, setup_logging

log = logging.getLogger("RobustSeg.train_robustseg")

UPSTREAM_VAL_EPOCHS: tuple[int, ...] = (
    10, 15, 20, 25, 30, 40, 50, 60, 70, 90, 110, 130, 150, 175, 200, 225, 250,
    260, 270, 275, 280, 285, 290, 295, 300,
)  # fmt: skip
"""Upstream's validation epochs (1-based)."""


def build_parser() -> argparse.ArgumentParser:
    p = build_train_parser("RobustSeg/train_robustseg.py", __doc__.splitlines()[0], "robustseg", num_epochs=300)
    g = p.add_argument_group("RobustSeg upstream flags without effect")
    g.add_argument("--scale", type=int, default=8, help="accepted for compatibility; unused upstream")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and train. ``--reference-quirks`` also keeps the dropout active in eval mode, so that the
    validation during training is stochastic as upstream's (the test script has its own ``--reference-quirks``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.savepath, "train.txt")
    if args.scale != 8:
        log.warning("--scale is accepted for compatibility but unused, as upstream")
    overrides: dict[str, object] = {"inference_dropout": args.reference_quirks}
    if args.patch_size:
        overrides["patch_size"] = args.patch_size
    return train_main(args, "robustseg", overrides, UPSTREAM_VAL_EPOCHS, intensity=True)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
