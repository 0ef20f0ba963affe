"""Compile the Triton selective-scan kernels for NVIDIA GPUs on a machine without one, and report their resources.

    python benchmarks/triton_compile_check.py [--targets 80,90] [--json out.json]

Every kernel variant that ``brats_core.nn.triton_scan`` launches for IM-Fuse's five Mamba block shapes (paper preset
with ``--first_skip --mamba_skip``, b = 1 and 2, forward and backward) is compiled ahead of time by Triton for each
target compute capability down to a cubin, with the ``ptxas`` that ships with the ``triton`` wheel; ``ptxas -v``
gives the registers per thread and the spill bytes. No GPU and no CUDA driver are needed.

The variants are recorded from the real launch code: the kernels are replaced by recorders and the autograd
``Function`` runs on meta tensors (sizes and strides, no memory) laid out as the Mamba block passes them, at the real
sequence lengths, so every launch gets the real plan. Each launch's arguments go through Triton's own launch-time
specialisation (strides of 1 become constants, values divisible by 16 get alignment hints): what is compiled here is
what a GPU would compile (recording unspecialised arguments of contiguous inputs instead overstates the registers by
up to ~130 and shows spills that the launched kernels do not have). One extra scan of (b, d, L)-contiguous inputs
past 2^31 elements covers the variants with int64 strides.

Exit status 1 if a variant fails to compile. This catches what Triton's CPU interpreter (the numerical tests)
cannot: type errors of the compiled dialect, unsupported operations, and register spills.
"""

from __future__ import annotations

import argparse
import json
import math
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
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature  # the launcher's binder (triton is pinned)

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
_SHOWN = ("REVERSE", "NCB", "BLOCK", "ATOMIC")  # constants that tell variants of one tile size apart in the table
_PTXAS = Path(triton.backends.nvidia.__file__).parent / "bin" / "ptxas-blackwell"  # the newest ptxas of the wheel


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel, as Triton's launcher specialises it: argument types, constexpr values (the
    kernel's constants and every integer argument equal to 1), alignment attributes, warps."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[tuple[int, ...], Any], ...]
    attrs: tuple[tuple[tuple[int, ...], tuple[tuple[str, int], ...]], ...]
    num_warps: int

    def constant(self, name: str) -> Any:
        index = [k for k, _ in self.signature].index(name)
        return dict(self.constexprs)[(index,)]


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` records the variant, runs nothing.

    The arguments are specialised by Triton's own launch-time binder (integers equal to 1 become constants, pointers
    and integers divisible by 16 get alignment hints), so the compiled variant is the one a real launch compiles.
    """

    def __init__(self, name: str, jit: Any, seen: set[Variant]) -> None:
        self.name, self.jit, self.seen = name, jit, seen
        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.binder = create_function_from_signature(jit.signature, jit.params, self.backend)

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **meta: Any) -> None:
            bound, specialization, options = self.binder(*args, **meta)
            # meta tensors have no address: the pointer hint comes from the view's offset (allocations are aligned)
            for k, value in enumerate(bound.values()):
                if isinstance(value, torch.Tensor):
                    aligned = value.storage_offset() * value.element_size() % 16 == 0
                    specialization[k] = (specialization[k][0], "D" if aligned else "")
            _, signature, constexprs, attrs = self.jit._pack_args(self.backend, meta, bound, specialization, options)
            self.seen.add(
                Variant(
                    self.name,
                    tuple(signature.items()),
                    tuple(sorted(constexprs.items())),
                    tuple(sorted((k, tuple(map(tuple, v))) for k, v in attrs.items())),
                    int(meta.get("num_warps", 4)),
                )
            )

        return launch


def _mamba_scan_inputs(b: int, d_model: int, n: int, L: int) -> tuple[Any, ...]:
    """The scan's arguments as :class:`brats_core.nn.mamba.Mamba` passes them (views of its projections), on the
    meta device: real sizes and strides, no memory."""
    d, r = 2 * d_model, math.ceil(d_model / 16)

    def empty(*size: int) -> torch.Tensor:
        return torch.empty(*size, device="meta")

    x, z = empty(b, L, 2 * d).chunk(2, dim=-1)  # in_proj: x is replaced by the (contiguous) conv output, z stays a view
    x = empty(b, L, d)
    _, B, C = torch.split(empty(b, L, r + 2 * n), [r, n, n], dim=-1)  # x_proj
    delta = empty(b, L, d)  # dt_proj
    leaves = [t.requires_grad_() for t in (x, delta, empty(d, n), B, C, empty(d), z, empty(d))]
    u, delta, A, B, C, D, z, bias = (t.transpose(1, 2) if t.dim() == 3 else t for t in leaves)
    return u, delta, A, B, C, D, z, bias


def _wide_scan_inputs() -> tuple[Any, ...]:
    """(b, d, L)-contiguous inputs with d·L = 2^32 elements: strides past int32 make Triton compile variants with
    int64 stride arguments, which IM-Fuse never launches but other callers may."""
    b, d, n, L = 1, 16, 8, 2**28
    shapes = [(b, d, L), (b, d, L), (d, n), (b, n, L), (b, n, L), (d,), (b, d, L), (d,)]
    return tuple(torch.empty(*size, device="meta", requires_grad=True) for size in shapes)


def _record_scan(inputs: tuple[Any, ...]) -> None:
    """Forward and backward of one scan; the output's gradient arrives token-major (from ``out_proj``)."""
    out, last = triton_scan.TritonSelectiveScanFn.apply(*inputs, True, True, None)
    b, d, L = out.shape
    gout = torch.empty(b, L, d, device="meta").transpose(1, 2)
    torch.autograd.backward((out, last), (gout, torch.empty_like(last)))


def record_variants(batch_sizes: Sequence[int] = (1, 2)) -> list[Variant]:
    """The kernel variants of a forward + backward through each IM-Fuse Mamba block (see the module docstring), and
    of one scan past 2^31 elements: the autograd ``Function`` runs on meta tensors of the real sizes and layouts,
    with the real launch plan."""
    cfg = make_config("imfuse", "paper", first_skip=True, mamba_skip=True)
    seen: set[Variant] = set()
    originals = {name: getattr(triton_scan, name) for name in KERNELS}
    try:
        for name, jit in originals.items():
            setattr(triton_scan, name, _Recorder(name, jit, seen))
        for shape in mamba_shapes(cfg):
            for b in batch_sizes:
                _record_scan(_mamba_scan_inputs(b, shape.d_model, shape.d_state, shape.L))
        _record_scan(_wide_scan_inputs())
    finally:
        for name, jit in originals.items():
            setattr(triton_scan, name, jit)
    return sorted(seen, key=lambda v: (KERNELS.index(v.kernel), repr(v.constexprs), v.num_warps))


def compile_variant(variant: Variant, capability: int) -> dict[str, Any]:
    """Compile one variant for ``sm_<capability>``; registers and spill bytes from ``ptxas -v``."""
    source = ASTSource(
        fn=getattr(triton_scan, variant.kernel),
        signature=dict(variant.signature),
        constexprs=dict(variant.constexprs),
        attrs={k: [list(a) for a in v] for k, v in variant.attrs},
    )
    names = [k for k, _ in variant.signature]
    types = [t for _, t in variant.signature]
    row: dict[str, Any] = {
        "kernel": variant.kernel.strip("_"), "target": f"sm_{capability}", "num_warps": variant.num_warps,
        **{k: variant.constant(k) for k in ("BD", "BN", *_SHOWN) if k in names},
        # integer arguments specialised to constants (strides of 1), beyond the kernel's declared constexprs
        "constant_args": sum(t == "constexpr" for t in types) - sum(p.is_constexpr for p in source.fn.params),
        "i64_args": sum(t == "i64" for t in types),
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
        others = [f"{k} {r[k]}" for k in ("NCB", "BLOCK", "ATOMIC") if k in r] + ["int64 strides"] * bool(r["i64_args"])
        other = ", ".join(others)
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
