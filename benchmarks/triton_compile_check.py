"""Compile the Triton selective-scan kernels for NVIDIA GPUs on a machine without one, and report their resources.

    python benchmarks/triton_compile_check.py [--targets 80,90] [--json out.json]

Every kernel variant that ``brats_core.nn.triton_scan`` launches for IM-Fuse's five Mamba block shapes (paper preset
with ``--first_skip --mamba_skip``, b = 1 and 2, forward and backward) is compiled ahead of time by Triton for each
target compute capability down to a cubin, with the ``ptxas`` that ships with the ``triton`` wheel; ``ptxas -v``
gives the registers per thread and the spill bytes. No GPU and no CUDA driver are needed.

The variants are recorded from the real launch code: the kernels are replaced by recorders and the autograd
``Function`` runs on small CPU tensors with a chunk length of 1, so every launch sees the chunk count of the real
sequence (hence the same tile and carry-pass constants) without the real sequence's memory.

Exit status 1 if a variant fails to compile. This catches what Triton's CPU interpreter (the numerical tests)
cannot: type errors of the compiled dialect, unsupported operations, and register spills.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from brats_core.nn import triton_scan
from brats_core.registry import make_config
from IMFuse.model import mamba_shapes

KERNELS = (
    "_chunk_state_kernel",
    "_carry_kernel",
    "_chunk_scan_fwd_kernel",
    "_chunk_bwd_reduce_kernel",
    "_chunk_scan_bwd_kernel",
)
_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_SHOWN = ("REVERSE", "NCB", "BLOCK", "ATOMIC")  # constants that tell variants of one tile size apart in the table
_PTXAS = Path(triton.backends.nvidia.__file__).parent / "bin" / "ptxas-blackwell"  # the newest ptxas of the wheel


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: its constexpr values, argument types and warps."""

    kernel: str
    constexprs: tuple[tuple[str, Any], ...]
    signature: tuple[tuple[str, str], ...]
    num_warps: int


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` records the variant, runs nothing."""

    def __init__(self, name: str, jit: Any, seen: set[Variant]) -> None:
        self.name, self.jit, self.seen = name, jit, seen

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, num_warps: int = 4, **constexprs: Any) -> None:
            signature = {}
            for param, value in zip(inspect.signature(self.jit.fn).parameters, args, strict=False):
                if isinstance(value, torch.Tensor):
                    signature[param] = _POINTER[value.dtype]
                else:
                    signature[param] = "i64" if abs(int(value)) >= 2**31 else "i32"
            signature |= dict.fromkeys(constexprs, "constexpr")
            self.seen.add(
                Variant(self.name, tuple(sorted(constexprs.items())), tuple(signature.items()), int(num_warps))
            )

        return launch


def record_variants(batch_sizes: Sequence[int] = (1, 2), dtype: torch.dtype = torch.float32) -> list[Variant]:
    """The kernel variants of a forward + backward through each IM-Fuse Mamba block shape (see the module docstring).

    ``dtype`` is that of the scan inputs (the Mamba blocks run their scan in fp32, also under AMP).
    """
    cfg = make_config("imfuse", "paper", first_skip=True, mamba_skip=True)
    seen: set[Variant] = set()
    originals = {name: getattr(triton_scan, name) for name in KERNELS}
    try:
        for name, jit in originals.items():
            setattr(triton_scan, name, _Recorder(name, jit, seen))
        for shape in mamba_shapes(cfg):
            d, n = 2 * shape.d_model, shape.d_state  # Mamba's d_inner = expand (2) × d_model
            for b in batch_sizes:
                nc = triton_scan.triton_plan(b, d, n, shape.L).nc
                g = torch.Generator().manual_seed(0)

                def rnd(*size: int, g: torch.Generator = g) -> torch.Tensor:
                    return torch.randn(*size, generator=g, dtype=dtype).requires_grad_()

                inputs = (rnd(b, d, nc), rnd(b, d, nc), rnd(d, n), rnd(b, n, nc), rnd(b, n, nc), rnd(d), rnd(b, d, nc))
                bias = rnd(d)
                out, last = triton_scan.TritonSelectiveScanFn.apply(*inputs, bias, True, True, 1)
                (out.sum() + last.sum()).backward()
    finally:
        for name, jit in originals.items():
            setattr(triton_scan, name, jit)
    return sorted(seen, key=lambda v: (KERNELS.index(v.kernel), v.constexprs, v.num_warps))


def compile_variant(variant: Variant, capability: int) -> dict[str, Any]:
    """Compile one variant for ``sm_<capability>``; registers and spill bytes from ``ptxas -v``."""
    source = ASTSource(
        fn=getattr(triton_scan, variant.kernel),
        signature=dict(variant.signature),
        constexprs=dict(variant.constexprs),
    )
    row: dict[str, Any] = {
        "kernel": variant.kernel.strip("_"), "target": f"sm_{capability}", "num_warps": variant.num_warps,
        **{k: v for k, v in variant.constexprs if k in ("BD", "BN", *_SHOWN)},
    }  # fmt: skip
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(
            source, target=GPUTarget("cuda", capability, 32), options={"num_warps": variant.num_warps}
        )
    except Exception as exc:  # a failed variant is the finding; report it and go on
        return row | {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["shared_bytes"] = int(compiled.metadata.shared)
    row |= _ptxas_stats(compiled.asm["ptx"], capability)
    return row


def _ptxas_stats(ptx: str, capability: int) -> dict[str, int]:
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"  # Triton targets sm_90a on Hopper
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [str(_PTXAS), "-v", "--gpu-name", arch, str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = done.stderr
    registers = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_stores": int(stores.group(1)) if stores else 0,
        "spill_loads": int(loads.group(1)) if loads else 0,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| kernel | target | warps | BD × BN | other constants | registers | spill stores / loads B | shared B |",
        "|---|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        tile = f"{r['BD']} × {r['BN']}" if "BD" in r else ""
        other = ", ".join(f"{k} {r[k]}" for k in ("NCB", "BLOCK", "ATOMIC") if k in r)
        if "error" in r:
            lines.append(
                f"| {r['kernel']} | {r['target']} | {r['num_warps']} | {tile} | {other} | error: {r['error']} |||"
            )
            continue
        lines.append(
            f"| {r['kernel']} | {r['target']} | {r['num_warps']} | {tile} | {other} | {r['registers']} | "
            f"{r['spill_stores']} / {r['spill_loads']} | {r['shared_bytes']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/triton_compile_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="80,90", help="compute capabilities, e.g. 80 (A100), 90 (H100)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    capabilities = [int(t) for t in args.targets.split(",")]
    variants = record_variants()
    t0 = time.perf_counter()
    rows = [compile_variant(v, c) for c in capabilities for v in variants]
    print(f"triton {triton.__version__}, {len(variants)} variants × {len(capabilities)} targets, "
          f"{time.perf_counter() - t0:.0f} s\n")  # fmt: skip
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"FAILED {r['kernel']} {r['target']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
