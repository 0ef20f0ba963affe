"""predict.py / brats_core.apps.predict: any modality subset, both namings, explicit files, --continue, failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_core.apps.predict import PredictError, Predictor, main
from brats_core.data.synthetic import write_synthetic_dataset
from brats_core.registry import build_method, config_dict, list_methods
from brats_core.utils.checkpoint import save_checkpoint
from brats_core.utils.io import CaseFilesError, find_case_files, save_nifti

SHAPE = (40, 44, 36)
SUFFIX_2023 = {"flair": "t2f", "t1ce": "t1c", "t1": "t1n", "t2": "t2w"}


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor(checkpoint, device="cpu")


def _dataset(root: Path, n: int, naming: str = "brats2023", seed: int = 0) -> list[Path]:
    cases = write_synthetic_dataset(root, n, shape=SHAPE, seed=seed, naming=naming)
    return [root / c for c in cases]


def _check_output(out: Path, reference: Path) -> np.ndarray:
    img, ref = nib.load(out), nib.load(reference)
    assert img.shape == ref.shape
    np.testing.assert_allclose(img.affine, ref.affine)
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.uint8
    assert set(np.unique(data).tolist()) <= {0, 1, 2, 3}
    return data


def test_every_subset_brats2023(tmp_path: Path, checkpoint: Path) -> None:
    """One case per non-empty modality subset (files deleted) → each output in its reference modality's geometry."""
    from brats_core.modalities import SCENARIOS

    cases = _dataset(tmp_path / "in", len(SCENARIOS))
    keep = [tuple(m for m, on in zip(SUFFIX_2023, s.mask, strict=True) if on) for s in SCENARIOS]
    for folder, modalities in zip(cases, keep, strict=True):
        for m, s in SUFFIX_2023.items():
            if m not in modalities:
                (folder / f"{folder.name}-{s}.nii.gz").unlink()
        (folder / f"{folder.name}-seg.nii.gz").unlink()
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "-i", str(tmp_path / "in"), "-o", str(out), "--device", "cpu",
                 "--no_progress"]) == 0  # fmt: skip
    for folder, modalities in zip(cases, keep, strict=True):
        ref = folder / f"{folder.name}-{SUFFIX_2023[modalities[0]]}.nii.gz"
        _check_output(out / f"{folder.name}-seg.nii.gz", ref)
        out_header, ref_header = nib.load(out / f"{folder.name}-seg.nii.gz").header, nib.load(ref).header
        np.testing.assert_allclose(out_header.get_zooms(), ref_header.get_zooms())
        np.testing.assert_allclose(out_header.get_sform(), ref_header.get_sform())
        assert int(out_header["qform_code"]) == int(ref_header["qform_code"])


def test_legacy_single_case_file_output_and_api_agree(tmp_path: Path, checkpoint: Path, predictor: Predictor) -> None:
    """Legacy names, one case folder with a file output; the Python API gives the same labels as the CLI."""
    (folder,) = _dataset(tmp_path / "in", 1, naming="legacy", seed=3)
    (folder / f"{folder.name}_t1ce.nii.gz").unlink()
    out = tmp_path / "pred.nii.gz"
    assert main(["--checkpoint", str(checkpoint), "-i", str(folder), "-o", str(out), "--device", "cpu"]) == 0
    cli = _check_output(out, folder / f"{folder.name}_flair.nii.gz")
    pred = predictor.predict_case(folder)
    assert pred.modalities == ("flair", "t1", "t2")
    np.testing.assert_array_equal(pred.labels, cli)
    np.testing.assert_allclose(pred.affine, nib.load(out).affine)
    used = pred.modalities
    arrays = {m: nib.load(folder / f"{folder.name}_{m}.nii.gz").get_fdata(dtype=np.float32) for m in used}
    np.testing.assert_array_equal(predictor.predict_arrays(arrays), cli)


def test_explicit_files_and_continue(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--flair/--t2 files; a second run with --continue leaves the output untouched."""
    (folder,) = _dataset(tmp_path / "in", 1, naming="legacy", seed=5)
    flair, t2 = folder / f"{folder.name}_flair.nii.gz", folder / f"{folder.name}_t2.nii.gz"
    argv = ["--checkpoint", str(checkpoint), "--flair", str(flair), "--t2", str(t2), "-o", str(tmp_path / "out"),
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "out" / f"{folder.name}-seg.nii.gz"
    _check_output(out, flair)
    line = capsys.readouterr().out
    assert "flair+t2" in line and "WT" in line and "ml" in line
    mtime = out.stat().st_mtime_ns
    assert main([*argv, "--continue"]) == 0
    assert out.stat().st_mtime_ns == mtime
    assert "skipped" in capsys.readouterr().out


def test_geometry_mismatch_and_unreadable(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A modality of another shape, and a corrupt file: a message naming the file, nothing written, others go on."""
    bad_shape, corrupt, good, bad_affine = _dataset(tmp_path / "in", 4, seed=7)
    t1 = bad_shape / f"{bad_shape.name}-t1n.nii.gz"
    save_nifti(t1, np.ones((30, 30, 30), np.float32), np.eye(4))
    t1c = bad_affine / f"{bad_affine.name}-t1c.nii.gz"
    data, affine = nib.load(t1c).get_fdata(dtype=np.float32), nib.load(t1c).affine
    save_nifti(t1c, data, affine @ np.diag([2.0, 1.0, 1.0, 1.0]))
    (corrupt / f"{corrupt.name}-t2w.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "-i", str(tmp_path / "in"), "-o", str(out), "--device", "cpu",
                 "--no_progress"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert f"{bad_shape.name}-t1n.nii.gz has shape (30, 30, 30)" in err
    assert f"{corrupt.name}-t2w.nii.gz" in err and "cannot read NIfTI" in err
    assert f"{bad_affine.name}-t1c.nii.gz has a different affine than {bad_affine.name}-t2f.nii.gz" in err
    assert f"{bad_shape.name}: FAILED" in err
    assert sorted(p.name for p in out.iterdir()) == [f"{good.name}-seg.nii.gz"]


def test_probabilities_regions_and_workers(tmp_path: Path, checkpoint: Path, predictor: Predictor) -> None:
    """--save_probabilities / --save_regions beside each label map; --workers 2 writes what --workers 0 writes."""
    cases = _dataset(tmp_path / "in", 3, seed=11)
    (cases[1] / f"{cases[1].name}-t1n.nii.gz").write_bytes(b"broken")  # one failing case in the middle
    outputs = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        argv = ["--checkpoint", str(checkpoint), "-i", str(tmp_path / "in"), "-o", str(out), "--device", "cpu",
                "--no_progress", "--save_probabilities", "--save_regions", "--workers", str(workers)]  # fmt: skip
        assert main(argv) == 1
        outputs[workers] = out
        assert sorted(p.name for p in out.iterdir()) == sorted(
            f"{c.name}-{end}" for c in (cases[0], cases[2]) for end in ("seg.nii.gz", "prob.npz", "regions.nii.gz")
        )
    for case in (cases[0], cases[2]):
        labels = _check_output(outputs[0] / f"{case.name}-seg.nii.gz", case / f"{case.name}-t2f.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(nib.load(outputs[2] / f"{case.name}-seg.nii.gz").dataobj), labels)
        regions = nib.load(outputs[0] / f"{case.name}-regions.nii.gz")
        assert regions.shape == (*labels.shape, 3) and regions.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(regions.dataobj)[..., 2], labels == 3)
        np.testing.assert_array_equal(np.asanyarray(regions.dataobj)[..., 0], labels > 0)
        with np.load(outputs[0] / f"{case.name}-prob.npz") as npz:
            probs, channels, affine = npz["probabilities"], npz["channels"], npz["affine"]
        assert probs.dtype == np.float16 and probs.shape == (4, *labels.shape)
        assert channels.tolist() == ["background", "NCR", "ED", "ET"]
        np.testing.assert_allclose(affine, nib.load(case / f"{case.name}-t2f.nii.gz").affine)
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
        # float16 rounding may only flip near-ties of the argmax
        assert (probs.argmax(0) == labels).mean() > 0.999
    pred = predictor.predict_case(cases[0], probabilities=True)
    assert pred.probabilities is not None and pred.probabilities[0, 0, 0, 0] == 1  # outside the crop: background
    np.testing.assert_array_equal(
        pred.labels, np.asanyarray(nib.load(outputs[0] / f"{cases[0].name}-seg.nii.gz").dataobj)
    )


def test_continue_needs_every_requested_output(tmp_path: Path, checkpoint: Path) -> None:
    (case,) = _dataset(tmp_path / "in", 1, seed=13)
    out = tmp_path / "out"
    base = ["--checkpoint", str(checkpoint), "-i", str(case), "-o", str(out), "--device", "cpu", "--no_progress"]
    assert main(base) == 0
    assert main([*base, "--continue", "--save_regions"]) == 0  # the label map exists, the region map does not
    assert (out / f"{case.name}-regions.nii.gz").is_file()


def test_module_entry_point(tmp_path: Path, checkpoint: Path) -> None:
    """``python -m brats_core.apps.predict`` runs the same command line."""
    (case,) = _dataset(tmp_path / "in", 1, seed=17)
    out = tmp_path / "case-seg.nii.gz"
    result = subprocess.run(
        [sys.executable, "-m", "brats_core.apps.predict", "--checkpoint", str(checkpoint), "-i", str(case),
         "-o", str(out), "--device", "cpu", "--no_progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "done: 1 written" in result.stdout
    _check_output(out, case / f"{case.name}-t2f.nii.gz")


@pytest.mark.parametrize("method", list_methods())
def test_every_method(tmp_path: Path, method: str) -> None:
    """Each registered method's checkpoint predicts a two-modality case (its own preprocessing, e.g. M3AE's)."""
    torch.manual_seed(0)
    model = build_method(method, "tiny")
    ckpt = tmp_path / f"{method}.pth"
    save_checkpoint(ckpt, model, method=method, config=config_dict(model))
    (case,) = _dataset(tmp_path / "in", 1, seed=19)
    for suffix in ("t1n", "t2w", "seg"):
        (case / f"{case.name}-{suffix}.nii.gz").unlink()
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "-i", str(case), "-o", str(out), "--device", "cpu", "--no_progress",
                 "--save_probabilities"]) == 0  # fmt: skip
    _check_output(out / f"{case.name}-seg.nii.gz", case / f"{case.name}-t2f.nii.gz")
    with np.load(out / f"{case.name}-prob.npz") as npz:
        probs = npz["probabilities"]
    assert probs.shape[0] in (3, 4) and np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1


def test_m3ae_uses_its_own_normalisation_and_image_positions(tmp_path: Path) -> None:
    """M3AE's predictor preprocessing is M3AE's [0, 1] min-max (not the z-score) and windows know their position."""
    pytest.importorskip("m3ae.model")
    torch.manual_seed(0)
    model = build_method("m3ae", "tiny")
    rng = np.random.default_rng(0)
    images = {
        "flair": rng.random((40, 44, 36)).astype(np.float32) + 1,
        "t2": rng.random((40, 44, 36)).astype(np.float32),
    }
    vol, meta = model.preprocess(images)
    assert vol.min() >= 0 and vol.max() <= 1 and meta["available"] == ["flair", "t2"]
    assert not vol[..., 1:3].any()  # T1ce, T1 absent: zero channels
    from brats_core.engine.evaluation import window_origin

    assert window_origin(model, meta) == tuple(lo for lo, _ in meta["crop_box"])


def test_checkpoint_without_method(tmp_path: Path) -> None:
    model = build_method("imfuse", "tiny")
    path = tmp_path / "bare.pth"
    save_checkpoint(path, model, config=config_dict(model))
    with pytest.raises(PredictError, match="does not record which method"):
        Predictor(path, device="cpu")
    (folder,) = _dataset(tmp_path / "in", 1)
    assert main(["--checkpoint", str(path), "-i", str(folder), "-o", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_script_help() -> None:
    """The top-level ``predict.py`` is a thin wrapper around ``brats_core.apps.predict.main``."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "predict.py"), "-h"], capture_output=True, text=True)
    assert result.returncode == 0 and "--checkpoint" in result.stdout and "--continue" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("subset", [("t2f", "t1c"), ("t1n",)])
def test_real_sample_subsets_in_original_geometry(tmp_path: Path, checkpoint: Path, subset: tuple[str, ...]) -> None:
    """The tiny preset on the real 240×240×155 BraTS case: output geometry and header equal the input's."""
    from conftest import shared_path

    sample = shared_path("data", "brats_sample", "BraTS-SAMPLE-00000-000")
    case = tmp_path / "BraTS-SAMPLE-00000-000"
    case.mkdir()
    for suffix in subset:
        (case / f"{case.name}-{suffix}.nii.gz").symlink_to(sample / f"{case.name}-{suffix}.nii.gz")
    assert main(["--checkpoint", str(checkpoint), "-i", str(case), "-o", str(tmp_path / "out"), "--device", "cpu",
                 "--sw_batch_size", "4", "--no_progress"]) == 0  # fmt: skip
    reference = sample / f"{case.name}-{subset[0]}.nii.gz"
    _check_output(tmp_path / "out" / f"{case.name}-seg.nii.gz", reference)
    out_header, ref_header = nib.load(tmp_path / "out" / f"{case.name}-seg.nii.gz").header, nib.load(reference).header
    np.testing.assert_allclose(out_header.get_zooms(), ref_header.get_zooms())
    assert int(out_header["qform_code"]) == int(ref_header["qform_code"])


def test_ambiguous_modality_is_reported_with_the_files_found(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (case,) = _dataset(tmp_path / "in", 1)
    flair = next(case.glob("*-t2f.nii.gz"))
    (case / "other-t2f.nii.gz").write_bytes(flair.read_bytes())  # two FLAIR candidates, neither named after the folder
    flair.rename(case / "scan-t2f.nii.gz")
    assert main(["--checkpoint", str(checkpoint), "-i", str(case), "-o", str(tmp_path / "out"), "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "ambiguous flair" in err and "other-t2f.nii.gz" in err and "scan-t2f.nii.gz" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))


def test_outputs_never_touch_inputs_and_folders_are_checked_first(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder,) = _dataset(tmp_path / "in", 1)
    truth = (folder / f"{folder.name}-seg.nii.gz").read_bytes()
    base = ["--checkpoint", str(checkpoint), "--device", "cpu", "--no_progress"]
    # -o = the case folder: BraTS 2023 names the ground truth <case>-seg.nii.gz, the name of the output
    assert main([*base, "-i", str(folder), "-o", str(folder)]) == 1
    assert "into the case folder" in capsys.readouterr().err
    assert (folder / f"{folder.name}-seg.nii.gz").read_bytes() == truth
    # the ground truth is not replaced either with the modality files given one by one, or from another case
    t1ce = folder / f"{folder.name}-t1c.nii.gz"
    assert main([*base, "--t1ce", str(t1ce), "-o", f"{folder}/"]) == 1
    assert "was not written by predict.py (the ground truth?)" in capsys.readouterr().err
    (other,) = _dataset(tmp_path / "in2", 1, seed=1)
    assert main([*base, "-i", str(other), "-o", str(folder / f"{folder.name}-seg.nii.gz")]) == 1
    assert "was not written by predict.py" in capsys.readouterr().err
    assert (folder / f"{folder.name}-seg.nii.gz").read_bytes() == truth
    # files given one by one may be segmented into their own folder (the README's example), and again
    own = other / "a-seg.nii.gz"
    for _ in range(2):
        assert main([*base, "--t1ce", str(other / f"{other.name}-t1c.nii.gz"), "-o", str(own)]) == 0
    assert "1 written" in capsys.readouterr().out
    # …and a prediction under the ground truth's name in a case without one is never read as the ground truth
    (other / f"{other.name}-seg.nii.gz").unlink()
    assert main([*base, "--t1ce", str(other / f"{other.name}-t1c.nii.gz"), "-o", f"{other}/"]) == 0
    assert (other / f"{other.name}-seg.nii.gz").is_file()
    with pytest.raises(CaseFilesError, match="missing seg"):
        find_case_files(other, require_label=True)
    flair = folder / f"{folder.name}-t2f.nii.gz"
    assert main([*base, "--flair", str(flair), "-o", str(flair)]) == 1
    assert "is an input file" in capsys.readouterr().err
    assert main([*base, "-i", str(folder), "-o", str(tmp_path / "X.NII.GZ")]) == 1
    assert "lower case" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main([*base, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "a_file" / "out")]) == 1
    err = capsys.readouterr()
    assert "cannot create the output folder" in err.err and "written" not in err.out  # nothing was predicted


def test_case_discovery_ignores_labels_predictions_and_stray_files(
    tmp_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = _dataset(tmp_path / "in", 2)
    # predictions written into the root, a stray atlas and a BIDS-named file: still a folder of two cases
    (tmp_path / "in" / "atlas.nii.gz").write_bytes((cases[0] / f"{cases[0].name}-t2f.nii.gz").read_bytes())
    (tmp_path / "in" / f"{cases[0].name}-seg.nii.gz").write_bytes(b"")
    (cases[1] / "sub-01_T1w.nii.gz").write_bytes(b"")
    # two label maps (BraTS 2023 and legacy names) do not matter: prediction never reads them
    (cases[1] / f"{cases[1].name}_seg.nii.gz").write_bytes(b"")
    base = ["--checkpoint", str(checkpoint), "--device", "cpu", "--no_progress", "-i", str(tmp_path / "in")]
    with caplog.at_level("WARNING", logger="brats_core.apps.predict"):
        assert main([*base, "-o", str(tmp_path / "out")]) == 0
    assert "2 written" in capsys.readouterr().out
    assert "ignored sub-01_T1w.nii.gz (not named like a modality" in caplog.text


def test_inputs_unlike_brats_are_read_and_flagged(tmp_path: Path, checkpoint: Path, caplog) -> None:
    """A (X, Y, Z, 1) file, a display window and a RAS 2 mm grid: read, written without the window, warned about."""
    (folder,) = _dataset(tmp_path / "in", 1, seed=2)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # RAS at 2 mm
    for m, suffix in SUFFIX_2023.items():
        path = folder / f"{folder.name}-{suffix}.nii.gz"
        data = np.asarray(nib.load(path).dataobj)
        img = nib.Nifti1Image(data[..., None] if m == "flair" else data, affine)
        img.header["cal_max"] = 2000.0
        nib.save(img, path)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="brats_core.apps.predict"):
        assert main(["--checkpoint", str(checkpoint), "--device", "cpu", "--no_progress", "-i", str(folder),
                     "-o", str(out)]) == 0  # fmt: skip
    assert "voxel axes RAS at 2×2×2 mm, the BraTS training data are LPS at 1 mm" in caplog.text
    written = nib.load(out / f"{folder.name}-seg.nii.gz")
    assert written.shape == SHAPE and float(written.header["cal_max"]) == 0.0
    np.testing.assert_allclose(written.affine, affine)


def test_tumour_volumes_follow_the_written_affine() -> None:
    from brats_core.apps.predict import tumour_volumes_ml

    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, :3] = [1, 2, 3]  # NCR, ED, ET: WT 3 voxels, TC 2, ET 1
    sheared = np.array([[2.0, 0.5, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])  # 8 mm³ voxels
    assert tumour_volumes_ml(labels, sheared) == pytest.approx({"WT": 0.024, "TC": 0.016, "ET": 0.008})
    assert tumour_volumes_ml(labels, None) == pytest.approx({"WT": 0.003, "TC": 0.002, "ET": 0.001})
