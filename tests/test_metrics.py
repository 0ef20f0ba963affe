"""Per-case metrics on small arrays whose Dice, ETpp and HD95 values are worked out by hand in the comments."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from medpy.metric.binary import hd95 as medpy_hd95

from brats_core.engine import metrics
from brats_core.engine.metrics import (
    HD95_EMPTY_PENALTY,
    SCORE_KEYS,
    case_scores,
    dice,
    hausdorff95,
    lesion_wise_scores,
)

EPS = 1e-8


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ([1, 1, 0, 0], [0, 1, 1, 0], (2 * 1 + EPS) / (2 + 2 + EPS)),  # |P∩G| = 1, |P| = |G| = 2 → 0.5
        ([1, 1, 1, 0], [1, 1, 1, 0], 1.0),  # identical
        ([0, 0, 0, 0], [0, 0, 0, 0], 1.0),  # both empty: eps/eps
        ([1, 1, 1, 0], [0, 0, 0, 0], EPS / (3 + EPS)),  # empty GT, 3 predicted voxels → ≈ 3.3e-9
        ([0, 0, 0, 0], [0, 1, 1, 0], EPS / (2 + EPS)),  # empty prediction → ≈ 5e-9
    ],
)
def test_dice_table(pred: list[int], gt: list[int], expected: float) -> None:
    assert dice(np.array(pred), np.array(gt)) == pytest.approx(expected, rel=1e-12, abs=0)


def test_dice_empty_gt_is_essentially_zero_and_both_empty_exactly_one() -> None:
    assert dice(np.zeros(5), np.zeros(5)) == 1.0
    assert dice(np.ones(5), np.zeros(5)) < 1e-8


def test_case_scores_by_hand() -> None:
    # voxel:  0  1  2  3  4  5  6  7
    gt = np.array([0, 1, 2, 3, 3, 2, 0, 0]).reshape(1, 1, 8)
    pred = np.array([0, 1, 1, 3, 0, 2, 2, 0]).reshape(1, 1, 8)
    # WT: GT {1,2,3,4,5}, pred {1,2,3,5,6}, overlap {1,2,3,5} → 8/10.
    # TC: GT {1,3,4}, pred {1,2,3}, overlap {1,3} → 4/6.
    # ET: GT {3,4}, pred {3} → 2/3; ETpp: 1 predicted ET voxel < 500 → emptied → ≈ 0.
    scores = case_scores(pred, gt, hd95=False)
    assert list(scores) == list(SCORE_KEYS)
    assert scores["WT"] == pytest.approx(0.8)
    assert scores["TC"] == pytest.approx(2 / 3)
    assert scores["ET"] == pytest.approx(2 / 3)
    assert scores["ETpp"] == pytest.approx(0.0, abs=1e-8)
    assert all(math.isnan(scores[k]) for k in ("HD95_WT", "HD95_TC", "HD95_ET"))
    # With a threshold of 1 voxel the single predicted ET voxel survives: ETpp = ET.
    assert case_scores(pred, gt, etpp_threshold=1, hd95=False)["ETpp"] == pytest.approx(2 / 3)


def _labels_with_et(n_et: int, n_ncr: int = 100) -> np.ndarray:
    """A 10×10×10 label map: the first ``n_et`` voxels (C order) ET, the next ``n_ncr`` NCR, the rest background."""
    flat = np.zeros(1000, dtype=np.uint8)
    flat[:n_et] = 3
    flat[n_et : n_et + n_ncr] = 1
    return flat.reshape(10, 10, 10)


@pytest.mark.parametrize(
    ("n_pred", "n_gt", "et", "etpp", "tc"),
    [
        # 499 < 500 → the prediction is emptied although it was perfect.
        (499, 499, 1.0, EPS / (499 + EPS), 1.0),
        # 500 voxels are kept.
        (500, 500, 1.0, 1.0, 1.0),
        # A small false-positive ET is removed: empty/empty = 1. TC: pred voxels 0..598, GT 0..99 → 200/699.
        (499, 0, EPS / (499 + EPS), 1.0, (200 + EPS) / (699 + EPS)),
        # 500 false-positive voxels stay. TC: pred 0..599, GT 0..99 → 200/700.
        (500, 0, EPS / (500 + EPS), EPS / (500 + EPS), (200 + EPS) / (700 + EPS)),
    ],
)
def test_etpp_threshold_only_changes_et(n_pred: int, n_gt: int, et: float, etpp: float, tc: float) -> None:
    # Each map: the first n_et voxels ET, the next 100 NCR, so TC = WT = the first n_et + 100 voxels; WT and TC
    # come from the un-post-processed prediction.
    scores = case_scores(_labels_with_et(n_pred), _labels_with_et(n_gt), hd95=False)
    assert scores["ET"] == pytest.approx(et, rel=1e-9)
    assert scores["ETpp"] == pytest.approx(etpp, rel=1e-9)
    assert scores["TC"] == pytest.approx(tc, rel=1e-9)
    assert scores["WT"] == scores["TC"]


def _cube(shape: tuple[int, int, int], corner: tuple[int, int, int], side: int = 3) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[tuple(slice(c, c + side) for c in corner)] = True
    return out


def test_hd95_displaced_cubes() -> None:
    # Two 3³ cubes, B = A shifted by 10 voxels along axis 0. Surface voxels (26 per cube: all but the centre) and
    # their nearest partner on the other surface, straight across along axis 0:
    #   A's layers at offsets 0, 1, 2 (9, 8, 9 voxels) are 10, 9, 8 from B's near face;
    #   B's layers at offsets 0, 1, 2 (9, 8, 9 voxels) are 8, 9, 10 from A's near face.
    # The 52 distances are 18 × 8, 16 × 9, 18 × 10; the 95th percentile (linear, index 0.95·51 = 48.45 of the
    # sorted list) falls among the 18 tens → HD95 = 10.
    a, b = _cube((20, 8, 8), (2, 2, 2)), _cube((20, 8, 8), (12, 2, 2))
    assert hausdorff95(a, b) == pytest.approx(10.0)
    assert hausdorff95(b, a) == pytest.approx(10.0)
    # Anisotropic spacing: only the spacing along the displacement axis matters (all nearest partners are straight
    # across), so 10 · 2 mm = 20 mm for spacing 2 on axis 0, and still 10 mm for spacing 2 on axis 2.
    assert hausdorff95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(20.0)
    assert hausdorff95(a, b, spacing=(1.0, 1.0, 2.0)) == pytest.approx(10.0)
    # Same cubes displaced along axis 2 with 2.5 mm slices: 10 · 2.5 = 25 mm.
    c, d = _cube((8, 8, 20), (2, 2, 2)), _cube((8, 8, 20), (2, 2, 12))
    assert hausdorff95(c, d, spacing=(1.0, 1.0, 2.5)) == pytest.approx(25.0)


def test_hd95_single_voxels_pythagoras() -> None:
    # Voxels (1, 1, 1) and (4, 5, 1): √(3² + 4²) = 5; with spacing (1, 2, 1): √(3² + 8²) = √73.
    a, b = np.zeros((6, 7, 3), bool), np.zeros((6, 7, 3), bool)
    a[1, 1, 1] = b[4, 5, 1] = True
    assert hausdorff95(a, b) == pytest.approx(5.0)
    assert hausdorff95(a, b, spacing=(1.0, 2.0, 1.0)) == pytest.approx(math.sqrt(73))


def test_hd95_empty_convention() -> None:
    empty, blob = np.zeros((5, 5, 5), bool), _cube((5, 5, 5), (1, 1, 1))
    assert hausdorff95(empty, empty) == 0.0
    assert hausdorff95(blob, blob) == 0.0
    # Exactly one side empty → the BraTS volume diagonal √(240² + 240² + 155²) = √139225 ≈ 373.1287 mm.
    assert math.isclose(HD95_EMPTY_PENALTY, 373.1287, abs_tol=1e-4)
    assert hausdorff95(empty, blob) == HD95_EMPTY_PENALTY
    assert hausdorff95(blob, empty) == HD95_EMPTY_PENALTY
    assert hausdorff95(blob, empty, empty_value=99.0) == 99.0


def test_hd95_bounding_box_crop_matches_medpy_on_the_full_volume() -> None:
    rng = np.random.default_rng(0)
    shape = (24, 20, 18)
    for _ in range(5):
        pred = rng.random(shape) > 0.97
        gt = rng.random(shape) > 0.97
        pred[0, 0, 0] = gt[-1, 5, -1] = True  # objects on the array border
        assert hausdorff95(pred, gt, (1.0, 1.5, 2.0)) == pytest.approx(medpy_hd95(pred, gt, (1.0, 1.5, 2.0)))


def test_case_scores_hd95_per_region() -> None:
    # GT: a 3³ ET cube at x = 2..4 inside nothing else; prediction: the same cube shifted by 10 along axis 0 and
    # labelled ET too → WT, TC, ET all have HD95 10 (see test_hd95_displaced_cubes); no NCR/ED anywhere.
    shape = (20, 8, 8)
    gt = _cube(shape, (2, 2, 2)).astype(np.uint8) * 3
    pred = _cube(shape, (12, 2, 2)).astype(np.uint8) * 3
    scores = case_scores(pred, gt, spacing=(1.0, 1.0, 1.0))
    assert scores["HD95_WT"] == scores["HD95_TC"] == scores["HD95_ET"] == pytest.approx(10.0)
    # Relabel the prediction as ED (2): WT unchanged, TC and ET predictions empty → penalty.
    scores = case_scores(np.where(pred > 0, 2, 0), gt)
    assert scores["HD95_WT"] == pytest.approx(10.0)
    assert scores["HD95_TC"] == scores["HD95_ET"] == HD95_EMPTY_PENALTY


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        case_scores(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros(3), np.zeros(4))


def test_lesion_wise_scores_without_the_package_raises_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # the lesion-wise metrics themselves are tested against the package in test_lesion_wise.py
    metrics._lesion_evaluator.cache_clear()
    monkeypatch.setitem(sys.modules, "brats_evaluation", None)  # makes `import brats_evaluation` fail
    with pytest.raises(ImportError, match=r"pip install BraTS-evaluation==0\.0\.10.*\.\[lesionwise\]"):
        lesion_wise_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)))
    metrics._lesion_evaluator.cache_clear()
