"""File formats: the only module that knows NIfTI, plus atomic writers for ``.npy`` and JSON.

Case discovery accepts both BraTS namings, ``.nii`` or ``.nii.gz``:

- BraTS 2023: ``<case>-t2f``, ``-t1c``, ``-t1n``, ``-t2w``, label ``-seg``;
- BraTS 2018–2021: ``<case>_flair``, ``_t1ce``, ``_t1``, ``_t2``, label ``_seg``.

Only these endings, in lower case and with their own separator, are recognised: BIDS names such as
``sub-01_FLAIR.nii.gz`` or ``sub-01_T2w.nii.gz`` are listed as ignored, never guessed.

Every writer is atomic: it writes a temporary file in the destination folder and renames it with ``os.replace``, so
a reader (or a resumed run) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import math
import os
import re
import secrets
import socket
from collections.abc import Collection, Iterator, Sequence
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

# Ending (separator and suffix, exactly as BraTS writes them) -> modality key or LABEL_KEY. Each naming keeps its
# own separator and lower case: with either separator and any case, BIDS's "_T2w" and "_FLAIR" would pass for T2 and
# FLAIR.
_ENDING_TO_KEY: dict[str, str] = {
    **{f"-{s}": m for m, s in BRATS2023_SUFFIXES.items()},
    **{f"_{s}": m for m, s in LEGACY_SUFFIXES.items()},
    f"-{LABEL_KEY}": LABEL_KEY,
    f"_{LABEL_KEY}": LABEL_KEY,
}
_FILE_RE = re.compile(
    r"^(?P<stem>.+)(?P<ending>" + "|".join(map(re.escape, sorted(_ENDING_TO_KEY, key=len, reverse=True)))
    + r")(?i:\.nii(\.gz)?)$"
)  # fmt: skip
# "-t2f/-t1c/-t1n/-t2w or _flair/_t1ce/_t1/_t2", for messages
_KNOWN_ENDINGS = " or ".join(
    "/".join(f"{sep}{s}" for s in suffixes.values())
    for sep, suffixes in (("-", BRATS2023_SUFFIXES), ("_", LEGACY_SUFFIXES))
)


def file_key(name: str) -> str | None:
    """What a file name is by its ending: a modality key (``-t2f``/``_flair`` → ``flair``, …), ``seg`` for a label
    map, or None (any other name, e.g. BIDS's ``sub-01_T2w.nii.gz``)."""
    match = _FILE_RE.match(name)
    return _ENDING_TO_KEY[match["ending"]] if match else None


def file_stem(name: str) -> str | None:
    """The case part of a BraTS file name (``BraTS-GLI-00001-000-t2f.nii.gz`` → ``BraTS-GLI-00001-000``), or None
    when :func:`file_key` does not recognise the name."""
    match = _FILE_RE.match(name)
    return match["stem"] if match else None


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

    def ignored_note(self) -> str | None:
        """One line listing :attr:`ignored` with the reason (for a warning), or None when nothing was ignored."""
        if not self.ignored:
            return None
        predictions = [n for n in self.ignored if file_key(n) == LABEL_KEY]
        others = [n for n in self.ignored if n not in predictions]
        parts = []
        if others:
            parts.append(f"{', '.join(others)} (not named like a modality: {_KNOWN_ENDINGS})")
        if predictions:
            parts.append(f"{', '.join(predictions)} (label maps predict.py wrote, never a ground truth)")
        return f"{self.folder}: ignored {'; '.join(parts)}"


PREDICTION_MARK = "brats_core predict.py"
"""``descrip`` of the NIfTI files predict.py writes and ``writer`` entry of its probability ``.npz`` files: its label
maps are never taken for a case's ground truth, and predict.py replaces no other file without ``--overwrite``."""

_PROBABILITY_ENTRIES = ["affine", "channels", "probabilities"]  # of a .npz written before it had a writer entry


def written_by_predict(path: Path) -> bool:
    """Whether the file at ``path`` is one predict.py wrote: a NIfTI label or region map by its header's description,
    a probability ``.npz`` by its ``writer`` entry (or, written by an older version, by its exact entries)."""
    try:
        if path.name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                if "writer" in npz.files:
                    return str(npz["writer"]) == PREDICTION_MARK
                return sorted(npz.files) == _PROBABILITY_ENTRIES
        return bytes(nib.load(path).header["descrip"]).rstrip(b"\0").decode(errors="replace") == PREDICTION_MARK
    except Exception:  # unreadable: not a prediction (the caller reports unreadable files its own way)
        return False


def has_case_files(folder: Path) -> bool:
    """Whether ``folder`` holds modality files, i.e. is a case (its discovery errors, e.g. an ambiguous modality or
    a broken link, surface later); label maps, predictions or other NIfTI files do not count."""
    return any((p.is_file() or p.is_symlink()) and file_key(p.name) not in (None, LABEL_KEY) for p in folder.iterdir())


def broken_link(path: str | os.PathLike[str]) -> str | None:
    """Why ``path``, a symbolic link, cannot be read (it loops, or its target does not exist), naming it; None when
    ``path`` is not a broken link. A file test alone would take such a link for an absent file."""
    path = Path(path)
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{path} is a symbolic link that loops (leads back to itself) and cannot be read: fix or remove it"
        reason = (err.strerror or str(err)).lower()
        return f"{path} is a symbolic link to {os.readlink(path)}, which cannot be read ({reason}): fix or remove it"
    return None


def _describe(key: str) -> str:
    """``"t1ce (-t1c or _t1ce)"``: a file key with the endings it is recognised by."""
    if key == LABEL_KEY:
        return f"{key} (-{key} or _{key})"
    return f"{key} (-{BRATS2023_SUFFIXES[key]} or _{LEGACY_SUFFIXES[key]})"


def _sort_files(folder: Path, names: Sequence[str], label: bool) -> tuple[dict[str, list[str]], list[str]]:
    """The candidate files of each key (modality, or the label map when ``label``) and the ignored NIfTI files.

    Raises:
        CaseFilesError: a file named like a modality or label map is a broken or looping link.
    """
    candidates: dict[str, list[str]] = {}
    ignored: list[str] = []
    broken: list[str] = []
    for name in names:
        key = file_key(name)
        if key is None or (key == LABEL_KEY and not label):
            if key is None and name.lower().endswith((".nii", ".nii.gz")):
                ignored.append(name)
            continue
        problem = broken_link(folder / name)
        if problem is not None:
            broken.append(problem)
        elif key == LABEL_KEY and written_by_predict(folder / name):
            ignored.append(name)  # a prediction written beside the images is not the ground truth
        else:
            candidates.setdefault(key, []).append(name)
    if broken:
        raise CaseFilesError("; ".join(broken))
    return candidates, ignored


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
        CaseFilesError: the folder does not exist, a required file is missing, a file is ambiguous, or a file named
            like a modality (or label map, when read) is a broken or looping symbolic link; the message names the
            folder or link, what is missing or ambiguous, and the files that were found (marking those whose names
            are not BraTS names, e.g. BIDS names).
    """
    folder = Path(case_dir)
    unknown = set(require) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modality keys {sorted(unknown)}; use {list(MODALITIES)}")
    if not folder.is_dir():
        raise CaseFilesError(f"{folder}: not a folder")
    # links too: a broken one named like a modality must be reported as such, not as a missing file
    names = sorted(p.name for p in folder.iterdir() if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))
    candidates, ignored = _sort_files(folder, names, label)

    def found_listing() -> str:
        shown = [f"{n} (not a BraTS name)" if n in ignored and file_key(n) is None else n for n in names]
        return f"files found: {', '.join(shown) if shown else '(none)'}"

    chosen: dict[str, Path] = {}
    for key, files in candidates.items():
        if len(files) > 1:  # those named after the folder win
            files = [f for f in files if file_stem(f) == folder.name] or files
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
    stems = sorted({str(file_stem(p.name)) for p in chosen.values()})
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


MAX_NIFTI_VOXELS = 1024**3
"""The most voxels :func:`load_nifti` reads from one file (1024³, i.e. 4 GiB as float32; a BraTS image has
240 × 240 × 155 ≈ 9 M): a header announcing more is damaged or hostile and is refused before anything is allocated."""

_READ_CHUNK = 1 << 20


def _nifti_error(path: Path, err: BaseException, what: str = "NIfTI") -> NiftiError:
    """``cannot read NIfTI`` naming ``path``, in one line (nibabel's messages may span several)."""
    return NiftiError(f"{path}: cannot read {what} ({type(err).__name__}: {' '.join(str(err).split())})")


def _decompressed_size(path: Path, needed: int) -> int:
    """How many bytes the gzip file ``path`` decompresses to, counted up to ``needed`` at most.

    The gzip trailer's ISIZE (the size mod 2³²) answers at once for a complete single-stream file; otherwise (a
    truncated file, several concatenated streams) the data are decompressed in chunks, without keeping them, and the
    count stops at ``needed``.
    """
    with path.open("rb") as handle:
        handle.seek(-4, os.SEEK_END)
        if int.from_bytes(handle.read(4), "little") == needed % 2**32:
            return needed
    total = 0
    with gzip.open(path, "rb") as stream:
        while total < needed:
            try:
                chunk = stream.read1(min(_READ_CHUNK, needed - total))
            except EOFError:  # the compressed stream stops short: a truncated file
                break
            if not chunk:
                break
            total += len(chunk)
    return total


def _check_nifti_size(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse a header that announces more voxels than :data:`MAX_NIFTI_VOXELS` or than its file holds, before
    nibabel allocates the announced array (a 1 KB file can announce 1500³ voxels).

    Raises:
        NiftiError: in one line naming the file, the announced shape and what the file holds.
    """
    header = img.header
    shape = tuple(int(s) for s in header.get_data_shape())
    dtype = np.dtype(header.get_data_dtype())
    voxels = math.prod(shape)
    described = f"{'×'.join(map(str, shape))} {dtype} voxels"
    if voxels > MAX_NIFTI_VOXELS:
        raise NiftiError(
            f"{path}: cannot read NIfTI: its header announces {described}, {voxels} in all, more than the 1024³ this "
            "tool reads (a damaged header, or not a single MRI volume)"
        )
    # the proxy's offset: nibabel resets the loaded header's vox_offset
    needed = int(getattr(img.dataobj, "offset", header.get_data_offset())) + voxels * dtype.itemsize
    data_file = Path(img.file_map["image"].filename)
    name = data_file.name.lower()
    if name.endswith(".gz"):
        have, verb = _decompressed_size(data_file, needed), "decompresses to"
    elif name.endswith((".bz2", ".zst")):
        return  # rare compressions: only the voxel cap applies
    else:
        have, verb = data_file.stat().st_size, "holds"
    if have < needed:
        raise NiftiError(
            f"{path}: cannot read NIfTI: the file is truncated, it {verb} {have} bytes where its header announces "
            f"{described} ({needed} bytes with the header): copy or export it again"
        )


def load_nifti(
    path: str | os.PathLike[str], dtype: np.dtype | type | None = np.float32
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI image fully into memory.

    The header is checked against the file first: a file holding fewer bytes than its header announces, or a header
    announcing more than :data:`MAX_NIFTI_VOXELS` (1024³) voxels, is refused before any array is allocated.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        dtype: the array's dtype (intensity scaling applied); None keeps the stored values as nibabel returns them
            (e.g. uint8 for a label map without scaling).

    Returns:
        ``(array (X, Y, Z), affine (4, 4) float64, header)``; trailing axes of length 1 are dropped.

    Raises:
        NiftiError: the file is missing, not NIfTI, corrupt (e.g. a truncated ``.gz``), larger than the voxel cap or
            not 3-D; the message (one line) names it.
    """
    path = Path(path)
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises many unrelated types (OSError, EOFError, zlib.error, ImageFileError…)
        raise _nifti_error(path, err) from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise NiftiError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    try:
        _check_nifti_size(path, img)
        # nibabel reads lazily: decompression errors only surface when the data are accessed, so read here.
        data = np.asanyarray(img.dataobj) if dtype is None else img.get_fdata(dtype=np.dtype(dtype))
    except NiftiError:
        raise
    except Exception as err:
        raise _nifti_error(path, err) from err
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
        raise _nifti_error(path, err, "NIfTI header") from err
    return np.asarray(img.affine, dtype=np.float64), img.header


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_TMP_NAME = re.compile(re.escape(TMP_MARKER) + r"(?:(?P<host>[A-Za-z0-9._]+)-)?(?P<pid>\d+)-[0-9a-f]{8}")


def temporary_name(path: str | os.PathLike[str]) -> Path:
    """A unique hidden name beside ``path`` with its suffix, the host and this process's id
    (``.<name>.tmp-<host>-<pid>-<random><suffix>``), which :func:`remove_stale_temporaries` recognises once the
    process has died."""
    path = Path(path)
    # keep the real suffix: nibabel chooses gzip from the file name
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    # a unique name rather than tempfile.mkstemp: mkstemp's 0600 mode would survive a rename
    return path.parent / f".{path.name}{TMP_MARKER}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` only if the block succeeds.

    The temporary name starts with a dot and contains :data:`TMP_MARKER`, the host and the process id (so that
    :func:`remove_stale_temporaries` can tell a dead run's leftovers from a live writer's file); it is removed
    when the block fails. A short write on a full disk becomes an ``ENOSPC`` error naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(err, OSError) and _disk_full(err, path.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise


def _disk_full(err: OSError, folder: Path) -> bool:
    """Whether a write error means the disk (or quota) is full: numpy and zlib report a short write without errno."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if err.errno is not None:
        return False
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 1 << 20


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed runs of this host left in ``folder`` (not recursive).

    A temporary file of :func:`atomic_path` whose writer is no longer running (``kill -9``, power loss) would
    otherwise stay forever. Files of live processes are kept, and so are those written on another host (a shared
    file system: that host's process may still be writing), which are only reported.

    Returns:
        The files removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        match = _TMP_NAME.search(path.name) if path.name.startswith(".") else None
        if match is None or not path.is_file():
            continue
        if match["host"] not in (None, _HOST):
            log.warning("%s: temporary file of a run on host %s; delete it once that run stopped", path, match["host"])
        elif not _process_alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
            log.info("removed %s, a temporary file left by a run that was stopped", path)
    return removed


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


class NpyError(OSError):
    """A ``.npy`` file that is truncated, damaged or not an array file."""


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` file, from its header alone."""
    with path.open("rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read(handle)
        return tuple(shape), np.dtype(dtype), handle.tell()


def npy_intact(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a complete ``.npy`` file: a valid header and exactly the data bytes it announces (a
    killed writer or a failed copy leaves a shorter file, which memory-mapping would refuse only later)."""
    path = Path(path)
    try:
        shape, dtype, offset = _npy_header(path)
        return path.stat().st_size == offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    except (OSError, ValueError, EOFError):
        return False


def load_npy(path: str | os.PathLike[str], mmap: bool = False, what: str = "array") -> np.ndarray:
    """Read a ``.npy`` file (``mmap``: memory-mapped, read-only), never unpickling objects.

    Raises:
        FileNotFoundError: the file does not exist.
        NpyError: the file is truncated or not an array file; the message names it and ``what`` it holds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    if not npy_intact(path):
        raise NpyError(
            f"{path}: {what} file is truncated or damaged (size {path.stat().st_size} bytes): re-create it, e.g. "
            "with preprocess.py --overwrite --cases <case>"
        )
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise NpyError(f"{path}: cannot read {what} ({type(err).__name__}: {err})") from err


RECORD_FILE = "evaluation.json"
"""What produced an evaluation folder's rows (see ``brats_core.engine.evaluation.claim_results_folder``)."""
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


class JsonFileError(OSError, ValueError):
    """A JSON file that is missing, unreadable or malformed: an OSError, so scripts report it in one line
    (``brats_core.utils.cli.run_main``), and a ValueError, the type callers caught before."""


def load_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file.

    Raises:
        JsonFileError: the file is missing, unreadable or not JSON; the message names it.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise JsonFileError(f"{path}: cannot read JSON ({reason})") from err
