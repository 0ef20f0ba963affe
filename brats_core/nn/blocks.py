"""Building blocks shared by IM-Fuse and mmFormer.

Submodule and parameter names reproduce the upstream state-dict keys (``e1_c2.conv.weight``,
``cross_attention_list.0.fn.fn.qkv.weight``, ``RFM5.fusion_layer.0.conv.weight`` …), so that checkpoints trained with
the upstream code load directly. Spatial sizes never appear here: every block works at any cubic size whose side is a
multiple of 16 (and at least 32, so that the 2³ bottleneck still has more than one voxel for InstanceNorm and
reflect padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PC",
    "FusionDecoder",
    "ModalityEncoder",
    "RegionFusion",
    "SeparateDecoder",
    "Transformer",
    "init_conv3d_kaiming",
    "upsample",
]


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Trilinear up-sampling by an integer factor with ``align_corners=True`` (upstream's ``nn.Upsample``).

    Args:
        x: (B, C, D, H, W).
        factor: scale factor applied to the three spatial dimensions.

    Returns:
        (B, C, factor·D, factor·H, factor·W).
    """
    return F.interpolate(x, scale_factor=factor, mode="trilinear", align_corners=True)


class PC(nn.Module):
    """Pre-activation conv block: InstanceNorm3d (no affine) → LeakyReLU(0.2) → Conv3d (upstream's ``PC``).

    The norm and the activation are parameter-free, so the only state-dict entries are ``conv.weight``/``conv.bias``.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel_size: cubic kernel side; padding is ``(k - 1) // 2``.
        stride: convolution stride.
        padding_mode: ``"reflect"`` (encoders and decoders) or ``"zeros"`` (the 3×3 conv of a region fusion module).
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, padding_mode: str = "reflect"
    ) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(in_ch, eps=1e-5, affine=False, track_running_stats=False)
        self.activation = nn.LeakyReLU(negative_slope=0.2)
        self.conv = nn.Conv3d(
            in_ch, out_ch, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, padding_mode=padding_mode
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, D, H, W) → (B, out_ch, D/stride, H/stride, W/stride)."""
        return self.conv(self.activation(self.norm(x)))


class ModalityEncoder(nn.Module):
    """Single-modality 5-stage residual encoder (channels ``c, 2c, 4c, 8c, 16c`` with ``c = basic_dims``).

    Stage 1 starts with a plain 3×3 conv (``e1_c1``); stages 2..5 start with a stride-2 ``PC``. Each stage adds a
    residual of two ``PC`` blocks. All 3×3 convs use reflect padding.

    Args:
        basic_dims: channels of stage 1.
        in_ch: input channels (1: one modality per encoder).
    """

    def __init__(self, basic_dims: int = 8, in_ch: int = 1) -> None:
        super().__init__()
        dims = [basic_dims * 2**s for s in range(5)]
        self.dims: tuple[int, ...] = tuple(dims)
        self.e1_c1 = nn.Conv3d(in_ch, dims[0], 3, padding=1, padding_mode="reflect")
        self.e1_c2 = PC(dims[0], dims[0])
        self.e1_c3 = PC(dims[0], dims[0])
        for s in range(1, 5):
            setattr(self, f"e{s + 1}_c1", PC(dims[s - 1], dims[s], stride=2))
            setattr(self, f"e{s + 1}_c2", PC(dims[s], dims[s]))
            setattr(self, f"e{s + 1}_c3", PC(dims[s], dims[s]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode one modality.

        Args:
            x: (B, in_ch, D, H, W).

        Returns:
            ``(x1, …, x5)``: (B, c·2^(s−1), D/2^(s−1), H/2^(s−1), W/2^(s−1)) for s = 1..5.
        """
        feats = []
        for s in range(1, 6):
            d = getattr(self, f"e{s}_c1")(x if s == 1 else feats[-1])
            feats.append(d + getattr(self, f"e{s}_c3")(getattr(self, f"e{s}_c2")(d)))
        return tuple(feats)


class _Residual(nn.Module):
    """``x + fn(x)``; the wrapped module is registered as ``fn`` (upstream key segment ``.fn``)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


class _PreNorm(nn.Module):
    """``dropout(fn(LayerNorm(x)))``; dropout 0 gives the plain pre-norm used around the feed-forward network."""

    def __init__(self, dim: int, fn: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fn(self.norm(x)))


class _SelfAttention(nn.Module):
    """Multi-head self-attention: ``qkv`` Linear without bias, scale ``head_dim^-0.5``, dropout on the weights."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.attn_dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) → (B, N, dim)."""
        b, n, c = x.shape
        # Upstream's qkv layout: the 3·dim outputs are (q|k|v) × heads × head_dim.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class _FeedForward(nn.Module):
    """Linear → GELU → Dropout → Linear → Dropout, as ``net`` (keys ``net.0`` and ``net.3``)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """Pre-norm transformer of mmFormer/IM-Fuse (intra- and inter-modal).

    Each layer: ``x ← x + pos``; ``x ← x + Dropout(Attn(LN(x)))``; ``x ← x + FFN(LN(x))``. The learned position
    embedding is a parameter of the owning model (upstream keys ``flair_pos`` …), passed to :meth:`forward`.

    Args:
        dim: token dimension.
        depth: number of layers.
        heads: attention heads.
        mlp_dim: hidden size of the feed-forward network.
        dropout: rate of every dropout (attention weights, attention output, residual branch, FFN).
    """

    def __init__(
        self, dim: int = 512, depth: int = 1, heads: int = 8, mlp_dim: int = 4096, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.cross_attention_list = nn.ModuleList(
            _Residual(_PreNorm(dim, _SelfAttention(dim, heads, dropout), dropout)) for _ in range(depth)
        )
        self.cross_ffn_list = nn.ModuleList(
            _Residual(_PreNorm(dim, _FeedForward(dim, mlp_dim, dropout))) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Apply the layers.

        Args:
            x: tokens (B, N, dim).
            pos: position embedding (1, N, dim), added before every layer.

        Returns:
            (B, N, dim).
        """
        for attn, ffn in zip(self.cross_attention_list, self.cross_ffn_list, strict=True):
            x = ffn(attn(x + pos))
        return x


class SeparateDecoder(nn.Module):
    """Single-modality U-Net decoder (``decoder_sep``), shared by the four modalities during training.

    Per level k = 4..1: ``u = d{k}_c1(Up2(y))``; ``y = d{k}_out(d{k}_c2(cat[u, x_k]))`` (concatenation order
    [upsampled, skip]); then ``seg_layer`` (1×1) and softmax.

    Args:
        num_cls: output classes.
        basic_dims: channels of encoder stage 1.
    """

    def __init__(self, num_cls: int = 4, basic_dims: int = 8) -> None:
        super().__init__()
        dims = [basic_dims * 2**s for s in range(5)]
        for k in range(4, 0, -1):
            c = dims[k - 1]
            setattr(self, f"d{k}_c1", PC(dims[k], c))
            setattr(self, f"d{k}_c2", PC(2 * c, c))
            setattr(self, f"d{k}_out", PC(c, c, kernel_size=1))
        self.seg_layer = nn.Conv3d(dims[0], num_cls, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode one modality's un-masked encoder features.

        Args:
            feats: ``(x1, …, x5)`` as returned by :class:`ModalityEncoder`.

        Returns:
            Class probabilities (B, num_cls, D, H, W) at the resolution of ``x1``.
        """
        y = feats[4]
        for k in range(4, 0, -1):
            u = getattr(self, f"d{k}_c1")(upsample(y, 2))
            y = getattr(self, f"d{k}_out")(getattr(self, f"d{k}_c2")(torch.cat([u, feats[k - 1]], dim=1)))
        return torch.softmax(self.seg_layer(y), dim=1)


class RegionFusion(nn.Module):
    """Region fusion module (``RFM``): PC 1×1 (in→C) → PC 3×3 with zero padding → PC 1×1, as ``fusion_layer``.

    Args:
        in_ch: input channels (4·C on a masked modality concatenation, C on a single fused stream).
        out_ch: output channels C.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.fusion_layer = nn.Sequential(
            PC(in_ch, out_ch, kernel_size=1),
            PC(out_ch, out_ch, kernel_size=3, padding_mode="zeros"),
            PC(out_ch, out_ch, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, D, H, W) → (B, out_ch, D, H, W)."""
        return self.fusion_layer(x)


class FusionDecoder(nn.Module):
    """Fusion decoder (``decoder_fuse``) with region fusion modules and deep-supervision heads.

    ``y5 = RFM5(x5)``; per level k = 4..1: ``u = d{k}_c1(Up2(y))``; ``y = d{k}_out(d{k}_c2(cat[RFM_k(x_k), u]))``
    (concatenation order [skip, upsampled]). Without the first skip (IM-Fuse's default training class) level 1 has no
    RFM1 and ``y1 = d1_out(d1_c2(u))``. Heads ``seg_d4..seg_d1`` act on y5..y2, ``seg_layer`` on y1.

    Args:
        num_cls: output classes.
        basic_dims: channels of encoder stage 1 (C_k = basic_dims·2^(k−1)).
        skip_multipliers: input-channel multiplier m of RFM1..RFM5 (in = m·C_k); 4 on a masked concatenation of the
            four modalities, 1 on an already fused single stream.
        first_skip: whether level 1 has a skip connection (RFM1).
    """

    def __init__(
        self,
        num_cls: int = 4,
        basic_dims: int = 8,
        skip_multipliers: Sequence[int] = (4, 4, 4, 4, 4),
        first_skip: bool = True,
    ) -> None:
        super().__init__()
        if len(skip_multipliers) != 5:
            raise ValueError(f"skip_multipliers needs one entry per level (5), got {len(skip_multipliers)}")
        dims = [basic_dims * 2**s for s in range(5)]
        self.first_skip = first_skip
        for k in range(4, 0, -1):
            c = dims[k - 1]
            setattr(self, f"d{k}_c1", PC(dims[k], c))
            setattr(self, f"d{k}_c2", PC(2 * c if (k > 1 or first_skip) else c, c))
            setattr(self, f"d{k}_out", PC(c, c, kernel_size=1))
        for k in range(4, 0, -1):
            setattr(self, f"seg_d{k}", nn.Conv3d(dims[k], num_cls, 1))
        self.seg_layer = nn.Conv3d(dims[0], num_cls, 1)
        for k in range(5, 0 if first_skip else 1, -1):
            setattr(self, f"RFM{k}", RegionFusion(skip_multipliers[k - 1] * dims[k - 1], dims[k - 1]))

    def forward(
        self, skips: Sequence[torch.Tensor | None], deep_supervision: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Decode the fused features.

        Args:
            skips: ``(x1, …, x5)`` with x_k of shape (B, m_k·C_k, D/2^(k−1), …); ``x1`` is ignored (may be None)
                without the first skip.
            deep_supervision: also return the four auxiliary probability maps.

        Returns:
            ``(probs, aux)``: probs (B, num_cls, D, H, W); aux, when requested, the softmax of ``seg_d1..seg_d4``
            trilinearly up-sampled to full resolution (factors 2, 4, 8, 16), otherwise an empty tuple.
        """
        y = self.RFM5(skips[4])
        aux = [torch.softmax(self.seg_d4(y), dim=1)] if deep_supervision else []
        for k in range(4, 0, -1):
            u = getattr(self, f"d{k}_c1")(upsample(y, 2))
            inp = torch.cat([getattr(self, f"RFM{k}")(skips[k - 1]), u], dim=1) if (k > 1 or self.first_skip) else u
            y = getattr(self, f"d{k}_out")(getattr(self, f"d{k}_c2")(inp))
            if deep_supervision and k > 1:
                aux.append(torch.softmax(getattr(self, f"seg_d{k - 1}")(y), dim=1))
        probs = torch.softmax(self.seg_layer(y), dim=1)
        # aux holds heads at 1/16, 1/8, 1/4, 1/2 resolution; upstream returns them finest first.
        ds = tuple(upsample(p, 2 ** (i + 1)) for i, p in enumerate(reversed(aux)))
        return probs, ds


@torch.no_grad()
def init_conv3d_kaiming(module: nn.Module, negative_slope: float = 0.01, zero_bias: bool = True) -> None:
    """Kaiming-normal (fan_in, leaky-ReLU gain) init of every ``Conv3d`` weight below ``module``.

    Other layers (Linear, LayerNorm, Mamba's Conv1d, learned tokens) keep their own initialisation. Parameters on the
    meta device are skipped (construction for key/shape inspection only).

    Args:
        module: root module.
        negative_slope: ``a`` of the leaky-ReLU gain (IM-Fuse 0.01; mmFormer 0, i.e. the ReLU gain).
        zero_bias: set Conv3d biases to 0 (IM-Fuse); otherwise keep PyTorch's default uniform bias (mmFormer).
    """
    for m in module.modules():
        if not isinstance(m, nn.Conv3d) or m.weight.is_meta:
            continue
        nn.init.kaiming_normal_(m.weight, a=negative_slope, mode="fan_in", nonlinearity="leaky_relu")
        if zero_bias and m.bias is not None:
            nn.init.zeros_(m.bias)
