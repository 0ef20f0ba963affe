"""Evaluate an SFusion checkpoint on the test list under all 15 scenarios (upstream ``SFusion/test_sfusion.py``).

    python SFusion/test_sfusion.py --datapath <preprocessed> --resume <run>/best.pth --savepath <out>

Upstream ignored its ``--datapath``/``--resume`` (it overwrote them with hard-coded BraTS 2018 paths and list) and
labelled its per-scenario rows in the wrong modality order; here the flags count, scenarios are canonical and
correctly named, and the architecture comes from the checkpoint (for upstream checkpoints, from the weights).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from brats_core.apps.scripts import build_test_parser, test_main
from brats_core.utils.cli import run_main


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The config of an upstream SFusion state dict (which stores none).

    Upstream pools to a fixed 8³ token grid, so the first DUpsampling conv (F → F·s³, s = P/8) gives the patch.
    """
    f = int(state_dict["content_encoder_flair.unit1_0.unit.0.weight"].shape[0])
    scale = round((state_dict["fusion1.upsample.conv_3d.weight"].shape[0] / f) ** (1 / 3))
    layers = {k.split(".")[3] for k in state_dict if k.startswith("fusion1.fusion_block.layers.")}
    return {
        "patch_size": 8 * scale,
        "token_grid": 8,
        "num_cls": int(state_dict["mask_decoder.conv_seg.unit.0.weight"].shape[0]),
        "feature_maps": f,
        "style_dims": int(state_dict["style_encoder_flair.unit.0.unit.0.weight"].shape[0]),
        "style_code": int(state_dict["style_encoder_flair.unit2.unit.0.weight"].shape[0]),
        "num_layers": len(layers),
    }


def build_parser() -> argparse.ArgumentParser:
    return build_test_parser("SFusion/test_sfusion.py", __doc__.splitlines()[0])


def main(argv: Sequence[str] | None = None) -> int:
    return test_main(build_parser(), argv, "sfusion", infer_architecture)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
