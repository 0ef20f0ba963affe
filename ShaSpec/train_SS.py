# ruff: noqa: N999 - the upstream script name (train_SS.py) is part of the documented command line
"""Train ShaSpec (upstream ``ShaSpec/train_SS.py``): warm-up with all modalities, then random-missing.

    python ShaSpec/train_SS.py --data_dir <BraTS2023> --train_list BraTS23/BraTS23_train.csv \
        --val_list BraTS23/BraTS23_val.csv --snapshot_dir snapshots/warmup --num_steps 245000 \
        --learning_rate 1e-2 --random_mirror --random_scale --warm_up --mode 0,1,2,3
    python ShaSpec/train_SS.py ... --snapshot_dir snapshots/random --num_steps 406000 --mode random \
        --reload_from_checkpoint --reload_path snapshots/warmup/best.pth

SGD (momentum 0.99, Nesterov, no weight decay, as upstream: ``--momentum``/``--weight_decay`` are accepted and
ignored), per-iteration poly LR ``lr0·(1 − i/num_steps)^0.9`` on the GLOBAL iteration counter, which a reload
continues; the run stops at global iteration ``num_steps`` (upstream ran ``num_steps`` more iterations and crashed on a
complex learning rate), so the random-missing run covers iterations (reloaded iteration + 1) … 406,000 of one schedule.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brats_core.apps.arguments import add_preset_arg, add_runtime_args, add_train_overwrite_arg
from brats_core.data.dataset import check_validation_cases, load_case
from brats_core.engine.training import FitConfig, PolyLR, Trainer, ValidateFn, claim_run_folder, seed_everything
from brats_core.modalities import FULL, METHOD_ORDERS, Mask, parse_bool_list, parse_shaspec_mode
from brats_core.nn.losses import region_dice_bce
from brats_core.registry import build_from_config, build_method
from brats_core.utils.checkpoint import load_checkpoint
from brats_core.utils.cli import UsageError, add_progress_arg, positive_int, run_main, setup_logging
from ShaSpec.data import ShaSpecTrainDataset, prepare_cache
from ShaSpec.model import ShaSpec, ShaSpecOutput
from ShaSpec.scoring import REGIONS, soft_validation_score

log = logging.getLogger("ShaSpec.train_SS")
SNAPSHOTS = ("last.pth", "best.pth", "final.pth")
"""The checkpoints a run writes into ``--snapshot_dir``."""

MOMENTUM = 0.99  # hard-coded upstream
SHARED_WEIGHT, SPECIFIC_WEIGHT = 0.1, 0.02
SHARED_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (1, 2), (2, 3), (3, 0))  # ShaSpec order FLAIR, T1, T1ce, T2

WARM_UP_VAL_ITERS: tuple[int, ...] = (15000, 30000, 65000, 100000, 135000, 170000, 205000, 220000, 235000, 240000,
                                      245000)  # fmt: skip
TRAIN_VAL_ITERS: tuple[int, ...] = (
    110000, 120000, 130000, 150000, 170000, 180000, 190000, 200000, 210000, 220000, 230000, 250000, 270000, 290000,
    *range(310000, 400000, 10000), 406000,
)  # fmt: skip
"""Upstream's validation iterations (1-based)."""


def validation_iterations(warm_up: bool, num_steps: int) -> list[int]:
    """Upstream's list for the run (``--warm_up`` or not) up to ``num_steps``, plus ``num_steps`` itself so that
    every run ends with a validated ``best.pth`` (upstream's lists end at their ``num_steps`` anyway)."""
    upstream = WARM_UP_VAL_ITERS if warm_up else TRAIN_VAL_ITERS
    return sorted({i for i in upstream if i <= num_steps} | {num_steps})


def shaspec_loss(out: ShaSpecOutput, regions: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """``Dice + BCE + 0.1·L_shared + 0.02·L_spec``.

    Dice: per sample and region ``1 − 2Σs·y/(Σs + Σy + 1)``, averaged; BCE: the per-region mean BCE-with-logits SUMMED
    over the 3 regions; L_shared: L1 between the bottleneck shared features of modality pairs (0,1), (1,2), (2,3),
    (3,0), summed; L_spec: cross-entropy of the domain classifier, labels 0..3 = FLAIR, T1, T1ce, T2.

    Args:
        out: the model's training output (logits ``(B, 3, ...)``, shared ``(B, 4, C, ...)``, domain ``(B, 4, 4)``).
        regions: targets ``(B, 3, ...)`` in the head's order ET, WT, TC.
    """
    seg = region_dice_bce(out.logits, regions, smooth_numerator=False, batch_dice=False, bce_weight=3.0)
    shared = out.shared.float()
    l_shared = sum(F.l1_loss(shared[:, a], shared[:, b]) for a, b in SHARED_PAIRS)
    domain = out.domain_logits.float().reshape(-1, 4)
    labels = torch.arange(4, device=domain.device).repeat(out.domain_logits.shape[0])
    l_spec = F.cross_entropy(domain, labels)
    loss = seg + SHARED_WEIGHT * l_shared + SPECIFIC_WEIGHT * l_spec
    return loss, {"seg": float(seg.detach()), "shared": float(l_shared.detach()), "spec": float(l_spec.detach())}


def step_loss(model: nn.Module, batch: Mapping[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`shaspec_loss` of the model's training output for a batch of the dataset (a ``training.LossFn``)."""
    return shaspec_loss(model(batch["image"], batch["mask"]), batch["regions"])


def resolve_list(data_dir: str | Path, path: str | Path) -> Path:
    """A list file as given, else relative to ``--data_dir`` (upstream joined them)."""
    for candidate in (Path(path), Path(data_dir) / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"list file {path} not found (tried it as is and under --data_dir {data_dir})")


def read_entries(path: Path) -> list[str]:
    """The ``case`` column of a ShaSpec list (or one entry per line of a ``.txt``), paths kept as written.

    Raises:
        UsageError: a CSV without a ``case`` column (an empty file has no entries).
    """
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is not None and "case" not in reader.fieldnames:
                raise UsageError(f"{path}: expected a CSV with a 'case' column, got header {reader.fieldnames}")
            return [row["case"] for row in reader if (row["case"] or "").strip()]
    return [line for line in path.read_text().splitlines() if line.strip()]


def parse_mask_cell(text: str, order: str = "canonical") -> Mask:
    """A validation-list mask: a boolean list (canonical order as the project's ``val15splits.csv``, or
    ``order="shaspec"`` (FLAIR, T1, T1ce, T2) for upstream's ShaSpec copies) or a present-index string like ``0,2``."""
    text = text.strip()
    return parse_bool_list(text, METHOD_ORDERS[order]) if text.startswith("[") else parse_shaspec_mode(text)


def read_val_rows(path: Path, order: str = "canonical") -> list[tuple[str, Mask]]:
    """``(entry, canonical mask)`` rows; without a ``mask`` column every case is validated with all modalities.

    Raises:
        UsageError: a CSV without a ``case`` column, or a malformed mask.
    """
    if path.suffix != ".csv":
        return [(e, FULL.mask) for e in read_entries(path)]
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and "case" not in reader.fieldnames:
            raise UsageError(f"{path}: expected a CSV with a 'case' column, got header {reader.fieldnames}")
        rows = [r for r in reader if (r["case"] or "").strip()]
    try:
        return [(r["case"], parse_mask_cell(r["mask"], order) if r.get("mask") else FULL.mask) for r in rows]
    except ValueError as err:
        raise UsageError(f"{path}: {err}") from err


def validate(model: ShaSpec, cache_dir: Path, rows: Sequence[tuple[str, Mask]]) -> dict[str, float]:
    """Upstream's validation: mean over cases of the soft Dice (+1) per region under each case's mask."""
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {r: [] for r in REGIONS}
    try:
        for case, mask in rows:
            image, label = load_case(cache_dir, case)
            s = soft_validation_score(model, torch.from_numpy(image), label, mask)
            for r in REGIONS:
                scores[r].append(s[r])
    finally:
        model.train(was_training)
    out = {r: float(np.mean(v)) for r, v in scores.items()}
    out["mean_dice"] = float(np.mean([out[r] for r in REGIONS]))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ShaSpec/train_SS.py", description=__doc__.splitlines()[0])
    g = p.add_argument_group("upstream flags")
    g.add_argument("--data_dir", default="./datalist/", help="folder with the BraTS case folders (and the lists)")
    g.add_argument("--train_list", default="BraTS20/BraTS20_train.csv")
    g.add_argument("--val_list", default="BraTS20_val.csv")
    g.add_argument("--test_list", default="BraTS20_test.csv", help="accepted for compatibility; unused here")
    g.add_argument("--snapshot_dir", default="snapshots/example/")
    g.add_argument("--reload_path", default="snapshots/example/last.pth")
    g.add_argument("--reload_from_checkpoint", action="store_true", help="continue from --reload_path")
    g.add_argument("--input_size", default=None, help='crop "D,H,W" (default: the preset\'s; paper "80,160,160")')
    g.add_argument("--batch_size", type=int, default=1)
    g.add_argument("--num_gpus", type=int, default=1, help="accepted; use torchrun-free single-device training")
    g.add_argument("--local_rank", type=int, default=0, help="accepted for compatibility")
    g.add_argument("--num_steps", type=positive_int, default=40000, help="last GLOBAL iteration of the poly schedule")
    g.add_argument("--start_iters", type=int, default=0)
    g.add_argument("--val_pred_every", type=positive_int, default=875, help="write last.pth every N iterations")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--num_classes", type=int, default=3)
    g.add_argument("--weight_std", action="store_true", default=True, help="always on, as upstream")
    g.add_argument("--momentum", type=float, default=0.9, help="ignored: upstream hard-codes 0.99")
    g.add_argument("--power", type=float, default=0.9)
    g.add_argument("--weight_decay", type=float, default=5e-4, help="ignored: upstream uses none")
    g.add_argument("--ignore_label", type=int, default=255, help="accepted; unused upstream")
    g.add_argument("--is_training", action="store_true", help="accepted; unused upstream")
    g.add_argument("--random_mirror", action="store_true")
    g.add_argument("--random_scale", action="store_true")
    g.add_argument("--random_seed", type=int, default=999)
    g.add_argument("--norm_cfg", default="IN", choices=["IN"])
    g.add_argument("--activation_cfg", default="LeakyReLU", choices=["LeakyReLU"])
    g.add_argument("--train_only", action="store_true", help="no validation")
    g.add_argument("--warm_up", action="store_true", help="use the warm-up run's validation iterations")
    g.add_argument("--mode", default="0,1,2,3", help="present modalities (FLAIR,T1,T1ce,T2 indices) or 'random'")
    g.add_argument("-d", "--devices", default=None, help="accepted for compatibility (engine flag); use --device")
    g.add_argument(
        "-c",
        "--continue",
        dest="continue_path",
        default=None,
        help="resume a run exactly (model, optimiser, iteration, best score, RNG) from this checkpoint",
    )
    o = p.add_argument_group("added")
    add_preset_arg(o, "shaspec")
    o.add_argument("--cache_dir", default=None, help="normalised-volume cache (default: <snapshot_dir>/../cache)")
    o.add_argument(
        "--val_mask_order",
        default="canonical",
        choices=["canonical", "shaspec"],
        help="order of the boolean masks in --val_list: canonical (the project's val15splits.csv) or ShaSpec's "
        "(FLAIR,T1,T1ce,T2: upstream's ShaSpec copies)",
    )
    o.add_argument("--activation_checkpointing", action="store_true", help="recompute activations (less memory)")
    o.add_argument("--no_augmentation", action="store_true", help="skip the batchgenerators augmentation")
    o.add_argument("--log_every", type=positive_int, default=50, help="a log line every N iterations")
    add_progress_arg(o)
    add_train_overwrite_arg(o)
    add_runtime_args(p)
    p.set_defaults(workers=1)
    return p


def parse_input_size(text: str) -> tuple[int, int, int]:
    """``--input_size "D,H,W"`` → (D, H, W); a ``ValueError`` names the problem."""
    try:
        parts = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f'--input_size must be "D,H,W" integers, got {text!r}') from None
    if len(parts) != 3:
        raise ValueError(f'--input_size must be "D,H,W", got {text!r}')
    if parts[1] != parts[2]:
        raise ValueError(f"--input_size: H and W must be equal (square in-plane window), got {text!r}")
    return parts[0], parts[1], parts[2]


def apply_input_size(parser: argparse.ArgumentParser, model: ShaSpec, text: str | None) -> None:
    """Set the crop/window of a built model from ``--input_size`` (ShaSpec is fully convolutional: the window is
    not part of the weights, so it may differ from the checkpoint's); a bad value is a usage error."""
    if not text:
        return
    try:
        depth, size, _ = parse_input_size(text)
        model.config = dataclasses.replace(model.config, patch_depth=depth, patch_size=size)
    except ValueError as err:
        parser.error(str(err))


def cache_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else Path(args.snapshot_dir).resolve().parent / "cache"


class ShaSpecTrainer(Trainer):
    """The shared engine with upstream ShaSpec's iteration-based rules.

    The run is one epoch of ``--num_steps`` GLOBAL iterations, which a reload continues (its sample stream skips
    the iterations done); poly per iteration; validation at upstream's iterations; snapshots ``last.pth`` every
    ``--val_pred_every`` iterations and at the end, ``final.pth`` when the last iteration ran, ``best.pth`` at the
    best validation. Snapshots keep upstream's ``iter`` (the last finished iteration, 0-based), from which a
    reload's position comes.

    Args:
        start_iters: the first iteration of a fresh run, and of a reload of weights without an iteration.
        on_step: called with ``(iteration, lr)`` after every optimiser step (tests).
    """

    checkpoints = SNAPSHOTS
    last_name = "last.pth"
    continue_with = "--continue {savepath}/last.pth"
    # the model is built from the checkpoint's config; only --input_size (not part of the weights) may differ
    check_architecture = False

    def __init__(
        self, *args: Any, start_iters: int = 0, on_step: Callable[[int, float], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.start_iters, self.on_step = start_iters, on_step
        self._place(start_iters)

    def _place(self, iteration: int) -> None:
        """Continue at global ``iteration``: past ``--num_steps`` there is nothing left to do."""
        num_steps = int(self.config.iter_per_epoch or 0)
        self.global_step = iteration
        self.epoch, self.step_in_epoch = (0, iteration) if iteration < num_steps else (1, 0)

    def restore_position(self, ckpt: Mapping[str, Any]) -> None:
        if "iter" not in ckpt:  # weights only (a .safetensors export, a bare state dict)
            log.warning("%s records no iteration: starting at --start_iters %d", self.config.resume, self.start_iters)
        self._place(int(ckpt["iter"]) + 1 if "iter" in ckpt else self.start_iters)

    def checkpoint_state(self) -> dict[str, Any]:
        state = super().checkpoint_state()
        for key in ("epoch", "next_epoch", "step_in_epoch"):  # the position is the iteration
            del state[key]
        return {**state, "iter": self.steps_done - 1}

    def where(self) -> str:
        return f"iteration {self.steps_done}"

    def on_step_end(self, loss: float, scalars: Mapping[str, float]) -> None:
        iteration, lr = self.steps_done, self.optimizer.param_groups[0]["lr"]
        if self.on_step is not None:
            self.on_step(iteration, lr)
        if iteration % self.config.log_every == 0:
            log.info(
                "iter %d/%d lr %.3e loss %.4f (seg %.4f shared %.4f spec %.4f) %.1fs", iteration,
                self.config.iter_per_epoch, lr, loss, scalars["seg"], scalars["shared"], scalars["spec"],
                time.time() - self.epoch_started,
            )  # fmt: skip
        super().on_step_end(loss, scalars)

    def on_train_end(self) -> None:
        if self.session_steps and self.steps_done >= int(self.config.iter_per_epoch or 0):
            self.save("final.pth")


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Refuse bad ``--mode`` values and a new run over another run's snapshots; returns the checkpoint to start
    from (``--continue``, or ``--reload_path`` with ``--reload_from_checkpoint``)."""
    if args.mode.strip().lower() != "random":
        try:
            parse_shaspec_mode(args.mode)
        except ValueError as err:
            parser.error(str(err))
    resume = args.continue_path or (args.reload_path if args.reload_from_checkpoint else None)
    try:  # refuse at once; --overwrite deletes only once every input has been checked
        claim_run_folder(
            Path(args.snapshot_dir), resume, args.overwrite, delete=False, checkpoints=SNAPSHOTS,
            continue_with=ShaSpecTrainer.continue_with,
        )  # fmt: skip
    except UsageError as err:
        parser.error(str(err))
    return resume


def build_model(parser: argparse.ArgumentParser, args: argparse.Namespace, ckpt: Mapping[str, Any] | None) -> ShaSpec:
    """The checkpoint's architecture (with this run's activation checkpointing), else the preset's from the flags;
    ``--input_size`` sets the window of either."""
    if ckpt is not None and ckpt.get("method", "shaspec") != "shaspec":
        parser.error(f"{args.continue_path or args.reload_path} holds a {ckpt['method']!r} model, not ShaSpec")
    if ckpt is not None and "config" in ckpt:
        model = build_from_config("shaspec", ckpt["config"])
        model.config.activation_checkpointing = args.activation_checkpointing
        for module in model.modules():
            if hasattr(module, "checkpointing"):
                module.checkpointing = args.activation_checkpointing
    else:
        overrides: dict = {
            "weight_std": args.weight_std, "aspp_pool_quirk": args.reference_quirks,
            "activation_checkpointing": args.activation_checkpointing, "num_classes": args.num_classes,
        }  # fmt: skip
        model = build_method("shaspec", args.preset, **overrides)
    assert isinstance(model, ShaSpec)
    apply_input_size(parser, model, args.input_size)
    return model


def prepare_data(args: argparse.Namespace, model: ShaSpec) -> tuple[ShaSpecTrainDataset, ValidateFn | None]:
    """The training crops and the validation (None with ``--train_only``); the lists and every case are checked
    before the cache is built.

    Raises:
        UsageError: an empty training list, or validation cases that are missing.
    """
    train_list = resolve_list(args.data_dir, args.train_list)
    train_entries = read_entries(train_list)
    if not train_entries:
        raise UsageError(f"{train_list} lists no cases (the file is empty or holds a header only): add the cases")
    raw_rows: list[tuple[str, Mask]] = []
    if not args.train_only:
        val_list = resolve_list(args.data_dir, args.val_list)
        raw_rows = read_val_rows(val_list, args.val_mask_order)
        hint = "add validation cases to it, or pass --train_only"
        check_validation_cases(args.data_dir, [e for e, _ in raw_rows], val_list, hint, check_files=False)
    cache = cache_dir_of(args)
    train_cases = prepare_cache(args.data_dir, train_entries, cache)
    val_cases = prepare_cache(args.data_dir, [e for e, _ in raw_rows], cache)
    val_rows = [(c, m) for c, (_, m) in zip(val_cases, raw_rows, strict=True)]
    crop = (model.config.patch_depth, model.config.patch_size, model.config.patch_size)
    dataset = ShaSpecTrainDataset(
        cache, train_cases, crop, mode=args.mode, random_scale=args.random_scale, random_mirror=args.random_mirror,
        augment=not args.no_augmentation, reference_quirks=args.reference_quirks,
    )  # fmt: skip
    return dataset, None if args.train_only else (lambda m, _epoch: validate(m, cache, val_rows))  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None, on_step: Callable[[int, float], None] | None = None) -> int:
    """Run the training; ``on_step(iteration, lr)`` is called after every optimiser step (tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.snapshot_dir, "train_log.txt")
    seed_everything(args.random_seed)
    resume = check_flags(parser, args)
    ckpt = load_checkpoint(resume) if resume else None
    model = build_model(parser, args, ckpt)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=MOMENTUM, nesterov=True)
    val_iters = set() if args.train_only else set(validation_iterations(args.warm_up, args.num_steps))
    config = FitConfig.from_args(
        args, model, savepath=args.snapshot_dir, num_epochs=1, iter_per_epoch=args.num_steps, seed=args.random_seed,
        resume=resume, restore_rng=bool(args.continue_path), val_steps=val_iters, schedule_per="iteration",
        save_every=args.val_pred_every, save_per="iteration", log_every=args.log_every,
    )  # fmt: skip
    scheduler = PolyLR(optimizer, args.num_steps, args.power, decimals=None)
    trainer = ShaSpecTrainer(
        model, step_loss, optimizer, config, scheduler, start_iters=args.start_iters, on_step=on_step
    )
    if ckpt is not None:
        # upstream restores val_Dice_best on every reload, the warm-up's best.pth included: the random-missing run
        # then writes its best.pth only when it beats the warm-up's score
        trainer.resume(ckpt)
    dataset, trainer.validate = prepare_data(args, model)
    start = trainer.steps_done
    log.info(
        "ShaSpec %s: %d training cases, crop %s, mode %s, global iterations %d..%d, %d validations",
        "warm-up" if args.warm_up else "training", len(dataset), dataset.input_size, args.mode, start,
        args.num_steps - 1, len([i for i in val_iters if i > start]),
    )  # fmt: skip
    if start >= args.num_steps:
        log.warning("nothing to do: the run continues at iteration %d and --num_steps %d ends before it", start,
                    args.num_steps)  # fmt: skip
    result = trainer.run_training(dataset)
    log.info(
        "done at global iteration %d; best validation mean Dice %.4f; checkpoints in %s", result.global_step - 1,
        result.best_score, args.snapshot_dir,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
