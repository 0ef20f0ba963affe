"""One-shot GPU check of the Mamba scan backends and of IM-Fuse training with AMP (issue #8); < 5 minutes on an H100.

Sections of the Markdown report (``--out``, default ``benchmarks/gpu_results.md``; it goes into
``benchmarks/RESULTS.md``):

1. versions – Python, torch, CUDA, GPU, triton, mamba-ssm / causal-conv1d (if importable), backends usable here.
2. parity – for each of IM-Fuse's five Mamba block sizes (d_inner × d_state of the paper preset with
   ``--first_skip --mamba_skip``, derived from ``IMFuse.model.IMFuseConfig``), the selective scan of every usable
   backend in fp32 on a prefix of the sequence vs the **fp64** chunked scan on the same device (the fp64 chunked
   scan equals the sequential reference to rounding, see ``tests/test_mamba.py``): max relative error (max |Δ| /
   max |ref|) of the output, the last state and the gradients of all eight inputs.
3. timing – one whole ``Mamba`` block (in/out projections, conv, scan, gate) at the full sequence length: forward
   (no grad) and forward + backward seconds (median of ``--repeats`` after a warm-up, ``torch.cuda.synchronize``d)
   and the peak of ``torch.cuda.max_memory_allocated`` above what was allocated before the call, for every usable
   backend at b = 1 and 2; the fwd+bwd ratio to the chunked backend measured in the same run, and the issue's
   target (Triton ≥ 5× chunked at every skip level).
4. train step – one IM-Fuse optimiser step (paper preset, ``mamba_skip`` + ``interleaved_tokenization``, b = 1, the
   ``FusedSeparateDeepLoss`` of ``train_poly.py``, RAdam) in fp32 and with ``--amp`` (``brats_core.utils.device.
   amp_context``: bf16 where supported, else fp16 with a GradScaler; the Mamba blocks stay fp32), Mamba backend
   ``auto``; seconds per step (median) and peak memory; target AMP ≥ 1.5× faster.

A global time budget (``--budget_s``) skips what no longer fits, and says so in the report. Without a CUDA device
the script prints a message and exits with status 0; ``--device cpu --quick`` runs every code path on tiny sizes on
CPU (the chunked backend only; AMP is a no-op there), which is what the CPU test suite does.

Usage::

    python benchmarks/gpu_check.py [--out benchmarks/gpu_results.md] [--repeats 3] [--budget_s 270]
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check_dry.md
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from brats_core.modalities import MODALITIES
from brats_core.nn import mamba as mamba_mod
from brats_core.utils.io import atomic_path
from IMFuse.model import MambaShape, mamba_shapes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "gpu_results.md"
SPEEDUP_TARGET = 5.0  # Triton vs chunked, fwd+bwd, every skip level (issue #8)
AMP_TARGET = 1.5  # AMP vs fp32 training step


def imfuse_blocks(quick: bool, max_len: int | None = None) -> list[MambaShape]:
    """The five Mamba block shapes of IM-Fuse's paper preset with ``first_skip`` and ``mamba_skip`` (the level-1 block
    exists only with ``--first_skip``); ``quick``: the tiny preset with L capped at 512; ``max_len``: cap L (dry
    runs)."""
    from brats_core.registry import make_config

    cfg = make_config("imfuse", "tiny" if quick else "paper", first_skip=True, mamba_skip=True)
    cap = min(512 if quick else math.inf, max_len if max_len is not None else math.inf)
    return [dataclasses.replace(s, L=int(min(s.L, cap))) for s in mamba_shapes(cfg)]


class Budget:
    """Wall-clock budget shared by all sections."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A warm-up slower than this leaves one timed run: the budget goes further, and such calls hardly vary.
SLOW_CALL_S = 5.0


def measure(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: bool = True
) -> tuple[float, float | None]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up (compiles kernels, fills caches; a warm-up
    above ``SLOW_CALL_S`` leaves one run), and the peak CUDA memory (GB) above the memory allocated before the call
    (None on CPU)."""
    if warmup:
        t0 = time.perf_counter()
        fn()
        sync(device)
        if time.perf_counter() - t0 > SLOW_CALL_S:
            repeats = 1
    times = []
    peak = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            used = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            peak = used if peak is None else max(peak, used)
    return statistics.median(times), peak


def usable_backends(device: torch.device) -> list[str]:
    """Backends to compare on ``device``: chunked always; triton and mamba_ssm when usable."""
    names = ["chunked"]
    # On CPU triton is usable only in Triton's interpreter (TRITON_INTERPRET=1): a dry run of its code path.
    names += [name for name in ("triton", "mamba_ssm") if mamba_mod.is_backend_usable(name, device)]
    return names


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions_section(device: torch.device, backends: list[str]) -> list[str]:
    rows = [
        ("Python", platform.python_version()),
        ("torch", torch.__version__),
        ("CUDA (torch build)", str(torch.version.cuda)),
        ("device", torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"),
        ("bf16 supported", str(device.type == "cuda" and torch.cuda.is_bf16_supported())),
        ("triton", _version("triton")),
        ("mamba-ssm", _version("mamba-ssm")),
        ("causal-conv1d", _version("causal-conv1d")),
        ("usable scan backends", ", ".join(backends)),
        ("auto backend", mamba_mod.resolve_backend("auto", device)),
        ("TF32 matmul / cuDNN", f"{torch.backends.cuda.matmul.allow_tf32} / {torch.backends.cudnn.allow_tf32}"),
    ]
    return ["## Versions", "", "| item | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def _scan_inputs(b: int, d: int, n: int, L: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u, delta, z = rnd(b, d, L), rnd(b, d, L) - 1.0, rnd(b, d, L)
    B, C = rnd(b, n, L), rnd(b, n, L)
    A = -torch.exp(rnd(d, n))
    D, bias = rnd(d), 0.5 * rnd(d)
    return [t.to(device) for t in (u, delta, A, B, C, D, z, bias)]


def _scan_with_grads(
    inputs: list[torch.Tensor], dtype: torch.dtype, backend: str, w_out: torch.Tensor, w_last: torch.Tensor
) -> list[torch.Tensor]:
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    out, last = mamba_mod.selective_scan(*leaves, delta_softplus=True, return_last_state=True, backend=backend)
    loss = (out.double() * w_out).sum() + (last.double() * w_last).sum()
    return [out.detach(), last.detach(), *torch.autograd.grad(loss, leaves)]


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def parity_section(
    blocks: list[MambaShape], backends: list[str], device: torch.device, quick: bool, budget: Budget
) -> list[str]:
    lines = [
        "## Backend parity (fp32 scan vs fp64 chunked scan on the same device)",
        "",
        "b = 1, random inputs (dt = softplus(N(−1, 1) + bias), A = −exp(N(0, 1))), loss on the output and the last "
        "state; max |Δ| / max |ref|. Grads: worst of u, delta, A, B, C, D, z, delta_bias.",
        "",
        "| block | d_inner × d_state | L (prefix) | backend | out | last state | grads (worst) | worst grad |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for i, blk in enumerate(blocks):
        d, n = 2 * blk.d_model, blk.d_state
        L = min(blk.L, 256 if quick else 16384)
        if budget.left() < 0:
            lines.append(f"| {blk.name} | {d} × {n} | {L} | – | skipped (time budget) | | | |")
            continue
        inputs = _scan_inputs(1, d, n, L, device, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        w_out = torch.randn(1, d, L, generator=g, dtype=torch.float64).to(device)
        w_last = torch.randn(1, d, n, generator=g, dtype=torch.float64).to(device)
        ref = _scan_with_grads(inputs, torch.float64, "chunked", w_out, w_last)
        for backend in backends:
            try:
                got = _scan_with_grads(inputs, torch.float32, backend, w_out, w_last)
                errs = [_rel(a, e) for a, e in zip(got, ref, strict=True)]
                worst = max(range(len(names)), key=lambda k: errs[2 + k])
                lines.append(
                    f"| {blk.name} | {d} × {n} | {L} | {backend} | {errs[0]:.1e} | {errs[1]:.1e} | "
                    f"{errs[2 + worst]:.1e} | {names[worst]} |"
                )
            except Exception as exc:  # report, keep going: the point of the script is one complete run
                lines.append(f"| {blk.name} | {d} × {n} | {L} | {backend} | error: {type(exc).__name__}: {exc} | | | |")
        del inputs, ref
    return [*lines, ""]


def _fmt_gb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def timing_section(
    blocks: list[MambaShape],
    backends: list[str],
    batch_sizes: Sequence[int],
    device: torch.device,
    repeats: int,
    budget: Budget,
    warmup: bool = True,
) -> list[str]:
    lines = [
        f"## Mamba block timing (whole block, fp32, full sequence length, b = {', '.join(map(str, batch_sizes))})",
        "",
        f"Median of {repeats} runs {'after a warm-up' if warmup else 'without warm-up (quick)'}; memory = peak "
        "`torch.cuda.max_memory_allocated` above the allocation before the call (GB). Ratio = chunked fwd+bwd "
        "time / this backend's (same run). Target: "
        f"triton ≥ {SPEEDUP_TARGET:g}× chunked at every skip level.",
        "",
        "| block | b | L | backend | fwd s | fwd GB | fwd+bwd s | fwd+bwd GB | vs chunked | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in batch_sizes:
        for blk in blocks:
            chunked_fb: float | None = None
            for backend in backends:
                row = f"| {blk.name} | {b} | {blk.L:,} | {backend} |"
                if budget.left() < 0:
                    lines.append(f"{row} skipped (time budget) | | | | | |")
                    continue
                try:
                    torch.manual_seed(0)
                    block = mamba_mod.Mamba(blk.d_model, d_state=blk.d_state, backend=backend).to(device)
                    x = torch.randn(b, blk.L, blk.d_model, device=device)

                    def fwd(block: torch.nn.Module = block, x: torch.Tensor = x) -> None:
                        with torch.no_grad():
                            block(x)

                    def fwd_bwd(block: torch.nn.Module = block, x: torch.Tensor = x) -> None:
                        block.zero_grad(set_to_none=True)
                        block(x).sum().backward()

                    tf, mf = measure(fwd, device, repeats, warmup)
                    tb, mb = measure(fwd_bwd, device, repeats, warmup)
                    if backend == "chunked":
                        chunked_fb = tb
                    ratio = f"{chunked_fb / tb:.1f}×" if chunked_fb is not None else "–"
                    target = ""
                    if (
                        backend == "triton"
                        and chunked_fb is not None
                        and blk.name.startswith("skip")
                        and device.type == "cuda"
                    ):
                        target = "PASS" if chunked_fb / tb >= SPEEDUP_TARGET else "FAIL"
                    lines.append(f"{row} {tf:.4f} | {_fmt_gb(mf)} | {tb:.4f} | {_fmt_gb(mb)} | {ratio} | {target} |")
                except torch.cuda.OutOfMemoryError:
                    lines.append(f"{row} OOM | | | | | |")
                except Exception as exc:
                    lines.append(f"{row} error: {type(exc).__name__}: {exc} | | | | | |")
                finally:
                    block = x = None  # type: ignore[assignment]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return [*lines, ""]


def train_step_section(device: torch.device, quick: bool, repeats: int, budget: Budget) -> list[str]:
    """The IM-Fuse training-step table (``quick``: tiny preset, no warm-up step)."""
    from brats_core.nn.losses import FusedSeparateDeepLoss
    from brats_core.registry import build_method
    from brats_core.utils.device import amp_context

    preset = "tiny" if quick else "paper"
    lines = [
        f"## IM-Fuse training step ({preset} preset, mamba_skip + interleaved_tokenization, b = 1)",
        "",
        "One `FusedSeparateDeepLoss` forward + backward + RAdam step, as `IMFuse/train_poly.py` does; Mamba backend "
        f"`auto` ({mamba_mod.resolve_backend('auto', device)}). AMP = `amp_context` (bf16 where supported, else fp16 "
        f"with a GradScaler), Mamba blocks in fp32. Target: AMP ≥ {AMP_TARGET:g}× faster than fp32.",
        "",
        "| precision | s / step | peak GB | speed-up vs fp32 | target |",
        "|---|---|---|---|---|",
    ]
    torch.manual_seed(0)
    model = build_method("imfuse", preset, mamba_skip=True, interleaved_tokenization=True).to(device).train()
    P = model.config.patch_size
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(1, len(MODALITIES), P, P, P, generator=g).to(device),
        "mask": torch.tensor([[True, False, True, True]], device=device),
        "label": torch.randint(0, 4, (1, P, P, P), generator=g).to(device),
    }
    loss_fn = FusedSeparateDeepLoss()
    optimizer = torch.optim.RAdam(model.parameters(), lr=2e-4, weight_decay=3e-5)
    fp32_time: float | None = None
    for amp in (False, True):
        label = "fp32"
        if amp:
            label = "AMP " + ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp16")
            if device.type != "cuda":
                label = "AMP (no-op on CPU)"
        if budget.left() < 0:
            lines.append(f"| {label} | skipped (time budget) | | | |")
            continue
        scaler = torch.amp.GradScaler(
            "cuda", enabled=amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
        )

        def step(amp: bool = amp, scaler: torch.amp.GradScaler = scaler) -> None:
            with amp_context(device, amp):
                loss, _ = loss_fn(model, batch, 0)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        try:
            t, mem = measure(step, device, repeats, warmup=not quick)
        except torch.cuda.OutOfMemoryError:
            lines.append(f"| {label} | OOM | | | |")
            continue
        except Exception as exc:  # report, keep going
            lines.append(f"| {label} | error: {type(exc).__name__}: {exc} | | | |")
            continue
        if not amp:
            fp32_time = t
        speedup = f"{fp32_time / t:.2f}×" if fp32_time is not None else "–"
        target = ""
        if amp and fp32_time is not None and device.type == "cuda":
            target = "PASS" if fp32_time / t >= AMP_TARGET else "FAIL"
        lines.append(f"| {label} | {t:.3f} | {_fmt_gb(mem)} | {speedup} | {target} |")
    return [*lines, ""]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: dry run of the code paths")
    p.add_argument("--quick", action="store_true", help="tiny sizes (tiny preset, L ≤ 512), 1 run, no warm-up")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report path")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2], help="batch sizes of the block timings")
    p.add_argument("--budget_s", type=float, default=270.0, help="wall-clock budget; later measurements are skipped")
    p.add_argument("--skip_train_step", action="store_true", help="no IM-Fuse training-step section")
    p.add_argument("--max_len", type=int, default=None, help="cap every sequence length (dry runs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is available, nothing was measured "
            "(run it on a GPU machine, or `--device cpu --quick` for a dry run of the code paths)."
        )
        return 0
    device = torch.device(args.device)
    repeats = 1 if args.quick else max(1, args.repeats)
    budget = Budget(args.budget_s)
    t_start = time.monotonic()
    backends = usable_backends(device)
    blocks = imfuse_blocks(args.quick, args.max_len)
    print(f"gpu_check: device {device}, backends {backends}, blocks {[b.name for b in blocks]}", flush=True)

    lines = [
        "# GPU check: Mamba scan backends and IM-Fuse AMP training (`benchmarks/gpu_check.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `{' '.join(['gpu_check.py', *sys.argv[1:]])}`"
        + (" — **dry run on tiny sizes: the numbers say nothing about GPU performance**" if args.quick else "")
        + (f" — **sequence lengths capped at {args.max_len}**" if args.max_len else ""),
        "",
        *versions_section(device, backends),
    ]
    sections: list[Callable[[], list[str]]] = [
        lambda: parity_section(blocks, backends, device, args.quick, budget),
        lambda: timing_section(blocks, backends, args.batch_sizes[:1], device, repeats, budget, not args.quick),
    ]
    if not args.skip_train_step:
        sections.append(lambda: train_step_section(device, args.quick, repeats, budget))
    if len(args.batch_sizes) > 1:
        sections.append(
            lambda: timing_section(blocks, backends, args.batch_sizes[1:], device, repeats, budget, not args.quick)
        )
    # The report is rewritten after every section, so a run cut short (time limit, a crashed CUDA context) still
    # leaves what it measured.
    write_report(args.out, [*lines, INCOMPLETE])
    for section in sections:
        try:
            done = section()
        except Exception as exc:  # a section that dies must not take the others' results with it
            done = [f"Section failed: {type(exc).__name__}: {exc}", ""]
        lines += done
        print("\n".join(done), flush=True)
        print(f"gpu_check: {time.monotonic() - t_start:.0f} s elapsed", flush=True)
        write_report(args.out, [*lines, INCOMPLETE])
    lines.append(f"Total wall time: {time.monotonic() - t_start:.0f} s (budget {args.budget_s:g} s).")
    write_report(args.out, lines)
    print(f"gpu_check: report written to {args.out}")
    return 0


INCOMPLETE = "**Incomplete: the run stopped before this point.**"


def write_report(path: Path, lines: list[str]) -> None:
    """Write the Markdown report atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
