"""M3AE's input normalisation and random sampling: the array functions that the model (``M3AE.preprocess``, for
``predict.py``) and the data pipeline (:mod:`m3ae.data`, the training cache and samples) share, so that neither of
those modules imports the other.

Normalisation (upstream's, per case): per modality, clip to the [1st, 99th] percentiles of the voxels > 0, then
min-max scale the whole volume to [0, 1] (background ends at 0); crop to the bounding box of the non-zero voxels with
a one-voxel margin below (``[max(0, min − 1), max + 1)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from brats_core.data.preprocessing import validate_label
from brats_core.modalities import MODALITIES

__all__ = [
    "PERCENTILES",
    "PIPELINE",
    "bounding_box",
    "normalise_modality",
    "preprocess_arrays",
    "sample_modality_drop",
    "sample_pretrain_tokens",
]

PIPELINE = "m3ae"
"""Value of ``"pipeline"`` in the metadata of cases written here (a z-scored ``preprocess.py`` folder lacks it)."""

PERCENTILES = (1.0, 99.0)


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation and crop (pure array functions)


def normalise_modality(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Clip to the [1st, 99th] percentiles of the voxels > 0, then min-max scale the whole volume to [0, 1].

    Args:
        image: ``(X, Y, Z)`` raw intensities.
        name: for error messages.

    Returns:
        float32 ``(X, Y, Z)`` in [0, 1].
    """
    positive = image[image > 0]
    if positive.size == 0:
        raise ValueError(f"{name} has no voxel > 0, cannot normalise")
    lo, hi = np.percentile(positive, PERCENTILES)
    clipped = np.clip(image.astype(np.float32), np.float32(lo), np.float32(hi))
    span = float(clipped.max() - clipped.min())
    if span <= 0:
        raise ValueError(f"{name} is constant after percentile clipping, cannot min-max scale")
    return ((clipped - clipped.min()) / np.float32(span)).astype(np.float32)


def bounding_box(images: np.ndarray) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Upstream's crop: non-zero extent of the channel sum, ``[max(0, min − 1), max + 1)`` per axis.

    Args:
        images: ``(C, X, Y, Z)``.

    Returns:
        half-open ``((x0, x1), (y0, y1), (z0, z1))``.
    """
    nonzero = images.sum(axis=0) != 0
    if not nonzero.any():
        raise ValueError("the image is empty (no non-zero voxel), no bounding box")
    box = []
    for axis in range(3):
        idx = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((max(0, int(idx[0]) - 1), min(nonzero.shape[axis], int(idx[-1]) + 1)))
    return tuple(box)  # type: ignore[return-value]


def preprocess_arrays(
    images: dict[str, np.ndarray], label: np.ndarray | None = None, require_all: bool = True
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Normalise and crop one case.

    Args:
        images: modality key -> ``(X, Y, Z)`` raw intensities.
        label: optional label map ``(X, Y, Z)``.
        require_all: M3AE trains and tests on complete cases; ``False`` (new patients, ``predict.py``) accepts any
            non-empty subset: absent modalities are zero channels (the model replaces them by its completion image)
            and the bounding box comes from the available ones.

    Returns:
        ``(vol float32 (H, W, D, 4) canonical, seg uint8 (H, W, D) or None, array metadata)``.
    """
    available = [m for m in MODALITIES if m in images]
    missing = [m for m in MODALITIES if m not in images]
    if (missing and require_all) or not available:
        raise ValueError(f"missing modalities {missing}")
    shape = np.shape(images[available[0]])
    stack = np.stack([normalise_modality(images[m], m) if m in images else np.zeros(shape, np.float32)
                      for m in MODALITIES])  # fmt: skip
    box = bounding_box(stack)
    window = tuple(slice(lo, hi) for lo, hi in box)
    vol = np.ascontiguousarray(np.moveaxis(stack[(slice(None), *window)], 0, -1))
    seg = validate_label(np.asarray(label), stack.shape[1:])[window] if label is not None else None
    meta: dict[str, Any] = {
        "pipeline": PIPELINE,
        "normalisation": f"clip to percentiles {list(PERCENTILES)} of voxels > 0, then min-max to [0, 1]",
        "original_shape": [int(s) for s in stack.shape[1:]],
        "crop_box": [[int(lo), int(hi)] for lo, hi in box],
        "cropped_shape": [int(s) for s in vol.shape[:3]],
        "channels": list(MODALITIES),
        "available": available,
        "has_label": seg is not None,
    }
    return vol, seg, meta


# ---------------------------------------------------------------------------------------------------------------------
# Random modality dropping and token masking (drawn from an explicit generator: reproducible per sample)


def sample_modality_drop(rng: np.random.Generator, mdp: int = 3) -> tuple[bool, bool, bool, bool]:
    """Upstream's modality drop: ``k ~ Uniform{0, …, mdp}`` capped at 3, then ``k`` distinct modalities
    dropped uniformly. With ``mdp = 3``: full set 1/4, each 3-set 1/16, each pair 1/24, each single 1/16.

    Returns:
        canonical availability mask (True = kept); at least one modality is always kept.
    """
    if mdp < 0:
        raise ValueError(f"mdp must be >= 0, got {mdp}")
    k = min(int(rng.integers(0, mdp + 1)), 3)
    dropped = set(rng.choice(4, size=k, replace=False).tolist()) if k else set()
    return tuple(i not in dropped for i in range(4))  # type: ignore[return-value]


def sample_pretrain_tokens(rng: np.random.Generator, grid: int, visible: int, mdp: int = 3) -> np.ndarray:
    """Pre-training token mask of one sample: drop whole modalities (:func:`sample_modality_drop`), then keep
    exactly ``visible`` tokens drawn uniformly among the tokens of the kept modalities.

    Args:
        grid: tokens per axis and modality (8 at the paper size).
        visible: tokens kept over all modalities (``int((1 − 0.875) · 4 · 8³)`` = 256 at the paper size).
        mdp: maximum number of dropped modalities.

    Returns:
        bool ``(4, grid, grid, grid)``, canonical channels, True = visible.
    """
    kept = sample_modality_drop(rng, mdp)
    per_modality = grid**3
    candidates = np.concatenate([np.arange(per_modality) + c * per_modality for c in range(4) if kept[c]])
    if visible > len(candidates):
        raise ValueError(f"cannot keep {visible} tokens out of the {len(candidates)} of the kept modalities")
    tokens = np.zeros(4 * per_modality, dtype=bool)
    tokens[rng.choice(candidates, size=visible, replace=False)] = True
    return tokens.reshape(4, grid, grid, grid)
