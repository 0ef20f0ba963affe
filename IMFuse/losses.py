"""IM-Fuse's training loss (METHODS.md §1.5): weighted CE + Dice on the fused, separate and deep-supervision maps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from brats_core.losses import dice_loss, one_hot, one_hot_upstream, softmax_weighted_loss


def rfnet_term(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """weighted CE + soft Dice on probabilities ``(B, C, ...)`` against a one-hot ``target``."""
    return softmax_weighted_loss(probs, target) + dice_loss(probs, target)


class IMFuseLoss:
    """``L = [wCE + Dice](fused)·[epoch ≥ region_fusion_start_epoch] + Σ_4 [wCE + Dice](sep) + Σ_4 [wCE + Dice](ds)``.

    Args:
        region_fusion_start_epoch: epochs (0-based) before which the fused term is multiplied by 0.
        reference_quirks: one-hot like upstream (``eye(4)[label]``: rotation fill −1 becomes ET).
    """

    def __init__(self, region_fusion_start_epoch: int = 0, reference_quirks: bool = False) -> None:
        self.region_fusion_start_epoch = region_fusion_start_epoch
        self.encode_target = one_hot_upstream if reference_quirks else one_hot

    def __call__(self, model: nn.Module, batch: Mapping[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        fused, separate, deep = model(batch["image"], batch["mask"])
        target = self.encode_target(batch["label"], fused.shape[1])
        fuse_loss = rfnet_term(fused, target) * float(epoch >= self.region_fusion_start_epoch)
        sep_loss = sum(rfnet_term(p, target) for p in separate)
        prm_loss = sum(rfnet_term(p, target) for p in deep)
        loss = fuse_loss + sep_loss + prm_loss
        return loss, {
            "fuse": float(fuse_loss.detach()),
            "sep": float(sep_loss.detach()),
            "prm": float(prm_loss.detach()),
        }
