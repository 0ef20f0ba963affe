"""Evaluate a U-HVED checkpoint on the test list under all 15 scenarios (upstream ``UHVED/test_uhved.py``).

    python UHVED/test_uhved.py --datapath <preprocessed> --resume <run>/best.pth --savepath <out>

Scenario names come from the canonical masks (upstream fed its FLAIR, T1ce, T1, T2 label list to a model that reads
masks as T1, T1ce, T2, FLAIR, so its per-scenario rows were mislabelled, and it wrote them to
``output_RobustSeg<epoch>.txt``); the 15-scenario mean is unaffected. Upstream checkpoints (no stored config) are
evaluated with the paper's 112³ window.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from brats_core.apps.scripts import build_test_parser, test_main
from brats_core.utils.cli import run_main


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture of an upstream U-HVED state dict: base width from the first 1×1 conv, classes from the
    segmentation head (the patch size has no weights; the config default, 112, applies)."""
    return {
        "base_features": int(state_dict["flair_encoder.conv1.weight"].shape[0]),
        "num_cls": int(state_dict["seg_decoder.conv_out.weight"].shape[0]),
    }


def build_parser() -> argparse.ArgumentParser:
    return build_test_parser("UHVED/test_uhved.py", __doc__.splitlines()[0])


def main(argv: Sequence[str] | None = None) -> int:
    return test_main(build_parser(), argv, "uhved", infer_architecture)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
