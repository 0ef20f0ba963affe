"""Faults handled by the shared core: one-line errors (run_main), unreadable and malicious checkpoints, disk full,
stale temporary files, truncated ``.npy`` files, and a failed step of ``reproduce.py --run``."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brats_core.apps import reproduce
from brats_core.utils import io as bio
from brats_core.utils.checkpoint import CheckpointError, load_checkpoint
from brats_core.utils.cli import UsageError, run_main


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    return path


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("error", "status", "expected"),
    [
        (UsageError("bad flag"), 2, "error: bad flag"),
        (CheckpointError("cannot load checkpoint x.pth"), 2, "x.pth"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/none.csv"), 2, "/data/none.csv"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/x.npy"), 2, "no space left on device"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_run_main_reports_failures_in_one_line(capsys, error: BaseException, status: int, expected: str) -> None:
    def main() -> int:
        raise error

    assert run_main(main) == status
    assert expected in _one_line(capsys.readouterr().err)


def test_run_main_keeps_the_traceback_of_a_bug() -> None:
    def main() -> int:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_main(main)


def test_malicious_checkpoint_runs_no_code_and_never_advises_unsafe_loading(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = _malicious_checkpoint(tmp_path / "model_last.pth", marker)
    func, args = _Payload(tmp_path / "armed").__reduce__()
    func(*args)  # what unpickling the payload would do
    assert (tmp_path / "armed").exists()
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(caught.value)
    assert str(path) in message and "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize("content", [b"", b"\xff" * 64, b"garbage that is no header"])
def test_junk_safetensors_is_a_checkpoint_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_truncated_checkpoint_names_the_file_in_one_sentence(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.zeros(100)}}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated") as caught:
        load_checkpoint(cut)
    assert str(cut) in str(caught.value) and "\n" not in str(caught.value)


def test_disk_full_short_write_is_reported_as_no_space(tmp_path: Path, monkeypatch) -> None:
    # numpy reports a short write on a full disk as "N requested and M written", without errno
    def short_write(*args, **kwargs) -> None:
        raise OSError("195360 requested and 17376 written")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(np, "save", short_write)
    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    target = tmp_path / "vol.npy"
    with pytest.raises(OSError) as caught:
        bio.save_npy(target, np.zeros(3))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_a_failed_write_on_a_disk_with_space_keeps_its_own_error(tmp_path: Path, monkeypatch) -> None:
    def failing(*args, **kwargs) -> None:
        raise OSError("some other failure")

    monkeypatch.setattr(np, "save", failing)
    with pytest.raises(OSError, match="some other failure") as caught:
        bio.save_npy(tmp_path / "vol.npy", np.zeros(3))
    assert caught.value.errno is None


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale_old_style = tmp_path / f".case_vol.npy{bio.TMP_MARKER}{dead}-0123abcd.npy"  # before host names
    stale = tmp_path / f".model_last.pth{bio.TMP_MARKER}{bio._HOST}-{dead}-0123abcd.pth"
    live = tmp_path / f".best.pth{bio.TMP_MARKER}{bio._HOST}-{os.getpid()}-0123abcd.pth"
    remote = tmp_path / f".x.pth{bio.TMP_MARKER}node17-{dead}-0123abcd.pth"
    user_file = tmp_path / "notes.tmp-1-0123abcd.txt"  # not hidden: never ours
    for path in (stale_old_style, stale, live, remote, user_file):
        path.write_bytes(b"x")
    removed = bio.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_old_style, stale])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, remote, user_file))


def test_atomic_writes_name_their_host_and_process(tmp_path: Path) -> None:
    with bio.atomic_path(tmp_path / "a.json") as tmp:
        assert f"{bio._HOST}-{os.getpid()}-" in tmp.name
        tmp.write_text("{}")
        assert bio.remove_stale_temporaries(tmp_path) == []  # a live writer's file stays
    assert (tmp_path / "a.json").read_text() == "{}"


def test_truncated_npy_is_detected_and_named(tmp_path: Path) -> None:
    good = bio.save_npy(tmp_path / "good.npy", np.ones((6, 5, 4, 4), np.float32))
    assert bio.npy_intact(good)
    np.testing.assert_array_equal(bio.load_npy(good, mmap=True), np.ones((6, 5, 4, 4), np.float32))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(good.read_bytes()[:300])
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not an array")
    longer = tmp_path / "longer.npy"
    longer.write_bytes(good.read_bytes() + b"\0" * 8)
    for path in (cut, junk, longer):
        assert not bio.npy_intact(path)
        with pytest.raises(bio.NpyError, match=str(path)):
            bio.load_npy(path, what="volume")
    with pytest.raises(FileNotFoundError, match="none.npy"):
        bio.load_npy(tmp_path / "none.npy")


def test_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(bio.NpyError, match=str(path)):
        bio.load_npy(path)


def test_reproduce_run_reports_a_failed_step_without_a_traceback(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        reproduce._run([sys.executable, "-c", "raise SystemExit(3)"])
    assert "exit status 3" in str(caught.value.code)
    assert "Traceback" not in capsys.readouterr().err
