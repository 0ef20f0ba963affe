"""What every selective-scan backend shares: the argument check, the compute dtype, softplus's threshold, the
backend-callable type and the one-time log messages of backend selection and fallback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["SOFTPLUS_THRESHOLD", "ScanFn", "check_scan_shapes", "compute_dtype", "log_choice_once", "warn_once"]

logger = logging.getLogger("brats_core.nn.ops")

# mamba-ssm's kernel softplus: x <= 20 ? log1p(exp(x)) : x, i.e. F.softplus's default threshold.
SOFTPLUS_THRESHOLD = 20.0

# fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size) -> out | (out, last_state)
ScanFn = Callable[..., Any]

# Keys of the messages already logged (a fallback warns once per process, not once per scan call).
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def log_choice_once(name: str, device: torch.device) -> str:
    """Log (info, once per backend and device type) which backend scans tensors on ``device``; returns ``name``."""
    key = f"choice:{name}:{device.type}"
    if key not in _warned:
        _warned.add(key)
        logger.info("Mamba selective scan on %s tensors: backend %r", device.type, name)
    return name


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype scans compute in: at least fp32 (as the CUDA kernel keeps its state); fp64 inputs stay fp64 for
    exact tests."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_scan_shapes(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    """Raise ValueError unless the arguments have the layout of :func:`~brats_core.nn.ops.selective_scan`."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (b, d, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    b, d, L = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d={d}, n); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (b, n, L):
            raise ValueError(
                f"{name} must be (b, n, L) = {(b, n, L)} (input-dependent, one group); got {tuple(t.shape)}"
            )
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must be (b, d, L) like u; got {tuple(z.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name} must be (d,) = ({d},); got {tuple(t.shape)}")
