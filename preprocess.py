"""Preprocess a BraTS folder into ``<out>/vol``, ``<out>/seg``, ``<out>/meta`` (see ``brats_core.preprocessing``).

Usage: ``python preprocess.py --input-path RAW --output-path OUT [--workers 4] [--reference-quirks]``.
"""

import sys

from brats_core.cli import run_main
from brats_core.preprocessing import main

if __name__ == "__main__":
    sys.exit(run_main(main))
