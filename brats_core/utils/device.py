"""Device and mixed-precision rules shared by training, evaluation and ``predict.py``.

One autocast rule for every ``--amp``: on CUDA, bf16 where the GPU supports it (no loss scaling needed, fp32's
range), else fp16 (training adds a gradient scaler, :func:`grad_scaler`); on CPU, or without ``--amp``, fp32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["amp_context", "amp_dtype", "grad_scaler", "resolve_device"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but no CUDA device is available (use --device cpu or auto)")
    return device


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device``: bf16 on GPUs that support it, else fp16; None (no autocast,
    fp32) when disabled or not on CUDA."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def amp_context(
    device: torch.device, enabled: bool, dtype: torch.dtype | None = None
) -> AbstractContextManager[object]:
    """Autocast for CUDA with :func:`amp_dtype` (or ``dtype``, e.g. upstream's fp16 for ``--reference-quirks``); a
    no-op on CPU or when disabled."""
    chosen = amp_dtype(device, enabled)
    if chosen is None:
        return nullcontext()
    return torch.autocast("cuda", dtype=dtype or chosen)


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """The loss scaler that fp16 autocast needs (:func:`amp_dtype` picks fp16 only on GPUs without bf16); a
    disabled pass-through otherwise."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype(device, enabled) == torch.float16)
