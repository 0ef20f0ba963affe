"""IMFuse/train_poly.py, IMFuse/train.py and IMFuse/test.py: upstream flags, upstream checkpoints, train then test."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from brats_core.data import splits
from brats_core.data.preprocessing import main as preprocess
from brats_core.data.synthetic import write_synthetic_dataset
from brats_core.registry import build_method
from brats_core.utils.checkpoint import load_checkpoint
from brats_core.utils.cli import run_main
from IMFuse import test as imfuse_test
from IMFuse import train as imfuse_train
from IMFuse import train_poly
from IMFuse.model import meta_model


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("imfuse")
    write_synthetic_dataset(root / "raw", 5, shape=(40, 40, 36), seed=3)
    assert (
        preprocess(
            [
                "--input-path",
                str(root / "raw"),
                "--output-path",
                str(root / "pre"),
                "--patch_size",
                "32",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    cases = sorted(p.name for p in (root / "raw").iterdir())
    split = splits.Split(cases[:3], [(cases[3], (True, False, True, False))], [(cases[4], (True, True, True, True))])
    split.write(root / "pre" / "splits")
    return root


def test_upstream_validation_epochs():
    epochs = train_poly.upstream_val_epochs(1000)
    assert epochs[:6] == [50, 100, 150, 200, 300, 400]
    assert [e for e in epochs if 800 <= e <= 960] == [800, 850, 900, 910, 920, 930, 940, 950, 955, 960]
    assert epochs[-1] == 1000 and 995 in epochs and 905 not in epochs


def test_upstream_readme_flags_parse():
    args = train_poly.build_parser().parse_args(
        "--datapath d --num_epochs 1000 --dataname BRATS2023 --savepath s --mamba_skip --interleaved_tokenization "
        "--batch_size 1 --lr 2e-4 --weight_decay 3e-5 --iter_per_epoch 150 --region_fusion_start_epoch 0 "
        "--seed 999 --debug --first_skip --resume r".split()
    )
    assert args.mamba_skip and args.interleaved_tokenization and args.first_skip and args.lr == 2e-4
    assert (
        not args.compile
        and train_poly.build_parser().parse_args(["--datapath", "d", "--savepath", "s", "--compile"]).compile
    )
    test_args = imfuse_test.build_parser().parse_args(
        "--datapath d --dataname BRATS2023 --savepath s --resume r --batch_size 2 --test_file t.csv "
        "--interleaved_tokenization --mamba_skip".split()
    )
    assert test_args.batch_size == 2 and test_args.test_file == "t.csv"


@pytest.mark.parametrize("first_skip", [False, True])
@pytest.mark.parametrize("mamba_skip", [False, True])
def test_architecture_inferred_from_upstream_weights(first_skip, mamba_skip):
    state = meta_model(first_skip=first_skip, mamba_skip=mamba_skip).state_dict()
    arch = imfuse_test.infer_architecture({f"module.{k}"[7:]: v for k, v in state.items()})
    assert arch == {
        "first_skip": first_skip,
        "mamba_skip": mamba_skip,
        "patch_size": 128,
        "transformer_dim": 512,
        "mlp_dim": 4096,
        "basic_dims": 8,
    }


def test_upstream_checkpoint_loads_and_evaluates(dataset, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_method("imfuse", "tiny", first_skip=True, mamba_skip=True)
    upstream = {
        "epoch": 4,
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optim_dict": {},
        "val_Dice_best": 0.5,
    }
    torch.save(upstream, tmp_path / "model_last.pth")
    # an upstream checkpoint carries no config: the script infers the architecture from the weights
    arch = imfuse_test.infer_architecture(model.state_dict())
    assert arch["first_skip"] and arch["mamba_skip"] and arch["patch_size"] == 32 and arch["basic_dims"] == 4
    out = tmp_path / "eval"
    assert (
        imfuse_test.main(
            [
                "--datapath",
                str(dataset / "pre"),
                "--resume",
                str(tmp_path / "model_last.pth"),
                "--savepath",
                str(out),
                "--scenarios",
                "flair,1111",
                "--device",
                "cpu",
                "--no_hd95",
                "--interleaved_tokenization",
                "--no_progress",
            ]
        )
        == 0
    )
    with (out / "summary.csv").open() as f:
        assert [r["scenario"] for r in csv.DictReader(f)] == ["flair", "flair+t1ce+t1+t2", "mean"]
    # another checkpoint into the same folder: a one-line usage error, not a table of mixed rows
    torch.manual_seed(1)
    other = build_method("imfuse", "tiny", first_skip=True, mamba_skip=True)
    torch.save({**upstream, "state_dict": other.state_dict()}, tmp_path / "other.pth")
    argv = ["--datapath", str(dataset / "pre"), "--resume", str(tmp_path / "other.pth"), "--savepath", str(out),
            "--scenarios", "flair", "--device", "cpu", "--no_hd95", "--no_progress"]  # fmt: skip
    capsys.readouterr()
    assert run_main(lambda: imfuse_test.main(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "already holds results of another evaluation" in err.strip().splitlines()[-1]


def test_older_train_script_cosine_schedule_without_first_skip(dataset, tmp_path, capsys):
    """Upstream's ``train.py``: lr 3e-4, CosineAnnealingLR(T_max=100, eta_min=5e-6) per epoch, no ``--first_skip``."""
    with pytest.raises(SystemExit):
        imfuse_train.main(["--datapath", "d", "--savepath", "s", "--first_skip"])
    assert "unrecognized arguments: --first_skip" in capsys.readouterr().err
    save = tmp_path / "run"
    argv = ["--datapath", str(dataset / "pre"), "--savepath", str(save), "-batch_size", "1", "--preset", "tiny",
            "--mamba_skip", "--num_epochs", "3", "--iter_per_epoch", "1", "--workers", "0", "--device", "cpu",
            "--no_progress"]  # fmt: skip
    assert imfuse_train.main(argv) == 0
    ckpt = load_checkpoint(save / "model_last.pth")
    assert ckpt["args"]["lr"] == 3e-4 and not ckpt["config"]["first_skip"] and ckpt["config"]["mamba_skip"]
    lr = ckpt["optimizer"]["param_groups"][0]["lr"]  # the rate the 4th epoch would use
    assert lr == pytest.approx(5e-6 + (3e-4 - 5e-6) * (1 + math.cos(math.pi * 3 / 100)) / 2, rel=1e-12)


@pytest.mark.slow
def test_train_two_steps_then_test_all_scenarios(dataset, tmp_path):
    pre = dataset / "pre"
    save = tmp_path / "run"
    assert (
        train_poly.main(
            [
                "--datapath",
                str(pre),
                "--dataname",
                "BRATS2023",
                "--savepath",
                str(save),
                "--mamba_skip",
                "--interleaved_tokenization",
                "--preset",
                "tiny",
                "--num_epochs",
                "1",
                "--max_steps",
                "2",
                "--batch_size",
                "1",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--no_progress",
            ]
        )
        == 0
    )
    ckpt = load_checkpoint(save / "model_last.pth")
    assert ckpt["method"] == "imfuse" and ckpt["config"]["mamba_skip"] and ckpt["global_step"] == 2
    assert ckpt["config"]["interleaved_tokenization"] and not ckpt["config"]["first_skip"]
    out = tmp_path / "test"
    # the upstream README's test command (with its --batch_size) on the checkpoint the README's training wrote
    assert (
        imfuse_test.main(
            [
                "--datapath",
                str(pre),
                "--dataname",
                "BRATS2023",
                "--savepath",
                str(out),
                "--resume",
                str(save / "model_last.pth"),
                "--batch_size",
                "2",
                "--mamba_skip",
                "--interleaved_tokenization",
                "--device",
                "cpu",
                "--no_progress",
            ]
        )
        == 0
    )
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and rows[-1]["scenario"] == "mean"
    with (out / "per_case_all.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 15


@pytest.mark.slow
def test_torchrun_ddp_on_cpu(dataset, tmp_path):
    """Two processes (gloo): one step each on half the batch, one checkpoint written by rank 0."""
    import subprocess
    import sys
    from pathlib import Path

    save = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "IMFuse/train_poly.py", "--datapath", str(dataset / "pre"), "--savepath", str(save), "--preset", "tiny",
           "--mamba_skip", "--num_epochs", "1", "--iter_per_epoch", "2", "--batch_size", "2", "--workers", "0",
           "--device", "cpu", "--no_progress"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    ckpt = load_checkpoint(save / "model_last.pth")
    assert ckpt["global_step"] == 2 and ckpt["next_epoch"] == 1
    assert (save / "train.txt").read_text().count("training imfuse") == 1  # rank 0 logs alone
