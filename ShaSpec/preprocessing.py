"""ShaSpec's input normalisation: the array function that the model (``ShaSpec.preprocess``, for ``predict.py``)
and the data pipeline (:mod:`ShaSpec.data`, the training cache) share, so that neither of those modules imports the
other."""

from __future__ import annotations

import numpy as np

__all__ = ["HIST_MIN_COUNT", "PIPELINE", "STD_EPS", "normalise_modality"]

PIPELINE = "shaspec"
"""Value of ``"pipeline"`` in the metadata of the cases cached here."""

HIST_MIN_COUNT = 50  # the clip level is the highest histogram bin holding at least this many voxels
STD_EPS = 1e-7


def normalise_modality(image: np.ndarray) -> np.ndarray:
    """ShaSpec's per-modality normalisation of a raw volume.

    Histogram with ``int(max)`` bins; intensities above the lower edge of the highest bin holding ≥ 50 voxels are
    clipped to it; the background value is the voxel ``[0, 0, 0]``; the other voxels are z-scored with their mean and
    ``std + 1e-7``; background voxels become 0.

    Args:
        image: raw intensities ``(X, Y, Z)``.

    Returns:
        float32 ``(X, Y, Z)``.
    """
    x = np.asarray(image, dtype=np.float32).copy()
    bins = max(1, int(x.max()))
    counts, edges = np.histogram(x, bins=bins)
    full = np.flatnonzero(counts >= HIST_MIN_COUNT)
    if full.size:
        x = np.minimum(x, np.float32(edges[full[-1]]))
    background = x.flat[0]
    fg = x != background
    out = np.zeros_like(x)
    if fg.any():
        values = x[fg]
        out[fg] = (values - values.mean()) / (values.std() + STD_EPS)
    return out
