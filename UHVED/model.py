"""U-HVED (Dorent et al., MICCAI 2019): hetero-modal variational encoder-decoder.

Each modality has its own U-Net encoder whose four scales each emit a Gaussian (first half of the channels: mean,
second half: log-variance). Per scale, the Gaussians of the available modalities and a standard-normal prior are
fused by a product of Gaussians; a sample of the product (training) or its mean (inference) feeds five decoders of
identical structure: one reconstruction decoder per modality and the segmentation decoder.

With the paper config the state-dict keys, their order and shapes equal upstream's state dict (1,250,552
parameters), so upstream checkpoints (``module.`` prefix stripped) load strictly. No parameter depends on the patch
size: any input side that is a multiple of 8 (≥ 16) works, and ``patch_size`` only sets the training crop and the
sliding window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brats_core.modalities import METHOD_ORDERS, MODALITIES, permutation
from brats_core.registry import OutputKind, SegModel, register

__all__ = [
    "UHVED",
    "Gaussian",
    "UHVEDConfig",
    "UHVEDTrainOutput",
    "init_weights",
    "product_of_gaussians",
    "upcast_half",
]

NATIVE_ORDER: tuple[str, ...] = METHOD_ORDERS["uhved"]
"""Upstream's modality order (T1, T1ce, T2, FLAIR): its mask order and the order of its product of Gaussians."""

# Upstream names the T1ce reconstruction decoder "t1c_decoder" but the encoder "t1ce_encoder".
_DECODER_NAMES: dict[str, str] = {
    "flair": "flair_decoder",
    "t1ce": "t1c_decoder",
    "t1": "t1_decoder",
    "t2": "t2_decoder",
}

_TO_NATIVE: list[int] = permutation(NATIVE_ORDER)  # canonical channel indices in upstream's order

NUM_SCALES = 4
NORM_EPS = 1e-6
LEAKY_SLOPE = 0.01
LOGVAR_CLAMP = 50.0  # keeps exp(logvar) within [1.9e-22, 5.2e21]
FUSION_EPS = 1e-7  # upstream's epsilon in the model's product of Gaussians


@dataclasses.dataclass
class UHVEDConfig:
    """U-HVED hyper-parameters; the defaults are the paper/upstream values.

    Attributes:
        num_cls: segmentation classes (BraTS labels 0..3).
        patch_size: side of the cubic training patch and sliding window; a multiple of 8 (three 2× max-pools), at
            least 16. No parameter depends on it.
        base_features: channels of encoder scale 1 (scales: 1, 2, 4, 8 times this); even, since every scale's
            output is split in half into mean and log-variance.
    """

    num_cls: int = 4
    patch_size: int = 112
    base_features: int = 8

    def __post_init__(self) -> None:
        if self.patch_size % 8 or self.patch_size < 16:
            raise ValueError(f"U-HVED patch_size must be a multiple of 8 and >= 16, got {self.patch_size}")
        if self.base_features < 2 or self.base_features % 2:
            raise ValueError(f"U-HVED base_features must be even and >= 2, got {self.base_features}")
        if self.num_cls < 2:
            raise ValueError(f"U-HVED num_cls must be >= 2, got {self.num_cls}")

    @property
    def encoder_widths(self) -> tuple[int, ...]:
        """Channels of the encoder at scales 1..4 (8, 16, 32, 64 for the paper)."""
        return tuple(self.base_features * 2**s for s in range(NUM_SCALES))

    @property
    def latent_widths(self) -> tuple[int, ...]:
        """Channels of the latent Gaussian at scales 1..4 (4, 8, 16, 32 for the paper)."""
        return tuple(w // 2 for w in self.encoder_widths)


class Gaussian(NamedTuple):
    """A diagonal Gaussian given by its mean and log-variance (tensors of equal shape)."""

    mu: torch.Tensor
    logvar: torch.Tensor


class UHVEDTrainOutput(NamedTuple):
    """What the training-mode forward returns (everything the loss needs); modality axes in canonical order.

    Attributes:
        seg: class probabilities (softmax) ``(B, num_cls, D, H, W)``.
        reconstructions: one reconstructed image per modality ``(B, 4, D, H, W)``.
        posteriors: per scale s = 1..4, every modality's encoder Gaussian, ``mu``/``logvar`` of shape
            ``(B, 4, C_s, D/2^(s−1), H/2^(s−1), W/2^(s−1))`` with C_s = ``latent_widths[s−1]``; computed for all
            four modalities whatever the mask (the multi-subset KL term uses them all).
    """

    seg: torch.Tensor
    reconstructions: torch.Tensor
    posteriors: tuple[Gaussian, ...]


def upcast_half(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 → float32, other dtypes unchanged: under autocast, exp(±50) and 1/eps must not overflow."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def product_of_gaussians(
    mu: torch.Tensor, logvar: torch.Tensor, present: torch.Tensor | None = None, eps: float = FUSION_EPS
) -> Gaussian:
    """Fuse per-modality Gaussians with a standard-normal prior expert.

    With precisions ``T_m = 1 / (exp(logvar_m) + eps)`` of the present modalities (absent ones contribute
    ``T = 0`` and ``μT = 0``) and the prior ``N(0, 1)`` (``T = 1``, ``μ = 0``)::

        μ = Σ_m μ_m T_m / (Σ_m T_m + 1),   var = 1 / (Σ_m T_m + 1),   logvar = log(var + eps)

    where ``μ_m T_m`` is computed as ``μ_m / (exp(logvar_m) + eps)``, as upstream.

    Args:
        mu: means ``(B, M, C, ...)``, modality axis 1.
        logvar: log-variances, same shape.
        present: ``(B, M)`` or ``(M,)`` bool, True = modality takes part; None = all of them.
        eps: 1e-7 in the model, 1e-5 in the KL loss (as upstream).

    Returns:
        The product's ``Gaussian`` with tensors ``(B, C, ...)``.
    """
    mu, logvar = upcast_half(mu), upcast_half(logvar)
    var_eps = torch.exp(logvar) + eps
    precision = 1.0 / var_eps
    weighted = mu / var_eps
    if present is not None:
        keep = present.to(device=mu.device, dtype=torch.bool)
        keep = keep.reshape(*(keep.shape if keep.dim() == 2 else (1, *keep.shape)), *([1] * (mu.dim() - 2)))
        # where (not multiplication) so that an absent modality cannot leak inf/NaN into the product
        precision = torch.where(keep, precision, 0.0)
        weighted = torch.where(keep, weighted, 0.0)
    total = precision.sum(dim=1) + 1.0  # + the prior's precision
    mean = weighted.sum(dim=1) / total  # the prior's μT is 0
    return Gaussian(mean, torch.log(1.0 / total + eps))


class PreNormConv(nn.Module):
    """InstanceNorm3d (affine, eps 1e-6) → LeakyReLU(0.01) → Conv3d k3 'same', no bias.

    Args:
        in_ch: input channels (normalised).
        out_ch: output channels.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(in_ch, eps=NORM_EPS, affine=True)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


class ModalityEncoder(nn.Module):
    """One modality's encoder: 1×1 conv, then four scales of two pre-norm convs separated by 2× max-pools.

    Args:
        base: channels of scale 1.
    """

    def __init__(self, base: int) -> None:
        super().__init__()
        widths = [base * 2**s for s in range(NUM_SCALES)]
        self.conv1 = nn.Conv3d(1, base, kernel_size=1, bias=False)
        self.act1 = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        for s, (w_in, w) in enumerate(zip([base, *widths[:-1]], widths, strict=True), start=1):
            setattr(self, f"e{s}_c1", PreNormConv(w_in, w))
            setattr(self, f"e{s}_c2", PreNormConv(w, w))
        self.pool = nn.MaxPool3d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> list[Gaussian]:
        """Encode one modality.

        Args:
            x: ``(B, 1, D, H, W)``.

        Returns:
            Four Gaussians, scale 1 (full resolution, ``base/2`` channels) to scale 4 (1/8, ``4·base`` channels);
            log-variances clamped to [−50, 50].
        """
        x = self.act1(self.conv1(x))
        out = []
        for s in range(1, NUM_SCALES + 1):
            if s > 1:
                x = self.pool(x)  # the full, unsplit tensor continues down the encoder
            x = getattr(self, f"e{s}_c2")(getattr(self, f"e{s}_c1")(x))
            half = x.shape[1] // 2
            out.append(Gaussian(x[:, :half], x[:, half:].clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)))
        return out


class LatentDecoder(nn.Module):
    """Decoder from the four latent scales: upsample, concatenate the next finer latent, two pre-norm convs.

    Args:
        base: encoder channels of scale 1 (latent widths are base/2, base, 2·base, 4·base).
        out_channels: 1 for an image decoder, ``num_cls`` for the segmentation decoder.
    """

    def __init__(self, base: int, out_channels: int) -> None:
        super().__init__()
        widths = [base * 2**s for s in range(NUM_SCALES)]
        latent = [w // 2 for w in widths]
        channels = latent[-1]
        # stage k = 1, 2, 3 merges scale 4 − k: (4·base + 2·base → 4·base → 2·base), (… → base), (… → base/2)
        for k, scale in enumerate(range(NUM_SCALES - 2, -1, -1), start=1):
            setattr(self, f"d{k}_c1", PreNormConv(channels + latent[scale], widths[scale]))
            setattr(self, f"d{k}_c2", PreNormConv(widths[scale], widths[scale] // 2))
            channels = widths[scale] // 2
        self.conv_out = nn.Conv3d(channels, out_channels, kernel_size=1, bias=False)

    def forward(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode.

        Args:
            z: latent codes of scales 1..4, ``(B, C_s, D/2^(s−1), …)``.

        Returns:
            ``(B, out_channels, D, H, W)``, no activation.
        """
        x = z[-1]
        for k, skip in enumerate(reversed(z[:-1]), start=1):
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
            x = torch.cat([x, skip], dim=1)
            x = getattr(self, f"d{k}_c2")(getattr(self, f"d{k}_c1")(x))
        return self.conv_out(x)


def init_weights(module: nn.Module) -> None:
    """Upstream's initialisation: every parameter whose name contains "weight" (conv AND InstanceNorm weights) ~
    truncated normal, mean 0, std √(2 / prod(shape[:-1])), cut at ±2 (absolute); biases 0.

    For a conv weight (out, in, k, k, k) the product is out·in·k·k; for a norm weight (C,) it is 1 (std √2).
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "weight" in name:
                std = float(np.sqrt(2.0 / np.prod(param.shape[:-1])))
                nn.init.trunc_normal_(param, mean=0.0, std=std, a=-2.0, b=2.0)
            elif "bias" in name:
                nn.init.zeros_(param)


@register("uhved", config=UHVEDConfig, presets={"tiny": {"patch_size": 32}}, display="U-HVED")
class UHVED(SegModel):
    """U-HVED network.

    ``model(x, mask)`` with x ``(B, 4, D, H, W)`` in canonical order (FLAIR, T1ce, T1, T2), each side a multiple
    of 8, and mask ``(B, 4)`` bool (True = available). Absent modalities are left out of the product of Gaussians;
    their images are still encoded (the KL term of the loss uses every modality) but cannot change the output.
    Eval mode (``model.eval()``) returns segmentation LOGITS ``(B, num_cls, D, H, W)`` decoded from the posterior
    means; train mode samples the posteriors and returns a :class:`UHVEDTrainOutput`.

    Upstream's mask is in T1, T1ce, T2, FLAIR order and its images are routed to the encoders by name; here the
    canonical mask is translated inside :meth:`fuse`, the only place that needs an order.

    Args:
        config: see :class:`UHVEDConfig`.
    """

    output_kind = OutputKind.LOGITS

    def __init__(self, config: UHVEDConfig | None = None) -> None:
        config = config if config is not None else UHVEDConfig()
        super().__init__(config)
        base = config.base_features
        # Registration order reproduces upstream's state-dict order.
        for m in MODALITIES:
            setattr(self, f"{m}_encoder", ModalityEncoder(base))
        for m in MODALITIES:
            setattr(self, _DECODER_NAMES[m], LatentDecoder(base, 1))
        self.seg_decoder = LatentDecoder(base, config.num_cls)
        init_weights(self)

    def _check_inputs(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != len(MODALITIES) or any(s % 8 or s < 16 for s in x.shape[2:]):
            raise ValueError(
                f"U-HVED expects x of shape (B, 4, D, H, W) with sides multiples of 8 and >= 16, got {tuple(x.shape)}"
            )

    @staticmethod
    def _check_mask(mask: torch.Tensor, batch: int) -> None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, len(MODALITIES)):
            raise ValueError(f"U-HVED expects a bool mask of shape ({batch}, 4), got {mask.dtype} {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("U-HVED: every mask row needs at least one available modality")

    def encode(self, x: torch.Tensor) -> tuple[Gaussian, ...]:
        """Run the four modality encoders (independent of the mask).

        Args:
            x: ``(B, 4, D, H, W)``, canonical channel order.

        Returns:
            Per scale s = 1..4, the modalities' Gaussians stacked on axis 1 in canonical order:
            ``(B, 4, C_s, D/2^(s−1), …)``.
        """
        self._check_inputs(x)
        per_modality = [getattr(self, f"{m}_encoder")(x[:, i : i + 1]) for i, m in enumerate(MODALITIES)]
        return tuple(
            Gaussian(torch.stack([g.mu for g in scale], 1), torch.stack([g.logvar for g in scale], 1))
            for scale in zip(*per_modality, strict=True)
        )

    def fuse(self, params: Gaussian, mask: torch.Tensor) -> Gaussian:
        """Product of the available modalities' Gaussians and the prior at one scale (eps 1e-7).

        The modality axis and the mask are put in upstream's order first, so that the sums run in its order.

        Args:
            params: per-modality Gaussian ``(B, 4, C, ...)``, canonical order.
            mask: ``(B, 4)`` bool, canonical order.

        Returns:
            The posterior ``(B, C, ...)``.
        """
        return product_of_gaussians(
            params.mu[:, _TO_NATIVE], params.logvar[:, _TO_NATIVE], mask[:, _TO_NATIVE], FUSION_EPS
        )

    def decode(self, features: Sequence[Gaussian], mask: torch.Tensor) -> torch.Tensor:
        """Segment from the posterior MEANS (the inference path, whatever the module's mode).

        Args:
            features: output of :meth:`encode`.
            mask: ``(B, 4)`` bool, True = available, canonical order.

        Returns:
            Segmentation logits ``(B, num_cls, D, H, W)``.
        """
        self._check_mask(mask, features[0].mu.shape[0])
        mask = mask.to(features[0].mu.device)
        return self.seg_decoder([self.fuse(g, mask).mu for g in features])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | UHVEDTrainOutput:
        """Segment (eval) or produce everything the training loss needs (train).

        Args:
            x: ``(B, 4, D, H, W)`` float, canonical order.
            mask: ``(B, 4)`` bool, True = available.

        Returns:
            Eval mode: segmentation logits ``(B, num_cls, D, H, W)``. Train mode: :class:`UHVEDTrainOutput` with
            the softmax, the four reconstructions decoded from the sampled latents and every modality's Gaussians.
        """
        features = self.encode(x)
        if not self.training:
            return self.decode(features, mask)
        self._check_mask(mask, x.shape[0])
        z = []
        for g in features:
            post = self.fuse(g, mask)
            z.append(post.mu + torch.exp(0.5 * post.logvar) * torch.randn_like(post.mu))
        reconstructions = torch.cat([getattr(self, _DECODER_NAMES[m])(z) for m in MODALITIES], dim=1)
        seg = torch.softmax(self.seg_decoder(z), dim=1)
        return UHVEDTrainOutput(seg, reconstructions, tuple(features))
