"""RobustSeg / Robust-MSeg (Chen et al., MICCAI 2019) as reproduced in IM-Fuse's benchmark.

Feature disentanglement (a style and a content encoder per modality), content zeroed for missing modalities, gated
fusion at four scales, a segmentation decoder and (training only) four AdaIN image decoders. The pieces shared with
SFusion live in :mod:`brats_core.nn.rmbts`; this file holds RobustSeg's :class:`~brats_core.nn.rmbts.Flavour`,
its state-dict :class:`~brats_core.nn.rmbts.Layout`, the gated fusion and the config.

Channel and mask order: canonical (FLAIR, T1ce, T1, T2), which is also upstream's. State-dict keys, order and shapes
equal upstream's ``RobustSeg(num_cls=4)`` at the paper patch of 80³.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from brats_core.nn.rmbts import Contents, ConvSpec, Flavour, Layout, RMBTSNet
from brats_core.registry import RUNTIME_OUTPUT_FIELD, register

FLAVOUR = Flavour(
    conv=ConvSpec("reflect", norm_eps=1e-6, act_slope=0.2),
    style_conv=ConvSpec("reflect", norm_eps=None, act_slope=0.0),
    style_down_padding=1,
    content_dropout=(0.3, 0.3, 0.3, 0.0),
    decoder_conv=ConvSpec("reflect"),
    up_conv=ConvSpec("zeros"),
    mlp_act_slope=0.0,
    decoder_act_slope=0.0,
    adain_eps=1e-5,
    spatial_layer_norm=True,
    up_norm_eps=1e-6,
    align_corners=True,
)
"""RobustSeg's conv blocks and decoders."""

LAYOUT = Layout(
    nested=False,
    style_convs="c_{i0}",
    style_head="se_logit",
    content=("e{s}_c1", "e{s}_c2", "e{s}_c3"),
    mlp=("linear_0", "linear_1", "mu", "sigma"),
    mlp_first=True,
    res="res_{i0}",
    up_conv="conv_{i0}",
    up_norm="layer_norm_{i1}",
    final="G_logit",
    seg=("d{k}_c1", "d{k}_c2", "d{k}_out"),
    seg_logit="seg_logit",
)
"""Upstream's key names (``se_flair.c_0.conv.weight``, ``image_de_t1.layer_norm_3.weight``, ``mask_de.d3_c1…``)."""

# upstream's modality suffixes, in its registration order (= canonical order)
_SUFFIX = {"flair": "flair", "t1ce": "t1c", "t1": "t1", "t2": "t2"}


@dataclass
class RobustSegConfig:
    """RobustSeg's architecture (paper defaults).

    Attributes:
        patch_size: training patch side P (80); a multiple of 8, at least 16. Fixes the image decoders' spatial
            LayerNorm shapes ([P/4]³, [P/2]³, [P]³); inference windows may be any multiple of 8.
        num_cls: output classes.
        basic_dims: content channels at full resolution (16; then 32, 64, 128).
        style_dims: channels of the style encoder's first conv (32; then 64, 128, 128, 128).
        style_code: style-code width (8).
        inference_dropout: upstream's always-on dropout (p 0.3 in the content encoders' stages 1–3) stays active in
            eval mode, making predictions stochastic (``--reference-quirks``). A runtime field: a model rebuilt from a
            checkpoint starts without it (``predict.py`` is deterministic), and ``test_robustseg.py`` sets it from its
            own ``--reference-quirks``.
    """

    patch_size: int = 80
    num_cls: int = 4
    basic_dims: int = 16
    style_dims: int = 32
    style_code: int = 8
    inference_dropout: bool = dataclasses.field(default=False, metadata=RUNTIME_OUTPUT_FIELD)


@register(
    "robustseg",
    config=RobustSegConfig,
    presets={"tiny": {"patch_size": 32, "basic_dims": 4, "style_dims": 8}},
    display="RobustSeg",
)
class RobustSeg(RMBTSNet):
    """RobustSeg with the canonical contract: ``model(x (B, 4, P, P, P), mask (B, 4) bool)``.

    Eval mode returns class probabilities (B, num_cls, P, P, P); train mode the dict described in
    :class:`~brats_core.nn.rmbts.RMBTSNet`. Missing modalities: their content is multiplied by 0 at every scale
    (per sample); the gated fusion then concatenates the four contents.
    """

    flavour = FLAVOUR
    layout = LAYOUT

    def __init__(self, config: RobustSegConfig) -> None:
        super().__init__(config)
        p, c = config.patch_size, config.basic_dims
        if p % 8 or p < 16:
            raise ValueError(f"robustseg: patch_size must be a multiple of 8 and >= 16, got {p}")
        self.add_style_encoders({m: f"se_{s}" for m, s in _SUFFIX.items()}, config.style_dims, config.style_code)
        self.add_content_encoders({m: f"ce_{s}" for m, s in _SUFFIX.items()}, c)
        dims = [c * 2**s for s in range(4)]
        for s, d in enumerate(dims, start=1):
            self.add_module(f"att_c{s}", FLAVOUR.conv.build(4 * d, 4, 3))
        for s, d in enumerate(dims, start=1):
            self.add_module(f"fusion_c{s}", FLAVOUR.conv.build(4 * d, d, 1))
        self.add_image_decoders({m: f"image_de_{s}" for m, s in _SUFFIX.items()}, dims[3], config.style_code, p // 8)
        self.add_seg_decoder("mask_de", c, config.num_cls)
        self._init_weights()
        self.set_inference_dropout(config.inference_dropout)

    @torch.no_grad()
    def _init_weights(self) -> None:
        # upstream: Kaiming-normal (PyTorch's default arguments) on every Conv3d and Linear weight; biases default
        for m in self.modules():
            if isinstance(m, nn.Conv3d | nn.Linear) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight)

    def set_inference_dropout(self, enabled: bool) -> None:
        """Keep the content encoders' dropout active in eval mode (upstream's ``F.dropout(training=True)``) or not."""
        self.config = dataclasses.replace(self.config, inference_dropout=bool(enabled))
        for name in self._content_names.values():
            for m in self.get_submodule(name).modules():
                if hasattr(m, "dropout_at_inference"):
                    m.dropout_at_inference = bool(enabled)

    @property
    def missing_content_invariant(self) -> bool | str:
        """True, or why eval outputs may change when a missing channel's content changes."""
        if self.config.inference_dropout:
            return "inference dropout (--reference-quirks) makes every eval forward stochastic"
        return True

    def check_spatial(self, shape: tuple[int, ...]) -> None:
        """Any multiple of 8 (≥ 16) in eval; exactly the patch in training (the image decoders' LayerNorms)."""
        super().check_spatial(shape)
        p = self.patch_size
        if self.training and tuple(shape) != (p, p, p):
            raise ValueError(f"robustseg: training input must be {p}³ (the patch_size), got {tuple(shape)}")

    def fuse(self, contents: Contents, mask: torch.Tensor) -> list[torch.Tensor]:
        """Zero the missing modalities' content, gate each modality and fuse with a 1×1 conv, per scale.

        Args:
            contents: per canonical modality, 4 scales (B, C_s, …).
            mask: (B, 4) bool.

        Returns:
            4 fused scales (B, C_s, …).
        """
        keep = mask.to(contents[0][0].dtype)
        fused = []
        for s in range(4):
            masked = [contents[i][s] * keep[:, i, None, None, None, None] for i in range(4)]
            gate = torch.sigmoid(getattr(self, f"att_c{s + 1}")(torch.cat(masked, dim=1)))
            gated = torch.cat([masked[i] * gate[:, i : i + 1] for i in range(4)], dim=1)
            fused.append(getattr(self, f"fusion_c{s + 1}")(gated))
        return fused


def meta_model(**overrides: object) -> RobustSeg:
    """The paper-size model on the meta device (no memory, no forward): for key/shape/count checks."""
    with torch.device("meta"):
        return RobustSeg(RobustSegConfig(**overrides))  # type: ignore[arg-type]
