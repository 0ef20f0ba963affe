"""MaM's checkpoint faults: a malicious pickle given to ``MaM/train.py`` as ``-pretrained_weights``, as the
``checkpoint_latest.pth`` that ``--c`` resumes or as the ``checkpoint_final.pth`` that ``--val`` loads never runs and
is reported in one line; ``MaM/test.py`` reports damaged and foreign checkpoints in one line; the checkpoints a real
(tiny) MaM training writes still resume, validate and initialise a new training.

The nnU-Net dataset is prepared once per module without nnU-Net's multiprocess planner: the hand-written plans of
``test_mam_predict`` (what nnU-Net plans for such cases) and nnU-Net's own preprocessor run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from test_mam_predict import nnunet_plans, write_nnunet_checkpoint

from brats_core.data.splits import Split
from brats_core.data.synthetic import write_synthetic_dataset
from brats_core.registry import build_method, config_dict, make_config
from brats_core.utils.checkpoint import save_checkpoint
from brats_core.utils.cli import run_main
from MaM import prepare_dataset, test, train
from MaM.prepare_dataset import CONFIGURATION, PLANS, TRAINER
from MaM.trained_model import load_nnunet_checkpoint
from MaM.trainer import nnUNetTrainerMissingReconBaseline

REPO = Path(__file__).resolve().parents[1]
FOLD = Path("Dataset138_MaM") / f"{TRAINER}__{PLANS}__{CONFIGURATION}" / "fold_0"
COMMON = ["138", CONFIGURATION, "0", "-device", "cpu", "--num_iterations_per_epoch", "1",
          "--num_val_iterations_per_epoch", "1", "--seed", "0"]  # fmt: skip


class _Payload:
    """Unpickling this creates ``marker``: what a hostile checkpoint could do with any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _write_hostile(path: Path, marker: Path) -> bytes:
    """A torch file laid out like nnU-Net's checkpoint whose ``init_args`` run the payload; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": {}, "init_args": _Payload(marker), "trainer_name": TRAINER}, path)
    return path.read_bytes()


def _set_env(mp: pytest.MonkeyPatch, root: Path, results: Path) -> None:
    for name, folder in (("raw", root / "raw"), ("preprocessed", root / "preprocessed"), ("results", results)):
        mp.setenv(f"nnUNet_{name}", str(folder))
    mp.setenv("nnUNet_n_proc_DA", "0")  # data augmentation in this process
    mp.setenv("nnUNet_def_n_proc", "1")
    mp.setenv("nnUNet_compile", "0")


def _preprocess(raw: Path, pre: Path, plans: dict[str, Any]) -> None:
    """nnU-Net's preprocessing of the training cases (what ``nnUNetv2_preprocess`` writes), in this process."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    manager = PlansManager(plans)
    config = manager.get_configuration(CONFIGURATION)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    out, gt = pre / config.data_identifier, pre / "gt_segmentations"
    out.mkdir()
    gt.mkdir()
    for case, files in get_filenames_of_train_images_and_targets(str(raw), dataset_json).items():
        DefaultPreprocessor(verbose=False).run_case_save(
            str(out / case), files["images"], files["label"], manager, config, dataset_json
        )
        shutil.copyfile(files["label"], gt / f"{case}{prepare_dataset.FILE_ENDING}")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw and preprocessed Dataset138_MaM: one training and one validation case of 32³ voxels, MaM's tiny plans."""
    root = tmp_path_factory.mktemp("mam_dataset")
    cases = write_synthetic_dataset(root / "brats", 3, shape=(32, 32, 32), seed=0)
    split = Split(cases[:1], [(cases[1], (True, False, True, False))], [(cases[2], (True, True, True, True))])
    with pytest.MonkeyPatch.context() as mp:
        _set_env(mp, root, root / "results")
        raw = prepare_dataset.convert_dataset(root / "brats", root / "raw", split)
        pre = root / "preprocessed" / raw.name
        pre.mkdir(parents=True)
        config = make_config("mam", "tiny")
        plans = nnunet_plans(config)
        (pre / f"{PLANS}.json").write_text(json.dumps(plans))
        shutil.copyfile(raw / "dataset.json", pre / "dataset.json")
        # the trainer only copies the fingerprint into its results; the plans hold what nnU-Net derived from it
        fingerprint = {
            "foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"]
        }
        (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
        prepare_dataset.add_mam_configuration(pre, config, raw)
        _preprocess(raw, pre, plans)
    return root


@pytest.fixture
def results(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test's ``nnUNet_results`` folder (the dataset is shared); torch's thread count restored afterwards."""
    _set_env(monkeypatch, dataset, tmp_path / "results")
    threads = torch.get_num_threads()
    yield tmp_path / "results"
    torch.set_num_threads(threads)  # train.py -device cpu uses every core, as nnU-Net's run_training


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The results folder of one real epoch of MaM training (checkpoint_final/best.pth, validation/)."""
    out = tmp_path_factory.mktemp("mam_trained") / "results"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        _set_env(mp, dataset, out)
        try:
            assert train.main([*COMMON, "--num_epochs", "1"]) == 0
        finally:
            torch.set_num_threads(threads)
    return out


def _run(main: Callable[[Sequence[str]], int], argv: Sequence[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run a script's main as its ``__main__`` block does; returns the exit status and stderr."""
    capsys.readouterr()
    code = run_main(lambda: main(argv))
    return code, capsys.readouterr().err


def _assert_one_line(err: str, *names: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(name in lines[0] for name in names), lines[0]
    assert "weights_only" not in lines[0]  # never advice to load unsafely
    return lines[0]


# ----------------------------------------------------------------------------------------------- train.py


@pytest.mark.parametrize("how", ["pretrained_weights", "continue", "validation"])
def test_hostile_checkpoints_never_run_in_train(how: str, results: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "payload-ran"
    fold = results / FOLD
    if how == "pretrained_weights":
        hostile = tmp_path / "downloaded" / "checkpoint_final.pth"
        argv = [*COMMON, "--num_epochs", "1", "-pretrained_weights", str(hostile)]
    elif how == "continue":
        hostile = fold / "checkpoint_latest.pth"
        argv = [*COMMON, "--num_epochs", "1", "--c"]
    else:
        hostile = fold / "checkpoint_final.pth"
        argv = [*COMMON, "--val"]
    before = _write_hostile(hostile, marker)
    func, args = _Payload(marker).__reduce__()
    func(*args)  # the payload works when called...
    assert marker.is_file()
    marker.unlink()

    code, err = _run(train.main, argv, capsys)

    assert not marker.exists(), "the checkpoint's payload ran"  # ...but loading the file never calls it
    assert code == 2
    line = _assert_one_line(err, str(hostile))
    assert "refused" in line or "can run code" in line
    assert hostile.read_bytes() == before
    # nothing was started: no trainer log, no new checkpoint beside the hostile file
    written = sorted(p.name for p in fold.iterdir()) if fold.exists() else []
    assert written == ([] if how == "pretrained_weights" else [hostile.name])


def test_hostile_pretrained_weights_through_the_real_entry_point(results: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    hostile = tmp_path / "checkpoint_final.pth"
    _write_hostile(hostile, marker)
    done = subprocess.run(
        [sys.executable, "MaM/train.py", *COMMON, "-pretrained_weights", str(hostile)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert not marker.exists()
    assert done.returncode == 2
    assert _assert_one_line(done.stderr, str(hostile)).startswith("train.py: error: ")
    assert not results.exists()


def test_damaged_and_foreign_checkpoints_are_one_line_errors_in_train(results: Path, tmp_path: Path, capsys) -> None:
    fold = results / FOLD
    truncated = fold / "checkpoint_latest.pth"
    write_nnunet_checkpoint(truncated)
    truncated.write_bytes(truncated.read_bytes()[:4096])
    code, err = _run(train.main, [*COMMON, "--num_epochs", "1", "--c"], capsys)
    assert code == 2
    _assert_one_line(err, str(truncated))
    assert sorted(p.name for p in fold.iterdir()) == ["checkpoint_latest.pth"]
    # a checkpoint of this project's own format is not nnU-Net's: named, with what to give instead
    ours = tmp_path / "ours.pth"
    model = build_method("mam", "tiny")
    save_checkpoint(ours, model, method="mam", config=config_dict(model))
    code, err = _run(train.main, [*COMMON, "--num_epochs", "1", "-pretrained_weights", str(ours)], capsys)
    assert code == 2
    assert "network_weights" in _assert_one_line(err, str(ours))
    # --val before the training has finished: the missing file is named
    shutil.rmtree(fold)
    code, err = _run(train.main, [*COMMON, "--val"], capsys)
    assert code == 2
    _assert_one_line(err, "checkpoint_final.pth")


def test_pretrained_weights_that_do_not_fit_are_named(results: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "other" / "checkpoint_final.pth"
    write_nnunet_checkpoint(source)
    ckpt = load_nnunet_checkpoint(source)
    weights = ckpt["network_weights"]
    dropped = next(k for k in weights if ".seg_layers." not in k)
    del weights[dropped]
    torch.save(ckpt, source)
    code, err = _run(train.main, [*COMMON, "--num_epochs", "1", "-pretrained_weights", str(source)], capsys)
    assert code == 2
    _assert_one_line(err, str(source), dropped)


# ----------------------------------------------------------------------------------------------- real checkpoints


def test_real_checkpoint_resumes_and_validates(trained: Path, results: Path, capsys) -> None:
    shutil.copytree(trained, results)
    fold = results / FOLD
    first = load_nnunet_checkpoint(fold / "checkpoint_final.pth")
    assert first["current_epoch"] == 1 and first["trainer_name"] == TRAINER
    code, err = _run(train.main, [*COMMON, "--num_epochs", "2", "--c"], capsys)  # resume: one more epoch
    assert code == 0, err
    second = load_nnunet_checkpoint(fold / "checkpoint_final.pth")
    assert second["current_epoch"] == 2 and len(second["logging"]["train_losses"]) == 2
    assert second["logging"]["train_losses"][0] == first["logging"]["train_losses"][0]  # the log was carried over
    key = "decoder.transpconvs.0.weight"  # always on the gradient path
    assert not torch.equal(first["network_weights"][key], second["network_weights"][key])
    shutil.rmtree(fold / "validation")
    code, err = _run(train.main, [*COMMON, "--val", "--val_best"], capsys)
    assert code == 0, err
    assert (fold / "validation" / "summary.json").is_file()
    assert load_nnunet_checkpoint(fold / "checkpoint_final.pth")["current_epoch"] == 2  # --val writes no checkpoint


def test_checkpoints_are_saved_atomically_and_killed_saves_are_cleaned(
    trained: Path, results: Path, monkeypatch, capsys
) -> None:
    # nnU-Net writes checkpoint_*.pth in place; the trainer has it write a temporary file that is renamed when
    # complete, so a save that fails half-way (or is killed) leaves the previous checkpoint intact
    import subprocess
    import sys

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from brats_core.utils.io import _HOST, TMP_MARKER

    shutil.copytree(trained, results)
    fold = results / FOLD
    final = fold / "checkpoint_final.pth"
    before = final.read_bytes()

    def half_written(self: Any, filename: str) -> None:
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError("disk went away")

    trainer = nnUNetTrainerMissingReconBaseline.__new__(nnUNetTrainerMissingReconBaseline)  # no state needed
    trainer.local_rank, trainer.disable_checkpointing = 0, False
    with monkeypatch.context() as patch, pytest.raises(OSError, match="disk went away"):
        patch.setattr(nnUNetTrainer, "save_checkpoint", half_written)
        trainer.save_checkpoint(str(final))
    assert final.read_bytes() == before and not [p for p in fold.iterdir() if TMP_MARKER in p.name]
    # the temporary file of a run killed while saving is removed by the next run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = fold / f".checkpoint_latest.pth{TMP_MARKER}{_HOST}-{int(dead.stdout)}-0123abcd.pth"
    leftover.write_bytes(b"x")
    code, err = _run(train.main, [*COMMON, "--val"], capsys)
    assert code == 0, err
    assert not leftover.exists() and final.read_bytes() == before


def test_real_checkpoint_initialises_a_new_training(trained: Path, results: Path, monkeypatch, capsys) -> None:
    source = trained / FOLD / "checkpoint_final.pth"
    seen: dict[str, torch.Tensor] = {}

    def capture(self: nnUNetTrainerMissingReconBaseline, *args: Any) -> None:
        seen.update({k: v.detach().clone() for k, v in self.network.state_dict().items()})

    # what the training starts from, without training or validating
    monkeypatch.setattr(nnUNetTrainerMissingReconBaseline, "run_training", capture)
    monkeypatch.setattr(nnUNetTrainerMissingReconBaseline, "perform_actual_validation", lambda self, *a: None)
    code, err = _run(train.main, [*COMMON, "--num_epochs", "1", "-pretrained_weights", str(source)], capsys)
    assert code == 0, err
    weights = load_nnunet_checkpoint(source)["network_weights"]
    transferred = [k for k in seen if ".seg_layers." not in k]
    assert transferred and all(torch.equal(seen[k], weights[k]) for k in transferred)
    # nnU-Net's rule: the segmentation heads are not transferred (they are freshly initialised)
    heads = [k for k in seen if ".seg_layers." in k and k.endswith("weight")]
    assert heads and not all(torch.equal(seen[k], weights[k]) for k in heads)


# ----------------------------------------------------------------------------------------------- test.py


@pytest.mark.parametrize("kind", ["empty", "truncated", "ours", "text", "hostile"])
def test_bad_checkpoints_are_one_line_errors_in_test(kind: str, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "fold_0" / "checkpoint_final.pth"
    marker = tmp_path / "payload-ran"
    if kind == "empty":
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
    elif kind == "truncated":
        write_nnunet_checkpoint(ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:4096])
    elif kind == "ours":
        ckpt.parent.mkdir(parents=True)
        model = build_method("mam", "tiny")
        save_checkpoint(ckpt, model, method="mam", config=config_dict(model))
    elif kind == "text":
        ckpt.parent.mkdir(parents=True)
        ckpt.write_text("not a checkpoint\n")
    else:
        _write_hostile(ckpt, marker)
    before = ckpt.read_bytes()
    out = tmp_path / "out"
    code, err = _run(test.main, ["-o", str(out), "--checkpoint-path", str(ckpt), "-device", "cpu"], capsys)
    assert code == 2
    _assert_one_line(err, str(ckpt))
    assert not marker.exists() and ckpt.read_bytes() == before
    assert not out.exists()
