"""The training engine shared by all methods: ``fit(model, train_set, loss_fn, optimizer, config)``.

Upstream semantics by default (METHODS.md §0.8): one epoch = N_train optimiser steps of ``batch_size`` samples
(``--iter_per_epoch`` overrides), the learning rate is set per epoch by a scheduler (poly for the RFNet family),
``model_last.pth`` is written after every epoch and ``best.pth`` when the validation score improves. Added: AMP on
CUDA, DDP through ``torchrun``, TensorBoard scalars, a progress bar (without it, progress lines with the time left),
``--max_steps`` for smoke runs, and resume that reproduces an uninterrupted run exactly on CPU (every sample is a
function of (seed, epoch, position); model, optimiser, scheduler, scaler and RNG states are checkpointed, also
mid-epoch). Every input is checked before the output folder is made, so a refused run leaves nothing behind.
"""

from __future__ import annotations

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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_strict,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from .cli import UsageError
from .data import EpochSampler, check_finite, seed_worker, volume_path
from .io import load_npy, remove_stale_temporaries
from .registry import config_mismatch

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Mapping[str, Any], int], tuple[torch.Tensor, Mapping[str, float]]]
"""``loss_fn(model, batch, epoch) -> (loss, scalars to log)``; the batch tensors are already on the device."""

ValidateFn = Callable[[nn.Module, int], Mapping[str, float]]
"""``validate(model, epoch) -> scores`` on the unwrapped model in eval mode."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but no CUDA device is available (use --device cpu or auto)")
    return device


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, numpy and torch (CPU and CUDA); deterministic cuDNN as upstream."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def amp_context(device: torch.device, enabled: bool) -> Any:
    """Autocast for CUDA (bf16 where supported, else fp16); a no-op on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """The loss scaler that fp16 autocast needs (:func:`amp_context` picks fp16 only on GPUs without bf16); a
    disabled pass-through otherwise."""
    fp16 = enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=fp16)


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """Upstream's poly schedule, stepped once per epoch: ``lr_e = round(lr0 · (1 − e/E)^0.9, 8)`` (§0.8)."""

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, power: float = 0.9, last_epoch: int = -1):
        self.num_epochs, self.power = num_epochs, power
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        e = min(self.last_epoch, self.num_epochs)
        return [round(base * (1 - e / self.num_epochs) ** self.power, 8) for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the epoch only: upstream recomputes the rate from ``--lr`` and ``--num_epochs`` every epoch, so a
        resumed run that changes ``--num_epochs`` (e.g. extends 1000 to 1200) follows the new schedule instead of
        the saved one (which would train every extra epoch at lr 0)."""
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


@dataclass
class FitConfig:
    """What ``fit`` needs beyond the model, data, loss and optimiser.

    ``val_epochs`` are 1-based epoch numbers after which ``validate`` runs (upstream's convention).
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
    best_key: str = "mean_dice"
    resume: str | Path | None = None
    overwrite: bool = False  # start afresh in a savepath that holds a run (see claim_run_folder)
    log_every: int = 10
    progress: bool = True
    progress_seconds: float = 30.0  # without the bar: a progress line after the first step, then this often
    extra: dict[str, Any] = field(default_factory=dict)  # stored in every checkpoint: method, config, args


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


def _resume_scheduler(scheduler: Any, state: Mapping[str, Any] | None, next_epoch: int) -> None:
    """Put ``scheduler`` at ``next_epoch``: from its saved state, or, for checkpoints without one (upstream's), by
    stepping it ``next_epoch`` times as the interrupted run did."""
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
    else:
        # replay from the initial rates: recursive schedules (cosine) would otherwise decay the restored rate again
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            for _ in range(next_epoch):
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


def fit(
    model: nn.Module,
    train_set: Dataset,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    config: FitConfig,
    scheduler: Any | None = None,
    validate: ValidateFn | None = None,
) -> FitResult:
    """Train ``model`` on ``train_set`` (a dataset indexed by ``(case index, seed)``, see ``data.TrainDataset``).

    Args:
        model: the bare model (DDP wrapping is done here when launched by ``torchrun``).
        train_set: training dataset; its length is N_train.
        loss_fn: see :data:`LossFn`.
        optimizer: over ``model``'s parameters.
        config: see :class:`FitConfig`.
        scheduler: stepped once per epoch (``step()``; ``step(val_loss)`` for ``ReduceLROnPlateau``, which then
            needs ``"val_loss"`` from ``validate`` at every epoch).
        validate: run after the epochs listed in ``config.val_epochs``; ``config.best_key`` of its result selects
            ``best.pth`` (higher is better).
    """
    rank, world, local_rank = _distributed()
    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if config.amp and device.type != "cuda":
        log.warning("--amp has no effect on %s: training in fp32", device)
    if config.batch_size % world:
        raise ValueError(f"--batch_size {config.batch_size} is not divisible by the {world} processes")
    savepath = Path(config.savepath)
    is_main = rank == 0

    model.to(device)
    steps_per_epoch = config.iter_per_epoch or len(train_set)
    per_rank_batch = config.batch_size // world
    sampler = EpochSampler(len(train_set), steps_per_epoch * per_rank_batch, config.seed, rank, world)
    scaler = grad_scaler(device, config.amp)

    next_epoch, step_in_epoch, global_step, best = 0, 0, 0, -math.inf
    if config.resume:
        ckpt = load_checkpoint(config.resume)  # on the CPU: the loaders below move tensors to the parameters
        method = config.extra.get("method")
        if ckpt.get("method", method) != method:
            raise UsageError(f"--resume {config.resume} holds a {ckpt['method']!r} model, not {method!r}")
        _check_same_architecture(model, ckpt.get("config"), config.resume)
        load_state_dict_strict(model, ckpt["state_dict"], str(config.resume))
        if "optimizer" in ckpt:
            load_optimizer_state(optimizer, ckpt["optimizer"], config.resume)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        next_epoch = int(ckpt.get("next_epoch", ckpt.get("epoch", -1) + 1))
        if scheduler is not None:
            _resume_scheduler(scheduler, ckpt.get("scheduler"), next_epoch)
        step_in_epoch = int(ckpt.get("step_in_epoch", 0))
        global_step = int(ckpt.get("global_step", next_epoch * steps_per_epoch + step_in_epoch))
        best = float(ckpt.get("best_score", -math.inf))
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        log.info("resumed from %s at epoch %d, step %d", config.resume, next_epoch, step_in_epoch)

    # Every check has passed (the lists and cases before fit, the checkpoint above): only now is the output folder
    # claimed and made, so that a refused run leaves nothing behind, and --overwrite deletes nothing for it.
    claim_run_folder(savepath, config.resume, config.overwrite, delete=is_main)
    if is_main:
        savepath.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(savepath)  # what runs killed while writing a checkpoint left
        log.info(
            "training in %s from epoch %d of %d, %d steps per epoch", savepath, next_epoch + 1, config.num_epochs,
            steps_per_epoch,
        )  # fmt: skip

    train_model: nn.Module = model
    if world > 1:
        # DDP's search for parameters without a gradient costs a graph traversal per step: only for models that
        # declare dead parameters (kept for upstream's state dicts) or a graph that depends on the mask
        bare = unwrap(model)
        find_unused = bool(getattr(bare, "mask_dependent_parameters", True)) or bool(bare.unused_parameter_names())
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused
        )

    if config.compile:
        # Compiles on the first steps (minutes); checkpoints still hold the bare model's state dict.
        train_model = torch.compile(train_model)

    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(savepath / "tensorboard"))
        (savepath / "config.json").write_text(json.dumps(config.extra, indent=2, default=str))
    text_log = (savepath / "train.log").open("a") if is_main else None

    def checkpoint(name: str, resume_epoch: int, in_epoch: int) -> Path:
        # `epoch` keeps upstream's meaning (last finished epoch, 0-based); resume uses next_epoch/step_in_epoch
        path = savepath / name
        if is_main:
            save_checkpoint(
                path, model,
                epoch=resume_epoch - 1, next_epoch=resume_epoch, step_in_epoch=in_epoch,
                global_step=global_step, best_score=best,
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                scaler=scaler.state_dict() if scaler.is_enabled() else None,
                rng=rng_state(), **config.extra,
            )  # fmt: skip
        return path

    last = savepath / "model_last.pth"
    stop = False
    progress = ProgressLog(config.progress_seconds, config.num_epochs, steps_per_epoch, config.max_steps)
    root = getattr(train_set, "root", None)  # names a damaged volume when a loss is not finite
    for epoch in range(next_epoch, config.num_epochs):
        next_epoch = epoch
        sampler.set_epoch(epoch, skip=step_in_epoch * per_rank_batch)
        loader = DataLoader(
            train_set, batch_size=per_rank_batch, sampler=sampler, num_workers=config.workers,
            pin_memory=device.type == "cuda", worker_init_fn=seed_worker, drop_last=True,
            generator=torch.Generator().manual_seed(config.seed + epoch),
        )  # fmt: skip
        train_model.train()
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            initial=step_in_epoch,
            disable=not (is_main and config.progress),
            desc=f"epoch {epoch + 1}/{config.num_epochs}",
            dynamic_ncols=True,
        )
        t0, running = time.time(), 0.0
        progress.start_epoch()
        for done, batch in enumerate(bar, start=1):
            batch = _to_device(batch, device)
            with amp_context(device, config.amp):
                loss, scalars = loss_fn(train_model, batch, epoch)
            check_step_finite(loss, batch, root, f"epoch {epoch + 1}, step {step_in_epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            step_in_epoch += 1
            value = float(loss.detach())
            running += value
            if is_main:
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                if not config.progress:
                    progress.step(epoch, step_in_epoch, global_step, running / done)
                if global_step % config.log_every == 0 and writer is not None:
                    writer.add_scalar("train/loss", value, global_step)
                    for k, v in scalars.items():
                        writer.add_scalar(f"train/{k}", float(v), global_step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
            if config.max_steps is not None and global_step >= config.max_steps:
                stop = True
                break
        bar.close()
        if stop and step_in_epoch < steps_per_epoch:
            last = checkpoint("model_last.pth", epoch, step_in_epoch)
            break
        step_in_epoch, next_epoch = 0, epoch + 1
        metrics: Mapping[str, float] = {}
        if validate is not None and (epoch + 1) in config.val_epochs:
            metrics = validate(unwrap(model), epoch) if is_main else {}
            if world > 1:  # every rank steps its scheduler with the same scores (a plateau scheduler's lr drop)
                shared = [metrics]
                dist.broadcast_object_list(shared, src=0)
                metrics = shared[0]
            train_model.train()
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if "val_loss" in metrics:
                    scheduler.step(metrics["val_loss"])
            else:
                scheduler.step()
        if is_main:
            msg = f"epoch {epoch + 1}: loss {running / max(1, steps_per_epoch):.4f}, {time.time() - t0:.1f}s" + "".join(
                f", {k} {v:.4f}" for k, v in metrics.items()
            )
            log.info(msg)
            assert text_log is not None
            text_log.write(msg + "\n")
            text_log.flush()
            for k, v in metrics.items():
                assert writer is not None
                writer.add_scalar(f"val/{k}", float(v), epoch + 1)
        improved = config.best_key in metrics and metrics[config.best_key] > best
        if improved:
            best = float(metrics[config.best_key])
        last = checkpoint("model_last.pth", epoch + 1, 0)
        if improved:
            checkpoint("best.pth", epoch + 1, 0)
        if stop:
            break
    if writer is not None:
        writer.close()
    if text_log is not None:
        text_log.close()
    return FitResult(global_step, next_epoch, best, last)
