"""Train IM-Fuse with upstream's older ``IMFuse/train.py``: as ``train_poly.py`` but lr 3e-4 and a cosine schedule.

    python IMFuse/train.py --datapath <preprocessed> --num_epochs 1000 --dataname BRATS2023 --savepath <run> \
        --mamba_skip --interleaved_tokenization

``CosineAnnealingLR(T_max=100, eta_min=5e-6)`` stepped once per epoch (the rate cycles every 200 epochs), always the
model without the level-1 skip (upstream's ``IMFuse_no1skip.Model``; no ``--first_skip``); everything else, flags
included, as ``train_poly.py``. The paper's runs used ``train_poly.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from brats_core.utils.cli import run_main
from IMFuse import train_poly


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and train (see the module docstring)."""
    parser = train_poly.build_parser("IMFuse/train.py", __doc__.splitlines()[0], lr=3e-4, first_skip=False)
    return train_poly.main(argv, parser, cosine=True)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
