"""Shared fixtures: paths to the read-only reference material beside the repository (``../shared``)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; skips the calling test with a reason when it is absent (e.g. a user's clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference material {path} is absent (only present beside the development checkout)")
    return path
