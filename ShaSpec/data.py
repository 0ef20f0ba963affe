"""ShaSpec's own input pipeline, built on ``brats_core`` readers.

Upstream reads raw NIfTI with nibabel at every step. Here :func:`prepare_cache` reads each raw BraTS case once,
applies ShaSpec's normalisation (:func:`ShaSpec.preprocessing.normalise_modality`: histogram clip, z-score over the
non-background voxels, background 0) and writes it in the project's preprocessed layout (``<cache>/vol/<case>_vol.npy``
``(X, Y, Z, 4)`` float32 in canonical order, ``<cache>/seg/<case>_seg.npy`` uint8), uncropped like upstream, so the
shared evaluator (``brats_core.engine.evaluation``) reads the very same arrays. :class:`ShaSpecTrainDataset` then draws
upstream's training crops: optional scaling, foreground-biased or random crop, mirroring, and the batchgenerators
augmentation (the installed ``batchgenerators`` transforms with upstream's parameters), plus the ``--mode`` modality
mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    BrightnessTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from skimage.transform import resize
from torch.utils.data import Dataset

from brats_core.data.dataset import MaskSampler, check_cases, label_path, volume_path
from brats_core.data.preprocessing import case_meta, output_paths
from brats_core.modalities import METHOD_ORDERS, MODALITIES, Mask, parse_shaspec_mode, to_canonical
from brats_core.utils.cli import UsageError
from brats_core.utils.io import (
    find_case_files,
    load_json,
    load_nifti,
    load_npy,
    npy_intact,
    remove_stale_temporaries,
    save_json,
    save_npy,
)
from ShaSpec.preprocessing import PIPELINE, normalise_modality

log = logging.getLogger(__name__)
X_MARGIN, Y_MARGIN = 15, 10  # upstream's random-crop margins along H (x) and W (y)


def resolve_case_dir(data_dir: str | Path, entry: str) -> Path:
    """A list entry (upstream: an absolute cluster path; here also a case id or a path relative to ``data_dir``)
    → the case folder: the entry itself when it exists, else ``<data_dir>/<entry>``, else ``<data_dir>/<name>``."""
    entry = entry.strip().rstrip("/")
    for candidate in (Path(entry), Path(data_dir) / entry, Path(data_dir) / Path(entry).name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"case folder for list entry {entry!r} not found (tried it as is and under {data_dir})")


def prepare_cache(data_dir: str | Path, entries: Sequence[str], cache_dir: str | Path) -> list[str]:
    """Normalise raw BraTS cases once into ``cache_dir`` (skipping cases already there).

    Args:
        data_dir: folder holding the case folders (BraTS 2023 or legacy naming).
        entries: list entries (case ids or case folder paths).
        cache_dir: output folder (``vol/``, ``seg/``).

    Returns:
        The case ids, in order.

    Raises:
        UsageError: ``cache_dir`` holds a case prepared by another pipeline.
    """
    for sub in ("vol", "seg", "meta"):  # what runs killed while writing the cache left (logged)
        remove_stale_temporaries(Path(cache_dir) / sub)
    cases = []
    for entry in entries:
        case_dir = resolve_case_dir(data_dir, entry)
        case = case_dir.name
        cases.append(case)
        paths = output_paths(cache_dir, case)
        # a truncated array (a killed run, a failed copy) is written again
        if npy_intact(paths.vol) and npy_intact(paths.seg) and paths.meta.is_file():
            found = load_json(paths.meta).get("pipeline")
            if found == PIPELINE:
                continue
            # e.g. --cache_dir pointed at a preprocess.py folder: cropped and otherwise normalised, never reused
            raise UsageError(
                f"{paths.meta}: {cache_dir} holds case {case} prepared by "
                f"{f'the {found} pipeline' if found else 'preprocess.py'}, not ShaSpec's: choose another --cache_dir"
            )
        files = find_case_files(case_dir, require_label=True)
        loaded = [load_nifti(files.images[m]) for m in MODALITIES]
        channels = [normalise_modality(data) for data, _, _ in loaded]
        label = load_nifti(files.label, dtype=None)[0].astype(np.uint8)
        label[label == 4] = 3  # BraTS ≤ 2020 ET label (no-op for 2023)
        save_npy(paths.vol, np.stack(channels, axis=-1).astype(np.float32))
        save_npy(paths.seg, label)
        # The whole volume is kept (no crop): the metadata lets the shared evaluator write predictions as NIfTI in
        # the source geometry (eval.py --save_nifti).
        shape = [int(n) for n in label.shape]
        array_meta = {"original_shape": shape, "crop_box": [[0, n] for n in shape], "cropped_shape": shape,
                      "channels": list(MODALITIES), "available": list(MODALITIES), "has_label": True,
                      "pipeline": PIPELINE}  # fmt: skip
        save_json(paths.meta, case_meta(files, loaded[0][1], array_meta, True))
        log.info("cached %s", case)
    return cases


def label_to_shaspec_regions(label: np.ndarray) -> np.ndarray:
    """Labels ``(...)`` → uint8 regions ``(3, ...)`` in ShaSpec's head order ET, WT, TC."""
    return np.stack([label == 3, label >= 1, (label == 1) | (label == 3)]).astype(np.uint8)


def to_native(a: np.ndarray) -> np.ndarray:
    """``(C, X, Y, Z)`` → upstream's ``(C, D=z, H=x, W=y)``."""
    return np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))


def from_native(a: np.ndarray) -> np.ndarray:
    """``(C, D, H, W)`` → ``(C, X, Y, Z)``."""
    return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))


def random_mode_mask(rng: np.random.Generator) -> Mask:
    """Upstream's ``--mode random``: k ~ U{1..4} present modalities, then a uniform k-subset (canonical mask)."""
    k = int(rng.integers(1, 5))
    present = rng.permutation(4)[:k]
    native = [i in present for i in range(4)]
    return to_canonical(native, METHOD_ORDERS["shaspec"])


def mode_sampler(mode: str) -> MaskSampler:
    """``--mode`` → a function ``rng -> canonical mask``: ``random`` or a fixed present-index list like ``0,1,2,3``."""
    if mode.strip().lower() == "random":
        return random_mode_mask
    mask = parse_shaspec_mode(mode)
    return lambda rng: mask


def crop_start(
    rng: np.random.Generator, shape: Sequence[int], crop: Sequence[int], regions: np.ndarray, fg_prob: float = 0.5
) -> list[int]:
    """Upstream's crop corner in ``(D, H, W)``: with ``fg_prob`` centred on a random foreground voxel of a random
    region channel (a random crop when that channel is empty), else random with margins 15 (H) and 10 (W); always
    shifted to lie inside the volume."""
    limits = [max(0, s - c) for s, c in zip(shape, crop, strict=True)]
    if rng.random() < fg_prob:
        channel = regions[int(rng.integers(0, regions.shape[0]))]
        voxels = np.argwhere(channel)
        if len(voxels):
            centre = voxels[int(rng.integers(0, len(voxels)))]
            return [int(min(max(c - s // 2, 0), lim)) for c, s, lim in zip(centre, crop, limits, strict=True)]
    starts = []
    for lim, margin in zip(limits, (0, X_MARGIN, Y_MARGIN), strict=True):
        lo, hi = (margin, lim - margin) if lim - 2 * margin >= 0 else (0, lim)
        starts.append(int(rng.integers(lo, hi + 1)))
    return starts


def mirror(rng: np.random.Generator, image: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """No flip with probability 0.3, else one of the 7 non-empty combinations of the 3 spatial axes (0.1 each)."""
    if rng.random() < 0.3:
        return image, regions
    combo = int(rng.integers(1, 8))
    axes = tuple(1 + a for a in range(3) if combo >> a & 1)
    return np.flip(image, axes), np.flip(regions, axes)


def batchgenerators_augmentation(patch: Sequence[int]) -> Compose:
    """Upstream's batchgenerators pipeline for ``(D, H, W)`` patches, with the installed transforms."""
    angle = (-15.0 / 360 * 2 * math.pi, 15.0 / 360 * 2 * math.pi)
    return Compose(
        [
            SpatialTransform(
                tuple(patch), patch_center_dist_from_border=[p // 2 for p in patch],
                do_elastic_deform=True, alpha=(0.0, 900.0), sigma=(9.0, 13.0),
                do_rotation=True, angle_x=angle, angle_y=angle, angle_z=angle,
                do_scale=True, scale=(0.85, 1.25), border_mode_data="constant", border_cval_data=0, order_data=3,
                border_mode_seg="constant", border_cval_seg=-1, order_seg=1, random_crop=True,
                p_el_per_sample=0.2, p_scale_per_sample=0.2, p_rot_per_sample=0.2,
            ),
            GaussianNoiseTransform(p_per_sample=0.1),
            GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5),
            BrightnessMultiplicativeTransform((0.75, 1.25), p_per_sample=0.15),
            BrightnessTransform(0.0, 0.1, True, p_per_sample=0.15, p_per_channel=0.5),
            ContrastAugmentationTransform(p_per_sample=0.15),
            SimulateLowResolutionTransform(
                zoom_range=(0.5, 1.0), per_channel=True, p_per_channel=0.5, order_downsample=0, order_upsample=3,
                p_per_sample=0.25,
            ),
            GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.15),
            MirrorTransform(axes=(0, 1, 2)),
        ]
    )  # fmt: skip


class ShaSpecTrainDataset(Dataset):
    """Training crops of cached cases, addressed by ``(case index, sample seed)``
    (``brats_core.data.dataset.EpochSampler``).

    Item: ``image`` ``(4, X, Y, Z)`` float32 canonical order, ``regions`` ``(3, X, Y, Z)`` float32 (ET, WT, TC; −1
    where the spatial transform's border reaches the label under ``reference_quirks``), ``mask`` ``(4,)`` bool,
    ``name``. The crop is ``input_size`` = ``(D, H, W)`` in upstream's layout, i.e. ``(H, W, D)`` = ``(X, Y, Z)``
    here.

    batchgenerators draws from numpy's global generator, which is re-seeded from the sample seed, so a sample is a
    pure function of its seed (upstream applies the same transforms in its collate function, per batch).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        cases: Sequence[str],
        input_size: Sequence[int],
        mode: str = "0,1,2,3",
        random_scale: bool = False,
        random_mirror: bool = False,
        augment: bool = True,
        reference_quirks: bool = False,
    ) -> None:
        self.root, self.cases = Path(cache_dir), list(cases)
        check_cases(self.root, self.cases)
        self.input_size = tuple(int(s) for s in input_size)
        self.sample_mask = mode_sampler(mode)
        self.random_scale, self.random_mirror = random_scale, random_mirror
        self.augmentation = batchgenerators_augmentation(self.input_size) if augment else None
        self.reference_quirks = reference_quirks

    def __len__(self) -> int:
        return len(self.cases)

    def _crop(self, rng: np.random.Generator, image: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = np.array(self.input_size)
        scaled = size
        if self.random_scale and rng.random() < 0.5:
            scaled = np.minimum(np.round(size * rng.uniform(0.9, 1.1)).astype(int), image.shape[1:])
        pad = [(0, 0)] + [(0, max(0, s - d)) for s, d in zip(scaled, image.shape[1:], strict=True)]
        if any(p[1] for p in pad):  # a volume smaller than the crop: pad with the background value 0
            image, regions = np.pad(image, pad), np.pad(regions, pad)
        start = crop_start(rng, image.shape[1:], scaled, regions)
        box = (slice(None), *(slice(s, s + c) for s, c in zip(start, scaled, strict=True)))
        image, regions = image[box], regions[box]
        if tuple(scaled) != self.input_size:
            out = (image.shape[0], *self.input_size)
            image = resize(image, out, order=1, mode="edge", anti_aliasing=False, preserve_range=True)
            regions = resize(
                regions, (regions.shape[0], *self.input_size), order=0, mode="edge", anti_aliasing=False,
                preserve_range=True,
            )  # fmt: skip
        return image.astype(np.float32), regions.astype(np.float32)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        rng = np.random.default_rng(seed)
        case = self.cases[index]
        vol = load_npy(volume_path(self.root, case), mmap=True, what="volume")
        label = load_npy(label_path(self.root, case), mmap=True, what="label map")
        image = to_native(np.moveaxis(np.asarray(vol, dtype=np.float32), -1, 0))
        regions = to_native(label_to_shaspec_regions(np.asarray(label)))
        image, regions = self._crop(rng, image, regions)
        if self.random_mirror:
            image, regions = mirror(rng, image, regions)
        if self.augmentation is not None:
            np.random.seed(int(rng.integers(0, 2**32 - 1)))
            out = self.augmentation(data=np.ascontiguousarray(image[None]), seg=np.ascontiguousarray(regions[None]))
            image, regions = out["data"][0], out["seg"][0]
            if not self.reference_quirks:  # upstream feeds the −1 border label to the BCE loss
                regions = np.clip(regions, 0, 1)
        mask = self.sample_mask(rng)
        return {
            "image": torch.from_numpy(from_native(image.astype(np.float32))),
            "regions": torch.from_numpy(from_native(regions.astype(np.float32))),
            "mask": torch.tensor(mask, dtype=torch.bool),
            "name": case,
        }
