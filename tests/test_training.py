"""The training engine (Trainer): upstream epoch semantics, poly LR, validation/best checkpoint, exact resume,
per-iteration schedules and checkpoints, resources closed on failure; checkpoints round trip."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from toy import ToyModel, write_preprocessed

from brats_core.data.dataset import TrainDataset
from brats_core.data.transforms import rfnet_augmentation
from brats_core.engine.training import FitConfig, PolyLR, Trainer, seed_everything
from brats_core.registry import RUNTIME_FIELD
from brats_core.utils import checkpoint as C
from brats_core.utils.cli import UsageError, run_main, setup_logging


def _loss(model, batch, epoch):
    probs = model(batch["image"], batch["mask"])
    loss = F.nll_loss(torch.log(probs.clamp_min(1e-6)), batch["label"].clamp_min(0))
    return loss, {"nll": float(loss.detach())}


def _train(model, train_set, loss_fn, optimizer, config, scheduler=None, validate=None):
    return Trainer(model, loss_fn, optimizer, config, scheduler, validate).run_training(train_set)


def _run(tmp_path, name, cases, root, **kw):
    seed_everything(7)
    model = ToyModel()
    opt = torch.optim.RAdam(model.parameters(), lr=1e-2, weight_decay=3e-5)
    sched = PolyLR(opt, num_epochs=3)
    calls = []

    def validate(m, epoch):
        calls.append(epoch)
        return {"mean_dice": [0.2, 0.5, 0.4][epoch]}

    cfg = FitConfig(
        savepath=tmp_path / name,
        num_epochs=3,
        batch_size=2,
        iter_per_epoch=3,
        seed=11,
        val_epochs={1, 2, 3},
        progress=False,
        extra={"method": "toy"},
        **kw,
    )
    ds = TrainDataset(root, cases, rfnet_augmentation(16))
    result = _train(model, ds, _loss, opt, cfg, scheduler=sched, validate=validate)
    return model, opt, result, calls


def test_poly_lr_matches_upstream_formula():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = PolyLR(opt, num_epochs=1000)
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 2e-4
    for e in (1, 17, 500, 999):
        assert lrs[e] == round(2e-4 * (1 - e / 1000) ** 0.9, 8)


def test_fit_epoch_semantics_validation_and_best(tmp_path):
    root = tmp_path / "data"
    cases = write_preprocessed(root, n=4)
    _, opt, result, calls = _run(tmp_path, "a", cases, root)
    assert result.global_step == 9 and result.next_epoch == 3
    assert calls == [0, 1, 2] and math.isclose(result.best_score, 0.5)
    last = C.load_checkpoint(tmp_path / "a" / "model_last.pth")
    best = C.load_checkpoint(tmp_path / "a" / "best.pth")
    assert last["epoch"] == 2 and last["next_epoch"] == 3 and last["method"] == "toy"
    assert best["epoch"] == 1 and math.isclose(best["best_score"], 0.5)
    assert opt.param_groups[0]["lr"] == 0.0  # poly reached (1 − 3/3)
    assert (tmp_path / "a" / "train.log").read_text().count("epoch") == 3
    assert list((tmp_path / "a" / "tensorboard").iterdir())
    # without iter_per_epoch an epoch is N_train optimiser steps (upstream's MultiEpochsDataLoader semantics)
    seed_everything(0)
    m = ToyModel()
    cfg = FitConfig(savepath=tmp_path / "b", num_epochs=1, batch_size=2, progress=False)
    r = _train(m, TrainDataset(root, cases, rfnet_augmentation(16)), _loss, torch.optim.SGD(m.parameters(), 0.1), cfg)
    assert r.global_step == len(cases)


@pytest.mark.parametrize("stop_at", [4, 6])  # mid-epoch and at an epoch boundary
def test_resume_reproduces_an_uninterrupted_run(tmp_path, stop_at):
    root = tmp_path / "data"
    cases = write_preprocessed(root, n=4)
    full, full_opt, _, _ = _run(tmp_path, "full", cases, root)
    _run(tmp_path, "part", cases, root, max_steps=stop_at)
    ckpt = C.load_checkpoint(tmp_path / "part" / "model_last.pth")
    assert ckpt["global_step"] == stop_at
    # resume in a "new process": different global RNG state before training
    torch.manual_seed(12345)
    resumed, res_opt, result, _ = _run(tmp_path, "part", cases, root, resume=tmp_path / "part" / "model_last.pth")
    assert result.global_step == 9
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert res_opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"]


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = ToyModel()
    C.save_checkpoint(tmp_path / "m.pth", model, method="toy", config={"patch_size": 16}, epoch=3, rng=C.rng_state())
    raw = torch.load(tmp_path / "m.pth", weights_only=True)  # no pickled code
    assert raw["format"] == C.FORMAT
    ckpt = C.load_checkpoint(tmp_path / "m.pth")
    other = ToyModel()
    C.load_state_dict_strict(other, ckpt["state_dict"])
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    C.set_rng_state(ckpt["rng"])
    # safetensors export keeps weights and metadata
    C.export_safetensors(tmp_path / "m.pth", tmp_path / "m.safetensors")
    st = C.load_checkpoint(tmp_path / "m.safetensors")
    assert st["method"] == "toy" and st["config"] == {"patch_size": 16}
    assert torch.equal(st["state_dict"]["head.weight"], model.head.weight)


def test_upstream_dataparallel_checkpoint_and_mismatch_errors(tmp_path):
    model = ToyModel()
    upstream = {
        "epoch": 9,
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optim_dict": {},
        "val_Dice_best": 0.8,
    }
    torch.save(upstream, tmp_path / "up.pth")
    ckpt = C.load_checkpoint(tmp_path / "up.pth")
    assert ckpt["best_score"] == 0.8 and "optimizer" in ckpt and ckpt["format"] == "upstream"
    C.load_state_dict_strict(ToyModel(), ckpt["state_dict"])
    bad = dict(ckpt["state_dict"])
    bad.pop("enc.bias")
    bad["extra.weight"] = torch.zeros(1)
    bad["head.weight"] = torch.zeros(4, 8, 1, 1, 1)
    with pytest.raises(C.StateDictMismatchError) as err:
        C.load_state_dict_strict(ToyModel(), bad, "up.pth")
    text = str(err.value)
    assert "missing keys (1)" in text and "enc.bias" in text and "extra.weight" in text
    assert "head.weight: checkpoint (4, 8, 1, 1, 1) vs model (4, 8, 3, 3, 3)" in text
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pth"):
        C.load_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        C.load_checkpoint(tmp_path / "nope.pth")


def test_compile_wraps_the_training_forward_and_checkpoints_stay_bare(tmp_path, monkeypatch):
    root = tmp_path / "data"
    cases = write_preprocessed(root, n=2)
    compiled = []

    class Wrapped(torch.nn.Module):  # stands in for torch.compile's OptimizedModule (a real compile is slow)
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner
            self.calls = 0

        def forward(self, *args):
            self.calls += 1
            return self._orig_mod(*args)

    def fake_compile(module):
        compiled.append(Wrapped(module))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, _, result, _ = _run(tmp_path, "c", cases, root, compile=True)
    assert len(compiled) == 1 and compiled[0]._orig_mod is model and compiled[0].calls == result.global_step == 9
    saved = C.load_checkpoint(tmp_path / "c" / "model_last.pth")["state_dict"]
    assert set(saved) == set(model.state_dict())  # no _orig_mod. prefix


def _poly(lr0: float, e: int, num_epochs: int) -> float:
    return round(lr0 * (1 - e / num_epochs) ** 0.9, 8)


def _fit_recording_lr(tmp_path, cases, root, model, num_epochs, schedule=PolyLR, **kw):
    """Training with a poly (or ``schedule(opt, num_epochs)``) schedule, one step per epoch; the lr of every step."""
    opt = torch.optim.RAdam(model.parameters(), lr=1e-2)
    lrs = []

    def loss(m, batch, epoch):
        lrs.append(opt.param_groups[0]["lr"])
        return _loss(m, batch, epoch)

    cfg = FitConfig(
        savepath=tmp_path / "run", num_epochs=num_epochs, batch_size=2, iter_per_epoch=1, seed=3, progress=False, **kw
    )
    _train(
        model, TrainDataset(root, cases, rfnet_augmentation(16)), loss, opt, cfg, scheduler=schedule(opt, num_epochs)
    )
    return lrs


def test_resume_from_an_upstream_checkpoint_continues_the_poly_schedule(tmp_path):
    root = tmp_path / "data"
    cases = write_preprocessed(root, n=2)
    model = ToyModel()
    opt = torch.optim.RAdam(model.parameters(), lr=1e-2)
    for group in opt.param_groups:
        group["lr"] = _poly(1e-2, 1, 5)  # upstream sets the rate at the start of each epoch; epoch 1 was the last
    torch.save(
        {
            "epoch": 1,
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optim_dict": opt.state_dict(),
        },
        tmp_path / "up.pth",
    )
    lrs = _fit_recording_lr(tmp_path, cases, root, ToyModel(), 5, resume=tmp_path / "up.pth")
    assert lrs == [_poly(1e-2, e, 5) for e in (2, 3, 4)]


def test_resume_without_scheduler_state_replays_a_recursive_cosine_schedule(tmp_path):
    """A cosine schedule is recursive in the current rate: the replay must start from the initial rate."""
    root = tmp_path / "data"
    cases = write_preprocessed(root, n=2)

    def cosine(opt, _):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=1e-4)

    seed_everything(0)
    full = _fit_recording_lr(tmp_path / "full", cases, root, ToyModel(), 4, schedule=cosine)
    model, opt = ToyModel(), torch.optim.RAdam(ToyModel().parameters(), lr=1e-2)
    for group in opt.param_groups:
        group["lr"] = full[2]  # the rate upstream's optimiser state holds after epoch 1
    torch.save({"epoch": 1, "state_dict": model.state_dict(), "optim_dict": opt.state_dict()}, tmp_path / "up.pth")
    resumed = _fit_recording_lr(
        tmp_path / "up", cases, root, ToyModel(), 4, schedule=cosine, resume=tmp_path / "up.pth"
    )
    assert resumed == pytest.approx(full[2:], rel=1e-12)


def test_resume_with_more_epochs_follows_the_new_schedule(tmp_path):
    root = tmp_path / "data"
    cases = write_preprocessed(root, n=2)
    seed_everything(0)
    assert _fit_recording_lr(tmp_path, cases, root, ToyModel(), 2) == [1e-2, _poly(1e-2, 1, 2)]
    lrs = _fit_recording_lr(tmp_path, cases, root, ToyModel(), 4, resume=tmp_path / "run" / "model_last.pth")
    assert lrs == [_poly(1e-2, 2, 4), _poly(1e-2, 3, 4)]  # not lr 0 from the saved 2-epoch schedule


@dataclasses.dataclass
class _ToyArch:
    patch_size: int = 16
    interleaved: bool = False  # an architecture flag without parameters: the strict weight load cannot catch it
    backend: str = dataclasses.field(default="auto", metadata=RUNTIME_FIELD)


class _ConfiguredToy(ToyModel):
    def __init__(self, **config):
        super().__init__()
        self.config = _ToyArch(**config)


def test_resume_refuses_another_architecture(tmp_path):
    root = tmp_path / "data"
    cases = write_preprocessed(root, n=2)
    seed_everything(0)
    model = _ConfiguredToy(interleaved=True)
    extra = {"config": dataclasses.asdict(model.config)}
    _fit_recording_lr(tmp_path, cases, root, model, 2, max_steps=1, extra=extra)
    last = tmp_path / "run" / "model_last.pth"
    with pytest.raises(ValueError, match=r"model_last\.pth: .*interleaved: True in the checkpoint, False now"):
        _fit_recording_lr(tmp_path, cases, root, _ConfiguredToy(), 2, resume=last)
    # a runtime field (a kernel backend) may change between sessions of one run
    assert (
        len(
            _fit_recording_lr(
                tmp_path, cases, root, _ConfiguredToy(interleaved=True, backend="chunked"), 2, resume=last
            )
        )
        == 1
    )


def _ddp_plateau_worker(rank: int, root: str, cases: list[str], save: str, port: int) -> None:
    """One of two gloo processes: training with a plateau scheduler whose scores only rank 0 computes."""
    import os

    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": "0"}
    )
    torch.set_num_threads(1)
    seed_everything(0)
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    cfg = FitConfig(
        savepath=save, num_epochs=3, batch_size=2, iter_per_epoch=1, val_epochs={1, 2, 3}, progress=False, device="cpu"
    )
    _train(
        model,
        TrainDataset(root, cases, rfnet_augmentation(16)),
        _loss,
        opt,
        cfg,
        scheduler,
        lambda m, e: {"val_loss": 1.0},
    )
    torch.save(opt.param_groups[0]["lr"], f"{save}/lr_rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_ranks_step_the_plateau_scheduler_with_rank0_scores(tmp_path):
    """Validation runs on rank 0 only; its scores reach every rank, so the learning rates stay equal."""
    import socket

    root = tmp_path / "data"
    cases = write_preprocessed(root, n=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_plateau_worker, args=(str(root), cases, str(tmp_path), port), nprocs=2)
    lrs = [torch.load(tmp_path / f"lr_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert lrs == [0.025, 0.025]  # no improvement after epochs 2 and 3: two halvings on both ranks


def test_unreadable_checkpoints_are_named_with_a_reason(tmp_path):
    (tmp_path / "garbage.pth").write_text("not a checkpoint")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"garbage\.pth \(not a PyTorch checkpoint, or truncated\): \w+"):
        C.load_checkpoint(tmp_path / "garbage.pth")
    with pytest.raises(RuntimeError, match=r"empty\.pth \(empty file\): EOFError"):
        C.load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        C.load_checkpoint(tmp_path / "missing.pth")


def test_a_new_run_never_replaces_another_runs_checkpoints(tmp_path):
    root = tmp_path / "data"
    cases = write_preprocessed(root, n=2)
    _run(tmp_path, "r", cases, root)
    run = tmp_path / "r"
    before = {p.name: p.read_bytes() for p in run.glob("*.pth")}
    assert set(before) == {"model_last.pth", "best.pth"}
    with pytest.raises(UsageError, match=r"already holds a training run \(best\.pth, model_last\.pth\).*--resume"):
        _run(tmp_path, "r", cases, root)
    # starting from another folder's checkpoint is a new run too (only the run's own checkpoints continue it)
    (tmp_path / "elsewhere.pth").write_bytes(before["model_last.pth"])
    with pytest.raises(UsageError, match="already holds a training run"):
        _run(tmp_path, "r", cases, root, resume=tmp_path / "elsewhere.pth")
    assert {p.name: p.read_bytes() for p in run.glob("*.pth")} == before  # untouched
    # another method's checkpoint is named as such, not as a list of mismatched keys
    with pytest.raises(UsageError, match=r"holds a 'toy' model, not 'other'"):
        _train(
            ToyModel(), TrainDataset(root, cases, rfnet_augmentation(16)), _loss,
            torch.optim.SGD(ToyModel().parameters(), lr=0.1),
            FitConfig(savepath=tmp_path / "o", num_epochs=1, progress=False, resume=run / "model_last.pth",
                      extra={"method": "other"}),
        )  # fmt: skip
    # --overwrite starts afresh: the old best.pth is deleted, not left beside a new run that has not validated yet
    (run / "tensorboard" / "stale").write_text("")
    _run(tmp_path, "r", cases, root, overwrite=True, max_steps=1)
    assert sorted(p.name for p in run.glob("*.pth")) == ["model_last.pth"]
    assert torch.load(run / "model_last.pth", weights_only=True)["global_step"] == 1
    assert not (run / "tensorboard" / "stale").exists()


def test_training_scripts_report_usage_errors_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr("sys.argv", ["train.py"])

    def main() -> int:
        setup_logging(tmp_path / "a_file")
        return 0

    assert run_main(main) == 2
    assert capsys.readouterr().err.strip() == f"train.py: error: {tmp_path / 'a_file'} exists and is not a folder: " \
        "choose another output folder"  # fmt: skip


def _constant_loss(values, lrs=None, opt=None):
    """A loss worth ``values[k]`` at its k-th call (zero gradient), so that logged means can be worked out by hand;
    records the learning rate of every step in ``lrs``."""
    it = iter(values)

    def loss(model, batch, epoch):
        if lrs is not None:
            lrs.append(opt.param_groups[0]["lr"])
        return model(batch["image"], batch["mask"]).sum() * 0 + next(it), {}

    return loss


def _trainer(tmp_path, loss, opt, model, cls=Trainer, scheduler=None, validate=None, **kw):
    cfg = FitConfig(**{"savepath": tmp_path / "run", "batch_size": 2, "seed": 5, "progress": False, **kw})
    return cls(model, loss, opt, cfg, scheduler, validate)


def test_epoch_loss_after_a_mid_epoch_resume_is_the_mean_of_the_steps_run(tmp_path):
    root = tmp_path / "data"
    ds = TrainDataset(root, write_preprocessed(root, n=2), rfnet_augmentation(16))
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _trainer(tmp_path, _constant_loss([1, 2, 3, 4]), opt, model, num_epochs=2, iter_per_epoch=3, max_steps=4) \
        .run_training(ds)  # fmt: skip
    resumed = _trainer(tmp_path, _constant_loss([5, 6]), opt, model, num_epochs=2, iter_per_epoch=3,
                       resume=tmp_path / "run" / "model_last.pth")  # fmt: skip
    assert resumed.run_training(ds).global_step == 6
    lines = [line.split(",")[0] for line in (tmp_path / "run" / "train.log").read_text().splitlines()]
    # epoch 1: (1 + 2 + 3) / 3; epoch 2 ran steps 5 and 6 after the resume: (5 + 6) / 2, not (5 + 6) / 3
    assert lines == ["epoch 1: loss 2.0000", "epoch 2: loss 5.5000"]


def test_writer_and_text_log_are_closed_when_a_step_raises(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    closed = []
    real_close = SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda self: closed.append(self) or real_close(self))
    root = tmp_path / "data"
    ds = TrainDataset(root, write_preprocessed(root, n=2), rfnet_augmentation(16))
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = _trainer(tmp_path, _constant_loss([1.0]), opt, model, num_epochs=1, iter_per_epoch=3)
    with pytest.raises(StopIteration):  # the loss has one value: the second step raises
        trainer.run_training(ds)
    assert trainer.global_step == 1
    assert closed == [trainer.writer] and trainer.text_log.closed


class _RecordingTrainer(Trainer):
    """Records ``(checkpoint name, global step)`` of every checkpoint written."""

    def save(self, name):
        self.saved = [*getattr(self, "saved", []), (name, self.global_step)]
        return super().save(name)


def test_per_iteration_schedule_validation_and_checkpoints(tmp_path):
    root = tmp_path / "data"
    ds = TrainDataset(root, write_preprocessed(root, n=2), rfnet_augmentation(16))
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lrs, scores = [], iter([0.3, 0.1])
    trainer = _trainer(
        tmp_path, _constant_loss(range(6), lrs, opt), opt, model, _RecordingTrainer,
        scheduler=PolyLR(opt, 6, decimals=None), validate=lambda m, epoch: {"mean_dice": next(scores)},
        num_epochs=2, iter_per_epoch=3, schedule_per="iteration", save_every=2, save_per="iteration",
        val_steps={3, 5},
    )  # fmt: skip
    trainer.run_training(ds)
    assert lrs == [1e-2 * (1 - i / 6) ** 0.9 for i in range(6)]  # one schedule over the 6 iterations
    # model_last.pth every 2 iterations and at each epoch's end; best.pth at step 3 (0.3), not at 5 (0.1)
    assert trainer.saved == [("model_last.pth", 2), ("best.pth", 3), ("model_last.pth", 3), ("model_last.pth", 4),
                             ("model_last.pth", 6), ("model_last.pth", 6)]  # fmt: skip
    assert C.load_checkpoint(tmp_path / "run" / "best.pth")["best_score"] == 0.3
    assert "validation at step 5: mean_dice 0.1000" in (tmp_path / "run" / "train.log").read_text()


def test_checkpoints_every_n_epochs_and_at_the_end(tmp_path):
    root = tmp_path / "data"
    ds = TrainDataset(root, write_preprocessed(root, n=2), rfnet_augmentation(16))
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = _trainer(tmp_path, _constant_loss(range(5)), opt, model, _RecordingTrainer, num_epochs=5,
                       iter_per_epoch=1, save_every=2)  # fmt: skip
    trainer.run_training(ds)
    assert trainer.saved == [("model_last.pth", 2), ("model_last.pth", 4), ("model_last.pth", 5)]
    with pytest.raises(ValueError, match="every N >= 1"):
        FitConfig(savepath=tmp_path, num_epochs=1, save_every=0)
    with pytest.raises(ValueError, match="'epoch' or 'iteration'"):
        FitConfig(savepath=tmp_path, num_epochs=1, schedule_per="step")


class _NamedToy(_ConfiguredToy):
    method_name = "toy"


def test_fit_config_from_the_shared_training_flags():
    from brats_core.utils.cli import args_dict
    from IMFuse.train_poly import build_parser

    args = build_parser().parse_args(
        "--datapath d --savepath s --num_epochs 5 --batch_size 2 --iter_per_epoch 7 --seed 3 --workers 1 --device cpu "
        "--max_steps 9 --resume r.pth --overwrite --no_progress --compile --amp".split()
    )
    model = _NamedToy(interleaved=True)
    config = FitConfig.from_args(args, model, val_epochs={5}, extra={"stage": "x"})
    assert config == FitConfig(
        savepath=Path("s"), num_epochs=5, batch_size=2, iter_per_epoch=7, seed=3, workers=1, device="cpu", amp=True,
        compile=True, max_steps=9, val_epochs={5}, resume="r.pth", overwrite=True, progress=False,
        extra={"method": "toy", "config": {"patch_size": 16, "interleaved": True, "backend": "auto"},
               "args": args_dict(args), "stage": "x"},
    )  # fmt: skip
    # names a script spells otherwise come as overrides; without a model nothing is recorded
    shaspec_like = argparse.Namespace(snapshot_dir="snap", batch_size=1, workers=0, device="cpu", amp=False)
    assert FitConfig.from_args(shaspec_like, savepath="snap", num_epochs=1) == FitConfig(
        savepath=Path("snap"), num_epochs=1, batch_size=1, workers=0, device="cpu"
    )


def test_grad_scaler_state_is_checkpointed_and_resumed(tmp_path, monkeypatch):
    """The fp16 path's loss scaler (CUDA only in real runs; an enabled CPU scaler stands in): it scales the backward,
    its state goes into the checkpoint and comes back on resume."""
    from brats_core.engine import training

    def scaler(device, enabled):  # doubles its scale after every finite step
        return torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)

    monkeypatch.setattr(training, "grad_scaler", scaler)
    root = tmp_path / "data"
    ds = TrainDataset(root, write_preprocessed(root, n=2), rfnet_augmentation(16))
    seed_everything(0)
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _trainer(tmp_path, _loss, opt, model, num_epochs=2, iter_per_epoch=2, max_steps=3).run_training(ds)
    assert C.load_checkpoint(tmp_path / "run" / "model_last.pth")["scaler"]["scale"] == 8.0 * 2**3
    resumed = _trainer(tmp_path, _loss, opt, model, num_epochs=2, iter_per_epoch=2,
                       resume=tmp_path / "run" / "model_last.pth")  # fmt: skip
    resumed.resume()
    assert resumed.scaler.get_scale() == 8.0 * 2**3
    resumed.run_training(ds)
    assert C.load_checkpoint(tmp_path / "run" / "model_last.pth")["scaler"]["scale"] == 8.0 * 2**4
