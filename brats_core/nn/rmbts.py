"""The RMBTS framework shared by RobustSeg and SFusion.

SFusion is RobustSeg's feature-disentanglement framework with the gated fusion replaced by SFusion blocks, so the two
share everything but the fusion:

- a **style encoder** per modality: five convolutions → spatial mean → 1×1 conv → style code (B, 8);
- a **content encoder** per modality: four residual stages (C, 2C, 4C, 8C channels at P, P/2, P/4, P/8);
- a **segmentation decoder** on the four fused content scales (U-Net decoder, softmax over 4 classes);
- an **image decoder** per modality (training only): an MLP turns the style code into AdaIN parameters (μ, σ), four
  adaptive residual blocks at P/8, three up-sampling convolutions, a final convolution → reconstruction (B, 1, P³);
(their losses and training recipe: :mod:`brats_core.apps.rmbts_training`).

Everything the two methods do differently (padding mode, InstanceNorm ε, activations, align_corners, spatial
LayerNorm vs InstanceNorm in the image decoder, norms inside the image decoder's convolutions, AdaIN ε, …) is one
:class:`Flavour`; the upstream state-dict key names and registration order are one :class:`Layout`. Each method
defines one of each, registers its modules in upstream order through :class:`RMBTSNet`'s ``add_*`` helpers, adds its
fusion, and inherits ``forward`` / ``encode`` / ``decode``. Spatial sizes never appear as literals: they derive from
the configured patch size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from brats_core.modalities import MODALITIES
from brats_core.registry import OutputKind, SegModel

__all__ = [
    "AdaptiveResBlock",
    "ContentEncoder",
    "ConvBlock",
    "ConvSpec",
    "Flavour",
    "ImageDecoder",
    "Layout",
    "LinearBlock",
    "RMBTSNet",
    "SegDecoder",
    "StyleEncoder",
    "StyleMLP",
    "adaptive_instance_norm",
    "upsample",
]

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------ basic blocks


def upsample(x: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Trilinear ×2 up-sampling (RobustSeg: ``align_corners=True``; SFusion: False).

    Args:
        x: (B, C, D, H, W).
        align_corners: passed to ``F.interpolate``.

    Returns:
        (B, C, 2D, 2H, 2W).
    """
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=align_corners)


def adaptive_instance_norm(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """AdaIN: ``γ·(h − mean)/√(var + eps) + β`` with per-instance statistics over space (unbiased variance).

    RobustSeg uses ``eps = 1e-5``; SFusion divides by the unbiased standard deviation itself (``eps = 0``).

    Args:
        h: features (B, C, D, H, W).
        gamma: scale (B, C), the MLP's μ.
        beta: shift (B, C), the MLP's σ.
        eps: added to the variance.

    Returns:
        (B, C, D, H, W).
    """
    mean = h.mean(dim=(2, 3, 4), keepdim=True)
    var = h.var(dim=(2, 3, 4), keepdim=True)
    return gamma[..., None, None, None] * (h - mean) / torch.sqrt(var + eps) + beta[..., None, None, None]


class ConvBlock(nn.Module):
    """Conv3d (with bias) → dropout → [InstanceNorm3d, no affine] → [LeakyReLU] (both methods' ``general_conv3d``).

    Upstream stores the convolution as ``conv`` (RobustSeg) or as the first entry of a ``unit`` Sequential
    (SFusion); ``nested`` picks the layout, so the state-dict keys are ``conv.*`` or ``unit.0.*``. The dropout,
    norm and activation have no parameters and are applied functionally.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel_size: cubic kernel side.
        stride: convolution stride.
        padding: padding; ``kernel_size // 2`` when None.
        padding_mode: ``"reflect"`` or ``"zeros"``.
        norm_eps: InstanceNorm ε; None for no norm.
        act_slope: LeakyReLU negative slope (0 = ReLU); None for no activation.
        dropout: dropout rate after the convolution.
        nested: SFusion's ``unit.0`` layout instead of RobustSeg's ``conv``.

    Attributes:
        dropout_at_inference: keep the dropout active in eval mode (RobustSeg's reference quirk).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        padding: int | None = None,
        padding_mode: str = "zeros",
        norm_eps: float | None = None,
        act_slope: float | None = None,
        dropout: float = 0.0,
        nested: bool = False,
    ) -> None:
        super().__init__()
        conv = nn.Conv3d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if padding is None else padding,
            padding_mode=padding_mode,
        )
        self._nested = nested
        if nested:
            self.unit = nn.Sequential(conv)
        else:
            self.conv = conv
        self.dropout = float(dropout)
        self.norm_eps = norm_eps
        self.act_slope = act_slope
        self.dropout_at_inference = False

    @property
    def conv3d(self) -> nn.Conv3d:
        """The convolution, whichever layout holds it."""
        return self.unit[0] if self._nested else self.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, D, H, W) → (B, out_ch, D', H', W')."""
        x = self.conv3d(x)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, training=self.training or self.dropout_at_inference)
        if self.norm_eps is not None:
            x = F.instance_norm(x, eps=self.norm_eps)
        if self.act_slope is not None:
            x = F.leaky_relu(x, self.act_slope)
        return x


class LinearBlock(nn.Module):
    """Flatten → Linear, stored as ``linear`` (RobustSeg) or as ``unit = Sequential(Flatten, Linear)`` (SFusion).

    SFusion's upstream uses ``LazyLinear``; its input is always the flattened style code, so a plain ``Linear`` with
    the style-code width has the same parameters and makes a fresh model's state dict equal to a trained one's.

    Args:
        in_features: input width.
        out_features: output width.
        nested: SFusion's ``unit.1`` layout.
    """

    def __init__(self, in_features: int, out_features: int, nested: bool = False) -> None:
        super().__init__()
        layer = nn.Linear(in_features, out_features)
        self._nested = nested
        if nested:
            self.unit = nn.Sequential(nn.Flatten(), layer)
        else:
            self.linear = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features, …) → (B, out_features)."""
        return (self.unit[1] if self._nested else self.linear)(x.flatten(1))


@dataclass(frozen=True)
class ConvSpec:
    """How a method builds one family of conv blocks: everything but channels, kernel, stride and dropout."""

    padding_mode: str = "zeros"
    norm_eps: float | None = None
    act_slope: float | None = None

    def build(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        padding: int | None = None,
        dropout: float = 0.0,
        nested: bool = False,
    ) -> ConvBlock:
        """A :class:`ConvBlock` with this spec."""
        return ConvBlock(
            in_ch, out_ch, kernel_size, stride, padding=padding, padding_mode=self.padding_mode,
            norm_eps=self.norm_eps, act_slope=self.act_slope, dropout=dropout, nested=nested,
        )  # fmt: skip

    @property
    def bare(self) -> ConvSpec:
        """The same padding without norm and activation (1×1 heads)."""
        return dataclasses.replace(self, norm_eps=None, act_slope=None)


@dataclass(frozen=True)
class Flavour:
    """Everything RobustSeg and SFusion do differently in the shared pieces.

    Attributes:
        conv: content encoders, fusion convs and segmentation decoder (R: reflect, IN ε 1e-6, LReLU 0.2;
            S: zeros, IN ε 1e-5, LReLU 0.01).
        style_conv: the style encoder's five convs (R: reflect, no norm, ReLU; S: as ``conv``).
        style_down_padding: padding of its k4 s2 convs (R 1: 80→40…5; S 2: 128→65…9).
        content_dropout: dropout of each content stage's middle conv (R 0.3 on stages 1–3; S 0.3 on all four).
        decoder_conv: the image decoder's residual-block and final convs (R: reflect, bare; S: zeros + IN + LReLU).
        up_conv: the image decoder's k5 up-sampling convs (zero padding in both; S adds IN + LReLU).
        mlp_act_slope: activation after the two hidden MLP layers (R ReLU = 0; S 0.01).
        decoder_act_slope: activation inside the residual blocks and after each up-sampling norm (R 0; S 0.01).
        adain_eps: AdaIN's variance ε (R 1e-5; S 0).
        spatial_layer_norm: after each up-sampling conv, R's LayerNorm over the three spatial dims (element-wise
            affine of that spatial shape, which ties the image decoder to the patch size); S's extra InstanceNorm.
        up_norm_eps: ε of that norm (R 1e-6; S 1e-5).
        align_corners: of every trilinear ×2 up-sampling (R True; S False).
    """

    conv: ConvSpec
    style_conv: ConvSpec
    style_down_padding: int
    content_dropout: tuple[float, float, float, float]
    decoder_conv: ConvSpec
    up_conv: ConvSpec
    mlp_act_slope: float
    decoder_act_slope: float
    adain_eps: float
    spatial_layer_norm: bool
    up_norm_eps: float
    align_corners: bool


@dataclass(frozen=True)
class Layout:
    """Upstream's state-dict key names inside the shared pieces, as ``str.format`` templates.

    Template fields: ``{i0}`` / ``{i1}`` 0- / 1-based index, ``{s}`` content stage 1..4, ``{k}`` decoder level 3..1
    (decoded in that order). Dotted paths create plain containers (SFusion's ``unit.0``, ``features.convblock1``).

    Attributes:
        nested: conv and linear blocks use SFusion's ``unit`` Sequential layout.
        style_convs: the style encoder's five convs (R ``c_{i0}``; S ``unit.{i0}``).
        style_head: its 1×1 conv (R ``se_logit``; S ``unit2``).
        content: first / middle / last conv of a content stage (R ``e{s}_c1…3``; S ``unit{s}_0``, ``unit{s}.0/1``).
        mlp: the MLP's two hidden layers, μ and σ heads.
        mlp_first: the image decoder registers its MLP before the residual blocks (R) or after them (S).
        res: adaptive residual blocks (their convs are ``conv1``/``conv2`` in both).
        up_conv: the three up-sampling convs.
        up_norm: the three spatial LayerNorms (only with ``Flavour.spatial_layer_norm``).
        final: the final conv.
        seg: per decoder level, the up conv, the conv after the skip concatenation and the 1×1 conv.
        seg_logit: the 1×1 classifier.
    """

    nested: bool
    style_convs: str
    style_head: str
    content: tuple[str, str, str]
    mlp: tuple[str, str, str, str]
    mlp_first: bool
    res: str
    up_conv: str
    up_norm: str
    final: str
    seg: tuple[str, str, str]
    seg_logit: str


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` under the dotted ``path`` below ``root``, creating plain containers on the way."""
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        child = node._modules.get(name)
        if child is None:
            child = nn.Module()
            node.add_module(name, child)
        node = child
    node.add_module(leaf, module)


# ------------------------------------------------------------------------------------------------- encoders/decoders


class StyleEncoder(nn.Module):
    """Style encoder of one modality: conv k7 → 4 × conv k4 s2 → spatial mean → 1×1 conv.

    Args:
        flavour: the method's :class:`Flavour`.
        layout: the method's :class:`Layout`.
        base: channels of the first conv (32 upstream; then 2·base, 4·base, 4·base, 4·base).
        code: style-code width (8).
    """

    def __init__(self, flavour: Flavour, layout: Layout, base: int = 32, code: int = 8) -> None:
        super().__init__()
        chans = [1, base, 2 * base, 4 * base, 4 * base, 4 * base]
        self._convs = [layout.style_convs.format(i0=i) for i in range(5)]
        for i, path in enumerate(self._convs):
            k, stride, pad = (7, 1, 3) if i == 0 else (4, 2, flavour.style_down_padding)
            block = flavour.style_conv.build(chans[i], chans[i + 1], k, stride, padding=pad, nested=layout.nested)
            _put(self, path, block)
        self._head = layout.style_head
        _put(self, self._head, flavour.conv.bare.build(4 * base, code, 1, nested=layout.nested))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) → style code (B, code)."""
        for path in self._convs:
            x = self.get_submodule(path)(x)
        return self.get_submodule(self._head)(x.mean(dim=(2, 3, 4), keepdim=True)).flatten(1)


class ContentEncoder(nn.Module):
    """Content encoder of one modality: per stage s, ``a = first(x)`` (stride 2 from stage 2), ``out = a +
    last(middle(a))``; channels base·2^(s−1).

    Args:
        flavour: the method's :class:`Flavour`.
        layout: the method's :class:`Layout`.
        base: channels of stage 1 (RobustSeg 16; SFusion ``feature_maps``).
    """

    def __init__(self, flavour: Flavour, layout: Layout, base: int) -> None:
        super().__init__()
        self._stages: list[tuple[str, str, str]] = []
        for s in range(1, 5):
            c_in, c = (1 if s == 1 else base * 2 ** (s - 2)), base * 2 ** (s - 1)
            first, middle, last = (t.format(s=s) for t in layout.content)
            conv, nested = flavour.conv, layout.nested
            _put(self, first, conv.build(c_in, c, 3, 1 if s == 1 else 2, nested=nested))
            _put(self, middle, conv.build(c, c, 3, dropout=flavour.content_dropout[s - 1], nested=nested))
            _put(self, last, conv.build(c, c, 3, nested=nested))
            self._stages.append((first, middle, last))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 1, P, P, P) → 4 scales (B, base·2^(s−1), P/2^(s−1), …) for s = 1..4."""
        outs = []
        for first, middle, last in self._stages:
            a = self.get_submodule(first)(x if not outs else outs[-1])
            outs.append(a + self.get_submodule(last)(self.get_submodule(middle)(a)))
        return tuple(outs)


class StyleMLP(nn.Module):
    """Style code → AdaIN parameters: Linear → act → Linear → act, then μ = Linear, σ = Linear (no activation).

    Args:
        flavour: the method's :class:`Flavour`.
        layout: the method's :class:`Layout`.
        code: style-code width.
        width: output width (the bottleneck channels, as μ and σ scale and shift them).
    """

    def __init__(self, flavour: Flavour, layout: Layout, code: int, width: int) -> None:
        super().__init__()
        self._paths = layout.mlp
        self.act_slope = flavour.mlp_act_slope
        for path, in_f in zip(self._paths, (code, width, width, width), strict=True):
            _put(self, path, LinearBlock(in_f, width, layout.nested))

    def forward(self, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, code) → (μ, σ), each (B, width)."""
        first, second, mu, sigma = (self.get_submodule(p) for p in self._paths)
        h = F.leaky_relu(second(F.leaky_relu(first(style), self.act_slope)), self.act_slope)
        return mu(h), sigma(h)


class AdaptiveResBlock(nn.Module):
    """``y = AdaIN(conv2(act(AdaIN(conv1(x)))))``; returns ``x + y``.

    Args:
        flavour: the method's :class:`Flavour`.
        layout: the method's :class:`Layout`.
        channels: feature channels.
    """

    def __init__(self, flavour: Flavour, layout: Layout, channels: int) -> None:
        super().__init__()
        self.conv1 = flavour.decoder_conv.build(channels, channels, 3, nested=layout.nested)
        self.conv2 = flavour.decoder_conv.build(channels, channels, 3, nested=layout.nested)
        self.act_slope = flavour.decoder_act_slope
        self.eps = flavour.adain_eps

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """x (B, C, d, d, d), γ and β (B, C) → (B, C, d, d, d)."""
        y = F.leaky_relu(adaptive_instance_norm(self.conv1(x), gamma, beta, self.eps), self.act_slope)
        return x + adaptive_instance_norm(self.conv2(y), gamma, beta, self.eps)


class ImageDecoder(nn.Module):
    """Image decoder of one modality (training only): fused bottleneck + that modality's style → reconstruction.

    Args:
        flavour: the method's :class:`Flavour`.
        layout: the method's :class:`Layout`.
        channels: bottleneck channels C (= MLP width); the up-sampling convs halve it three times.
        code: style-code width.
        bottleneck_side: spatial side of the bottleneck (P/8); fixes the spatial LayerNorm shapes.
    """

    def __init__(self, flavour: Flavour, layout: Layout, channels: int, code: int, bottleneck_side: int) -> None:
        super().__init__()
        self.flavour = flavour
        if layout.mlp_first:
            self.mlp = StyleMLP(flavour, layout, code, channels)
        self._res = [layout.res.format(i0=i, i1=i + 1) for i in range(4)]
        for path in self._res:
            _put(self, path, AdaptiveResBlock(flavour, layout, channels))
        if not layout.mlp_first:
            self.mlp = StyleMLP(flavour, layout, code, channels)
        chans = [channels // 2**i for i in range(4)]
        self._up = [layout.up_conv.format(i0=i, i1=i + 1) for i in range(3)]
        for i, path in enumerate(self._up):
            _put(self, path, flavour.up_conv.build(chans[i], chans[i + 1], 5, padding=2, nested=layout.nested))
        self._norms: list[str] = []
        if flavour.spatial_layer_norm:
            self._norms = [layout.up_norm.format(i0=i, i1=i + 1) for i in range(3)]
            for i, path in enumerate(self._norms):
                side = bottleneck_side * 2 ** (i + 1)
                _put(self, path, nn.LayerNorm([side] * 3, eps=flavour.up_norm_eps))
        self._final = layout.final
        _put(self, self._final, flavour.decoder_conv.build(chans[3], 1, 7, padding=3, nested=layout.nested))

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode one modality.

        Args:
            content: fused bottleneck (B, C, d, d, d).
            style: style code (B, code).

        Returns:
            ``(reconstruction, mu, sigma)``: (B, 1, 8d, 8d, 8d), (B, C), (B, C).
        """
        f = self.flavour
        gamma, beta = self.mlp(style)
        x = content
        for path in self._res:
            x = self.get_submodule(path)(x, gamma, beta)
        for i, path in enumerate(self._up):
            x = self.get_submodule(path)(upsample(x, f.align_corners))
            # RobustSeg: LayerNorm over the spatial dims; SFusion: a second InstanceNorm
            x = self.get_submodule(self._norms[i])(x) if self._norms else F.instance_norm(x, eps=f.up_norm_eps)
            x = F.leaky_relu(x, f.decoder_act_slope)
        return self.get_submodule(self._final)(x), gamma, beta


class SegDecoder(nn.Module):
    """Segmentation decoder: per level k = 3..1, ``y = out(c2(cat[c1(Up2(y)), fused_k]))``; then 1×1 → softmax.

    Args:
        flavour: the method's :class:`Flavour`.
        layout: the method's :class:`Layout`.
        base: channels of the finest scale (the bottleneck has 8·base).
        num_cls: output classes.
    """

    def __init__(self, flavour: Flavour, layout: Layout, base: int, num_cls: int = 4) -> None:
        super().__init__()
        self.align_corners = flavour.align_corners
        self._levels: list[tuple[str, str, str]] = []
        for i in range(3):
            k = 3 - i
            c = base * 2 ** (k - 1)
            c1, c2, out = (t.format(k=k, i0=i, i1=i + 1) for t in layout.seg)
            _put(self, c1, flavour.conv.build(2 * c, c, 3, nested=layout.nested))
            _put(self, c2, flavour.conv.build(2 * c, c, 3, nested=layout.nested))
            _put(self, out, flavour.conv.build(c, c, 1, nested=layout.nested))
            self._levels.append((c1, c2, out))
        self._logit = layout.seg_logit
        _put(self, self._logit, flavour.conv.bare.build(base, num_cls, 1, nested=layout.nested))

    def forward(self, fused: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the fused content.

        Args:
            fused: 4 scales (B, base·2^(s−1), P/2^(s−1), …), finest first.

        Returns:
            ``(probs, logits)``, each (B, num_cls, P, P, P).
        """
        y = fused[3]
        for i, (c1, c2, out) in enumerate(self._levels):
            u = self.get_submodule(c1)(upsample(y, self.align_corners))
            y = self.get_submodule(out)(self.get_submodule(c2)(torch.cat([u, fused[2 - i]], dim=1)))
        logits = self.get_submodule(self._logit)(y)
        return torch.softmax(logits, dim=1), logits


# ------------------------------------------------------------------------------------------------------ whole model


Contents = tuple[tuple[torch.Tensor, ...], ...]
"""Per canonical modality (FLAIR, T1ce, T1, T2), the 4 content scales of :class:`ContentEncoder`."""


class RMBTSNet(SegModel):
    """Shared forward of RobustSeg and SFusion; subclasses register modules and implement :meth:`fuse`.

    ``model(x, mask)`` with ``x`` (B, 4, P, P, P) in canonical channel order and ``mask`` (B, 4) bool. Eval mode:
    class probabilities (B, num_cls, P, P, P). Train mode: a dict of canonical-order tensors for :class:`RMBTSLoss`:
    ``seg`` (probabilities), ``logits``, ``reconstruction`` (B, 4, P, P, P), ``mu`` and ``sigma`` (B, 4, W) the
    AdaIN parameters (W = bottleneck channels), ``style`` (B, 4, code). Style codes and reconstructions are
    computed from all four real images (missing ones too, as upstream); only the fusion looks at the mask.
    """

    output_kind: ClassVar[OutputKind] = OutputKind.PROBABILITIES
    flavour: ClassVar[Flavour]
    layout: ClassVar[Layout]

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._style_names: dict[str, str] = {}
        self._content_names: dict[str, str] = {}
        self._image_names: dict[str, str] = {}
        self._seg_name = ""

    # registration helpers: `names` maps canonical modality → attribute, in upstream registration order

    def add_style_encoders(self, names: Mapping[str, str], base: int, code: int) -> None:
        """Register the four style encoders."""
        self._style_names = self._check_names(names)
        for attr in names.values():
            self.add_module(attr, StyleEncoder(self.flavour, self.layout, base, code))

    def add_content_encoders(self, names: Mapping[str, str], base: int) -> None:
        """Register the four content encoders."""
        self._content_names = self._check_names(names)
        for attr in names.values():
            self.add_module(attr, ContentEncoder(self.flavour, self.layout, base))

    def add_image_decoders(self, names: Mapping[str, str], channels: int, code: int, bottleneck_side: int) -> None:
        """Register the four image decoders (used in training only)."""
        self._image_names = self._check_names(names)
        for attr in names.values():
            self.add_module(attr, ImageDecoder(self.flavour, self.layout, channels, code, bottleneck_side))

    def add_seg_decoder(self, name: str, base: int, num_cls: int) -> None:
        """Register the segmentation decoder."""
        self._seg_name = name
        self.add_module(name, SegDecoder(self.flavour, self.layout, base, num_cls))

    @staticmethod
    def _check_names(names: Mapping[str, str]) -> dict[str, str]:
        if sorted(names) != sorted(MODALITIES):
            raise ValueError(f"names must cover {MODALITIES}, got {sorted(names)}")
        return dict(names)

    # the part each method implements

    def fuse(self, contents: Contents, mask: torch.Tensor) -> list[torch.Tensor]:
        """Fuse the four modalities' content at each scale.

        Args:
            contents: see :data:`Contents`.
            mask: (B, 4) bool, canonical order, True = available.

        Returns:
            4 fused scales, finest first, shaped like one modality's content.
        """
        raise NotImplementedError

    def check_spatial(self, shape: Sequence[int]) -> None:
        """Raise ``ValueError`` when the spatial ``shape`` does not fit the model (default: sides multiple of 8,
        at least 16)."""
        if any(s % 8 or s < 16 for s in shape):
            raise ValueError(f"{self.method_name}: spatial sides must be multiples of 8 and >= 16, got {tuple(shape)}")

    # the shared forward

    def _check_inputs(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 4:
            raise ValueError(f"{self.method_name}: x must be (B, 4, D, H, W), got shape {tuple(x.shape)}")
        if mask.shape != (x.shape[0], 4):
            raise ValueError(f"{self.method_name}: mask must be ({x.shape[0]}, 4), got shape {tuple(mask.shape)}")
        mask = mask.to(device=x.device, dtype=torch.bool)
        if not bool(mask.any(dim=1).all()):
            raise ValueError(f"{self.method_name}: every mask row needs at least one available modality")
        self.check_spatial(tuple(x.shape[2:]))
        return mask

    def encode(self, x: torch.Tensor) -> Contents:
        """Content features of every modality; they do not depend on the mask.

        Args:
            x: (B, 4, D, H, W), canonical channel order.

        Returns:
            see :data:`Contents`.
        """
        return tuple(self.get_submodule(self._content_names[m])(x[:, i : i + 1]) for i, m in enumerate(MODALITIES))

    def decode(self, features: Contents, mask: torch.Tensor) -> torch.Tensor:
        """Fuse under ``mask`` (B, 4) and segment: class probabilities (B, num_cls, D, H, W)."""
        return self.get_submodule(self._seg_name)(self.fuse(features, mask.to(torch.bool)))[0]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """See the class docstring."""
        mask = self._check_inputs(x, mask)
        fused = self.fuse(self.encode(x), mask)
        probs, logits = self.get_submodule(self._seg_name)(fused)
        if not self.training:
            return probs
        recons, mus, sigmas, styles = [], [], [], []
        for i, m in enumerate(MODALITIES):
            style = self.get_submodule(self._style_names[m])(x[:, i : i + 1])
            recon, mu, sigma = self.get_submodule(self._image_names[m])(fused[3], style)
            recons.append(recon)
            mus.append(mu)
            sigmas.append(sigma)
            styles.append(style)
        return {
            "seg": probs,
            "logits": logits,
            "reconstruction": torch.cat(recons, dim=1),
            "mu": torch.stack(mus, dim=1),
            "sigma": torch.stack(sigmas, dim=1),
            "style": torch.stack(styles, dim=1),
        }
