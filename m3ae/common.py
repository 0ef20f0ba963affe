"""Command-line pieces shared by M3AE's three scripts (``pretrain.py``, ``train.py``, ``test.py``)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from brats_core.registry import method_info

log = logging.getLogger("m3ae")


def pretrain_preset(size: str) -> str:
    """The registry preset of stage 1 (pre-training) at a model size: ``paper`` → ``pretrain``, ``tiny`` →
    ``tiny_pretrain``."""
    return "pretrain" if size == "paper" else f"{size}_pretrain"


def model_sizes() -> list[str]:
    """``--preset`` choices of ``pretrain.py`` and ``train.py``: the registry's M3AE presets except the stage-1 ones,
    which ``pretrain.py`` derives from the size (:func:`pretrain_preset`)."""
    presets = method_info("m3ae").presets
    stage1 = {pretrain_preset(p) for p in presets}
    return [p for p in presets if p not in stage1]


# Leftovers of the Swin-Transformer training template that all three upstream scripts carry (never read there).
TEMPLATE_FLAGS: tuple[tuple[Sequence[str], dict], ...] = (
    (["--cfg"], {"default": None}),
    (["--zip"], {"action": "store_true"}),
    (["--cache-mode", "--cache_mode"], {"dest": "cache_mode", "default": None}),
    (["--accumulation-steps", "--accumulation_steps"], {"dest": "accumulation_steps", "type": int}),
    (["--use-checkpoint", "--use_checkpoint"], {"dest": "use_checkpoint", "action": "store_true"}),
    (["--amp-opt-level", "--amp_opt_level"], {"dest": "amp_opt_level", "default": None}),
    (["--tag"], {"default": None}),
    (["--eval"], {"action": "store_true"}),
    (["--throughput"], {"action": "store_true"}),
)


def add_compat_flags(parser: argparse.ArgumentParser, flags: Sequence[tuple[Sequence[str], dict]]) -> None:
    """Upstream flags that have no effect here (``flags`` plus :data:`TEMPLATE_FLAGS`), accepted so that upstream
    command lines keep working.

    Args:
        flags: ``(option strings, add_argument keyword arguments)`` per script-specific flag.
    """
    g = parser.add_argument_group("accepted for compatibility with upstream's command line (no effect)")
    for names, kwargs in (*flags, *TEMPLATE_FLAGS):
        g.add_argument(*names, **{"help": "no effect here", **kwargs})


def reject_variants(parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: dict[str, object]) -> None:
    """Upstream flags whose other values select variants that are not re-implemented (data fractions,
    semi-supervision, class weights, a skipped start): their defaults are accepted, anything else is an error
    rather than a silently different run."""
    for dest, default in defaults.items():
        value = getattr(args, dest)
        if value != default:
            parser.error(
                f"--{dest} {value}: upstream's variant with this setting is not re-implemented (only the default, "
                f"{default}, which the upstream README uses)"
            )


def add_m3ae_data_flags(parser: argparse.ArgumentParser) -> None:
    """``--raw_path`` (build the M3AE cache from NIfTI on the fly) and upstream's ``-j`` for ``--workers``."""
    parser.add_argument(
        "--raw_path",
        default=None,
        help="BraTS folder (NIfTI); cases missing from the --datapath cache are preprocessed into it first",
    )
    # a second spelling of --workers (from brats_core.apps.arguments.add_runtime_args); SUPPRESS keeps that default
    parser.add_argument("-j", dest="workers", type=int, default=argparse.SUPPRESS, help="same as --workers")
    parser.add_argument("--devices", default=None, help="CUDA_VISIBLE_DEVICES for this run (upstream: '0')")
    parser.add_argument("--exp_name", default=None, help="run name: --savepath defaults to runs/<exp_name>")


def apply_devices(devices: str | None) -> None:
    """Upstream's ``--devices`` sets ``CUDA_VISIBLE_DEVICES``; an already exported value is respected."""
    if devices is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    elif devices is not None:
        log.info("CUDA_VISIBLE_DEVICES=%s is set; --devices %s ignored", os.environ["CUDA_VISIBLE_DEVICES"], devices)


def default_savepath(args: argparse.Namespace, default_exp: str, sub: str = "") -> None:
    """``--savepath`` defaults to ``runs/<exp_name>[/sub]`` as upstream's ``runs/<exp>/`` layout."""
    if args.exp_name is None:
        args.exp_name = default_exp
    if args.savepath is None:
        args.savepath = str(Path("runs") / args.exp_name / sub) if sub else str(Path("runs") / args.exp_name)
