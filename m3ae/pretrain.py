"""M3AE stage 1, masked-autoencoder pre-training (upstream ``m3ae/pretrain.py``).

    python m3ae/pretrain.py --datapath <m3ae cache> --raw_path <BraTS folder> --exp_name m3ae_pretrain \
        --batch_size 2 --mdp 3 --dataset brats23 --mask_ratio 0.875 --lr 0.0003

Every sample: a 128³ window of a training case; ``k ~ U{0..mdp}`` whole modalities dropped, then exactly 256 of the
2048 16³ tokens (of the kept modalities) stay visible, the rest is replaced by the learned completion image at the
same position in the original grid. Loss: MSE of the reconstruction against the unmasked window + 0.005 · ‖limage −
its per-channel spatial mean‖. Adam (network ``--lr``, completion image ``--limage_lr`` 0.005), cosine schedule per
epoch. Writes ``model_last.pth`` every epoch and ``model_1model_best_<epoch>.pth`` every ``--val`` epochs.
"""

from __future__ import annotations

import argparse
import logging
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
from brats_core.data.splits import read_case_list
from brats_core.engine.evaluation import check_preprocessed_folder
from brats_core.engine.training import FitConfig, Trainer, seed_everything
from brats_core.registry import build_method
from brats_core.utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap
from brats_core.utils.cli import add_progress_arg, run_main, setup_logging
from m3ae.common import (
    add_compat_flags,
    add_m3ae_data_flags,
    apply_devices,
    default_savepath,
    model_sizes,
    pretrain_preset,
    reject_variants,
)
from m3ae.data import PretrainDataset, ensure_cache
from m3ae.model import model_to_resume, tokens_to_voxels

log = logging.getLogger("m3ae.pretrain")

LIMAGE_REGULARISER = 0.005
M3AE_KEYS = ("limage", "unet.conv1a.weight", "unet.up1conv.weight")
"""Weights every M3AE checkpoint holds (pre-training or fine-tuning; ours or upstream's)."""


def load_m3ae_checkpoint(path: str | Path) -> dict[str, Any]:
    """``load_checkpoint`` for the M3AE scripts: another method's checkpoint, or one without M3AE's weights, is
    refused naming the file (before any work), instead of failing deep inside the model builder.

    Raises:
        CheckpointError: unreadable, another method's, or no M3AE weights.
    """
    ckpt = load_checkpoint(path)
    method = ckpt.get("method", "m3ae")
    if method != "m3ae":
        raise CheckpointError(f"{path} holds a {method!r} model, not M3AE")
    missing = [k for k in M3AE_KEYS if k not in ckpt["state_dict"]]
    if missing:
        raise CheckpointError(f"{path} holds no M3AE weights (no {', '.join(missing)})")
    return ckpt


class PretrainLoss:
    """``mean (x − recon)² + weight · ‖limage − mean_xyz(limage)‖₂`` (a ``brats_core.engine.training.LossFn``)."""

    def __init__(self, weight: float = LIMAGE_REGULARISER) -> None:
        self.weight = weight

    def __call__(self, model: nn.Module, batch: Mapping[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"]
        visible = tokens_to_voxels(batch["tokens"], x.shape[-1])
        recon = model(x, visible, batch["origin"]).outputs[-1]
        mse = F.mse_loss(recon.float(), x.float())
        limage = unwrap(model).limage
        reg = torch.linalg.vector_norm(limage - limage.mean(dim=(2, 3, 4), keepdim=True))
        return mse + self.weight * reg, {"mse": float(mse.detach()), "limage_norm": float(reg.detach())}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3ae/pretrain.py", description=__doc__.splitlines()[0])
    add_data_args(p)
    add_runtime_args(p)
    add_m3ae_data_flags(p)
    g = p.add_argument_group("pre-training")
    g.add_argument("--epochs", "--num_epochs", dest="epochs", type=int, default=600)
    g.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", type=int, default=1)
    g.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=3e-4, help="network learning rate")
    g.add_argument("--limage_lr", type=float, default=0.005, help="learning rate of the completion image")
    g.add_argument("--wd", "--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=0.0)
    g.add_argument("--mask_ratio", type=float, default=0.875, help="fraction of tokens replaced by limage")
    g.add_argument("--mdp", type=int, default=3, help="at most this many whole modalities dropped per sample")
    g.add_argument("--val", type=int, default=50, help="write model_1model_best_<epoch>.pth every N epochs")
    g.add_argument("--num_classes", type=int, default=4, choices=[4], help="reconstructed channels (4)")
    g.add_argument("--seed", type=int, default=999)
    g.add_argument("--resume", default=None, help="our model_last.pth to continue from")
    add_train_overwrite_arg(g)
    g.add_argument("--iter_per_epoch", type=int, default=None, help="steps per epoch (default N_train // batch)")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    add_compile_arg(g)
    add_progress_arg(g)
    add_preset_arg(g, "m3ae", model_sizes())
    g.add_argument("--patch_size", type=int, default=None, help="window side (default: the preset's, paper 128)")
    add_compat_flags(
        p,
        [
            (["--start-epoch", "--start_epoch"], {"dest": "start_epoch", "type": int, "default": 0}),
            (["--model_type"], {"default": "vtnet"}),
            (["--dataset"], {"default": "brats23", "choices": ["brats18", "brats20", "brats23"]}),
            (["--fold"], {"type": int, "default": 0}),
            (["--debug"], {"action": "store_true"}),
        ],
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    default_savepath(args, "patch16mask875_mdp3_inversion_reg2_005")
    reject_variants(parser, args, {"start_epoch": 0})  # upstream's --start-epoch skips epochs of the schedule
    if args.batch_size < 1 or args.epochs < 1 or args.val < 1:
        parser.error("--batch_size, --epochs and --val must be positive")
    apply_devices(args.devices)
    setup_logging(args.savepath, "pretrain.txt")
    seed_everything(args.seed)

    # every input is checked before the cache is built and before the trainer makes --savepath
    if args.raw_path is None:  # otherwise ensure_cache builds the cache from --raw_path below
        check_preprocessed_folder(args.datapath)
    train = read_case_list(split_dir(args) / "train.txt")
    if len(train) < args.batch_size:
        parser.error(f"--batch_size {args.batch_size} exceeds the {len(train)} training cases")
    if args.resume:  # the architecture of the run being continued; the trainer loads its weights and states
        load_m3ae_checkpoint(args.resume)
        model = model_to_resume(args.resume)
        if not model.config.pre_train:
            parser.error(f"--resume {args.resume} is not a pre-training checkpoint")
    else:
        overrides: dict[str, Any] = {"mask_ratio": args.mask_ratio}
        if args.patch_size:
            overrides["patch_size"] = args.patch_size
        model = build_method("m3ae", pretrain_preset(args.preset), **overrides)
    ensure_cache(args.datapath, train, args.raw_path, args.workers)
    cfg = model.config
    optimizer = torch.optim.Adam(
        [{"params": model.network_parameters(), "lr": args.lr}, {"params": [model.limage], "lr": args.limage_lr}],
        weight_decay=args.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    dataset = PretrainDataset(args.datapath, train, cfg.patch_size, cfg.token_grid, cfg.visible_tokens, args.mdp)
    config = FitConfig.from_args(
        args, model, num_epochs=args.epochs, extra={"stage": "pretrain"},
        # upstream: a plain DataLoader with drop_last, i.e. N_train // batch steps per epoch
        iter_per_epoch=args.iter_per_epoch or max(1, len(train) // args.batch_size),
        val_epochs=set(range(args.val, args.epochs + 1, args.val)),
    )  # fmt: skip

    def snapshot(m: nn.Module, epoch: int) -> dict[str, float]:
        # upstream's periodic copy, named with the 0-based epoch (…_599 after 600 epochs); no validation here
        save_checkpoint(config.savepath / f"model_1model_best_{epoch}.pth", m, epoch=epoch, **config.extra)
        return {}

    log.info(
        "M3AE pre-training on %d cases: window %d³, %d of %d tokens visible, mdp %d → %s",
        len(train), cfg.patch_size, cfg.visible_tokens, 4 * cfg.token_grid**3, args.mdp, args.savepath,
    )  # fmt: skip
    result = Trainer(model, PretrainLoss(), optimizer, config, scheduler, snapshot).run_training(dataset)
    log.info("done: %d steps, last checkpoint %s", result.global_step, result.last_checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
