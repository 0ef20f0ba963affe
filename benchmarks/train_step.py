"""Training-step time and peak memory per method: forward + the method's loss + backward + optimiser step.

    python benchmarks/train_step.py --methods imfuse,mmformer --patch 32 --batch 1 --steps 3 --threads 2

Each method runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``, CPU) or peak CUDA memory is
its own. The model is the paper configuration (``paper`` preset, IM-Fuse with ``--mamba_skip
--interleaved_tokenization``) with ``--patch`` overriding the window side (``--patch 0``: each method's paper patch),
the loss and optimiser are the ones its train script uses, inputs are random with a random label map and a random
scenario per sample. Reported: the median step time after one warm-up step. ``--amp`` (CUDA only) adds an AMP column
measured in the same subprocess after the fp32 one.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

PAPER_BATCH = {"imfuse": 1, "mmformer": 3, "robustseg": 1, "sfusion": 1, "uhved": 1}


def _loss_and_optimiser(method: str, model: torch.nn.Module) -> tuple[object, torch.optim.Optimizer]:
    """The loss and optimiser of the method's train script (METHODS.md §1.5, §2.2, §3.2, §4.2, §5.2)."""
    params = model.parameters()
    if method in ("imfuse", "mmformer"):
        from brats_core.losses import FusedSeparateDeepLoss

        opt = (
            torch.optim.RAdam(params, lr=2e-4, weight_decay=3e-5)
            if method == "imfuse"
            else torch.optim.Adam(params, lr=2e-4, weight_decay=1e-4, amsgrad=True)
        )
        return FusedSeparateDeepLoss(), opt
    if method in ("robustseg", "sfusion"):
        from brats_core.rmbts import RMBTSLoss

        return RMBTSLoss(), torch.optim.Adam(params, lr=1e-4, weight_decay=1e-4, amsgrad=True)
    if method == "uhved":
        from UHVED.losses import UHVEDLoss

        return UHVEDLoss(), torch.optim.Adam(params, lr=1e-3, weight_decay=1e-5, amsgrad=True)
    raise SystemExit(f"benchmarks/train_step.py: no loss recipe for {method!r}")


def _one_method(method: str, patch: int, batch: int, steps: int, device: str, amp: bool) -> dict[str, object]:
    from brats_core.modalities import SCENARIOS
    from brats_core.registry import build_method, count_parameters
    from brats_core.report import PAPER_OVERRIDES

    torch.manual_seed(0)
    overrides = dict(PAPER_OVERRIDES.get(method, {}))
    if patch:
        overrides["patch_size"] = patch
    model = build_method(method, "paper", **overrides).to(device).train()
    p = model.patch_size
    loss_fn, optimizer = _loss_and_optimiser(method, model)
    gen = torch.Generator().manual_seed(0)
    row: dict[str, object] = {"method": method, "patch": p, "batch": batch, "params": count_parameters(model)}

    def run(use_amp: bool) -> list[float]:
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        times = []
        for _ in range(steps + 1):
            masks = torch.stack(
                [SCENARIOS[int(torch.randint(15, (1,), generator=gen))].tensor(1)[0] for _ in range(batch)]
            )
            data = {
                "image": torch.randn(batch, 4, p, p, p, generator=gen).to(device),
                "label": torch.randint(0, 4, (batch, p, p, p), generator=gen).to(device),
                "mask": masks.to(device),
            }
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
    p.add_argument("--methods", default="imfuse,mmformer,robustseg,sfusion,uhved")
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
        size = f"{r['patch']}³ | {r['batch']} | {r['params'] / 1e6:.2f} M"
        print(f"| {r['method']} | {size} | {r['step_s']:.2f} | {peak:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
