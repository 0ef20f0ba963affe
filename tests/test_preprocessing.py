"""Preprocessing: crop box, z-score, outputs, un-cropping, bad inputs, resumability, CLI."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_path

from brats_core.data.preprocessing import (
    META_FORMAT,
    PENDING_KEY,
    apply_zscore,
    crop_box,
    is_finished,
    load_meta,
    main,
    output_paths,
    preprocess_arrays,
    uncrop,
    write_label_nifti,
    write_label_original_geometry,
)
from brats_core.data.synthetic import synthetic_affine, write_synthetic_case, write_synthetic_dataset
from brats_core.modalities import BRATS2023_SUFFIXES, MODALITIES
from brats_core.utils.io import (
    TMP_MARKER,
    CaseFilesError,
    find_case_files,
    load_json,
    load_nifti,
    save_json,
    save_nifti,
    save_npy,
)

SHAPE = (64, 72, 60)
PATCH = 48  # smaller than the synthetic volumes, larger than some brain extents: both crop branches are exercised
GOOD, BAD = "BraTS-SYN-00000-000", "BraTS-SYN-00001-000"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic cases in BraTS 2023 naming, written once per module; tests copy what they change."""
    raw = tmp_path_factory.mktemp("base") / "raw"
    write_synthetic_dataset(raw, 2, SHAPE, seed=0)
    return raw


@pytest.fixture
def raw(base: Path, tmp_path: Path) -> Path:
    """A private copy of ``base``."""
    return Path(shutil.copytree(base, tmp_path / "raw"))


def run(raw: Path, out: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI on ``raw``; returns (exit code, stderr)."""
    rc = main(["--input-path", str(raw), "--output-path", str(out), "--patch_size", str(PATCH), "--workers", "1",
               "--no-progress", *extra])  # fmt: skip
    return rc, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``folder`` with its size, modification time and inode (a rename gives a new one)."""
    stats = {str(p.relative_to(folder)): p.stat() for p in folder.rglob("*") if p.is_file()}
    return {k: (st.st_size, st.st_mtime_ns, st.st_ino) for k, st in stats.items()}


def modality_file(raw: Path, case: str, modality: str) -> Path:
    return raw / case / f"{case}-{BRATS2023_SUFFIXES[modality]}.nii.gz"


def zscore_by_hand(x: np.ndarray, brain: np.ndarray) -> np.ndarray:
    return (x - x[brain].mean()) / x[brain].std()


# ---------------------------------------------------------------------------------------------------------------------
# Crop box


def box_mask(shape: tuple[int, ...], ranges: list[tuple[int, int]]) -> np.ndarray:
    """Foreground with inclusive ``ranges`` per axis."""
    fg = np.zeros(shape, dtype=bool)
    fg[tuple(slice(lo, hi + 1) for lo, hi in ranges)] = True
    return fg


# (dim, inclusive foreground extent, upstream box, fixed box), worked out by hand from upstream's crop with patch 128:
CROP_CASES = [
    # hi - lo = 49 < 128: e = floor(79 / 2) = 39 -> [50 - 39, 99 + 39 + 1) = [11, 139), 128 long, same in both
    (200, (50, 99), (11, 139), (11, 139)),
    # hi - lo = 48: e = 40 -> [10, 139), 129 long (128 - 48 is even)
    (200, (50, 98), (10, 139), (10, 139)),
    # hi - lo = 160 >= 128: upstream ends at hi (excluded), dropping slice 180; fixed keeps it
    (200, (20, 180), (20, 180), (20, 181)),
    # hi - lo = 40 near the top: e = 44 -> [56, 185); upstream is cut to [56, 155) (99 < 128), fixed shifts down
    (155, (100, 140), (56, 155), (26, 155)),
    # near the bottom: e = 51 -> [-46, 82) -> shifted to [0, 128) in both
    (200, (5, 30), (0, 128), (0, 128)),
    # a volume thinner than the patch: the whole axis in both
    (60, (10, 50), (0, 60), (0, 60)),
]


def test_crop_box_by_hand() -> None:
    for dim, extent, upstream, fixed in CROP_CASES:
        fg = box_mask((dim, 8, 8), [extent, (2, 5), (2, 5)])
        assert crop_box(fg, 128, reference_quirks=True)[0] == upstream, (dim, extent)
        assert crop_box(fg, 128, reference_quirks=False)[0] == fixed, (dim, extent)


def test_crop_box_fixed_is_at_least_patch_and_covers_foreground() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = tuple(int(s) for s in rng.integers(20, 90, 3))
        ranges = [tuple(sorted(int(v) for v in rng.integers(0, n, 2))) for n in shape]
        patch = int(rng.integers(8, 64))
        box = crop_box(box_mask(shape, ranges), patch)
        for (lo, hi), (flo, fhi), n in zip(box, ranges, shape, strict=True):
            assert 0 <= lo <= flo and fhi < hi <= n
            assert hi - lo >= min(n, patch)


def test_crop_box_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        crop_box(np.zeros((4, 4, 4), dtype=bool))


# ---------------------------------------------------------------------------------------------------------------------
# Z-score and in-memory preprocessing


def test_apply_zscore_statistics_and_errors() -> None:
    rng = np.random.default_rng(1)
    images = rng.uniform(1, 100, (2, 10, 11, 12)).astype(np.float32)
    brain = np.zeros((10, 11, 12), dtype=bool)
    brain[2:8, 2:9, 2:10] = True
    out, means, stds = apply_zscore(images, brain, ["a", "b"])
    assert out.dtype == np.float32
    for c in range(2):
        assert abs(out[c][brain].mean()) < 1e-5 and abs(out[c][brain].std() - 1) < 1e-5
        np.testing.assert_allclose(out[c], zscore_by_hand(images[c].astype(np.float64), brain), atol=1e-5)
        assert means[c] == pytest.approx(images[c][brain].mean(dtype=np.float64))
        assert stds[c] == pytest.approx(images[c][brain].std(dtype=np.float64))
    images[1][brain] = 7.0
    with pytest.raises(ValueError, match="b is constant"):
        apply_zscore(images, brain, ["a", "b"])
    with pytest.raises(ValueError, match="brain mask is empty"):
        apply_zscore(images, np.zeros_like(brain), ["a", "b"])


def test_preprocess_arrays_with_a_subset_of_modalities(base: Path) -> None:
    full = {m: load_nifti(modality_file(base, GOOD, m))[0] for m in MODALITIES}
    vol4, _, _ = preprocess_arrays(np.stack([full[m] for m in MODALITIES]), None, PATCH)
    vol_dict, _, _ = preprocess_arrays(full, None, PATCH)
    np.testing.assert_array_equal(vol4, vol_dict)

    subset = {"flair": full["flair"], "t2": full["t2"]}
    vol, seg, meta = preprocess_arrays(subset, None, PATCH)
    assert seg is None and meta["available"] == ["flair", "t2"] and meta["has_label"] is False
    assert vol.shape == (*meta["cropped_shape"], 4) and vol.dtype == np.float32
    assert not vol[..., 1].any() and not vol[..., 2].any()  # absent T1ce, T1: zero channels
    assert meta["zscore"]["t1ce"] is None and meta["zscore"]["flair"]["std"] > 0
    # The brain mask comes from the available modalities only.
    stack = np.stack([subset["flair"], subset["t2"]])
    box = tuple(slice(lo, hi) for lo, hi in meta["crop_box"])
    brain = stack[(slice(None), *box)].sum(axis=0) > 0
    np.testing.assert_allclose(vol[..., 0], zscore_by_hand(subset["flair"][box].astype(np.float64), brain), atol=1e-4)
    assert meta["brain_voxels"] == int(brain.sum())


def test_preprocess_arrays_rejects_bad_arrays() -> None:
    good = np.ones((8, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="unknown modality"):
        preprocess_arrays({"dwi": good})
    with pytest.raises(ValueError, match=r"\(4, X, Y, Z\)"):
        preprocess_arrays(np.ones((3, 8, 8, 8)))
    with pytest.raises(ValueError, match="different shapes"):
        preprocess_arrays({"flair": good, "t2": np.ones((8, 8, 7))})
    with pytest.raises(ValueError, match="label map has shape"):
        preprocess_arrays({"flair": good}, np.zeros((8, 8, 7), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# Full pipeline on synthetic NIfTI


def test_outputs_match_the_input_files(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(raw)
    rc, err = run(raw, tmp_path / "out", capsys=capsys)
    assert rc == 0, err
    assert "2 written" in err
    assert snapshot(raw) == before  # the input is never touched
    for case in (GOOD, BAD):
        paths = output_paths(tmp_path / "out", case)
        meta = load_meta(paths.meta)
        vol, seg = np.load(paths.vol), np.load(paths.seg)
        assert vol.dtype == np.float32 and seg.dtype == np.uint8
        assert vol.shape == (*meta["cropped_shape"], 4) and seg.shape == tuple(meta["cropped_shape"])
        assert meta["original_shape"] == list(SHAPE) and meta["channels"] == list(MODALITIES)
        assert meta["has_label"] is True and meta["reference_quirks"] is False and meta["patch_size"] == PATCH
        assert all(hi - lo >= PATCH for lo, hi in meta["crop_box"])

        sources = {m: load_nifti(modality_file(raw, case, m)) for m in MODALITIES}
        np.testing.assert_array_equal(np.asarray(meta["affine"]), sources["flair"][1])
        assert meta["source_files"]["flair"] == str(modality_file(raw, case, "flair").resolve())
        box = tuple(slice(lo, hi) for lo, hi in meta["crop_box"])
        cropped = {m: sources[m][0][box].astype(np.float64) for m in MODALITIES}
        # The fixed box holds every non-zero voxel.
        assert all(np.count_nonzero(sources[m][0]) == np.count_nonzero(cropped[m]) for m in MODALITIES)
        brain = sum(cropped.values()) > 0
        for c, m in enumerate(MODALITIES):  # canonical channel order, each z-scored over the brain
            np.testing.assert_allclose(vol[..., c], zscore_by_hand(cropped[m], brain), atol=1e-4)
            assert abs(vol[..., c][brain].mean()) < 1e-4 and abs(vol[..., c][brain].std() - 1) < 1e-4
            assert meta["zscore"][m]["mean"] == pytest.approx(cropped[m][brain].mean())
        label = load_nifti(raw / case / f"{case}-seg.nii.gz", dtype=None)[0]
        np.testing.assert_array_equal(seg, label[box])


def test_uncrop_and_write_in_original_geometry(raw: Path, tmp_path: Path, capsys) -> None:
    assert run(raw, tmp_path / "out", capsys=capsys)[0] == 0
    paths = output_paths(tmp_path / "out", GOOD)
    meta = load_meta(paths.meta)
    seg = np.load(paths.seg)
    source = raw / GOOD / f"{GOOD}-seg.nii.gz"
    restored = uncrop(seg, meta)
    assert restored.shape == SHAPE and restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, load_nifti(source, dtype=None)[0])
    outside = np.ones(SHAPE, dtype=bool)
    outside[tuple(slice(lo, hi) for lo, hi in meta["crop_box"])] = False
    assert not uncrop(np.full_like(seg, 2), meta)[outside].any()

    written = write_label_nifti(tmp_path / "pred.nii.gz", seg, meta)
    ours, theirs = nib.load(written), nib.load(source)
    assert ours.get_data_dtype() == theirs.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    np.testing.assert_array_equal(ours.affine, theirs.affine)
    assert ours.header.get_zooms() == theirs.header.get_zooms()
    assert int(ours.header["sform_code"]) == int(theirs.header["sform_code"])
    with pytest.raises(ValueError, match="crop shape"):
        uncrop(seg[1:], meta)
    again = write_label_original_geometry(seg, tmp_path / "out", GOOD, tmp_path / "again.nii")
    np.testing.assert_array_equal(np.asarray(nib.load(again).dataobj), np.asarray(theirs.dataobj))


def test_reference_quirks_reproduce_upstream_on_a_hand_made_volume(tmp_path: Path, capsys) -> None:
    # Foreground x in [5, 134] (hi - lo = 129 >= 128), y in [3, 36], z in [2, 27] of a 140 x 40 x 30 grid.
    # Upstream: x -> [5, 134), dropping slice 134; y: e = 47 -> [-44, 84) -> [0, 128), cut to [0, 40);
    # z: e = 51 -> [-49, 79) -> [0, 128), cut to [0, 30). Fixed: x -> [5, 135), y and z the whole axis.
    shape, case = (140, 40, 30), "HAND-00000"
    rng = np.random.default_rng(3)
    images = {}
    for m in MODALITIES:
        x = np.zeros(shape, dtype=np.float32)
        x[5:135, 3:37, 2:28] = rng.uniform(10, 500, (130, 34, 26)).round()
        images[m] = x
    label = np.zeros(shape, dtype=np.uint8)
    label[120:135, 10:20, 10:20] = 2
    label[134, 12:15, 12:15] = 4  # BraTS <= 2020 ET: becomes 3
    write_synthetic_case(tmp_path / "raw", case, images, label)

    results = {}
    for quirks in (True, False):
        out = tmp_path / f"out-{quirks}"
        rc, err = run(tmp_path / "raw", out, "--patch_size", "128", *(["--reference-quirks"] * quirks), capsys=capsys)
        assert rc == 0, err
        paths = output_paths(out, case)
        results[quirks] = (np.load(paths.vol), np.load(paths.seg), load_meta(paths.meta))

    vol, seg, meta = results[True]
    assert meta["crop_box"] == [[5, 134], [0, 40], [0, 30]] and meta["reference_quirks"] is True
    assert vol.shape == (129, 40, 30, 4) and seg.shape == (129, 40, 30)
    assert not (seg == 3).any()  # the ET slice x = 134 was dropped, as upstream does
    cropped = {m: images[m][5:134].astype(np.float64) for m in MODALITIES}
    brain = sum(cropped.values()) > 0
    for c, m in enumerate(MODALITIES):
        expected = zscore_by_hand(cropped[m], brain)
        np.testing.assert_allclose(vol[..., c], expected, atol=1e-4)
        # Background is -mean/std, not zero.
        mean, std = cropped[m][brain].mean(), cropped[m][brain].std()
        assert vol[0, 0, 0, c] == pytest.approx(-mean / std, abs=1e-4)

    vol, seg, meta = results[False]
    assert meta["crop_box"] == [[5, 135], [0, 40], [0, 30]]
    assert vol.shape == (130, 40, 30, 4)
    assert (seg == 3).sum() == 9 and (seg[-1] == 3).sum() == 9
    assert set(np.unique(seg).tolist()) == {0, 2, 3}


def test_legacy_naming_and_label_4(tmp_path: Path, raw: Path, capsys) -> None:
    legacy = tmp_path / "legacy"
    write_synthetic_dataset(legacy, 1, SHAPE, seed=0, naming="legacy")
    files = find_case_files(legacy / GOOD)
    assert files.images["t1ce"].name == f"{GOOD}_t1ce.nii.gz" and files.label.name == f"{GOOD}_seg.nii.gz"
    seg_path = legacy / GOOD / f"{GOOD}_seg.nii.gz"
    label, affine, header = load_nifti(seg_path, dtype=None)
    save_nifti(seg_path, np.where(label == 3, 4, label).astype(np.uint8), affine, header)

    assert run(legacy, tmp_path / "out-legacy", capsys=capsys)[0] == 0
    assert run(raw, tmp_path / "out-2023", "--cases", GOOD, capsys=capsys)[0] == 0
    for kind in ("vol", "seg"):
        a = np.load(getattr(output_paths(tmp_path / "out-legacy", GOOD), kind))
        b = np.load(getattr(output_paths(tmp_path / "out-2023", GOOD), kind))
        np.testing.assert_array_equal(a, b)  # same data, same result; 4 became 3


def test_case_without_label(raw: Path, tmp_path: Path, capsys) -> None:
    (raw / GOOD / f"{GOOD}-seg.nii.gz").unlink()
    rc, err = run(raw, tmp_path / "out", capsys=capsys)
    assert rc == 0, err
    paths = output_paths(tmp_path / "out", GOOD)
    assert paths.vol.is_file() and paths.meta.is_file() and not paths.seg.exists()
    meta = load_json(paths.meta)
    assert meta["has_label"] is False and meta["source_files"]["seg"] is None and meta["outputs"]["seg"] is None
    assert is_finished(tmp_path / "out", GOOD)
    assert "2 skipped" in run(raw, tmp_path / "out", capsys=capsys)[1]


def test_resume_skips_finished_cases_and_overwrite_redoes_them(raw: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert run(raw, out, capsys=capsys)[0] == 0
    first = snapshot(out)
    rc, err = run(raw, out, capsys=capsys)
    assert rc == 0 and "0 written, 2 skipped" in err
    assert snapshot(out) == first

    # An interrupted case (its arrays behind the pending mark that precedes them) is redone, the other is skipped.
    save_json(output_paths(out, GOOD).meta, {"format": META_FORMAT, "case": GOOD, PENDING_KEY: True})
    rc, err = run(raw, out, capsys=capsys)
    assert rc == 0 and "1 written, 1 skipped" in err
    assert is_finished(out, GOOD)

    rc, err = run(raw, out, "--overwrite", capsys=capsys)
    assert rc == 0 and "2 written" in err
    after = snapshot(out)
    # rewritten: a new mtime or inode (one alone can repeat: freed inode numbers are reused by later atomic writes)
    assert after.keys() == first.keys() and all(after[k][1:] != first[k][1:] for k in first)

    # Other settings redo the cases rather than mixing two kinds of crop in one folder.
    rc, err = run(raw, out, "--reference-quirks", capsys=capsys)
    assert rc == 0 and "2 written" in err and load_meta(output_paths(out, GOOD).meta)["reference_quirks"] is True


def test_parallel_workers_and_snake_case_flags(raw: Path, tmp_path: Path, capsys) -> None:
    assert run(raw, tmp_path / "serial", capsys=capsys)[0] == 0
    rc = main(["--input_path", str(raw), "--output_path", str(tmp_path / "parallel"), "--patch-size", str(PATCH),
               "--workers", "2", "--no-progress"])  # fmt: skip
    assert rc == 0
    for case in (GOOD, BAD):
        serial, parallel = output_paths(tmp_path / "serial", case), output_paths(tmp_path / "parallel", case)
        np.testing.assert_array_equal(np.load(serial.vol), np.load(parallel.vol))
        np.testing.assert_array_equal(np.load(serial.seg), np.load(parallel.seg))


def test_folders_without_nifti_files_are_not_cases(raw: Path, tmp_path: Path, capsys) -> None:
    (raw / "splits").mkdir()  # where `splits download --out <BraTS>/splits` puts the case lists
    (raw / "splits" / "train.txt").write_text(f"{GOOD}\n")
    rc, err = run(raw, tmp_path / "o", capsys=capsys)
    assert rc == 0 and "2 cases, 2 written" in err and "splits" not in err


def test_cli_argument_errors(raw: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--input-path", str(raw), "--output-path", str(raw / "out")])
    assert exc.value.code == 2 and "inside --input-path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--input-path", str(raw), "--output-path", str(tmp_path / "o"), "--cases", "NOPE"])
    assert "NOPE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--input-path", str(tmp_path / "absent"), "--output-path", str(tmp_path / "o")])
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")  # the output is checked before any case is read: no traceback, no work
    with pytest.raises(SystemExit) as exc:
        main(["--input-path", str(raw), "--output-path", str(tmp_path / "a_file")])
    assert exc.value.code == 2 and "cannot create the output folder" in capsys.readouterr().err
    rc, _ = run(raw, tmp_path / "o", "--cases", BAD, capsys=capsys)
    assert rc == 0 and not output_paths(tmp_path / "o", GOOD).meta.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs


def rewrite(path: Path, change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    data, affine, header = load_nifti(path, dtype=None)
    data, affine = change(data.copy(), affine.copy())
    save_nifti(path, data, affine, header)


def set_voxel(value: float) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def change(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        data[30, 30, 30] = value
        return data, affine

    return change


def shifted(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    affine[0, 3] += 2.0
    return data, affine


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def bad_file(raw: Path, key: str) -> Path:
    return raw / BAD / f"{BAD}-{'seg' if key == 'seg' else BRATS2023_SUFFIXES[key]}.nii.gz"


# (id, how to break case BAD, text the report must contain)
BAD_INPUTS: list[tuple[str, Callable[[Path], None], str]] = [
    ("missing-file", lambda raw: bad_file(raw, "t1ce").unlink(), "missing t1ce"),
    ("truncated-gz", lambda raw: truncate(bad_file(raw, "t2")), f"{BAD}-t2w.nii.gz: cannot read NIfTI"),
    ("not-nifti", lambda raw: bad_file(raw, "t1").write_bytes(b"not an image"), f"{BAD}-t1n.nii.gz: cannot read"),
    ("shape", lambda raw: rewrite(bad_file(raw, "t1"), lambda d, a: (d[:, :, :-1], a)), "t1n.nii.gz has shape"),
    ("affine", lambda raw: rewrite(bad_file(raw, "t2"), shifted), "t2w.nii.gz has a different affine"),
    ("nan", lambda raw: rewrite(bad_file(raw, "flair"), set_voxel(np.nan)), "flair has 1 non-finite voxels"),
    ("inf", lambda raw: rewrite(bad_file(raw, "t1ce"), set_voxel(np.inf)), "t1ce has 1 non-finite voxels"),
    ("all-zero", lambda raw: rewrite(bad_file(raw, "t1ce"), lambda d, a: (d * 0, a)), "t1ce is all zero"),
    ("constant", lambda raw: rewrite(bad_file(raw, "t1"), lambda d, a: (d * 0 + 5, a)), "t1 is constant"),
    ("label-value", lambda raw: rewrite(bad_file(raw, "seg"), set_voxel(7)), "values outside {0, 1, 2, 3, 4}: 7"),
    (
        "label-fraction",
        lambda raw: rewrite(bad_file(raw, "seg"), lambda d, a: (d.astype(np.float32) * 0.5, a)),
        "values outside {0, 1, 2, 3, 4}: 0.5",
    ),
    ("label-shape", lambda raw: rewrite(bad_file(raw, "seg"), lambda d, a: (d[1:], a)), "seg.nii.gz has shape"),
    (
        "ambiguous",
        lambda raw: save_nifti(raw / BAD / f"{BAD}-t2f.nii", *load_nifti(bad_file(raw, "flair"))[:2]),
        "ambiguous flair file",
    ),
]


@pytest.mark.parametrize(("breaker", "message"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_case_is_reported_skipped_and_leaves_no_output(
    raw: Path, tmp_path: Path, capsys, breaker: Callable[[Path], None], message: str
) -> None:
    breaker(raw)
    out = tmp_path / "out"
    rc, err = run(raw, out, capsys=capsys)
    assert rc == 1
    reports = [line for line in err.splitlines() if BAD in line and message in line]
    assert reports, err  # named by case, with the reason, both as it happens and in the final summary
    assert "1 written" in err and "1 failed" in err and "failed cases:" in err
    assert is_finished(out, GOOD)
    assert not any(p.exists() for p in output_paths(out, BAD))
    assert not list(out.rglob(f"*{TMP_MARKER}*")) and not list(raw.rglob(f"*{TMP_MARKER}*"))


def test_strict_stops_at_the_first_bad_case(raw: Path, tmp_path: Path, capsys) -> None:
    # Case folders run in sorted order: "A-BROKEN" first.
    shutil.copytree(raw / BAD, raw / "A-BROKEN")
    (raw / "A-BROKEN" / f"{BAD}-t1c.nii.gz").unlink()
    rc, err = run(raw, tmp_path / "out", "--strict", capsys=capsys)
    assert rc == 1
    assert "A-BROKEN" in err and "missing t1ce" in err and "not run (--strict)" in err
    assert not any(is_finished(tmp_path / "out", c) for c in (GOOD, BAD))
    rc, err = run(raw, tmp_path / "out", capsys=capsys)  # without --strict the others go on
    assert rc == 1 and "2 written" in err and "1 failed" in err


def test_strict_with_workers_reports_what_was_done(raw: Path, tmp_path: Path, capsys) -> None:
    shutil.copytree(raw / BAD, raw / "A-BROKEN")
    (raw / "A-BROKEN" / f"{BAD}-seg.nii.gz").write_bytes(b"garbage")
    out = tmp_path / "out"
    rc = main(["--input-path", str(raw), "--output-path", str(out), "--patch_size", str(PATCH), "--workers", "2",
               "--strict", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "A-BROKEN" in err and "cannot read NIfTI" in err
    # Cases a worker had already started may finish; the summary counts exactly what is on disk.
    match = re.search(r"3 cases, (\d) written, 0 skipped \(already done\), 1 failed(?:, (\d) not run)?", err)
    assert match, err
    written = sum(is_finished(out, c) for c in (GOOD, BAD))
    assert int(match[1]) == written and int(match[2] or 0) == 2 - written


# ---------------------------------------------------------------------------------------------------------------------
# io helpers


def test_find_case_files(tmp_path: Path, base: Path) -> None:
    folder = tmp_path / GOOD
    folder.mkdir()
    image = load_nifti(modality_file(base, GOOD, "flair"))[0]
    save_nifti(folder / f"{GOOD}-t2f.nii", image, synthetic_affine(SHAPE))  # uncompressed is fine
    (folder / f".{GOOD}-t1c.nii.gz").write_bytes(b"")  # hidden files are ignored
    (folder / "notes.txt").write_text("x")
    files = find_case_files(folder, require=("flair",))
    assert files.available == ("flair",) and files.missing == ("t1ce", "t1", "t2") and files.label is None
    with pytest.raises(CaseFilesError) as exc:
        find_case_files(folder)
    text = str(exc.value)
    assert str(folder) in text and f"files found: {GOOD}-t2f.nii, notes.txt" in text
    assert "missing t1ce (-t1c or _t1ce), t1 (-t1n or _t1), t2 (-t2w or _t2)" in text
    with pytest.raises(CaseFilesError, match="missing seg"):
        find_case_files(folder, require=("flair",), require_label=True)
    with pytest.raises(CaseFilesError, match="not a folder"):
        find_case_files(tmp_path / "absent")
    # Several candidates: the one named after the folder wins.
    shutil.copy(folder / f"{GOOD}-t2f.nii", folder / "other-t2f.nii")
    assert find_case_files(folder, require=()).images["flair"].name == f"{GOOD}-t2f.nii"


def test_files_of_two_patients_in_one_case_folder_are_flagged(tmp_path: Path, base: Path, caplog) -> None:
    folder = tmp_path / GOOD
    shutil.copytree(base / GOOD, folder)
    with caplog.at_level("WARNING", logger="brats_core.utils.io"):
        find_case_files(folder)
    assert not caplog.records
    (folder / f"{GOOD}-t2w.nii.gz").rename(folder / "BraTS-GLI-09999-000-t2w.nii.gz")  # another patient's T2
    with caplog.at_level("WARNING", logger="brats_core.utils.io"):
        find_case_files(folder)
    assert f"files name different cases (BraTS-GLI-09999-000, {GOOD})" in caplog.text


def test_atomic_writers_leave_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_npy(tmp_path / "a.npy", np.array([object()], dtype=object))  # pickling is refused
    with pytest.raises(TypeError):
        save_json(tmp_path / "a.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []
    save_json(tmp_path / "a.json", {"affine": np.eye(2).tolist()})
    assert load_json(tmp_path / "a.json") == {"affine": [[1.0, 0.0], [0.0, 1.0]]}


# ---------------------------------------------------------------------------------------------------------------------
# The real sample case


@pytest.mark.slow
def test_real_sample_round_trip(tmp_path: Path, capsys) -> None:
    raw = shared_path("data", "brats_sample")
    case = "BraTS-SAMPLE-00000-000"
    before = snapshot(raw)
    rc = main(["--input-path", str(raw), "--output-path", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert snapshot(raw) == before
    paths = output_paths(tmp_path / "out", case)
    meta = load_meta(paths.meta)
    vol, seg = np.load(paths.vol), np.load(paths.seg)
    assert vol.shape == (*meta["cropped_shape"], 4) and all(s >= 128 for s in meta["cropped_shape"])
    box = tuple(slice(lo, hi) for lo, hi in meta["crop_box"])
    brain = sum(load_nifti(modality_file(raw, case, m))[0][box] for m in MODALITIES) > 0
    for c in range(4):
        assert abs(vol[..., c][brain].mean()) < 1e-3 and abs(vol[..., c][brain].std() - 1) < 1e-3

    source = raw / case / f"{case}-seg.nii.gz"
    label = load_nifti(source, dtype=None)[0]
    np.testing.assert_array_equal(uncrop(seg, meta), label)
    assert np.bincount(seg.ravel(), minlength=4).tolist()[1:] == [14300, 108566, 21866]
    written = nib.load(write_label_nifti(tmp_path / "pred.nii.gz", seg, meta))
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(nib.load(source).dataobj))
    np.testing.assert_array_equal(written.affine, nib.load(source).affine)

    # Our reader equals upstream's (MedPy) voxel for voxel.
    medpy_io = pytest.importorskip("medpy.io")
    for m in MODALITIES:
        path = modality_file(raw, case, m)
        np.testing.assert_array_equal(load_nifti(path)[0], np.asarray(medpy_io.load(str(path))[0], dtype=np.float32))

    # This case's x extent is >= 128: upstream drops its last slice.
    rc = main(["--input-path", str(raw), "--output-path", str(tmp_path / "quirks"), "--workers", "1",
               "--no-progress", "--reference-quirks"])  # fmt: skip
    quirks = load_meta(output_paths(tmp_path / "quirks", case).meta)
    assert rc == 0 and quirks["crop_box"][0][1] == meta["crop_box"][0][1] - 1
