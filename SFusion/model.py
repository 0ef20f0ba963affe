"""SFusion (Liu et al., MICCAI 2023) as reproduced in IM-Fuse's benchmark: upstream class ``TF_RMBTS``.

RobustSeg's framework (:mod:`brats_core.nn.rmbts`) with the gated fusion replaced by one SFusion block per scale:
the PRESENT modalities' content maps are average-pooled to a token grid, concatenated, position-encoded and mixed by a
transformer encoder; per modality a "DUpsampling" 1×1 conv folds the tokens back to full resolution, a softmax across
the present modalities turns them into voxel-wise weights, and the fused map is the weighted sum of the contents.

Upstream reads its mask in the order T1ce, T1, T2, FLAIR and lists the present contents in that order (which fixes
their positions in the token sequence); the model takes canonical (FLAIR, T1ce, T1, T2) masks and translates here.
Upstream also honours only the FIRST sample's mask for the whole batch; here every sample uses its own mask unless
``first_sample_mask`` (``--reference-quirks``) is set, and then only in training mode. State-dict keys, order and
shapes equal upstream's ``TF_RMBTS(in_channels=1, out_channels=4, levels=4, feature_maps=16)`` at the paper patch of
128³, with upstream's ``LazyLinear`` layers as plain ``Linear(8, 8F)`` (their
input is always the 8-wide style code), so a fresh model's state dict equals a trained one's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from brats_core.modalities import METHOD_ORDERS, permutation
from brats_core.nn.rmbts import Contents, ConvSpec, Flavour, Layout, RMBTSNet
from brats_core.registry import register

_CONV = ConvSpec("zeros", norm_eps=1e-5, act_slope=0.01)
FLAVOUR = Flavour(
    conv=_CONV,
    style_conv=_CONV,
    style_down_padding=2,
    content_dropout=(0.3, 0.3, 0.3, 0.3),
    decoder_conv=_CONV,
    up_conv=_CONV,
    mlp_act_slope=0.01,
    decoder_act_slope=0.01,
    adain_eps=0.0,
    spatial_layer_norm=False,
    up_norm_eps=1e-5,
    align_corners=False,
)
"""SFusion's conv blocks and decoders: zero padding, IN ε 1e-5 and LeakyReLU 0.01 everywhere,
including the image decoder's convs and its final conv (the reconstruction is instance-normalised and rectified)."""

LAYOUT = Layout(
    nested=True,
    style_convs="unit.{i0}",
    style_head="unit2",
    content=("unit{s}_0", "unit{s}.0", "unit{s}.1"),
    mlp=("unit.0", "unit.2", "get_mu", "get_sigma"),
    mlp_first=False,
    res="ar{i1}",
    up_conv="features.convblock{i1}",
    up_norm="",
    final="conv_final",
    seg=("features.convblock1{i1}", "features.convblock2{i1}", "features.convblock3{i1}"),
    seg_logit="conv_seg",
)
"""Upstream's key names (``style_encoder_t1___.unit.0.unit.0.weight``, ``image_decoder_flair.ar1.conv1…``)."""

# upstream's attribute suffixes, in its registration order (T1, T1ce, T2, FLAIR)
_SUFFIX = {"t1": "t1___", "t1ce": "t1ce_", "t2": "t2___", "flair": "flair"}
# canonical channel index of each position of upstream's mask / content-list order (T1ce, T1, T2, FLAIR)
_NATIVE = permutation(METHOD_ORDERS["sfusion"])


@functools.lru_cache(maxsize=32)
def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """Upstream's fixed positional encoding: angle ``pos / (10000^(2⌊j/2⌋/dim) + 1e-8)``, sin on even j, cos on odd.

    Computed in float64 like upstream's numpy table, then cast to float32 (the returned tensor is shared: don't
    modify it).

    Returns:
        (length, dim) float32.
    """
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    j = torch.arange(dim)
    angle = pos / (torch.pow(10000.0, (2 * (j // 2)).double() / dim) + 1e-8)
    return torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle)).float()


class DUpsampling3D(nn.Module):
    """1×1 conv E → E·s³ (no bias), then the s³ channel factor is folded into space: (B, E, g, g, g) → (B, E, gs, …).

    Output voxel ``(d·s + i, h·s + j, w·s + k)`` of channel e reads conv channel ``((i·s + j)·s + k)·E + e`` at
    ``(d, h, w)``: the layout that upstream's permute/reshape sequence produces (see the tests).

    Args:
        channels: E.
        scale: s.
    """

    def __init__(self, channels: int, scale: int) -> None:
        super().__init__()
        self.channels, self.scale = channels, scale
        self.conv_3d = nn.Conv3d(channels, channels * scale**3, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E, g, g, g) → (B, E, g·s, g·s, g·s)."""
        b, _, d, h, w = x.shape
        s, e = self.scale, self.channels
        y = self.conv_3d(x).view(b, s, s, s, e, d, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
        return y.reshape(b, e, d * s, h * s, w * s)


class SFusionBlock(nn.Module):
    """N-to-one fusion of the present modalities' content at one scale (upstream ``TF_3D``, method None).

    Args:
        dim: channels E of this scale (the token width).
        grid: token grid side g (upstream 8): each content map is average-pooled to g³ tokens.
        scale: DUpsampling factor s = V/g for the volume side V of this scale.
        num_layers: transformer encoder layers (8).
        num_heads: attention heads (4).
    """

    def __init__(self, dim: int, grid: int, scale: int, num_layers: int = 8, num_heads: int = 4) -> None:
        super().__init__()
        self.dim, self.grid = dim, grid
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=4 * dim, dropout=0.1, batch_first=True)
        self.fusion_block = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.dropout = nn.Dropout(0.1)
        self.upsample = DUpsampling3D(dim, scale)

    def forward(self, contents: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse n ≥ 1 content maps (B, E, V, V, V), given in upstream's order T1ce, T1, T2, FLAIR.

        Returns:
            ``Σ_m content_m · softmax_m(weights)``, (B, E, V, V, V); the identity for n = 1.
        """
        b, g = contents[0].shape[0], self.grid
        n_tok = g**3
        tokens = torch.cat([F.adaptive_avg_pool3d(c, g).flatten(2).transpose(1, 2) for c in contents], dim=1)
        pos = sinusoid_table(tokens.shape[1], self.dim).to(device=tokens.device, dtype=tokens.dtype)
        out = self.fusion_block(self.dropout(tokens + pos))  # (B, n·g³, E)
        maps = [
            self.upsample(out[:, i * n_tok : (i + 1) * n_tok].transpose(1, 2).reshape(b, self.dim, g, g, g))
            for i in range(len(contents))
        ]
        weights = torch.softmax(torch.stack(maps), dim=0)
        fused = contents[0] * weights[0]
        for c, w in zip(contents[1:], weights[1:], strict=True):
            fused = fused + c * w
        return fused


@dataclass
class SFusionConfig:
    """SFusion's architecture (paper defaults; F = 16 as the upstream README trains and its test script builds).

    Attributes:
        patch_size: training patch and inference window side P (128); a multiple of 8. Inputs must be exactly P³:
            the DUpsampling factors derive from it.
        num_cls: output classes (upstream ``out_channels``).
        feature_maps: F, content channels at full resolution (then 2F, 4F, 8F; upstream ``--feature_maps``).
        style_dims: channels of the style encoder's first conv (32).
        style_code: style-code width (8).
        num_layers: transformer layers per SFusion block (8).
        num_heads: attention heads (4); must divide F.
        token_grid: side g of the pooled token grid; None = P/16 (8 at 128³, upstream's fixed value). Every scale's
            side P/2^(s−1) must be a multiple of g; the DUpsampling factors are P/2^(s−1)/g.
        first_sample_mask: upstream's quirk: the whole training batch uses the first sample's mask
            (``--reference-quirks``).
    """

    patch_size: int = 128
    num_cls: int = 4
    feature_maps: int = 16
    style_dims: int = 32
    style_code: int = 8
    num_layers: int = 8
    num_heads: int = 4
    token_grid: int | None = None
    first_sample_mask: bool = False

    @property
    def grid(self) -> int:
        """The token grid side actually used."""
        return self.token_grid if self.token_grid is not None else self.patch_size // 16


@register(
    "sfusion",
    config=SFusionConfig,
    presets={"tiny": {"patch_size": 32, "feature_maps": 4, "style_dims": 8, "num_layers": 1}},
    display="SFusion",
)
class SFusion(RMBTSNet):
    """SFusion with the canonical contract: ``model(x (B, 4, P, P, P), mask (B, 4) bool)``.

    Eval mode returns class probabilities (B, num_cls, P, P, P); train mode the dict described in
    :class:`~brats_core.nn.rmbts.RMBTSNet`. Missing modalities never enter the fusion.
    """

    flavour = FLAVOUR
    mask_dependent_parameters = True  # a missing modality's content encoder is not run
    layout = LAYOUT

    def __init__(self, config: SFusionConfig) -> None:
        super().__init__(config)
        p, f, g = config.patch_size, config.feature_maps, config.grid
        if p % 8 or p < 16:
            raise ValueError(f"sfusion: patch_size must be a multiple of 8 and >= 16, got {p}")
        if g < 1 or (p // 8) % g:
            raise ValueError(f"sfusion: token_grid {g} must divide the bottleneck side {p // 8} (patch_size {p} / 8)")
        if f % config.num_heads:
            raise ValueError(f"sfusion: num_heads {config.num_heads} must divide feature_maps {f}")
        code = config.style_code
        self.add_style_encoders({m: f"style_encoder_{s}" for m, s in _SUFFIX.items()}, config.style_dims, code)
        self.add_content_encoders({m: f"content_encoder_{s}" for m, s in _SUFFIX.items()}, f)
        self.add_image_decoders({m: f"image_decoder_{s}" for m, s in _SUFFIX.items()}, 8 * f, code, p // 8)
        for s in range(4):
            side = p // 2**s
            block = SFusionBlock(f * 2**s, g, side // g, config.num_layers, config.num_heads)
            self.add_module(f"fusion{s + 1}", block)
        self.add_seg_decoder("mask_decoder", f, config.num_cls)

    def check_spatial(self, shape: tuple[int, ...]) -> None:
        """Exactly the patch: the DUpsampling factors fold the token grid back to P/2^(s−1)."""
        p = self.patch_size
        if tuple(shape) != (p, p, p):
            raise ValueError(f"sfusion: input must be {p}³ (the patch_size), got {tuple(shape)}")

    def fuse(self, contents: Contents, mask: torch.Tensor) -> list[torch.Tensor]:
        """Fuse the present modalities per scale; samples are grouped by mask so each uses its own.

        Args:
            contents: per canonical modality, 4 scales (B, C_s, …).
            mask: (B, 4) bool, canonical order.

        Returns:
            4 fused scales (B, C_s, …).
        """
        native = mask[:, _NATIVE]
        if self.config.first_sample_mask and self.training:
            # upstream's training quirk; its evaluation windows share one mask, so eval never needs it
            native = native[:1].expand_as(native)
        groups: dict[tuple[bool, ...], list[int]] = {}
        for b, row in enumerate(native.tolist()):
            groups.setdefault(tuple(row), []).append(b)
        per_scale: list[list[torch.Tensor]] = [[] for _ in range(4)]
        order: list[int] = []
        for row, samples in groups.items():
            present = [_NATIVE[j] for j, on in enumerate(row) if on]  # canonical indices, upstream's list order
            index = None if len(groups) == 1 else torch.tensor(samples, device=mask.device)
            for s in range(4):
                maps = [contents[c][s] if index is None else contents[c][s].index_select(0, index) for c in present]
                per_scale[s].append(getattr(self, f"fusion{s + 1}")(maps))
            order.extend(samples)
        if len(groups) == 1:
            return [outs[0] for outs in per_scale]
        inverse = torch.argsort(torch.tensor(order, device=mask.device))
        return [torch.cat(outs)[inverse] for outs in per_scale]


def meta_model(**overrides: object) -> SFusion:
    """The paper-size model on the meta device (no memory, no forward): for key/shape/count checks."""
    with torch.device("meta"):
        return SFusion(SFusionConfig(**overrides))  # type: ignore[arg-type]
