"""Shared fixtures: paths to the read-only reference material beside the repository (``../shared``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# The tests run many tiny 3-D convolutions, for which intra-op threads cost more than they gain (10-20x slower on a
# loaded 2-core machine); one thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """Scripts run in-process configure the root logger (``logging.basicConfig(force=True)``) with a handler on the
    test's captured stderr; restored after each test, so that no later test logs into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of ours: the tiny IM-Fuse preset, untrained (seed 0), with its method and config recorded."""
    from brats_core.registry import build_method, config_dict
    from brats_core.utils.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_method("imfuse", "tiny")
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(path, model, method="imfuse", config=config_dict(model))
    return path


@pytest.fixture(scope="module")
def two_raw_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BraTS folder of two synthetic cases (40×44×36, BraTS 2023 naming), written once per module: copy it
    (``shutil.copytree``) before changing anything in it."""
    from brats_core.data.synthetic import write_synthetic_dataset

    raw = tmp_path_factory.mktemp("base") / "raw"
    write_synthetic_dataset(raw, 2, (40, 44, 36), seed=0)
    return raw
