"""Faults of ``predict.py`` (issue "Trust the numbers and the machine"): a user's file replaced, memory bombs,
temporaries of a killed run, unreported input folders and files, disk full and looping links. Each test checks the
report, that the good cases of the same run are done, that the inputs are unchanged and that no partial file is
left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from test_faults_preprocess import killed_writer, snapshot, temporaries, write_nifti_claiming

from brats_core.apps.predict import main
from brats_core.data.synthetic import case_id
from brats_core.utils.io import save_nifti, written_by_predict

SHAPE = (40, 44, 36)
REPO = Path(__file__).resolve().parents[1]
GOOD, OTHER = case_id(0), case_id(1)


@pytest.fixture
def cases(two_raw_cases: Path, tmp_path: Path) -> Path:
    """A private copy of two good cases."""
    return Path(shutil.copytree(two_raw_cases, tmp_path / "in"))


def predict(checkpoint: Path, *argv: str) -> int:
    return main(["--checkpoint", str(checkpoint), "--device", "cpu", "--no_progress", *argv])


def lines_about(err: str, text: str) -> list[str]:
    return [line for line in err.splitlines() if text in line]


def user_nifti(path: Path) -> bytes:
    """A NIfTI file the user wrote (not predict.py): returns its bytes."""
    save_nifti(path, np.ones(SHAPE, np.uint8), np.eye(4), description="my manual segmentation")
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# Fault 1: a file predict.py did not write is never replaced without --overwrite


@pytest.mark.parametrize("target", ["file", "label", "probabilities", "regions", "uncertainty"])
def test_a_users_file_is_not_replaced_without_overwrite(
    cases: Path, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    extras = {
        "probabilities": ["--save_probabilities"], "regions": ["--save_regions"], "uncertainty": ["--save_uncertainty"]
    }.get(target, [])  # fmt: skip
    argv = ["-i", str(cases / GOOD), *extras]
    if target == "file":
        mine, argv = out / "existing.nii.gz", [*argv, "-o", str(out / "existing.nii.gz")]
    else:
        ending = {
            "label": "seg.nii.gz", "probabilities": "prob.npz", "regions": "regions.nii.gz",
            "uncertainty": "uncertainty.nii.gz",
        }[target]  # fmt: skip
        mine, argv = out / f"{GOOD}-{ending}", [*argv, "-o", str(out)]
    if mine.suffix == ".npz":
        np.savez(mine, probabilities=np.zeros(3), note=np.array("my own results"))
        kept = mine.read_bytes()
    else:
        kept = user_nifti(mine)
    inputs = snapshot(cases)
    for resume in ([], ["--continue"]):
        assert predict(checkpoint, *argv, *resume) == 1
        captured = capsys.readouterr()
        (report,) = [line for line in captured.err.splitlines() if line.strip()]
        assert str(mine) in report and "--overwrite" in report and "not written by predict.py" in report
        assert mine.read_bytes() == kept and sorted(out.iterdir()) == [mine]  # nothing else predicted or written
        assert "written" not in captured.out
    assert predict(checkpoint, *argv, "--overwrite") == 0
    assert written_by_predict(mine) and mine.read_bytes() != kept
    assert predict(checkpoint, *argv) == 0  # its own outputs are replaced without --overwrite, as before
    assert written_by_predict(mine)
    assert not temporaries(out) and snapshot(cases) == inputs


# ---------------------------------------------------------------------------------------------------------------------
# Fault 2: a header announcing more voxels than any MRI has


def test_memory_bomb_fails_its_case_and_the_others_are_done(
    cases: Path, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = Path(shutil.copytree(cases / GOOD, cases / "BAD-bomb-00002"))
    bomb = write_nifti_claiming(folder / f"{GOOD}-t2w.nii.gz", (10000, 10000, 10000))
    inputs = snapshot(cases)
    out = tmp_path / "out"
    assert predict(checkpoint, "-i", str(cases), "-o", str(out)) == 1
    captured = capsys.readouterr()
    reports = lines_about(captured.err, "BAD-bomb-00002")
    assert len(reports) == 2 and all(str(bomb) in line and "1024³" in line for line in reports)
    assert "MemoryError" not in captured.err and "2 written" in captured.out
    assert sorted(p.name for p in out.iterdir()) == [f"{GOOD}-seg.nii.gz", f"{OTHER}-seg.nii.gz"]
    assert snapshot(cases) == inputs


# ---------------------------------------------------------------------------------------------------------------------
# Fault 4: temporaries of a run killed with SIGKILL


def test_temporaries_of_a_killed_run_are_removed_and_reported(cases: Path, tmp_path: Path, checkpoint: Path) -> None:
    out = tmp_path / "out"
    killed_writer(out / f"{GOOD}-seg.nii.gz")
    (stale,) = temporaries(out)
    result = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), "--checkpoint", str(checkpoint), "--device", "cpu",
         "--no_progress", "-i", str(cases / GOOD), "-o", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and lines_about(result.stderr, str(stale))
    assert sorted(p.name for p in out.iterdir()) == [f"{GOOD}-seg.nii.gz"]


# ---------------------------------------------------------------------------------------------------------------------
# Fault 5: input that is not used must be reported


def test_empty_folders_and_bids_names_are_listed_not_used(
    cases: Path, tmp_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    (cases / "BAD-empty-00008").mkdir()
    bids = cases / "sub-01"
    bids.mkdir()
    shutil.copy(cases / GOOD / f"{GOOD}-t2f.nii.gz", bids / "sub-01_FLAIR.nii.gz")
    shutil.copy(cases / GOOD / f"{GOOD}-t2w.nii.gz", bids / "sub-01_T2w.nii.gz")
    shutil.copy(cases / OTHER / f"{OTHER}-t2w.nii.gz", cases / OTHER / "sub-02_T2w.nii.gz")
    inputs = snapshot(cases)
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        assert predict(checkpoint, "-i", str(cases), "-o", str(out)) == 1
    captured = capsys.readouterr()
    report = caplog.text + captured.err
    # the log may reach both caplog and stderr (a root handler an earlier test installed): one line each at most
    empty = lines_about(report, "BAD-empty-00008")
    assert 1 <= len(empty) <= 2 and all("empty" in line for line in empty)
    assert lines_about(report, "ignored sub-02_T2w.nii.gz")
    failed = lines_about(captured.err, "sub-01: FAILED")
    assert failed and "sub-01_FLAIR.nii.gz" in failed[0] and "sub-01_T2w.nii.gz" in failed[0]
    assert "2 written" in captured.out and "1 failed (of 3)" in captured.out
    assert sorted(p.name for p in out.iterdir()) == [f"{GOOD}-seg.nii.gz", f"{OTHER}-seg.nii.gz"]
    assert snapshot(cases) == inputs


# ---------------------------------------------------------------------------------------------------------------------
# Fault 6: messages that name the wrong cause


def test_disk_full_names_the_file_and_the_cause(
    cases: Path, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def short_write(*args: object, **kwargs: object) -> None:  # what a compressed write reports on a full disk
        raise OSError("195360 requested and 17376 written")

    monkeypatch.setattr(nib, "save", short_write)
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=0, f_frsize=4096))
    inputs = snapshot(cases)
    out = tmp_path / "out"
    assert predict(checkpoint, "-i", str(cases), "-o", str(out)) == 1
    err = capsys.readouterr().err
    for case in (GOOD, OTHER):
        reports = lines_about(err, f"{out / f'{case}-seg.nii.gz'}: no space left on device")
        assert len(reports) == 2 and all("free some space" in line for line in reports)
    assert "requested and" not in err
    assert list(out.iterdir()) == [] and snapshot(cases) == inputs


def test_looping_link_is_named_not_taken_as_missing(
    cases: Path, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = Path(shutil.copytree(cases / GOOD, cases / "BAD-loop-00003"))
    link = folder / f"{GOOD}-t2w.nii.gz"
    link.unlink()
    link.symlink_to(link.name)  # points to itself
    out = tmp_path / "out"
    assert predict(checkpoint, "-i", str(cases), "-o", str(out)) == 1
    captured = capsys.readouterr()
    reports = lines_about(captured.err, "BAD-loop-00003")
    assert len(reports) == 2 and all(link.name in line and "loops" in line for line in reports)
    assert "2 written" in captured.out
    assert sorted(p.name for p in out.iterdir()) == [f"{GOOD}-seg.nii.gz", f"{OTHER}-seg.nii.gz"]
    # the same link given as an explicit file
    assert predict(checkpoint, "--flair", str(folder / f"{GOOD}-t2f.nii.gz"), "--t2", str(link), "-o", str(out)) == 1
    (report,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert str(link) in report and "loops" in report
