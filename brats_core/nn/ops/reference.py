"""The ``"reference"`` selective-scan backend: a sequential loop under plain autograd, the ground truth of the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import SOFTPLUS_THRESHOLD, check_scan_shapes, compute_dtype

__all__ = ["selective_scan_reference"]


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    return_last_state: bool = False,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential selective scan under plain autograd; the ground truth for tests (use fp64 inputs).

    Same arguments, shapes and semantics as :func:`~brats_core.nn.ops.selective_scan` (``chunk_size`` is ignored).
    Stores one (b, d, n) state per step for backward, i.e. O(L·d·n) memory: tiny shapes only.
    """
    del chunk_size
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    uc, dc, Ac, Bc, Cc = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        dc = dc + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dc = F.softplus(dc, threshold=SOFTPLUS_THRESHOLD)
    b, d, L = u.shape
    h = uc.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        dt = dc[:, :, t, None]
        h = torch.exp(dt * Ac) * h + (dt * uc[:, :, t, None]) * Bc[:, None, :, t]
        ys.append((h * Cc[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + uc * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out
