"""Training-step time and peak memory per method: forward + the method's loss + backward + optimiser step.

    python benchmarks/train_step.py --methods imfuse,mmformer --patch 32 --batch 1 --steps 3 --threads 2

Each method runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``, CPU) or peak CUDA memory is
its own. The model is the paper configuration (``paper`` preset, IM-Fuse with ``--mamba_skip
--interleaved_tokenization``) with ``--patch`` overriding the window side (``--patch 0``: each method's paper patch),
the loss and optimiser are the ones its train script uses, inputs are random with a random label map and a random
scenario per sample. Reported: the median step time after one warm-up step. ``--amp`` (CUDA only) adds an AMP column
measured in the same subprocess after the fp32 one.

M3AE: the batch is the ``--batch_size`` copies of ONE window that its fine-tuning step uses (2, with the consistency
term; the frozen completion image gets no gradient); ShaSpec: its crop is ``patch_depth × patch × patch``; MaM: the
network and losses of its nnU-Net trainer (nnU-Net's DC + BCE with deep supervision + the reconstruction term) and
its SGD, without nnU-Net's data pipeline.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

PAPER_BATCH = {"imfuse": 1, "mmformer": 3, "robustseg": 1, "sfusion": 1, "uhved": 1, "m3ae": 2, "shaspec": 1, "mam": 1}


def _loss_and_optimiser(method: str, model: torch.nn.Module) -> tuple[Callable[..., Any], torch.optim.Optimizer]:
    """The loss and optimiser of the method's train script, as ``loss_fn(model, batch, epoch) -> (loss, parts)`` on
    the shared random batch (see :func:`random_batch`)."""
    params = model.parameters()
    if method in ("imfuse", "mmformer"):
        from brats_core.nn.losses import FusedSeparateDeepLoss

        opt = (
            torch.optim.RAdam(params, lr=2e-4, weight_decay=3e-5)
            if method == "imfuse"
            else torch.optim.Adam(params, lr=2e-4, weight_decay=1e-4, amsgrad=True)
        )
        return FusedSeparateDeepLoss(), opt
    if method in ("robustseg", "sfusion"):
        from brats_core.nn.losses import RMBTSLoss

        return RMBTSLoss(), torch.optim.Adam(params, lr=1e-4, weight_decay=1e-4, amsgrad=True)
    if method == "uhved":
        from UHVED.losses import UHVEDLoss

        return UHVEDLoss(), torch.optim.Adam(params, lr=1e-3, weight_decay=1e-5, amsgrad=True)
    if method == "m3ae":
        from m3ae.train import FinetuneLoss

        model.limage.requires_grad_(False)  # frozen in fine-tuning, as m3ae/train.py
        # the batch's samples are the copies of ONE window (m3ae/train.py: --batch_size copies, one case per step)
        finetune = FinetuneLoss(weight_kl=0.1, feature_level=2)

        def m3ae_loss(m: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int) -> tuple[torch.Tensor, Any]:
            copies = {"image": batch["image"][None], "label": batch["label"][:1], "origin": batch["origin"][:1]}
            return finetune(m, copies, epoch)

        return m3ae_loss, torch.optim.Adam(model.network_parameters(), lr=3e-4, weight_decay=1e-5)
    if method == "shaspec":
        from ShaSpec.model import region_targets
        from ShaSpec.train_SS import shaspec_loss

        def shaspec_step_loss(m: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int) -> tuple[Any, Any]:
            return shaspec_loss(m(batch["image"], batch["mask"]), region_targets(batch["label"]))

        return shaspec_step_loss, torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True)
    if method == "mam":
        return _mam_loss(), torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    raise SystemExit(f"benchmarks/train_step.py: no loss recipe for {method!r}")


def _mam_loss() -> Callable[..., Any]:
    """nnU-Net's region loss as ``nnUNetTrainer._build_loss`` builds it (DC + BCE, deep supervision weights 1, ½, …,
    0 normalised) plus MaM's bottleneck reconstruction term; targets are the label's WT/TC/ET maps at every output
    resolution (nearest), as nnU-Net's deep-supervision pyramids."""
    import numpy as np
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from brats_core.modalities import permutation
    from MaM.model import NATIVE_ORDER, reconstruction_loss

    to_native = permutation(NATIVE_ORDER)

    base = DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss)  # fmt: skip

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int) -> tuple[torch.Tensor, Any]:
        out = m(batch["image"], batch["mask"], full_output=True)
        label = batch["label"]
        regions = torch.stack([label >= 1, (label == 1) | (label == 3), label == 3], dim=1).float()  # WT, TC, ET
        targets = [torch.nn.functional.interpolate(regions, size=s.shape[2:], mode="nearest") for s in out.seg]
        weights = np.array([1 / 2**i for i in range(len(out.seg))])
        weights[-1] = 0
        seg = DeepSupervisionWrapper(base, weights / weights.sum())(out.seg, targets)
        return seg + reconstruction_loss(out, batch["mask"][:, to_native]), None

    return loss


def build_paper_model(method: str, patch: int = 0, **extra: Any) -> Any:
    """The method's paper configuration (``report.PAPER_OVERRIDES`` included, e.g. IM-Fuse's ``--mamba_skip
    --interleaved_tokenization``) with window side ``patch`` (0: the paper's; ShaSpec: ``patch``³) and ``extra``
    config overrides (e.g. activation checkpointing)."""
    from brats_core.apps.report import PAPER_OVERRIDES
    from brats_core.registry import build_method

    overrides = {**PAPER_OVERRIDES.get(method, {}), **extra}
    if patch:
        overrides["patch_size"] = patch
        if method == "shaspec":  # its crop is patch_depth × patch_size × patch_size
            overrides["patch_depth"] = patch
    return build_method(method, "paper", **overrides)


def window_shape(model: Any) -> tuple[int, int, int]:
    """The training window of a model in the canonical ``(X, Y, Z)`` order of its input (ShaSpec's paper window is
    160 × 160 × 80: ``patch_size`` is a tuple where the window is not a cube)."""
    p = model.patch_size
    return tuple(int(s) for s in p) if isinstance(p, tuple) else (p, p, p)  # type: ignore[return-value]


def random_batch(batch: int, shape: Sequence[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random training batch on the CPU: image ``(B, 4, *shape)``, label ``(B, *shape)`` in 0–3, one random
    scenario mask ``(B, 4)`` per sample, and M3AE's window origin ``(B, 3)`` (the image corner)."""
    from brats_core.modalities import SCENARIOS

    masks = torch.stack([SCENARIOS[int(torch.randint(15, (1,), generator=gen))].tensor(1)[0] for _ in range(batch)])
    return {
        "image": torch.randn(batch, 4, *shape, generator=gen),
        "label": torch.randint(0, 4, (batch, *shape), generator=gen),
        "mask": masks,
        "origin": torch.zeros(batch, 3, dtype=torch.int64),
    }


def _one_method(
    method: str, patch: int, batch: int, steps: int, device: str, amp: bool, **extra: Any
) -> dict[str, object]:
    """Time training steps of the paper model (``extra``: config overrides, e.g. activation checkpointing)."""
    from brats_core.registry import count_parameters, method_info

    torch.manual_seed(0)
    model = build_paper_model(method, patch, **extra).to(device).train()
    p = model.patch_size
    shape = window_shape(model)
    loss_fn, optimizer = _loss_and_optimiser(method, model)
    gen = torch.Generator().manual_seed(0)
    row: dict[str, object] = {
        "method": method, "display": method_info(method).display,
        "patch": "×".join(map(str, shape)) if len(set(shape)) > 1 else f"{p}³", "batch": batch,
        "params": count_parameters(model),
    }  # fmt: skip

    def run(use_amp: bool) -> list[float]:
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        times = []
        for _ in range(steps + 1):
            data = {k: v.to(device) for k, v in random_batch(batch, shape, gen).items()}
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                loss, _ = loss_fn(model, data, 0)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times[1:]

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row["step_s"] = statistics.median(run(False))
    if device == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if amp:
            torch.cuda.reset_peak_memory_stats()
            row["amp_step_s"] = statistics.median(run(True))
            row["amp_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/train_step.py", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(PAPER_BATCH))
    p.add_argument("--patch", type=int, default=0, help="window side (0: each method's paper patch)")
    p.add_argument("--batch", type=int, default=0, help="batch size (0: each method's paper batch)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", action="store_true", help="also time AMP steps (CUDA)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        batch = args.batch or PAPER_BATCH.get(args.worker, 1)
        print(json.dumps(_one_method(args.worker, args.patch, batch, args.steps, args.device, args.amp)))
        return 0
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", method, *[a for a in (argv or sys.argv[1:])]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"method": method, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    mem = "peak GPU GB" if args.device == "cuda" else "peak RSS GB"
    print(f"\n| method | patch | batch | params | step s | {mem} |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | | | | failed: {r['error']} | |")
            continue
        peak = r.get("peak_gb", r.get("peak_rss_gb"))
        size = f"{r['patch']} | {r['batch']} | {r['params'] / 1e6:.2f} M"
        print(f"| {r['display']} | {size} | {r['step_s']:.2f} | {peak:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
