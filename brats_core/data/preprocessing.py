"""Crop + z-score preprocessing of BraTS cases into the upstream ``.npy`` layout.

Output of ``python preprocess.py --input-path RAW --output-path OUT``, one entry per case folder of ``RAW``:

- ``OUT/vol/<case>_vol.npy``: float32 ``(H, W, D, 4)``, channels FLAIR, T1ce, T1, T2 (canonical order), each
  z-scored over the brain mask of the crop;
- ``OUT/seg/<case>_seg.npy``: uint8 ``(H, W, D)``, labels 0..3 (4 → 3), only when the case has a label map;
- ``OUT/meta/<case>.json``: geometry and provenance (see :func:`case_meta`), written last, so its presence marks a
  finished case (when the files it announces are complete: see :func:`unfinished_reason`).

A re-run removes the temporary files a killed run left in ``vol/``, ``seg/`` and ``meta/``, and redoes (saying so)
the cases whose metadata cannot be read or whose ``.npy`` files are missing, truncated or damaged.

The crop box follows upstream (the non-zero extent of the voxel-wise maximum over the modalities, enlarged to at
least the patch size) with two bugs fixed by default: the last non-zero slice is kept, and the box is shifted back
inside the volume at the upper border, so each axis is at least ``patch_size`` long whenever the volume is.
``reference_quirks=True`` (``--reference-quirks``) reproduces upstream's box exactly. See :func:`crop_box`.

Array-level functions (:func:`crop_box`, :func:`apply_zscore`, :func:`preprocess_arrays`) are pure and accept any
non-empty subset of the modalities, so a predict command can preprocess one case in memory; :func:`uncrop` and
:func:`write_label_nifti` map a prediction on the crop back to the original image geometry.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from brats_core.labels import remap_legacy
from brats_core.modalities import MODALITIES
from brats_core.utils.cli import add_progress_arg, describe_os_error
from brats_core.utils.io import (
    CaseFiles,
    CaseFilesError,
    NiftiError,
    find_case_files,
    load_json,
    load_nifti,
    load_nifti_header,
    make_output_folder,
    npy_intact,
    remove_stale_temporaries,
    save_json,
    save_nifti,
    save_npy,
)

log = logging.getLogger(__name__)

DEFAULT_PATCH_SIZE = 128
META_FORMAT = "brats_core.data.preprocessing/1"
VALID_LABELS = (0, 1, 2, 3, 4)
"""Label values accepted on input (4 is the BraTS ≤ 2020 ET label, mapped to 3)."""

_AFFINE_ATOL = 1e-4  # mm; co-registered BraTS modalities share the affine exactly, this only absorbs float noise

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
"""Half-open voxel ranges ``((x0, x1), (y0, y1), (z0, z1))`` in the original array."""


# ---------------------------------------------------------------------------------------------------------------------
# Pure array functions


def _axis_range(lo: int, hi: int, dim: int, patch_size: int, reference_quirks: bool) -> tuple[int, int]:
    """Half-open range along one axis from the inclusive non-zero extent ``[lo, hi]`` (see :func:`crop_box`)."""
    if hi - lo < patch_size:
        # Upstream's enlargement: the box grows to patch_size or patch_size + 1 voxels, centred on the extent.
        e = (patch_size - (hi - lo)) // 2
        lo, hi = lo - e, hi + e + 1
    elif not reference_quirks:
        hi += 1  # upstream uses the inclusive max as an exclusive end here, dropping the last non-zero slice
    if lo < 0:
        lo, hi = 0, hi - lo
    if reference_quirks:
        # No upper clamp upstream: numpy slicing silently stops at the border, which is what is recorded.
        return lo, min(hi, dim)
    if hi > dim:
        lo, hi = max(0, lo - (hi - dim)), dim
    return lo, hi


def crop_box(foreground: np.ndarray, patch_size: int = DEFAULT_PATCH_SIZE, reference_quirks: bool = False) -> Box:
    """The crop box of a case (see docs/upstream.md, shared preprocessing).

    Per axis, the inclusive extent ``[lo, hi]`` of the foreground is enlarged when ``hi − lo < patch_size`` by
    ``e = floor((patch_size − (hi − lo)) / 2)`` on both sides (plus one at the top), then shifted up if it starts
    below 0. Default: the box ends after ``hi`` and is shifted down (clamped) at the upper border, so its length is
    ``min(dim, max(extent, patch_size))`` or one more. ``reference_quirks``: upstream exactly, i.e. an extent of
    ≥ ``patch_size`` ends at ``hi`` (excluded), and the box is cut at the upper border without shifting.

    Args:
        foreground: bool ``(X, Y, Z)``; upstream uses ``max over modalities != 0``.
        patch_size: minimum box length per axis.
        reference_quirks: reproduce upstream's off-by-one and missing upper clamp.

    Returns:
        Half-open ranges per axis, inside the array.
    """
    if foreground.ndim != 3:
        raise ValueError(f"crop_box needs a 3-D foreground mask, got shape {foreground.shape}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if not foreground.any():
        raise ValueError("the image is empty (no non-zero voxel), no crop box")
    ranges = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(foreground.any(axis=other))
        ranges.append(_axis_range(int(idx[0]), int(idx[-1]), foreground.shape[axis], patch_size, reference_quirks))
    return tuple(ranges)  # type: ignore[return-value]


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """Crop the first three (spatial) axes of ``array`` ``(X, Y, Z, ...)`` to ``box``."""
    return array[tuple(slice(lo, hi) for lo, hi in box)]


def apply_zscore(
    images: np.ndarray, brain: np.ndarray, names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[float], list[float]]:
    """Z-score each channel over the brain mask, applied to every voxel (see docs/upstream.md, shared preprocessing).

    Statistics are computed in float64 (population std); the result is float32. The background therefore becomes
    ``−mean/std`` per channel, as upstream.

    Args:
        images: ``(C, X, Y, Z)``.
        brain: bool ``(X, Y, Z)``; upstream uses ``sum over modalities > 0`` on the crop.
        names: channel names for error messages (default ``channel 0`` …).

    Returns:
        ``(normalised float32 (C, X, Y, Z), means, stds)``.

    Raises:
        ValueError: empty brain mask, or a channel constant inside it (its std would be 0).
    """
    names = list(names) if names is not None else [f"channel {c}" for c in range(images.shape[0])]
    if brain.shape != images.shape[1:]:
        raise ValueError(f"brain mask shape {brain.shape} differs from image shape {images.shape[1:]}")
    if not brain.any():
        raise ValueError("the brain mask is empty, cannot z-score")
    out = np.empty(images.shape, dtype=np.float32)
    means: list[float] = []
    stds: list[float] = []
    for c, name in enumerate(names):
        values = images[c][brain].astype(np.float64)
        mean, std = float(values.mean()), float(values.std())
        if not std > 0:
            raise ValueError(f"{name} is constant ({mean:g}) inside the brain mask, cannot z-score (std = 0)")
        out[c] = (images[c].astype(np.float32) - np.float32(mean)) / np.float32(std)
        means.append(mean)
        stds.append(std)
    return out, means, stds


def _as_modality_dict(images: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[0] != len(MODALITIES):
            raise ValueError(f"an image array must be (4, X, Y, Z) in order {MODALITIES}, got shape {images.shape}")
        return dict(zip(MODALITIES, images, strict=True))
    unknown = set(images) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modality keys {sorted(unknown)}; use {list(MODALITIES)}")
    if not images:
        raise ValueError("no modality given")
    return {m: np.asarray(images[m]) for m in MODALITIES if m in images}


def validate_images(images: Mapping[str, np.ndarray]) -> None:
    """Check modality arrays: 3-D, one shape, finite, not all zero.

    Args:
        images: modality key -> ``(X, Y, Z)``.

    Raises:
        ValueError: naming the modality and the problem.
    """
    shapes = {m: np.shape(a) for m, a in images.items()}
    for m, shape in shapes.items():
        if len(shape) != 3:
            raise ValueError(f"{m} is not a 3-D volume (shape {shape})")
    if len(set(shapes.values())) > 1:
        raise ValueError("modalities have different shapes: " + ", ".join(f"{m} {s}" for m, s in shapes.items()))
    for m, a in images.items():
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise ValueError(f"{m} has {bad} non-finite voxels (NaN or inf)")
        if not np.any(a):
            raise ValueError(f"{m} is all zero (an empty image cannot be z-scored)")


def validate_label(label: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Check a label map and return it as uint8 with 4 → 3.

    Args:
        label: ``(X, Y, Z)``, any numeric dtype holding integers.
        shape: the images' shape.

    Raises:
        ValueError: wrong shape, non-finite or non-integer values, or values outside {0, 1, 2, 3, 4}.
    """
    if label.shape != tuple(shape):
        raise ValueError(f"label map has shape {label.shape}, images have {tuple(shape)}")
    if not np.all(np.isfinite(label)):
        raise ValueError("label map has non-finite values")
    values = np.unique(label)
    bad = [v for v in values.tolist() if v not in VALID_LABELS]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (" …" if len(bad) > 10 else "")
        raise ValueError(f"label map has values outside {{0, 1, 2, 3, 4}}: {shown}")
    return remap_legacy(label.astype(np.uint8))


def preprocess_arrays(
    images: Mapping[str, np.ndarray] | np.ndarray,
    label: np.ndarray | None = None,
    patch_size: int = DEFAULT_PATCH_SIZE,
    reference_quirks: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Validate, crop and z-score one case held in memory.

    With a subset of the modalities, the foreground and brain mask come from the available ones and absent
    modalities are zero channels of the output (their content is irrelevant: models see the availability mask).

    Args:
        images: modality key -> ``(X, Y, Z)`` for any non-empty subset of ``MODALITIES``, or ``(4, X, Y, Z)`` in
            canonical order.
        label: ``(X, Y, Z)`` integer labels in {0, 1, 2, 3, 4}, or None.
        patch_size: minimum crop length per axis.
        reference_quirks: upstream's crop box exactly (see :func:`crop_box`).

    Returns:
        ``(vol float32 (H, W, D, 4), seg uint8 (H, W, D) or None, meta)`` where meta holds ``original_shape``,
        ``crop_box``, ``cropped_shape``, ``patch_size``, ``reference_quirks``, ``channels``, ``available``,
        ``zscore``, ``brain_voxels`` and ``has_label``.

    Raises:
        ValueError: invalid input, naming the modality and the problem.
    """
    by_modality = _as_modality_dict(images)
    validate_images(by_modality)
    available = tuple(by_modality)
    shape = next(iter(by_modality.values())).shape
    seg = validate_label(np.asarray(label), shape) if label is not None else None

    stack = np.stack([by_modality[m] for m in available]).astype(np.float32, copy=False)
    box = crop_box(stack.max(axis=0) != 0, patch_size, reference_quirks)
    cropped = stack[(slice(None), *(slice(lo, hi) for lo, hi in box))]
    brain = cropped.sum(axis=0) > 0
    normalised, means, stds = apply_zscore(cropped, brain, available)

    vol = np.zeros((*cropped.shape[1:], len(MODALITIES)), dtype=np.float32)
    for c, m in enumerate(available):
        vol[..., MODALITIES.index(m)] = normalised[c]
    meta: dict[str, Any] = {
        "original_shape": [int(s) for s in shape],
        "crop_box": [[int(lo), int(hi)] for lo, hi in box],
        "cropped_shape": [int(s) for s in vol.shape[:3]],
        "patch_size": int(patch_size),
        "reference_quirks": bool(reference_quirks),
        "channels": list(MODALITIES),
        "available": list(available),
        "zscore": {
            m: ({"mean": means[available.index(m)], "std": stds[available.index(m)]} if m in available else None)
            for m in MODALITIES
        },
        "brain_voxels": int(np.count_nonzero(brain)),
        "has_label": seg is not None,
    }
    return vol, (crop(seg, box) if seg is not None else None), meta


def uncrop(label_crop: np.ndarray, meta: Mapping[str, Any], fill: int | float = 0) -> np.ndarray:
    """Place an array computed on the crop back into the original grid.

    Args:
        label_crop: ``(H, W, D, ...)`` on the crop (``meta["cropped_shape"]``).
        meta: the case's metadata (:func:`load_meta` or :func:`preprocess_arrays`).
        fill: value outside the box.

    Returns:
        ``(X, Y, Z, ...)`` in ``meta["original_shape"]``, same dtype, ``fill`` outside the box.
    """
    expected = tuple(meta["cropped_shape"])
    if tuple(label_crop.shape[:3]) != expected:
        raise ValueError(f"array shape {label_crop.shape[:3]} differs from the crop shape {expected} in the metadata")
    out = np.full((*meta["original_shape"], *label_crop.shape[3:]), fill, dtype=label_crop.dtype)
    out[tuple(slice(int(lo), int(hi)) for lo, hi in meta["crop_box"])] = label_crop
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Files


class OutputPaths(NamedTuple):
    """Output files of one case."""

    vol: Path
    seg: Path
    meta: Path


def output_paths(out_dir: str | os.PathLike[str], case: str) -> OutputPaths:
    """``<out>/vol/<case>_vol.npy``, ``<out>/seg/<case>_seg.npy``, ``<out>/meta/<case>.json``."""
    out = Path(out_dir)
    return OutputPaths(out / "vol" / f"{case}_vol.npy", out / "seg" / f"{case}_seg.npy", out / "meta" / f"{case}.json")


_META_KEYS = ("case", "original_shape", "affine", "crop_box", "cropped_shape", "channels", "available", "has_label")


class MetadataError(OSError, ValueError):
    """A case's metadata file (``<out>/meta/<case>.json``) that is missing, not JSON or not preprocessing metadata.

    An OSError, so that scripts report it in one line (``brats_core.utils.cli.run_main``), and a ValueError, the type
    that callers caught before. The message names the file and the command that re-creates it.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}: re-create it with preprocess.py --overwrite --cases {self.path.stem}")


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a case's metadata JSON (``<out>/meta/<case>.json``), checking the keys that uncropping needs.

    Raises:
        MetadataError: the file is missing, unreadable, not JSON or not preprocessing metadata.
    """
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise MetadataError(path, f"cannot read it ({(err.strerror or str(err)).lower()})") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise MetadataError(path, f"not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise MetadataError(path, f"not a preprocessing metadata file (expected format {META_FORMAT!r})")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise MetadataError(path, f"the metadata lack {', '.join(missing)}")
    return meta


PENDING_KEY = "pending"
"""Key of the mark written to ``meta/<case>.json`` before a case's arrays: the case is being written (or its
writer was stopped); the arrays beside it are this tool's to replace."""


def _pending(path: Path) -> bool:
    try:
        return load_json(path).get(PENDING_KEY) is True
    except (OSError, ValueError, AttributeError):
        return False


def unfinished_reason(
    out_dir: str | os.PathLike[str],
    case: str,
    patch_size: int | None = None,
    reference_quirks: bool | None = None,
) -> str | None:
    """Why the outputs of ``case`` in ``out_dir`` are not a finished case; None when they are.

    Args:
        out_dir: output folder.
        case: case id.
        patch_size, reference_quirks: when given, the outputs must also have been made with these settings (so a
            rerun with other settings redoes the case instead of mixing two crops in one folder).

    Returns:
        None when the metadata and every ``.npy`` file they announce are complete
        (:func:`brats_core.utils.io.npy_intact`: a killed copy or a full disk leaves shorter files); ``""`` when the
        case was never finished (no metadata); otherwise one line naming the file: metadata that cannot be read,
        other settings, or an announced output that is missing, truncated or damaged.
    """
    paths = output_paths(out_dir, case)
    if not (paths.meta.exists() or paths.meta.is_symlink()):
        return ""
    try:
        meta = load_meta(paths.meta)
    except MetadataError as err:
        return "" if _pending(paths.meta) else f"{err.path}: {err.problem}"
    settings = {"patch_size": patch_size, "reference_quirks": reference_quirks}
    changed = [
        f"{key} {meta.get(key)}" for key, value in settings.items() if value is not None and meta.get(key) != value
    ]
    if changed:
        return f"{paths.meta}: made with other settings ({', '.join(changed)})"
    for path, announced in ((paths.vol, True), (paths.seg, bool(meta["has_label"]))):
        if announced and not npy_intact(path):
            return f"{path}: {'truncated or damaged' if path.exists() else 'missing'}"
    return None


def is_finished(
    out_dir: str | os.PathLike[str],
    case: str,
    patch_size: int | None = None,
    reference_quirks: bool | None = None,
) -> bool:
    """True when the case's metadata can be read and every output it announces is complete (see
    :func:`unfinished_reason`, which says why not)."""
    return unfinished_reason(out_dir, case, patch_size, reference_quirks) is None


def read_case_images(files: CaseFiles) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]:
    """Read a raw case's NIfTI images and label, checking that they share one grid (the preprocessed arrays of a
    case are read by :func:`brats_core.data.dataset.load_case`).

    Returns:
        ``(modality -> float32 (X, Y, Z), label (X, Y, Z) as stored or None, affine (4, 4))``.

    Raises:
        NiftiError: an unreadable file.
        ValueError: shapes or affines differ (the message names both files).
    """
    images: dict[str, np.ndarray] = {}
    ref_key, ref_affine, ref_shape = "", np.eye(4), ()
    for m, path in files.images.items():
        data, affine, _ = load_nifti(path, np.float32)
        if not ref_key:
            ref_key, ref_affine, ref_shape = m, affine, data.shape
        elif data.shape != ref_shape:
            raise ValueError(f"{path.name} has shape {data.shape}, {files.images[ref_key].name} has {ref_shape}")
        elif not np.allclose(affine, ref_affine, rtol=0, atol=_AFFINE_ATOL):
            raise ValueError(f"{path.name} has a different affine than {files.images[ref_key].name}")
        images[m] = data
    label = None
    if files.label is not None:
        label, affine, _ = load_nifti(files.label, dtype=None)
        if label.shape != ref_shape:
            raise ValueError(f"{files.label.name} has shape {label.shape}, the images have {ref_shape}")
        if not np.allclose(affine, ref_affine, rtol=0, atol=_AFFINE_ATOL):
            raise ValueError(f"{files.label.name} has a different affine than the images")
    return images, label, ref_affine


def case_meta(
    files: CaseFiles, affine: np.ndarray, array_meta: Mapping[str, Any], has_seg_output: bool
) -> dict[str, Any]:
    """The metadata JSON of a case: :func:`preprocess_arrays`' meta plus provenance.

    Schema (all lists are JSON arrays)::

        format          "brats_core.data.preprocessing/1"
        case            case id (folder name)
        source_folder   absolute path of the case folder
        source_files    {flair, t1ce, t1, t2, seg: absolute path or null}
        original_shape  [X, Y, Z] of the source images
        affine          4 x 4 voxel-to-world matrix of the source images
        crop_box        [[x0, x1], [y0, y1], [z0, z1]], half-open voxel ranges in the source grid
        cropped_shape   [H, W, D] of vol/seg
        patch_size      minimum crop length used
        reference_quirks  whether upstream's crop-box bugs were reproduced
        channels        ["flair", "t1ce", "t1", "t2"], the channel order of vol
        available       modalities present (absent ones are zero channels)
        zscore          {modality: {mean, std} or null}, statistics over the brain mask of the crop
        brain_voxels    size of that brain mask
        has_label       whether seg/<case>_seg.npy was written
        outputs         {vol, seg: path relative to the output folder, or null}
    """
    return {
        "format": META_FORMAT,
        "case": files.case,
        "source_folder": str(files.folder.resolve()),
        "source_files": {k: str(Path(v).resolve()) if v else None for k, v in files.as_dict().items()},
        "original_shape": array_meta["original_shape"],
        "affine": np.asarray(affine, dtype=float).tolist(),
        **{k: v for k, v in array_meta.items() if k != "original_shape"},
        "outputs": {
            "vol": f"vol/{files.case}_vol.npy",
            "seg": f"seg/{files.case}_seg.npy" if has_seg_output else None,
        },
    }


def write_label_nifti(
    path: str | os.PathLike[str],
    label_crop: np.ndarray,
    meta: Mapping[str, Any],
    reference: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a label map computed on the crop as NIfTI in the original image geometry.

    Args:
        path: destination ``.nii.gz``.
        label_crop: integer ``(H, W, D)`` on the crop.
        meta: the case's metadata.
        reference: NIfTI whose header to copy; default the case's source label map, else its first available
            modality. When no reference file exists any more, the affine of the metadata is used with a fresh header.

    Returns:
        ``path``.
    """
    if reference is None:
        sources = meta.get("source_files", {})
        candidates = [sources.get("seg")] + [sources.get(m) for m in meta.get("available", MODALITIES)]
        reference = next((c for c in candidates if c and Path(c).is_file()), None)
    header = None
    if reference is not None:
        ref_affine, header = load_nifti_header(reference)
        if not np.allclose(ref_affine, np.asarray(meta["affine"]), rtol=0, atol=_AFFINE_ATOL):
            raise ValueError(f"{reference}: its affine differs from the one in the metadata of case {meta['case']}")
    return save_nifti(path, uncrop(label_crop, meta), np.asarray(meta["affine"], dtype=np.float64), header)


def write_label_original_geometry(
    label_crop: np.ndarray,
    out_dir: str | os.PathLike[str],
    case: str,
    path: str | os.PathLike[str],
    reference: str | os.PathLike[str] | None = None,
) -> Path:
    """:func:`write_label_nifti` for a case of a preprocessed folder: reads ``<out_dir>/meta/<case>.json``.

    Args:
        label_crop: integer ``(H, W, D)`` on the case's crop.
        out_dir: the preprocessed folder (``--output-path`` of ``preprocess.py``).
        case: case id.
        path: destination ``.nii.gz``.
        reference: NIfTI whose header to copy (default: the case's source files recorded in the metadata).
    """
    return write_label_nifti(path, label_crop, load_meta(output_paths(out_dir, case).meta), reference)


# ---------------------------------------------------------------------------------------------------------------------
# One case, many cases


@dataclass(frozen=True)
class CaseResult:
    """Outcome of one case: ``status`` is ``"written"``, ``"skipped"`` or ``"failed"`` (then ``reason`` says why);
    ``note`` is a warning to show with it (files of the case folder that were ignored)."""

    case: str
    status: str
    reason: str = ""
    note: str = ""


def _remove_outputs(paths: Sequence[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):  # absent, or the folder is unwritable: the caller reports the failure
            p.unlink()


def preprocess_case(
    case_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    patch_size: int = DEFAULT_PATCH_SIZE,
    reference_quirks: bool = False,
    overwrite: bool = False,
) -> CaseResult:
    """Preprocess one case folder into ``out_dir``; never raises for a bad case, reports it instead.

    Everything is read and checked in memory before the first write; outputs are written atomically, metadata
    last. A failed case leaves no output of its own (previous complete outputs are only replaced on success).
    """
    case = Path(case_dir).name
    paths = output_paths(out_dir, case)
    if not overwrite and is_finished(out_dir, case, patch_size, reference_quirks):
        return CaseResult(case, "skipped")
    note = ""
    try:
        files = find_case_files(case_dir)
        note = files.ignored_note() or ""
        images, label, affine = read_case_images(files)
        vol, seg, array_meta = preprocess_arrays(images, label, patch_size, reference_quirks)
    except (CaseFilesError, NiftiError, ValueError) as err:
        return CaseResult(case, "failed", str(err), note)
    except Exception as err:  # e.g. MemoryError: still one case's failure, reported with the others
        return CaseResult(case, "failed", f"unexpected {type(err).__name__}: {err}", note)
    foreign = [p for p in (paths.vol, paths.seg) if p.exists()] if not paths.meta.exists() else []
    if foreign and not overwrite:
        # no metadata, not even the pending mark written before any array: another tool's output (e.g. the upstream
        # preprocessing's), which is never replaced silently
        return CaseResult(
            case, "failed", f"{foreign[0]} was not written by preprocess.py (no {paths.meta}): pass --overwrite "
            "to replace it, or choose another --output-path", note,
        )  # fmt: skip
    try:
        # Replace the old "finished" metadata by a pending mark first: an interruption below never leaves new data
        # behind old metadata, and the arrays are known to be this tool's.
        save_json(paths.meta, {"format": META_FORMAT, "case": case, PENDING_KEY: True})
        save_npy(paths.vol, vol)
        if seg is not None:
            save_npy(paths.seg, seg)
        else:
            _remove_outputs([paths.seg])  # stale label from an earlier run on different input
        save_json(paths.meta, case_meta(files, affine, array_meta, seg is not None))
    except (OSError, ValueError) as err:
        _remove_outputs(list(paths))
        # the cause with the file, e.g. "…_vol.npy: no space left on device", not numpy's "N requested and M written"
        cause = describe_os_error(err) if isinstance(err, OSError) else str(err)
        return CaseResult(case, "failed", f"cannot write outputs: {cause}", note)
    return CaseResult(case, "written", note=note)


_CASE_LIST_SUFFIXES = (".txt", ".csv")


def scan_cases(input_dir: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """The sub-folders of a BraTS folder, sorted: ``(case ids, others to report)``.

    Cases are the sub-folders holding NIfTI files (hidden ones excluded). The others are those a user should hear
    about, each as ``"name (why)"``: empty folders, and folders holding files but no NIfTI file (e.g. DICOM);
    folders of case lists only (``.txt``/``.csv``, e.g. ``splits/``) are left out with a note in the log.
    """
    cases: list[str] = []
    others: list[str] = []
    for p in sorted(Path(input_dir).iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        entries = [f for f in p.iterdir() if not f.name.startswith(".")]
        if any(f.name.lower().endswith((".nii", ".nii.gz")) for f in entries):
            cases.append(p.name)
        elif entries and all(f.is_file() and f.suffix.lower() in _CASE_LIST_SUFFIXES for f in entries):
            log.info("%s: case lists, not a case", p)
        else:
            others.append(f"{p.name} ({f'no NIfTI file among {len(entries)} entries' if entries else 'empty'})")
    return cases, others


def list_cases(input_dir: str | os.PathLike[str]) -> list[str]:
    """Case ids of a BraTS folder, sorted: its sub-folders holding NIfTI files (see :func:`scan_cases`)."""
    return scan_cases(input_dir)[0]


def non_case_note(input_dir: str | os.PathLike[str], others: Sequence[str]) -> str | None:
    """One line naming the sub-folders of ``input_dir`` that are not cases (:func:`scan_cases`), or None."""
    if not others:
        return None
    return f"{input_dir}: {len(others)} sub-folder(s) without NIfTI files, not cases: {', '.join(others)}"


def preprocess_dataset(
    input_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cases: Sequence[str] | None = None,
    patch_size: int = DEFAULT_PATCH_SIZE,
    reference_quirks: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> list[CaseResult]:
    """Preprocess the case folders of ``input_dir`` into ``out_dir``.

    Args:
        input_dir: BraTS folder (one sub-folder per case); never modified.
        out_dir: output folder (``vol/``, ``seg/``, ``meta/`` are created).
        cases: restrict to these case ids (default: all sub-folders).
        patch_size: minimum crop length per axis.
        reference_quirks: upstream's crop box exactly.
        overwrite: redo finished cases (cases finished with another patch size or quirks setting are always redone).
        strict: stop at the first failed case (cases not yet started are not run).
        workers: parallel processes (1 = in this process).
        progress: show a tqdm bar (on stderr; hidden when it is not a terminal).

    Returns:
        One result per case that was handled, in case order.
    """
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    names = list_cases(input_dir) if cases is None else list(cases)
    # a killed run (kill -9, power loss) leaves its temporaries behind; those of live runs stay
    removed = [path for sub in ("vol", "seg", "meta") for path in remove_stale_temporaries(out_dir / sub)]
    if removed:
        print(
            f"preprocess: removed {len(removed)} temporary file(s) of a run that was stopped: "
            + ", ".join(map(str, removed)),
            file=sys.stderr,
        )
    results: dict[str, CaseResult] = {}
    todo = []
    for name in names:
        reason = None if overwrite else unfinished_reason(out_dir, name, patch_size, reference_quirks)
        if not overwrite and reason is None:
            results[name] = CaseResult(name, "skipped")
            continue
        if reason:
            print(f"preprocess: {name}: {reason}; preprocessing the case again", file=sys.stderr)
        todo.append(name)
    args = (out_dir, patch_size, reference_quirks, overwrite)
    bar = tqdm(total=len(names), initial=len(results), desc="preprocess", unit="case", disable=not progress or None)

    def record(result: CaseResult) -> bool:
        results[result.case] = result
        bar.update(1)
        if result.note:
            tqdm.write(f"warning: {result.note}", file=sys.stderr)
        if result.status == "failed":
            tqdm.write(f"FAILED {result.case}: {result.reason}", file=sys.stderr)
            return strict
        return False

    try:
        if workers <= 1 or len(todo) <= 1:
            for name in todo:
                if record(preprocess_case(input_dir / name, *args)):
                    break
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
                futures: list[Future[CaseResult]] = [pool.submit(preprocess_case, input_dir / n, *args) for n in todo]
                for future in as_completed(futures):
                    if record(future.result()):
                        # Cases already handed to a worker still finish; count them, so the summary is true.
                        pool.shutdown(wait=True, cancel_futures=True)
                        for other in futures:
                            if not other.cancelled() and other.result().case not in results:
                                record(other.result())
                        break
    finally:
        bar.close()
    return [results[n] for n in names if n in results]


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess.py",
        description="Crop and z-score BraTS cases into <out>/vol/<case>_vol.npy (H, W, D, 4 float32; FLAIR, T1ce, "
        "T1, T2), <out>/seg/<case>_seg.npy (uint8) and <out>/meta/<case>.json.",
    )
    parser.add_argument(
        "--input-path",
        "--input_path",
        dest="input_path",
        required=True,
        help="BraTS folder with one sub-folder per case (BraTS 2023 or 2018-2021 file names)",
    )
    parser.add_argument(
        "--output-path",
        "--output_path",
        dest="output_path",
        required=True,
        help="output folder (vol/, seg/, meta/ are created inside)",
    )
    parser.add_argument(
        "--patch_size",
        "--patch-size",
        dest="patch_size",
        type=int,
        default=DEFAULT_PATCH_SIZE,
        help="minimum crop length per axis (default %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="parallel processes (default min(4, CPU count) = %(default)s)",
    )
    parser.add_argument(
        "--cases", nargs="+", default=None, metavar="CASE", help="only these case ids (space- or comma-separated)"
    )
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad case instead of skipping it")
    parser.add_argument(
        "--reference-quirks",
        "--reference_quirks",
        dest="reference_quirks",
        action="store_true",
        help="reproduce upstream's crop box exactly (drops the last non-zero slice of extents "
        ">= patch size, no clamp at the upper border)",
    )
    add_progress_arg(parser, "--no-progress")
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 0 when every case is done, 1 when some failed (bad arguments exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    input_dir, out_dir = Path(args.input_path), Path(args.output_path)
    if args.patch_size < 1:
        parser.error(f"--patch_size must be positive, got {args.patch_size}")
    if args.workers < 1:
        parser.error(f"--workers must be positive, got {args.workers}")
    if not input_dir.is_dir():
        parser.error(f"--input-path {input_dir}: not a folder")
    if out_dir.resolve() == input_dir.resolve() or input_dir.resolve() in out_dir.resolve().parents:
        parser.error(f"--output-path {out_dir} is inside --input-path {input_dir}; the input must stay untouched")
    try:
        make_output_folder(out_dir)
    except OSError as err:
        parser.error(f"--output-path: {err}")
    available, others = scan_cases(input_dir)
    cases = None
    if args.cases:
        cases = [c for item in args.cases for c in item.split(",") if c]
        unknown = [c for c in cases if c not in available]
        if unknown:
            parser.error(f"--cases: no such case folder in {input_dir}: {', '.join(unknown)}")
    else:
        if not available:
            parser.error(f"--input-path {input_dir}: no case folders inside")
        note = non_case_note(input_dir, others)
        if note:  # e.g. an empty case folder: the count of cases below would not show it
            print(f"warning: {note}", file=sys.stderr)

    results = preprocess_dataset(
        input_dir, out_dir, cases, args.patch_size, args.reference_quirks, args.overwrite, args.strict,
        args.workers, not args.no_progress,
    )  # fmt: skip
    counts = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
    total = len(cases) if cases is not None else len(available)
    print(
        f"preprocess: {total} cases, {counts['written']} written, {counts['skipped']} skipped (already done), "
        f"{counts['failed']} failed" + (f", {total - len(results)} not run (--strict)" if len(results) < total else ""),
        file=sys.stderr,
    )
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print("failed cases:", file=sys.stderr)
        for r in failed:
            print(f"  {r.case}: {r.reason}", file=sys.stderr)
        return 1
    return 0
