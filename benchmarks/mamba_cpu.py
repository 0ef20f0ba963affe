"""CPU benchmark of one Mamba block (``brats_core.nn.mamba.Mamba``) forward + backward at IM-Fuse's extreme sizes.

Cases (batch 1, fp32; IM-Fuse's block sizes):

* ``bottleneck`` – d_model 512, d_state 256, L 2 560 (the 8³ bottleneck MFB); target ≤ 6 s, ≤ 0.6 GB.
* ``skip64`` – d_model 16, d_state 16, L 1 310 720 (the 64³ skip MFB); target ≤ 20 s, ≤ 6 GB.

Every case runs in a fresh subprocess (``--worker``), so allocations of one case cannot inflate another's peak.

What is measured, honestly:

* time – wall-clock seconds of ``out = block(x); out.sum().backward()`` (``torch.set_num_threads(--threads)``),
  ``--repeats`` times after a small warm-up; the table shows the minimum and the median. Other processes on the
  machine slow this down (with 2 threads on 2 shared cores, OpenMP barriers make contention very costly); the load
  average at start is printed.
* memory – growth of the worker's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``, a high-water mark) over its RSS
  after building the block and its input and running the warm-up. It therefore counts everything the block's
  forward + backward allocates (activations kept for backward, scan buffers, input and parameter gradients, allocator
  slack) and excludes the interpreter, torch, the parameters and the input itself.
* baseline – the sequential ``reference`` scan backend vs the default ``chunked`` backend, same block, on a short
  prefix of the sequence (the reference keeps one (b, d, n) state per step for autograd, so full length is
  infeasible); the ratio is what the chunked scan saves there, and the reference's full-length time is a linear
  extrapolation, marked as such.

Usage: ``python benchmarks/mamba_cpu.py [--threads 2] [--repeats 3] [--cases bottleneck skip64]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    d_model: int
    d_state: int
    length: int
    target_s: float
    target_gb: float
    short_length: int  # prefix length for the reference-backend baseline


CASES: dict[str, Case] = {
    "bottleneck": Case(d_model=512, d_state=256, length=2560, target_s=6.0, target_gb=0.6, short_length=128),
    "skip64": Case(d_model=16, d_state=16, length=1_310_720, target_s=20.0, target_gb=6.0, short_length=4096),
}


def _maxrss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def worker(case_name: str, threads: int, repeats: int, backend: str, length: int | None) -> dict:
    """Run inside a fresh process: time ``repeats`` forward + backward passes and report the peak RSS growth."""
    import torch

    sys.path.insert(0, str(REPO))
    from brats_core.nn.mamba import Mamba

    torch.set_num_threads(threads)
    case = CASES[case_name]
    seq_len = length or case.length
    torch.manual_seed(0)
    block = Mamba(case.d_model, d_state=case.d_state, backend=backend)
    x = torch.randn(1, seq_len, case.d_model, requires_grad=True)

    warm = torch.randn(1, min(64, seq_len), case.d_model, requires_grad=True)
    block(warm).sum().backward()
    block.zero_grad(set_to_none=True)
    base = _maxrss_bytes()

    fwd_times, total_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = block(x)
        t1 = time.perf_counter()
        out.sum().backward()
        t2 = time.perf_counter()
        fwd_times.append(t1 - t0)
        total_times.append(t2 - t0)
        del out
        x.grad = None
        block.zero_grad(set_to_none=True)
    peak = _maxrss_bytes()
    return {
        "case": case_name,
        "backend": backend,
        "length": seq_len,
        "threads": threads,
        "fwd_s": fwd_times,
        "total_s": total_times,
        "rss_growth_bytes": peak - base,
        "peak_rss_bytes": peak,
    }


def run_worker(case: str, threads: int, repeats: int, backend: str, length: int | None = None) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        case,
        "--threads",
        str(threads),
        "--repeats",
        str(repeats),
        "--backend",
        backend,
    ]
    if length is not None:
        cmd += ["--length", str(length)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {case}/{backend} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward runs per case (default 3)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES), help="cases to run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the reference-backend baseline")
    parser.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="chunked", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.repeats, args.backend, args.length)))
        return

    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, threads={args.threads}, repeats={args.repeats}, "
        f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n"
    )
    print(
        "| case | d_model | d_state | L | fwd s (min) | fwd+bwd s (min / median) | target s "
        "| peak RSS growth GB | target GB | result |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    all_pass = True
    for name in args.cases:
        case = CASES[name]
        r = run_worker(name, args.threads, args.repeats, "chunked")
        t_min, t_med = min(r["total_s"]), statistics.median(r["total_s"])
        gb = r["rss_growth_bytes"] / 1e9
        ok = t_min <= case.target_s and gb <= case.target_gb
        all_pass &= ok
        print(
            f"| {name} | {case.d_model} | {case.d_state} | {case.length:,} | {min(r['fwd_s']):.2f} "
            f"| {t_min:.2f} / {t_med:.2f} | ≤ {case.target_s:g} | {gb:.2f} | ≤ {case.target_gb:g} "
            f"| {'PASS' if ok else 'FAIL'} |"
        )
        sys.stdout.flush()

    if not args.no_baseline:
        print("\nBaseline: sequential `reference` scan vs `chunked`, same block, short prefix (fwd+bwd, min of runs)\n")
        print(
            "| case | L (prefix) | reference s | chunked s | reference / chunked | reference at full L, extrapolated |"
        )
        print("|---|---|---|---|---|---|")
        for name in args.cases:
            case = CASES[name]
            ref = run_worker(name, args.threads, 1, "reference", case.short_length)
            chk = run_worker(name, args.threads, max(1, args.repeats), "chunked", case.short_length)
            t_ref, t_chk = min(ref["total_s"]), min(chk["total_s"])
            print(
                f"| {name} | {case.short_length:,} | {t_ref:.2f} | {t_chk:.3f} | {t_ref / t_chk:.1f}× "
                f"| ≈ {t_ref * case.length / case.short_length:.0f} s |"
            )
            sys.stdout.flush()
    print(f"\noverall: {'PASS' if all_pass else 'FAIL'}")


if __name__ == "__main__":
    main()
