"""Evaluate an IM-Fuse checkpoint on the test list under all 15 scenarios (upstream ``IMFuse/test.py``).

    python IMFuse/test.py --datapath <preprocessed> --dataname BRATS2023 --savepath <out> \
        --resume <run>/model_last.pth --mamba_skip --interleaved_tokenization

The architecture comes from the checkpoint (upstream always built ``IMFuse.IMFuse`` and could not load its own
default training output); for upstream checkpoints it is inferred from the weights, and ``--interleaved_tokenization``
(which has no weights) from the flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from brats_core.apps.scripts import build_test_parser, test_main
from brats_core.utils.cli import run_main


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture of an upstream IM-Fuse state dict (which stores no config).

    ``first_skip``: only ``IMFuse.IMFuse`` has the level-1 region fusion module ``decoder_fuse.RFM1``.
    ``mamba_skip``: the level-2 RFM's first 1×1 conv reads C₂ channels with Mamba skips, 4·C₂ without.
    ``patch_size``: the bottleneck fused-token table is (1, (P/16)³, C); widths from the transformer weights.
    """
    first_skip = any(k.startswith("decoder_fuse.RFM1.") for k in state_dict)
    out_ch, in_ch = state_dict["decoder_fuse.RFM2.fusion_layer.0.conv.weight"].shape[:2]
    mamba_skip = in_ch == out_ch
    # the bottleneck MFB is the last entry of mamba_fusion_layers
    last = max(int(k.split(".")[1]) for k in state_dict if k.startswith("mamba_fusion_layers."))
    tokens = state_dict[f"mamba_fusion_layers.{last}.fused_tokens"].shape[1]
    side = round(tokens ** (1 / 3))
    mlp_dim, width = state_dict["flair_transformer.cross_ffn_list.0.fn.fn.net.0.weight"].shape
    return {
        "first_skip": first_skip,
        "mamba_skip": mamba_skip,
        "patch_size": side * 16,
        "transformer_dim": width,
        "mlp_dim": mlp_dim,
        "basic_dims": state_dict["flair_encoder.e1_c1.weight"].shape[0],
    }


ARCHITECTURE_HELP: dict[str, str] = {
    "--interleaved_tokenization": "the checkpoint was trained with I-MFB (the 5 tokens of each position interleaved); "
    "needed for upstream checkpoints, whose weights cannot tell (ours record it)",
    "--mamba_skip": "the checkpoint fuses the skip connections with Mamba fusion blocks; accepted as upstream's README "
    "passes it: the architecture is read from the checkpoint (or its weights), a flag that disagrees is ignored "
    "with a warning",
    "--first_skip": "the checkpoint is upstream's IMFuse.IMFuse (level-1 skip); accepted for compatibility: the "
    "architecture is read from the checkpoint (or its weights), a flag that disagrees is ignored with a warning",
}


def build_parser() -> argparse.ArgumentParser:
    """The shared test flags plus IM-Fuse's architecture flags (see :data:`ARCHITECTURE_HELP`)."""
    p = build_test_parser("IMFuse/test.py", __doc__.splitlines()[0])
    g = p.add_argument_group("IM-Fuse architecture")
    # default None: only flags the user gave are compared with the checkpoint's architecture
    for flag, text in ARCHITECTURE_HELP.items():
        g.add_argument(flag, action="store_true", default=None, help=text)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def given_flags(args: argparse.Namespace) -> dict[str, bool]:
        return {k: True for k in ("interleaved_tokenization", "mamba_skip", "first_skip") if getattr(args, k)}

    return test_main(build_parser(), argv, "imfuse", infer_architecture, given_flags)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
