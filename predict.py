"""Segment new patients with a trained checkpoint; see ``brats_core.predict`` (``python predict.py -h``)."""

from brats_core.cli import run_main
from brats_core.predict import main

if __name__ == "__main__":
    raise SystemExit(run_main(main))
