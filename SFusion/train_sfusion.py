"""Train SFusion (upstream ``SFusion/train_sfusion.py``): RobustSeg's recipe on 128³ patches without intensity change.

    python SFusion/train_sfusion.py --datapath <preprocessed> --num_epochs 200 --dataname BRATS2023 \
        --savepath <run> --batch_size 1 --feature_maps 16

Upstream trains on ``datalist/train2.txt`` (872 cases: ``train.txt`` minus BraTS-GLI-00165-000, -00498-001 and
-01130-000), which its folder does not ship; pass it with ``--train_file`` to reproduce that, the default is
``<split_dir>/train.txt``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from brats_core.apps.arguments import split_dir
from brats_core.apps.rmbts_training import build_train_parser, train_main
from brats_core.data.splits import Split, load_split, read_case_list
from brats_core.engine.evaluation import check_preprocessed_folder
from brats_core.utils.cli import UsageError, run_main, setup_logging

log = logging.getLogger("SFusion.train_sfusion")

UPSTREAM_VAL_EPOCHS: tuple[int, ...] = (
    10, 15, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 110, 130, 150, 175, 200, 225, 250,
    260, 270, 275, 280, 285, 290, 295, 300,
)  # fmt: skip
"""Upstream's validation epochs (1-based)."""

# upstream flags whose only valid value is the architecture's (any other value crashed or mis-built upstream)
_FIXED = {"levels": 4, "in_channels": 1, "out_channels": 4}


def build_parser() -> argparse.ArgumentParser:
    p = build_train_parser("SFusion/train_sfusion.py", __doc__.splitlines()[0], "sfusion", num_epochs=200)
    g = p.add_argument_group("SFusion upstream flags")
    g.add_argument(
        "--feature_maps",
        type=int,
        default=None,
        help="F, content channels at full resolution (default: the preset's, paper 16 as upstream's README and test "
        "script; upstream's train-script default was 8)",
    )
    g.add_argument("--train_file", default=None, help="training list (default: <split_dir>/train.txt)")
    g.add_argument("--levels", type=int, default=4, help="must be 4 (the content encoder has 4 stages)")
    g.add_argument("--in_channels", type=int, default=1, help="must be 1 (one encoder per modality)")
    g.add_argument("--out_channels", type=int, default=4, help="must be 4 (BraTS labels 0..3)")
    g.add_argument("--norm_type", default="instance", help="accepted for compatibility; unused upstream")
    g.add_argument("--use_dropout", default="True", help="accepted for compatibility; unused upstream")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and train. ``--reference-quirks`` also makes every batch use its first sample's mask."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in _FIXED.items():
        if getattr(args, flag) != value:
            parser.error(f"--{flag} must be {value} for SFusion, got {getattr(args, flag)}")
    setup_logging(args.savepath, "train.txt")
    if args.norm_type != "instance" or args.use_dropout != "True":
        log.warning("--norm_type and --use_dropout are accepted for compatibility but unused, as upstream")
    overrides: dict[str, object] = {"first_sample_mask": args.reference_quirks}
    if args.patch_size:
        overrides["patch_size"] = args.patch_size
    if args.feature_maps:
        overrides["feature_maps"] = args.feature_maps
    check_preprocessed_folder(args.datapath)  # before the lists: their default place is inside it
    split = load_split(split_dir(args))
    if args.train_file:
        split = Split(read_case_list(args.train_file), split.val, split.test)
        try:
            split.check_disjoint()
        except ValueError as err:
            raise UsageError(f"--train_file {args.train_file}: {err}") from err
    return train_main(args, "sfusion", overrides, UPSTREAM_VAL_EPOCHS, intensity=False, split=split)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
