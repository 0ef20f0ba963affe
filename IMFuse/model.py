"""IM-Fuse (MICCAI 2025): mmFormer with Mamba fusion of the modality tokens.

One class covers both upstream classes: ``first_skip=False`` is ``IMFuse_no1skip.Model`` (what ``train_poly.py``
trains by default), ``first_skip=True`` is ``IMFuse.IMFuse`` (what upstream ``test.py`` builds). With the paper config
the state-dict keys, their order and shapes equal upstream's state dict, so
upstream checkpoints (``module.`` prefix stripped) load strictly. Every token count derives from ``patch_size``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from brats_core.modalities import MODALITIES
from brats_core.nn.blocks import FusionDecoder, init_conv3d_kaiming
from brats_core.nn.fusion import MambaFusionBlock
from brats_core.nn.multimodal import ModalityFeatures, MultimodalTransformerNet
from brats_core.registry import RUNTIME_FIELD, register

__all__ = ["IMFuse", "IMFuseConfig", "IMFuseFeatures", "MambaShape", "mamba_shapes", "meta_model"]


@dataclasses.dataclass
class IMFuseConfig:
    """IM-Fuse hyper-parameters; the defaults are the paper/upstream values.

    Attributes:
        num_cls: output classes (BraTS labels 0..3).
        patch_size: side of the cubic input patch; a multiple of 16, at least 32. Fixes the token counts: the
            bottleneck has (patch_size/16)³ tokens, skip level k has (patch_size/2^(k−1))³ positions.
        first_skip: True → upstream ``IMFuse.IMFuse`` (level-1 skip in the fusion decoder); False →
            ``IMFuse_no1skip.Model`` (the upstream training default).
        mamba_skip: fuse the skip connections with Mamba fusion blocks instead of concatenating masked features.
        interleaved_tokenization: I-MFB layout (the five tokens of each position consecutive).
        basic_dims: channels of encoder stage 1 (stages: 1, 2, 4, 8, 16 times this).
        transformer_dim: token dimension of the intra/inter transformers and the bottleneck MFB.
        mlp_dim: hidden size of the transformer feed-forward networks.
        num_heads: attention heads.
        depth: transformer layers.
        dropout: transformer dropout rate.
        d_state_max: Mamba state size is ``min(C, d_state_max)``.
        d_conv: Mamba causal-conv width.
        expand: Mamba inner expansion.
        mamba_backend: scan backend passed to :class:`brats_core.nn.mamba.Mamba` (``"auto"`` picks the best).
    """

    num_cls: int = 4
    patch_size: int = 128
    first_skip: bool = False
    mamba_skip: bool = False
    interleaved_tokenization: bool = False
    basic_dims: int = 8
    transformer_dim: int = 512
    mlp_dim: int = 4096
    num_heads: int = 8
    depth: int = 1
    dropout: float = 0.1
    d_state_max: int = 256
    d_conv: int = 4
    expand: int = 2
    mamba_backend: str = dataclasses.field(default="auto", metadata=RUNTIME_FIELD)

    def __post_init__(self) -> None:
        # Four stride-2 stages need a multiple of 16; a 1³ bottleneck breaks InstanceNorm and reflect padding.
        if self.patch_size % 16 or self.patch_size < 32:
            raise ValueError(f"IM-Fuse patch_size must be a multiple of 16 and >= 32, got {self.patch_size}")
        if self.transformer_dim % self.num_heads:
            raise ValueError(f"transformer_dim {self.transformer_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def bottleneck_side(self) -> int:
        """Side of the encoder bottleneck grid (patch_size / 16)."""
        return self.patch_size // 16

    @property
    def skip_levels(self) -> tuple[int, ...]:
        """Skip levels (1 = full resolution) that the fusion decoder consumes."""
        return (1, 2, 3, 4) if self.first_skip else (2, 3, 4)

    @property
    def mfb_levels(self) -> tuple[int, ...]:
        """Levels of the entries of ``mamba_fusion_layers`` (5 = bottleneck, always last), as upstream builds them."""
        # Upstream's no-first-skip class drops the level-1 MFB only when mamba_skip is on; otherwise all 5 exist.
        return (2, 3, 4, 5) if (self.mamba_skip and not self.first_skip) else (1, 2, 3, 4, 5)


IMFuseFeatures = ModalityFeatures  # the mask-independent encoder output (see brats_core.nn.multimodal)


@dataclasses.dataclass(frozen=True)
class MambaShape:
    """One entry of ``mamba_fusion_layers``: its ``level`` (5 = bottleneck), token width ``d_model``, ``d_state``,
    ``tokens`` per modality and the length ``L`` of the sequence its Mamba scans (4 modality token sets + the fused
    tokens); ``name`` as in the benchmark tables (``skip 128³``, ``bottleneck 8³``)."""

    name: str
    level: int
    d_model: int
    d_state: int
    tokens: int
    L: int


def mamba_shapes(config: IMFuseConfig) -> list[MambaShape]:
    """The Mamba fusion blocks of a configuration, in the order of ``mamba_fusion_layers``."""
    dims = [config.basic_dims * 2**s for s in range(5)]
    shapes = []
    for level in config.mfb_levels:
        dim = config.transformer_dim if level == 5 else dims[level - 1]
        side = config.bottleneck_side if level == 5 else config.patch_size // 2 ** (level - 1)
        name = f"bottleneck {side}³" if level == 5 else f"skip {side}³"
        L = (len(MODALITIES) + 1) * side**3
        shapes.append(MambaShape(name, level, dim, min(dim, config.d_state_max), side**3, L))
    return shapes


@register(
    "imfuse",
    config=IMFuseConfig,
    presets={"tiny": {"patch_size": 32, "basic_dims": 4, "transformer_dim": 64, "mlp_dim": 128}},
    display="IM-Fuse",
)
class IMFuse(MultimodalTransformerNet):
    """IM-Fuse network.

    ``model(x, mask)`` with x (B, 4, P, P, P) in canonical order (FLAIR, T1ce, T1, T2) and mask (B, 4) bool
    (True = available). Absent modalities are handled by zeroing their features (skips and intra tokens), not their
    images. Train mode (``model.train()``) returns ``(fused, (4 separate), (4 deep-supervision))`` probabilities,
    all (B, num_cls, P, P, P), the separate ones in canonical order; eval mode returns the fused probabilities.

    Args:
        config: see :class:`IMFuseConfig`.
    """

    def __init__(self, config: IMFuseConfig | None = None) -> None:
        config = config if config is not None else IMFuseConfig()
        super().__init__(config)
        cfg = config
        dims = [cfg.basic_dims * 2**s for s in range(5)]
        width = cfg.transformer_dim
        side = cfg.bottleneck_side

        def mfb(shape: MambaShape) -> MambaFusionBlock:
            return MambaFusionBlock(
                shape.d_model,
                shape.tokens,
                num_modalities=len(MODALITIES),
                interleaved=cfg.interleaved_tokenization,
                d_state_max=cfg.d_state_max,
                d_conv=cfg.d_conv,
                expand=cfg.expand,
                backend=cfg.mamba_backend,
            )

        # Registration order below reproduces the upstream state-dict order (own parameters come first anyway).
        self._add_positions()
        self.fused_pos = nn.Parameter(torch.zeros(1, side**3, width))
        self._add_encoders()
        if cfg.first_skip:
            # Dead: upstream IMFuse.IMFuse builds these but never calls them; kept for state-dict compatibility.
            for m in MODALITIES:
                setattr(self, f"{m}_decode_conv", nn.Conv3d(width, dims[4], 1))
        self._add_intra_transformers()
        # Dead: upstream builds a second bottleneck MFB and fuses with mamba_fusion_layers[-1] instead; kept for
        # state-dict compatibility.
        shapes = mamba_shapes(cfg)
        self.mamba_fusion_layer = mfb(shapes[-1])  # the bottleneck's shape (level 5, always last)
        self.multimodal_transformer = self._transformer()
        self.multimodal_decode_conv = nn.Conv3d(width, len(MODALITIES) * dims[4], 1)
        # Without mamba_skip the skip MFBs are dead (the masked concatenations go straight to the decoder); upstream
        # still builds them, so they are kept for state-dict compatibility.
        self.mamba_fusion_layers = nn.ModuleList(mfb(shape) for shape in shapes)
        skip_mult = 1 if cfg.mamba_skip else len(MODALITIES)
        self.decoder_fuse = FusionDecoder(
            cfg.num_cls, cfg.basic_dims, (skip_mult,) * 4 + (len(MODALITIES),), first_skip=cfg.first_skip
        )
        self._add_separate_decoder()
        init_conv3d_kaiming(self, negative_slope=0.01, zero_bias=True)

    def unused_parameter_names(self) -> list[str]:
        """Names of the parameters that never take part in ``forward`` (upstream's dead parameters).

        Useful for DDP (``find_unused_parameters``) or to exclude them from an optimiser.
        """
        cfg = self.config
        prefixes = ["mamba_fusion_layer."]
        if cfg.first_skip:
            prefixes += [f"{m}_decode_conv." for m in MODALITIES]
        if not cfg.mamba_skip:
            prefixes += [f"mamba_fusion_layers.{i}." for i in range(len(cfg.mfb_levels) - 1)]
        return [name for name, _ in self.named_parameters() if name.startswith(tuple(prefixes))]

    def _decode(
        self, features: IMFuseFeatures, mask: torch.Tensor, deep_supervision: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        cfg = self.config
        masked = self._masker(mask, features.intra)

        skips: list[torch.Tensor | None] = []
        for level, feats in zip((1, 2, 3, 4), features[:4], strict=True):
            if level not in cfg.skip_levels:
                skips.append(None)  # upstream computes the level-1 concatenation here and never uses it
            elif cfg.mamba_skip:
                skips.append(self.mamba_fusion_layers[cfg.mfb_levels.index(level)](masked(feats)))
            else:
                skips.append(masked(feats).flatten(1, 2))  # (B, 4·C_k, …), modality-major
        fused = self.mamba_fusion_layers[-1](masked(features.intra))  # (B, D, s, s, s)
        b, width, *grid = fused.shape
        inter = self.multimodal_transformer(fused.flatten(2).transpose(1, 2), self.fused_pos)
        skips.append(self.multimodal_decode_conv(inter.transpose(1, 2).reshape(b, width, *grid)))
        return self.decoder_fuse(skips, deep_supervision=deep_supervision)


def meta_model(config: IMFuseConfig | None = None, **overrides: object) -> IMFuse:
    """Build IM-Fuse on the meta device: keys, shapes and counts without allocating the parameters.

    Args:
        config: base config (paper defaults when None).
        **overrides: config fields to replace, e.g. ``first_skip=True``.

    Returns:
        An :class:`IMFuse` whose parameters are meta tensors (not runnable; use it for inspection only).
    """
    cfg = dataclasses.replace(config if config is not None else IMFuseConfig(), **overrides)
    with torch.device("meta"):
        return IMFuse(cfg)
