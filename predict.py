"""Segment new patients with a trained checkpoint; see ``brats_core.apps.predict`` (``python predict.py -h``)."""

from brats_core.apps.predict import main
from brats_core.utils.cli import run_main

if __name__ == "__main__":
    raise SystemExit(run_main(main))
