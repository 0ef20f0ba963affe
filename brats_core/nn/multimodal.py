"""The mmFormer family skeleton shared by mmFormer and IM-Fuse.

Both run, per modality, a 5-stage encoder, a 1×1 ``encode_conv`` to the token width and an intra-modal transformer
with its own learned position embedding; absent modalities are handled by zeroing their FEATURES (skips and intra
tokens), never their images; a fusion decoder produces the segmentation and, in training, a shared separate decoder
segments each modality alone. The methods differ only in how the masked features are fused (:meth:`_decode`).

The encoder part does not depend on the mask, so :meth:`encode` runs it once per window and :meth:`decode` fuses
and decodes any number of scenarios from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..modalities import MODALITIES
from ..registry import OutputKind, SegModel
from .blocks import ModalityEncoder, SeparateDecoder, Transformer

__all__ = ["ModalityFeatures", "MultimodalTransformerNet"]


class ModalityFeatures(NamedTuple):
    """Mask-independent encoder output; modality axis (dim 1) in canonical order.

    Attributes:
        x1, x2, x3, x4: skip features (B, 4, C_k, P/2^(k−1), …) with C_k = basic_dims·2^(k−1).
        x5: raw encoder bottleneck (B, 4, 16·basic_dims, P/16, …); only the separate decoder reads it.
        intra: intra-modal transformer output as maps (B, 4, transformer_dim, P/16, …).
    """

    x1: torch.Tensor
    x2: torch.Tensor
    x3: torch.Tensor
    x4: torch.Tensor
    x5: torch.Tensor
    intra: torch.Tensor


class MultimodalTransformerNet(SegModel):
    """Base class: per-modality encoders and intra-modal transformers, feature masking, train/eval outputs.

    Subclasses register their modules in upstream state-dict order with the ``_add_*`` helpers and implement
    :meth:`_decode`. The config needs ``patch_size``, ``num_cls``, ``basic_dims``, ``transformer_dim``, ``mlp_dim``,
    ``num_heads``, ``depth`` and ``dropout``.

    Train mode returns ``(fused, (4 separate), (4 deep-supervision))`` probabilities (B, num_cls, P, P, P), the
    separate ones in canonical order; eval mode returns the fused probabilities.
    """

    output_kind = OutputKind.PROBABILITIES

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.dims = [config.basic_dims * 2**s for s in range(5)]
        self.bottleneck_side = config.patch_size // 16

    # -------------------------------------------------------------------------------------------- construction
    def _transformer(self) -> Transformer:
        cfg = self.config
        return Transformer(cfg.transformer_dim, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.dropout)

    def _add_positions(self) -> None:
        """``{m}_pos`` (1, (P/16)³, width), zero-initialised, one per modality."""
        for m in MODALITIES:
            tokens = torch.zeros(1, self.bottleneck_side**3, self.config.transformer_dim)
            self.register_parameter(f"{m}_pos", nn.Parameter(tokens))

    def _add_encoders(self) -> None:
        """``{m}_encoder`` and then ``{m}_encode_conv`` (1×1, 16·basic_dims → width) for every modality."""
        for m in MODALITIES:
            setattr(self, f"{m}_encoder", ModalityEncoder(self.config.basic_dims))
        for m in MODALITIES:
            setattr(self, f"{m}_encode_conv", nn.Conv3d(self.dims[4], self.config.transformer_dim, 1))

    def _add_intra_transformers(self) -> None:
        for m in MODALITIES:
            setattr(self, f"{m}_transformer", self._transformer())

    def _add_separate_decoder(self) -> None:
        self.decoder_sep = SeparateDecoder(self.config.num_cls, self.config.basic_dims)

    # ------------------------------------------------------------------------------------------------- checks
    def _check_inputs(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        p = self.config.patch_size
        if x.ndim != 5 or x.shape[1] != len(MODALITIES) or tuple(x.shape[2:]) != (p, p, p):
            raise ValueError(f"{type(self).__name__} expects x of shape (B, 4, {p}, {p}, {p}), got {tuple(x.shape)}")
        if mask is not None:
            self._check_mask(mask, x.shape[0])

    def _check_mask(self, mask: torch.Tensor, batch: int) -> None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, len(MODALITIES)):
            raise ValueError(
                f"{type(self).__name__} expects a bool mask of shape ({batch}, 4), got {mask.dtype} {tuple(mask.shape)}"
            )

    @staticmethod
    def _masker(mask: torch.Tensor, like: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function zeroing the absent modalities of a (B, 4, C, …) stack (per sample)."""
        keep = mask.to(device=like.device)[:, :, None, None, None, None]
        return lambda t: t.masked_fill(~keep, 0.0)

    # ------------------------------------------------------------------------------------------------ forward
    def encode(self, x: torch.Tensor) -> ModalityFeatures:
        """Run the four modality encoders and intra-modal transformers (independent of the mask).

        Args:
            x: (B, 4, P, P, P) canonical channel order.

        Returns:
            :class:`ModalityFeatures`, each field stacked over the modality axis (dim 1).
        """
        self._check_inputs(x)
        per_level: list[list[torch.Tensor]] = [[] for _ in range(5)]
        intra = []
        for i, m in enumerate(MODALITIES):
            feats = getattr(self, f"{m}_encoder")(x[:, i : i + 1])
            for level, f in zip(per_level, feats, strict=True):
                level.append(f)
            t = getattr(self, f"{m}_encode_conv")(feats[4])
            grid = t.shape[2:]
            tokens = getattr(self, f"{m}_transformer")(t.flatten(2).transpose(1, 2), getattr(self, f"{m}_pos"))
            intra.append(tokens.transpose(1, 2).reshape(t.shape[0], t.shape[1], *grid))
        return ModalityFeatures(*(torch.stack(level, dim=1) for level in per_level), torch.stack(intra, dim=1))

    def _decode(
        self, features: ModalityFeatures, mask: torch.Tensor, deep_supervision: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Mask, fuse and decode: ``(fused probabilities, deep-supervision maps or ())``."""
        raise NotImplementedError

    def decode(self, features: ModalityFeatures, mask: torch.Tensor) -> torch.Tensor:
        """Fuse the available modalities' features and decode them.

        Args:
            features: output of :meth:`encode`.
            mask: (B, 4) bool, True = available, canonical order.

        Returns:
            Fused class probabilities (B, num_cls, P, P, P).
        """
        self._check_mask(mask, features.intra.shape[0])
        return self._decode(features, mask, deep_supervision=False)[0]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Segment.

        Args:
            x: (B, 4, P, P, P) float, canonical order; images of absent modalities are ignored by the fusion path.
            mask: (B, 4) bool, True = available.

        Returns:
            Eval mode: fused probabilities (B, num_cls, P, P, P). Train mode: ``(fused, separate, deep)`` with
            ``separate`` the four single-modality decoder outputs (canonical order, computed on every modality
            whatever the mask) and ``deep`` the four deep-supervision maps (heads at 1/2, 1/4, 1/8, 1/16
            resolution up-sampled to P³), all probabilities (B, num_cls, P, P, P).
        """
        self._check_inputs(x, mask)
        features = self.encode(x)
        if not self.training:
            return self._decode(features, mask, deep_supervision=False)[0]
        fused, deep = self._decode(features, mask, deep_supervision=True)
        # The shared separate decoder runs on all four modalities at once (modalities folded into the batch).
        sep = self.decoder_sep([f.flatten(0, 1) for f in features[:5]])
        return fused, tuple(sep.unflatten(0, (x.shape[0], len(MODALITIES))).unbind(1)), deep
