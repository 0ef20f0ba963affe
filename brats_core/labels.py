"""BraTS labels and evaluation regions.

Labels: 0 background, 1 NCR (necrotic core), 2 ED/SNFH (oedema), 3 ET (enhancing tumour); BraTS ≤ 2020 used 4 for ET.
Regions: WT = {1, 2, 3}, TC = {1, 3}, ET = {3}, nested ET ⊂ TC ⊂ WT.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

BACKGROUND, NCR, ED, ET = 0, 1, 2, 3
NUM_CLASSES = 4
LABEL_NAMES: dict[int, str] = {0: "background", 1: "NCR", 2: "ED", 3: "ET"}

REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET")


def remap_legacy(label: np.ndarray) -> np.ndarray:
    """Map the BraTS ≤ 2020 ET label 4 to 3 (a no-op for BraTS 2023)."""
    out = label.copy()
    out[out == 4] = ET
    return out


def label_to_regions(label: np.ndarray, order: Sequence[str] = REGION_NAMES) -> np.ndarray:
    """Binary region masks of a label map.

    Args:
        label: integer labels ``(...)``.
        order: region names in output channel order.

    Returns:
        bool array ``(len(order), ...)``.
    """
    return np.stack([np.isin(label, REGIONS[r]) for r in order])


def regions_to_labels(
    regions: np.ndarray | torch.Tensor, order: Sequence[str] = REGION_NAMES
) -> np.ndarray | torch.Tensor:
    """Turn binary region maps into BraTS labels, enforcing ET ⊂ TC ⊂ WT.

    A voxel is ED if it is in WT only, NCR if in TC but not ET, ET if in ET. An ET (or TC) voxel outside the
    predicted WT still counts as tumour: nesting is resolved towards the inner region, as the region-based
    methods' upstream post-processing does.

    Args:
        regions: bool ``(3, ...)`` in ``order``.
        order: the channel order of ``regions`` (e.g. ``("ET", "TC", "WT")`` for M3AE's head).

    Returns:
        uint8 (numpy) or int64 (torch) label map ``(...)``.
    """
    idx = {r: order.index(r) for r in REGION_NAMES}
    wt, tc, et = regions[idx["WT"]], regions[idx["TC"]], regions[idx["ET"]]
    if isinstance(regions, torch.Tensor):
        out = torch.zeros(wt.shape, dtype=torch.int64, device=regions.device)
    else:
        out = np.zeros(wt.shape, dtype=np.uint8)
    out[wt.astype(bool) if isinstance(wt, np.ndarray) else wt.bool()] = ED
    out[tc.astype(bool) if isinstance(tc, np.ndarray) else tc.bool()] = NCR
    out[et.astype(bool) if isinstance(et, np.ndarray) else et.bool()] = ET
    return out
