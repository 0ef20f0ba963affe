"""M3AE's own input pipeline, cached once so that training never re-reads NIfTI.

Upstream normalises the raw NIfTI files of every case at every load (:mod:`m3ae.preprocessing`: per modality,
clip to the [1st, 99th] percentiles of the voxels > 0, then min-max scale the whole volume to [0, 1]; crop to the
bounding box of the non-zero voxels with a one-voxel margin below). Here :func:`preprocess_dataset` does this once
per case and writes the ``brats_core`` layout, so the shared evaluator and
loaders read it like any preprocessed folder:

- ``<cache>/vol/<case>_vol.npy``: float32 ``(H, W, D, 4)``, channels FLAIR, T1ce, T1, T2, values in [0, 1];
- ``<cache>/seg/<case>_seg.npy``: uint8 labels 0..3;
- ``<cache>/meta/<case>.json``: the crop box in the original grid (the absolute position that indexes the
  completion image), the original shape and affine (``--save_nifti`` writes predictions back), ``"pipeline":
  "m3ae"``. Written last, so its presence marks a finished case; finished cases are skipped when re-run.

Training samples (:class:`PretrainDataset`, :class:`FinetuneDataset`) are ``patch_size``³ windows placed in the
ORIGINAL image grid: along an axis where the box is at least a window long, a uniform start inside the box; where it
is shorter, a uniform start among the windows that contain the whole box and lie inside the grid (upstream pads the
short box with zeros on a random split of both sides; outside the box the image is zero, so reading the window from
the grid is the same thing, with the window's grid position known exactly). Each sample carries that position
(``origin``), which is where the completion image is cropped, in training and at inference alike.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from brats_core.data.dataset import check_cases, label_path, volume_path
from brats_core.data.preprocessing import case_meta, list_cases, output_paths, read_case_images
from brats_core.data.transforms import RandomFlip, RandomIntensityChange
from brats_core.utils.cli import run_main
from brats_core.utils.io import (
    CaseFilesError,
    NiftiError,
    find_case_files,
    load_json,
    load_npy,
    npy_intact,
    remove_stale_temporaries,
    save_json,
    save_npy,
)
from m3ae.preprocessing import PIPELINE, preprocess_arrays, sample_modality_drop, sample_pretrain_tokens

# ---------------------------------------------------------------------------------------------------------------------
# The cache


def is_finished(cache: str | Path, case: str) -> bool:
    """True when the case's metadata (written by this pipeline) and its intact volume (and label map) exist; a
    truncated file (a killed copy) counts as unfinished, so the case is written again."""
    paths = output_paths(cache, case)
    if not (paths.meta.is_file() and npy_intact(paths.vol)):
        return False
    try:
        meta = load_json(paths.meta)
    except ValueError:
        return False
    return meta.get("pipeline") == PIPELINE and (npy_intact(paths.seg) or not meta.get("has_label"))


def preprocess_case(case_dir: str | Path, cache: str | Path, overwrite: bool = False) -> str:
    """Normalise, crop and write one case folder; returns ``"written"``, ``"skipped"`` or ``"failed: reason"``."""
    case = Path(case_dir).name
    if not overwrite and is_finished(cache, case):
        return "skipped"
    try:
        files = find_case_files(case_dir)
        images, label, affine = read_case_images(files)
        vol, seg, array_meta = preprocess_arrays(images, label)
    except (CaseFilesError, NiftiError, ValueError) as err:
        return f"failed: {err}"
    paths = output_paths(cache, case)
    paths.meta.unlink(missing_ok=True)  # the old "finished" marker goes first
    save_npy(paths.vol, vol)
    if seg is not None:
        save_npy(paths.seg, seg)
    save_json(paths.meta, {**case_meta(files, affine, array_meta, seg is not None), "pipeline": PIPELINE})
    return "written"


def preprocess_dataset(
    raw: str | Path,
    cache: str | Path,
    cases: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """Build (or complete) the cache for ``cases`` (default: every case folder of ``raw``).

    Returns:
        case → status. Raises ``RuntimeError`` listing the failed cases, if any.
    """
    raw, cache = Path(raw), Path(cache)
    if not raw.is_dir():
        raise FileNotFoundError(f"BraTS folder {raw} not found")
    names = list(cases) if cases is not None else list_cases(raw)
    for sub in ("vol", "seg", "meta"):  # what runs killed while writing the cache left (logged)
        remove_stale_temporaries(cache / sub)
    absent = [c for c in names if not (raw / c).is_dir()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} case folder(s) missing in {raw}: {', '.join(absent[:10])}")
    todo = [c for c in names if overwrite or not is_finished(cache, c)]
    status = {c: "skipped" for c in names if c not in todo}
    bar = tqdm(total=len(todo), desc="m3ae preprocessing", unit="case", disable=not progress or not todo)
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            for case, result in zip(
                todo,
                pool.map(preprocess_case, [raw / c for c in todo], [cache] * len(todo), [overwrite] * len(todo)),
                strict=True,
            ):
                status[case] = result
                bar.update(1)
    else:
        for case in todo:
            status[case] = preprocess_case(raw / case, cache, overwrite)
            bar.update(1)
    bar.close()
    failed = {c: s for c, s in status.items() if s.startswith("failed")}
    if failed:
        raise RuntimeError("m3ae preprocessing failed for: " + "; ".join(f"{c} ({s[8:]})" for c, s in failed.items()))
    return status


def ensure_cache(cache: str | Path, cases: Sequence[str], raw: str | Path | None, workers: int = 1) -> None:
    """Check that ``cases`` are cached by this pipeline; build the missing ones from ``raw`` when it is given."""
    if raw is not None:
        preprocess_dataset(raw, cache, cases, workers)
    absent = [c for c in cases if not is_finished(cache, c)]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} case(s) are not in the M3AE cache {cache} (e.g. {absent[0]}); M3AE needs its own "
            f"normalisation and each case's crop position: run `python -m m3ae.data --input-path <BraTS folder> "
            f"--output-path {cache}` or pass --raw_path <BraTS folder>"
        )


def case_box(cache: str | Path, case: str) -> tuple[tuple[int, int], ...]:
    """The cached case's crop box in the original grid, ``((x0, x1), (y0, y1), (z0, z1))``."""
    meta = load_json(output_paths(cache, case).meta)
    return tuple((int(lo), int(hi)) for lo, hi in meta["crop_box"])


def original_shape(cache: str | Path, case: str) -> tuple[int, int, int]:
    meta = load_json(output_paths(cache, case).meta)
    return tuple(int(s) for s in meta["original_shape"])  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------------
# Training windows


def window_start(lo: int, hi: int, dim: int, size: int, rng: np.random.Generator) -> int:
    """Start of a training window along one axis, in the original grid (see the module docstring).

    Args:
        lo, hi: the crop box along the axis (half-open).
        dim: the grid size along the axis.
        size: the window size.
    """
    if hi - lo >= size:
        return lo + int(rng.integers(0, hi - lo - size + 1))
    first, last = hi - size, lo  # every window containing [lo, hi)
    if dim >= size:
        first, last = max(first, 0), min(last, dim - size)
    return int(rng.integers(first, last + 1))


def read_window(
    source: np.ndarray, source_origin: Sequence[int], start: Sequence[int], size: int, fill: float = 0.0
) -> np.ndarray:
    """The ``size``³ window at ``start`` of an array placed at ``source_origin`` in the grid; ``fill`` elsewhere.

    Args:
        source: ``(X, Y, Z, ...)``.
        source_origin: grid position of ``source[0, 0, 0]``.
        start: grid position of the window.

    Returns:
        ``(size, size, size, ...)`` of ``source``'s dtype.
    """
    out = np.full((size, size, size, *source.shape[3:]), fill, dtype=source.dtype)
    dst, src = [], []
    for s, o, n in zip(start, source_origin, source.shape[:3], strict=True):
        lo, hi = max(s, o), min(s + size, o + n)
        if hi <= lo:
            return out
        dst.append(slice(lo - s, hi - s))
        src.append(slice(lo - o, hi - o))
    out[tuple(dst)] = source[tuple(src)]
    return out


class _WindowDataset(Dataset):
    """Cached cases → ``patch_size``³ training windows with their grid position; indexed by ``(case, seed)``."""

    def __init__(self, root: str | Path, cases: Sequence[str], patch_size: int) -> None:
        check_cases(root, cases)
        self.root, self.cases, self.patch_size = Path(root), list(cases), int(patch_size)
        self.boxes = [case_box(root, c) for c in self.cases]
        self.shapes = [original_shape(root, c) for c in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def window(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image (X, Y, Z, 4) float32, label (X, Y, Z) int64, origin (3,) int64)`` of one random window."""
        case, box = self.cases[index], self.boxes[index]
        start = [
            window_start(lo, hi, d, self.patch_size, rng) for (lo, hi), d in zip(box, self.shapes[index], strict=True)
        ]
        lower = [lo for lo, _ in box]
        vol = load_npy(volume_path(self.root, case), mmap=True, what="volume")
        image = read_window(vol, lower, start, self.patch_size).astype(np.float32)
        seg_file = label_path(self.root, case)
        seg = (
            load_npy(seg_file, mmap=True, what="label map") if seg_file.is_file() else np.zeros(vol.shape[:3], np.uint8)
        )
        label = read_window(seg, lower, start, self.patch_size).astype(np.int64)
        return image, label, np.asarray(start, dtype=np.int64)


class PretrainDataset(_WindowDataset):
    """Stage 1 samples: a window of the four modalities, its grid position and its token mask.

    Item: ``image`` (4, P, P, P) float32 canonical, ``origin`` (3,) int64, ``tokens`` (4, g, g, g) bool (True =
    visible; :func:`m3ae.preprocessing.sample_pretrain_tokens`), ``name``. No augmentation, as upstream.
    """

    def __init__(
        self, root: str | Path, cases: Sequence[str], patch_size: int, grid: int, visible: int, mdp: int = 3
    ) -> None:
        super().__init__(root, cases, patch_size)
        self.grid, self.visible, self.mdp = grid, visible, mdp

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        rng = np.random.default_rng(seed)
        image, _, origin = self.window(index, rng)
        tokens = sample_pretrain_tokens(rng, self.grid, self.visible, self.mdp)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0))),
            "origin": torch.from_numpy(origin),
            "tokens": torch.from_numpy(tokens),
            "name": self.cases[index],
        }


class FinetuneDataset(_WindowDataset):
    """Stage 2 samples: ONE window replicated ``copies`` times, each copy with its own modality drop.

    Dropped channels are filled with the frozen completion image at the window's grid position, then the copies get
    the SAME intensity change and flips (upstream augments after completion, with shared random factors).

    Item: ``image`` (copies, 4, P, P, P) float32 (already completed), ``label`` (P, P, P) int64, ``mask``
    (copies, 4) bool (the drops, for logging), ``origin`` (3,) int64, ``name``.
    """

    def __init__(
        self,
        root: str | Path,
        cases: Sequence[str],
        patch_size: int,
        completion: np.ndarray,
        copies: int = 2,
        mdp: int = 3,
    ) -> None:
        super().__init__(root, cases, patch_size)
        if completion.ndim != 4 or completion.shape[-1] != 4:
            raise ValueError(f"completion image must be (X, Y, Z, 4), got {completion.shape}")
        self.completion, self.copies, self.mdp = completion, int(copies), int(mdp)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        rng = np.random.default_rng(seed)
        image, label, origin = self.window(index, rng)
        fill = read_window(self.completion, (0, 0, 0), origin.tolist(), self.patch_size)
        masks = [sample_modality_drop(rng, self.mdp) for _ in range(self.copies)]
        copies = [np.where(np.asarray(m), image, fill) for m in masks]
        intensity_seed = int(rng.integers(0, 2**63 - 1))
        # upstream augments (Z, Y, X, C) arrays: its per-first-axis factors vary along Z, axis 2 of this window
        change = RandomIntensityChange(0.1, 0.1, axis=2)
        copies = [change(c, None, np.random.default_rng(intensity_seed))[0] for c in copies]
        # one flip draw for all copies and the label: flip the copies stacked along the channel axis
        stacked, label = RandomFlip()(np.concatenate(copies, axis=-1), label, rng)
        stacked = np.moveaxis(stacked.reshape(*stacked.shape[:3], self.copies, 4), (3, 4), (0, 1))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
            "mask": torch.tensor(masks, dtype=torch.bool),
            "origin": torch.from_numpy(origin),
            "name": self.cases[index],
        }


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m m3ae.data --input-path <BraTS folder> --output-path <cache> [--cases …] [--workers N]``."""
    p = argparse.ArgumentParser(prog="python -m m3ae.data", description=__doc__.splitlines()[0])
    p.add_argument("--input-path", "--input_path", dest="input_path", required=True, help="BraTS folder (NIfTI)")
    p.add_argument("--output-path", "--output_path", dest="output_path", required=True, help="cache folder")
    p.add_argument("--cases", nargs="+", default=None, help="only these case ids")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--overwrite", action="store_true", help="redo finished cases")
    args = p.parse_args(argv)
    try:
        status = preprocess_dataset(args.input_path, args.output_path, args.cases, args.workers, args.overwrite)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    written = sum(s == "written" for s in status.values())
    print(f"m3ae preprocessing: {len(status)} cases, {written} written, {len(status) - written} already cached")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
