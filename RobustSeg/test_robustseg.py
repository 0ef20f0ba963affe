"""Evaluate a RobustSeg checkpoint on the test list under all 15 scenarios (upstream ``RobustSeg/test_robustseg.py``).

    python RobustSeg/test_robustseg.py --datapath <preprocessed> --resume <run>/best.pth --savepath <out>

Upstream hard-coded the data, list and checkpoint paths; here they are flags. The architecture comes from the
checkpoint, or for upstream checkpoints from the weights' shapes. ``--reference-quirks`` keeps upstream's dropout
active at inference (stochastic predictions, as the published numbers were produced).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from brats_core.apps.scripts import build_test_parser, test_main
from brats_core.registry import SegModel
from brats_core.utils.cli import run_main

log = logging.getLogger("RobustSeg.test_robustseg")


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The config of an upstream RobustSeg state dict (which stores none).

    ``patch_size`` from the image decoder's last spatial LayerNorm ([P, P, P]); channel widths from the first convs.
    """
    return {
        "patch_size": int(state_dict["image_de_flair.layer_norm_3.weight"].shape[0]),
        "num_cls": int(state_dict["mask_de.seg_logit.conv.weight"].shape[0]),
        "basic_dims": int(state_dict["ce_flair.e1_c1.conv.weight"].shape[0]),
        "style_dims": int(state_dict["se_flair.c_0.conv.weight"].shape[0]),
        "style_code": int(state_dict["se_flair.se_logit.conv.weight"].shape[0]),
    }


def build_parser() -> argparse.ArgumentParser:
    return build_test_parser("RobustSeg/test_robustseg.py", __doc__.splitlines()[0])


def _inference_dropout(model: SegModel, args: argparse.Namespace) -> None:
    # an inference-time behaviour, not part of the weights: this command decides, whatever the training run used
    model.set_inference_dropout(args.reference_quirks)  # type: ignore[operator]
    if args.reference_quirks:
        log.info("--reference-quirks: dropout stays active at inference (stochastic predictions, as upstream)")


def main(argv: Sequence[str] | None = None) -> int:
    return test_main(build_parser(), argv, "robustseg", infer_architecture, prepare=_inference_dropout)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
