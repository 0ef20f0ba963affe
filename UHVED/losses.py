"""U-HVED's losses: CE + Dice + 0.1·multi-subset KLD + 0.1·MSE reconstruction, and the
validation segmentation loss that drives the plateau scheduler."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brats_core.modalities import MODALITIES
from brats_core.nn.losses import dice_loss, one_hot, one_hot_upstream, softmax_loss, softmax_weighted_loss
from UHVED.model import Gaussian, UHVEDTrainOutput, product_of_gaussians, upcast_half

KLD_EPS = 1e-5  # epsilon of the products of Gaussians inside the KL term (the model's own fusion uses 1e-7)
KL_VAR_EPS = 0.01  # added to the second distribution's variance in the KL formula
WEIGHTED_CE_EPS = 1e-8  # U-HVED's weighted CE adds this to the class-weight denominator

SUBSETS: tuple[tuple[int, ...], ...] = tuple(
    s for k in range(1, len(MODALITIES) + 1) for s in itertools.combinations(range(len(MODALITIES)), k)
)
"""The 15 non-empty subsets of the four modalities, as modality indices (the order does not change the sums)."""


def kl_divergence(a: Gaussian, b: Gaussian) -> torch.Tensor:
    """Upstream's averaged KL(a ‖ b) between diagonal Gaussians, with 0.01 added to ``var_b``.

    ``0.5 · mean(−1 + logvar_b − logvar_a + (var_a + (μ_a − μ_b)²) / (var_b + 0.01))``, the mean over all elements.

    Args:
        a: tensors of any shape.
        b: tensors broadcastable to ``a``'s shape (e.g. 0-d zeros for N(0, 1)).

    Returns:
        scalar.
    """
    a = Gaussian(upcast_half(a.mu), upcast_half(a.logvar))
    ratio = (torch.exp(a.logvar) + (a.mu - b.mu).square()) / (torch.exp(b.logvar) + KL_VAR_EPS)
    return 0.5 * (-1.0 + b.logvar - a.logvar + ratio).mean()


def multi_subset_kld(params: Gaussian, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two KL terms of one scale.

    With q_full the product of the PRESENT modalities' Gaussians and the prior, and q_S the product over subset S
    (all 15 non-empty subsets, whichever modalities are present) and the prior, all with eps 1e-5::

        inter = (1/15) Σ_S KL(q_full ‖ q_S),    prior = (1/15) Σ_S KL(q_S ‖ N(0, 1))

    Args:
        params: every modality's Gaussian ``(B, 4, C, ...)``, modality axis in the order of ``mask``.
        mask: ``(B, 4)`` bool, True = available.

    Returns:
        ``(inter, prior)``, scalars.
    """
    full = product_of_gaussians(params.mu, params.logvar, mask, KLD_EPS)
    standard = Gaussian(params.mu.new_zeros(()), params.logvar.new_zeros(()))
    inter = params.mu.new_zeros(())
    prior = params.mu.new_zeros(())
    for subset in SUBSETS:
        index = list(subset)
        q = product_of_gaussians(params.mu[:, index], params.logvar[:, index], None, KLD_EPS)
        inter = inter + kl_divergence(full, q)
        prior = prior + kl_divergence(q, standard)
    return inter / len(SUBSETS), prior / len(SUBSETS)


def kld_loss(posteriors: Sequence[Gaussian], mask: torch.Tensor) -> torch.Tensor:
    """``(1/#scales) Σ_scales (inter + prior)`` of :func:`multi_subset_kld`.

    Args:
        posteriors: per scale, every modality's Gaussian ``(B, 4, C_s, ...)`` (``UHVEDTrainOutput.posteriors``).
        mask: ``(B, 4)`` bool, same modality order.

    Returns:
        scalar.
    """
    total = posteriors[0].mu.new_zeros(())
    for g in posteriors:
        inter, prior = multi_subset_kld(g, mask)
        total = total + inter + prior
    return total / len(posteriors)


def reconstruction_loss(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all voxels of all four modalities, present or not.

    Args:
        reconstructions: ``(B, 4, D, H, W)``.
        images: the input ``(B, 4, D, H, W)``, same channel order.

    Returns:
        scalar.
    """
    return F.mse_loss(reconstructions.float(), images.float())


class UHVEDLoss:
    """``L = CE(seg) + Dice(seg) + 0.1·KLD + 0.1·MSE_rec`` (unweighted CE; probabilities from the train forward).

    Args:
        reference_quirks: one-hot like upstream (``eye(4)[label]``: the rotation fill −1 becomes ET).
        kld_weight: weight of the KL term.
        reconstruction_weight: weight of the reconstruction term.
    """

    def __init__(
        self, reference_quirks: bool = False, kld_weight: float = 0.1, reconstruction_weight: float = 0.1
    ) -> None:
        self.encode_target = one_hot_upstream if reference_quirks else one_hot
        self.kld_weight = kld_weight
        self.reconstruction_weight = reconstruction_weight

    def __call__(self, model: nn.Module, batch: Mapping[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        out: UHVEDTrainOutput = model(batch["image"], batch["mask"])
        target = self.encode_target(batch["label"], out.seg.shape[1])
        cross = softmax_loss(out.seg, target)
        dice = dice_loss(out.seg, target)
        kld = kld_loss(out.posteriors, batch["mask"])
        rec = reconstruction_loss(out.reconstructions, batch["image"])
        loss = cross + dice + self.kld_weight * kld + self.reconstruction_weight * rec
        return loss, {
            "cross": float(cross.detach()),
            "dice": float(dice.detach()),
            "kld": float(kld.detach()),
            "reconstruction": float(rec.detach()),
        }


def validation_seg_loss(logits: torch.Tensor, label: torch.Tensor, reference_quirks: bool = False) -> torch.Tensor:
    """The validation loss that steps the plateau scheduler: class-weighted CE (eps 1e-8) + Dice of one case.

    Upstream (``test_softmax``) computes the unweighted CE, overwrites it with the weighted one and adds the Dice
    loss, all on the sliding-window-blended LOGITS although both losses expect probabilities (CE clamps them to
    [0.005, 1], Dice uses them raw). By default the logits go through a softmax first; ``reference_quirks`` keeps
    upstream's behaviour (which changes the learning-rate trajectory).

    Args:
        logits: blended segmentation logits ``(B, C, D, H, W)``.
        label: integer labels ``(B, D, H, W)`` in ``[0, C)``.
        reference_quirks: feed the logits to the probability losses, as upstream.

    Returns:
        scalar.
    """
    probs = logits.float() if reference_quirks else torch.softmax(logits.float(), dim=1)
    target = one_hot(label, logits.shape[1]).to(probs.device)
    return softmax_weighted_loss(probs, target, eps=WEIGHTED_CE_EPS) + dice_loss(probs, target)
