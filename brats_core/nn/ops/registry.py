"""The selective-scan backend registry and the single entry point, :func:`selective_scan`.

Backends live in a registry (:func:`register_backend`), so further kernels can be added under the same entry point.
Selection: explicit ``backend`` argument > environment variable ``BRATS_MAMBA_BACKEND`` > ``"auto"`` (the usable
registered backend with the lowest ``auto_priority``: mamba_ssm on CUDA tensors, then triton on CUDA, else chunked).
The built-in backends are registered at the end of this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .chunked import selective_scan_chunked
from .common import ScanFn, check_scan_shapes, log_choice_once, warn_once
from .kernels import mamba_ssm_adapter, mamba_ssm_usable, triton_adapter, triton_usable
from .reference import selective_scan_reference

__all__ = [
    "ENV_BACKEND",
    "ScanBackend",
    "available_backends",
    "is_backend_usable",
    "register_backend",
    "resolve_backend",
    "selective_scan",
]

ENV_BACKEND = "BRATS_MAMBA_BACKEND"


@dataclass(frozen=True)
class ScanBackend:
    """A selective-scan implementation behind :func:`selective_scan`.

    Attributes:
        name: Registry key (the value of ``backend=`` / ``BRATS_MAMBA_BACKEND``).
        fn: Callable with the signature ``fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
            chunk_size)`` and the layout of :func:`selective_scan`; returns ``out`` or ``(out, last_state)``.
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


def _backend(name: str) -> ScanBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown Mamba scan backend {name!r}; registered: {available_backends()}")
    return _BACKENDS[name]


def is_backend_usable(name: str, device: torch.device | str) -> bool:
    """Whether the registered backend ``name`` can run on tensors on ``device`` now (may run its one-time probe).

    Raises:
        ValueError: Unknown backend name.
    """
    return _backend(name).is_usable(torch.device(device))


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
        if _backend(requested).is_usable(device):
            return log_choice_once(requested, device)
        warn_once(
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
            return log_choice_once(cand.name, device)
    raise RuntimeError(f"no Mamba scan backend is usable on {device}")


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
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    return _BACKENDS[name].fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size)


register_backend("mamba_ssm", mamba_ssm_adapter, mamba_ssm_usable, auto_priority=0)
register_backend("triton", triton_adapter, triton_usable, auto_priority=50, auto_device_types=("cuda",))
register_backend("chunked", selective_scan_chunked, lambda device: True, auto_priority=100)
register_backend("reference", selective_scan_reference, lambda device: True, auto_priority=None)
