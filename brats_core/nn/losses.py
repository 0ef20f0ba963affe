"""Segmentation losses shared by several methods: upstream's RFNet-family losses and M3AE's region losses.

The RFNet-family losses (IM-Fuse, mmFormer, RobustSeg, SFusion, U-HVED) take class PROBABILITIES ``(B, C, ...)``
(after softmax) and a one-hot target of the same shape; they are exactly upstream's formulas. An integer label map
``(B, ...)`` is accepted too and is one-hot encoded with the strict :func:`one_hot`.

Upstream builds its one-hot targets as ``eye(C)[label]``, so the label value −1 that its rotation augmentation writes
outside the rotated cube becomes the LAST class (ET) (docs/upstream.md). :func:`one_hot_upstream` reproduces that
for the ``--reference-quirks`` path; :func:`one_hot` rejects such labels.

The region-based methods (M3AE, ShaSpec, MaM) use soft Dice on sigmoid outputs plus binary cross-entropy on region
targets; :func:`region_dice_bce` covers all three through its options, and each method folder wraps it with its own
weights.

RobustSeg and SFusion share :class:`RMBTSLoss`: weighted CE (ε = 1e-8) + Dice + 0.1·L1 reconstruction + 0.1·KL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Upstream clamps probabilities before the log so that a confidently wrong voxel costs at most −log(0.005).
PROB_CLAMP_MIN = 0.005


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot encode an integer label map, rejecting values outside ``[0, num_classes)``.

    Args:
        label: integer labels ``(B, ...)``.
        num_classes: number of classes C.

    Returns:
        float32 ``(B, C, ...)``.

    Raises:
        ValueError: a label is negative or ≥ ``num_classes`` (e.g. upstream's −1 rotation fill; use
            :func:`one_hot_upstream` to reproduce upstream's handling of it).
    """
    _check_integer(label)
    if label.numel() and (int(label.min()) < 0 or int(label.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{int(label.min())}, {int(label.max())}]; "
            "for upstream's -1 fill use one_hot_upstream()"
        )
    return F.one_hot(label.long(), num_classes).movedim(-1, 1).float()


def one_hot_upstream(label: torch.Tensor, num_classes: int = 4) -> torch.Tensor:
    """One-hot encode like upstream's ``eye(num_classes)[label]`` (the ``--reference-quirks`` behaviour).

    Row-indexing an identity matrix wraps negative indices, so −1 (upstream's label fill outside a rotated patch)
    becomes the LAST class — ET for BraTS — and −k becomes class ``num_classes − k``. Values outside
    ``[−num_classes, num_classes)`` are rejected, as the indexing would fail upstream too.

    Args:
        label: integer labels ``(B, ...)``.
        num_classes: number of classes C.

    Returns:
        float32 ``(B, C, ...)``.
    """
    _check_integer(label)
    if label.numel() and (int(label.min()) < -num_classes or int(label.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [-{num_classes}, {num_classes}) for eye({num_classes}) indexing, "
            f"got values in [{int(label.min())}, {int(label.max())}]"
        )
    return one_hot(torch.remainder(label.long(), num_classes), num_classes)


def softmax_weighted_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Class-balanced cross-entropy on probabilities (upstream ``softmax_weighted_loss``).

    ``w_bc = 1 − Σ_xyz t_bc / (Σ_c Σ_xyz t_bc + eps)`` and
    ``L = mean_{b,xyz} Σ_c −w_bc · t_bc · log(clamp(p_bc, 0.005, 1))``.

    Args:
        probs: class probabilities ``(B, C, ...)``.
        target: one-hot target ``(B, C, ...)`` or integer labels ``(B, ...)``.
        eps: added to the weight's denominator; 0 for IM-Fuse/mmFormer, 1e-8 for RobustSeg/SFusion/U-HVED.

    Returns:
        scalar loss.
    """
    probs, target = _probs_and_target(probs, target)
    space = tuple(range(2, probs.dim()))
    per_class = target.sum(dim=space)  # (B, C)
    weight = 1.0 - per_class / (per_class.sum(dim=1, keepdim=True) + eps)
    weight = weight.reshape(*weight.shape, *([1] * len(space)))
    return _cross_entropy(probs, target, weight)


def softmax_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unweighted cross-entropy on probabilities (upstream ``softmax_loss``, used by U-HVED).

    ``L = mean_{b,xyz} Σ_c −t_bc · log(clamp(p_bc, 0.005, 1))``.

    Args:
        probs: class probabilities ``(B, C, ...)``.
        target: one-hot target ``(B, C, ...)`` or integer labels ``(B, ...)``.

    Returns:
        scalar loss.
    """
    probs, target = _probs_and_target(probs, target)
    return _cross_entropy(probs, target, None)


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Soft Dice on probabilities over the whole batch and space, background included (upstream ``dice_loss``).

    ``L = 1 − (1/C) Σ_c 2 Σ(p_c t_c) / (Σ p_c + Σ t_c + eps)``, sums over batch and space.

    Args:
        probs: class probabilities ``(B, C, ...)``.
        target: one-hot target ``(B, C, ...)`` or integer labels ``(B, ...)``.
        eps: added to each class's denominator.

    Returns:
        scalar loss.
    """
    probs, target = _probs_and_target(probs, target)
    dims = (0, *range(2, probs.dim()))
    intersection = (probs * target).sum(dim=dims)
    denominator = probs.sum(dim=dims) + target.sum(dim=dims) + eps
    return 1.0 - (2.0 * intersection / denominator).mean()


def region_dice_bce(
    logits: torch.Tensor,
    region_target: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    smooth: float = 1.0,
    smooth_numerator: bool = True,
    squared: bool = False,
    batch_dice: bool = True,
) -> torch.Tensor:
    """Soft Dice on sigmoid outputs plus binary cross-entropy with logits, for region (WT/TC/ET) heads.

    With ``s = sigmoid(logits)``, target ``y`` and ``q = 2`` if ``squared`` else ``1``, per region channel r::

        D_r = (2 Σ s·y + smooth·[smooth_numerator]) / (Σ s^q + Σ y^q + smooth)
        L   = dice_weight · (1 − mean D) + bce_weight · mean_{b,r,xyz} BCEWithLogits(logits, y)

    The sums run over batch and space when ``batch_dice`` (one D per region, then the mean over regions), otherwise
    over space only (one D per sample and region, then the mean over both). The defaults (smooth 1 in numerator and
    denominator, not squared, batch Dice, weights 1/1) are this project's generic choice. Method folders wrap this
    function with their upstream settings:

    - M3AE EDice: ``dice_weight=0.7, bce_weight=0.3, squared=True``; upstream applies ``BCELoss`` to
      ``sigmoid(logits)``, which equals BCE with logits apart from ``BCELoss``'s log clamp at −100.
    - ShaSpec: ``smooth_numerator=False, batch_dice=False, bce_weight=3.0`` (upstream SUMS the per-channel
      mean BCE over the 3 regions).
    - MaM / nnU-Net DC+BCE: ``smooth=1e-5, batch_dice=False``; nnU-Net adds ``−D`` instead of ``1 − D``,
      a constant offset that leaves the gradients unchanged.

    Args:
        logits: region logits ``(B, R, ...)``.
        region_target: binary region masks ``(B, R, ...)`` (bool or float) in the channel order of ``logits``.
        dice_weight: weight of the Dice term.
        bce_weight: weight of the BCE term.
        smooth: smoothing added to the Dice denominator (and numerator, see ``smooth_numerator``).
        smooth_numerator: also add ``smooth`` to the Dice numerator.
        squared: square ``s`` and ``y`` in the Dice denominator.
        batch_dice: sum over the batch too (one Dice per region) instead of one Dice per sample and region.

    Returns:
        scalar loss.
    """
    if logits.shape != region_target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and region_target {tuple(region_target.shape)} differ")
    logits = logits.float()
    target = region_target.float()
    probs = torch.sigmoid(logits)
    dims = (0, *range(2, logits.dim())) if batch_dice else tuple(range(2, logits.dim()))
    power = 2 if squared else 1
    numerator = 2.0 * (probs * target).sum(dim=dims) + (smooth if smooth_numerator else 0.0)
    denominator = probs.pow(power).sum(dim=dims) + target.pow(power).sum(dim=dims) + smooth
    dice_term = 1.0 - (numerator / denominator).mean()
    bce_term = F.binary_cross_entropy_with_logits(logits, target)
    return dice_weight * dice_term + bce_weight * bce_term


def _check_integer(label: torch.Tensor) -> None:
    if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {label.dtype}")


def _probs_and_target(probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes, one-hot encode an integer ``target`` and compute in float32 (AMP outputs may be fp16)."""
    if probs.dim() < 3:
        raise ValueError(f"probs must be (B, C, ...), got shape {tuple(probs.shape)}")
    if not target.is_floating_point() and target.dim() == probs.dim() - 1:
        target = one_hot(target, probs.shape[1])
    if target.shape != probs.shape:
        raise ValueError(
            f"target {tuple(target.shape)} must be one-hot like probs {tuple(probs.shape)} or labels (B, ...)"
        )
    return probs.float(), target.float()


def _cross_entropy(probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``mean_{b,xyz} Σ_c −[w] t log(clamp(p))`` shared by the weighted and unweighted losses."""
    loss = -target * torch.log(probs.clamp(PROB_CLAMP_MIN, 1.0))
    if weight is not None:
        loss = weight * loss
    return loss.sum(dim=1).mean()


def rfnet_term(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """weighted CE + soft Dice on probabilities ``(B, C, ...)`` against a one-hot ``target``."""
    return softmax_weighted_loss(probs, target) + dice_loss(probs, target)


class FusedSeparateDeepLoss:
    """The mmFormer / IM-Fuse training loss, a ``training.LossFn``:
    ``L = [wCE + Dice](fused)·[epoch ≥ region_fusion_start_epoch] + Σ_4 [wCE + Dice](sep) + Σ_4 [wCE + Dice](ds)``,
    for models whose train mode returns ``(fused, 4 separate, 4 deep-supervision)`` probabilities.

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


# ------------------------------------------------------------------------------------ RMBTS family (RobustSeg, SFusion)

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
