"""Training of the RMBTS family (RobustSeg, SFusion): their shared losses and recipe.

The networks are in :mod:`brats_core.nn.rmbts`; this module holds what both upstream training scripts share:
weighted CE (ε = 1e-8) + Dice + 0.1·L1 reconstruction + 0.1·KL (:class:`RMBTSLoss`), Adam with amsgrad, poly LR per
epoch and the flags, so that the method folders only state what is their own.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .cli import add_data_args, add_preset_arg, add_runtime_args, add_train_args
from .losses import dice_loss, one_hot, one_hot_upstream, softmax_weighted_loss
from .registry import build_method, method_info
from .scripts import add_val_args, select_val_epochs, train_from_args
from .splits import Split
from .training import PolyLR, seed_everything
from .transforms import rfnet_augmentation

log = logging.getLogger(__name__)

KL_LOGVAR_CLAMP = 50.0
"""Upstream clamps log σ² to [−50, 50] before the KL term."""


def reconstruction_l1(image: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """``Σ_m mean_{b,xyz} |x_m − r_m|`` over the modality channels (against the real image, missing ones too).

    Args:
        image: (B, M, D, H, W).
        reconstruction: (B, M, D, H, W).

    Returns:
        scalar.
    """
    if image.shape != reconstruction.shape:
        raise ValueError(f"image {tuple(image.shape)} and reconstruction {tuple(reconstruction.shape)} differ")
    dims = (0, *range(2, image.dim()))
    return (image.float() - reconstruction.float()).abs().mean(dim=dims).sum()


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``Σ_m mean_{b,ch} ½(μ² + exp(lv) − 1 − lv)`` with ``lv = clamp(log σ², −50, 50)``.

    μ and σ are the AdaIN parameters from the style MLP; σ is unconstrained and σ² is used as a variance, as
    upstream (which passes ``log(σ²)`` to its KL function, so σ² enters through ``exp`` of the clamped value).

    Args:
        mu: (B, M, C).
        sigma: (B, M, C).

    Returns:
        scalar.
    """
    if mu.shape != sigma.shape or mu.dim() != 3:
        raise ValueError(f"mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} must both be (B, M, C)")
    logvar = torch.log(sigma.float().square()).clamp(-KL_LOGVAR_CLAMP, KL_LOGVAR_CLAMP)
    kl = 0.5 * (mu.float().square() + logvar.exp() - 1.0 - logvar)
    return kl.mean(dim=(0, 2)).sum()


class RMBTSLoss:
    """``wCE(seg; ε 1e-8) + Dice(seg) + 0.1·L1 reconstruction + 0.1·KL``.

    Args:
        reference_quirks: one-hot like upstream (``eye(4)[label]``: the −1 rotation fill becomes ET).
        rec_weight: weight of :func:`reconstruction_l1`.
        kl_weight: weight of :func:`kl_divergence`.
    """

    def __init__(self, reference_quirks: bool = False, rec_weight: float = 0.1, kl_weight: float = 0.1) -> None:
        self.encode_target = one_hot_upstream if reference_quirks else one_hot
        self.rec_weight, self.kl_weight = rec_weight, kl_weight

    def __call__(self, model: nn.Module, batch: Mapping[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One training loss (a ``training.LossFn``)."""
        out = model(batch["image"], batch["mask"])
        target = self.encode_target(batch["label"], out["seg"].shape[1])
        ce = softmax_weighted_loss(out["seg"], target, eps=1e-8)
        dice = dice_loss(out["seg"], target)
        rec = reconstruction_l1(batch["image"], out["reconstruction"])
        kl = kl_divergence(out["mu"], out["sigma"])
        loss = ce + dice + self.rec_weight * rec + self.kl_weight * kl
        scalars = {"ce": ce, "dice": dice, "rec": rec, "kl": kl}
        return loss, {k: float(v.detach()) for k, v in scalars.items()}


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
    logging (``brats_core.cli.setup_logging``).

    Adam (β 0.9/0.999, ε 1e-8, amsgrad) with the configured lr and weight decay, poly LR per epoch, :class:`RMBTSLoss`,
    the RFNet augmentation (``intensity=False`` for SFusion), validation after :func:`select_val_epochs`, best
    checkpoint by validation mean Dice, all through ``brats_core.scripts.train_from_args``.

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
