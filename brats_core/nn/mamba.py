"""Mamba-1 block, parameter- and state-dict-compatible with ``mamba_ssm.Mamba`` (mamba-ssm 2.3), with CPU/GPU scans.

IM-Fuse fuses modality tokens with ``mamba_ssm.Mamba``, whose selective scan only exists as a CUDA extension that
cannot be installed on CPU machines (and rarely on an offline GPU box). This module re-implements the block exactly
(same constructor, parameter names, shapes, registration order, initialisation and forward semantics) and leaves the
selective scan to :mod:`brats_core.nn.ops`, as mamba-ssm keeps its block (``modules/mamba_simple.py``) apart from its
ops (``ops/selective_scan_interface.py``):

* here: :class:`Mamba` (projections, the causal depthwise convolution, the gate) and the compile boundary around the
  scan (:func:`_eager`);
* :mod:`brats_core.nn.ops`: the entry point :func:`~brats_core.nn.ops.selective_scan`, the backend registry and
  selection (``backend=`` > ``BRATS_MAMBA_BACKEND`` > ``"auto"``), and the backends ``mamba_ssm``, ``triton``,
  ``chunked`` (CPU default, CUDA fallback) and ``reference``;
* :mod:`brats_core.nn.triton_scan`: the Triton kernels behind the ``triton`` backend.

The scan API is re-exported here (``from brats_core.nn.mamba import selective_scan`` keeps working).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import (
    ENV_BACKEND,
    ChunkedSelectiveScanFn,
    ScanBackend,
    available_backends,
    is_backend_usable,
    register_backend,
    resolve_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)
from .ops.common import compute_dtype
from .ops.kernels import mamba_ssm_lib, mark_mamba_ssm_broken

__all__ = [
    "ENV_BACKEND",
    "ChunkedSelectiveScanFn",
    "Mamba",
    "ScanBackend",
    "available_backends",
    "is_backend_usable",
    "register_backend",
    "resolve_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
]

_eager_fns: dict[Callable[..., Any], Callable[..., Any]] = {}


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` behind ``torch.compiler.disable``, for Mamba blocks inside ``torch.compile``.

    Compiled graphs must not trace the scans: the chunked scan's loop over chunks would unroll into an enormous graph
    (a 32³ IM-Fuse step had not compiled after 10 minutes on CPU); between compiled regions the scan runs eagerly,
    with whichever backend it resolves to. Backend resolution, which may run the one-time Triton probe, stays eager
    too. Made on first use, because ``torch.compiler.disable`` imports dynamo (and with it triton), which importing
    this module must not.
    """
    if fn not in _eager_fns:
        _eager_fns[fn] = torch.compiler.disable(fn)
    return _eager_fns[fn]


# ---------------------------------------------------------------------------------------------------------------------
# The Mamba block
# ---------------------------------------------------------------------------------------------------------------------


class _CausalConv1dSiLU(torch.autograd.Function):
    """``silu(causal depthwise conv1d(x))`` in the token-major (b, L, d) layout.

    Equals ``silu(nn.Conv1d(d, d, K, groups=d, padding=K-1)(x.transpose(1, 2))[..., :L]).transpose(1, 2)``, but
    works on the ``in_proj`` output layout without transposed copies, and saves only its input (a view of ``xz``
    that is alive anyway): the pre-activation is recomputed in backward instead of being stored.
    """

    @staticmethod
    def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        L, K = x.shape[1], weight.shape[-1]
        w = weight[:, 0, :].to(dtype)  # (d, K); tap k sees x[t + k − (K − 1)]
        pre = x.to(dtype) * w[:, K - 1]
        for k in range(K - 1):
            shift = K - 1 - k
            if shift < L:
                pre[:, shift:].addcmul_(x[:, : L - shift], w[:, k])
        if bias is not None:
            pre.add_(bias.to(dtype))
        return pre

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        dtype = compute_dtype(x, weight, bias)
        ctx.save_for_backward(x, weight, bias)
        ctx.dtype = dtype
        pre = _CausalConv1dSiLU._conv(x, weight, bias, dtype)
        return F.silu(pre, inplace=True).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        dtype = ctx.dtype
        L, K = x.shape[1], weight.shape[-1]
        pre = _CausalConv1dSiLU._conv(x, weight, bias, dtype)
        sig = torch.sigmoid(pre)
        # d silu/dx = σ(x)·(1 + x·(1 − σ(x))), formed in place in `pre`.
        dpre = pre.mul_(1 - sig).add_(1).mul_(sig).mul_(grad.to(dtype))
        del sig
        xw = x.to(dtype)
        w = weight[:, 0, :].to(dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = dpre * w[:, K - 1]
            for k in range(K - 1):
                shift = K - 1 - k
                if shift < L:
                    dx[:, : L - shift].addcmul_(dpre[:, shift:], w[:, k])
            dx = dx.to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.zeros_like(w)
            for k in range(K):
                shift = K - 1 - k
                if shift < L:
                    dw[:, k] = torch.linalg.vecdot(dpre[:, shift:], xw[:, : L - shift], dim=-2).sum(0)
            dw = dw.unsqueeze(1).to(weight.dtype)
        dbias = dpre.sum((0, 1)).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, dbias


def _fp32_or_wider(p: Tensor) -> Tensor:
    """mamba-ssm computes A, D and the dt bias in fp32 (``.float()``); keep fp64 parameters fp64 for exact tests."""
    return p if p.dtype == torch.float64 else p.float()


class Mamba(nn.Module):
    """Mamba-1 block with mamba-ssm 2.3's ``Mamba`` parameters, initialisation and forward semantics.

    Parameters are registered in upstream order, so ``state_dict()`` yields ``A_log (d, n)``, ``D (d)``,
    ``in_proj.weight (2d, d_model)``, ``conv1d.weight (d, 1, d_conv)``, ``conv1d.bias (d)``,
    ``x_proj.weight (r + 2n, d)``, ``dt_proj.weight (d, r)``, ``dt_proj.bias (d)``, ``out_proj.weight (d_model, d)``
    (``d = expand·d_model``, ``r = dt_rank``, ``n = d_state``), and a ``mamba_ssm.Mamba`` state dict loads with
    ``strict=True``. With the same RNG seed the initial parameters equal upstream's (same draw order).
    ``A_log`` and ``D`` carry ``_no_weight_decay``; ``dt_proj.bias`` carries ``_no_reinit``.

    Args:
        d_model: Model width C.
        d_state: State size n (≤ 256 for mamba-ssm's kernel; any size for the other backends).
        d_conv: Causal depthwise convolution width.
        expand: d_inner = expand · d_model.
        dt_rank: Rank of the Δ projection; ``"auto"`` = ceil(d_model / 16).
        dt_min: Lower end of the initial Δ range (softplus of the dt bias).
        dt_max: Upper end of the initial Δ range.
        dt_init: ``"random"`` (uniform ±r^-0.5·dt_scale) or ``"constant"`` for ``dt_proj.weight``.
        dt_scale: Scale of the ``dt_proj.weight`` init.
        dt_init_floor: Minimum initial Δ.
        conv_bias: Bias in the depthwise convolution.
        bias: Bias in ``in_proj`` / ``out_proj``.
        use_fast_path: With the ``mamba_ssm`` backend, use the fused ``mamba_inner_fn`` when causal-conv1d imports.
        layer_idx: Accepted for signature compatibility (upstream uses it for inference caches; not supported here).
        device: Parameter device.
        dtype: Parameter dtype (``A_log`` and ``D`` stay fp32, as upstream).
        backend: Scan backend (see :func:`selective_scan`): ``"auto"``, ``"mamba_ssm"``, ``"triton"``, ``"chunked"``,
            ``"reference"`` or any registered name.
        chunk_size: Chunk length of the chunked and triton backends (``None`` = automatic).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.backend = backend
        self.chunk_size = chunk_size

        # Construction order = upstream's, so a seeded init draws the same random numbers.
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(
            in_channels=self.d_inner,
            out_channels=self.d_inner,
            bias=conv_bias,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            **factory_kwargs,
        )
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + d_state * 2, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # Δ projection init that preserves variance at initialisation.
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise NotImplementedError(f"dt_init={dt_init!r}")

        # dt bias such that softplus(bias) is log-uniform in [dt_min, dt_max]: bias = softplus⁻¹(dt).
        dt = torch.exp(
            torch.rand(self.d_inner, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        # Generic "zero all Linear biases" initialisers must skip this one.
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

        # S4D-real initialisation A = -(1..n) per channel, stored as log in fp32.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1).contiguous()
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
            f"dt_rank={self.dt_rank}, backend={self.backend!r}"
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Apply the block.

        Args:
            hidden_states: (b, L, d_model).

        Returns:
            (b, L, d_model), same dtype as the parameters' computation (fp32 in, fp32 out).
        """
        # the first resolve may run the Triton probe: never inside a graph that dynamo traces (--compile)
        resolve = _eager(resolve_backend) if torch.compiler.is_compiling() else resolve_backend
        backend = resolve(self.backend, hidden_states.device)
        if backend == "mamba_ssm" and self.use_fast_path:
            out = self._forward_mamba_inner(hidden_states)
            if out is not None:
                return out

        xz = self.in_proj(hidden_states)  # (b, L, 2d): first d channels are x, last d are z
        x, z = xz.chunk(2, dim=-1)
        x = _CausalConv1dSiLU.apply(x, self.conv1d.weight, self.conv1d.bias)  # (b, L, d)
        x_dbl = self.x_proj(x)  # (b, L, r + 2n), split in the order [dt, B, C]
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj without its bias: the bias is added inside the scan, before the softplus (as mamba-ssm does).
        delta = F.linear(dt, self.dt_proj.weight)  # (b, L, d)
        A = -torch.exp(_fp32_or_wider(self.A_log))
        scan = _eager(selective_scan) if torch.compiler.is_compiling() else selective_scan
        y = scan(
            x.transpose(1, 2),
            delta.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            _fp32_or_wider(self.D),
            z=z.transpose(1, 2),
            delta_bias=_fp32_or_wider(self.dt_proj.bias),
            delta_softplus=True,
            backend=backend,
            chunk_size=self.chunk_size,
        )
        assert isinstance(y, Tensor)
        return self.out_proj(y.transpose(1, 2))

    def _forward_mamba_inner(self, hidden_states: Tensor) -> Tensor | None:
        """mamba-ssm's fused path (conv + scan + gate + out_proj), exactly as ``mamba_simple`` calls it; None when
        unavailable or failing, so the caller takes the generic path."""
        lib = mamba_ssm_lib()
        if lib is None or lib.causal_conv1d_fn is None or not hidden_states.is_cuda:
            return None
        try:
            b, L, _ = hidden_states.shape
            # "b l d -> d (b l)", project, "d (b l) -> b d l": the (b, 2d, L) layout mamba_inner_fn expects.
            xz = (self.in_proj.weight @ hidden_states.reshape(b * L, -1).t()).view(-1, b, L).permute(1, 0, 2)
            if self.in_proj.bias is not None:
                xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
            A = -torch.exp(self.A_log.float())
            return lib.mamba_inner_fn(
                xz,
                self.conv1d.weight,
                self.conv1d.bias,
                self.x_proj.weight,
                self.dt_proj.weight,
                self.out_proj.weight,
                self.out_proj.bias,
                A,
                None,
                None,
                self.D.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            )
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            mark_mamba_ssm_broken(exc)
            return None
