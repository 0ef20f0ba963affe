# ruff: noqa: N999 - the upstream script name (train_SS.py) is part of the documented command line
"""Train ShaSpec (upstream ``ShaSpec/train_SS.py``, METHODS.md §7.3): warm-up with all modalities, then random-missing.

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
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from brats_core.checkpoint import load_checkpoint, load_state_dict_strict, rng_state, save_checkpoint, set_rng_state
from brats_core.cli import UsageError, add_runtime_args, add_train_overwrite_arg, args_dict, run_main, setup_logging
from brats_core.data import EpochSampler, check_validation_cases, load_case, seed_worker
from brats_core.io import remove_stale_temporaries
from brats_core.losses import region_dice_bce
from brats_core.modalities import FULL, METHOD_ORDERS, Mask, parse_bool_list, parse_shaspec_mode
from brats_core.registry import build_from_config, build_method, config_dict
from brats_core.training import (
    amp_context,
    check_step_finite,
    claim_run_folder,
    grad_scaler,
    load_optimizer_state,
    resolve_device,
    seed_everything,
)
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
"""Upstream's validation iterations (1-based), METHODS.md §7.3."""


def poly_lr(base_lr: float, iteration: int, num_steps: int, power: float = 0.9) -> float:
    """``base_lr·(1 − i/num_steps)^power`` with ``i`` clamped to ``[0, num_steps]``: 0 from ``num_steps`` on (upstream
    raised a negative number to 0.9 there and got a complex learning rate)."""
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    i = min(max(iteration, 0), num_steps)
    return base_lr * (1.0 - i / num_steps) ** power


def validation_iterations(warm_up: bool, num_steps: int) -> list[int]:
    """Upstream's list for the run (``--warm_up`` or not) up to ``num_steps``, plus ``num_steps`` itself so that
    every run ends with a validated ``best.pth`` (upstream's lists end at their ``num_steps`` anyway)."""
    upstream = WARM_UP_VAL_ITERS if warm_up else TRAIN_VAL_ITERS
    return sorted({i for i in upstream if i <= num_steps} | {num_steps})


def shaspec_loss(out: ShaSpecOutput, regions: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """``Dice + BCE + 0.1·L_shared + 0.02·L_spec`` (§7.3).

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
    g.add_argument("--num_steps", type=int, default=40000, help="last GLOBAL iteration of the poly schedule")
    g.add_argument("--start_iters", type=int, default=0)
    g.add_argument("--val_pred_every", type=int, default=875, help="write last.pth every N iterations")
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
    o.add_argument("--preset", default="paper", choices=["paper", "tiny"], help="architecture preset")
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
    o.add_argument("--log_every", type=int, default=50)
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


def main(argv: Sequence[str] | None = None, on_step: Callable[[int, float], None] | None = None) -> int:
    """Run the training; ``on_step(iteration, lr)`` is called after every optimiser step (tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    snapshot = Path(args.snapshot_dir)
    setup_logging(snapshot, "train_log.txt")
    seed_everything(args.random_seed)
    device = resolve_device(args.device)
    if args.mode.strip().lower() != "random":
        try:
            parse_shaspec_mode(args.mode)
        except ValueError as err:
            parser.error(str(err))

    resume_path = args.continue_path or (args.reload_path if args.reload_from_checkpoint else None)
    claim = partial(
        claim_run_folder,
        snapshot, resume_path, args.overwrite, checkpoints=SNAPSHOTS, continue_with="--continue {savepath}/last.pth",
    )  # fmt: skip
    try:
        claim(delete=False)  # refuse at once; --overwrite deletes only once every input has been checked
    except UsageError as err:
        parser.error(str(err))
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt is not None and ckpt.get("method", "shaspec") != "shaspec":
        parser.error(f"{resume_path} holds a {ckpt['method']!r} model, not ShaSpec")
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
    crop = (model.config.patch_depth, model.config.patch_size, model.config.patch_size)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=MOMENTUM, nesterov=True)
    scaler = grad_scaler(device, args.amp)

    start, best = args.start_iters, -math.inf
    if ckpt is not None:
        load_state_dict_strict(model, ckpt["state_dict"], str(resume_path))
        if "optimizer" in ckpt:
            load_optimizer_state(optimizer, ckpt["optimizer"], resume_path)
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        if "iter" in ckpt:
            start = int(ckpt["iter"]) + 1
        else:  # weights only (a .safetensors export, a bare state dict)
            log.warning("%s records no iteration: starting at --start_iters %d", resume_path, start)
        # upstream restores val_Dice_best on every reload, the warm-up's best.pth included: the random-missing run
        # then writes its best.pth only when it beats the warm-up's score
        best = float(ckpt.get("best_score", -math.inf))
        if args.continue_path and "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        log.info("continuing from %s at global iteration %d", resume_path, start)

    # the lists and every case before the cache is built, and all of it before the snapshot folder is made
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
    val_iters = set() if args.train_only else set(validation_iterations(args.warm_up, args.num_steps))
    dataset = ShaSpecTrainDataset(
        cache, train_cases, crop, mode=args.mode, random_scale=args.random_scale, random_mirror=args.random_mirror,
        augment=not args.no_augmentation, reference_quirks=args.reference_quirks,
    )  # fmt: skip
    claim()
    snapshot.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(snapshot)  # what runs killed while writing a snapshot left
    # one stream of num_steps·batch samples (upstream repeats the list to that length); a reload skips what is done
    sampler = EpochSampler(len(train_cases), args.num_steps * args.batch_size, args.random_seed)
    sampler.set_epoch(0, skip=min(start, args.num_steps) * args.batch_size)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, worker_init_fn=seed_worker,
        pin_memory=device.type == "cuda", drop_last=True,
    )  # fmt: skip
    extra = {"method": "shaspec", "config": config_dict(model), "args": args_dict(args)}

    def save(name: str, iteration: int) -> None:
        save_checkpoint(
            snapshot / name, model, iter=iteration, best_score=best, optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict() if scaler.is_enabled() else None, rng=rng_state(), **extra,
        )  # fmt: skip

    log.info(
        "ShaSpec %s: %d training cases, crop %s, mode %s, global iterations %d..%d, %d validations",
        "warm-up" if args.warm_up else "training", len(train_cases), crop, args.mode, start, args.num_steps - 1,
        len([i for i in val_iters if i > start]),
    )  # fmt: skip
    if start >= args.num_steps:
        log.warning(
            "nothing to do: the run continues at iteration %d and --num_steps %d ends before it", start, args.num_steps
        )
    t0 = time.time()
    iteration = start - 1
    for iteration, batch in zip(range(start, args.num_steps), loader, strict=False):
        lr = poly_lr(args.learning_rate, iteration, args.num_steps, args.power)
        for group in optimizer.param_groups:
            group["lr"] = lr
        image = batch["image"].to(device, non_blocking=True)
        regions = batch["regions"].to(device, non_blocking=True)
        with amp_context(device, args.amp):
            out = model(image, batch["mask"].to(device))
            loss, parts = shaspec_loss(out, regions)
        check_step_finite(loss, {"image": image, "name": batch["name"]}, cache, f"iteration {iteration}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if on_step is not None:
            on_step(iteration, lr)
        if iteration % args.log_every == 0:
            log.info(
                "iter %d/%d lr %.3e loss %.4f (seg %.4f shared %.4f spec %.4f) %.1fs", iteration, args.num_steps, lr,
                float(loss.detach()), parts["seg"], parts["shared"], parts["spec"], time.time() - t0,
            )  # fmt: skip
        if iteration + 1 in val_iters:
            scores = validate(model, cache, val_rows)
            log.info("validation at %d: %s", iteration + 1, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            if scores["mean_dice"] > best:
                best = scores["mean_dice"]
                save("best.pth", iteration)
        if (iteration + 1) % args.val_pred_every == 0:
            save("last.pth", iteration)
        if iteration >= args.num_steps - 1:
            save("final.pth", iteration)
    if iteration >= start:
        save("last.pth", iteration)
    log.info(
        "done at global iteration %d; best validation mean Dice %.4f; checkpoints in %s", iteration, best, snapshot
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
