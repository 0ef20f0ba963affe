"""The plumbing shared by the method scripts: validation schedules and the common test-script flags."""

from __future__ import annotations

import pytest

from brats_core.apps.scripts import add_val_args, build_test_parser, select_val_epochs


def test_select_val_epochs():
    upstream = [5, 10, 20]
    assert select_val_epochs(upstream, 12) == [5, 10]
    assert select_val_epochs(upstream, 45) == [5, 10, 20, 30, 40]  # continued every 10 past upstream's end
    assert select_val_epochs(upstream, 4, debug=True) == [1, 2, 3, 4]
    assert select_val_epochs(upstream, 12, val_every=4) == [4, 8, 12]
    assert select_val_epochs([], 3) == []  # a run shorter than upstream's first validation


def test_val_flags_and_test_parser():
    p = build_test_parser("x", "y")
    add_val_args(p.add_argument_group("v"))
    args = p.parse_args(["--datapath", "d", "--resume", "r.pth", "--batch_size", "2", "--val_every", "3"])
    assert (args.savepath, args.batch_size, args.val_every, args.scenarios) == ("eval", 2, 3, "all")
    with pytest.raises(SystemExit):
        p.parse_args(["--datapath", "d", "--resume", "r.pth", "--val_every", "0"])


# ---------------------------------------------------------------------------------------------------------------------
# Every training script of the shared trainer takes one optimiser step in the default suite (the end-to-end
# train-then-test runs of each method are `slow`)


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    from brats_core.data import splits
    from brats_core.data.preprocessing import main as preprocess
    from brats_core.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("scripts")
    cases = write_synthetic_dataset(root / "raw", 3, shape=(36, 36, 34), seed=1)
    assert preprocess(["--input-path", str(root / "raw"), "--output-path", str(root / "pre"), "--patch_size", "32",
                       "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    splits.Split(cases[:2], [(cases[2], (True, True, False, True))], []).write(root / "pre" / "splits")
    return root / "pre"


@pytest.mark.parametrize(
    ("method", "script"),
    [
        ("imfuse", "IMFuse.train_poly"),
        ("mmformer", "mmFormer.train"),
        ("robustseg", "RobustSeg.train_robustseg"),
        ("sfusion", "SFusion.train_sfusion"),
        ("uhved", "UHVED.train_uhved"),
    ],
)
def test_training_script_takes_a_step(preprocessed, tmp_path, method, script):
    import importlib

    from brats_core.utils.checkpoint import load_checkpoint

    save = tmp_path / "run"
    argv = ["--datapath", str(preprocessed), "--dataname", "BRATS2023", "--savepath", str(save), "--preset", "tiny",
            "--num_epochs", "1", "--max_steps", "1", "--batch_size", "1", "--workers", "0", "--device", "cpu",
            "--no_progress"]  # fmt: skip
    assert importlib.import_module(script).main(argv) == 0
    ckpt = load_checkpoint(save / "model_last.pth")
    assert ckpt["method"] == method and ckpt["global_step"] == 1 and ckpt["config"]["patch_size"] == 32
    assert ckpt["optimizer"]["state"]  # the optimiser stepped


def test_test_script_finds_upstream_style_lists_and_reports_errors_in_one_line(preprocessed, tmp_path, capsys,
                                                                               monkeypatch):  # fmt: skip
    from functools import partial

    from brats_core.data import splits
    from brats_core.data.splits import read_case_list
    from brats_core.utils.cli import run_main
    from mmFormer import test, train

    save = tmp_path / "run"
    assert train.main(["--datapath", str(preprocessed), "--savepath", str(save), "--preset", "tiny", "--num_epochs",
                       "1", "--max_steps", "1", "--workers", "0", "--device", "cpu", "--no_progress"]) == 0  # fmt: skip
    case = read_case_list(preprocessed / "splits" / "train.txt")[0]
    splits.Split([], [], [(case, (True, True, True, True))]).write(tmp_path / "lists")
    common = ["--datapath", str(preprocessed), "--resume", str(save / "model_last.pth"), "--split_dir",
              str(tmp_path / "lists"), "--scenarios", "1", "--no_hd95", "--device", "cpu", "--no_progress"]  # fmt: skip
    # upstream's commands name the list by its place in their repository: found in --split_dir
    argv = [*common, "--savepath", str(tmp_path / "eval"), "--test_file", "datalist/test15splits.csv"]
    assert test.main(argv) == 0
    assert (tmp_path / "eval" / "summary.csv").is_file()
    # a list that is nowhere, and another method's checkpoint: one line each, exit status 2
    monkeypatch.setattr("sys.argv", ["test.py"])
    argv = [*common, "--savepath", str(tmp_path / "e2"), "--test_file", "nowhere.csv"]
    assert run_main(partial(test.main, argv)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the log lines
    assert last.startswith("test.py: error: test list not found (looked for nowhere.csv, ")
    argv = [*common, "--savepath", str(tmp_path / "e3"), "--resume", str(tmp_path / "absent.pth")]
    assert run_main(partial(test.main, argv)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("test.py: error: checkpoint not found: ") and "absent.pth" in last
    assert not (tmp_path / "e3").exists()  # refused before the output folder was made
