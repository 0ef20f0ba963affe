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

from .modalities import SCENARIOS, Mask
from .transforms import Transform

MaskSampler = Callable[[np.random.Generator], Mask]


def uniform_scenario(rng: np.random.Generator) -> Mask:
    """Upstream's training rule: one of the 15 non-empty subsets, each with probability 1/15 (§0.6)."""
    return SCENARIOS[int(rng.integers(0, 15))].mask


def volume_path(root: str | Path, case: str) -> Path:
    return Path(root) / "vol" / f"{case}_vol.npy"


def label_path(root: str | Path, case: str) -> Path:
    return Path(root) / "seg" / f"{case}_seg.npy"


def check_cases(root: str | Path, cases: Sequence[str], need_labels: bool = True) -> None:
    """Fail early, listing (up to 10) cases whose preprocessed files are missing."""
    missing = [
        str(p)
        for c in cases
        for p in ([volume_path(root, c)] + ([label_path(root, c)] if need_labels else []))
        if not p.is_file()
    ]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise FileNotFoundError(
            f"{len(missing)} preprocessed file(s) missing under {root}: {', '.join(missing[:10])}{more}; "
            f"run preprocess.py on the BraTS folder first"
        )


def load_case(root: str | Path, case: str, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Load one preprocessed case.

    Returns:
        image ``(4, H, W, D)`` float32 and label ``(H, W, D)`` int64 (None when absent or not requested).
    """
    vol = np.load(volume_path(root, case), mmap_mode="r")
    if vol.ndim != 4 or vol.shape[-1] != 4:
        raise ValueError(f"{volume_path(root, case)}: expected (H, W, D, 4), got {vol.shape}")
    image = np.ascontiguousarray(np.moveaxis(vol, -1, 0), dtype=np.float32)
    lp = label_path(root, case)
    label = np.load(lp).astype(np.int64) if with_label and lp.is_file() else None
    return image, label


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(case index, sample seed)`` for one epoch of ``num_samples`` samples.

    Upstream's loader repeats shuffled passes over the training set forever and an epoch is N_train optimiser steps
    (§0.8), so an epoch generally spans several passes; this sampler concatenates seeded permutations to the
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
        vol = np.load(volume_path(self.root, self.cases[index]), mmap_mode="r")
        label = np.load(label_path(self.root, self.cases[index]), mmap_mode="r")
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
    """Seed numpy and ``random`` in a loader worker from torch's per-worker seed (upstream's rule, §0.6)."""
    import random

    seed = torch.initial_seed() % (2**32 - 1)
    np.random.seed(seed)
    random.seed(seed)
