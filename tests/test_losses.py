"""Upstream's RFNet-family losses and the region Dice+BCE on hand-made tensors whose values are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brats_core.nn.losses import (
    dice_loss,
    one_hot,
    one_hot_upstream,
    region_dice_bce,
    softmax_loss,
    softmax_weighted_loss,
)


def _volume(values: list[list[float]]) -> torch.Tensor:
    """(C, N) nested list → (1, C, N, 1, 1) float tensor: one sample, N voxels along the first spatial axis."""
    return torch.tensor(values, dtype=torch.float64)[None, :, :, None, None]


# Three voxels, two classes. Targets: class 0, class 0, class 1. Probabilities per voxel (p0, p1):
# (0.8, 0.2), (0.5, 0.5), (0.4, 0.6).
PROBS = _volume([[0.8, 0.5, 0.4], [0.2, 0.5, 0.6]])
LABELS = torch.tensor([[0, 0, 1]])[:, :, None, None]
TARGET = _volume([[1, 1, 0], [0, 0, 1]])


def test_one_hot_strict() -> None:
    out = one_hot(torch.tensor([[0, 2, 1]]), 3)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 3)
    assert out[0].tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert torch.equal(one_hot(LABELS, 2), TARGET.float())
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="one_hot_upstream"):
            one_hot(torch.tensor([[0, bad]]), 3)
    with pytest.raises(TypeError):
        one_hot(torch.tensor([[0.0, 1.0]]), 3)


def test_one_hot_upstream_matches_eye_indexing() -> None:
    # Upstream: np.eye(4)[label]; −1 (the rotation fill) becomes the LAST class, ET.
    label = torch.tensor([[-1, 0, 1, 2, 3, -4, -3, -2]])
    expected = np.eye(4)[label.numpy()]  # (1, N, 4)
    out = one_hot_upstream(label)
    assert np.array_equal(out.movedim(1, -1).numpy(), expected)
    assert out[0, :, 0].tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError):
        one_hot_upstream(torch.tensor([[-5]]))
    with pytest.raises(ValueError):
        one_hot_upstream(torch.tensor([[4]]))


def test_softmax_loss_by_hand() -> None:
    # mean over voxels of −log p(true class) = (−log 0.8 − log 0.5 − log 0.6) / 3
    expected = -(math.log(0.8) + math.log(0.5) + math.log(0.6)) / 3
    assert softmax_loss(PROBS, TARGET).item() == pytest.approx(expected, rel=1e-6)
    assert softmax_loss(PROBS, LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_probability_clamp_at_0005() -> None:
    # True-class probability 0.001 is clamped to 0.005: loss = −log(0.005) on the single voxel.
    probs = _volume([[0.001], [0.999]])
    target = _volume([[1], [0]])
    assert softmax_loss(probs, target).item() == pytest.approx(-math.log(0.005), rel=1e-6)


def test_softmax_weighted_loss_by_hand() -> None:
    # Class counts 2 and 1 of 3 voxels: w0 = 1 − 2/3 = 1/3, w1 = 1 − 1/3 = 2/3.
    expected = (-(1 / 3) * math.log(0.8) - (1 / 3) * math.log(0.5) - (2 / 3) * math.log(0.6)) / 3
    assert softmax_weighted_loss(PROBS, TARGET).item() == pytest.approx(expected, rel=1e-6)
    # eps (RobustSeg/SFusion/U-HVED) enters the denominator only: w0 = 1 − 2/(3 + eps), w1 = 1 − 1/(3 + eps).
    eps = 0.5
    w0, w1 = 1 - 2 / 3.5, 1 - 1 / 3.5
    expected_eps = (-w0 * math.log(0.8) - w0 * math.log(0.5) - w1 * math.log(0.6)) / 3
    assert softmax_weighted_loss(PROBS, TARGET, eps=eps).item() == pytest.approx(expected_eps, rel=1e-6)


def test_softmax_weighted_loss_weights_are_per_sample() -> None:
    # Sample 1 is all class 1: its w1 = 1 − 3/3 = 0, so it adds nothing; the mean runs over both samples' 6 voxels.
    probs = torch.cat([PROBS, _volume([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])])
    target = torch.cat([TARGET, _volume([[0, 0, 0], [1, 1, 1]])])
    sample0 = (-(1 / 3) * math.log(0.8) - (1 / 3) * math.log(0.5) - (2 / 3) * math.log(0.6)) / 3
    assert softmax_weighted_loss(probs, target).item() == pytest.approx(sample0 / 2, rel=1e-6)


def test_reference_quirk_minus_one_counts_as_et() -> None:
    # Two voxels, labels −1 (rotation fill) and 0, 4 classes. Upstream's target puts voxel 0 in ET (class 3), so
    # w = (1 − 1/2) for classes 0 and 3 and the loss is mean(−0.5 log p3(v0), −0.5 log p0(v1)).
    probs = _volume([[0.25, 0.7], [0.25, 0.1], [0.25, 0.1], [0.25, 0.1]])
    target = one_hot_upstream(torch.tensor([[-1, 0]])[:, :, None, None])
    expected = (-0.5 * math.log(0.25) - 0.5 * math.log(0.7)) / 2
    assert softmax_weighted_loss(probs, target).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        softmax_weighted_loss(probs, torch.tensor([[-1, 0]])[:, :, None, None])


def test_dice_loss_by_hand() -> None:
    # Class 0: Σpt = 0.8 + 0.5 = 1.3, Σp = 1.7, Σt = 2 → D0 = 2.6/3.7.
    # Class 1: Σpt = 0.6, Σp = 1.3, Σt = 1 → D1 = 1.2/2.3.
    d0, d1 = 2.6 / (3.7 + 1e-7), 1.2 / (2.3 + 1e-7)
    assert dice_loss(PROBS, TARGET).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)
    assert dice_loss(TARGET, TARGET).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_loss_sums_over_the_whole_batch() -> None:
    # Batch Dice: two samples of 3 voxels give the same loss as one sample of their 6 voxels.
    other_probs = _volume([[0.1, 0.9, 0.3], [0.9, 0.1, 0.7]])
    other_target = _volume([[0, 1, 1], [1, 0, 0]])
    batched = dice_loss(torch.cat([PROBS, other_probs]), torch.cat([TARGET, other_target]))
    joined = dice_loss(torch.cat([PROBS, other_probs], dim=2), torch.cat([TARGET, other_target], dim=2))
    assert batched.item() == pytest.approx(joined.item(), rel=1e-12)


def test_losses_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        dice_loss(PROBS, TARGET[:, :, :2])
    with pytest.raises(ValueError):
        region_dice_bce(PROBS, TARGET[:, :1])


# Region loss example: one region, two voxels, logits (0, ln 3) → s = (0.5, 0.75), target y = (0, 1).
# BCE = mean(−log(1 − 0.5), −log 0.75) = (ln 2 + ln 4/3)/2 = ln(8/3)/2.
REGION_LOGITS = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)[None, None]
REGION_TARGET = torch.tensor([0.0, 1.0], dtype=torch.float64)[None, None]
BCE = math.log(8 / 3) / 2


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # Default: D = (2·0.75 + 1)/(0.5 + 0.75 + 1 + 1) = 2.5/3.25 = 10/13.
        ({}, (1 - 10 / 13) + BCE),
        # M3AE: squared denominators (0.25 + 0.5625 + 1 + 1 = 2.8125): D = 2.5/2.8125 = 8/9; weights 0.7 / 0.3.
        ({"squared": True, "dice_weight": 0.7, "bce_weight": 0.3}, 0.7 * (1 - 8 / 9) + 0.3 * BCE),
        # ShaSpec: no smoothing in the numerator: D = 1.5/3.25 = 6/13; BCE summed over 3 regions is weight 3.
        ({"smooth_numerator": False, "bce_weight": 3.0}, (1 - 6 / 13) + 3 * BCE),
        # Dice only with a tiny smooth (MaM's 1e-5): D = (1.5 + 1e-5)/(2.25 + 1e-5).
        ({"smooth": 1e-5, "bce_weight": 0.0}, 1 - (1.5 + 1e-5) / (2.25 + 1e-5)),
    ],
)
def test_region_dice_bce_by_hand(kwargs: dict, expected: float) -> None:
    assert region_dice_bce(REGION_LOGITS, REGION_TARGET, **kwargs).item() == pytest.approx(expected, rel=1e-6)


def test_region_dice_bce_batch_versus_per_sample_dice() -> None:
    # Second sample: logits (0, 0) → s = (0.5, 0.5), y = (1, 1): per-sample D = (2·1 + 1)/(1 + 2 + 1) = 3/4.
    # Batch Dice over both: (2·1.75 + 1)/(2.25 + 3 + 1) = 4.5/6.25 = 0.72.
    logits = torch.cat([REGION_LOGITS, torch.zeros_like(REGION_LOGITS)])
    target = torch.cat([REGION_TARGET, torch.ones_like(REGION_TARGET)])
    per_sample = region_dice_bce(logits, target, batch_dice=False, bce_weight=0.0)
    batch = region_dice_bce(logits, target, bce_weight=0.0)
    assert per_sample.item() == pytest.approx(1 - (10 / 13 + 3 / 4) / 2, rel=1e-6)
    assert batch.item() == pytest.approx(1 - 0.72, rel=1e-6)


def test_region_dice_bce_accepts_bool_targets_and_backpropagates() -> None:
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = torch.rand(2, 3, 4, 4, 4) > 0.5
    loss = region_dice_bce(logits, target)
    loss.backward()
    assert loss.item() == pytest.approx(region_dice_bce(logits.detach(), target.float()).item())
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
