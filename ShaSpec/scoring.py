"""ShaSpec's own sliding window and scores, used for its validation during training and for
``eval.py --reference-quirks``. The paper protocol shared by all methods lives in ``brats_core.engine.evaluation``.

Upstream tiles the volume with the training crop (80×160×160 in ``(D, H, W)``) at overlap 1/3, i.e. strides
``ceil(tile·2/3)`` with the last tile clamped to the border; it averages LOGITS for validation (then a soft Dice) and
per-tile SIGMOID probabilities for testing (then rounding), and scores each region (ET, WT, TC) separately with
``2Σp·g / (Σp + Σg + 1)`` — so an empty ground truth with an empty prediction scores 0 —, without ET
post-processing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from brats_core.modalities import Mask

from .data import label_to_shaspec_regions
from .model import ShaSpec

UPSTREAM_OVERLAP = 1.0 / 3.0
REGIONS: tuple[str, ...] = ("ET", "WT", "TC")  # ShaSpec's head order


def tile_starts(dim: int, tile: int, overlap: float = UPSTREAM_OVERLAP) -> list[int]:
    """Upstream's tile corners along one axis: stride ``ceil(tile·(1 − overlap))``, ``ceil((dim − tile)/stride) + 1``
    tiles, each clamped so that it ends inside the volume (``dim ≤ tile`` gives ``[0]``)."""
    stride = math.ceil(tile * (1.0 - overlap))
    count = max(0, math.ceil((dim - tile) / stride)) + 1
    return [max(min(i * stride + tile, dim) - tile, 0) for i in range(count)]


def upstream_sliding_window(
    model: ShaSpec,
    image: torch.Tensor,
    masks: Sequence[Mask],
    *,
    probabilities: bool,
    overlap: float = UPSTREAM_OVERLAP,
) -> torch.Tensor:
    """Blend upstream's tiles for several scenarios (each window encoded once).

    Args:
        model: eval-mode ShaSpec.
        image: ``(4, X, Y, Z)`` canonical order; padded with 0 (ShaSpec's background) where smaller than the tile.
        masks: canonical masks, one output each.
        probabilities: average per-tile sigmoid probabilities (test) instead of logits (validation).
        overlap: tile overlap (upstream 1/3).

    Returns:
        float32 ``(S, 3, X, Y, Z)`` (ET, WT, TC).
    """
    device = next(model.parameters()).device
    tile = model.patch_size
    tile = (tile,) * 3 if isinstance(tile, int) else tuple(tile)
    shape = tuple(image.shape[1:])
    padded = tuple(max(s, t) for s, t in zip(shape, tile, strict=True))
    x = torch.zeros((1, 4, *padded), dtype=torch.float32, device=device)
    x[(slice(None), slice(None), *(slice(0, s) for s in shape))] = image.to(device)
    acc = torch.zeros((len(masks), 3, *padded), dtype=torch.float32, device=device)
    count = torch.zeros(padded, dtype=torch.float32, device=device)
    mask_rows = [torch.tensor([m], dtype=torch.bool, device=device) for m in masks]
    starts = [tile_starts(d, t, overlap) for d, t in zip(padded, tile, strict=True)]
    with torch.inference_mode():
        for corner in itertools.product(*starts):
            box = tuple(slice(c, c + t) for c, t in zip(corner, tile, strict=True))
            features = model.encode(x[(..., *box)])
            for s, m in enumerate(mask_rows):
                out = model.decode(features, m)[0].float()
                acc[(s, slice(None), *box)] += torch.sigmoid(out) if probabilities else out
            count[box] += 1
    crop = (slice(None), slice(None), *(slice(0, s) for s in shape))
    return (acc / count)[crop]


def dice_plus_one(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> float:
    """Upstream's Dice ``2Σp·g / (Σp + Σg + 1)`` (soft or binary inputs of one region)."""
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).double()
    g = torch.as_tensor(np.asarray(gt) if not isinstance(gt, torch.Tensor) else gt).double()
    return float(2.0 * (p * g).sum() / (p.sum() + g.sum() + 1.0))


def upstream_binarise(probabilities: torch.Tensor) -> torch.Tensor:
    """Upstream's rounding of averaged probabilities: ``> 0.5`` → 1 (numpy rounds exactly 0.5 down to 0)."""
    return (probabilities > 0.5).to(torch.uint8)


def region_scores(pred_regions: torch.Tensor | np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Upstream Dice (+1) per region of ``pred_regions`` ``(3, ...)`` (ET, WT, TC) against BraTS ``label``."""
    gt = label_to_shaspec_regions(np.asarray(label))
    pred = pred_regions.cpu().numpy() if isinstance(pred_regions, torch.Tensor) else np.asarray(pred_regions)
    return {r: dice_plus_one(pred[i], gt[i]) for i, r in enumerate(REGIONS)}


def soft_validation_score(model: ShaSpec, image: torch.Tensor, label: np.ndarray, mask: Mask) -> dict[str, float]:
    """Upstream's validation score of one case: soft Dice (+1) of ``sigmoid`` of the tile-averaged logits."""
    logits = upstream_sliding_window(model, image, [mask], probabilities=False)[0]
    return region_scores(torch.sigmoid(logits), label)
