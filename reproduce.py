"""Print, run or write as SLURM scripts every method's command sequence with the paper's settings (see
``brats_core.apps.reproduce``).

Usage: ``python reproduce.py --datapath PRE --raw RAW --runs runs/ [--method imfuse] [--run] [--slurm DIR] [--smoke]``.
"""

import sys

from brats_core.apps.reproduce import main
from brats_core.utils.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
