"""Per-case segmentation metrics: the paper's Dice/ETpp protocol, HD95, BraTS lesion-wise metrics.

All functions take numpy label maps (BraTS labels 0..3, same shape for prediction and ground truth) or binary masks;
regions are WT = {1, 2, 3}, TC = {1, 3}, ET = {3} (:data:`brats_core.labels.REGIONS`).

HD95 convention for empty regions (MedPy's ``hd95`` is undefined there): both prediction and ground truth empty →
0.0; exactly one of them empty → :data:`HD95_EMPTY_PENALTY` = 373.13 mm, the diagonal of the 240×240×155 1 mm
BraTS (SRI-24) volume, i.e. the largest distance possible in a BraTS image (the BraTS evaluation packages use the same
idea, rounded to 373).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from medpy.metric.binary import hd95 as _medpy_hd95

from brats_core.labels import REGION_NAMES, REGIONS

BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
"""Voxel grid of the BraTS 2023 images (1 mm isotropic)."""

HD95_EMPTY_PENALTY: float = math.dist((0, 0, 0), BRATS_SHAPE)
"""HD95 (mm) when exactly one of prediction and ground truth is empty: the BraTS volume's diagonal, ≈ 373.13."""

ETPP_THRESHOLD: int = 500
"""ETpp: a predicted ET with fewer voxels than this is removed (the paper protocol)."""

SCORE_KEYS: tuple[str, ...] = ("WT", "TC", "ET", "ETpp", "HD95_WT", "HD95_TC", "HD95_ET")
"""Keys of :func:`case_scores`, in CSV column order."""

LESION_WISE_METRICS: dict[str, str] = {
    "LesionWise_Dice": "sq_dsc",
    "LesionWise_HD95": "sq_hd95",
    "LesionWise_TP": "tp",
    "LesionWise_FP": "fp",
    "LesionWise_FN": "fn",
    "LesionWise_F1": "rq",
    "Global_Dice": "global_bin_dsc",
    "Global_HD95": "global_bin_hd95",
}
"""Output key prefix of :func:`lesion_wise_scores` → Panoptica result field (the fields that the package's
``brats-parse-metrics seg`` reports for the leaderboard: ``lesionwise_dsc_mean`` is ``sq_dsc``, …)."""

LESION_WISE_KEYS: tuple[str, ...] = tuple(
    f"LesionWise_{metric}_{region}" for metric in ("Dice", "HD95") for region in REGION_NAMES
)
"""The lesion-wise scores the evaluator writes per case and scenario (``--lesion_wise``), in CSV column order."""

LESION_WISE_HELP = (
    "also score the BraTS lesion-wise Dice and HD95 of WT, TC and ET with the official BraTS-evaluation package "
    "(an optional dependency, AGPL-3.0) on the original image grid; a few seconds more per case and scenario"
)
"""The help text of every test script's ``--lesion_wise`` flag."""


def dice(pred: np.ndarray, gt: np.ndarray, eps: float = 1e-8) -> float:
    """Dice of two binary masks, ``(2|P∩G| + eps) / (|P| + |G| + eps)``.

    Both empty → 1.0; empty ground truth with a non-empty prediction (or the reverse) → ≈ 0.

    Args:
        pred: predicted mask ``(...)`` (non-zero = foreground).
        gt: ground-truth mask, same shape.
        eps: smoothing in numerator and denominator (1e-8 in the paper protocol).
    """
    pred, gt = _binary_pair(pred, gt)
    intersection = np.count_nonzero(pred & gt)
    return float((2.0 * intersection + eps) / (np.count_nonzero(pred) + np.count_nonzero(gt) + eps))


def hausdorff95(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    empty_value: float = HD95_EMPTY_PENALTY,
) -> float:
    """95th-percentile symmetric Hausdorff distance (MedPy ``hd95``, surface voxels, 6-connectivity) in mm.

    Both masks empty → 0.0; exactly one empty → ``empty_value`` (:data:`HD95_EMPTY_PENALTY` by default).

    Args:
        pred: predicted mask ``(X, Y, Z)``.
        gt: ground-truth mask, same shape.
        spacing: voxel size in mm along each array axis.
        empty_value: the value when exactly one mask is empty.
    """
    pred, gt = _binary_pair(pred, gt)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if has_pred != has_gt:
        return float(empty_value)
    # Every surface voxel and every nearest partner lies in the union's bounding box, and one voxel of margin keeps
    # the erosion at the box edge identical, so cropping is exact and saves the distance transform of the full volume.
    box = _bounding_box(pred | gt, margin=1)
    return float(_medpy_hd95(pred[box], gt[box], voxelspacing=tuple(spacing)))


def case_scores(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    *,
    etpp_threshold: int = ETPP_THRESHOLD,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    hd95: bool = True,
) -> dict[str, float]:
    """Scores of one case and scenario: Dice of WT, TC, ET, ETpp and HD95 of WT, TC, ET.

    ETpp is the ET Dice after emptying the predicted ET when it has fewer than ``etpp_threshold`` voxels; WT, TC and
    all HD95 values use the prediction as it is.

    Args:
        pred_labels: predicted BraTS labels ``(X, Y, Z)``.
        gt_labels: ground-truth labels, same shape.
        etpp_threshold: minimum predicted ET size in voxels for ETpp.
        spacing: voxel size in mm along each array axis (for HD95).
        hd95: compute HD95 (slower); when False the ``HD95_*`` values are NaN so the keys stay the same.

    Returns:
        dict with the keys of :data:`SCORE_KEYS`; HD95 in mm with the module's empty-region convention.
    """
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction {pred_labels.shape} and ground truth {gt_labels.shape} differ in shape")
    scores: dict[str, float] = {}
    for region in REGION_NAMES:
        pred, gt = np.isin(pred_labels, REGIONS[region]), np.isin(gt_labels, REGIONS[region])
        scores[region] = dice(pred, gt)
        if region == "ET":
            kept = pred if np.count_nonzero(pred) >= etpp_threshold else np.zeros_like(pred)
            scores["ETpp"] = dice(kept, gt)
        scores[f"HD95_{region}"] = hausdorff95(pred, gt, spacing) if hd95 else math.nan
    return {key: scores[key] for key in SCORE_KEYS}


def lesion_wise_scores(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    config: str = "gli",
    hd95_inf_value: float = HD95_EMPTY_PENALTY,
) -> dict[str, float]:
    """BraTS lesion-wise metrics of one case through the official ``BraTS-evaluation`` package (Panoptica).

    Runs the package's bundled Panoptica config (``"gli"``) on the WT, TC and ET groups and returns its leaderboard
    fields (:data:`LESION_WISE_METRICS`), e.g. ``LesionWise_Dice_ET``, ``LesionWise_FN_WT`` (missed lesions),
    ``Global_HD95_TC``. The lesions of a region are the 26-connected components of its mask in the prediction and in
    the ground truth; they are matched one to one by maximum bipartite matching on Dice (any overlap qualifies).
    ``LesionWise_Dice`` and ``LesionWise_HD95`` are the mean Dice and HD95 over the matched pairs only: a missed or a
    false-positive lesion lowers them only when no lesion is matched at all (then Dice 0 and HD95 infinite); with
    no lesion on either side they are NaN. (BraTS 2023's own script counted every missed and false-positive lesion
    as Dice 0 and HD95 374 in the mean, after merging nearby ground-truth lesions and dropping those of at most 50
    voxels: its numbers differ where lesions are missed or spurious; ``LesionWise_TP/FP/FN`` and ``LesionWise_F1``
    report the detection.) Values are the package's, unchanged, except an infinite HD95, which becomes
    ``hd95_inf_value`` so that means over cases stay finite (the package's CSV parser does this for the global
    HD95, with 373).

    Args:
        pred_labels: predicted BraTS labels ``(X, Y, Z)``.
        gt_labels: ground-truth labels, same shape.
        spacing: voxel size in mm along each array axis.
        config: name of a config bundled with ``brats_evaluation`` (``"gli"`` for adult glioma).
        hd95_inf_value: replacement for an infinite HD95.

    Raises:
        ImportError: ``BraTS-evaluation`` (module ``brats_evaluation``) or its dependency ``panoptica`` is missing.
    """
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction {pred_labels.shape} and ground truth {gt_labels.shape} differ in shape")
    evaluator = _lesion_evaluator(config)
    groups = {region.lower(): region for region in REGION_NAMES}
    skipped = [name for name in evaluator.segmentation_class_groups_names if name not in groups]
    with warnings.catch_warnings():
        # the config's normalised surface Dice (not reported here) warns about its default threshold on every call
        warnings.filterwarnings("ignore", message="The threshold is set to 0.5", category=UserWarning)
        results = evaluator.evaluate(
            pred_labels.astype(np.uint8),
            gt_labels.astype(np.uint8),
            voxelspacing=tuple(float(s) for s in spacing),
            verbose=False,
            skip_groups=skipped,
        )
    scores: dict[str, float] = {}
    for group, region in groups.items():
        fields = results[group].to_dict(True)
        for prefix, field in LESION_WISE_METRICS.items():
            value = fields.get(field)
            value = math.nan if value is None else float(value)
            if prefix.endswith("HD95") and math.isinf(value):
                value = float(hd95_inf_value)
            scores[f"{prefix}_{region}"] = value
    return scores


def require_lesion_wise(config: str = "gli") -> None:
    """Load the lesion-wise evaluator now (once per process), so that a missing package stops a run before any work.

    Raises:
        ImportError: ``BraTS-evaluation`` or its dependency ``panoptica`` is missing (the message says how to
            install it).
    """
    _lesion_evaluator(config)


@functools.cache
def _lesion_evaluator(config: str) -> Any:
    """The Panoptica evaluator of a bundled BraTS-evaluation config, built once per process."""
    try:
        import panoptica
        from brats_evaluation import config_path
    except ImportError as err:
        raise ImportError(
            "lesion-wise metrics need the optional package BraTS-evaluation (module brats_evaluation, which "
            "brings panoptica; AGPL-3.0): `pip install BraTS-evaluation==0.0.10`, or the project's extra "
            "`pip install -e '.[lesionwise]'`; its panoptica requires numpy<2.3"
        ) from err
    if hasattr(panoptica, "disable_citation_reminder"):  # a banner amid the evaluation's output (the README asks
        panoptica.disable_citation_reminder()  # users to cite Panoptica instead)
    with contextlib.redirect_stdout(io.StringIO()):  # the config's intended TC/WT label overlap is printed as a note
        return panoptica.Panoptica_Evaluator.load_from_config(str(config_path(config)))


def _binary_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool, copy=False), np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    return pred, gt


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the smallest box holding every non-zero voxel of ``mask``, grown by ``margin`` within the array."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)
