"""Evaluate a mmFormer checkpoint on the test list under all 15 scenarios (upstream ``mmFormer/mmformer/test.py``).

    python mmFormer/test.py --datapath <preprocessed> --resume <run>/model_last.pth --savepath <out>

Upstream built its test list path inside the package (``datalist/test15splits2.csv``, absent); here it is
``--test_file`` or ``<split_dir>/test15splits.csv``. The architecture comes from the checkpoint, and for upstream
checkpoints (which store no config) from the weights' shapes.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from brats_core.apps.scripts import build_test_parser, test_main
from brats_core.utils.cli import run_main


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The config of an upstream mmFormer state dict (``module.`` prefix stripped).

    ``patch_size`` from the position table (1, (P/16)³, width); widths from the encoder, transformer and head
    weights; ``depth`` from the number of transformer layers. ``num_heads`` has no weights of its own and keeps its
    default (8, as upstream).
    """
    tokens, width = state_dict["flair_pos"].shape[1:]
    mlp_dim = state_dict["flair_transformer.cross_ffn_list.0.fn.fn.net.0.weight"].shape[0]
    prefix = "flair_transformer.cross_attention_list."
    depth = len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})
    return {
        "patch_size": round(tokens ** (1 / 3)) * 16,
        "transformer_dim": int(width),
        "mlp_dim": int(mlp_dim),
        "depth": depth,
        "basic_dims": int(state_dict["flair_encoder.e1_c1.weight"].shape[0]),
        "num_cls": int(state_dict["decoder_fuse.seg_layer.weight"].shape[0]),
    }


def build_parser() -> argparse.ArgumentParser:
    """Upstream's ``--datapath``, ``--resume`` (both required) and ``--savepath`` (default ``eval``), plus the
    shared evaluation and runtime flags."""
    return build_test_parser("mmFormer/test.py", __doc__.splitlines()[0])


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, rebuild the checkpoint's model and evaluate it (``brats_core.apps.scripts.test_main``)."""
    return test_main(build_parser(), argv, "mmformer", infer_architecture)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
