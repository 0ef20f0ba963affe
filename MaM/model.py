"""Missing-as-Masking (MaM): ``MultimodalRecon``, an nnU-Net with one encoder per modality.

Four modality-specific plain nnU-Net encoders (``dynamic_network_architectures.PlainConvEncoder``, one input channel,
F/4 features per stage) see one modality each. Skip features of missing modalities are set to exactly zero; at the
bottleneck a missing modality's features are replaced by a learned token tensor, all 4·g³ bottleneck tokens pass a
one-layer transformer, and its output replaces only the missing modalities' bottleneck. The four maps are
concatenated per stage (modality-major) and decoded by nnU-Net's ``UNetDecoder`` with deep supervision into three
region logits (WT, TC, ET).

Upstream builds a full 4-channel ``PlainConvEncoder`` only so that the decoder can read its configuration; it is never
run, but the decoder registers it, so its parameters appear twice in the state dict (``encoder.*`` and
``decoder.encoder.*``, 28,296,384 dead parameters). It is kept here so that upstream checkpoints load strictly: with
the paper config the state dict equals upstream's key for key (691 entries, 67,358,767 unique
parameters, 39,062,383 of them used in ``forward``).

Channel order: the model contract is canonical (FLAIR, T1ce, T1, T2); upstream's nnU-Net channels are FLAIR, T1,
T1ce, T2 (``METHOD_ORDERS["mam"]``), which is also the order of ``modality_specific_encoders`` and of the concatenated
features. ``forward(x, mask, native=True)`` takes both in that order (the nnU-Net trainer and predictor use it).

The token grid is ``patch_size / 2**(n_stages - 1)`` per axis, so a 32³ patch with 4 stages gives upstream's 4³ grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from brats_core.modalities import METHOD_ORDERS, permutation
from brats_core.registry import OutputKind, SegModel, register

__all__ = [
    "NATIVE_ORDER",
    "MaMConfig",
    "MaMOutput",
    "MultimodalRecon",
    "ReconstructionTransformer",
    "reconstruction_loss",
]

NATIVE_ORDER: tuple[str, ...] = METHOD_ORDERS["mam"]
"""Upstream's channel order (nnU-Net channels ``_0000`` … ``_0003``): FLAIR, T1, T1ce, T2."""

_TO_NATIVE: list[int] = permutation(NATIVE_ORDER)  # canonical channel indices in MaM's order
NUM_MODALITIES = 4
NORM_KWARGS: dict[str, Any] = {"eps": 1e-5, "affine": True}
NONLIN_KWARGS: dict[str, Any] = {"inplace": True}  # LeakyReLU default slope 0.01, as nnU-Net's plans


@dataclasses.dataclass
class MaMConfig:
    """MultimodalRecon hyper-parameters; the defaults are upstream's ``3d_fullres_multiencoder_recon``.

    Attributes:
        patch_size: side of the cubic training patch / sliding window; must be divisible by ``2**(n_stages-1)``.
        n_stages: resolution stages (strides 1, 2, 2, …); None derives nnU-Net's rule for isotropic data: halve
            until the bottleneck side is 4 (128 → 6 stages, 32 → 4 stages).
        base_features: features of stage 1 of the fused network (stage i: ``min(base·2^i, max_features)``); each
            modality encoder has a quarter of them.
        max_features: ``unet_max_num_features`` (upstream overrides nnU-Net's 320 with 512).
        num_classes: region outputs (WT, TC, ET).
        n_conv_per_stage: convolutions per encoder stage; ``n_conv_per_stage_decoder`` per decoder stage.
        kernel_size: convolution kernel side.
        heads, dim_head, mlp_dim, depth, dropout: the reconstruction transformer (vit-pytorch style).
        deep_supervision: decoder returns all resolutions in train mode (nnU-Net's switch).
    """

    patch_size: int = 128
    n_stages: int | None = None
    base_features: int = 32
    max_features: int = 512
    num_classes: int = 3
    n_conv_per_stage: int = 2
    n_conv_per_stage_decoder: int = 2
    kernel_size: int = 3
    heads: int = 4
    dim_head: int = 32
    mlp_dim: int = 256
    depth: int = 1
    dropout: float = 0.0
    deep_supervision: bool = True

    def __post_init__(self) -> None:
        if self.n_stages is None:  # nnU-Net's rule for isotropic data: pool while the side stays >= 4
            pools = 0
            while self.patch_size % 2 ** (pools + 1) == 0 and self.patch_size // 2 ** (pools + 1) >= 4:
                pools += 1
            self.n_stages = pools + 1
        if self.n_stages < 2:
            raise ValueError(f"MaM: n_stages must be >= 2, got {self.n_stages}")
        if self.patch_size % (2 ** (self.n_stages - 1)):
            raise ValueError(
                f"MaM: patch_size {self.patch_size} must be divisible by 2**(n_stages-1) = {2 ** (self.n_stages - 1)}"
            )
        if self.grid < 2:
            raise ValueError(f"MaM: the bottleneck grid must be at least 2³ (InstanceNorm), got {self.grid}³")
        if any(f % NUM_MODALITIES for f in self.features_per_stage):
            raise ValueError(f"MaM: features per stage {self.features_per_stage} must be divisible by 4")

    @property
    def features_per_stage(self) -> list[int]:
        """Fused features per stage, e.g. [32, 64, 128, 256, 512, 512]."""
        return [min(self.base_features * 2**i, self.max_features) for i in range(self.n_stages)]  # type: ignore[arg-type]

    @property
    def modality_features(self) -> list[int]:
        """Per-modality encoder features per stage (a quarter), e.g. [8, 16, 32, 64, 128, 128]."""
        return [f // NUM_MODALITIES for f in self.features_per_stage]

    @property
    def strides(self) -> list[list[int]]:
        return [[1, 1, 1]] + [[2, 2, 2]] * (self.n_stages - 1)  # type: ignore[operator]

    @property
    def grid(self) -> int:
        """Side of the bottleneck grid: ``patch_size / 2**(n_stages-1)``."""
        return self.patch_size // 2 ** (self.n_stages - 1)  # type: ignore[operator]

    def arch_kwargs(self) -> dict[str, Any]:
        """The ``architecture.arch_kwargs`` of the nnU-Net plans entry (dynamic_network_architectures style)."""
        n = self.n_stages
        return {
            "n_stages": n,
            "features_per_stage": self.features_per_stage,
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[self.kernel_size] * 3] * n,  # type: ignore[operator]
            "strides": self.strides,
            "n_conv_per_stage": [self.n_conv_per_stage] * n,  # type: ignore[operator]
            "n_conv_per_stage_decoder": [self.n_conv_per_stage_decoder] * (n - 1),  # type: ignore[operator]
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": dict(NORM_KWARGS),
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": dict(NONLIN_KWARGS),
            "patch_size": self.patch_size,
            "heads": self.heads,
            "dim_head": self.dim_head,
            "mlp_dim": self.mlp_dim,
            "depth": self.depth,
        }

    @classmethod
    def from_arch_kwargs(cls, kwargs: dict[str, Any], patch_size: Sequence[int], num_classes: int) -> MaMConfig:
        """Inverse of :meth:`arch_kwargs` for a plans entry (cubic patch, isotropic kernels and strides only)."""
        if len(set(patch_size)) != 1:
            raise ValueError(f"MaM: the plans' patch size {list(patch_size)} must be cubic")
        features = list(kwargs["features_per_stage"])
        n = int(kwargs["n_stages"])
        # The cap is only visible when it was reached; otherwise any cap >= the largest width gives these features.
        capped = max(features) < features[0] * 2 ** (n - 1)
        config = cls(
            patch_size=int(patch_size[0]),
            n_stages=n,
            base_features=int(features[0]),
            max_features=int(max(features)) if capped else max(cls.max_features, int(max(features))),
            num_classes=num_classes,
            n_conv_per_stage=int(kwargs["n_conv_per_stage"][0]),
            n_conv_per_stage_decoder=int(kwargs["n_conv_per_stage_decoder"][0]),
            kernel_size=int(kwargs["kernel_sizes"][0][0]),
            heads=int(kwargs.get("heads", 4)),
            dim_head=int(kwargs.get("dim_head", 32)),
            mlp_dim=int(kwargs.get("mlp_dim", 256)),
            depth=int(kwargs.get("depth", 1)),
        )
        if config.features_per_stage != features or config.strides != [list(s) for s in kwargs["strides"]]:
            raise ValueError(
                f"MaM: plans architecture {features} / {kwargs['strides']} is not the MaM layout "
                f"{config.features_per_stage} / {config.strides}"
            )
        return config


class MaMOutput(NamedTuple):
    """Train-mode output, upstream's 3-tuple.

    Attributes:
        seg: region logits: a list of ``(B, 3, P/2^k, …)`` from the highest resolution down (deep supervision on) or
            one ``(B, 3, P, P, P)`` tensor.
        fused: fused bottleneck ``(B, 4·C, g, g, g)`` (reconstructed features at missing modalities), MaM order.
        original: per-modality encoder bottleneck, detached, ``(B, 4, C, g, g, g)``, MaM order.
    """

    seg: list[torch.Tensor] | torch.Tensor
    fused: torch.Tensor
    original: torch.Tensor


class Attention(nn.Module):
    """Pre-LayerNorm multi-head self-attention (``norm``, ``to_qkv`` without bias, ``to_out`` = Linear + Dropout)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, dim)`` → ``(B, N, dim)``."""
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = self.dropout(self.attend(q @ k.transpose(-1, -2) * self.scale))
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """``net`` = LayerNorm, Linear(dim→mlp), GELU, Dropout, Linear(mlp→dim), Dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ReconstructionTransformer(nn.Module):
    """Learned position embedding + ``depth`` residual (attention, feed-forward) layers + final LayerNorm."""

    def __init__(self, num_tokens: int, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, num_tokens, dim))
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, dropout), FeedForward(dim, mlp_dim, dropout)])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, dim)`` tokens → ``(B, N, dim)``."""
        x = x + self.pos_embedding
        for attn, ff in self.layers:  # type: ignore[misc]
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


def _plain_encoder(in_channels: int, features: Sequence[int], config: MaMConfig) -> PlainConvEncoder:
    n = config.n_stages
    return PlainConvEncoder(
        in_channels, n, list(features), nn.Conv3d, config.kernel_size, config.strides, config.n_conv_per_stage,
        conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs=dict(NORM_KWARGS), dropout_op=None,
        nonlin=nn.LeakyReLU, nonlin_kwargs=dict(NONLIN_KWARGS), return_skips=True,
    )  # fmt: skip


@register(
    "mam",
    config=MaMConfig,
    presets={"tiny": {"patch_size": 32, "base_features": 16}},
    display="Missing-as-Masking",
    checkpoint_reader="MaM.trained_model:open_checkpoint",  # nnU-Net's fold_N/checkpoint_*.pth
)
class MultimodalRecon(SegModel):
    """MaM's network. Eval output: region logits (WT, TC, ET) ``(B, 3, P, P, P)``."""

    output_kind = OutputKind.REGION_LOGITS
    default_blend = "gaussian"  # nnU-Net's predictor
    region_order = ("WT", "TC", "ET")

    def __init__(self, config: MaMConfig | None = None) -> None:
        config = config or MaMConfig()
        super().__init__(config)
        g, c = config.grid, config.modality_features[-1]
        # Registration order = upstream's state-dict order.
        self.learned_bottleneck_tokens = nn.Parameter(torch.randn(NUM_MODALITIES, c, g, g, g))
        self.modality_specific_encoders = nn.ModuleList(
            _plain_encoder(1, config.modality_features, config) for _ in range(NUM_MODALITIES)
        )
        self.feature_reconstruction = ReconstructionTransformer(
            NUM_MODALITIES * g**3, c, config.depth, config.heads, config.dim_head, config.mlp_dim, config.dropout
        )
        # Never run: upstream builds it for the decoder's configuration; kept for state-dict parity (see module doc).
        self.encoder = _plain_encoder(NUM_MODALITIES, config.features_per_stage, config)
        self.decoder = UNetDecoder(
            self.encoder, config.num_classes, config.n_conv_per_stage_decoder, config.deep_supervision
        )
        init = InitWeights_He(1e-2)
        for module in (self.modality_specific_encoders, self.encoder, self.decoder):
            module.apply(init)

    def unused_parameter_names(self) -> list[str]:
        """Upstream's dead ``encoder`` (also reachable as ``decoder.encoder``): never run, so it gets no gradient."""
        return [name for name, _ in self.named_parameters() if name.startswith("encoder.")]

    # ------------------------------------------------------------------------------------------------- pieces

    def _check(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != NUM_MODALITIES:
            raise ValueError(f"MaM expects x of shape (B, 4, D, H, W), got {tuple(x.shape)}")
        if mask.shape != (x.shape[0], NUM_MODALITIES):
            raise ValueError(f"MaM expects a (B, 4) mask for x {tuple(x.shape)}, got {tuple(mask.shape)}")
        if not bool(mask.any(1).all()):
            raise ValueError("MaM: every sample needs at least one available modality")

    def encode_native(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Run the four modality encoders on ``x`` ``(B, 4, D, H, W)`` in MaM order.

        Returns:
            per modality (MaM order), the ``n_stages`` stage outputs ``(B, F_s/4, D/2^s, …)``.
        """
        return [enc(x[:, m : m + 1]) for m, enc in enumerate(self.modality_specific_encoders)]

    def fuse(
        self, features: Sequence[Sequence[torch.Tensor]], mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Zero missing skips, reconstruct missing bottlenecks, concatenate modality-major.

        Args:
            features: output of :meth:`encode_native`.
            mask: ``(B, 4)`` bool in MaM order, True = available.

        Returns:
            ``(skips, original)``: the fused per-stage maps ``(B, F_s, …)`` (last = fused bottleneck) and the detached
            per-modality bottleneck ``(B, 4, C, g, g, g)``.
        """
        mask = mask.to(device=features[0][0].device, dtype=torch.bool)
        n = len(features[0])
        skips = []
        for s in range(n - 1):
            maps = [
                torch.where(
                    mask[:, m].view(-1, 1, 1, 1, 1), f[s], torch.zeros((), dtype=f[s].dtype, device=f[s].device)
                )
                for m, f in enumerate(features)
            ]
            skips.append(torch.cat(maps, 1))
        bottleneck = torch.stack([f[-1] for f in features], 1)  # (B, 4, C, g, g, g)
        b, m, c, *grid = bottleneck.shape
        if tuple(grid) != tuple(self.learned_bottleneck_tokens.shape[2:]):
            raise ValueError(
                f"MaM: bottleneck grid {tuple(grid)} differs from the token grid "
                f"{tuple(self.learned_bottleneck_tokens.shape[2:])}; the input must be patch_size³ "
                f"({self.config.patch_size}³)"
            )
        present = mask.view(b, m, 1, 1, 1, 1)
        tokens = self.learned_bottleneck_tokens.to(bottleneck.dtype).unsqueeze(0).expand_as(bottleneck)
        substituted = torch.where(present, bottleneck, tokens)
        seq = substituted.permute(0, 1, 3, 4, 5, 2).reshape(b, -1, c)  # tokens ordered (modality, d, h, w)
        recon = self.feature_reconstruction(seq).reshape(b, m, *grid, c).permute(0, 1, 5, 2, 3, 4)
        fused = torch.where(present, bottleneck, recon.to(bottleneck.dtype))
        skips.append(fused.reshape(b, m * c, *grid))
        return skips, bottleneck.detach()

    def forward_native(self, x: torch.Tensor, mask: torch.Tensor) -> MaMOutput:
        """Upstream's forward with a per-sample mask: ``x`` ``(B, 4, D, H, W)`` and ``mask`` ``(B, 4)`` in MaM order."""
        skips, original = self.fuse(self.encode_native(x), mask)
        return MaMOutput(self.decoder(skips), skips[-1], original)

    # ------------------------------------------------------------------------------------------------- contract

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, *, native: bool = False, full_output: bool | None = None
    ) -> torch.Tensor | MaMOutput:
        """Segment ``x`` with the available modalities ``mask``.

        Args:
            x: ``(B, 4, D, H, W)`` float, canonical order (``native=True``: MaM order FLAIR, T1, T1ce, T2).
            mask: ``(B, 4)`` bool, True = available, in the same order as ``x``.
            native: inputs are in MaM's order (used by the nnU-Net trainer and predictor).
            full_output: return :class:`MaMOutput`; default: in train mode. Otherwise the full-resolution region
                logits ``(B, 3, D, H, W)`` (WT, TC, ET) are returned.
        """
        self._check(x, mask)
        if not native:
            x, mask = x[:, _TO_NATIVE], mask[:, _TO_NATIVE]
        out = self.forward_native(x, mask)
        if full_output if full_output is not None else self.training:
            return out
        return out.seg[0] if isinstance(out.seg, list | tuple) else out.seg

    def encode(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Modality encoders on canonical ``x`` (they do not depend on the mask): features in MaM order."""
        return self.encode_native(x[:, _TO_NATIVE])

    def decode(self, features: Sequence[Sequence[torch.Tensor]], mask: torch.Tensor) -> torch.Tensor:
        """Eval output from :meth:`encode` features and a canonical ``(B, 4)`` mask: region logits ``(B, 3, …)``."""
        mask = mask.to(features[0][0].device)
        b = features[0][0].shape[0]
        if mask.shape[0] != b:
            mask = mask.expand(b, -1)
        skips, _ = self.fuse(features, mask[:, _TO_NATIVE])
        seg = self.decoder(skips)
        return seg[0] if isinstance(seg, list | tuple) else seg


def reconstruction_loss(output: MaMOutput, mask: torch.Tensor) -> torch.Tensor:
    """Bottleneck reconstruction MSE: mean over (sample, missing modality) of MSE(reconstructed, encoder).

    Args:
        output: train output of :meth:`MultimodalRecon.forward_native`.
        mask: ``(B, 4)`` bool in MaM order (the order of ``output``).

    Returns:
        scalar float32; exactly 0 when no modality is missing (upstream's ``0 if none missing``).
    """
    b, m, c, *grid = output.original.shape
    recon = output.fused.reshape(b, m, c, *grid).float()
    per = F.mse_loss(recon, output.original.float(), reduction="none").flatten(2).mean(2)  # (B, 4)
    missing = (~mask.to(device=per.device, dtype=torch.bool)).float()
    return (per * missing).sum() / missing.sum().clamp_min(1.0)
