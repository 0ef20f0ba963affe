"""Merge the evaluation outputs of several runs into the paper's table and figures (see ``brats_core.apps.report``).

Usage: ``python report.py --run imfuse=runs/imfuse/test --run mmformer=runs/mmformer/test --out report/``.
"""

import sys

from brats_core.apps.report import main
from brats_core.utils.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
