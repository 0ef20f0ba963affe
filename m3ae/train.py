"""M3AE stage 2, segmentation fine-tuning from a pre-trained checkpoint (upstream ``m3ae/train.py``).

    python m3ae/train.py --datapath <m3ae cache> --pretrained runs/m3ae_pretrain/model_last.pth \
        --batch_size 2 --lr 0.0003 --model_type cnnnet --seed 999 --weight_kl 0.1 --feature_level 2 --epochs 300 \
        --mdp 3 --wd 0.0001 --deep_supervised --patch_shape 128 --exp_name m3ae_train

Each step loads ONE case and makes ``--batch_size`` copies of the same window, each with its own modality drop
(``k ~ U{0..mdp}``), dropped channels filled with the pre-trained completion image (frozen) at the window's
position, then shared intensity change and flips. Loss: Σ over the three deep-supervision outputs of 0.7 · (1 −
squared-denominator Dice) + 0.3 · BCE per region, plus ``--weight_kl`` · MSE between the two copies' 1/4-resolution
logits (three copies: the mean-squared differences of ``style[--feature_level]`` over the three pairs, / 6).
Adam, cosine schedule per epoch; validation (shared protocol) at upstream's epochs, ``best.pth`` on the mean Dice.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brats_core.apps.arguments import (
    add_compile_arg,
    add_data_args,
    add_preset_arg,
    add_runtime_args,
    add_train_overwrite_arg,
    split_dir,
)
from brats_core.apps.scripts import add_val_args, select_val_epochs
from brats_core.data.dataset import check_validation_cases
from brats_core.data.splits import load_split
from brats_core.engine.evaluation import EvalOptions, check_preprocessed_folder, validate
from brats_core.engine.training import FitConfig, Trainer, seed_everything
from brats_core.nn.losses import region_dice_bce
from brats_core.registry import build_method
from brats_core.utils.cli import UsageError, add_progress_arg, run_main, setup_logging
from brats_core.utils.device import resolve_device
from m3ae.common import (
    add_compat_flags,
    add_m3ae_data_flags,
    apply_devices,
    default_savepath,
    model_sizes,
    reject_variants,
)
from m3ae.data import FinetuneDataset, ensure_cache
from m3ae.model import M3AE, REGION_ORDER, completion_array, model_to_resume
from m3ae.pretrain import load_m3ae_checkpoint

log = logging.getLogger("m3ae.train")

UPSTREAM_VAL_EPOCHS: tuple[int, ...] = (
    25, 50, 75, 100, 125, 150, 175, 200, 225, 250, 260, 270, 275, 280, 285, 290, 295, 300,
)  # fmt: skip
"""Upstream's validation epochs (1-based)."""

_REGION_LABELS = {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}


def region_targets(label: torch.Tensor) -> torch.Tensor:
    """Integer labels ``(B, ...)`` → float region masks ``(B, 3, ...)`` in the head's order ET, TC, WT."""
    return torch.stack(
        [torch.isin(label, torch.tensor(_REGION_LABELS[r], device=label.device)) for r in REGION_ORDER], 1
    )


def edice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Upstream's ``EDiceLoss``: mean over regions of 0.7 · (1 − (2Σsy + 1)/(Σs² + Σy² + 1)) + 0.3 · BCE(s, y)."""
    return region_dice_bce(logits, target, dice_weight=0.7, bce_weight=0.3, squared=True)


class FinetuneLoss:
    """The fine-tuning loss for one batch of copies of one window (a ``brats_core.engine.training.LossFn``).

    Args:
        weight_kl: weight of the consistency term (README 0.1; upstream default 1).
        feature_level: the features the consistency compares: 3 copies ``[c2d, c3d, c4d][level]``, 2 copies
            ``[c3d, c4d, out4][level]`` (upstream's indexing; the README's 2 gives out4 for its 2 copies).
    """

    def __init__(self, weight_kl: float = 1.0, feature_level: int = 2) -> None:
        self.weight_kl, self.feature_level = weight_kl, feature_level

    def __call__(self, model: nn.Module, batch: Mapping[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"][0]  # (copies, 4, P, P, P): one case per step, already completed in the data pipeline
        copies = x.shape[0]
        available = torch.ones(copies, 4, dtype=torch.bool, device=x.device)
        out = model(x, available, batch["origin"].expand(copies, 3))
        target = region_targets(batch["label"]).expand(copies, -1, -1, -1, -1)
        seg = sum(edice(o, target) for o in out.outputs)
        if copies == 2:
            # upstream's style[feature_level + 1] of [c2d, c3d, c4d, out4]: out4 for the README's feature_level 2
            level = [*out.style, out.outputs[0]][self.feature_level + 1].float()
            consistency = F.mse_loss(level[0], level[1])
        elif copies == 3:
            style = out.style[self.feature_level].float()
            consistency = sum(F.mse_loss(style[i], style[j]) for i, j in itertools.combinations(range(3), 2)) / 6
        else:
            raise ValueError(f"the consistency term needs 2 or 3 copies (--batch_size), got {copies}")
        loss = seg + self.weight_kl * consistency
        return loss, {"seg": float(seg.detach()), "consistency": float(consistency.detach())}


def load_pretrained(model: M3AE, path: str | Path) -> None:
    """Load a pre-training checkpoint (ours or upstream's ``model_1model_best_599.pth.tar``) into a fine-tuning model.

    Everything but the 4-channel output conv is taken; the new head and the deep-supervision heads keep their fresh
    initialisation (upstream deletes ``unet.up1conv.*`` and loads the rest non-strictly). Any other difference is an
    usage error that names the keys.
    """
    state = {k: v for k, v in load_m3ae_checkpoint(path)["state_dict"].items() if not k.startswith("unet.up1conv.")}
    own = model.state_dict()
    fresh = {k for k in own if k.startswith(("unet.up1conv.", "unet.ds_out."))}
    missing = sorted(set(own) - set(state) - fresh)
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise UsageError(
            f"{path} is not an M3AE pre-training checkpoint for this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    model.load_state_dict(state, strict=False)


def pretrained_architecture(path: str | Path) -> dict[str, Any]:
    """Architecture fields a fine-tuning model must share with the pre-trained weights (from their shapes)."""
    state = load_m3ae_checkpoint(path)["state_dict"]
    z, y, x = state["limage"].shape[2:]
    return {"init_channels": int(state["unet.conv1a.weight"].shape[0]), "image_shape": (int(x), int(y), int(z))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3ae/train.py", description=__doc__.splitlines()[0])
    add_data_args(p)
    add_runtime_args(p)
    add_m3ae_data_flags(p)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--pretrained", default=None, help="pre-training checkpoint (required unless --resume)")
    g.add_argument("--epochs", "--num_epochs", dest="epochs", type=int, default=300)
    g.add_argument(
        "--batch_size", "-b", "--batch-size", dest="batch_size", type=int, default=2, choices=[2, 3],
        help="copies of each case per step (2 or 3; upstream's default 1 fails in its consistency term)",
    )  # fmt: skip
    g.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=3e-4)
    g.add_argument("--wd", "--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=1e-5)
    g.add_argument("--mdp", type=int, default=3, help="at most this many modalities dropped per copy (README 3)")
    g.add_argument("--weight_kl", type=float, default=1.0, help="weight of the consistency term (README 0.1)")
    g.add_argument(
        "--feature_level", type=int, default=2, choices=[0, 1, 2],
        help="features of the consistency term: 2 copies c3d/c4d/out4, 3 copies c2d/c3d/c4d (README 2)",
    )  # fmt: skip
    g.add_argument("--deep_supervised", action="store_true", help="deep-supervision heads (README: on)")
    g.add_argument("--patch_shape", type=int, default=None, help="window side (default: the preset's, paper 128)")
    g.add_argument("--num_classes", type=int, default=3, choices=[3], help="region outputs (3)")
    g.add_argument("--seed", type=int, default=999)
    g.add_argument("--resume", default=None, help="our model_last.pth to continue from")
    add_train_overwrite_arg(g)
    g.add_argument("--iter_per_epoch", type=int, default=None, help="steps per epoch (default N_train, upstream)")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    add_compile_arg(g)
    add_progress_arg(g)
    add_preset_arg(g, "m3ae", model_sizes())
    add_val_args(g)
    add_compat_flags(
        p,
        [
            (["--start_epoch", "--start-epoch"], {"dest": "start_epoch", "type": int, "default": 0}),
            (["--part", "--data_part"], {"dest": "part", "type": float, "default": 1.0}),
            (["--all_data"], {"action": "store_true"}),
            (["--semi_proportion"], {"type": float, "default": 1}),
            (["--use_weight"], {"action": "store_true"}),
            (["--model_type"], {"default": "cnnnet"}),
            (["--val"], {"type": int, "default": 20}),
            (["--fold"], {"type": int, "default": 0}),
        ],
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    default_savepath(args, "baseline3_real")
    reject_variants(
        parser, args, {"start_epoch": 0, "part": 1.0, "all_data": False, "semi_proportion": 1.0, "use_weight": False}
    )
    if not args.pretrained and not args.resume:
        parser.error("give the pre-trained checkpoint with --pretrained (or continue a run with --resume)")
    if args.mdp < 0:
        parser.error(f"--mdp must be >= 0, got {args.mdp}")
    if args.mdp == 0:
        log.warning("--mdp 0: every copy keeps all four modalities (upstream's silent default)")
    apply_devices(args.devices)
    setup_logging(args.savepath, "train.txt")
    seed_everything(args.seed)

    # every input is checked before the cache is built and before the trainer makes --savepath
    if args.raw_path is None:  # otherwise ensure_cache builds the cache from --raw_path below
        check_preprocessed_folder(args.datapath)
    split = load_split(split_dir(args))
    val_epochs = select_val_epochs(UPSTREAM_VAL_EPOCHS, args.epochs, args.debug, args.val_every)
    if val_epochs:  # its cases are checked with the cache below
        val_list = [c for c, _ in split.val]
        check_validation_cases(args.datapath, val_list, split_dir(args) / "val15splits.csv", check_files=False)
    if args.resume:  # the architecture of the run being continued; the trainer loads its weights and states
        resumed = load_m3ae_checkpoint(args.resume)
        model = model_to_resume(args.resume)
    else:
        overrides: dict[str, Any] = {"deep_supervised": args.deep_supervised}
        if args.patch_shape:
            overrides["patch_size"] = args.patch_shape
        model = build_method("m3ae", args.preset, **overrides, **pretrained_architecture(args.pretrained))
        load_pretrained(model, args.pretrained)
        log.info("loaded the pre-trained encoder, decoder and completion image from %s", args.pretrained)
    if model.config.pre_train:
        parser.error(f"{args.resume} is a pre-training checkpoint: give it with --pretrained to start fine-tuning")
    ensure_cache(args.datapath, split.train + [c for c, _ in split.val], args.raw_path, args.workers)
    model.limage.requires_grad_(False)  # frozen in fine-tuning; the data pipeline fills missing input from a copy
    optimizer = torch.optim.Adam(model.network_parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

    if args.resume:  # the frozen completion image of the run being continued feeds the data pipeline
        model.limage.data.copy_(resumed["state_dict"]["limage"])
    dataset = FinetuneDataset(
        args.datapath, split.train, model.patch_size, completion_array(model), copies=args.batch_size, mdp=args.mdp
    )
    device = resolve_device(args.device)
    options = EvalOptions(progress=not args.no_progress)
    # a sample is one window's --batch_size copies; under torchrun each process takes its own window
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    config = FitConfig.from_args(
        args, model, num_epochs=args.epochs, batch_size=processes, val_epochs=set(val_epochs),
        extra={"stage": "finetune"},
    )  # fmt: skip
    log.info(
        "M3AE fine-tuning on %d cases (%d val), %d copies per step, mdp %d → %s",
        len(split.train), len(split.val), args.batch_size, args.mdp, args.savepath,
    )  # fmt: skip

    def run_validation(m: nn.Module, epoch: int) -> dict[str, float]:
        return validate(m, args.datapath, split.val, options, device)  # type: ignore[arg-type]

    loss = FinetuneLoss(args.weight_kl, args.feature_level)
    result = Trainer(model, loss, optimizer, config, scheduler, run_validation).run_training(dataset)
    log.info("done: %d steps, last checkpoint %s, best validation mean Dice %.4f", result.global_step,
             result.last_checkpoint, result.best_score)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
