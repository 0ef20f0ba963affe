"""The training engine shared by all methods: :class:`Trainer`, configured by :class:`FitConfig`.

``Trainer.run_training`` is a short loop over hooks in the style of nnU-Net's ``nnUNetTrainer`` (``on_train_start``,
``on_epoch_start``, ``train_step``, ``on_step_end``, ``on_epoch_end``, ``on_train_end``): a method with its own
rules (ShaSpec's iteration-based snapshots) overrides hooks, never the loop. Upstream semantics by default: one
epoch = N_train optimiser steps of ``batch_size`` samples (``--iter_per_epoch`` overrides), the learning rate set
per epoch by a scheduler (poly for the RFNet family) or per iteration (ShaSpec), ``model_last.pth`` written every N
epochs or iterations and ``best.pth`` when the validation score improves. Added: AMP on CUDA, DDP through
``torchrun``, TensorBoard scalars, a progress bar (without it, progress lines with the time left), ``--max_steps``
for smoke runs, and resume that reproduces an uninterrupted run exactly on CPU (every sample is a function of (seed,
epoch, position); model, optimiser, scheduler, scaler and RNG states are checkpointed, also mid-epoch). Every input
is checked before the output folder is made, so a refused run leaves nothing behind; the TensorBoard writer and the
text log are closed on every exit, a failing step included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from brats_core.data.dataset import EpochSampler, check_finite, seed_worker, volume_path
from brats_core.registry import config_dict, config_mismatch
from brats_core.utils.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_strict,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from brats_core.utils.cli import UsageError, args_dict
from brats_core.utils.device import amp_context, grad_scaler, resolve_device
from brats_core.utils.io import load_npy, remove_stale_temporaries

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Mapping[str, Any], int], tuple[torch.Tensor, Mapping[str, float]]]
"""``loss_fn(model, batch, epoch) -> (loss, scalars to log)``; the batch tensors are already on the device."""

ValidateFn = Callable[[nn.Module, int], Mapping[str, float]]
"""``validate(model, epoch) -> scores`` on the unwrapped model in eval mode."""


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, numpy and torch (CPU and CUDA); deterministic cuDNN as upstream."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def poly_lr(base_lr: float, step: int, total: int, power: float = 0.9) -> float:
    """``base_lr·(1 − i/total)^power`` with ``i = step`` clamped to ``[0, total]``: 0 from ``total`` on (ShaSpec's
    upstream raised a negative number to 0.9 there and got a complex learning rate).

    Raises:
        ValueError: ``total`` is not positive.
    """
    if total <= 0:
        raise ValueError(f"the poly schedule needs a positive length, got {total}")
    i = min(max(step, 0), total)
    return base_lr * (1.0 - i / total) ** power


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """Upstream's poly schedule ``lr_e = round(lr0 · (1 − e/E)^0.9, 8)``, stepped once per epoch; with
    ``decimals=None`` and stepped per iteration it is ShaSpec's unrounded per-iteration schedule."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_epochs: int,
        power: float = 0.9,
        last_epoch: int = -1,
        decimals: int | None = 8,
    ) -> None:
        self.num_epochs, self.power, self.decimals = num_epochs, power, decimals
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        rates = [poly_lr(base, self.last_epoch, self.num_epochs, self.power) for base in self.base_lrs]
        return rates if self.decimals is None else [round(r, self.decimals) for r in rates]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position only: upstream recomputes the rate from ``--lr`` and ``--num_epochs`` every epoch,
        so a resumed run that changes ``--num_epochs`` (e.g. extends 1000 to 1200) follows the new schedule instead
        of the saved one (which would train every extra epoch at lr 0)."""
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


Unit = Literal["epoch", "iteration"]

_ARG_FIELDS = (
    "savepath", "num_epochs", "batch_size", "iter_per_epoch", "seed", "workers", "device", "amp", "compile",
    "max_steps", "resume", "overwrite",
)  # fmt: skip
"""``FitConfig`` fields that the shared flags (``apps.arguments.add_train_args``, ``add_runtime_args``) set by name."""


@dataclass
class FitConfig:
    """How :class:`Trainer` runs, beyond the model, data, loss and optimiser.

    ``val_epochs`` are 1-based epoch numbers after which ``validate`` runs (upstream's convention), ``val_steps``
    1-based global steps (iteration-based runs such as ShaSpec's). ``schedule_per`` says when the scheduler steps;
    ``model_last.pth`` is written every ``save_every`` epochs or iterations (``save_per``) and whenever the run
    stops. An iteration-based run is one epoch of ``iter_per_epoch`` iterations.
    """

    savepath: Path
    num_epochs: int
    batch_size: int = 1
    iter_per_epoch: int | None = None
    seed: int = 999
    workers: int = 0
    device: str = "auto"
    amp: bool = False
    compile: bool = False  # torch.compile the training forward (the Mamba scans stay eager)
    max_steps: int | None = None
    val_epochs: Collection[int] = ()
    val_steps: Collection[int] = ()
    best_key: str = "mean_dice"
    resume: str | Path | None = None
    restore_rng: bool = True  # False: a run started from another run's checkpoint draws its own random numbers
    overwrite: bool = False  # start afresh in a savepath that holds a run (see claim_run_folder)
    schedule_per: Unit = "epoch"
    save_every: int = 1
    save_per: Unit = "epoch"
    log_every: int = 10  # TensorBoard scalars every this many steps
    progress: bool = True
    progress_seconds: float = 30.0  # without the bar: a progress line after the first step, then this often
    extra: dict[str, Any] = field(default_factory=dict)  # stored in every checkpoint: method, config, args

    def __post_init__(self) -> None:
        for name in ("schedule_per", "save_per"):
            if getattr(self, name) not in ("epoch", "iteration"):
                raise ValueError(f"FitConfig.{name} must be 'epoch' or 'iteration', got {getattr(self, name)!r}")
        if self.save_every < 1:
            raise ValueError(f"checkpoints must be written every N >= 1 {self.save_per}s, got {self.save_every}")

    @classmethod
    def from_args(
        cls,
        args: argparse.Namespace,
        model: nn.Module | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> FitConfig:
        """The run's settings from parsed arguments: the shared training and runtime flags where ``args`` has them
        (``--savepath --num_epochs --batch_size --iter_per_epoch --seed --workers --device --amp --compile
        --max_steps --resume --overwrite --no_progress``), then ``overrides`` (fields a script names otherwise, e.g.
        ShaSpec's ``--snapshot_dir``). With ``model``, every checkpoint records its method, resolved config and the
        arguments, plus ``extra``."""
        values: dict[str, Any] = {name: getattr(args, name) for name in _ARG_FIELDS if hasattr(args, name)}
        if hasattr(args, "no_progress"):
            values["progress"] = not args.no_progress
        if model is not None:
            method = getattr(model, "method_name", "")
            values["extra"] = {"method": method, "config": config_dict(model), "args": args_dict(args), **(extra or {})}
        values.update(overrides)
        values["savepath"] = Path(values["savepath"])
        return cls(**values)


@dataclass
class FitResult:
    global_step: int
    next_epoch: int
    best_score: float
    last_checkpoint: Path


RUN_CHECKPOINTS = ("model_last.pth", "best.pth", "model_1model_best_*.pth")
"""Checkpoints a training run writes into its savepath (the last is M3AE pre-training's per-epoch snapshot)."""


def claim_run_folder(
    savepath: Path,
    resume: str | Path | None,
    overwrite: bool,
    delete: bool = True,
    checkpoints: tuple[str, ...] = RUN_CHECKPOINTS,
    continue_with: str = "--resume {savepath}/model_last.pth",
) -> None:
    """Refuse to start a new run over another run's checkpoints, which its first epoch would replace.

    Continuing the run (``resume`` is one of ``savepath``'s own checkpoints) is fine; a run started from another
    folder's checkpoint (an upstream one, ShaSpec's warm-up) is a new run. ``overwrite`` deletes the old run's
    ``checkpoints`` (glob patterns) and TensorBoard logs first (``delete``: on this process; the main one under DDP).

    Raises:
        UsageError: ``savepath`` holds checkpoints of a run that is not being continued and ``overwrite`` is not
            given; the message suggests ``continue_with``.
    """
    found = sorted(p for pattern in checkpoints for p in savepath.glob(pattern) if p.is_file())
    continuing = resume is not None and Path(resume).resolve().parent == savepath.resolve()
    if continuing or not found:
        return
    names = ", ".join(p.name for p in found)
    if not overwrite:
        raise UsageError(
            f"{savepath} already holds a training run ({names}): continue it with "
            f"{continue_with.format(savepath=savepath)}, or start afresh with --overwrite (deletes its checkpoints)"
        )
    if delete:
        for path in found:
            path.unlink()
        shutil.rmtree(savepath / "tensorboard", ignore_errors=True)
        log.warning("--overwrite: deleted the previous run's %s and TensorBoard logs in %s", names, savepath)


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _resume_scheduler(scheduler: Any, state: Mapping[str, Any] | None, position: int) -> None:
    """Put ``scheduler`` at ``position`` (the next epoch, or the global step of a per-iteration schedule): from its
    saved state, or, for checkpoints without one (upstream's), at once for the closed-form poly schedule and by
    stepping it ``position`` times as the interrupted run did for the others."""
    if state is not None:
        span = getattr(scheduler, "T_max", None)
        scheduler.load_state_dict(state)
        if span is not None and scheduler.T_max != span:
            log.warning(
                "the checkpoint's cosine schedule spans %d epochs, this run %d: continuing the saved schedule (as "
                "upstream; past its end the rate rises again)", scheduler.T_max, span,
            )  # fmt: skip
    elif isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        log.warning("the checkpoint has no scheduler state: the plateau scheduler starts afresh")
    elif isinstance(scheduler, PolyLR):
        scheduler.load_state_dict({"last_epoch": position})
    else:
        # replay from the initial rates: recursive schedules (cosine) would otherwise decay the restored rate again
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            for _ in range(position):
                scheduler.step()


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], path: str | Path) -> None:
    """``optimizer.load_state_dict`` for a resumed run; state of another optimiser or parameter layout is refused
    in one line naming the checkpoint (torch raises a bare ``ValueError``/``KeyError``)."""
    try:
        optimizer.load_state_dict(state)  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path}: its optimiser state does not fit this run's optimiser ({type(err).__name__}: {err}); resume "
            "with the flags the run was started with"
        ) from err


def _check_same_architecture(model: nn.Module, saved: Mapping[str, Any] | None, path: str | Path) -> None:
    """Refuse to resume a run with another architecture than the checkpoint's (flags without parameters, such as
    IM-Fuse's ``--interleaved_tokenization``, would otherwise pass the strict state-dict load silently)."""
    if saved is None or not dataclasses.is_dataclass(getattr(model, "config", None)):
        return
    diff = config_mismatch(model, saved)  # type: ignore[arg-type]
    if diff:
        raise UsageError(
            f"{path}: the checkpoint was trained with another architecture ({'; '.join(diff)}); resume with the "
            "checkpoint's flags, or start a new run"
        )


def check_step_finite(loss: torch.Tensor, batch: Mapping[str, Any], root: str | Path | None, where: str) -> None:
    """Stop at a non-finite loss, naming its cause: a volume holding NaN or infinite values, or a diverged run.

    The input check rides on the loss check's one synchronisation per step; files are read only after a failure.

    Args:
        loss: the step's scalar loss.
        batch: with ``image`` ``(B, ...)`` as the model got it and ``name`` (the B case ids).
        root: the preprocessed folder of the batch's cases (None: not known).
        where: the step, for the message (``epoch 3, step 7``).

    Raises:
        NpyError: a case's volume file holds non-finite values (named; one line through ``cli.run_main``).
        FloatingPointError: otherwise (the run diverged, or non-finite values came from elsewhere).
    """
    image = batch["image"]
    if bool(torch.isfinite(loss) & torch.isfinite(image).all()):
        return
    names = list(batch.get("name") or [])
    finite = torch.isfinite(image.flatten(1)).all(1).tolist()
    bad = [name for name, ok in zip(names, finite, strict=False) if not ok]
    if root is not None:
        for case in dict.fromkeys(bad):
            path = volume_path(root, case)
            check_finite(load_npy(path, mmap=True, what="volume"), path)
    if bad:  # from the data pipeline, not the files (or the files were not known)
        raise FloatingPointError(f"non-finite input values at {where} (cases {', '.join(bad)})")
    raise FloatingPointError(
        f"non-finite loss {float(loss)} at {where} (cases {', '.join(names)}): the training diverged; try a lower "
        "learning rate"
    )


def _duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class ProgressLog:
    """Progress lines for runs without a bar (``--no_progress``, logs): one after the first step, then one every
    ``every`` seconds, with the step, the mean loss so far in the epoch, seconds per step and the time left.

    The rate counts only time spent in training steps (validation is left out of the estimate); the first step of
    a session, which includes start-up, counts only until a second step is timed.
    """

    def __init__(self, every: float, num_epochs: int, steps_per_epoch: int, max_steps: int | None = None) -> None:
        self.every, self.num_epochs, self.steps_per_epoch = every, num_epochs, steps_per_epoch
        self.max_steps = max_steps
        self.steps, self.busy, self.first, self.due = 0, 0.0, 0.0, 0.0
        self.last = time.monotonic()

    def start_epoch(self) -> None:
        """Call before an epoch's first batch: time between epochs (validation, checkpoints) is not step time."""
        self.last = time.monotonic()

    def step(self, epoch: int, step_in_epoch: int, global_step: int, mean_loss: float) -> None:
        """Call after each optimiser step (``epoch`` 0-based; ``step_in_epoch``, ``global_step`` include it)."""
        now = time.monotonic()
        self.busy += now - self.last
        self.last = now
        self.steps += 1
        if self.steps == 1:
            self.first = self.busy
        elif now < self.due:
            return
        self.due = now + self.every
        rate = (self.busy - self.first) / (self.steps - 1) if self.steps > 1 else self.first
        epoch_left = self.steps_per_epoch - step_in_epoch
        run_left = (self.num_epochs - epoch - 1) * self.steps_per_epoch + epoch_left
        if self.max_steps is not None:
            run_left = min(run_left, self.max_steps - global_step)
            epoch_left = min(epoch_left, run_left)
        log.info(
            "epoch %d/%d, step %d/%d: loss %.4f, %.2f s/step, about %s left in the epoch and %s in the run "
            "(validation not counted)", epoch + 1, self.num_epochs, step_in_epoch, self.steps_per_epoch, mean_loss,
            rate, _duration(epoch_left * rate), _duration(run_left * rate),
        )  # fmt: skip


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    """Train a model on a dataset indexed by ``(case index, seed)`` (see ``data.TrainDataset``), with hooks.

    :meth:`run_training` loops over epochs and batches and calls the hooks; a method overrides hooks, never the loop:
    :meth:`restore_position` / :meth:`checkpoint_state` (what a checkpoint means and holds), :meth:`train_step` (one
    optimiser step), :meth:`on_step_end` (per-iteration schedule, validation and checkpoints), :meth:`on_epoch_end`
    (per-epoch ones), :meth:`on_train_end`. Class attributes name the run's checkpoints.

    Args:
        model: the bare model (DDP wrapping is done here when launched by ``torchrun``).
        loss_fn: see :data:`LossFn`.
        optimizer: over ``model``'s parameters.
        config: see :class:`FitConfig`.
        scheduler: stepped per epoch or iteration (``config.schedule_per``) with ``step()``; a
            ``ReduceLROnPlateau`` steps with ``step(val_loss)`` after validations that return ``"val_loss"``.
        validate: run after ``config.val_epochs`` / ``config.val_steps``; ``config.best_key`` of its result selects
            ``best.pth`` (higher is better). May be set (attribute ``validate``) until :meth:`run_training`.
    """

    checkpoints: tuple[str, ...] = RUN_CHECKPOINTS  # glob patterns of the run's checkpoints (claim_run_folder)
    last_name = "model_last.pth"
    best_name = "best.pth"
    continue_with = "--resume {savepath}/model_last.pth"  # the advice when a new run would replace a run's files
    check_architecture = True  # refuse to resume with another architecture than the checkpoint's

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        config: FitConfig,
        scheduler: Any | None = None,
        validate: ValidateFn | None = None,
    ) -> None:
        self.config, self.loss_fn, self.optimizer = config, loss_fn, optimizer
        self.scheduler, self.validate = scheduler, validate
        self.rank, self.world, local_rank = _distributed()
        self.device = resolve_device(config.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        if config.amp and self.device.type != "cuda":
            log.warning("--amp has no effect on %s: training in fp32", self.device)
        if config.batch_size % self.world:
            raise ValueError(f"--batch_size {config.batch_size} is not divisible by the {self.world} processes")
        self.model = model.to(self.device)
        self.train_model: nn.Module = self.model  # wrapped for DDP / torch.compile when training starts
        self.scaler = grad_scaler(self.device, config.amp)
        self.savepath = Path(config.savepath)
        self.last = self.savepath / self.last_name
        # the position: the epoch under way (0-based), the steps taken in it and in the whole run
        self.epoch, self.step_in_epoch, self.best = 0, 0, -math.inf
        self.global_step: int | None = 0  # None: resumed from a checkpoint without it, derived when training starts
        self.steps_per_epoch = config.iter_per_epoch or 0
        self.resumed, self.stopped = False, False
        self.session_steps = 0  # optimiser steps taken by this process (a resumed run counts from 0)
        self.epoch_started, self.epoch_loss, self.epoch_steps = time.time(), 0.0, 0  # of the epoch under way
        self._schedule_state: Mapping[str, Any] | None = None
        self._rng: Mapping[str, Any] | None = None
        self.writer: Any = None
        self.text_log: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------------ checkpoints

    def resume(self, ckpt: Mapping[str, Any] | None = None) -> None:
        """Continue from ``config.resume``: weights, optimiser, scaler, position, best score, scheduler and (with
        ``config.restore_rng``) the RNG states. ``ckpt``: that file's content, when the caller has read it already.

        Raises:
            UsageError: the checkpoint holds another method's model or another architecture.
            CheckpointError, StateDictMismatchError: unreadable, or does not fit the model or optimiser.
        """
        path = self.config.resume
        if path is None:
            raise ValueError("nothing to resume: FitConfig.resume is not set")
        ckpt = load_checkpoint(path) if ckpt is None else ckpt  # on the CPU: the loaders move tensors
        method = self.config.extra.get("method")
        if ckpt.get("method", method) != method:
            raise UsageError(f"--resume {path} holds a {ckpt['method']!r} model, not {method!r}")
        if self.check_architecture:
            _check_same_architecture(self.model, ckpt.get("config"), path)
        load_state_dict_strict(self.model, ckpt["state_dict"], str(path))
        if "optimizer" in ckpt:
            load_optimizer_state(self.optimizer, ckpt["optimizer"], path)
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.restore_position(ckpt)
        self.best = float(ckpt.get("best_score", -math.inf))
        self._schedule_state = ckpt.get("scheduler")  # applied once the position is complete (on_train_start)
        self._rng = ckpt.get("rng") if self.config.restore_rng else None  # restored when training starts
        self.resumed = True
        log.info("resumed from %s at %s", path, self.where())

    def restore_position(self, ckpt: Mapping[str, Any]) -> None:
        """Set ``epoch``, ``step_in_epoch`` and ``global_step`` from a checkpoint (ours, or upstream's ``epoch``)."""
        self.epoch = int(ckpt.get("next_epoch", ckpt.get("epoch", -1) + 1))
        self.step_in_epoch = int(ckpt.get("step_in_epoch", 0))
        self.global_step = int(ckpt["global_step"]) if "global_step" in ckpt else None

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the weights; ``epoch`` keeps upstream's meaning (last finished epoch,
        0-based), resume uses ``next_epoch`` and ``step_in_epoch``."""
        return {
            "epoch": self.epoch - 1, "next_epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "best_score": self.best, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "rng": rng_state(),
            **self.config.extra,
        }  # fmt: skip

    def save(self, name: str) -> Path:
        """Write checkpoint ``name`` into the savepath (on the main process only) and return its path."""
        path = self.savepath / name
        if self.is_main:
            save_checkpoint(path, self.model, **self.checkpoint_state())
        return path

    # ------------------------------------------------------------------------------------------------ the loop

    def run_training(self, train_set: Dataset) -> FitResult:
        """Train until ``config.num_epochs`` epochs or ``config.max_steps`` steps; returns where the run stands."""
        with ExitStack() as resources:  # the writer and the text log are closed on any exit
            self.on_train_start(train_set, resources)
            while self.epoch < self.config.num_epochs and not self.stopped:
                with self.on_epoch_start() as batches:
                    for batch in batches:
                        self.on_step_end(*self.train_step(batch))
                        if self.stopped:
                            break
                self.on_epoch_end()
            self.on_train_end()
        return FitResult(self.steps_done, self.epoch, self.best, self.last)

    @property
    def steps_done(self) -> int:
        assert self.global_step is not None, "the position is complete once training starts"
        return self.global_step

    def on_train_start(self, train_set: Dataset, resources: ExitStack) -> None:
        """Complete the position, claim and make the savepath (every check has passed by now), wrap the model, open
        the writer and the text log (closed by ``resources``), and last restore the checkpoint's RNG states."""
        config = self.config
        self.train_set, self.root = train_set, getattr(train_set, "root", None)  # root names a damaged volume
        self.steps_per_epoch = config.iter_per_epoch or len(train_set)  # type: ignore[arg-type]
        if config.resume and not self.resumed:
            self.resume()
        self._settle_position()
        # Only now is the output folder claimed and made, so that a refused run leaves nothing behind, and
        # --overwrite deletes nothing for it.
        claim_run_folder(
            self.savepath, config.resume, config.overwrite, self.is_main, self.checkpoints, self.continue_with
        )
        self.per_rank_batch = config.batch_size // self.world
        num_cases = len(train_set)  # type: ignore[arg-type]
        self.sampler = EpochSampler(
            num_cases, self.steps_per_epoch * self.per_rank_batch, config.seed, self.rank, self.world
        )
        self.train_model = self._wrap(self.model)
        self.progress = ProgressLog(config.progress_seconds, config.num_epochs, self.steps_per_epoch, config.max_steps)
        if self.is_main:
            self._open_outputs(resources)
        if self._rng is not None:  # after everything above, which may draw random numbers
            set_rng_state(self._rng)

    def _settle_position(self) -> None:
        """The global step of checkpoints without one (upstream's), and the scheduler at the position."""
        if self.global_step is None:
            self.global_step = self.epoch * self.steps_per_epoch + self.step_in_epoch
        if self.scheduler is not None and (self.resumed or self.global_step):  # a run may start at a given step
            position = self.epoch if self.config.schedule_per == "epoch" else self.global_step
            _resume_scheduler(self.scheduler, self._schedule_state, position)

    def _open_outputs(self, resources: ExitStack) -> None:
        """Make the savepath, remove killed runs' temporaries, open the writer and the text log, write the config."""
        self.savepath.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.savepath)  # what runs killed while writing a checkpoint left
        from torch.utils.tensorboard import SummaryWriter

        self.writer = resources.enter_context(SummaryWriter(str(self.savepath / "tensorboard")))
        self.text_log = resources.enter_context((self.savepath / "train.log").open("a"))
        (self.savepath / "config.json").write_text(json.dumps(self.config.extra, indent=2, default=str))
        log.info(
            "training in %s from epoch %d of %d, %d steps per epoch", self.savepath, self.epoch + 1,
            self.config.num_epochs, self.steps_per_epoch,
        )  # fmt: skip

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The module that trains: DDP under ``torchrun``, then ``torch.compile`` with ``config.compile``."""
        if self.world > 1:
            # DDP's search for parameters without a gradient costs a graph traversal per step: only for models that
            # declare dead parameters (kept for upstream's state dicts) or a graph that depends on the mask
            bare = unwrap(model)
            find_unused = bool(getattr(bare, "mask_dependent_parameters", True)) or bool(bare.unused_parameter_names())
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
        if self.config.compile:
            # Compiles on the first steps (minutes); checkpoints still hold the bare model's state dict.
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    def on_epoch_start(self) -> tqdm:
        """The epoch's batches (from ``step_in_epoch`` on) behind a progress bar, which the loop closes."""
        config, epoch = self.config, self.epoch
        self.sampler.set_epoch(epoch, skip=self.step_in_epoch * self.per_rank_batch)
        loader = DataLoader(
            self.train_set, batch_size=self.per_rank_batch, sampler=self.sampler, num_workers=config.workers,
            pin_memory=self.device.type == "cuda", worker_init_fn=seed_worker, drop_last=True,
            generator=torch.Generator().manual_seed(config.seed + epoch),
        )  # fmt: skip
        self.train_model.train()
        self.epoch_started, self.epoch_loss, self.epoch_steps = time.time(), 0.0, 0
        self.progress.start_epoch()
        self.bar = tqdm(
            loader, total=self.steps_per_epoch, initial=self.step_in_epoch, dynamic_ncols=True,
            disable=not (self.is_main and config.progress), desc=f"epoch {epoch + 1}/{config.num_epochs}",
        )  # fmt: skip
        return self.bar

    def where(self) -> str:
        """The step under way, for messages (``epoch 3, step 7``)."""
        return f"epoch {self.epoch + 1}, step {self.step_in_epoch + 1}"

    def train_step(self, batch: Mapping[str, Any]) -> tuple[float, Mapping[str, float]]:
        """One optimiser step on ``batch``; returns the loss and the loss function's scalars."""
        batch = _to_device(batch, self.device)
        with amp_context(self.device, self.config.amp):
            loss, scalars = self.loss_fn(self.train_model, batch, self.epoch)
        check_step_finite(loss, batch, self.root, self.where())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach()), scalars

    def on_step_end(self, loss: float, scalars: Mapping[str, float]) -> None:
        """Count the step, report it; the per-iteration schedule, validation and checkpoints; ``--max_steps``."""
        config, lr = self.config, self.optimizer.param_groups[0]["lr"]
        self.global_step = self.steps_done + 1
        self.step_in_epoch += 1
        self.epoch_steps += 1
        self.session_steps += 1
        self.epoch_loss += loss
        if self.is_main:
            self._report_step(loss, scalars, lr)
        metrics = self.run_validation(self.epoch) if self.global_step in config.val_steps else {}
        if config.schedule_per == "iteration":
            self.step_scheduler(metrics)
        if metrics:
            self.log_line(f"validation at step {self.global_step}: {_format(metrics)}")
            self._write_scalars("val", metrics, self.global_step)
        self.save_checkpoints(
            metrics, last=config.save_per == "iteration" and self.global_step % config.save_every == 0
        )
        self.stopped = config.max_steps is not None and self.global_step >= config.max_steps

    def _report_step(self, loss: float, scalars: Mapping[str, float], lr: float) -> None:
        """The bar's postfix, a progress line without the bar, TensorBoard scalars every ``log_every`` steps."""
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if not self.config.progress:
            self.progress.step(self.epoch, self.step_in_epoch, self.steps_done, self.epoch_loss / self.epoch_steps)
        if self.steps_done % self.config.log_every == 0:
            self._write_scalars("train", {"loss": loss, **scalars, "lr": lr}, self.steps_done)

    def _write_scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)

    def on_epoch_end(self) -> None:
        """Close the epoch: stopped mid-epoch, save the position; else validate, step the per-epoch schedule, log the
        mean loss of the steps this session ran, write ``model_last.pth`` (when due) and ``best.pth``."""
        config = self.config
        if self.stopped and self.step_in_epoch < self.steps_per_epoch:
            self.last = self.save(self.last_name)
            return
        epoch, seconds = self.epoch, time.time() - self.epoch_started
        self.epoch, self.step_in_epoch = epoch + 1, 0
        metrics = self.run_validation(epoch) if self.epoch in config.val_epochs else {}
        if config.schedule_per == "epoch":
            self.step_scheduler(metrics)
        # the mean over the steps run in this session: a resumed epoch ran only its remaining steps
        mean = self.epoch_loss / max(1, self.epoch_steps)
        self.log_line(
            f"epoch {self.epoch}: loss {mean:.4f}, {seconds:.1f}s" + (f", {_format(metrics)}" if metrics else "")
        )
        self._write_scalars("val", metrics, self.epoch)
        self.save_checkpoints(metrics, last=self._save_due())

    def _save_due(self) -> bool:
        """``model_last.pth`` at the end of an epoch: every ``save_every`` epochs, at the run's end, and for runs
        saved per iteration at every epoch's end (a resume never repeats an epoch's closing)."""
        config = self.config
        if config.save_per == "iteration" or self.stopped or self.epoch >= config.num_epochs:
            return True
        return self.epoch % config.save_every == 0

    def run_validation(self, epoch: int) -> Mapping[str, float]:
        """``validate`` in ``epoch`` (0-based) on the main process, its scores shared with every process."""
        if self.validate is None:
            return {}
        metrics = self.validate(unwrap(self.model), epoch) if self.is_main else {}
        if self.world > 1:  # every rank steps its scheduler with the same scores (a plateau scheduler's lr drop)
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        self.train_model.train()
        return metrics

    def step_scheduler(self, metrics: Mapping[str, float]) -> None:
        """``step()``; a plateau scheduler steps only with a validation loss."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if "val_loss" in metrics:
                self.scheduler.step(metrics["val_loss"])
        elif self.scheduler is not None:
            self.scheduler.step()

    def save_checkpoints(self, metrics: Mapping[str, float], last: bool) -> None:
        """``model_last.pth`` when ``last``; ``best.pth`` when ``metrics`` improve the best ``config.best_key``
        score (higher is better), which both record."""
        key = self.config.best_key
        improved = key in metrics and metrics[key] > self.best
        if improved:
            self.best = float(metrics[key])
        if last:
            self.last = self.save(self.last_name)
        if improved:
            self.save(self.best_name)

    def log_line(self, message: str) -> None:
        """Log ``message`` and append it to the run's text log (main process)."""
        if self.is_main:
            log.info(message)
            if self.text_log is not None:
                self.text_log.write(message + "\n")
                self.text_log.flush()

    def on_train_end(self) -> None:
        """After the last epoch or ``--max_steps`` (not after a failure): nothing by default."""


def _format(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
