"""Shared fixtures: paths to the read-only reference material beside the repository (``../shared``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# The tests run many tiny 3-D convolutions, for which intra-op threads cost more than they gain (10-20x slower on a
# loaded 2-core machine); one thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; skips the calling test with a reason when it is absent (e.g. a user's clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference material {path} is absent (only present beside the development checkout)")
    return path


MASKS = [  # canonical order FLAIR, T1ce, T1, T2: one mask each with 1, 2, 3 and 4 modalities
    (False, False, True, False),
    (True, False, False, True),
    (True, True, False, True),
    (True, True, True, True),
]
