"""Segment new patients with a trained checkpoint; see ``brats_core.predict`` (``python predict.py -h``)."""

from brats_core.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
