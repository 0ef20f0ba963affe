"""M3AE (Liu et al., AAAI 2023): an early-fusion 3-D U-Net with a learned modality-completion image.

One encoder sees all four channels at once. A missing modality is not masked in feature space: its input voxels
are REPLACED by the co-located crop of ``limage``, a learnable image of the whole original grid (1, 4, 155, 240,
240), so the crop of every window depends on where the window lies in the original image. Stage 1 (pre-training,
``pre_train=True``) reconstructs the four modalities from inputs whose tokens are mostly replaced by ``limage``
(4 output channels, no deep supervision); stage 2 (fine-tuning) segments the regions ET, TC, WT with sigmoid
outputs and optional deep supervision.

Layouts: outside the model everything is canonical, ``x`` ``(B, 4, X, Y, Z)`` with channels FLAIR, T1ce, T1, T2
(the ``.npy`` layout of ``brats_core``). Upstream reads its images with SimpleITK, i.e. ``(Z, Y, X)`` arrays with
channels T1, T1ce, T2, FLAIR, and ``limage`` and every convolution kernel live in that frame; the model translates
at its boundary (channel permutation and reversed spatial axes), so upstream checkpoints load and behave the same.

Window position: ``model(x, mask, origin=o)`` takes ``o`` ``(B, 3)``, the voxel index (canonical X, Y, Z) of each
input's first voxel in the original image grid, and crops ``limage`` there (zeros where a window reaches beyond the
grid). The shared sliding window passes these positions because ``window_origin`` is set (see
``brats_core.engine.inference.predict_scenarios``): ``"image"`` (default) gives absolute positions, as in training;
``"crop"`` gives positions relative to the preprocessed crop, upstream's test-time misalignment, kept for
``--reference-quirks``. Without ``origin`` the crop starts at the grid's corner.

With the paper config the state-dict keys, order and shapes equal upstream's state dict
(``pre_train=True``: 40,416,228 parameters) and ``m3ae_finetune_ds.txt`` (40,416,505; 40,416,211 without deep
supervision); 35,712,000 of them are ``limage``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brats_core.modalities import METHOD_ORDERS, MODALITIES, permutation
from brats_core.registry import OutputKind, SegModel, build_from_config, register
from brats_core.utils.checkpoint import load_checkpoint
from m3ae.preprocessing import PIPELINE, preprocess_arrays

__all__ = [
    "M3AE",
    "NATIVE_ORDER",
    "REGION_ORDER",
    "M3AEConfig",
    "M3AETrainOutput",
    "ResBlock",
    "UNet3D",
    "completion_array",
    "tokens_to_voxels",
]

NATIVE_ORDER: tuple[str, ...] = METHOD_ORDERS["m3ae"]
"""Upstream's channel order (T1, T1ce, T2, FLAIR)."""

REGION_ORDER: tuple[str, ...] = ("ET", "TC", "WT")
"""Channel order of the segmentation head."""

_TO_NATIVE: list[int] = permutation(NATIVE_ORDER)  # canonical channel indices in upstream's order
_TO_CANONICAL: list[int] = [NATIVE_ORDER.index(m) for m in MODALITIES]  # upstream channel indices in canonical order
GROUPS = 8  # GroupNorm groups of every residual block

log = logging.getLogger(__name__)


@dataclasses.dataclass
class M3AEConfig:
    """M3AE hyper-parameters; the defaults are the fine-tuning model of the paper/upstream.

    Attributes:
        patch_size: training patch and sliding window side; a multiple of 8 (three stride-2 convolutions) and of
            ``mask_patch``. No parameter depends on it.
        init_channels: channels of the first stage (then 2×, 4×, 8×); a multiple of 8 (GroupNorm(8, ·)).
        pre_train: stage 1: 4 reconstruction outputs, no deep supervision; otherwise 3 region logits.
        deep_supervised: fine-tuning with the two extra heads at 1/4 and 1/2 resolution (README ``--deep_supervised``).
        image_shape: the original image grid ``(X, Y, Z)`` that ``limage`` covers (BraTS 240 × 240 × 155).
        mask_patch: side of a pre-training mask token (16: an 8 × 8 × 8 token grid per modality at 128³).
        mask_ratio: fraction of the 4 × grid³ tokens replaced by ``limage`` in pre-training.
    """

    patch_size: int = 128
    init_channels: int = 16
    pre_train: bool = False
    deep_supervised: bool = True
    image_shape: tuple[int, int, int] = (240, 240, 155)
    mask_patch: int = 16
    mask_ratio: float = 0.875

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)  # type: ignore[assignment]  # lists from JSON
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"M3AE image_shape must be three positive sizes (X, Y, Z), got {self.image_shape}")
        if self.patch_size % 8 or self.patch_size < 8:
            raise ValueError(f"M3AE patch_size must be a positive multiple of 8, got {self.patch_size}")
        if self.init_channels % GROUPS or self.init_channels < GROUPS:
            raise ValueError(f"M3AE init_channels must be a multiple of {GROUPS}, got {self.init_channels}")
        if self.mask_patch < 1 or self.patch_size % self.mask_patch:
            raise ValueError(f"M3AE patch_size {self.patch_size} is not a multiple of mask_patch {self.mask_patch}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"M3AE mask_ratio must lie in [0, 1), got {self.mask_ratio}")
        if self.pre_train:
            self.deep_supervised = False  # upstream's pre-training model has no deep-supervision heads

    @property
    def out_channels(self) -> int:
        """4 reconstructed modalities (pre-training) or 3 region logits."""
        return len(MODALITIES) if self.pre_train else len(REGION_ORDER)

    @property
    def token_grid(self) -> int:
        """Pre-training tokens per axis and modality (``patch_size / mask_patch``)."""
        return self.patch_size // self.mask_patch

    @property
    def visible_tokens(self) -> int:
        """Tokens kept in pre-training, ``int((1 − mask_ratio) · 4 · grid³)`` (256 at the paper size)."""
        return int((1.0 - self.mask_ratio) * len(MODALITIES) * self.token_grid**3)


class ResBlock(nn.Module):
    """Pre-activation residual block: GN → ReLU → conv3 → GN → ReLU → conv3, plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gn1 = nn.GroupNorm(GROUPS, channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.gn2 = nn.GroupNorm(GROUPS, channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.gn1(x)))
        return self.conv2(F.relu(self.gn2(y))) + x


class UNet3D(nn.Module):
    """Upstream's ``UNet3D_g``: residual encoder (1, 2, 2, 4 blocks), additive skips, nearest upsampling.

    Works in upstream's frame: input ``(B, 4, Z, Y, X)`` channels T1, T1ce, T2, FLAIR. Upstream also builds a
    Dropout(0.2) and a MaxPool that its forward never uses; they hold no parameters and are left out.
    """

    def __init__(self, out_channels: int, init_channels: int = 16, deep_supervised: bool = False) -> None:
        super().__init__()
        c = init_channels
        self.conv1a = nn.Conv3d(4, c, 3, padding=1)
        self.conv1b = ResBlock(c)
        self.ds1 = nn.Conv3d(c, 2 * c, 3, stride=2, padding=1)
        self.conv2a = ResBlock(2 * c)
        self.conv2b = ResBlock(2 * c)
        self.ds2 = nn.Conv3d(2 * c, 4 * c, 3, stride=2, padding=1)
        self.conv3a = ResBlock(4 * c)
        self.conv3b = ResBlock(4 * c)
        self.ds3 = nn.Conv3d(4 * c, 8 * c, 3, stride=2, padding=1)
        self.conv4a = ResBlock(8 * c)
        self.conv4b = ResBlock(8 * c)
        self.conv4c = ResBlock(8 * c)
        self.conv4d = ResBlock(8 * c)
        self.up4conva = nn.Conv3d(8 * c, 4 * c, 1)
        self.up4convb = ResBlock(4 * c)
        self.up3conva = nn.Conv3d(4 * c, 2 * c, 1)
        self.up3convb = ResBlock(2 * c)
        self.up2conva = nn.Conv3d(2 * c, c, 1)
        self.up2convb = ResBlock(c)
        self.up1conv = nn.Conv3d(c, out_channels, 1)
        self.ds_out = (
            nn.ModuleList([nn.Conv3d(4 * c, out_channels, 1), nn.Conv3d(2 * c, out_channels, 1)])
            if deep_supervised
            else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Returns ``(out, [out4, out3] or [], style)`` with ``style = [c2d, c3d, c4d]`` (encoder features at 1/4,
        1/8 after the stride-2 conv, 1/8 after the bottleneck blocks); deep-supervision outputs at full size."""
        c1 = self.conv1b(self.conv1a(x))
        c2 = self.conv2b(self.conv2a(self.ds1(c1)))
        c2d = self.ds2(c2)
        c3 = self.conv3b(self.conv3a(c2d))
        c3d = self.ds3(c3)
        c4d = self.conv4d(self.conv4c(self.conv4b(self.conv4a(c3d))))
        u4 = self.up4convb(F.interpolate(self.up4conva(c4d), scale_factor=2, mode="nearest") + c3)
        u3 = self.up3convb(F.interpolate(self.up3conva(u4), scale_factor=2, mode="nearest") + c2)
        u2 = self.up2convb(F.interpolate(self.up2conva(u3), scale_factor=2, mode="nearest") + c1)
        out = self.up1conv(u2)
        deep: list[torch.Tensor] = []
        if self.ds_out is not None:
            deep = [
                F.interpolate(self.ds_out[0](u4), scale_factor=4, mode="trilinear", align_corners=True),
                F.interpolate(self.ds_out[1](u3), scale_factor=2, mode="trilinear", align_corners=True),
            ]
        return out, deep, [c2d, c3d, c4d]


class M3AETrainOutput(NamedTuple):
    """Train-mode output, canonical layout ``(B, K, X, Y, Z)``.

    Attributes:
        outputs: fine-tuning with deep supervision ``[out4, out3, out]`` (region logits ET, TC, WT, all at full
            size); otherwise ``[out]`` (region logits, or the 4 reconstructed modalities in canonical order).
        style: encoder features ``[c2d, c3d, c4d]`` (the consistency term of 3-copy batches uses one of them).
    """

    outputs: list[torch.Tensor]
    style: list[torch.Tensor]


def _to_native(x: torch.Tensor) -> torch.Tensor:
    """Canonical ``(B, 4, X, Y, Z)`` → upstream's ``(B, 4, Z, Y, X)`` in T1, T1ce, T2, FLAIR order."""
    return x[:, _TO_NATIVE].permute(0, 1, 4, 3, 2)


def _spatial_to_canonical(x: torch.Tensor) -> torch.Tensor:
    """``(B, K, Z, Y, X)`` → ``(B, K, X, Y, Z)`` (channels unchanged)."""
    return x.permute(0, 1, 4, 3, 2)


@register(
    "m3ae",
    config=M3AEConfig,
    presets={
        # 32³ windows, 8-voxel mask tokens (4³ per modality) and a 48 × 48 × 40 image grid (the synthetic test data)
        "tiny": {"patch_size": 32, "init_channels": 8, "image_shape": (48, 48, 40), "mask_patch": 8},
        "pretrain": {"pre_train": True},
        "tiny_pretrain": {
            "patch_size": 32,
            "init_channels": 8,
            "image_shape": (48, 48, 40),
            "mask_patch": 8,
            "pre_train": True,
        },
    },
    display="M3AE",
)
class M3AE(SegModel):
    """Upstream's ``Unet_missing``: ``limage`` plus the U-Net ``unet`` (see the module docstring).

    Eval mode returns region logits ``(B, 3, X, Y, Z)`` in the order ET, TC, WT (no deep supervision); train mode
    returns :class:`M3AETrainOutput`. A pre-training model (``pre_train=True``) returns the reconstruction
    ``(B, 4, X, Y, Z)`` in eval mode.
    """

    output_kind = OutputKind.REGION_LOGITS
    mask_dependent_parameters = True  # limage only fills missing modalities: no gradient with all four present
    region_order = REGION_ORDER
    window_origin = "image"
    data_pipeline = PIPELINE

    def __init__(self, config: M3AEConfig) -> None:
        super().__init__(config)
        x, y, z = config.image_shape
        # N(0, 1) init as upstream; the same parameter in both stages (frozen during fine-tuning by train.py).
        self.limage = nn.Parameter(torch.randn(1, len(MODALITIES), z, y, x))
        self.unet = UNet3D(config.out_channels, config.init_channels, config.deep_supervised)

    def preprocess(self, images: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
        """M3AE's own normalisation and crop (:func:`m3ae.preprocessing.preprocess_arrays`) for any modality subset."""
        vol, _, meta = preprocess_arrays(dict(images), require_all=False)
        grid = tuple(int(n) for n in meta["original_shape"])
        if len(images) < len(MODALITIES) and grid != tuple(self.config.image_shape):
            log.warning(
                "M3AE fills missing modalities from its completion image, learnt on the %s grid of its training data "
                "(BraTS: 1 mm, SRI-24 atlas space); this case's grid is %s, so the filled content is misplaced. "
                "Register the scans as BraTS does for reliable results.",
                "×".join(map(str, self.config.image_shape)), "×".join(map(str, grid)),
            )  # fmt: skip
        return vol, meta

    def completion(
        self,
        origin: torch.Tensor | Sequence[Sequence[int]] | None,
        size: Sequence[int],
        batch: int,
        flip: Sequence[int] = (),
    ) -> torch.Tensor:
        """Crops of ``limage`` for ``batch`` windows, in upstream's frame.

        Args:
            origin: ``(B, 3)`` (or ``(1, 3)``, broadcast) canonical X, Y, Z start of each window in the original
                grid; None: ``(0, 0, 0)``. Parts of a window outside the grid are zero.
            size: window size in upstream's frame ``(Z, Y, X)``.
            batch: B.
            flip: canonical axes (2, 3, 4) along which the window was flipped (test-time augmentation).

        Returns:
            ``(B, 4, Z, Y, X)`` channels T1, T1ce, T2, FLAIR.
        """
        if origin is None:
            starts = [[0, 0, 0]] * batch
        else:
            o = torch.as_tensor(origin).reshape(-1, 3)
            if o.shape[0] not in (1, batch):
                raise ValueError(f"origin must be (B, 3) or (1, 3) for B = {batch}, got {tuple(o.shape)}")
            starts = o.expand(batch, 3).tolist()
        frame = self.limage.shape[2:]
        crops = []
        for ox, oy, oz in starts:
            slices, pads = [], []
            for start, n, dim in zip((int(oz), int(oy), int(ox)), size, frame, strict=True):
                lo, hi = min(max(start, 0), dim), min(max(start + n, 0), dim)
                slices.append(slice(lo, hi))
                pads.append((lo - start, start + n - hi))
            crop = self.limage[0][(slice(None), *slices)]
            if any(p for pair in pads for p in pair):
                crop = F.pad(crop, [p for pair in reversed(pads) for p in pair])
            crops.append(crop)
        out = torch.stack(crops)
        # canonical axis d (2: X, 3: Y, 4: Z) is axis 6 − d in upstream's (B, C, Z, Y, X)
        return out.flip([6 - d for d in flip]) if flip else out

    def complete(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        origin: torch.Tensor | Sequence[Sequence[int]] | None = None,
        flip: Sequence[int] = (),
    ) -> torch.Tensor:
        """Replace the unavailable voxels of ``x`` by ``limage``: the network input, in upstream's frame.

        Args:
            x: ``(B, 4, X, Y, Z)`` canonical.
            mask: ``(B, 4)`` bool (whole modalities) or ``(B, 4, X, Y, Z)`` bool (pre-training tokens); True = kept.
            origin, flip: see :meth:`completion`.

        Returns:
            ``(B, 4, Z, Y, X)`` channels T1, T1ce, T2, FLAIR.
        """
        if mask.dtype != torch.bool:
            raise ValueError(f"M3AE needs a bool mask, got {mask.dtype}")
        if mask.dim() == 2:
            if mask.shape != (x.shape[0], 4):
                raise ValueError(f"mask must be (B, 4) = ({x.shape[0]}, 4), got {tuple(mask.shape)}")
            keep = mask[:, _TO_NATIVE][:, :, None, None, None]
        elif mask.shape == x.shape:
            keep = _to_native(mask)
        else:
            raise ValueError(f"mask must be (B, 4) or shaped like x {tuple(x.shape)}, got {tuple(mask.shape)}")
        native = _to_native(x)
        if bool(keep.all()):
            return native
        fill = self.completion(origin, native.shape[2:], x.shape[0], flip).to(native.dtype)
        # where, not x·m + limage·(1 − m): non-finite values in a missing channel must not leak through
        return torch.where(keep, native, fill)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        origin: torch.Tensor | Sequence[Sequence[int]] | None = None,
        flip: Sequence[int] = (),
    ) -> torch.Tensor | M3AETrainOutput:
        """Complete the missing input with ``limage`` and run the U-Net.

        Args:
            x: ``(B, 4, X, Y, Z)`` canonical, sides multiples of 8.
            mask: ``(B, 4)`` bool, or voxel-wise ``(B, 4, X, Y, Z)`` bool (pre-training), True = available.
            origin: ``(B, 3)`` start of each input in the original grid (canonical X, Y, Z); None: the corner.
            flip: canonical axes along which ``x`` was flipped (the completion crop is flipped alike).

        Returns:
            eval: logits ``(B, 3, X, Y, Z)`` (ET, TC, WT), or the reconstruction ``(B, 4, X, Y, Z)`` when
            pre-training; train: :class:`M3AETrainOutput`.
        """
        if x.dim() != 5 or x.shape[1] != 4:
            raise ValueError(f"x must be (B, 4, X, Y, Z), got shape {tuple(x.shape)}")
        if any(s % 8 for s in x.shape[2:]):
            raise ValueError(f"M3AE input sides must be multiples of 8, got {tuple(x.shape[2:])}")
        if mask.dim() == 2 and not bool(mask.any(dim=1).all()):
            raise ValueError("every sample needs at least one available modality")
        out, deep, style = self.unet(self.complete(x, mask, origin, flip))
        outputs = [_spatial_to_canonical(t) for t in (*deep, out)]
        if self.config.pre_train:
            outputs = [t[:, _TO_CANONICAL] for t in outputs]
        if not self.training:
            return outputs[-1]
        return M3AETrainOutput(outputs, [_spatial_to_canonical(s) for s in style])

    def network_parameters(self) -> list[nn.Parameter]:
        """Every parameter except ``limage`` (optimised with its own learning rate, or frozen)."""
        return list(self.unet.parameters())


def completion_array(model: M3AE) -> np.ndarray:
    """The model's completion image as a numpy array ``(X, Y, Z, 4)`` in canonical order (a frozen copy)."""
    with torch.no_grad():
        native = model.limage.detach()[0].float().cpu()  # (4, Z, Y, X), channels T1, T1ce, T2, FLAIR
        canonical = native[[("t1", "t1ce", "t2", "flair").index(m) for m in MODALITIES]]
        return np.ascontiguousarray(canonical.permute(3, 2, 1, 0).numpy())


def tokens_to_voxels(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Expand token masks ``(B, 4, g, g, g)`` to voxel masks ``(B, 4, P, P, P)`` (each token a (P/g)³ cube)."""
    side = patch_size // tokens.shape[-1]
    for dim in (2, 3, 4):
        tokens = tokens.repeat_interleave(side, dim=dim)
    return tokens


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The config of an upstream M3AE state dict (which stores none): widths, heads and the image grid from the
    weights' shapes (the window has no weights; the config default, 128, applies)."""
    z, y, x = state_dict["limage"].shape[2:]
    return {
        "init_channels": int(state_dict["unet.conv1a.weight"].shape[0]),
        "pre_train": int(state_dict["unet.up1conv.weight"].shape[0]) == 4,
        "deep_supervised": "unet.ds_out.0.weight" in state_dict,
        "image_shape": (int(x), int(y), int(z)),
    }


def model_to_resume(path: str | Path) -> M3AE:
    """The model of the run that ``--resume path`` continues, built from the checkpoint's config (ours) or, for
    upstream's ``model_1last.pth.tar`` files, which store none, from the weights' shapes."""
    ckpt = load_checkpoint(path)
    config = ckpt["config"] if "config" in ckpt else infer_architecture(ckpt["state_dict"])
    return build_from_config("m3ae", dict(config))  # type: ignore[return-value]
