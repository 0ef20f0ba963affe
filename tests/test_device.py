"""The one mixed-precision rule (``brats_core.utils.device``) of training, evaluation and ``predict.py``: bf16 on GPUs
that support it, else fp16, nothing on CPU; the sliding window follows it unless a dtype is forced."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import MASKS

from brats_core.engine import inference
from brats_core.registry import build_method
from brats_core.utils import device

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU


@pytest.mark.parametrize(
    ("dev", "enabled", "bf16", "expected"),
    [
        (CUDA, True, True, torch.bfloat16),
        (CUDA, True, False, torch.float16),
        (CUDA, False, True, None),
        (CPU, True, True, None),
        (CPU, True, False, None),
    ],
)
def test_amp_dtype(monkeypatch, dev, enabled, bf16, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert device.amp_dtype(dev, enabled) == expected


def test_amp_context_is_a_no_op_on_cpu() -> None:
    with device.amp_context(CPU, True, torch.float16):
        assert not torch.is_autocast_enabled("cpu") and torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_grad_scaler_is_disabled_on_cpu() -> None:
    assert not device.grad_scaler(CPU, True).is_enabled()


def test_resolve_device() -> None:
    assert device.resolve_device("cpu") == CPU
    assert device.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("forced", [None, torch.float16])
def test_sliding_window_uses_the_shared_rule(monkeypatch, forced) -> None:
    calls = []

    def spy(dev, enabled, dtype=None):
        calls.append((dev.type, enabled, dtype))
        return contextlib.nullcontext()

    monkeypatch.setattr(inference, "amp_context", spy)
    torch.manual_seed(0)
    model = build_method("uhved", "tiny").eval()
    inference.predict_scenarios(model, torch.randn(1, 4, 32, 32, 32), MASKS[:1], amp=True, autocast_dtype=forced)
    assert calls == [("cpu", True, forced)]
