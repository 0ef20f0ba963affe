"""mmFormer (Zhang et al., MICCAI 2022): modality encoders, intra- and inter-modal transformers.

With the paper config the state-dict keys, their order and shapes equal upstream's state dict
(36,391,760 parameters), so upstream checkpoints (``module.`` prefix stripped) load strictly. Every token count
derives from ``patch_size``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from brats_core.modalities import MODALITIES
from brats_core.nn.blocks import FusionDecoder, init_conv3d_kaiming
from brats_core.nn.multimodal import ModalityFeatures, MultimodalTransformerNet
from brats_core.registry import register

__all__ = ["MMFormer", "MMFormerConfig", "MMFormerFeatures", "meta_model"]


@dataclasses.dataclass
class MMFormerConfig:
    """mmFormer hyper-parameters; the defaults are the paper/upstream values.

    Attributes:
        num_cls: output classes (BraTS labels 0..3).
        patch_size: side of the cubic input patch; a multiple of 16, at least 32. The bottleneck has
            (patch_size/16)³ tokens per modality.
        basic_dims: channels of encoder stage 1 (stages: 1, 2, 4, 8, 16 times this).
        transformer_dim: token dimension of the intra- and inter-modal transformers.
        mlp_dim: hidden size of the transformer feed-forward networks.
        num_heads: attention heads.
        depth: layers per transformer.
        dropout: transformer dropout rate.
    """

    num_cls: int = 4
    patch_size: int = 128
    basic_dims: int = 8
    transformer_dim: int = 512
    mlp_dim: int = 4096
    num_heads: int = 8
    depth: int = 1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        # Four stride-2 stages need a multiple of 16; a 1³ bottleneck breaks InstanceNorm and reflect padding.
        if self.patch_size % 16 or self.patch_size < 32:
            raise ValueError(f"mmFormer patch_size must be a multiple of 16 and >= 32, got {self.patch_size}")
        if self.transformer_dim % self.num_heads:
            raise ValueError(f"transformer_dim {self.transformer_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def bottleneck_side(self) -> int:
        """Side of the encoder bottleneck grid (patch_size / 16)."""
        return self.patch_size // 16


MMFormerFeatures = ModalityFeatures  # the mask-independent encoder output (see brats_core.nn.multimodal)


@register(
    "mmformer",
    config=MMFormerConfig,
    presets={"tiny": {"patch_size": 32, "basic_dims": 4, "transformer_dim": 64, "mlp_dim": 128}},
    display="mmFormer",
)
class MMFormer(MultimodalTransformerNet):
    """mmFormer network.

    ``model(x, mask)`` with x (B, 4, P, P, P) in canonical order (FLAIR, T1ce, T1, T2) and mask (B, 4) bool
    (True = available). Absent modalities are handled by zeroing their features (skips and intra tokens), not their
    images. Train mode (``model.train()``) returns ``(fused, (4 separate), (4 deep-supervision))`` probabilities,
    all (B, num_cls, P, P, P), the separate ones in canonical order; eval mode returns the fused probabilities.
    ``encode(x)`` / ``decode(features, mask)`` split the mask-independent encoder from the fusion.

    Args:
        config: see :class:`MMFormerConfig`.
    """

    def __init__(self, config: MMFormerConfig | None = None) -> None:
        config = config if config is not None else MMFormerConfig()
        super().__init__(config)
        n_mod = len(MODALITIES)
        # Registration order reproduces the upstream state-dict order.
        self._add_positions()
        self._add_encoders()
        self._add_intra_transformers()
        # The inter-modal transformer reuses the four modality position embeddings (no parameter of its own).
        self.multimodal_transformer = self._transformer()
        self.multimodal_decode_conv = nn.Conv3d(n_mod * config.transformer_dim, n_mod * self.dims[4], 1)
        self.decoder_fuse = FusionDecoder(config.num_cls, config.basic_dims, (n_mod,) * 5, first_skip=True)
        self._add_separate_decoder()
        # Upstream: torch's default kaiming_normal_ (a=0, fan_in, gain √2) on Conv3d weights, biases left at default.
        init_conv3d_kaiming(self, negative_slope=0.0, zero_bias=False)

    def _decode(
        self, features: ModalityFeatures, mask: torch.Tensor, deep_supervision: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Mask, fuse with the inter-modal transformer and decode.

        Args:
            features: output of :meth:`encode`.
            mask: (B, 4) bool, True = available.
            deep_supervision: also return the four deep-supervision maps.

        Returns:
            ``(probs, deep)``: fused probabilities (B, num_cls, P, P, P) and the deep-supervision maps (or ``()``).
        """
        masked = self._masker(mask, features.intra)
        # (B, 4·C_k, …), modality-major
        skips: list[torch.Tensor | None] = [masked(f).flatten(1, 2) for f in features[:4]]
        # Inter-modal tokens: the four masked intra token sets (positions row-major) one after the other,
        # (B, 4N, width), with the four modality position embeddings concatenated the same way.
        tokens = masked(features.intra).flatten(3).transpose(2, 3).flatten(1, 2)
        pos = torch.cat([getattr(self, f"{m}_pos") for m in MODALITIES], dim=1)
        inter = self.multimodal_transformer(tokens, pos)
        # Upstream reinterprets the (B, 4N, width) memory as (B, s, s, s, 4·width): grid position q receives tokens
        # 4q..4q+3, i.e. neighbouring positions of ONE modality, not the four modalities at q. Spatially scrambled,
        # but it is what upstream (and its checkpoints) computes, so it is kept.
        s = self.bottleneck_side
        inter_map = inter.reshape(inter.shape[0], s, s, s, -1).permute(0, 4, 1, 2, 3)
        skips.append(self.multimodal_decode_conv(inter_map))
        return self.decoder_fuse(skips, deep_supervision=deep_supervision)


def meta_model(config: MMFormerConfig | None = None, **overrides: object) -> MMFormer:
    """Build mmFormer on the meta device: keys, shapes and counts without allocating the parameters.

    Args:
        config: base config (paper defaults when None).
        **overrides: config fields to replace, e.g. ``patch_size=64``.

    Returns:
        An :class:`MMFormer` whose parameters are meta tensors (not runnable; use it for inspection only).
    """
    cfg = dataclasses.replace(config if config is not None else MMFormerConfig(), **overrides)
    with torch.device("meta"):
        return MMFormer(cfg)
