"""Adapters for the compiled selective-scan kernels: the ``"mamba_ssm"`` and ``"triton"`` backends.

* ``mamba_ssm`` – mamba-ssm's fused CUDA kernels (``selective_scan_fn``; the Mamba block also uses its
  ``mamba_inner_fn`` through :func:`mamba_ssm_lib`), imported once on first use.
* ``triton`` – :mod:`brats_core.nn.triton_scan`, imported lazily (importing triton costs ~1 s and may be absent or
  broken), used on CUDA only after a one-time probe compiled and ran it correctly.

Both adapters go through one fallback path, :func:`_kernel_or_chunked`: without a usable kernel, or when a kernel call
fails, the scan runs on the ``"chunked"`` backend, and a failing kernel is retired for the rest of the process (one
warning). Out-of-memory errors are passed on instead: the chunked scan would not fit either.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .chunked import selective_scan_chunked
from .common import ScanFn, warn_once

__all__ = [
    "MambaSsmLib",
    "mamba_ssm_adapter",
    "mamba_ssm_lib",
    "mamba_ssm_usable",
    "mark_mamba_ssm_broken",
    "triton_adapter",
    "triton_usable",
]


def _kernel_or_chunked(
    kernel: Callable[[], Tensor | tuple[Tensor, Tensor]] | None,
    retire: Callable[[Exception], None],
    args: tuple[Any, ...],
) -> Tensor | tuple[Tensor, Tensor]:
    """``kernel()``, or the chunked scan of ``args`` (the 11 arguments of a backend) when there is no usable kernel
    (``None``) or it raises; ``retire(exc)`` takes a failed kernel out of use."""
    if kernel is not None:
        try:
            return kernel()
        except torch.OutOfMemoryError:
            raise  # the input is too big for the GPU, not a broken kernel: the chunked scan would not fit either
        except Exception as exc:
            # e.g. a kernel variant (new dtype or flag combination) that fails to compile after the probe passed.
            retire(exc)
    return selective_scan_chunked(*args)


# ---------------------------------------------------------------------------------------------------------------------
# "mamba_ssm": the upstream CUDA kernels, if they import
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MambaSsmLib:
    """mamba-ssm's kernel entry points (``causal_conv1d_fn`` None without the causal-conv1d package); ``broken``
    once a call failed."""

    selective_scan_fn: ScanFn
    mamba_inner_fn: ScanFn
    causal_conv1d_fn: ScanFn | None
    broken: bool = False


_mamba_ssm_cache: list[MambaSsmLib | None] = []


def mamba_ssm_lib() -> MambaSsmLib | None:
    """Import mamba-ssm's kernels once; None when they are not usable. Any exception counts as "not usable": a
    mismatched build fails with ImportError (undefined symbol), OSError or RuntimeError rather than a clean
    ModuleNotFoundError."""
    if not _mamba_ssm_cache:
        lib: MambaSsmLib | None
        try:
            from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn

            try:
                from causal_conv1d import causal_conv1d_fn
            except Exception:
                causal_conv1d_fn = None
            lib = MambaSsmLib(selective_scan_fn, mamba_inner_fn, causal_conv1d_fn)
        except Exception as exc:
            warn_once(
                "import:mamba_ssm",
                f"mamba_ssm is not usable ({type(exc).__name__}: {exc}); CUDA tensors use the 'chunked' scan instead",
            )
            lib = None
        _mamba_ssm_cache.append(lib)
    lib = _mamba_ssm_cache[0]
    return None if lib is None or lib.broken else lib


def mark_mamba_ssm_broken(exc: Exception) -> None:
    """Retire mamba-ssm's kernels after the failed call that raised ``exc`` (warns once)."""
    lib = _mamba_ssm_cache[0] if _mamba_ssm_cache else None
    if lib is not None:
        lib.broken = True
    warn_once(
        "call:mamba_ssm",
        f"mamba_ssm kernel call failed ({type(exc).__name__}: {exc}); using the 'chunked' scan from now on",
    )


def mamba_ssm_usable(device: torch.device) -> bool:
    """Whether the ``mamba_ssm`` backend can run on ``device``: CUDA, with the kernels imported and not retired."""
    return device.type == "cuda" and mamba_ssm_lib() is not None


def mamba_ssm_adapter(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
    chunk_size: int | None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The ``mamba_ssm`` backend: mamba-ssm's ``selective_scan_fn`` on CUDA tensors (it has no ``chunk_size``),
    else the chunked scan."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    lib = mamba_ssm_lib()
    kernel = functools.partial(lib.selective_scan_fn, *args) if lib is not None and u.is_cuda else None
    return _kernel_or_chunked(kernel, mark_mamba_ssm_broken, (*args, chunk_size))


# ---------------------------------------------------------------------------------------------------------------------
# "triton": brats_core.nn.triton_scan, imported lazily (importing triton costs ~1 s and may be absent or broken)
# ---------------------------------------------------------------------------------------------------------------------

# "module": triton_scan or None (import failed); "probe:<device>": the probe's verdict; "broken": a call failed.
_triton_state: dict[str, Any] = {}


def _triton_module() -> Any | None:
    """``brats_core.nn.triton_scan`` or None (cached); any import failure (no triton, ABI mismatch) → None."""
    if "module" not in _triton_state:
        try:
            from .. import triton_scan

            _triton_state["module"] = triton_scan
        except Exception as exc:
            _triton_state["module"] = None
            warn_once("import:triton", f"the Triton scan is not usable ({type(exc).__name__}: {exc})")
    return _triton_state["module"]


def _triton_probe(device: torch.device) -> bool:
    """One-time compile-and-run of the Triton scan (forward + backward, tiny shapes) on ``device``, checked against
    the chunked backend; the verdict is cached per device, so a broken toolchain costs one attempt."""
    key = f"probe:{device}"
    if key not in _triton_state:
        ok = False
        mod = _triton_module()
        if mod is not None:
            # The first resolve may happen under no_grad / inference_mode (evaluation) or autocast: the probe needs
            # autograd and fp32 whatever the caller's context.
            try:
                with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                    g = torch.Generator().manual_seed(0)
                    b, d, n, L = 1, 4, 4, 24
                    shapes = [(b, d, L), (b, d, L), (d, n), (b, n, L), (b, n, L), (d,), (b, d, L), (d,)]
                    ins = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
                    with torch.no_grad():
                        ins[2].copy_(-ins[2].exp())
                    outs = []
                    for fn in (mod.selective_scan_triton, selective_scan_chunked):
                        y = fn(*ins, delta_softplus=True, chunk_size=8)
                        outs.append((y, *torch.autograd.grad(y.square().sum(), ins)))
                # the backward falls back to the chunked scan by itself: that must not pass for a working kernel
                ok = not mod.backward_failed() and all(
                    torch.allclose(p, q, rtol=1e-3, atol=1e-4) for p, q in zip(*outs, strict=True)
                )
                if not ok:
                    warn_once("probe:triton", "the Triton scan probe gave wrong results; not using it")
            except Exception as exc:
                warn_once("probe:triton", f"the Triton scan probe failed ({type(exc).__name__}: {exc})")
        _triton_state[key] = ok
    return bool(_triton_state[key])


def triton_usable(device: torch.device) -> bool:
    """Whether the ``triton`` backend can run on ``device``: not retired, and on CUDA after the probe passed, on CPU
    only in Triton's interpreter."""
    if _triton_state.get("broken"):
        return False
    mod = _triton_module() if "module" in _triton_state else None
    if mod is not None and getattr(mod, "backward_failed", lambda: False)():
        return False
    if device.type == "cuda":
        return _triton_probe(device)
    # CPU: only in Triton's interpreter (tests); "auto" never picks it there (auto_device_types).
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    mod = _triton_module()
    return mod is not None and bool(mod.interpreter_active())


def _retire_triton(exc: Exception) -> None:
    _triton_state["broken"] = True
    warn_once("call:triton", f"Triton scan failed ({type(exc).__name__}: {exc}); using the 'chunked' scan from now on")


def triton_adapter(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
    chunk_size: int | None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The ``triton`` backend: :func:`brats_core.nn.triton_scan.selective_scan_triton` until a call fails, then the
    chunked scan."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size)
    mod = _triton_module()
    usable = mod is not None and not _triton_state.get("broken")
    kernel = functools.partial(mod.selective_scan_triton, *args) if usable else None
    return _kernel_or_chunked(kernel, _retire_triton, args)
