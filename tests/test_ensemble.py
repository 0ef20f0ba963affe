"""predict.py ensembles (several checkpoints) and uncertainty maps (``--save_uncertainty``): the ensemble's
probabilities are the mean of its members', its labels follow from the mean, its uncertainty is the entropy of the
mean, written in the input's geometry; class and region methods are never mixed."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_core.apps.predict import (
    Predictor,
    entropy_map,
    labels_from_probabilities,
    main,
    probability_kind,
)
from brats_core.data.synthetic import case_id, write_synthetic_dataset
from brats_core.labels import REGION_NAMES, regions_to_labels
from brats_core.registry import build_method, config_dict
from brats_core.utils.checkpoint import save_checkpoint
from brats_core.utils.cli import UsageError, run_main
from brats_core.utils.io import written_by_predict

GOOD = case_id(0)
CLASSES = ("background", "NCR", "ED", "ET")
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], Path]:
    """``tiny(method, seed)``: a checkpoint of the method's untrained tiny preset (written once per module)."""
    folder = tmp_path_factory.mktemp("ckpts")

    def make(method: str, seed: int = 0) -> Path:
        path = folder / f"{method}-{seed}.pth"
        if not path.exists():
            torch.manual_seed(seed)
            model = build_method(method, "tiny")
            save_checkpoint(path, model, method=method, config=config_dict(model))
        return path

    return make


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic 40×36×32 case (its brain crop leaves a border) without T1, rewritten with an LPS affine whose
    qform and sform differ in code (1 and 2), so that the geometry checks compare something else than the identity."""
    root = tmp_path_factory.mktemp("case")
    (name,) = write_synthetic_dataset(root, 1, shape=(40, 36, 32), seed=0)
    folder = root / name
    (folder / f"{GOOD}-t1n.nii.gz").unlink()
    (folder / f"{GOOD}-seg.nii.gz").unlink()
    affine = np.array([[-1.0, 0, 0, 120], [0, -1.0, 0, 130], [0, 0, 1.0, -70], [0, 0, 0, 1]])
    for path in folder.glob("*.nii.gz"):
        img = nib.Nifti1Image(np.asarray(nib.load(path).dataobj), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=2)
        nib.save(img, path)
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """FLAIR, T1ce and T2 of a 32³ synthetic case: one window of the tiny presets, for the Python API tests."""
    root = tmp_path_factory.mktemp("small")
    (name,) = write_synthetic_dataset(root, 1, shape=(32, 32, 32), seed=2)
    images = Predictor.load(root / name).images
    return {m: images[m] for m in ("flair", "t1ce", "t2")}


def _expected_entropy(probs: np.ndarray, regions: bool) -> np.ndarray:
    """The entropy in nats computed here in float64: −Σ p ln p (0 ln 0 = 0), plus the (1 − p) terms for regions."""
    p = probs.astype(np.float64)

    def plogp(x: np.ndarray) -> np.ndarray:
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)

    h = -plogp(p).sum(0)
    return h - plogp(1 - p).sum(0) if regions else h


def _assert_geometry(written: Path, reference: Path) -> None:
    """Shape, affine, qform, sform (with their codes) and voxel sizes of ``written`` equal ``reference``'s."""
    out, ref = nib.load(written), nib.load(reference)
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.affine, ref.affine)
    for form in ("qform", "sform"):
        (o, o_code), (r, r_code) = getattr(out, f"get_{form}")(coded=True), getattr(ref, f"get_{form}")(coded=True)
        np.testing.assert_allclose(o, r, atol=1e-6)
        assert int(o_code) == int(r_code)
    np.testing.assert_allclose(out.header.get_zooms(), ref.header.get_zooms())


# ---------------------------------------------------------------------------------------------------------------------
# The conversions, hand-worked


def test_entropy_map_in_nats_for_classes_and_regions() -> None:
    classes = np.array(
        [[1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0], [0.5, 0.25, 0.25, 0]], dtype=np.float32
    ).T.reshape(4, 4, 1, 1)
    # certain: 0; uniform: ln 4 = 2 ln 2; two halves: ln 2; ½ ln 2 + 2 · ¼ ln 4 = 1.5 ln 2
    expected = np.array([0.0, 2 * LN2, LN2, 1.5 * LN2]).reshape(4, 1, 1)
    h = entropy_map(classes, CLASSES)
    assert h.dtype == np.float32 and h.shape == (4, 1, 1)
    np.testing.assert_allclose(h, expected, rtol=1e-6, atol=1e-7)
    regions = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [1, 0.5, 0]], dtype=np.float32).T.reshape(3, 3, 1, 1)
    # every region certain: 0; three coin flips: 3 ln 2; one coin flip: ln 2
    np.testing.assert_allclose(
        entropy_map(regions, REGION_NAMES), np.array([0.0, 3 * LN2, LN2]).reshape(3, 1, 1), rtol=1e-6, atol=1e-7
    )


def test_labels_from_probabilities_follow_the_single_model_rules() -> None:
    classes = np.array([[0.1, 0.2, 0.6, 0.1], [0.3, 0.3, 0.2, 0.2], [0.1, 0.1, 0.1, 0.7]], dtype=np.float32).T
    np.testing.assert_array_equal(labels_from_probabilities(classes, CLASSES), [2, 0, 3])  # a tie: the first class
    # WT, TC, ET: WT only → ED; WT and TC → NCR; ET (even outside TC) → ET; exactly 0.5 is not > 0.5 → background
    regions = np.array([[0.6, 0.2, 0.1], [0.6, 0.55, 0.2], [0.6, 0.4, 0.7], [0.5, 0.5, 0.5]], dtype=np.float32).T
    labels = labels_from_probabilities(regions, REGION_NAMES)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [2, 1, 3, 0])


def test_probability_kinds_of_the_methods() -> None:
    kinds = {m: probability_kind(build_method(m, "tiny")) for m in ("imfuse", "mmformer", "uhved", "shaspec", "m3ae")}
    assert kinds == {"imfuse": "class", "mmformer": "class", "uhved": "class", "shaspec": "region", "m3ae": "region"}


# ---------------------------------------------------------------------------------------------------------------------
# Ensembles


def test_two_seeds_on_the_command_line(tmp_path: Path, tiny: Callable[[str, int], Path], case: Path) -> None:
    """Two IM-Fuse seeds: mean probabilities, their argmax, their entropy, all in the input's exact geometry."""
    seeds = [tiny("imfuse", 0), tiny("imfuse", 1)]
    loaded = Predictor.load(case)
    singles = [Predictor(c, device="cpu").predict_probabilities(loaded.images)[0] for c in seeds]
    mean = (singles[0] + singles[1]) / 2
    assert not np.array_equal(singles[0], singles[1])  # two different members
    ensemble = Predictor(seeds, device="cpu")
    probs, channels = ensemble.predict_probabilities(loaded.images)
    assert channels == CLASSES and probs.dtype == np.float32
    np.testing.assert_array_equal(probs, mean)

    out = tmp_path / "out"
    argv = ["--checkpoint", *map(str, seeds), "-i", str(case), "-o", str(out), "--device", "cpu", "--no_progress",
            "--save_uncertainty", "--save_probabilities"]  # fmt: skip
    assert main(argv) == 0
    reference = case / f"{GOOD}-t2f.nii.gz"
    label_file, uncertainty_file = out / f"{GOOD}-seg.nii.gz", out / f"{GOOD}-uncertainty.nii.gz"
    for written in (label_file, uncertainty_file):
        _assert_geometry(written, reference)
        assert written_by_predict(written)
    np.testing.assert_array_equal(np.asanyarray(nib.load(label_file).dataobj), mean.argmax(0))
    uncertainty = nib.load(uncertainty_file)
    assert uncertainty.get_data_dtype() == np.float32
    h = np.asanyarray(uncertainty.dataobj)
    np.testing.assert_allclose(h, _expected_entropy(mean, regions=False), rtol=1e-5, atol=1e-6)
    # outside the brain crop every member says background with probability 1: entropy 0
    crop = tuple(slice(lo, hi) for lo, hi in ensemble.model.preprocess(loaded.images)[1]["crop_box"])
    outside = np.ones(h.shape, bool)
    outside[crop] = False
    assert outside.any() and not h[outside].any() and h[crop].min() > 0
    with np.load(out / f"{GOOD}-prob.npz") as npz:
        np.testing.assert_array_equal(npz["probabilities"], mean.astype(np.float16))


def test_methods_of_class_probabilities_mix(tiny: Callable[[str, int], Path], small: dict[str, np.ndarray]) -> None:
    """IM-Fuse and mmFormer (softmax) with U-HVED (logits through a softmax) through the Python API."""
    members = [tiny("imfuse", 0), tiny("mmformer", 0), tiny("uhved", 0)]
    singles = [Predictor(c, device="cpu").predict_probabilities(small)[0] for c in members]
    mean = (singles[0] + singles[1] + singles[2]) / 3
    ensemble = Predictor(members, device="cpu")
    assert ensemble.method == "imfuse+mmformer+uhved" and ensemble.checkpoints == tuple(members)
    pred = ensemble.predict(small, probabilities=True, uncertainty=True)
    np.testing.assert_array_equal(pred.probabilities, mean.astype(np.float16))
    np.testing.assert_array_equal(pred.labels, mean.argmax(0))
    np.testing.assert_allclose(pred.uncertainty, _expected_entropy(mean, regions=False), rtol=1e-5, atol=1e-5)
    assert pred.channels == CLASSES and pred.modalities == ("flair", "t1ce", "t2")


def test_region_methods_average_in_wt_tc_et_order_with_flips(
    tiny: Callable[[str, int], Path], small: dict[str, np.ndarray]
) -> None:
    """ShaSpec (heads ET, WT, TC) and M3AE (ET, TC, WT) with --tta: region probabilities averaged in WT, TC, ET order
    over both members' flip-averaged outputs; labels by the nesting rule; entropy = sum of binary entropies."""
    members = [tiny("shaspec", 0), tiny("m3ae", 0)]
    singles = [Predictor(c, device="cpu", tta=True).predict_probabilities(small) for c in members]
    assert all(channels == REGION_NAMES for _, channels in singles)
    mean = (singles[0][0] + singles[1][0]) / 2
    pred = Predictor(members, device="cpu", tta=True).predict(small, probabilities=True, uncertainty=True)
    assert pred.channels == REGION_NAMES
    np.testing.assert_array_equal(pred.probabilities, mean.astype(np.float16))
    np.testing.assert_array_equal(pred.labels, regions_to_labels(mean > 0.5, REGION_NAMES))
    np.testing.assert_allclose(pred.uncertainty, _expected_entropy(mean, regions=True), rtol=1e-5, atol=1e-5)
    assert pred.labels.any()  # not trivially background: the nesting rule was exercised


def test_mixed_kinds_are_refused_in_one_line_before_any_output(
    tmp_path: Path, tiny: Callable[[str, int], Path], case: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    imfuse, shaspec = tiny("imfuse", 0), tiny("shaspec", 0)
    with pytest.raises(UsageError, match="cannot ensemble"):
        Predictor([imfuse, shaspec], device="cpu")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(imfuse), str(shaspec), "-i", str(case), "-o", str(out), "--device", "cpu",
            "--save_uncertainty"]  # fmt: skip
    assert run_main(lambda: main(argv)) == 2
    captured = capsys.readouterr()
    (line,) = [line for line in captured.err.splitlines() if line.strip()]
    assert "error: cannot ensemble" in line
    assert f"{imfuse} (imfuse: class probabilities)" in line and f"{shaspec} (shaspec: region probabilities)" in line
    assert not out.exists() and "written" not in captured.out
    with pytest.raises(UsageError, match="given twice"):
        Predictor([imfuse, imfuse], device="cpu")
    with pytest.raises(UsageError, match="no checkpoint"):
        Predictor([], device="cpu")


# ---------------------------------------------------------------------------------------------------------------------
# One checkpoint


def test_one_checkpoint_uncertainty_and_continue(
    tmp_path: Path, checkpoint: Path, case: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--save_uncertainty with one checkpoint: the entropy of its own probabilities; the label map is the one written
    without it; --continue writes a missing uncertainty map."""
    out = tmp_path / "out"
    base = ["--checkpoint", str(checkpoint), "-i", str(case), "-o", str(out), "--device", "cpu", "--no_progress"]
    assert main(base) == 0
    label_file, uncertainty_file = out / f"{GOOD}-seg.nii.gz", out / f"{GOOD}-uncertainty.nii.gz"
    labels = np.asanyarray(nib.load(label_file).dataobj)
    assert main([*base, "--continue", "--save_uncertainty"]) == 0
    assert "1 written" in capsys.readouterr().out
    _assert_geometry(uncertainty_file, case / f"{GOOD}-t2f.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(nib.load(label_file).dataobj), labels)
    predictor = Predictor(checkpoint, device="cpu")
    probs, channels = predictor.predict_probabilities(Predictor.load(case).images)
    assert channels == CLASSES
    np.testing.assert_array_equal(probs.argmax(0), labels)
    np.testing.assert_allclose(
        np.asanyarray(nib.load(uncertainty_file).dataobj), _expected_entropy(probs, regions=False), rtol=1e-5,
        atol=1e-6,
    )  # fmt: skip
    assert main([*base, "--continue", "--save_uncertainty"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_nnunet_folds_of_mam_ensemble(tmp_path: Path, small: dict[str, np.ndarray]) -> None:
    """Two MaM folds written by nnU-Net: its reader's region probabilities (float16, input grid) are averaged."""
    pytest.importorskip("nnunetv2")
    from test_mam_predict import write_nnunet_checkpoint

    folds = [tmp_path / f"fold_{k}" / "checkpoint_final.pth" for k in (0, 1)]
    for seed, fold in enumerate(folds):
        write_nnunet_checkpoint(fold, seed=seed)
    singles = [Predictor(f, device="cpu").predict(small, probabilities=True).probabilities for f in folds]
    mean = (singles[0].astype(np.float32) + singles[1].astype(np.float32)) / 2
    pred = Predictor(folds, device="cpu").predict(small, uncertainty=True)
    assert pred.probabilities is None and pred.uncertainty is not None
    np.testing.assert_array_equal(pred.labels, regions_to_labels(mean > 0.5, REGION_NAMES))
    np.testing.assert_allclose(pred.uncertainty, _expected_entropy(mean, regions=True), rtol=1e-5, atol=1e-5)
