"""Synthetic BraTS-like data: determinism, labels, contrasts, background, geometry, file layout, CLI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial import cKDTree

from brats_core.data.preprocessing import preprocess_arrays
from brats_core.data.synthetic import case_id, main, make_synthetic_case, synthetic_affine, write_synthetic_dataset
from brats_core.labels import ED, ET, NCR
from brats_core.modalities import MODALITIES
from brats_core.utils.io import find_case_files, load_nifti

SHAPE = (64, 72, 60)


def test_deterministic_per_seed() -> None:
    a_images, a_label = make_synthetic_case(SHAPE, 5)
    b_images, b_label = make_synthetic_case(SHAPE, 5)
    c_images, c_label = make_synthetic_case(SHAPE, 6)
    np.testing.assert_array_equal(a_label, b_label)
    for m in MODALITIES:
        np.testing.assert_array_equal(a_images[m], b_images[m])
        assert not np.array_equal(a_images[m], c_images[m])
    assert not np.array_equal(a_label, c_label)


@pytest.mark.parametrize("seed", range(6))
def test_labels_and_background(seed: int) -> None:
    images, label = make_synthetic_case(SHAPE, (seed, 0))
    assert label.dtype == np.uint8 and label.shape == SHAPE
    assert set(np.unique(label).tolist()) == {0, NCR, ED, ET}
    for value in (NCR, ED, ET):
        assert (label == value).sum() >= 20  # enough voxels for every sub-region to be learnable
    brain = images["flair"] > 0
    for m in MODALITIES:
        assert images[m].dtype == np.float32 and images[m].shape == SHAPE
        np.testing.assert_array_equal(images[m] > 0, brain)  # one skull-stripped brain, zero outside
        assert np.isfinite(images[m]).all()
    assert not (label[~brain]).any()
    assert not brain[0].any() and not brain[-1].any() and not brain[:, :, 0].any()  # background around the head
    assert 0.2 < brain.mean() < 0.5


def test_modalities_have_distinct_tumour_contrasts() -> None:
    images, label = make_synthetic_case(SHAPE, 1)
    normal = (images["flair"] > 0) & (label == 0)

    def mean(m: str, where: np.ndarray) -> float:
        return float(images[m][where].mean())

    et, ed, ncr = label == ET, label == ED, label == NCR
    assert mean("t1ce", et) > 1.3 * max(mean("t1ce", normal), mean("t1ce", ed), mean("t1ce", ncr))  # enhancing ring
    assert mean("t1ce", et) > 1.5 * mean("t1", et)  # ... that only T1ce shows
    assert mean("flair", ed) > 1.5 * mean("flair", normal) and mean("t2", ed) > 1.3 * mean("t2", normal)  # oedema
    assert mean("t1", ncr) < 0.7 * mean("t1", normal) and mean("t1ce", ncr) < 0.5 * mean("t1ce", et)  # necrosis
    assert mean("t2", ncr) > 1.3 * mean("t2", normal)
    # No modality is a rescaled copy of another (T1 and T1ce, as in real data, differ mostly in the tumour).
    brain = images["flair"] > 0
    for i, a in enumerate(MODALITIES):
        for b in MODALITIES[i + 1 :]:
            r = np.corrcoef(images[a][brain], images[b][brain])[0, 1]
            assert abs(r) < 0.98, (a, b, r)


def test_written_dataset_layout_and_geometry(tmp_path: Path) -> None:
    cases = write_synthetic_dataset(tmp_path, 2, SHAPE, seed=3)
    assert cases == ["BraTS-SYN-00000-000", "BraTS-SYN-00001-000"] == [case_id(0), case_id(1)]
    names = sorted(p.name for p in (tmp_path / cases[0]).iterdir())
    assert names == [f"{cases[0]}-{s}.nii.gz" for s in ("seg", "t1c", "t1n", "t2f", "t2w")]
    expected_affine = np.array([[-1, 0, 0, 0], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_array_equal(synthetic_affine(SHAPE), expected_affine)

    images, label = make_synthetic_case(SHAPE, (3, 1))
    files = find_case_files(tmp_path / cases[1], require_label=True)
    for m in MODALITIES:
        data, affine, _ = load_nifti(files.images[m])
        np.testing.assert_array_equal(data, images[m])
        np.testing.assert_array_equal(affine, expected_affine)
    img = nib.load(files.label)
    assert img.get_data_dtype() == np.uint8
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_array_equal(np.asarray(img.dataobj), label)


def test_case_does_not_depend_on_dataset_size(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "one", 1, SHAPE, seed=2)
    write_synthetic_dataset(tmp_path / "two", 2, SHAPE, seed=2)
    for name in ("t2f", "seg"):
        rel = f"{case_id(0)}/{case_id(0)}-{name}.nii.gz"
        a, _, _ = load_nifti(tmp_path / "one" / rel, dtype=None)
        b, _, _ = load_nifti(tmp_path / "two" / rel, dtype=None)
        np.testing.assert_array_equal(a, b)


def test_legacy_naming(tmp_path: Path) -> None:
    (case,) = write_synthetic_dataset(tmp_path, 1, SHAPE, naming="legacy")
    names = sorted(p.name for p in (tmp_path / case).iterdir())
    assert names == [f"{case}_{s}.nii.gz" for s in ("flair", "seg", "t1", "t1ce", "t2")]
    with pytest.raises(ValueError, match="naming"):
        write_synthetic_dataset(tmp_path, 1, SHAPE, naming="nnunet")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "d"), "--n", "2", "--shape", "48", "40", "36", "--seed", "1"]) == 0
    assert "wrote 2 synthetic cases" in capsys.readouterr().out
    files = find_case_files(tmp_path / "d" / case_id(1), require_label=True)
    assert load_nifti(files.images["t2"])[0].shape == (48, 40, 36)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "e"), "--shape", "8", "8", "8"])
    with pytest.raises(ValueError, match="at least 16"):
        make_synthetic_case((8, 8, 8))


def test_learnable_from_intensities_and_harder_with_fewer_modalities() -> None:
    """A proxy for "a small CNN can learn it": a k-NN on voxel intensities of one case segments another case well
    with all four modalities, and clearly worse from FLAIR alone (the missing-modality problem is real)."""

    def voxels(seed: int) -> tuple[np.ndarray, np.ndarray]:
        images, label = make_synthetic_case((48, 48, 40), seed)
        vol, seg, _ = preprocess_arrays(images, label, patch_size=32)
        return vol.reshape(-1, 4), seg.ravel()

    rng = np.random.default_rng(0)
    x_train, y_train = voxels(10)
    x_test, y_test = voxels(11)
    keep = np.concatenate([rng.choice(np.flatnonzero(y_train == k), 400) for k in range(4)])

    def dice_et_tc(channels: list[int]) -> tuple[float, float]:
        _, nn = cKDTree(x_train[keep][:, channels]).query(x_test[:, channels], k=5)
        pred = np.stack([(y_train[keep][nn] == k).sum(axis=1) for k in range(4)], axis=1).argmax(axis=1)
        out = []
        for region in ((3,), (1, 3)):
            p, t = np.isin(pred, region), np.isin(y_test, region)
            out.append(2 * (p & t).sum() / (p.sum() + t.sum()))
        return out[0], out[1]

    et_all, tc_all = dice_et_tc([0, 1, 2, 3])
    et_flair, tc_flair = dice_et_tc([0])
    assert et_all > 0.9 and tc_all > 0.85, (et_all, tc_all)
    assert et_flair < et_all - 0.2 and tc_flair < tc_all - 0.2, (et_flair, tc_flair)
