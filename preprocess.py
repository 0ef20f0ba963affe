"""Preprocess a BraTS folder into ``<out>/vol``, ``<out>/seg``, ``<out>/meta`` (see ``brats_core.data.preprocessing``).

Usage: ``python preprocess.py --input-path RAW --output-path OUT [--workers 4] [--reference-quirks]``.
"""

import sys

from brats_core.data.preprocessing import main
from brats_core.utils.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
