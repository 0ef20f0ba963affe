"""Mamba-1 block, parameter- and state-dict-compatible with ``mamba_ssm.Mamba`` (mamba-ssm 2.3), with CPU/GPU scans.

IM-Fuse fuses modality tokens with ``mamba_ssm.Mamba``, whose selective scan only exists as a CUDA extension that
cannot be installed on CPU machines (and rarely on an offline GPU box). This module re-implements the block exactly
(``shared/spec/MAMBA.md`` §1.3: same constructor, parameter names, shapes, registration order, initialisation and
forward semantics) and routes the selective scan through one entry point, :func:`selective_scan`, with backends:

* ``"mamba_ssm"`` – mamba-ssm's fused CUDA kernels, used only when the package imports *and* the tensors are on CUDA;
  any failure falls back (with one warning) to the next backend.
* ``"triton"`` – Triton kernels (forward and backward, chunk-parallel; :mod:`brats_core.nn.triton_scan`), used
  automatically only on CUDA after a one-time probe compile and run succeeded; never chosen automatically on CPU
  (where it only runs, slowly, in Triton's interpreter when ``TRITON_INTERPRET=1``). Needs no compilation step:
  ``triton`` ships with PyTorch's CUDA wheels. A missing or broken ``triton`` only makes the backend unusable.
* ``"chunked"`` – pure PyTorch, exact, memory-bounded: a chunked reduce-then-scan forward that keeps only per-chunk
  carry states, and a block-recompute backward (:class:`ChunkedSelectiveScanFn`). CPU default and CUDA fallback.
* ``"reference"`` – a plain sequential loop under autograd, dtype-generic (fp64 ground truth for tests; slow).

Backends live in a registry (:func:`register_backend`), so further kernels can be added under the same entry
point. Selection: explicit ``backend`` argument > environment variable ``BRATS_MAMBA_BACKEND`` > ``"auto"`` (the
usable registered backend with the lowest ``auto_priority``: mamba_ssm on CUDA tensors, then triton on CUDA, else
chunked).

Scan layout (mamba-ssm's ``selective_scan_fn``): ``u, delta, z: (b, d, L)``; ``A: (d, n)``; ``B, C: (b, n, L)``;
``D, delta_bias: (d,)``; output ``(b, d, L)``; optional last state ``(b, d, n)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ENV_BACKEND",
    "ChunkedSelectiveScanFn",
    "Mamba",
    "ScanBackend",
    "available_backends",
    "register_backend",
    "resolve_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
]

logger = logging.getLogger(__name__)

ENV_BACKEND = "BRATS_MAMBA_BACKEND"

# mamba-ssm's kernel softplus: x <= 20 ? log1p(exp(x)) : x, i.e. F.softplus's default threshold.
_SOFTPLUS_THRESHOLD = 20.0

# State elements advanced per Python step by the chunked scan (b·nc·n·d): large enough that per-op dispatch overhead
# is small, small enough that the step's few state-sized tensors stay in cache. MAMBA.md §3.1 swept 2^14…2^22 on CPU
# (2^18–2^20 best; here 2^16–2^18 measured within 15 %); on GPU larger steps amortise kernel launches.
_STEP_ELEMS_CPU = 1 << 18
_STEP_ELEMS_CUDA = 1 << 22
# exp(x) = exp2(x·log2 e): the scan pre-scales A once (see _step).
_LOG2E = math.log2(math.e)
# Up to this many chunks the carries are propagated by a loop, beyond by a log-depth scan (see _carry_scan).
_SEQUENTIAL_CARRY_MAX = 64
# Chunks shorter than this make the per-chunk reduction and carry pass dominate; only tests ask for less.
_MIN_AUTO_CHUNK_LEN = 16

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _log_choice_once(name: str, device: torch.device) -> str:
    key = f"choice:{name}:{device.type}"
    if key not in _warned:
        _warned.add(key)
        logger.info("Mamba selective scan on %s tensors: backend %r", device.type, name)
    return name


# ---------------------------------------------------------------------------------------------------------------------
# Backend registry and the single entry point
# ---------------------------------------------------------------------------------------------------------------------

ScanFn = Callable[..., Any]


@dataclass(frozen=True)
class ScanBackend:
    """A selective-scan implementation behind :func:`selective_scan`.

    Attributes:
        name: Registry key (the value of ``backend=`` / ``BRATS_MAMBA_BACKEND``).
        fn: Callable with the signature ``fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
            chunk_size)`` and the layout described in the module docstring; returns ``out`` or ``(out, last_state)``.
        is_usable: ``is_usable(device) -> bool``; whether the backend can run on tensors of that device right now
            (e.g. its package imports). Must be cheap after the first call (cache probes).
        auto_priority: Order for ``"auto"`` (lower first); ``None`` = only used when named explicitly.
        auto_device_types: Device types (``"cuda"``, ``"cpu"``) on which ``"auto"`` may pick the backend; ``None`` =
            any. Naming the backend explicitly is not restricted by this.
    """

    name: str
    fn: ScanFn
    is_usable: Callable[[torch.device], bool]
    auto_priority: int | None = None
    auto_device_types: tuple[str, ...] | None = None


_BACKENDS: dict[str, ScanBackend] = {}


def register_backend(
    name: str,
    fn: ScanFn,
    is_usable: Callable[[torch.device], bool],
    auto_priority: int | None = None,
    auto_device_types: tuple[str, ...] | None = None,
) -> None:
    """Register (or replace) a selective-scan backend; see :class:`ScanBackend` for the contract.

    Built in: ``mamba_ssm`` (priority 0), ``triton`` (50, CUDA only), ``chunked`` (100), ``reference`` (explicit).
    """
    if name == "auto":
        raise ValueError("'auto' is reserved for automatic selection")
    _BACKENDS[name] = ScanBackend(name, fn, is_usable, auto_priority, auto_device_types)


def available_backends() -> list[str]:
    """Names of all registered backends (usable or not), in registration order."""
    return list(_BACKENDS)


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """Pick the backend for tensors on ``device``.

    Args:
        backend: Explicit choice; ``None`` or ``"auto"`` defers to ``BRATS_MAMBA_BACKEND``, then to automatic
            selection.
        device: Device of the scan inputs.

    Returns:
        The registry name of a backend usable on ``device``. A named backend that is not usable there (e.g.
        ``mamba_ssm`` on CPU) falls back to automatic selection with a one-time warning.

    Raises:
        ValueError: Unknown backend name.
    """
    device = torch.device(device)
    requested = backend if backend not in (None, "auto") else os.environ.get(ENV_BACKEND, "").strip() or "auto"
    if requested != "auto":
        if requested not in _BACKENDS:
            raise ValueError(f"unknown Mamba scan backend {requested!r}; registered: {available_backends()}")
        if _BACKENDS[requested].is_usable(device):
            return _log_choice_once(requested, device)
        _warn_once(
            f"unusable:{requested}:{device.type}",
            f"Mamba scan backend {requested!r} is not usable on {device.type} tensors; falling back to 'auto'",
        )
    candidates = sorted(
        (
            b
            for b in _BACKENDS.values()
            if b.auto_priority is not None and (b.auto_device_types is None or device.type in b.auto_device_types)
        ),
        key=lambda b: (b.auto_priority, b.name),
    )
    for cand in candidates:
        if cand.is_usable(device):
            return _log_choice_once(cand.name, device)
    raise RuntimeError(f"no Mamba scan backend is usable on {device}")


def _check_scan_shapes(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
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


def selective_scan(
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
    backend: str | None = None,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan (``selective_scan_fn`` semantics), dispatched to a backend.

    Per batch ``b``, channel ``d`` and state ``n`` (``h_{-1} = 0``)::

        dt_t = softplus(delta_t + delta_bias)        (threshold 20; skipped when delta_softplus is False)
        h_t  = exp(dt_t · A) ⊙ h_{t-1} + dt_t · B_t · u_t
        y_t  = Σ_n C_t[n] · h_t[n] + D · u_t
        out  = y ⊙ silu(z)                            (when z is given)

    Note: unlike mamba-ssm's ``selective_scan_fn`` (default ``False``), ``delta_softplus`` defaults to ``True`` here,
    which is what every Mamba block passes.

    Args:
        u: (b, d, L) input.
        delta: (b, d, L) time-step pre-activation (``dt_proj.weight @ dt``, bias not yet added).
        A: (d, n) state matrix (negative real, ``-exp(A_log)``).
        B: (b, n, L) input-dependent input matrix.
        C: (b, n, L) input-dependent output matrix.
        D: (d,) skip connection, or None.
        z: (b, d, L) gate, or None.
        delta_bias: (d,) added to ``delta`` before the softplus, or None.
        delta_softplus: Apply softplus to ``delta + delta_bias``.
        return_last_state: Also return ``h_{L-1}``.
        backend: Backend name; ``None``/``"auto"`` → ``BRATS_MAMBA_BACKEND`` → automatic (see :func:`resolve_backend`).
        chunk_size: Chunk length of the chunked and triton backends (``None`` = automatic); ignored by the others.

    Returns:
        ``out`` (b, d, L) in ``u``'s dtype, or ``(out, last_state)`` with ``last_state`` (b, d, n) in the compute
        dtype (fp32 for half inputs, else the promoted input dtype).
    """
    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    return _BACKENDS[name].fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size)


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


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    # The scan state is kept in at least fp32 (as the CUDA kernel does); fp64 inputs stay fp64 for exact tests.
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ---------------------------------------------------------------------------------------------------------------------
# "reference": sequential loop under autograd
# ---------------------------------------------------------------------------------------------------------------------


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

    Same arguments, shapes and semantics as :func:`selective_scan` (``chunk_size`` is ignored). Stores one
    (b, d, n) state per step for backward, i.e. O(L·d·n) memory: tiny shapes only.
    """
    del chunk_size
    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    uc, dc, Ac, Bc, Cc = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        dc = dc + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dc = F.softplus(dc, threshold=_SOFTPLUS_THRESHOLD)
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


# ---------------------------------------------------------------------------------------------------------------------
# "chunked": memory-bounded exact scan as an autograd Function
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """How the chunked scan cuts the sequence: ``nc`` chunks of ``T`` steps (``Lp = nc·T ≥ L``; positions ≥ L are
    zero-padded identity steps), and backward recompute blocks of ``K`` steps (``ceil(T/K)`` checkpoints)."""

    nc: int
    T: int
    K: int

    @property
    def padded_len(self) -> int:
        return self.nc * self.T


def _plan(b: int, d: int, n: int, L: int, device: torch.device, chunk_size: int | None) -> _Plan:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        T = min(chunk_size, L)
    else:
        step_elems = _STEP_ELEMS_CUDA if device.type == "cuda" else _STEP_ELEMS_CPU
        target = max(1, min(step_elems // (b * d * n), L // _MIN_AUTO_CHUNK_LEN))
        # A chunk count that divides L avoids zero-padded copies of every input (IM-Fuse's L = 5·N³ has many
        # divisors); accept one down to half the target, else pad.
        nc = next((c for c in range(target, max(1, target // 2) - 1, -1) if L % c == 0), target)
        T = math.ceil(L / nc)
    nc = math.ceil(L / T)
    # √T-sized recompute blocks minimise the backward's working set (T/K checkpoints + 2K block states).
    K = max(1, math.isqrt(T))
    return _Plan(nc, T, K)


def _tokens(x: Tensor, Lp: int, dtype: torch.dtype) -> Tensor:
    """(b, c, L) API layout → token-major (b, Lp, c) with unit stride along c.

    The module's tensors are already token-major underneath (``in_proj`` / ``x_proj`` outputs), so this is a free
    view unless a dtype cast, zero padding up to Lp, or a gather from a genuinely (b, c, L)-contiguous input is
    needed. Per-step slices ``view(b, nc, T, c)[:, :, t]`` are then (b, nc, c) blocks of contiguous rows."""
    b, c, L = x.shape
    xt = x.transpose(1, 2)
    if Lp == L and xt.dtype == dtype and xt.stride(-1) == 1:
        return xt
    out = torch.empty(b, Lp, c, dtype=dtype, device=x.device)
    out[:, :L].copy_(xt)
    out[:, L:].zero_()
    return out


def _rowdot(h: Tensor, v: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """``out[..., i] = Σ_j h[..., i, j] · v[..., j]`` for h (b, nc, i, j), v (b, nc, j), out (b, nc, i).

    A single matrix-vector product is fastest for one batch; for many small ones CPU batched GEMV is ~3× slower than
    a broadcast multiply (into ``scratch``, shaped like h) and a reduction."""
    if h.shape[0] * h.shape[1] == 1:
        out.copy_(torch.matmul(h, v.unsqueeze(-1)).squeeze(-1))
        return out
    return torch.sum(torch.mul(h, v.unsqueeze(-2), out=scratch), dim=-1, out=out)


def _vecmat(v: Tensor, h: Tensor, out: Tensor) -> Tensor:
    """``out[..., j] = Σ_i v[..., i] · h[..., i, j]`` for v (b, nc, i), h (b, nc, i, j), out (b, nc, j) (any strides;
    matmul into a strided ``out`` is ~10× slower than a copy of its small result)."""
    out.copy_(torch.matmul(v.unsqueeze(-2), h).squeeze(-2))
    return out


def _softplus_dt(delta_t: Tensor, delta_bias: Tensor | None, softplus: bool, L: int, Lp: int) -> Tensor:
    """dt = softplus(delta + bias) as (b, Lp, d), with padded steps dt = 0 (identity steps: decay 1, no input)."""
    b, _, d = delta_t.shape
    pre = delta_t + delta_bias.to(delta_t.dtype) if delta_bias is not None else delta_t
    if Lp == L:
        return F.softplus(pre, threshold=_SOFTPLUS_THRESHOLD) if softplus else pre  # only ever read
    dt = torch.zeros(b, Lp, d, dtype=delta_t.dtype, device=delta_t.device)
    dt[:, :L] = F.softplus(pre, threshold=_SOFTPLUS_THRESHOLD) if softplus else pre
    return dt


def _step(h: Tensor, dt_t: Tensor, dtu_t: Tensor, B_t: Tensor, A2t: Tensor, a: Tensor) -> Tensor:
    """One recurrence step on all chunks at once, in place: ``h ← a ⊙ h + B_t ⊗ (dt_t·u_t)`` with
    ``a = 2^(dt_t · A·log2 e) = exp(dt_t · A)`` written into ``a`` and returned.

    Shapes: h, a (b, nc, n, d); dt_t, dtu_t (b, nc, d); B_t (b, nc, n); A2t (n, d). exp2 of a pre-scaled A is what
    the CUDA kernel does, and torch's CPU exp2 is ~2.7× faster than exp (the exponential dominates the scan's cost).
    """
    torch.mul(dt_t.unsqueeze(-2), A2t, out=a).exp2_()
    h.mul_(a).addcmul_(B_t.unsqueeze(-1), dtu_t.unsqueeze(-2))
    return a


def _chunk_decay(dt: Tensor, A: Tensor) -> Tensor:
    """Total decay of every chunk, ``P = exp(A · Σ_t dt_t)`` as (b, nc, n, d) from dt viewed (b, nc, T, d).

    Summed and exponentiated in fp64: an fp32 sum over thousands of steps would put a relative error of
    ~|A·Σdt|·√T·eps on the carries."""
    total = dt.sum(2, dtype=torch.float64)  # (b, nc, d)
    return torch.exp(total.unsqueeze(-2) * A.t().to(torch.float64)).to(dt.dtype)


def _carry_scan(P: Tensor, E: Tensor) -> Tensor:
    """Inclusive scan over chunks of the affine maps ``x ↦ P[c] ⊙ x + E[c]``: returns S with
    ``S[:, c] = P[:, c] ⊙ S[:, c-1] + E[:, c]`` (``S[:, -1] = 0``), for P, E (b, nc, ...).

    Few chunks: a sequential loop. Many chunks (the GPU step size gives thousands; one kernel launch each would
    dominate): a Hillis–Steele doubling scan, log2(nc) levels of whole-tensor ops; it only re-associates sums of
    decayed states, so it is as accurate as the loop.
    """
    nc = E.shape[1]
    S = E.clone()
    if nc <= _SEQUENTIAL_CARRY_MAX:
        for c in range(1, nc):
            S[:, c].addcmul_(P[:, c], S[:, c - 1])
        return S
    P = P.clone()
    offset = 1
    while offset < nc:
        # Right-hand sides read the previous level only (they are evaluated before the slice assignments).
        new_s = torch.addcmul(S[:, offset:], P[:, offset:], S[:, :-offset])
        new_p = P[:, offset:] * P[:, :-offset]
        S[:, offset:] = new_s
        P[:, offset:] = new_p
        offset *= 2
    return S


class ChunkedSelectiveScanFn(torch.autograd.Function):
    """Exact selective scan with O(b·nc·d·n) saved state (no (L, d, n) tensor), for CPU and CUDA, fp32 and fp64.

    Forward ("reduce-then-scan", MAMBA.md §3.1): the sequence is cut into ``nc`` chunks of ``T`` steps that are all
    advanced together on one (b, nc, n, d) state. (1) each chunk's end state from zero, (2) the exact carry-in of
    every chunk by a short sequential pass over chunks (a chunk's total decay is ``exp(A · Σ dt)``), (3) every chunk
    re-run from its carry-in, emitting y. Only the carries are saved (besides the inputs).

    Backward: the adjoint ``G_t = ∂loss/∂h_t = gy_t·C_t + a_{t+1}·G_{t+1}`` is a reverse scan of the same form. One
    forward recompute pass from the carries stores a checkpoint every K ≈ √T steps and yields the adjoint's per-chunk
    reductions (hence its carries), y (for the gate gradient) and dC. Then each K-block is recomputed (``a_t`` and
    ``a_t ⊙ h_{t-1}``) and walked backwards, so ``∂loss/∂(dt_t·A) = G_t ⊙ a_t ⊙ h_{t-1}`` is formed directly. No
    cumulative-sum closed form (overflows for d_state ≥ 32) and no telescoping of the decay gradient (loses ~1e-3
    in fp32) is used, which keeps every gradient at the input precision.

    Layout: per-token inputs stay token-major (b, L, c) (the layout ``in_proj``/``x_proj`` produce; no permuted
    copies), each step reading strided (b, nc, c) slices; the state is (n, d) so that the reductions over n (y,
    ∂/∂u) are one vector-matrix product per step.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
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
        dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        b, d, L = u.shape
        n = A.shape[1]
        plan = _plan(b, d, n, L, u.device, chunk_size)
        nc, T, Lp = plan.nc, plan.T, plan.padded_len
        state_shape = (b, nc, n, d)

        with torch.no_grad():
            A2t = (A.to(dtype) * _LOG2E).t().contiguous()
            ut = _tokens(u, L, dtype)  # (b, L, d)
            dt = _softplus_dt(_tokens(delta, L, dtype), delta_bias, delta_softplus, L, Lp)  # (b, Lp, d)
            dtu = dt.clone()  # dt·u, the per-step coefficient of B (zero on padding)
            dtu[:, :L].mul_(ut)
            dt_v, dtu_v = dt.view(b, nc, T, d), dtu.view(b, nc, T, d)
            B_v = _tokens(B, Lp, dtype).unflatten(1, (nc, T))
            C_v = _tokens(C, Lp, dtype).unflatten(1, (nc, T))

            a = torch.empty(state_shape, dtype=dtype, device=u.device)
            carry = torch.zeros(state_shape, dtype=dtype, device=u.device)
            if nc > 1:
                # (1) end state of every chunk started from zero.
                h = torch.zeros(state_shape, dtype=dtype, device=u.device)
                for t in range(T):
                    _step(h, dt_v[:, :, t], dtu_v[:, :, t], B_v[:, :, t], A2t, a)
                # (2) carry-ins: H0[c] = P[c-1] ⊙ H0[c-1] + E[c-1], i.e. the shifted inclusive carry scan.
                carry[:, 1:] = _carry_scan(_chunk_decay(dt_v, A), h)[:, :-1]
                h.copy_(carry)
            else:
                h = carry.clone()
            # (3) re-run every chunk from its exact carry-in and emit y (before D and the gate).
            y = torch.empty(b, Lp, d, dtype=dtype, device=u.device)
            y_v = y.view(b, nc, T, d)
            for t in range(T):
                _step(h, dt_v[:, :, t], dtu_v[:, :, t], B_v[:, :, t], A2t, a)
                _vecmat(C_v[:, :, t], h, y_v[:, :, t])
            last_state = h[:, nc - 1].transpose(-1, -2).contiguous()  # padded steps are identities: h_{L-1}
            del dt, dtu, dt_v, dtu_v, B_v, C_v, a, h

            out = y[:, :L]
            if D is not None:
                out.addcmul_(ut, D.to(dtype))
            if z is not None:
                out.mul_(F.silu(z.transpose(1, 2).to(dtype)))

        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, carry)
        ctx.plan = plan
        ctx.dtype = dtype
        ctx.delta_softplus = delta_softplus
        ctx.return_last_state = return_last_state
        out = out.to(u.dtype).transpose(1, 2)
        return (out, last_state) if return_last_state else out

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, carry = ctx.saved_tensors
        plan: _Plan = ctx.plan
        dtype: torch.dtype = ctx.dtype
        nc, T, K, Lp = plan.nc, plan.T, plan.K, plan.padded_len
        b, d, L = u.shape
        n = A.shape[1]
        dev = u.device
        state_shape = (b, nc, n, d)
        gout = grads[0]
        glast = grads[1] if ctx.return_last_state else None

        def new(*shape: int) -> Tensor:
            return torch.empty(shape, dtype=dtype, device=dev)

        ut = _tokens(u, L, dtype)  # (b, L, d)
        # Gradient reaching y (before the gate): gy = gout ⊙ silu(z), zero on the padding.
        gy = torch.zeros(b, Lp, d, dtype=dtype, device=dev)
        if gout is not None:
            gy[:, :L] = gout.transpose(1, 2)
            if z is not None:
                gy[:, :L].mul_(F.silu(z.transpose(1, 2).to(dtype)))
        dD = (gy[:, :L] * ut).sum((0, 1)) if D is not None and ctx.needs_input_grad[5] else None

        A2t = (A.to(dtype) * _LOG2E).t().contiguous()
        At = A.to(dtype).t().contiguous()
        dt = _softplus_dt(_tokens(delta, L, dtype), delta_bias, ctx.delta_softplus, L, Lp)
        dtu = dt.clone()
        dtu[:, :L].mul_(ut)
        dt_v, dtu_v, gy_v = dt.view(b, nc, T, d), dtu.view(b, nc, T, d), gy.view(b, nc, T, d)
        B_v = _tokens(B, Lp, dtype).unflatten(1, (nc, T))
        C_v = _tokens(C, Lp, dtype).unflatten(1, (nc, T))

        # Pass 1, forward in time from the carries: checkpoints every K steps; y_t (only for the gate gradient);
        # dC_t = Σ_d gy_t[d]·h_t[:, d]; and each chunk's adjoint reduction E'_c = Σ_{t∈c} (Π_{s..t} a) ⊙ (C_t ⊗ gy_t),
        # i.e. a_s ⊙ (adjoint at the chunk start s when started from zero at the chunk end).
        nblk = math.ceil(T / K)
        ckpt = new(nblk, *state_shape)
        need_dz = z is not None and gout is not None and ctx.needs_input_grad[6]
        y = new(b, Lp, d) if need_dz else None
        y_v = y.view(b, nc, T, d) if y is not None else None
        dC = new(b, Lp, n)
        dC_v = dC.view(b, nc, T, n)
        a, scratch = new(*state_shape), new(*state_shape)
        h = carry.clone()
        gin = torch.zeros(state_shape, dtype=dtype, device=dev)  # adjoint entering each chunk from its right
        if glast is not None:
            gin[:, nc - 1].copy_(glast.transpose(-1, -2))
        if nc > 1:
            cum = torch.ones(state_shape, dtype=dtype, device=dev)
            red = torch.zeros(state_shape, dtype=dtype, device=dev)
        for t in range(T):
            if t % K == 0:
                ckpt[t // K].copy_(h)
            _step(h, dt_v[:, :, t], dtu_v[:, :, t], B_v[:, :, t], A2t, a)
            if y_v is not None:
                _vecmat(C_v[:, :, t], h, y_v[:, :, t])
            _rowdot(h, gy_v[:, :, t], dC_v[:, :, t], scratch)
            if nc > 1:
                cum.mul_(a)
                red.addcmul_(cum, torch.mul(C_v[:, :, t].unsqueeze(-1), gy_v[:, :, t].unsqueeze(-2), out=scratch))
        if nc > 1:
            # Adjoint carries, right to left: Gin[c-1] = E'_c + P_c ⊙ Gin[c] (Gin[nc-1] = last-state gradient),
            # i.e. the carry scan on the chunk-reversed sequence, with Gin[nc-1] folded into the last reduction.
            P = _chunk_decay(dt_v, A)
            red[:, nc - 1].addcmul_(P[:, nc - 1], gin[:, nc - 1])
            gin[:, :-1] = _carry_scan(P.flip(1), red.flip(1)).flip(1)[:, 1:]
            del cum, red, P

        # Pass 2, backwards block by block: recompute a_t and a_t ⊙ h_{t-1} for K steps, then walk them in reverse.
        a_blk, ah_blk = new(K, *state_shape), new(K, *state_shape)
        dA_acc = torch.zeros(state_shape, dtype=dtype, device=dev)
        s1 = new(b, Lp, d)  # Σ_n B_t ⊙ G_t  (→ du, ddt)
        s2 = new(b, Lp, d)  # Σ_n A ⊙ G_t ⊙ a_t ⊙ h_{t-1}  (→ ddt)
        dB = new(b, Lp, n)
        s1_v, s2_v, dB_v = s1.view(b, nc, T, d), s2.view(b, nc, T, d), dB.view(b, nc, T, n)
        G = gin
        for blk in range(nblk - 1, -1, -1):
            t0 = blk * K
            t1 = min(T, t0 + K)
            h.copy_(ckpt[blk])
            for t in range(t0, t1):
                k = t - t0
                torch.mul(dt_v[:, :, t].unsqueeze(-2), A2t, out=a_blk[k]).exp2_()
                torch.mul(h, a_blk[k], out=ah_blk[k])
                torch.addcmul(ah_blk[k], B_v[:, :, t].unsqueeze(-1), dtu_v[:, :, t].unsqueeze(-2), out=h)
            for t in range(t1 - 1, t0 - 1, -1):
                k = t - t0
                G.addcmul_(C_v[:, :, t].unsqueeze(-1), gy_v[:, :, t].unsqueeze(-2))  # now G = G_t
                _vecmat(B_v[:, :, t], G, s1_v[:, :, t])
                _rowdot(G, dtu_v[:, :, t], dB_v[:, :, t], scratch)
                q = ah_blk[k].mul_(G)  # ∂loss/∂(dt_t·A) = G_t ⊙ a_t ⊙ h_{t-1}
                dA_acc.addcmul_(q, dt_v[:, :, t].unsqueeze(-2))
                torch.sum(q.mul_(At), dim=-2, out=s2_v[:, :, t])
                if t > 0:
                    G.mul_(a_blk[k])  # a_t ⊙ G_t, the part of G_{t-1} coming from the future
        del a_blk, ah_blk, ckpt, h, a, scratch, gin, G, dtu, dtu_v, B_v, C_v, gy_v, s1_v, s2_v, dB_v, dC_v, dt_v

        dA = dA_acc.sum((0, 1)).t()
        del dA_acc
        # x_t = dt_t·u_t·B_t: ∂/∂u = dt·s1 (+ D·gy), ∂/∂dt = u·s1 + s2.
        ddt = s2[:, :L].addcmul_(s1[:, :L], ut)
        du = s1[:, :L].mul_(dt[:, :L])
        del dt
        if D is not None:
            du.addcmul_(gy[:, :L], D.to(dtype))
        del gy
        if ctx.delta_softplus:
            pre = delta.transpose(1, 2).to(dtype)
            if delta_bias is not None:
                pre = pre + delta_bias.to(dtype)
            # softplus'(x) = σ(x) below the threshold; 1 above, where the kernel returns x itself.
            ddt.mul_(torch.where(pre > _SOFTPLUS_THRESHOLD, 1.0, torch.sigmoid(pre)))
            del pre
        ddelta_bias = ddt.sum((0, 1)) if delta_bias is not None and ctx.needs_input_grad[7] else None

        dz = None
        if y is not None:
            assert z is not None and gout is not None
            dz = y[:, :L]
            if D is not None:
                dz.addcmul_(ut, D.to(dtype))
            zt = z.transpose(1, 2).to(dtype)
            sz = torch.sigmoid(zt)
            # d silu(z)/dz = σ(z)·(1 + z·(1 − σ(z)))
            dz.mul_(gout.transpose(1, 2)).mul_(sz.mul_(zt * (1 - sz) + 1))
            del zt, sz

        def _grad(g: Tensor | None, ref: Tensor | None, idx: int, transpose: bool = True) -> Tensor | None:
            if g is None or ref is None or not ctx.needs_input_grad[idx]:
                return None
            return (g.transpose(1, 2) if transpose else g).to(ref.dtype)

        return (
            _grad(du, u, 0),
            _grad(ddt, delta, 1),
            _grad(dA, A, 2, transpose=False),
            _grad(dB[:, :L], B, 3),
            _grad(dC[:, :L], C, 4),
            _grad(dD, D, 5, transpose=False),
            _grad(dz, z, 6),
            _grad(ddelta_bias, delta_bias, 7, transpose=False),
            None,
            None,
            None,
        )


def selective_scan_chunked(
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
    """Chunked backend (:class:`ChunkedSelectiveScanFn`); arguments as :func:`selective_scan`.

    ``chunk_size`` is the chunk length T (``None``: about 2^18 state elements per step on CPU, 2^22 on CUDA).
    """
    return ChunkedSelectiveScanFn.apply(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size
    )


# ---------------------------------------------------------------------------------------------------------------------
# "mamba_ssm": the upstream CUDA kernels, if they import
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _MambaSsmLib:
    selective_scan_fn: ScanFn
    mamba_inner_fn: ScanFn
    causal_conv1d_fn: ScanFn | None
    broken: bool = False


_mamba_ssm_cache: list[_MambaSsmLib | None] = []


def _mamba_ssm_lib() -> _MambaSsmLib | None:
    """Import mamba-ssm's kernels once. Any exception counts as "not usable": a mismatched build fails with
    ImportError (undefined symbol), OSError or RuntimeError rather than a clean ModuleNotFoundError."""
    if not _mamba_ssm_cache:
        lib: _MambaSsmLib | None
        try:
            from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn

            try:
                from causal_conv1d import causal_conv1d_fn
            except Exception:
                causal_conv1d_fn = None
            lib = _MambaSsmLib(selective_scan_fn, mamba_inner_fn, causal_conv1d_fn)
        except Exception as exc:
            _warn_once(
                "import:mamba_ssm",
                f"mamba_ssm is not usable ({type(exc).__name__}: {exc}); CUDA tensors use the 'chunked' scan instead",
            )
            lib = None
        _mamba_ssm_cache.append(lib)
    lib = _mamba_ssm_cache[0]
    return None if lib is None or lib.broken else lib


def _mark_mamba_ssm_broken(exc: Exception) -> None:
    lib = _mamba_ssm_cache[0] if _mamba_ssm_cache else None
    if lib is not None:
        lib.broken = True
    _warn_once(
        "call:mamba_ssm",
        f"mamba_ssm kernel call failed ({type(exc).__name__}: {exc}); using the 'chunked' scan from now on",
    )


def _mamba_ssm_usable(device: torch.device) -> bool:
    return device.type == "cuda" and _mamba_ssm_lib() is not None


def _selective_scan_mamba_ssm(
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
    lib = _mamba_ssm_lib()
    if lib is not None and u.is_cuda:
        try:
            return lib.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            _mark_mamba_ssm_broken(exc)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size)


# ---------------------------------------------------------------------------------------------------------------------
# "triton": brats_core.nn.triton_scan, imported lazily (importing triton costs ~1 s and may be absent or broken)
# ---------------------------------------------------------------------------------------------------------------------

_triton_state: dict[str, Any] = {}


def _triton_module() -> Any | None:
    """``brats_core.nn.triton_scan`` or None (cached); any import failure (no triton, ABI mismatch) → None."""
    if "module" not in _triton_state:
        try:
            from . import triton_scan

            _triton_state["module"] = triton_scan
        except Exception as exc:
            _triton_state["module"] = None
            _warn_once("import:triton", f"the Triton scan is not usable ({type(exc).__name__}: {exc})")
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
                    _warn_once("probe:triton", "the Triton scan probe gave wrong results; not using it")
            except Exception as exc:
                _warn_once("probe:triton", f"the Triton scan probe failed ({type(exc).__name__}: {exc})")
        _triton_state[key] = ok
    return bool(_triton_state[key])


def _triton_usable(device: torch.device) -> bool:
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


def _selective_scan_triton(
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
    mod = _triton_module()
    if mod is not None and not _triton_state.get("broken"):
        try:
            return mod.selective_scan_triton(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size
            )
        except torch.OutOfMemoryError:
            raise  # the input is too big for the GPU, not a broken kernel: the chunked scan would not fit either
        except Exception as exc:
            # e.g. a kernel variant (new dtype or flag combination) that fails to compile after the probe passed.
            _triton_state["broken"] = True
            _warn_once(
                "call:triton",
                f"Triton scan failed ({type(exc).__name__}: {exc}); using the 'chunked' scan from now on",
            )
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size)


register_backend("mamba_ssm", _selective_scan_mamba_ssm, _mamba_ssm_usable, auto_priority=0)
register_backend("triton", _selective_scan_triton, _triton_usable, auto_priority=50, auto_device_types=("cuda",))
register_backend("chunked", selective_scan_chunked, lambda device: True, auto_priority=100)
register_backend("reference", selective_scan_reference, lambda device: True, auto_priority=None)


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
        dtype = _compute_dtype(x, weight, bias)
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
        lib = _mamba_ssm_lib()
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
            _mark_mamba_ssm_broken(exc)
            return None
