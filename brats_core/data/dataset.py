"""Datasets over the preprocessed layout ``<root>/vol/<case>_vol.npy`` (H, W, D, 4) and ``<root>/seg/<case>_seg.npy``.

Training samples are addressed by ``(case index, sample seed)`` pairs produced by :class:`EpochSampler`, so the
augmentation and the scenario of every sample are a pure function of (run seed, epoch, position): identical with
any number of loader workers, and reproducible when a run is resumed mid-epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from brats_core.data.transforms import Transform
from brats_core.modalities import SCENARIOS, Mask
from brats_core.utils.cli import UsageError
from brats_core.utils.io import NpyError, load_npy, npy_intact

MaskSampler = Callable[[np.random.Generator], Mask]


def uniform_scenario(rng: np.random.Generator) -> Mask:
    """Upstream's training rule: one of the 15 non-empty subsets, each with probability 1/15."""
    return SCENARIOS[int(rng.integers(0, 15))].mask


def volume_path(root: str | Path, case: str) -> Path:
    return Path(root) / "vol" / f"{case}_vol.npy"


def label_path(root: str | Path, case: str) -> Path:
    return Path(root) / "seg" / f"{case}_seg.npy"


def _case_of(path: str | Path) -> str:
    """The case id of a ``<case>_vol.npy`` / ``<case>_seg.npy`` path."""
    return Path(path).name.removesuffix(".npy").removesuffix("_vol").removesuffix("_seg")


def _listing(paths: Sequence[Path]) -> str:
    more = f" (and {len(paths) - 10} more)" if len(paths) > 10 else ""
    return ", ".join(map(str, paths[:10])) + more


def check_cases(root: str | Path, cases: Sequence[str], need_labels: bool = True) -> None:
    """Fail early, listing (up to 10) cases whose preprocessed files are missing or truncated.

    Reads only the ``.npy`` headers and sizes (see ``io.npy_intact``), so checking every case before a run starts
    costs a fraction of a second even for the full data set.

    Raises:
        FileNotFoundError: files are missing.
        NpyError: files are truncated or damaged (a killed preprocessing, a failed copy).
    """
    files = [p for c in cases for p in ([volume_path(root, c)] + ([label_path(root, c)] if need_labels else []))]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} preprocessed file(s) missing under {root}: {_listing(missing)}; "
            f"run preprocess.py on the BraTS folder first"
        )
    damaged = [p for p in files if not npy_intact(p)]
    if damaged:
        names = " ".join(dict.fromkeys(_case_of(p) for p in damaged[:10]))
        raise NpyError(
            f"{len(damaged)} preprocessed file(s) under {root} are truncated or damaged: {_listing(damaged)}; "
            f"re-create them, e.g. with preprocess.py --overwrite --cases {names}"
        )


def check_validation_cases(
    root: str | Path,
    cases: Sequence[str],
    list_file: str | Path,
    hint: str = "add validation cases to it",
    check_files: bool = True,
) -> None:
    """Before a run that validates: its validation list must name cases, and (``check_files``) their files must be
    there and intact (an empty list averages to a NaN score and never writes ``best.pth``; a missing case would stop
    the run only at the first validation, after a wasted epoch).

    Raises:
        UsageError: the list is empty (``hint`` says what to do).
        FileNotFoundError, NpyError: see :func:`check_cases`.
    """
    if not cases:
        raise UsageError(
            f"{list_file} lists no validation cases, but this run validates (best.pth is chosen by the validation "
            f"score): {hint}"
        )
    if check_files:
        check_cases(root, cases)


def check_finite(image: np.ndarray, path: str | Path) -> None:
    """Refuse a volume holding NaN or infinite values, which would turn every loss and Dice score into NaN.

    Raises:
        NpyError: naming ``path`` and how many values are not finite.
    """
    bad = np.size(image) - int(np.count_nonzero(np.isfinite(image)))
    if bad:
        raise NpyError(
            f"{path}: {bad} NaN or infinite value(s) in the volume: re-create it, e.g. with preprocess.py "
            f"--overwrite --cases {_case_of(path)}, or remove the case from the list"
        )


def load_case(root: str | Path, case: str, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Load one preprocessed case.

    Returns:
        image ``(4, H, W, D)`` float32 and label ``(H, W, D)`` int64 (None when absent or not requested).

    Raises:
        FileNotFoundError, NpyError: the volume is missing, truncated, not ``(H, W, D, 4)`` or not finite (a NaN
            would make every score NaN; the check costs milliseconds against seconds of inference).
    """
    path = volume_path(root, case)
    vol = load_npy(path, mmap=True, what="volume")
    if vol.ndim != 4 or vol.shape[-1] != 4:
        raise NpyError(f"{path}: expected a volume of shape (H, W, D, 4), got {vol.shape}")
    image = np.ascontiguousarray(np.moveaxis(vol, -1, 0), dtype=np.float32)
    check_finite(image, path)
    lp = label_path(root, case)
    label = load_npy(lp, what="label map").astype(np.int64) if with_label and lp.is_file() else None
    return image, label


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(case index, sample seed)`` for one epoch of ``num_samples`` samples.

    Upstream's loader repeats shuffled passes over the training set forever and an epoch is N_train optimiser steps,
    so an epoch generally spans several passes; this sampler concatenates seeded permutations to the
    requested length. ``set_epoch`` selects the stream; ``skip`` drops the first samples (resume mid-epoch);
    ``rank``/``world_size`` shard the stream for DDP.
    """

    def __init__(self, num_cases: int, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if num_cases <= 0:
            raise ValueError("empty training set")
        self.num_cases, self.num_samples, self.seed = num_cases, num_samples, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def stream(self) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.num_samples * self.world_size
        order = np.concatenate([rng.permutation(self.num_cases) for _ in range(-(-total // self.num_cases))])[:total]
        seeds = rng.integers(0, 2**63 - 1, size=total)
        pairs = list(zip(order.tolist(), seeds.tolist(), strict=True))
        return pairs[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.stream()[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class TrainDataset(Dataset):
    """Random patches of training cases with one scenario mask each.

    Item: ``image`` (4, P, P, P) float32, ``label`` (P, P, P) int64 (−1 where the reference-quirks rotation fills
    it), ``mask`` (4,) bool, ``name``.
    """

    def __init__(
        self,
        root: str | Path,
        cases: Sequence[str],
        transform: Transform,
        mask_sampler: MaskSampler = uniform_scenario,
    ) -> None:
        check_cases(root, cases)
        self.root, self.cases = Path(root), list(cases)
        self.transform, self.mask_sampler = transform, mask_sampler

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        rng = np.random.default_rng(seed)
        vol = load_npy(volume_path(self.root, self.cases[index]), mmap=True, what="volume")
        label = load_npy(label_path(self.root, self.cases[index]), mmap=True, what="label map")
        image, label = self.transform(vol, label, rng)
        mask = self.mask_sampler(rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
            "mask": torch.tensor(mask, dtype=torch.bool),
            "name": self.cases[index],
        }


class EvalDataset(Dataset):
    """Full preprocessed volumes with their split-file mask.

    Item: ``image`` (4, H, W, D) float32, ``label`` (H, W, D) int64 or None, ``mask`` (4,) bool, ``name``.
    """

    def __init__(self, root: str | Path, rows: Sequence[tuple[str, Mask]], need_labels: bool = True) -> None:
        check_cases(root, [c for c, _ in rows], need_labels)
        self.root, self.rows = Path(root), list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        case, mask = self.rows[index]
        image, label = load_case(self.root, case)
        return {
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(label) if label is not None else None,
            "mask": torch.tensor(mask, dtype=torch.bool),
            "name": case,
        }


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a loader worker from torch's per-worker seed (upstream's rule)."""
    import random

    seed = torch.initial_seed() % (2**32 - 1)
    np.random.seed(seed)
    random.seed(seed)
