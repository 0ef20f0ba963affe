"""Issue #16 faults of the training side: every refusal is one line naming the file, happens before any work and
leaves no output folder behind; damaged data is named; killed runs' temporaries go; training shows its progress."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from toy import write_preprocessed

from brats_core.data import splits
from brats_core.registry import build_method
from brats_core.utils.checkpoint import export_safetensors, save_checkpoint
from brats_core.utils.cli import run_main
from brats_core.utils.io import atomic_path

REPO = Path(__file__).resolve().parents[1]
SHAPE = (34, 34, 34)  # just above the tiny presets' 32³ patch


class _Payload:
    """Unpickling this would create ``marker``: a stand-in for a malicious checkpoint's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _checkpoint(folder: Path, kind: str, good: Path) -> Path:
    """A broken checkpoint of ``kind``; ``good`` is a valid one to truncate."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        (path := folder / "empty.pth").write_bytes(b"")
    elif kind == "truncated":
        (path := folder / "truncated.pth").write_bytes(good.read_bytes()[:200])
    elif kind == "malicious":
        torch.save({"state_dict": {}, "payload": _Payload(folder / "PWNED")}, path := folder / "malicious.pth")
    elif kind == "junk_safetensors":
        (path := folder / "junk.safetensors").write_bytes(b"\x00\x01junk" * 20)
    elif kind == "foreign_optimizer":  # IM-Fuse weights with another optimiser's state (over other parameters)
        model = build_method("imfuse", "tiny")
        state = torch.optim.SGD(list(model.parameters())[:1], lr=0.1).state_dict()
        save_checkpoint(path := folder / "foreign.pth", model, method="imfuse", optimizer=state)
    else:  # a valid checkpoint of another method
        path = good
    return path


def _run(main, argv, prog, monkeypatch, capsys) -> tuple[int, str]:
    """``run_main(main(argv))`` as the script's entry point runs it: exit status and stderr."""
    monkeypatch.setattr("sys.argv", [prog])
    try:
        code = run_main(partial(main, argv))
    except SystemExit as err:  # argparse's own usage errors
        code = int(err.code)
    return code, capsys.readouterr().err


def _one_line_error(err: str, prog: str, *needles: str) -> str:
    """The single ``<prog>: error: …`` line of ``err`` (log lines may precede it), containing every needle."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if f"{prog}: error: " in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three toy cases (two train, one val) and a valid tiny IM-Fuse checkpoint."""
    root = tmp_path_factory.mktemp("faults_train")
    cases = write_preprocessed(root / "pre", n=3, shape=SHAPE)
    splits.Split(cases[:2], [(cases[2], (True, True, False, True))], []).write(root / "pre" / "splits")
    save_checkpoint(root / "imfuse.pth", build_method("imfuse", "tiny"), method="imfuse")
    return root, cases


def _copy(data, tmp_path) -> tuple[Path, list[str]]:
    root, cases = data
    shutil.copytree(root / "pre", tmp_path / "pre")
    return tmp_path / "pre", cases


def _imfuse_argv(pre: Path, save: Path, *extra: str, max_steps: int | None = 1) -> list[str]:
    steps = ["--max_steps", str(max_steps)] if max_steps else []
    return ["--datapath", str(pre), "--savepath", str(save), "--preset", "tiny", "--num_epochs", "1", *steps,
            "--batch_size", "1", "--workers", "0", "--device", "cpu", "--no_progress", *extra]  # fmt: skip


# ------------------------------------------------------------------------------------------- 1. unreadable checkpoints


@pytest.mark.parametrize("kind", ["empty", "truncated", "malicious", "junk_safetensors", "foreign_optimizer"])
def test_imfuse_resume_from_an_unreadable_checkpoint_is_one_line(data, tmp_path, monkeypatch, capsys, kind):
    from IMFuse import train_poly

    root, _ = data
    bad = _checkpoint(tmp_path / "ck", kind, root / "imfuse.pth")
    save = tmp_path / "run"
    code, err = _run(train_poly.main, _imfuse_argv(root / "pre", save, "--resume", str(bad)), "train_poly.py",
                     monkeypatch, capsys)  # fmt: skip
    assert code == 2
    _one_line_error(err, "train_poly.py", str(bad))
    assert not (tmp_path / "ck" / "PWNED").exists()  # the pickle's code never ran
    assert not save.exists()  # refused before the output folder was made


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Three synthetic BraTS cases (NIfTI) with ShaSpec lists, and their M3AE cache with split files."""
    from brats_core.data.synthetic import write_synthetic_dataset
    from m3ae.data import preprocess_dataset

    root = tmp_path_factory.mktemp("faults_raw")
    cases = write_synthetic_dataset(root / "raw", 3, shape=(48, 48, 40), seed=2)
    (root / "raw" / "train.csv").write_text("case\n" + "".join(f"{c}\n" for c in cases[:2]))
    (root / "raw" / "val.csv").write_text(f'case,mask\n{cases[2]},"[True, False, True, False]"\n')
    preprocess_dataset(root / "raw", root / "m3ae", progress=False)
    splits.Split(cases[:2], [(cases[2], (True, True, False, True))], []).write(root / "m3ae" / "splits")
    return root, cases


@pytest.mark.parametrize(
    ("script", "flag", "kind"),
    [
        ("train", "--resume", "malicious"),
        ("train", "--resume", "another_method"),
        ("train", "--pretrained", "truncated"),
        ("train", "--pretrained", "another_method"),
        ("pretrain", "--resume", "empty"),
        ("pretrain", "--resume", "another_method"),
    ],
)
def test_m3ae_unreadable_or_foreign_checkpoint_is_one_line(data, raw, tmp_path, monkeypatch, capsys, script, flag,
                                                           kind):  # fmt: skip
    import importlib

    module = importlib.import_module(f"m3ae.{script}")
    bad = _checkpoint(tmp_path / "ck", kind, data[0] / "imfuse.pth")
    save = tmp_path / "run"
    argv = ["--datapath", str(raw[0] / "m3ae"), "--savepath", str(save), "--preset", "tiny", "--epochs", "1",
            "--max_steps", "1", "--workers", "0", "--device", "cpu", "--no_progress", flag, str(bad)]  # fmt: skip
    code, err = _run(module.main, argv, f"{script}.py", monkeypatch, capsys)
    assert code == 2
    _one_line_error(err, f"{script}.py", str(bad))
    assert not (tmp_path / "ck" / "PWNED").exists()
    assert not save.exists()


def _shaspec_argv(raw_root: Path, snapshot: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(raw_root / "raw"), "--train_list", "train.csv", "--val_list", "val.csv", "--preset",
            "tiny", "--device", "cpu", "--workers", "0", "--cache_dir", str(raw_root / "shaspec_cache"),
            "--snapshot_dir", str(snapshot), "--num_steps", "1", "--no_augmentation", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "kind"),
    [(["--reload_from_checkpoint", "--reload_path"], "malicious"), (["--continue"], "truncated")],
)
def test_shaspec_unreadable_checkpoint_is_one_line(data, raw, tmp_path, monkeypatch, capsys, flags, kind):
    from ShaSpec import train_SS

    bad = _checkpoint(tmp_path / "ck", kind, data[0] / "imfuse.pth")
    snapshot = tmp_path / "snap"
    code, err = _run(train_SS.main, _shaspec_argv(raw[0], snapshot, *flags, str(bad)), "train_SS.py", monkeypatch,
                     capsys)  # fmt: skip
    assert code == 2
    _one_line_error(err, "train_SS.py", str(bad))
    assert not (tmp_path / "ck" / "PWNED").exists()
    assert not snapshot.exists()


def test_shaspec_reloads_a_weights_only_safetensors_export(raw, tmp_path):
    """An exported ``.safetensors`` holds no iteration: the reload starts at ``--start_iters`` instead of failing."""
    from brats_core.utils.checkpoint import load_checkpoint
    from ShaSpec import train_SS

    save_checkpoint(tmp_path / "w.pth", build_method("shaspec", "tiny"), method="shaspec", iter=7)
    export_safetensors(tmp_path / "w.pth", tmp_path / "w.safetensors")
    snapshot = tmp_path / "snap"
    steps: list[int] = []
    argv = _shaspec_argv(raw[0], snapshot, "--reload_from_checkpoint", "--reload_path", str(tmp_path / "w.safetensors"))
    assert train_SS.main(argv, on_step=lambda i, lr: steps.append(i)) == 0
    assert steps == [0] and load_checkpoint(snapshot / "last.pth")["iter"] == 0


# ------------------------------------------------------------------------------------------------- 2. damaged inputs


def test_empty_training_list_is_one_line_naming_the_file(data, tmp_path, monkeypatch, capsys):
    from IMFuse import train_poly

    pre, _ = _copy(data, tmp_path)
    (pre / "splits" / "train.txt").write_text("\n")
    save = tmp_path / "run"
    code, err = _run(train_poly.main, _imfuse_argv(pre, save), "train_poly.py", monkeypatch, capsys)
    assert code == 2
    _one_line_error(err, "train_poly.py", str(pre / "splits" / "train.txt"), "no case")
    assert not save.exists()
    # a header-only CSV list is just as empty
    (tmp_path / "test.csv").write_text("case,mask\n")
    with pytest.raises(ValueError, match=r"test\.csv.*no case"):
        splits.read_mask_csv(tmp_path / "test.csv")
    with pytest.raises(ValueError, match=r"test\.csv.*no case"):
        splits.read_case_list(tmp_path / "test.csv")


def test_nan_in_a_training_volume_names_the_file(data, tmp_path, monkeypatch, capsys):
    from IMFuse import train_poly

    pre, cases = _copy(data, tmp_path)
    path = pre / "vol" / f"{cases[0]}_vol.npy"
    vol = np.load(path)
    vol[10:20, 10:20, 10:20, 1] = np.nan  # inside every 32³ crop of the 34³ volume
    np.save(path, vol)
    splits.Split([cases[0]], [], []).write(tmp_path / "lists")
    code, err = _run(train_poly.main, _imfuse_argv(pre, tmp_path / "run", "--split_dir", str(tmp_path / "lists")),
                     "train_poly.py", monkeypatch, capsys)  # fmt: skip
    assert code == 2
    _one_line_error(err, "train_poly.py", str(path), "NaN")
    assert not (tmp_path / "run" / "model_last.pth").exists()


def test_truncated_training_volume_is_named_before_training(data, raw, tmp_path, monkeypatch, capsys):
    from IMFuse import train_poly
    from m3ae.data import FinetuneDataset
    from ShaSpec.data import ShaSpecTrainDataset

    pre, cases = _copy(data, tmp_path)
    path = pre / "vol" / f"{cases[1]}_vol.npy"
    path.write_bytes(path.read_bytes()[:5000])
    save = tmp_path / "run"
    code, err = _run(train_poly.main, _imfuse_argv(pre, save), "train_poly.py", monkeypatch, capsys)
    assert code == 2
    _one_line_error(err, "train_poly.py", str(path), "truncated")
    assert not save.exists()
    # the M3AE and ShaSpec loaders name the file too
    cache = tmp_path / "m3ae"
    shutil.copytree(raw[0] / "m3ae", cache)
    path = cache / "vol" / f"{raw[1][0]}_vol.npy"
    path.write_bytes(path.read_bytes()[:5000])
    for load in (
        lambda: FinetuneDataset(cache, raw[1][:1], 32, np.zeros((48, 48, 40, 4), np.float32))[(0, 1)],
        lambda: ShaSpecTrainDataset(cache, raw[1][:1], (32, 32, 32), augment=False)[(0, 1)],
    ):
        with pytest.raises(OSError) as err:
            load()
        assert str(path) in str(err.value) and "truncated" in str(err.value)


# ------------------------------------------------------------------------------------ 3. checked before any training


def test_missing_validation_case_is_refused_before_training(data, tmp_path, monkeypatch, capsys):
    from IMFuse import train_poly

    pre, cases = _copy(data, tmp_path)
    splits.Split(cases[:2], [("TOY-99999-000", (True, True, True, True))], []).write(tmp_path / "lists")
    save = tmp_path / "run"
    argv = _imfuse_argv(pre, save, "--split_dir", str(tmp_path / "lists"), "--val_every", "1")
    code, err = _run(train_poly.main, argv, "train_poly.py", monkeypatch, capsys)
    assert code == 2
    _one_line_error(err, "train_poly.py", "TOY-99999-000_vol.npy")
    assert not save.exists()  # no epoch was trained (and lost)


def test_empty_validation_list_is_refused_only_when_validating(data, tmp_path, monkeypatch, capsys):
    from IMFuse import train_poly

    pre, cases = _copy(data, tmp_path)
    splits.Split(cases[:2], [], []).write(tmp_path / "lists")
    save = tmp_path / "run"
    argv = _imfuse_argv(pre, save, "--split_dir", str(tmp_path / "lists"))
    code, err = _run(train_poly.main, [*argv, "--val_every", "1"], "train_poly.py", monkeypatch, capsys)
    assert code == 2
    _one_line_error(err, "train_poly.py", str(tmp_path / "lists" / "val15splits.csv"))
    assert not save.exists()
    # no validation epoch in this run (upstream's first is epoch 50): nothing to validate, nothing refused
    assert train_poly.main(argv) == 0 and (save / "model_last.pth").is_file()


@pytest.mark.parametrize("where", ["typo", "raw"])
def test_wrong_datapath_is_named_as_such(data, raw, tmp_path, monkeypatch, capsys, where):
    from IMFuse import train_poly

    datapath = tmp_path / "no_such_folder" if where == "typo" else raw[0] / "raw"
    save = tmp_path / "run"
    code, err = _run(train_poly.main, _imfuse_argv(datapath, save), "train_poly.py", monkeypatch, capsys)
    assert code == 2
    line = _one_line_error(err, "train_poly.py", str(datapath))
    assert ("does not exist" if where == "typo" else "preprocess.py") in line and "split" not in line
    assert not save.exists()


# ---------------------------------------------------------------------------------- 4. temporaries of a killed run


def _stale_temporary(folder: Path, name: str) -> Path:
    """A temporary file exactly as a run killed while writing ``folder/name`` leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    code = (
        "import os, sys\nfrom brats_core.utils.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'')\n    print(tmp, flush=True)\n    os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder / name)], capture_output=True, text=True, check=True)
    tmp = Path(out.stdout.strip())
    assert tmp.is_file() and tmp.parent == folder
    return tmp


def test_temporaries_of_a_killed_run_are_removed_when_training_starts(data, raw, tmp_path):
    from IMFuse import train_poly
    from ShaSpec import train_SS

    save = tmp_path / "run"
    stale = _stale_temporary(save, "model_last.pth")
    assert train_poly.main(_imfuse_argv(data[0] / "pre", save)) == 0
    assert not stale.exists() and (save / "model_last.pth").is_file()
    with atomic_path(save / "live.pth") as live:  # a live writer's file (this process) is kept
        live.write_bytes(b"")
        assert train_poly.main(_imfuse_argv(data[0] / "pre", save, "--overwrite")) == 0
        assert live.exists()
    snapshot = tmp_path / "snap"
    stale = _stale_temporary(snapshot, "last.pth")
    assert train_SS.main(_shaspec_argv(raw[0], snapshot, "--train_only")) == 0
    assert not stale.exists() and (snapshot / "last.pth").is_file()


# ------------------------------------------------------------------------------------------ 5. progress and Ctrl-C


def test_training_without_a_bar_logs_step_progress_and_time_left(data, tmp_path, capsys):
    from IMFuse import train_poly

    save = tmp_path / "run"
    argv = _imfuse_argv(data[0] / "pre", save, "--iter_per_epoch", "3", "--num_epochs", "2", max_steps=2)
    assert train_poly.main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "step 1/3" in line]
    assert len(lines) == 1  # the first line comes after the first step, whatever the interval
    assert "epoch 1/2, step 1/3" in lines[0] and "left" in lines[0]
    log_file = (save / "train.txt").read_text()
    assert "step 1/3" in log_file  # the log file has it too,
    assert "training imfuse on 2 cases" in log_file  # and the lines logged before the folder existed


def test_ctrl_c_in_the_demo_is_one_line_per_process(data, tmp_path):
    """Ctrl-C reaches the demo and its running step (one process group): both stop with one line, status 130."""
    pre = data[0] / "pre"
    train = [sys.executable, "IMFuse/train_poly.py",
             *_imfuse_argv(pre, tmp_path / "run", "--iter_per_epoch", "1000", max_steps=None)]  # fmt: skip
    driver = (
        "import sys\nfrom brats_core.apps import demo\nfrom brats_core.utils.cli import run_main\n"
        f"sys.argv = ['demo.py']\nraise SystemExit(run_main(lambda: demo.run_step({train!r}) or 0))\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a job started in the background by a shell (`cmd &`) inherits SIGINT ignored, and an ignored signal stays
    # ignored across exec: the demo gets the terminal's default, so the test does not depend on how pytest started
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        err = ""
        deadline = time.monotonic() + 240
        while "step 1/1000" not in err:  # training is under way (the first progress line comes after one step)
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, err
            err += line
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err += rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "train_poly.py: interrupted" in err  # the step was not killed before it could stop cleanly
    assert "demo.py: interrupted" in err
    assert "$ " in out  # the demo echoed the step's command
    assert not list((tmp_path / "run").glob(".*.tmp-*"))  # the step was not killed while writing
