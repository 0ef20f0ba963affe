"""Faults of reading NIfTI cases and of ``preprocess.py`` (issue "Trust the numbers and the machine"): memory bombs,
damaged outputs of an earlier run, temporaries of a killed run, unreported input folders and files, disk full,
looping links and invalid metadata. Each test checks the one-line report, that the good cases of the same run are
done, that the input is unchanged and that no partial file is left."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from brats_core.data.preprocessing import is_finished, load_meta, main, output_paths, write_label_original_geometry
from brats_core.data.synthetic import case_id
from brats_core.utils.cli import run_main
from brats_core.utils.io import TMP_MARKER, NiftiError, atomic_path, file_key, load_nifti, npy_intact

SHAPE = (40, 44, 36)
PATCH = 32
GOOD, OTHER = case_id(0), case_id(1)


def write_nifti_claiming(path: Path, shape: tuple[int, ...], dtype: type = np.int16) -> Path:
    """A NIfTI file of about 1 KB whose header announces ``shape`` voxels of ``dtype`` (gzip-compressed when the
    name ends with ``.gz``): a damaged or hostile header."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + bytes(range(256)) * 2
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob(f"*{TMP_MARKER}*")]


@pytest.fixture
def raw(two_raw_cases: Path, tmp_path: Path) -> Path:
    """A private copy of two good cases."""
    return Path(shutil.copytree(two_raw_cases, tmp_path / "raw"))


def run(raw: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    """``preprocess.py`` through ``run_main`` as the script runs it; returns (exit status, stderr)."""
    argv = ["--input-path", str(raw), "--output-path", str(out), "--patch_size", str(PATCH), "--workers", "1",
            "--no-progress", *extra]  # fmt: skip
    return run_main(lambda: main(argv)), capsys.readouterr().err


def bad_case(raw: Path, name: str) -> Path:
    """A third case folder (a copy of GOOD's files) to break."""
    return Path(shutil.copytree(raw / GOOD, raw / name))


def lines_about(err: str, text: str) -> list[str]:
    return [line for line in err.splitlines() if text in line]


def assert_good_cases_done(out: Path) -> None:
    for case in (GOOD, OTHER):
        assert is_finished(out, case) and npy_intact(output_paths(out, case).vol)


def assert_nothing_written_for(out: Path, case: str) -> None:
    assert not any(p.exists() for p in output_paths(out, case))
    assert not temporaries(out)


# ---------------------------------------------------------------------------------------------------------------------
# Fault 2: a header announcing more voxels than the file holds, or than any MRI has


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("x-t2w.nii.gz", (10000, 10000, 10000), "1024³"),  # 2 TB announced: refused by the voxel cap
        ("x-t2w.nii.gz", (300, 300, 300), "truncated"),  # 54 MB announced, under the cap: refused by the size
        ("x-t2w.nii", (300, 300, 300), "truncated"),
    ],
)
def test_nifti_header_is_checked_before_any_array_is_allocated(
    tmp_path: Path, name: str, shape: tuple[int, ...], expected: str
) -> None:
    path = write_nifti_claiming(tmp_path / name, shape)
    tracemalloc.start()
    try:
        with pytest.raises(NiftiError) as exc:
            load_nifti(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(exc.value)
    assert str(path) in message and expected in message and "\n" not in message
    assert peak < 8 * 2**20  # far below the 54 MB a read of the announced voxels allocates


def test_memory_bomb_fails_its_case_in_one_line_and_the_others_are_done(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = bad_case(raw, "BAD-bomb-00002")
    bomb = write_nifti_claiming(folder / f"{GOOD}-t2w.nii.gz", (10000, 10000, 10000))
    before = snapshot(raw)
    out = tmp_path / "out"
    rc, err = run(raw, out, capsys)
    assert rc == 1
    reports = lines_about(err, "BAD-bomb-00002")
    assert len(reports) == 2 and all(
        str(bomb) in line and "1024³" in line for line in reports
    )  # as it happens + summary
    assert "Traceback" not in err and "MemoryError" not in err
    assert "2 written" in err and "1 failed" in err
    assert_good_cases_done(out)
    assert_nothing_written_for(out, "BAD-bomb-00002")
    assert snapshot(raw) == before


# ---------------------------------------------------------------------------------------------------------------------
# Fault 3: a truncated output of an earlier run


@pytest.mark.parametrize("kind", ["vol", "seg"])
def test_truncated_output_is_redone_and_the_rerun_says_so(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    out = tmp_path / "out"
    assert run(raw, out, capsys)[0] == 0
    damaged = getattr(output_paths(out, GOOD), kind)
    intact = damaged.read_bytes()
    damaged.write_bytes(intact[: len(intact) // 2])  # e.g. a copy that stopped half-way
    before = snapshot(raw)
    rc, err = run(raw, out, capsys)
    assert rc == 0 and "1 written, 1 skipped" in err
    (note,) = lines_about(err, str(damaged))
    assert "truncated" in note and GOOD in note
    assert damaged.read_bytes() == intact  # the same input gives the same bytes
    assert_good_cases_done(out)
    assert not temporaries(out) and snapshot(raw) == before


# ---------------------------------------------------------------------------------------------------------------------
# Fault 4: temporaries of a run killed with SIGKILL

_KILLED_WRITER = """
import os, sys
from brats_core.utils.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 4096)
    os.kill(os.getpid(), 9)
"""


def killed_writer(destination: Path) -> None:
    """Leave the temporary file of a writer killed with SIGKILL beside ``destination``."""
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(destination)], capture_output=True)
    assert result.returncode == -9, result.stderr


def test_temporaries_of_a_killed_run_are_removed_and_reported(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run(raw, out, capsys)[0] == 0
    done = snapshot(out)
    for sub, name in (("vol", f"{GOOD}_vol.npy"), ("seg", f"{GOOD}_seg.npy"), ("meta", f"{GOOD}.json")):
        killed_writer(out / sub / name)
    stale = temporaries(out)
    assert len(stale) == 3
    with atomic_path(out / "vol" / "live.npy") as live:  # a writer still running: its file stays
        live.write_bytes(b"y")
        rc, err = run(raw, out, capsys)
        assert live.is_file()
    assert rc == 0 and "2 skipped" in err
    assert not any(p.exists() for p in stale)
    assert all(str(p) in err for p in stale)
    (out / "vol" / "live.npy").unlink()
    assert snapshot(out) == done


# ---------------------------------------------------------------------------------------------------------------------
# Fault 5: input that is not used must be reported


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("sub-01_FLAIR.nii.gz", None),  # BIDS names are not BraTS endings
        ("sub-01_T2w.nii.gz", None),
        ("sub-01_T1w.nii.gz", None),
        ("a_t2w.nii.gz", None),  # a BraTS 2023 ending after the legacy separator
        ("a-flair.nii.gz", None),  # a legacy ending after the BraTS 2023 separator
        ("a-T2F.nii.gz", None),
        ("a-t2w.nii.gz", "t2"),
        ("a_t2.nii", "t2"),
        ("a-t1c.nii.gz", "t1ce"),
        ("a_t1ce.nii.gz", "t1ce"),
        ("a-seg.nii.gz", "seg"),
        ("a_seg.nii.gz", "seg"),
    ],
)
def test_only_the_documented_brats_endings_are_recognised(name: str, key: str | None) -> None:
    assert file_key(name) == key


def test_empty_folders_and_unrecognised_files_are_listed(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (raw / "BAD-empty-00008").mkdir()
    shutil.copy(raw / GOOD / f"{GOOD}-t2w.nii.gz", raw / GOOD / "sub-01_T2w.nii.gz")
    shutil.copy(raw / OTHER / f"{OTHER}-t2f.nii.gz", raw / OTHER / "sub-01_FLAIR.nii.gz")
    (raw / "splits").mkdir()  # case lists beside the cases are expected there: not reported
    (raw / "splits" / "train.txt").write_text(f"{GOOD}\n")
    before = snapshot(raw)
    out = tmp_path / "out"
    rc, err = run(raw, out, capsys)
    assert rc == 0 and "2 cases, 2 written" in err
    (empty,) = lines_about(err, "BAD-empty-00008")
    assert "empty" in empty and "splits" not in err
    (t2,) = lines_about(err, "sub-01_T2w.nii.gz")
    (flair,) = lines_about(err, "sub-01_FLAIR.nii.gz")
    assert GOOD in t2 and "ignored" in t2 and OTHER in flair and "ignored" in flair
    assert_good_cases_done(out)
    assert snapshot(raw) == before


# ---------------------------------------------------------------------------------------------------------------------
# Fault 6: messages that name the wrong cause


def test_disk_full_names_the_file_and_the_cause(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def short_write(*args: object, **kwargs: object) -> None:  # what numpy raises on a full disk
        raise OSError("195360 requested and 17376 written")

    monkeypatch.setattr(np, "save", short_write)
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=0, f_frsize=4096))
    before = snapshot(raw)
    out = tmp_path / "out"
    rc, err = run(raw, out, capsys)
    assert rc == 1 and "2 failed" in err
    for case in (GOOD, OTHER):
        reports = lines_about(err, f"{output_paths(out, case).vol}: no space left on device")
        assert len(reports) == 2 and all("free some space" in line for line in reports)
        assert_nothing_written_for(out, case)
    assert "requested and" not in err
    assert snapshot(raw) == before


def test_looping_link_is_named_not_reported_missing(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = bad_case(raw, "BAD-loop-00003")
    link = folder / f"{GOOD}-t2w.nii.gz"
    link.unlink()
    link.symlink_to(link.name)  # points to itself
    out = tmp_path / "out"
    rc, err = run(raw, out, capsys)
    assert rc == 1 and "2 written" in err and "1 failed" in err
    reports = lines_about(err, "BAD-loop-00003")
    assert len(reports) == 2 and all(link.name in line and "loops" in line for line in reports)
    assert "missing" not in err
    assert_good_cases_done(out)
    assert_nothing_written_for(out, "BAD-loop-00003")


# ---------------------------------------------------------------------------------------------------------------------
# Fault 7: invalid metadata JSON


def test_invalid_metadata_is_redone_and_the_rerun_says_so(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run(raw, out, capsys)[0] == 0
    meta = output_paths(out, GOOD).meta
    intact = meta.read_text()
    meta.write_text("{garbage")
    rc, err = run(raw, out, capsys)
    assert rc == 0 and "1 written, 1 skipped" in err
    (note,) = lines_about(err, str(meta))
    assert "JSON" in note and GOOD in note
    assert load_meta(meta) == json.loads(intact)
    assert_good_cases_done(out)


@pytest.mark.parametrize("garbage", ["{garbage", "[1, 2]", ""])
def test_invalid_metadata_read_by_a_consumer_is_one_line_with_the_remedy(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], garbage: str
) -> None:
    out = tmp_path / "out"
    assert run(raw, out, capsys, "--cases", GOOD)[0] == 0
    meta = output_paths(out, GOOD).meta
    meta.write_text(garbage)
    seg = np.load(output_paths(out, GOOD).seg)
    target = tmp_path / "pred.nii.gz"

    def consumer() -> int:
        write_label_original_geometry(seg, out, GOOD, target)
        return 0

    assert run_main(consumer) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(meta) in lines[0] and f"preprocess.py --overwrite --cases {GOOD}" in lines[0]
    assert not target.exists() and not temporaries(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs of another tool (e.g. the upstream preprocessing: vol/ and seg/ without meta/) are never replaced silently


def test_arrays_another_tool_wrote_are_kept_without_overwrite(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    foreign = output_paths(out, GOOD).vol
    foreign.parent.mkdir(parents=True)
    np.save(foreign, np.full((4, 4, 4, 4), 7, np.float32))
    before = foreign.read_bytes()
    rc, err = run(raw, out, capsys)
    assert rc == 1
    lines = lines_about(err, str(foreign))
    assert lines and all("not written by preprocess.py" in line and "--overwrite" in line for line in lines), err
    assert foreign.read_bytes() == before and not output_paths(out, GOOD).meta.exists()
    assert is_finished(out, OTHER, PATCH)  # the other case is done
    rc, err = run(raw, out, capsys, "--overwrite")
    assert rc == 0 and is_finished(out, GOOD, PATCH) and foreign.read_bytes() != before


def test_a_case_stopped_while_writing_is_redone_without_overwrite(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # this tool's own arrays of an interrupted case carry the pending mark and are replaced on the next run
    import brats_core.data.preprocessing as pre

    out = tmp_path / "out"
    real_save_npy = pre.save_npy

    def stop_after_volume(path: Path, array: np.ndarray) -> Path:
        written = real_save_npy(path, array)
        if path.name.endswith("_vol.npy"):
            raise KeyboardInterrupt
        return written

    monkeypatch.setattr(pre, "save_npy", stop_after_volume)
    with pytest.raises(KeyboardInterrupt):
        pre.preprocess_case(raw / GOOD, out, PATCH)
    monkeypatch.undo()
    assert output_paths(out, GOOD).vol.exists() and not is_finished(out, GOOD, PATCH)
    rc, err = run(raw, out, capsys)
    assert rc == 0 and "not written by preprocess.py" not in err
    assert is_finished(out, GOOD, PATCH) and is_finished(out, OTHER, PATCH)
