"""Peak memory (RSS) of ONE ShaSpec training step at the paper crop on CPU, with and without activation checkpointing.

    python benchmarks/shaspec_memory.py [--size 80 160 160] [--limit_gb 12] [--threads 2] [--only on|off]

Each configuration runs in a fresh subprocess (``ru_maxrss`` is a per-process high-water mark): paper model, batch 1,
all four modalities, the training loss of ``ShaSpec/train_SS.py``, backward and one SGD step. A watchdog stops a run
whose RSS passes ``--limit_gb`` and reports it as exceeded instead of letting the machine swap or OOM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def _watchdog(limit_gb: float) -> None:
    while True:
        if _rss_gb() > limit_gb:
            print(json.dumps({"exceeded_gb": limit_gb}), flush=True)
            os._exit(3)
        time.sleep(0.05)


def _one_step(size: list[int], checkpointing: bool, limit_gb: float, threads: int) -> None:
    import torch

    from brats_core.registry import build_method
    from ShaSpec.train_SS import MOMENTUM, shaspec_loss

    torch.set_num_threads(threads)
    threading.Thread(target=_watchdog, args=(limit_gb,), daemon=True).start()
    torch.manual_seed(0)
    depth, side = size[0], size[1]
    model = build_method("shaspec", "paper", patch_depth=depth, patch_size=side, activation_checkpointing=checkpointing)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=MOMENTUM, nesterov=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    x = torch.randn(1, 4, side, side, depth)  # canonical (X, Y, Z): H, W, D
    regions = (torch.rand(1, 3, side, side, depth) > 0.9).float()
    mask = torch.ones(1, 4, dtype=torch.bool)
    t0 = time.time()
    loss, _ = shaspec_loss(model(x, mask), regions)
    t_forward = time.time() - t0
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({
        "checkpointing": checkpointing, "size_dhw": size, "peak_rss_gb": round(peak, 2),
        "rss_before_step_gb": round(before, 2), "forward_s": round(t_forward, 1), "step_s": round(time.time() - t0, 1),
        "threads": threads, "torch": torch.__version__,
    }), flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=3, default=[80, 160, 160], metavar=("D", "H", "W"))
    p.add_argument("--limit_gb", type=float, default=12.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["on", "off"], default=None, help="only with (on) or without (off) checkpointing")
    p.add_argument("--child", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size[1] != args.size[2]:
        p.error("--size: H and W must be equal")
    if args.child:
        _one_step(args.size, args.child == "on", args.limit_gb, args.threads)
        return 0
    for mode in [args.only] if args.only else ["on", "off"]:
        cmd = [sys.executable, "-m", "benchmarks.shaspec_memory", "--child", mode, "--limit_gb", str(args.limit_gb),
               "--threads", str(args.threads), "--size", *map(str, args.size)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
        out = json.loads(lines[-1]) if lines else {"error": result.stderr[-2000:]}
        print(json.dumps({"checkpointing": mode == "on", **out}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
