"""A tiny model and data set for testing the engine without any real method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from brats_core.registry import OutputKind, SegModel


class ToyConfig:
    patch_size = 16


class ToyModel(SegModel):
    """Per-modality 1×1×1 encoders (features zeroed for absent modalities), dropout, a 3×3×3 head; softmax out."""

    output_kind = OutputKind.PROBABILITIES

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__(ToyConfig())
        self.enc = nn.Conv3d(4, 8, 1, groups=4)
        self.drop = nn.Dropout3d(dropout)
        self.head = nn.Conv3d(8, 4, 3, padding=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.enc(x))

    def decode(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        f = features * mask.repeat_interleave(2, dim=1)[:, :, None, None, None].to(features.dtype)
        return torch.softmax(self.head(self.drop(f)), dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), mask)


def write_preprocessed(root: Path, n: int = 4, shape: tuple[int, int, int] = (20, 22, 18), seed: int = 0) -> list[str]:
    """Write ``n`` random cases in the preprocessed layout; label = a blob whose intensity shows in the volume."""
    rng = np.random.default_rng(seed)
    (root / "vol").mkdir(parents=True, exist_ok=True)
    (root / "seg").mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        label = np.zeros(shape, np.uint8)
        c = [s // 2 + int(rng.integers(-2, 3)) for s in shape]
        label[c[0] - 5 : c[0] + 5, c[1] - 5 : c[1] + 5, c[2] - 4 : c[2] + 4] = 2
        label[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 2 : c[2] + 2] = 1
        label[c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2] - 1 : c[2] + 1] = 3
        vol = rng.normal(size=(*shape, 4)).astype(np.float32) + label[..., None].astype(np.float32)
        case = f"TOY-{i:05d}-000"
        np.save(root / "vol" / f"{case}_vol.npy", vol)
        np.save(root / "seg" / f"{case}_seg.npy", label)
        cases.append(case)
    return cases
