"""IM-Fuse's Mamba Fusion Block (MFB, and I-MFB with interleaved tokenisation).

The MFB condenses M modality token sequences into one set of learned "fused" tokens: the M masked feature maps and
the fused-token table are laid out as one sequence, a causal Mamba layer runs over it, and the fused tokens are read
back. Module names reproduce the upstream keys ``<mfb>.fused_tokens`` and ``<mfb>.mamba_layer.mamba.{mamba.*, norm1,
norm2, head}``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from brats_core.nn.mamba import Mamba

__all__ = ["MambaFusionBlock", "MambaLayer", "MambaTrans", "read_fused_tokens", "tokenize"]


def tokenize(modal_tokens: torch.Tensor, fused_tokens: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Lay out M modality token sets and the fused tokens as one sequence.

    Args:
        modal_tokens: (B, M, N, C), one row-major token set per modality.
        fused_tokens: (B, N, C).
        interleaved: False → ``[mod_0 (N), …, mod_{M−1} (N), fused (N)]``; True → position-major, the M+1 tokens of
            each position consecutive: ``[mod_0[p], …, mod_{M−1}[p], fused[p]]`` for p = 0..N−1.

    Returns:
        (B, (M+1)·N, C).
    """
    b, m, n, c = modal_tokens.shape
    seq = torch.cat([modal_tokens, fused_tokens.unsqueeze(1)], dim=1)  # (B, M+1, N, C)
    if interleaved:
        seq = seq.transpose(1, 2)
    return seq.reshape(b, (m + 1) * n, c)


def read_fused_tokens(seq: torch.Tensor, num_modalities: int, interleaved: bool) -> torch.Tensor:
    """Inverse of :func:`tokenize` for the fused tokens only.

    Args:
        seq: (B, (M+1)·N, C).
        num_modalities: M.
        interleaved: layout used by :func:`tokenize`.

    Returns:
        (B, N, C): the last N tokens (plain layout), or every (M+1)-th token from index M (interleaved layout).
    """
    n = seq.shape[1] // (num_modalities + 1)
    if interleaved:
        return seq[:, num_modalities :: num_modalities + 1]
    return seq[:, num_modalities * n :]


class MambaTrans(nn.Module):
    """``x ← Mamba(LN1(x)) + x``; ``x ← Linear(LN2(x)) + x`` (``head``: C→C with bias, no activation).

    Args:
        dim: token dimension C (Mamba ``d_model``).
        d_state: Mamba state size (upstream ``min(C, 256)``).
        d_conv: Mamba causal-conv width.
        expand: Mamba inner expansion.
        backend: Mamba scan backend (see :class:`brats_core.nn.mamba.Mamba`).
    """

    def __init__(self, dim: int, d_state: int, d_conv: int = 4, expand: int = 2, backend: str = "auto") -> None:
        super().__init__()
        self.mamba = Mamba(d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) → (B, L, C)."""
        x = self.mamba(self.norm1(x)) + x
        return self.head(self.norm2(x)) + x


class MambaLayer(nn.Module):
    """Runs :class:`MambaTrans` in fp32 with autocast disabled, as upstream (half-precision input is cast up)."""

    def __init__(self, dim: int, d_state: int, d_conv: int = 4, expand: int = 2, backend: str = "auto") -> None:
        super().__init__()
        self.mamba = MambaTrans(dim, d_state, d_conv, expand, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) any float dtype → (B, L, C) float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.mamba(x.float())


class MambaFusionBlock(nn.Module):
    """Mamba Fusion Block: M masked modality maps → one fused map through learned fused tokens.

    Args:
        dim: channels C of the maps (Mamba ``d_model``).
        num_tokens: N, the number of spatial positions of the maps it will receive (fixed by the patch size).
        num_modalities: M.
        interleaved: I-MFB layout (see :func:`tokenize`).
        d_state_max: cap of the Mamba state size, ``d_state = min(C, d_state_max)`` (mamba-ssm's kernel limit, 256).
        d_conv: Mamba causal-conv width.
        expand: Mamba inner expansion.
        backend: Mamba scan backend.
    """

    def __init__(
        self,
        dim: int,
        num_tokens: int,
        num_modalities: int = 4,
        interleaved: bool = False,
        d_state_max: int = 256,
        d_conv: int = 4,
        expand: int = 2,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_modalities = num_modalities
        self.interleaved = interleaved
        self.fused_tokens = nn.Parameter(torch.randn(1, num_tokens, dim))
        self.mamba_layer = MambaLayer(dim, min(dim, d_state_max), d_conv, expand, backend)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Fuse.

        Args:
            maps: (B, M, C, D, H, W), absent modalities already zeroed; D·H·W must equal ``num_tokens``.

        Returns:
            (B, C, D, H, W) float32, the fused tokens in the same row-major order.
        """
        b, m, c, *spatial = maps.shape
        n = self.fused_tokens.shape[1]
        if m != self.num_modalities or c != self.fused_tokens.shape[2] or math.prod(spatial) != n:
            raise ValueError(
                f"MFB expects (B, {self.num_modalities}, {self.fused_tokens.shape[2]}, spatial with {n} positions), "
                f"got {tuple(maps.shape)}"
            )
        tokens = maps.float().flatten(3).transpose(2, 3)  # (B, M, N, C), channel-last, row-major positions
        seq = tokenize(tokens, self.fused_tokens.float().expand(b, -1, -1), self.interleaved)
        fused = read_fused_tokens(self.mamba_layer(seq), m, self.interleaved)
        return fused.transpose(1, 2).reshape(b, c, *spatial)
