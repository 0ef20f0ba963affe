"""Mamba-1 selective-scan ops: one entry point, :func:`selective_scan`, over interchangeable backends.

The Mamba block (:class:`brats_core.nn.mamba.Mamba`) only calls :func:`selective_scan` (and, for mamba-ssm's fused
path, :func:`~.kernels.mamba_ssm_lib`); everything about how the scan runs lives here, as mamba-ssm keeps its block
in ``modules/`` apart from its ``ops/``. Backends:

* ``"mamba_ssm"`` – mamba-ssm's fused CUDA kernels, used only when the package imports *and* the tensors are on CUDA;
  any failure falls back (with one warning) to the chunked scan.
* ``"triton"`` – Triton kernels (forward and backward, chunk-parallel; :mod:`brats_core.nn.triton_scan`), used
  automatically only on CUDA after a one-time probe compile and run succeeded; never chosen automatically on CPU
  (where it only runs, slowly, in Triton's interpreter when ``TRITON_INTERPRET=1``). Needs no compilation step:
  ``triton`` ships with PyTorch's CUDA wheels. A missing or broken ``triton`` only makes the backend unusable.
* ``"chunked"`` – pure PyTorch, exact, memory-bounded: a chunked reduce-then-scan forward that keeps only per-chunk
  carry states, and a block-recompute backward (:class:`ChunkedSelectiveScanFn`). CPU default and CUDA fallback.
* ``"reference"`` – a plain sequential loop under autograd, dtype-generic (fp64 ground truth for tests; slow).

Modules:

* :mod:`.registry` – :func:`register_backend`, :func:`resolve_backend` (argument > ``BRATS_MAMBA_BACKEND`` >
  ``"auto"``), :func:`selective_scan`; registers the four built-in backends.
* :mod:`.reference` – :func:`selective_scan_reference`.
* :mod:`.chunked` – :class:`ChunkedSelectiveScanFn` and :func:`selective_scan_chunked`.
* :mod:`.kernels` – the ``mamba_ssm`` and ``triton`` adapters and their one fallback path to the chunked scan.
* :mod:`.common` – argument check, compute dtype and the one-time log messages shared by all of them.

Scan layout (mamba-ssm's ``selective_scan_fn``): ``u, delta, z: (b, d, L)``; ``A: (d, n)``; ``B, C: (b, n, L)``;
``D, delta_bias: (d,)``; output ``(b, d, L)``; optional last state ``(b, d, n)``. Importing this package does not
import ``triton`` or ``mamba_ssm``.
"""

from .chunked import ChunkedSelectiveScanFn, selective_scan_chunked
from .reference import selective_scan_reference
from .registry import (
    ENV_BACKEND,
    ScanBackend,
    available_backends,
    is_backend_usable,
    register_backend,
    resolve_backend,
    selective_scan,
)

__all__ = [
    "ENV_BACKEND",
    "ChunkedSelectiveScanFn",
    "ScanBackend",
    "available_backends",
    "is_backend_usable",
    "register_backend",
    "resolve_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
]
