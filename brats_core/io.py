"""File formats: the only module that knows NIfTI, plus atomic writers for ``.npy`` and JSON.

Case discovery accepts both BraTS namings, ``.nii`` or ``.nii.gz``:

- BraTS 2023: ``<case>-t2f``, ``-t1c``, ``-t1n``, ``-t2w``, label ``-seg``;
- BraTS 2018–2021: ``<case>_flair``, ``_t1ce``, ``_t1``, ``_t2``, label ``_seg``.

Every writer is atomic: it writes a temporary file in the destination folder and renames it with ``os.replace``, so
a reader (or a resumed run) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from brats_core.modalities import BRATS2023_SUFFIXES, LEGACY_SUFFIXES, MODALITIES

log = logging.getLogger(__name__)

LABEL_KEY = "seg"
"""Key of the label map in file listings (``CaseFiles.as_dict``, preprocessing metadata)."""

TMP_MARKER = ".tmp-"
"""Substring of every temporary file name written here (leftovers of a killed run are easy to spot and delete)."""

# Suffix (lower case) -> modality key or LABEL_KEY, for both namings.
_SUFFIX_TO_KEY: dict[str, str] = {
    **{s: m for m, s in BRATS2023_SUFFIXES.items()},
    **{s: m for m, s in LEGACY_SUFFIXES.items()},
    LABEL_KEY: LABEL_KEY,
}
_FILE_RE = re.compile(
    r"^(?P<stem>.+)[-_](?P<suffix>" + "|".join(sorted(_SUFFIX_TO_KEY, key=len, reverse=True)) + r")\.nii(\.gz)?$",
    re.IGNORECASE,
)


def file_key(name: str) -> str | None:
    """What a file name is by its ending: a modality key (``-t2f``/``_flair`` → ``flair``, …), ``seg`` for a label
    map, or None."""
    match = _FILE_RE.match(name)
    return _SUFFIX_TO_KEY[match["suffix"].lower()] if match else None


# An indented JSON list without nested lists or objects, e.g. an affine row: written on one line for readability.
_INNER_LIST = re.compile(r"\[\s*\n\s*([^\[\]{}]*?)\s*\n\s*\]")


class CaseFilesError(ValueError):
    """A case folder lacks a required file or holds several candidates for one."""


class NiftiError(OSError):
    """A NIfTI file cannot be read or written."""


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    Attributes:
        case: case id (the folder name).
        folder: the case folder.
        images: modality key -> file, in canonical order, only for modalities that were found.
        label: the label map, or None (e.g. test data).
        ignored: NIfTI files in the folder that match neither a modality nor the label map, and label maps that
            predict.py wrote (never taken for the ground truth).
    """

    case: str
    folder: Path
    images: dict[str, Path] = field(default_factory=dict)
    label: Path | None = None
    ignored: tuple[str, ...] = ()  # NIfTI files named like neither a modality nor a label (e.g. BIDS names)

    @property
    def available(self) -> tuple[str, ...]:
        """Modalities present, in canonical order."""
        return tuple(m for m in MODALITIES if m in self.images)

    @property
    def missing(self) -> tuple[str, ...]:
        """Modalities absent, in canonical order."""
        return tuple(m for m in MODALITIES if m not in self.images)

    def as_dict(self) -> dict[str, str | None]:
        """File names as strings, keyed by modality and ``"seg"`` (None when absent), for JSON metadata."""
        out: dict[str, str | None] = {m: str(self.images[m]) if m in self.images else None for m in MODALITIES}
        out[LABEL_KEY] = str(self.label) if self.label is not None else None
        return out


PREDICTION_MARK = "brats_core predict.py"
"""``descrip`` of the label maps predict.py writes: never taken for a case's ground truth, and the only label maps
beside a case's images that predict.py replaces."""


def written_by_predict(path: Path) -> bool:
    """Whether the NIfTI file at ``path`` is a label map predict.py wrote (by its header's description)."""
    try:
        return bytes(nib.load(path).header["descrip"]).rstrip(b"\0").decode(errors="replace") == PREDICTION_MARK
    except Exception:  # unreadable: not a prediction (the caller reports unreadable files its own way)
        return False


def has_case_files(folder: Path) -> bool:
    """Whether ``folder`` holds modality files, i.e. is a case (its discovery errors, e.g. an ambiguous modality,
    surface later); label maps, predictions or other NIfTI files do not count."""
    return any(p.is_file() and file_key(p.name) not in (None, LABEL_KEY) for p in folder.iterdir())


def _describe(key: str) -> str:
    """``"t1ce (-t1c or _t1ce)"``: a file key with the endings it is recognised by."""
    if key == LABEL_KEY:
        return f"{key} (-{key} or _{key})"
    return f"{key} (-{BRATS2023_SUFFIXES[key]} or _{LEGACY_SUFFIXES[key]})"


def find_case_files(
    case_dir: str | os.PathLike[str],
    require: Collection[str] = MODALITIES,
    require_label: bool = False,
    label: bool = True,
) -> CaseFiles:
    """Discover the modality files and the optional label map of one case folder.

    A file is recognised by its ending (``-t2f.nii.gz``, ``_flair.nii``, …), whatever its prefix; hidden files are
    ignored. When several files match one modality, those whose prefix equals the folder name win; if that still
    leaves several, the case is ambiguous.

    Args:
        case_dir: the case folder.
        require: modality keys that must be present (canonical names, e.g. ``("flair", "t1ce")``); a predict
            command passes the subset it was given. At least one modality must be found in any case.
        require_label: raise when the label map is absent.
        label: look for the label map at all (prediction does not read it, so an ambiguous one must not stop it).

    Returns:
        The files found, including modalities beyond ``require``.

    Raises:
        CaseFilesError: the folder does not exist, a required file is missing, or a file is ambiguous; the message
            names the folder, what is missing or ambiguous, and the files that were found.
    """
    folder = Path(case_dir)
    unknown = set(require) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modality keys {sorted(unknown)}; use {list(MODALITIES)}")
    if not folder.is_dir():
        raise CaseFilesError(f"{folder}: not a folder")
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    candidates: dict[str, list[str]] = {}
    own_prefix: set[str] = set()
    ignored: list[str] = []
    for name in names:
        key = file_key(name)
        if key is None or (key == LABEL_KEY and not label):
            if key is None and name.lower().endswith((".nii", ".nii.gz")):
                ignored.append(name)
            continue
        if key == LABEL_KEY and written_by_predict(folder / name):
            ignored.append(name)  # a prediction written beside the images is not the ground truth
            continue
        candidates.setdefault(key, []).append(name)
        if _FILE_RE.match(name)["stem"] == folder.name:  # type: ignore[index]
            own_prefix.add(name)

    def found_listing() -> str:
        return f"files found: {', '.join(names) if names else '(none)'}"

    chosen: dict[str, Path] = {}
    for key, files in candidates.items():
        if len(files) > 1:
            files = [f for f in files if f in own_prefix] or files
        if len(files) > 1:
            raise CaseFilesError(f"{folder}: ambiguous {key} file, candidates {', '.join(files)}; {found_listing()}")
        chosen[key] = folder / files[0]

    missing = [m for m in MODALITIES if m in require and m not in chosen]
    if require_label and LABEL_KEY not in chosen:
        missing.append(LABEL_KEY)
    if not any(m in chosen for m in MODALITIES) and not missing:
        missing = list(MODALITIES)
    if missing:
        raise CaseFilesError(f"{folder}: missing {', '.join(map(_describe, missing))}; {found_listing()}")
    stems = sorted({_FILE_RE.match(p.name)["stem"] for p in chosen.values()})  # type: ignore[index]
    if len(stems) > 1:
        # one grid and affine for every BraTS case: a file copied from another patient passes every other check
        log.warning(
            "%s: its files name different cases (%s): %s; are they one patient's?",
            folder, ", ".join(stems), ", ".join(p.name for p in chosen.values()),
        )  # fmt: skip
    return CaseFiles(
        case=folder.name,
        folder=folder,
        images={m: chosen[m] for m in MODALITIES if m in chosen},
        label=chosen.get(LABEL_KEY),
        ignored=tuple(ignored),
    )


def load_nifti(
    path: str | os.PathLike[str], dtype: np.dtype | type | None = np.float32
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI image fully into memory.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        dtype: the array's dtype (intensity scaling applied); None keeps the stored values as nibabel returns them
            (e.g. uint8 for a label map without scaling).

    Returns:
        ``(array (X, Y, Z), affine (4, 4) float64, header)``; trailing axes of length 1 are dropped.

    Raises:
        NiftiError: the file is missing, not NIfTI, corrupt (e.g. a truncated ``.gz``) or not 3-D; the message names
            it.
    """
    path = Path(path)
    try:
        img = nib.load(path)
        # nibabel reads lazily: decompression errors only surface when the data are accessed, so read here.
        data = np.asanyarray(img.dataobj) if dtype is None else img.get_fdata(dtype=np.dtype(dtype))
    except Exception as err:  # nibabel raises many unrelated types (OSError, EOFError, zlib.error, ImageFileError…)
        raise NiftiError(f"{path}: cannot read NIfTI ({type(err).__name__}: {err})") from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise NiftiError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    data = np.asarray(data)
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1) as some converters write single volumes
        data = data[..., 0]
    if data.ndim != 3:
        raise NiftiError(f"{path}: not a 3-D volume (shape {data.shape})")
    return data, np.asarray(img.affine, dtype=np.float64), img.header


def load_nifti_header(path: str | os.PathLike[str]) -> tuple[np.ndarray, nib.Nifti1Header]:
    """The affine ``(4, 4)`` and header of a NIfTI file, without reading its voxels."""
    path = Path(path)
    try:
        img = nib.load(path)
    except Exception as err:
        raise NiftiError(f"{path}: cannot read NIfTI header ({type(err).__name__}: {err})") from err
    return np.asarray(img.affine, dtype=np.float64), img.header


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` only if the block succeeds.

    The temporary name starts with a dot and contains :data:`TMP_MARKER`; it is removed when the block fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix: nibabel chooses gzip from the file name.
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    # A unique name rather than tempfile.mkstemp: mkstemp's 0600 mode would survive the rename.
    tmp = path.parent / f".{path.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_nifti(
    path: str | os.PathLike[str],
    array: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    description: str | None = None,
) -> Path:
    """Write a NIfTI image atomically (``.nii`` or ``.nii.gz`` by the file name).

    The on-disk dtype is the array's dtype and intensity scaling is cleared, so a label map written with the header
    of a float image stays integer and reads back voxel for voxel.

    Args:
        path: destination.
        array: voxels ``(X, Y, Z[, ...])``.
        affine: voxel-to-world ``(4, 4)``.
        header: header to copy (orientation codes, voxel sizes, description), e.g. the source image's; without
            one, qform and sform are both set to ``affine`` with code 1 (scanner), as in BraTS files.
        description: the header's ``descrip`` (up to 80 characters; default: the copied header's).
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise NiftiError(f"{path}: a NIfTI file name must end with .nii or .nii.gz")
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64), header=header)
    img.set_data_dtype(np.asarray(array).dtype)
    img.header.set_slope_inter(None, None)
    # the source's display window (e.g. cal_max 2000) would show labels 0-3 as black in viewers that honour it
    img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
    if description is not None:
        img.header["descrip"] = description.encode()[:80]
    if header is None:
        # BraTS ships the affine as both qform and sform with code 1 (scanner anatomical); mirror that.
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        try:
            nib.save(img, tmp)
        except Exception as err:
            raise NiftiError(f"{path}: cannot write NIfTI ({type(err).__name__}: {err})") from err
    return path


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write ``array`` to ``path`` (``.npy`` format) atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # Through a handle: np.save would append ".npy" to a name that does not end with it.
        np.save(handle, np.asarray(array), allow_pickle=False)
    return Path(path)


RECORD_FILE = "evaluation.json"
"""What produced an evaluation folder's rows (see ``brats_core.evaluation.claim_results_folder``)."""
_SHARD = re.compile(r"per_case_(all|[01]{4}(-[01]{4})*)\.csv")


def make_output_folder(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its parents) and check that it can be written, before any work goes into it.

    Raises:
        OSError: with a message naming the folder and the reason.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the output folder {folder}: {err.strerror or err}") from err
    if not os.access(folder, os.W_OK):
        raise OSError(f"the output folder {folder} is not writable")
    return folder


def result_files(out: Path) -> list[Path]:
    """The evaluator's per-case shards in ``out`` (``per_case_all.csv``, ``per_case_<bits>-….csv``); other CSVs,
    e.g. a method's upstream-style scoring, are never merged."""
    return sorted(p for p in Path(out).glob("per_case_*.csv") if _SHARD.fullmatch(p.name))


def save_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically, without newline translation."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(path)


def save_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON atomically."""
    return save_text(
        path, _INNER_LIST.sub(lambda m: "[" + re.sub(r"\s*\n\s*", " ", m[1]) + "]", json.dumps(obj, indent=2)) + "\n"
    )


def load_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; the error names the file when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read JSON ({err})") from err
