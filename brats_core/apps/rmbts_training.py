"""Training of the RMBTS family (RobustSeg, SFusion): their shared recipe.

The networks are in :mod:`brats_core.nn.rmbts` and the loss in :class:`brats_core.nn.losses.RMBTSLoss`; this module
holds what both upstream training scripts share: the flags, Adam with amsgrad and poly LR per epoch, so that the
method folders only state what is their own.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from brats_core.apps.arguments import add_data_args, add_preset_arg, add_runtime_args, add_train_args
from brats_core.apps.scripts import add_val_args, select_val_epochs, train_from_args
from brats_core.data.splits import Split
from brats_core.data.transforms import rfnet_augmentation
from brats_core.engine.training import PolyLR, seed_everything
from brats_core.nn.losses import RMBTSLoss
from brats_core.registry import build_method, method_info

log = logging.getLogger(__name__)


def build_train_parser(prog: str, description: str, method: str, num_epochs: int) -> argparse.ArgumentParser:
    """The flags both upstream training scripts share, with their defaults, plus ``--preset``, ``--patch_size``,
    ``--val_every``; the caller adds the method's own group."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_data_args(p, savepath_required=True)
    add_train_args(p, batch_size=1, lr=1e-4, weight_decay=1e-4, num_epochs=num_epochs, seed=999)
    add_runtime_args(p)
    g = p.add_argument_group(method_info(method).display)
    add_preset_arg(g, method)
    g.add_argument("--patch_size", type=int, default=None, help="training patch (default: the preset's)")
    add_val_args(g)
    g.add_argument("--drop_rate_value", type=float, default=0.0, help="accepted for compatibility; unused upstream")
    return p


def train_main(
    args: argparse.Namespace,
    method: str,
    overrides: Mapping[str, Any],
    upstream_val_epochs: Sequence[int],
    *,
    intensity: bool,
    split: Split | None = None,
) -> int:
    """Seed, build the model and train it with the shared recipe; the caller has set up
    logging (``brats_core.utils.cli.setup_logging``).

    Adam (β 0.9/0.999, ε 1e-8, amsgrad) with the configured lr and weight decay, poly LR per epoch, :class:`RMBTSLoss`,
    the RFNet augmentation (``intensity=False`` for SFusion), validation after :func:`select_val_epochs`, best
    checkpoint by validation mean Dice, all through ``brats_core.apps.scripts.train_from_args``.

    Args:
        args: parsed flags of :func:`build_train_parser` (+ the method's).
        method: registry name.
        overrides: config fields on top of the preset.
        upstream_val_epochs: upstream's validation epochs (1-based).
        intensity: use the random intensity change.
        split: the split to train on (default: ``<split_dir>``'s).

    Returns:
        0.
    """
    if args.drop_rate_value:
        log.warning("--drop_rate_value is accepted for compatibility but unused, as upstream")
    seed_everything(args.seed)
    model = build_method(method, args.preset, **overrides)
    # upstream passes weight decay through the parameter group; same optimiser
    optimizer = torch.optim.Adam(
        model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay, amsgrad=True
    )
    train_from_args(
        args,
        model,
        RMBTSLoss(args.reference_quirks),
        optimizer,
        transform=rfnet_augmentation(model.patch_size, intensity=intensity, reference_quirks=args.reference_quirks),
        scheduler=PolyLR(optimizer, args.num_epochs),
        val_epochs=select_val_epochs(upstream_val_epochs, args.num_epochs, args.debug, args.val_every),
        split=split,
    )
    return 0
