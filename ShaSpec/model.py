"""ShaSpec (``DualNet_SS``): shared-specific feature modelling for missing MRI modalities.

One weight-standardised 3-D ResNet-50 + ASPP encoder is SHARED by all modalities (run on each channel as a separate
single-channel volume); four modality-SPECIFIC encoders of the same architecture run on their own channel. At the
bottleneck a present modality's feature is ``shared + compos(concat[shared, specific])``; a missing one is replaced by
the shared feature of a present modality. The decoder upsamples the concatenated bottleneck with additive skips from
the shared encoder's features of all four channels and predicts three region logits (ET, WT, TC) for a sigmoid.

Layout: the network runs in upstream's ``(D, H, W) = (z, x, y)`` layout with the stem striding ``(1, 2, 2)`` and the
modalities in ShaSpec's order FLAIR, T1, T1ce, T2; :meth:`ShaSpec.forward` takes the project's canonical
``(B, 4, X, Y, Z)`` input (FLAIR, T1ce, T1, T2) and canonical masks and translates at the boundary. Parameter names
and shapes equal upstream's state dict (187,708,132 parameters at paper size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from brats_core.modalities import METHOD_ORDERS, MODALITIES, permutation
from brats_core.registry import RUNTIME_FIELD, OutputKind, SegModel, register
from ShaSpec.preprocessing import PIPELINE, normalise_modality

NEGATIVE_SLOPE = 0.01
WS_EPS = 1e-12
SHASPEC_ORDER: tuple[str, ...] = METHOD_ORDERS["shaspec"]  # FLAIR, T1, T1ce, T2
# x_canonical[:, TO_NATIVE] is in ShaSpec's modality order; native mask index i is canonical index TO_NATIVE[i].
TO_NATIVE: list[int] = permutation(SHASPEC_ORDER)


@dataclasses.dataclass
class ShaSpecConfig:
    """Architecture of ``DualNet_SS`` (paper defaults).

    Attributes:
        patch_size: in-plane side (H = W, upstream ``--input_size`` "80,160,160") of the training crop and window.
        patch_depth: axial side D (z) of the crop and window.
        width_divisor: divides every channel count (1 = upstream; the tiny preset uses 8).
        layers: bottleneck blocks per ResNet stage (ResNet-50: 3, 4, 6, 3).
        num_classes: region logits (ET, WT, TC).
        weight_std: weight standardisation of the 3-D convolutions (upstream: always on).
        aspp_pool_quirk: upstream's ASPP image-pooling branch applies InstanceNorm to a 1×1×1 map, which current
            PyTorch rejects and old PyTorch turned into the constant ``LeakyReLU(norm.bias)``. True reproduces that
            constant (``--reference-quirks``); False (default) applies the norm's affine transform without
            normalising, so the branch depends on the input and every parameter is used.
        activation_checkpointing: recompute encoder stages and decoder blocks in the backward pass (saves memory).
    """

    patch_size: int = 160
    patch_depth: int = 80
    width_divisor: int = 1
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    num_classes: int = 3
    weight_std: bool = True
    aspp_pool_quirk: bool = False
    activation_checkpointing: bool = dataclasses.field(default=False, metadata=RUNTIME_FIELD)

    def __post_init__(self) -> None:
        self.layers = tuple(int(n) for n in self.layers)  # type: ignore[assignment]
        if self.patch_depth % 16 or self.patch_size % 32:
            raise ValueError(
                f"ShaSpec needs patch_depth a multiple of 16 and patch_size a multiple of 32 (the encoder strides "
                f"16×32×32), got depth {self.patch_depth} and size {self.patch_size}"
            )
        if self.width_divisor < 1 or 32 % self.width_divisor:
            raise ValueError(f"width_divisor must divide 32, got {self.width_divisor}")

    def ch(self, channels: int) -> int:
        return channels // self.width_divisor


class WSConv3d(nn.Conv3d):
    """3-D convolution with weight standardisation: per output channel the kernel is centred and divided by
    ``sqrt(var + 1e-12)`` (unbiased variance of the flattened kernel); a no-op when ``weight_std`` is False."""

    def __init__(self, *args: Any, weight_std: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight_std = weight_std

    def effective_weight(self) -> torch.Tensor:
        """The kernel actually convolved, ``(C_out, C_in, k, k, k)``."""
        w = self.weight
        if not self.weight_std:
            return w
        flat = w.reshape(w.shape[0], -1)
        flat = flat - flat.mean(dim=1, keepdim=True)
        flat = flat / torch.sqrt(flat.var(dim=1, keepdim=True) + WS_EPS)
        return flat.reshape_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)


def _norm(channels: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, affine=True)


class Bottleneck(nn.Module):
    """ResNet bottleneck 1×1 → 3×3 (stride) → 1×1, IN after each, residual add, LeakyReLU; expansion 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int | tuple[int, ...], ws: bool) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = WSConv3d(inplanes, planes, 1, bias=False, weight_std=ws)
        self.norm1 = _norm(planes)
        self.conv2 = WSConv3d(planes, planes, 3, stride=stride, padding=1, bias=False, weight_std=ws)
        self.norm2 = _norm(planes)
        self.conv3 = WSConv3d(planes, out, 1, bias=False, weight_std=ws)
        self.norm3 = _norm(out)
        self.act = _act()
        # shortcut type B: projection whenever the shape changes (always in the first block of a stage)
        self.downsample = (
            nn.Sequential(WSConv3d(inplanes, out, 1, stride=stride, bias=False, weight_std=ws), _norm(out))
            if stride != 1 or inplanes != out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        y = self.act(self.norm1(self.conv1(x)))
        y = self.act(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return self.act(y + residual)


class ResNet3d(nn.Module):
    """Weight-standardised 3-D ResNet-50 backbone; returns the stem output and the four stage outputs."""

    def __init__(self, cfg: ShaSpecConfig) -> None:
        super().__init__()
        ws = cfg.weight_std
        stem = cfg.ch(64)
        self.conv1 = WSConv3d(1, stem, 7, stride=(1, 2, 2), padding=3, bias=False, weight_std=ws)
        self.norm1 = _norm(stem)
        self.act = _act()
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.checkpointing = cfg.activation_checkpointing
        inplanes = stem
        stages = []
        for planes, blocks, stride in zip((64, 128, 256, 320), cfg.layers, (1, 2, 2, 2), strict=True):
            planes = cfg.ch(planes)
            layer = [Bottleneck(inplanes, planes, stride, ws)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes, 1, ws) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = inplanes

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` ``(N, 1, D, H, W)`` → ``[L0 (N, 64, D, H/2, W/2), L1 … L4 (N, 1280, D/16, H/32, W/32)]``."""
        feats = [_maybe_checkpoint(lambda t: self.act(self.norm1(self.conv1(t))), x, self.checkpointing)]
        y = self.maxpool(feats[0])
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            y = _maybe_checkpoint(layer, y, self.checkpointing)
            feats.append(y)
        return feats


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1×1, three dilated 3×3 (2, 4, 8), image pooling; concat → 1×1."""

    def __init__(self, channels: int, ws: bool, pool_quirk: bool) -> None:
        super().__init__()

        def branch(kernel: int, dilation: int) -> nn.Sequential:
            pad = 0 if kernel == 1 else dilation
            conv = WSConv3d(channels, channels, kernel, padding=pad, dilation=dilation, bias=False, weight_std=ws)
            return nn.Sequential(conv, _norm(channels), _act())

        self.branch1 = branch(1, 1)
        self.branch2 = branch(3, 2)
        self.branch3 = branch(3, 4)
        self.branch4 = branch(3, 8)
        self.branch5_conv = WSConv3d(channels, channels, 1, bias=False, weight_std=ws)
        self.branch5_norm = _norm(channels)
        self.branch5_act = _act()
        self.conv_cat = nn.Sequential(
            WSConv3d(5 * channels, channels, 1, bias=False, weight_std=ws), _norm(channels), _act()
        )
        self.pool_quirk = pool_quirk

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        g = self.branch5_conv(x.mean(dim=(2, 3, 4), keepdim=True))  # (N, C, 1, 1, 1)
        w = self.branch5_norm.weight.view(1, -1, 1, 1, 1)
        b = self.branch5_norm.bias.view(1, -1, 1, 1, 1)
        # InstanceNorm of a single element is (x − x)/σ = 0, so upstream's branch is the constant bias (quirk);
        # the default keeps the affine transform and skips the degenerate normalisation
        if self.pool_quirk:
            # out of place: the expanded view shares the bias's memory, which the in-place activation would overwrite
            return F.leaky_relu(b.expand_as(g), NEGATIVE_SLOPE)
        return self.branch5_act(g * w + b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self._pooled(x), size=x.shape[2:], mode="trilinear", align_corners=True)
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x), pooled]
        return self.conv_cat(torch.cat(branches, dim=1))


class Encoder(nn.Module):
    """ResNet-50 + ``asppreduce`` (1×1, 1280 → 256) + ASPP; one instance per role (shared, FLAIR, T1, T1ce, T2)."""

    def __init__(self, cfg: ShaSpecConfig) -> None:
        super().__init__()
        ws, dim = cfg.weight_std, cfg.ch(256)
        # registration order = upstream's state-dict order (asppreduce, aspp, backbone)
        self.asppreduce = nn.Sequential(WSConv3d(cfg.ch(1280), dim, 1, bias=False, weight_std=ws), _norm(dim), _act())
        self.aspp = ASPP(dim, ws, cfg.aspp_pool_quirk)
        self.backbone = ResNet3d(cfg)
        self.checkpointing = cfg.activation_checkpointing

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``x`` ``(N, 1, D, H, W)`` → (feature ``(N, 256, D/16, H/32, W/32)``, global vector ``(N, 256)``, the
        backbone's ``[L0 … L4]``)."""
        levels = self.backbone(x)
        reduced = self.asppreduce(levels[-1])
        feature = _maybe_checkpoint(self.aspp, reduced, self.checkpointing)
        return feature, reduced.mean(dim=(2, 3, 4)), levels


class BasicBlock(nn.Module):
    """WS-Conv3×3 + IN + LReLU + WS-Conv3×3 + IN, identity add, LReLU."""

    def __init__(self, channels: int, ws: bool) -> None:
        super().__init__()
        self.conv1 = WSConv3d(channels, channels, 3, padding=1, bias=False, weight_std=ws)
        self.norm1 = _norm(channels)
        self.conv2 = WSConv3d(channels, channels, 3, padding=1, bias=False, weight_std=ws)
        self.norm2 = _norm(channels)
        self.act = _act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(y)) + x)


class Decoder(nn.Module):
    """Transposed-conv decoder with additive skips from the shared encoder's features of all four channels."""

    def __init__(self, cfg: ShaSpecConfig) -> None:
        super().__init__()
        ws, c = cfg.weight_std, cfg.ch

        def reduce(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(WSConv3d(cin, cout, 1, bias=False, weight_std=ws), _norm(cout), _act())

        self.shortcut_conv3 = reduce(4 * c(1024), c(256))
        self.shortcut_conv2 = reduce(4 * c(512), c(128))
        self.shortcut_conv1 = reduce(4 * c(256), c(64))
        self.shortcut_conv0 = reduce(4 * c(64), c(32))
        self.transposeconv_stage3 = nn.ConvTranspose3d(4 * c(256), c(256), 2, stride=2, bias=False)
        self.transposeconv_stage2 = nn.ConvTranspose3d(c(256), c(128), 2, stride=2, bias=False)
        self.transposeconv_stage1 = nn.ConvTranspose3d(c(128), c(64), 2, stride=2, bias=False)
        self.transposeconv_stage0 = nn.ConvTranspose3d(c(64), c(32), 2, stride=2, bias=False)
        self.stage3_de = BasicBlock(c(256), ws)
        self.stage2_de = BasicBlock(c(128), ws)
        self.stage1_de = BasicBlock(c(64), ws)
        self.stage0_de = BasicBlock(c(32), ws)
        self.cls_conv = nn.Sequential(nn.Conv3d(c(32), cfg.num_classes, 1, bias=False))
        self.checkpointing = cfg.activation_checkpointing

    def forward(self, fused: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """``fused`` ``(N, 4·256, D/16, H/32, W/32)``, ``skips`` = [L0 … L3] of the shared encoder with the four
        channels concatenated → logits ``(N, 3, D, H, W)``."""
        x = fused
        stages = zip(
            (
                self.transposeconv_stage3,
                self.transposeconv_stage2,
                self.transposeconv_stage1,
                self.transposeconv_stage0,
            ),
            (self.shortcut_conv3, self.shortcut_conv2, self.shortcut_conv1, self.shortcut_conv0),
            (self.stage3_de, self.stage2_de, self.stage1_de, self.stage0_de),
            (skips[3], skips[2], skips[1], skips[0]),
            strict=True,
        )
        for up, shortcut, block, skip in stages:
            x = _maybe_checkpoint(lambda a, b, u=up, s=shortcut, k=block: k(u(a) + s(b)), (x, skip), self.checkpointing)
        logits = self.cls_conv(x)
        return F.interpolate(logits, scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)


class CompositionLayer(nn.Module):
    """``f = shared + WS-Conv3×3(concat[shared, specific])`` (one layer shared by all modalities)."""

    def __init__(self, cfg: ShaSpecConfig) -> None:
        super().__init__()
        dim = cfg.ch(256)
        self.conv = WSConv3d(2 * dim, dim, 3, padding=1, bias=False, weight_std=cfg.weight_std)

    def forward(self, shared: torch.Tensor, specific: torch.Tensor) -> torch.Tensor:
        return shared + self.conv(torch.cat([shared, specific], dim=1))


def _maybe_checkpoint(fn: Callable[..., torch.Tensor], args: Any, enabled: bool) -> torch.Tensor:
    args = args if isinstance(args, tuple) else (args,)
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class ShaSpecOutput(NamedTuple):
    """Training-mode output (upstream's 4-tuple).

    Attributes:
        logits: region logits ``(B, 3, X, Y, Z)``, channels ET, WT, TC.
        shared: bottleneck shared features ``(B, 4, 256, d, h, w)`` in ShaSpec's modality order (FLAIR, T1, T1ce,
            T2) — upstream's ``(4N, 256, …)`` viewed per sample; every channel, present or zeroed.
        domain_logits: domain classifier logits ``(B, 4, 4)`` of the specific features, per modality (same order).
        substitute: ``(B,)`` ShaSpec-order index of the present modality whose shared feature replaced the missing
            ones.
    """

    logits: torch.Tensor
    shared: torch.Tensor
    domain_logits: torch.Tensor
    substitute: torch.Tensor


class Features(NamedTuple):
    """What :meth:`ShaSpec.encode` returns for a window batch (all ShaSpec modality order, internal layout).

    Attributes:
        shared: per modality the shared encoder's ``(feature, [L0 … L3])`` of the real image.
        shared_zero: the shared encoder's ``(feature, [L0 … L3])`` of an all-zero image, batch 1 (a missing channel).
        specific: per modality the specific encoder's feature of the real image.
    """

    shared: list[tuple[torch.Tensor, list[torch.Tensor]]]
    shared_zero: tuple[torch.Tensor, list[torch.Tensor]]
    specific: list[torch.Tensor]


@register(
    "shaspec",
    config=ShaSpecConfig,
    presets={"tiny": {"patch_size": 32, "patch_depth": 32, "width_divisor": 8, "layers": (1, 1, 1, 1)}},
    display="ShaSpec",
)
class ShaSpec(SegModel):
    """``DualNet_SS`` with the project's contract: ``model(x, mask)`` on canonical ``(B, 4, X, Y, Z)`` input.

    Eval mode returns region logits ``(B, 3, X, Y, Z)`` in :attr:`region_order` (ET, WT, TC) for a sigmoid; train
    mode returns :class:`ShaSpecOutput`. Missing channels are zeroed before the encoders (so their content never
    matters) and their bottleneck feature is the shared feature of a present modality: the first present one in
    ShaSpec order (FLAIR, T1, T1ce, T2) in eval mode — upstream's ``--mode`` list order —, a random present one in
    train mode (upstream shuffles the available list), or the one given in ``substitute``.
    """

    output_kind = OutputKind.REGION_LOGITS
    region_order = ("ET", "WT", "TC")
    data_pipeline = PIPELINE

    def __init__(self, config: ShaSpecConfig) -> None:
        super().__init__(config)
        cfg = config
        # registration order = upstream's state-dict order
        self.shared_enc = Encoder(cfg)
        self.shared_dec = Decoder(cfg)
        self.compos_layer = CompositionLayer(cfg)
        self.dom_classifier = nn.Linear(cfg.ch(256), 4)
        self.flair_enc = Encoder(cfg)
        self.t1_enc = Encoder(cfg)
        self.t1ce_enc = Encoder(cfg)
        self.t2_enc = Encoder(cfg)
        self._init_weights()

    @property
    def patch_size(self) -> int | tuple[int, int, int]:  # type: ignore[override]
        """Window in canonical ``(X, Y, Z)``: an int when cubic (tiny preset), else ``(160, 160, 80)``."""
        size, depth = int(self.config.patch_size), int(self.config.patch_depth)
        return size if size == depth else (size, size, depth)

    def preprocess(self, images: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
        """ShaSpec's own normalisation of a new case (``predict.py``), as its training cache: each available
        modality normalised by :func:`ShaSpec.preprocessing.normalise_modality`, absent ones zero, no crop.

        Args:
            images: modality key -> raw ``(X, Y, Z)``, any non-empty subset.

        Returns:
            ``(vol float32 (X, Y, Z, 4) canonical, meta)`` with ``original_shape``, ``crop_box`` (the whole grid),
            ``cropped_shape`` and ``available``.
        """
        available = [m for m in MODALITIES if m in images]
        if not available:
            raise ValueError("ShaSpec.preprocess: no modality given")
        shape = tuple(np.asarray(images[available[0]]).shape)
        vol = np.zeros((*shape, 4), dtype=np.float32)
        for c, m in enumerate(MODALITIES):
            if m in images:
                if tuple(np.asarray(images[m]).shape) != shape:
                    raise ValueError(f"ShaSpec.preprocess: {m} has shape {np.asarray(images[m]).shape}, not {shape}")
                vol[..., c] = normalise_modality(images[m])
        meta = {
            "original_shape": list(shape),
            "crop_box": [[0, n] for n in shape],
            "cropped_shape": list(shape),
            "available": available,
        }
        return vol, meta

    @property
    def specific_encoders(self) -> list[Encoder]:
        """In ShaSpec modality order FLAIR, T1, T1ce, T2 (= domain labels 0..3)."""
        return [self.flair_enc, self.t1_enc, self.t1ce_enc, self.t2_enc]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.InstanceNorm3d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def to_native(x: torch.Tensor) -> torch.Tensor:
        """Canonical ``(B, 4, X, Y, Z)`` → upstream ``(B, 4, Z, X, Y)`` in ShaSpec modality order."""
        return x[:, TO_NATIVE].permute(0, 1, 4, 2, 3)

    @staticmethod
    def from_native(y: torch.Tensor) -> torch.Tensor:
        """Upstream layout ``(B, C, Z, X, Y)`` → canonical ``(B, C, X, Y, Z)``."""
        return y.permute(0, 1, 3, 4, 2)

    @staticmethod
    def native_mask(mask: torch.Tensor) -> torch.Tensor:
        """Canonical ``(B, 4)`` mask → ShaSpec order."""
        return mask[:, TO_NATIVE].bool()

    def _choose_substitute(self, present: torch.Tensor, substitute: torch.Tensor | None) -> torch.Tensor:
        if substitute is not None:
            sub = substitute.to(device=present.device, dtype=torch.long).reshape(-1)
            if not bool(present.gather(1, sub[:, None]).all()):
                raise ValueError("substitute must index a present modality of each sample")
            return sub
        if self.training:  # a random present modality (upstream shuffles the available-modality list)
            return torch.multinomial(present.float(), 1).squeeze(1)
        return present.float().argmax(dim=1)  # first present in ShaSpec order

    def _check(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 4:
            raise ValueError(f"ShaSpec expects x of shape (B, 4, X, Y, Z), got {tuple(x.shape)}")
        if mask.shape != (x.shape[0], 4):
            raise ValueError(f"mask must be ({x.shape[0]}, 4), got {tuple(mask.shape)}")
        present = self.native_mask(mask.to(x.device))
        if not bool(present.any(dim=1).all()):
            raise ValueError("every sample needs at least one available modality")
        return present

    def _fuse_decode(
        self,
        shared: torch.Tensor,
        skips: Sequence[torch.Tensor],
        specific: torch.Tensor,
        present: torch.Tensor,
        sub: torch.Tensor,
    ) -> torch.Tensor:
        """``shared``/``specific`` ``(B, 4, C, d, h, w)``, ``skips`` ``[(B, 4, C_l, …)]`` → native logits."""
        b = shared.shape[0]
        composed = self.compos_layer(shared.flatten(0, 1), specific.flatten(0, 1)).view_as(shared)
        fill = shared[torch.arange(b, device=shared.device), sub]  # (B, C, d, h, w)
        keep = present.view(b, 4, 1, 1, 1, 1)
        fused = torch.where(keep, composed, fill.unsqueeze(1)).flatten(1, 2)
        return self.shared_dec(fused, [s.flatten(1, 2) for s in skips])

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, substitute: torch.Tensor | None = None
    ) -> torch.Tensor | ShaSpecOutput:
        """Segment ``x`` ``(B, 4, X, Y, Z)`` (canonical order) with availability ``mask`` ``(B, 4)`` (canonical).

        Args:
            x: images; absent channels are zeroed here.
            mask: True = available.
            substitute: optional ``(B,)`` ShaSpec-order index of the present modality whose shared feature fills
                the missing ones (see the class docstring for the default).

        Returns:
            eval mode: region logits ``(B, 3, X, Y, Z)`` (ET, WT, TC); train mode: :class:`ShaSpecOutput`.
        """
        present = self._check(x, mask)
        images = self.to_native(x) * present.view(*present.shape, 1, 1, 1).to(x.dtype)
        b = images.shape[0]
        shared_flat, _, levels = self.shared_enc(images.reshape(b * 4, 1, *images.shape[2:]))
        shared = shared_flat.view(b, 4, *shared_flat.shape[1:])
        skips = [lv.view(b, 4, *lv.shape[1:]) for lv in levels[:4]]
        specific, globals_ = [], []
        for m, enc in enumerate(self.specific_encoders):
            feat, g, _ = enc(images[:, m : m + 1])
            specific.append(feat)
            globals_.append(g)
        specific_t = torch.stack(specific, dim=1)
        sub = self._choose_substitute(present, substitute)
        logits = self.from_native(self._fuse_decode(shared, skips, specific_t, present, sub))
        if not self.training:
            return logits
        domain = self.dom_classifier(torch.stack(globals_, dim=1))  # (B, 4, 4)
        return ShaSpecOutput(logits, shared, domain, sub)

    def encode(self, x: torch.Tensor) -> Features:
        """Encoder outputs of a window batch for every modality present AND absent (zero image), so that
        :meth:`decode` serves all 15 scenarios: ``decode(encode(x), m) == model(x, m)`` in eval mode."""
        images = self.to_native(x)
        b = images.shape[0]
        feat, _, levels = self.shared_enc(images.reshape(b * 4, 1, *images.shape[2:]))
        feat = feat.view(b, 4, *feat.shape[1:])
        levels = [lv.view(b, 4, *lv.shape[1:]) for lv in levels[:4]]
        shared = [(feat[:, m], [lv[:, m] for lv in levels]) for m in range(4)]
        zf, _, zl = self.shared_enc(images.new_zeros(1, 1, *images.shape[2:]))
        specific = [enc(images[:, m : m + 1])[0] for m, enc in enumerate(self.specific_encoders)]
        return Features(shared, (zf, zl[:4]), specific)

    def decode(self, features: Features, mask: torch.Tensor) -> torch.Tensor:
        """Region logits ``(B, 3, X, Y, Z)`` for ``mask`` ``(B, 4)`` (canonical) from :meth:`encode`'s output."""
        present = self.native_mask(mask.to(features.specific[0].device))
        b = features.specific[0].shape[0]
        zf, zl = features.shared_zero
        shared, skips = [], [[] for _ in range(4)]
        for m in range(4):
            on = present[:, m].view(b, *([1] * 4))
            shared.append(torch.where(on, features.shared[m][0], zf))
            for level in range(4):
                skips[level].append(torch.where(on, features.shared[m][1][level], zl[level]))
        # a missing modality's specific feature never reaches the output (its bottleneck is substituted)
        specific = torch.stack(features.specific, dim=1)
        sub = self._choose_substitute(present, None)
        logits = self._fuse_decode(
            torch.stack(shared, dim=1), [torch.stack(s, dim=1) for s in skips], specific, present, sub
        )
        return self.from_native(logits)


def region_targets(label: torch.Tensor) -> torch.Tensor:
    """BraTS labels ``(B, ...)`` → float region targets ``(B, 3, ...)`` in ShaSpec's head order ET, WT, TC."""
    et = label == 3
    wt = label >= 1
    tc = (label == 1) | (label == 3)
    return torch.stack([et, wt, tc], dim=1).float()
