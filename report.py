"""Merge the evaluation outputs of several runs into the paper's table and figures (see ``brats_core.report``).

Usage: ``python report.py --run imfuse=runs/imfuse/test --run mmformer=runs/mmformer/test --out report/``.
"""

import sys

from brats_core.cli import run_main
from brats_core.report import main

if __name__ == "__main__":
    sys.exit(run_main(main))
