"""The paper's evaluation protocol for any registered model.

Every test case × every selected scenario: sliding window (window = patch, overlap 0.5, uniform blending), argmax
(or nested regions for sigmoid methods), per-case Dice WT/TC/ET on the preprocessed crop (ε = 1e-8, empty/empty =
1), ETpp (ET < 500 voxels dropped), plus HD95. Outputs in ``out_dir``:

- ``per_case_<tag>.csv``: one row per (case, scenario); ``<tag>`` is ``all`` or the selected scenarios' bits, so
  array jobs over scenario subsets can share a folder; finished rows are skipped when re-run; with
  ``EvalOptions.lesion_wise`` also the BraTS lesion-wise Dice and HD95 per region (``LesionWise_Dice_WT``, …,
  ``nan`` where neither the prediction nor the ground truth has a lesion of the region), computed on the original
  image grid (see :func:`lesion_wise_scorer`);
- ``summary.csv`` / ``summary.md`` / ``summary.json``: 15 rows (upstream order) + mean, merged over all shards;
- optionally ``predictions/<case>_<bits>.nii.gz`` in the original image geometry (from the preprocessing meta);
- ``evaluation.json``: what produced the rows (method, a digest of the weights, the settings that change the numbers,
  the case list and a digest of the cases' preprocessing).
  Rows are only ever added by the same model and settings: another evaluation into the folder stops with the
  differences named, unless ``overwrite`` clears the folder's results first. This holds for evaluations running at
  the same time too: the record is created exclusively, and every write of rows re-checks it, under a lock of the
  folder (``.evaluation.lock``), so the tasks of an array job over scenario shards can share the folder while a
  second evaluation is refused.

Rows are validated when read: a damaged row (cut short, unknown scenario, a score that does not parse) is computed
again, and a file that cannot be read as results at all (or a damaged record) stops the run before any work.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from brats_core.data.dataset import check_cases, load_case
from brats_core.engine.inference import outputs_to_labels, predict_scenarios
from brats_core.engine.metrics import LESION_WISE_KEYS, SCORE_KEYS, case_scores, lesion_wise_scores, require_lesion_wise
from brats_core.modalities import SCENARIOS, Mask, Scenario
from brats_core.registry import SegModel, output_config
from brats_core.utils.cli import UsageError
from brats_core.utils.device import amp_dtype
from brats_core.utils.io import (
    RECORD_FILE,
    JsonFileError,
    atomic_path,
    has_case_files,
    load_json,
    remove_stale_temporaries,
    result_files,
    save_json,
    save_text,
    temporary_name,
)

try:
    import fcntl
except ImportError:  # not POSIX: the exclusive creation of the record still keeps two evaluations apart
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DICE_KEYS: tuple[str, ...] = ("WT", "TC", "ET", "ETpp")


@dataclass
class EvalOptions:
    overlap: float = 0.5
    blend: str | None = "uniform"  # None: the model's own (SegModel.default_blend)
    tta: bool = False
    sw_batch_size: int = 1
    amp: bool = False
    use_encode: bool = True
    hd95: bool = True
    etpp_threshold: int = 500
    progress: bool = True
    scenario_batch: int = 1  # masks decoded per call (see inference.predict_scenarios); 1 = bit-exact protocol
    lesion_wise: bool = False  # also the BraTS lesion-wise Dice and HD95 (metrics.lesion_wise_scores)

    @classmethod
    def from_args(cls, args: object) -> EvalOptions:
        """From the flags of ``apps.arguments.add_eval_args`` (+ ``--amp``)."""
        return cls(
            overlap=args.overlap, blend=args.blend, tta=args.tta, sw_batch_size=args.sw_batch_size,
            amp=getattr(args, "amp", False), use_encode=not args.no_encode_once, hd95=not args.no_hd95,
            progress=not getattr(args, "no_progress", False), scenario_batch=getattr(args, "scenario_batch", 1),
            lesion_wise=getattr(args, "lesion_wise", False),
        )  # fmt: skip


def segment(
    model: SegModel,
    image: torch.Tensor,
    masks: Sequence[Mask],
    options: EvalOptions,
    device: torch.device,
    origin: Sequence[int] | None = None,
) -> torch.Tensor:
    """Label maps of one volume under several scenarios.

    Args:
        model: eval-mode model.
        image: ``(4, H, W, D)`` float32.
        masks: canonical masks, one per output.
        origin: the crop's position in the original image grid, for position-aware models (see
            :func:`case_origin` and ``inference.predict_scenarios``).

    Returns:
        ``(S, H, W, D)`` uint8 BraTS labels on the CPU.
    """
    x = image.unsqueeze(0).to(device)
    blended = predict_scenarios(
        model, x, masks, overlap=options.overlap, blend=options.blend or model.default_blend,
        sw_batch_size=options.sw_batch_size, tta=options.tta, amp=options.amp, use_encode=options.use_encode,
        origin=origin, scenario_batch=options.scenario_batch,
    )  # fmt: skip
    return torch.stack(
        [outputs_to_labels(b, model.output_kind, model.region_order).to(torch.uint8).cpu() for b in blended]
    )


def window_origin(model: SegModel, meta: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """Lower corner of a case's crop box in the original image grid, for models with ``window_origin == "image"``.

    Position-aware models (``window_origin`` not None, e.g. M3AE, whose learned completion image is indexed by
    absolute position) get each window's start from ``inference.predict_scenarios``: ``"image"`` asks for positions
    in the original grid (from the preprocessing metadata ``meta``), ``"crop"`` for positions relative to the
    preprocessed crop (None is returned). Other models: None.
    """
    if getattr(model, "window_origin", None) != "image":
        return None
    box = meta["crop_box"]
    return (int(box[0][0]), int(box[1][0]), int(box[2][0]))


def case_origin(model: SegModel, root: str | Path, case: str) -> tuple[int, int, int] | None:
    """:func:`window_origin` of a preprocessed case, read from ``<root>/meta/<case>.json`` when the model needs it."""
    if getattr(model, "window_origin", None) != "image":
        return None
    meta = read_case_meta(root, case)
    if meta is None:
        raise FileNotFoundError(
            f"{Path(root) / 'meta' / f'{case}.json'} not found: {model.method_name} needs each case's crop box in the "
            f"original image grid (written by the preprocessing into <datapath>/meta/)"
        )
    return window_origin(model, meta)


def read_case_meta(root: str | Path, case: str) -> dict[str, Any] | None:
    """``<root>/meta/<case>.json`` (any pipeline's), or None when the case has none (upstream-preprocessed data).

    Raises:
        JsonFileError: the file is damaged; the message names it and how to re-create it.
    """
    path = Path(root) / "meta" / f"{case}.json"
    if not path.is_file():
        return None
    try:
        meta = load_json(path)
    except JsonFileError as err:
        raise JsonFileError(f"{err}: re-create the case with the pipeline that prepared it, e.g. preprocess.py "
                            f"--overwrite --cases {case}") from err  # fmt: skip
    if not isinstance(meta, dict):
        raise JsonFileError(f"{path}: not a case's metadata (a JSON {type(meta).__name__}): re-create the case, e.g. "
                            f"preprocess.py --overwrite --cases {case}")  # fmt: skip
    return meta


def case_spacing(root: str | Path, case: str) -> tuple[float, float, float]:
    """Voxel size in mm along the array axes (the source NIfTI's, from ``<root>/meta/<case>.json``; 1 mm without
    one). Every pipeline keeps the NIfTI axis order, so HD95 comes out in mm whatever the grid."""
    affine = (read_case_meta(root, case) or {}).get("affine")
    if affine is None:
        return (1.0, 1.0, 1.0)
    x, y, z = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    return (float(x), float(y), float(z))


_CROP_KEYS = frozenset({"original_shape", "crop_box", "cropped_shape"})
_warned_crop_grid: set[Path] = set()


def lesion_wise_scorer(root: str | Path, case: str, label: np.ndarray) -> Callable[[np.ndarray], dict[str, float]]:
    """The lesion-wise scores (:data:`~brats_core.engine.metrics.LESION_WISE_KEYS`) of a case's predictions, as the
    BraTS challenge computes them: on the original image grid, with the source voxel spacing.

    The prediction and the ground truth ``label`` (both ``(H, W, D)`` on the preprocessed crop) are placed back into
    the original grid with the crop box of ``<root>/meta/<case>.json`` (``preprocessing.uncrop``; background
    outside the box). A case without that metadata (upstream-preprocessed data) is scored on the crop with 1 mm
    voxels (:func:`case_spacing`), with a warning: the same values wherever the crop holds every tumour voxel (it
    only drops background) and the source grid is 1 mm, as BraTS 2023's is.

    Raises:
        MetadataError: the metadata's crop box does not fit the case's arrays.
    """
    from brats_core.data.preprocessing import output_paths

    meta = read_case_meta(root, case)
    if meta is not None and not meta.keys() >= _CROP_KEYS:
        meta = None
    if meta is None and Path(root) not in _warned_crop_grid:
        _warned_crop_grid.add(Path(root))
        log.warning(
            "%s: no crop box in meta/%s.json (upstream-preprocessed data?): lesion-wise metrics are computed on the "
            "preprocessed crop, not on the original image grid (the same values where the crop holds the whole "
            "tumour)", root, case,
        )  # fmt: skip
    path = output_paths(root, case).meta
    gt, spacing = _source_grid(label, meta, path), case_spacing(root, case)

    def score(pred: np.ndarray) -> dict[str, float]:
        scores = lesion_wise_scores(_source_grid(pred, meta, path), gt, spacing=spacing)
        return {k: scores[k] for k in LESION_WISE_KEYS}

    return score


def _source_grid(array: np.ndarray, meta: Mapping[str, Any] | None, path: Path) -> np.ndarray:
    """``array`` of a case's crop in the original grid of ``meta`` (the case's metadata ``path``); itself without."""
    from brats_core.data.preprocessing import MetadataError, uncrop

    if meta is None:
        return array
    try:
        return uncrop(array, meta)
    except (TypeError, ValueError) as err:
        raise MetadataError(path, f"its crop box does not fit the case's arrays ({err})") from None


def check_lesion_wise() -> None:
    """Refuse ``--lesion_wise`` (before any work) where the package that computes it cannot be loaded.

    Raises:
        UsageError: one line saying how to install it.
    """
    try:
        require_lesion_wise()
    except ImportError as err:
        raise UsageError(f"--lesion_wise: {err}") from None


def score_cells(scores: Mapping[str, float], lesion_wise: Mapping[str, float] | None = None) -> dict[str, str]:
    """The score columns of a per-case row: the :data:`~brats_core.engine.metrics.SCORE_KEYS` of ``scores``
    (:func:`~brats_core.engine.metrics.case_scores`; NaN, not computed, left empty) and, when given, the
    :data:`~brats_core.engine.metrics.LESION_WISE_KEYS` of ``lesion_wise`` (NaN, no lesion on either side, written as
    ``nan``)."""
    cells = {k: f"{scores[k]:.6f}" for k in SCORE_KEYS if not math.isnan(scores.get(k, math.nan))}
    if lesion_wise is not None:
        cells |= {k: f"{lesion_wise[k]:.6f}" for k in LESION_WISE_KEYS}
    return cells


def validate(
    model: SegModel, root: str | Path, rows: Sequence[tuple[str, Mask]], options: EvalOptions, device: torch.device
) -> dict[str, float]:
    """Mean scores over cases, each under its own split-file mask (upstream's validation during training).

    Returns:
        ``WT, TC, ET, ETpp`` means and ``mean_dice`` = (WT + TC + ET) / 3, the best-checkpoint criterion.
    """
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {k: [] for k in DICE_KEYS}
    try:
        for case, mask in tqdm(rows, desc="validation", disable=not options.progress, leave=False):
            image, label = load_case(root, case)
            origin = case_origin(model, root, case)
            pred = segment(model, torch.from_numpy(image), [mask], options, device, origin)[0].numpy()
            s = case_scores(pred, label, etpp_threshold=options.etpp_threshold, hd95=False)
            for k in DICE_KEYS:
                scores[k].append(s[k])
    finally:
        model.train(was_training)
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    out["mean_dice"] = (out["WT"] + out["TC"] + out["ET"]) / 3
    return out


def shard_file(out: Path, scenarios: Sequence[Scenario]) -> Path:
    """``per_case_all.csv`` for the 15 scenarios, else ``per_case_<bits>-<bits>….csv`` (array jobs share a folder)."""
    tag = "all" if len(scenarios) == len(SCENARIOS) else "-".join(s.bits for s in scenarios)
    return out / f"per_case_{tag}.csv"


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Mapping[str, object]]) -> None:
    """Write ``rows`` (columns ``header``; other keys ignored) atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(header), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes and bytes): identifies the weights that produced results."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ResultsMismatchError(UsageError):
    """An output folder already holds results of another model or other settings (a :class:`UsageError`: scripts
    report it in one line)."""


class DamagedResultsError(ResultsMismatchError):
    """A results file of an output folder (a per-case shard, the record, a summary) cannot be read as such.

    Attributes:
        path: the file; problem: what is wrong with it (the message adds what to do).
    """

    path: Path
    problem: str


LOCK_FILE = ".evaluation.lock"
"""The lock file of an evaluation folder (see :func:`results_lock`)."""

# flock is missing on some network file systems (e.g. Lustre mounted without -o flock)
_NO_FLOCK = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})
# hard links are missing on some file systems (e.g. SMB, some FUSE mounts)
_NO_LINK = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV})
_warned_no_lock: set[Path] = set()


@contextmanager
def results_lock(out: Path) -> Iterator[None]:
    """Hold the evaluation folder ``out`` exclusively (``flock`` on ``<out>/.evaluation.lock``, created on first use).

    Every check of the record and every write of results happens under it, so that another evaluation cannot take
    the folder over between an evaluation's check and its write. It is held for the check and the write only, never
    while scenarios are computed. Where the file system has no ``flock``, a warning says so once and the record's
    exclusive creation (:func:`claim_results_folder`) still keeps two evaluations starting together apart.
    """
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in _NO_FLOCK:
                    raise
                if out not in _warned_no_lock:
                    _warned_no_lock.add(out)
                    log.warning(
                        "%s: the file system does not support locks (%s): do not run evaluations of different "
                        "models into this folder at the same time", out, os.strerror(err.errno or 0),
                    )  # fmt: skip
        yield
    finally:
        os.close(fd)  # releases the lock


def _plain(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` as it reads back from JSON (tuples become lists, paths strings), for comparisons."""
    return json.loads(json.dumps(identity, default=str))


_RECORD_DEFAULTS: dict[str, Any] = {"lesion_wise": False}
"""Keys whose absence from a record has a known meaning: older versions never computed the lesion-wise metrics."""


def _differences(saved: Mapping[str, Any], identity: Mapping[str, Any]) -> list[str]:
    """One ``key: there, now`` entry per key both have with different values (keys only one side has are not
    compared, so records of older versions stay valid; a key of :data:`_RECORD_DEFAULTS` that ``saved`` lacks takes
    its default)."""
    identity = _plain(identity)
    saved = {**{k: v for k, v in _RECORD_DEFAULTS.items() if k in identity}, **saved}
    return [
        f"{k}: {saved[k]!r} there, {identity[k]!r} now"
        for k in sorted(set(saved) & set(identity))
        if saved[k] != identity[k]
    ]


def _damaged(path: Path, what: str) -> DamagedResultsError:
    remedy = (
        "pass --overwrite to replace the folder's results, or choose another --savepath"
        if path.name == RECORD_FILE
        else "move it away, or pass --overwrite to compute its results again"
    )
    err = DamagedResultsError(f"{path}: {what}: {remedy}")
    err.path, err.problem = path, what  # for readers that give their own remedy (report.py)
    return err


def read_record(out: str | Path) -> dict[str, Any] | None:
    """The record of the evaluation folder ``out`` (see :func:`claim_results_folder`); None when it has none.

    Raises:
        DamagedResultsError: the record is not a file or not a JSON object (named, with ``--overwrite`` as the
            remedy).
    """
    record = Path(out) / RECORD_FILE
    if not record.exists() and not record.is_symlink():
        return None
    if not record.is_file():
        raise _damaged(record, "not a file")
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise _damaged(record, f"not a valid evaluation record ({type(err).__name__}: {err})") from None
    if not isinstance(saved, dict):
        raise _damaged(record, f"not a valid evaluation record (a JSON {type(saved).__name__}, not an object)")
    return saved


def _create_record(record: Path, identity: Mapping[str, Any]) -> bool:
    """Create ``record`` holding ``identity`` unless it exists, in one step (a hard link to a complete file; an
    exclusive create where the file system has no hard links).

    Returns:
        False when the record existed (another evaluation created it first).
    """
    staged = temporary_name(record)  # removed by the next evaluation if this process dies before the unlink
    save_json(staged, identity)
    try:
        os.link(staged, record)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in _NO_LINK:
            raise
        try:
            fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(staged.read_bytes())
        return True
    finally:
        staged.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    """Delete a result file of a folder being overwritten; an empty folder in its place too, a non-empty one is
    refused (the evaluation never made it)."""
    if path.is_dir() and not path.is_symlink():
        try:
            path.rmdir()
        except OSError:
            raise DamagedResultsError(f"{path}: a folder where results belong: move it away") from None
    else:
        path.unlink(missing_ok=True)


def _summary_files(out: Path) -> list[Path]:
    return [out / f"summary.{ext}" for ext in ("csv", "md", "json")]


def _check_outputs(out: Path, shard: Path | None) -> None:
    """Refuse, before any work, results files this evaluation could not read (``shard``) or write (summaries)."""
    if shard is not None:
        _read_table(shard)
    for path in _summary_files(out):
        if path.exists() and not path.is_file():
            raise _damaged(path, "not a file")


def claim_results_folder(
    out: Path, identity: Mapping[str, Any], overwrite: bool = False, shard: Path | None = None
) -> None:
    """Make sure the rows in ``out`` all come from the evaluation ``identity`` describes (JSON-able: method,
    weights digest, settings that change the numbers), also against evaluations running at the same time.

    The first evaluation creates ``evaluation.json`` exclusively (under :func:`results_lock`, and in one step, so
    that of two evaluations starting together exactly one creates it); a later one with another identity raises
    :class:`ResultsMismatchError` naming the differences (keys only one side has are not compared, so records of
    older versions stay valid, and gain the keys they lacked). Writers re-check the record before every write
    (:func:`write_results`). ``overwrite`` replaces results: those of another identity (or of a damaged record)
    entirely (per-case shards, summaries, saved label maps, the record); with the same identity only ``shard``, the
    caller's own, so that the other tasks of a SLURM array keep theirs. A folder with results but no record is
    adopted with a warning.

    Raises:
        ResultsMismatchError: results of another evaluation.
        DamagedResultsError: (without ``overwrite``) the record, ``shard`` or a summary cannot be read or written
            as such; checked before anything is written.
    """
    out = Path(out)
    identity = _plain(identity)
    record = out / RECORD_FILE
    with results_lock(out):
        for folder in (out, out / "predictions"):  # what evaluations killed while writing left (logged)
            remove_stale_temporaries(folder)
        try:
            saved = read_record(out)
            diff = _differences(saved, identity) if saved is not None else []
        except DamagedResultsError:
            if not overwrite:
                raise
            saved, diff = None, ["a damaged record"]
        if overwrite and saved is not None and not diff:
            if shard is not None:
                _remove(shard)
            _check_outputs(out, None)
        elif overwrite:
            predictions = out / "predictions"
            stale = [*result_files(out), record, *_summary_files(out)]
            stale += sorted(predictions.glob("*_[01][01][01][01].nii.gz")) if predictions.is_dir() else []
            for path in stale:
                _remove(path)
            saved = None
        elif diff:
            raise ResultsMismatchError(
                f"{out} already holds results of another evaluation ({'; '.join(diff)}): choose another --savepath, "
                "or pass --overwrite to replace them"
            )
        else:
            _check_outputs(out, shard)
        if saved is not None:
            if set(identity) - set(saved):  # a record of an older version: add what it lacked, now that it matches
                save_json(record, saved | identity)
            return
        if result_files(out):
            log.warning("%s holds results without a %s record: assuming they come from this model", out, RECORD_FILE)
        if not _create_record(record, identity):  # created meanwhile: only where the file system has no locks
            diff = _differences(read_record(out) or {}, identity)
            if diff:
                raise ResultsMismatchError(
                    f"{out} was claimed by another evaluation at the same time ({'; '.join(diff)}): choose another "
                    "--savepath, or pass --overwrite to replace its results"
                )


def _recheck(out: Path, identity: Mapping[str, Any]) -> None:
    """Raise unless the record of ``out`` is still ``identity``'s (the caller holds :func:`results_lock`)."""
    try:
        saved = read_record(out)
    except DamagedResultsError as err:
        raise ResultsMismatchError(f"{err} (it changed while this evaluation ran; its rows were not written)") from None
    if saved is None:
        raise ResultsMismatchError(
            f"{out / RECORD_FILE} was removed while this evaluation ran (another evaluation with --overwrite?): "
            "its rows were not written; run it again with another --savepath, or with --overwrite"
        )
    diff = _differences(saved, identity)
    if diff:
        raise ResultsMismatchError(
            f"{out} was taken over by another evaluation while this one ran ({'; '.join(diff)}): its rows were not "
            "written; run it again with another --savepath, or with --overwrite to replace the other's results"
        )


def write_results(
    out: str | Path,
    identity: Mapping[str, Any],
    path: Path,
    rows: Iterable[Mapping[str, object]],
    before: Callable[[], None] | None = None,
) -> None:
    """Write the per-case ``rows`` to the shard ``path`` of ``out`` if the folder still belongs to ``identity``.

    Under :func:`results_lock`: the record is re-checked, then ``before()`` runs (e.g. writing the label maps that
    go with the rows), then the rows are written atomically.

    Raises:
        ResultsMismatchError: the folder's record changed since :func:`claim_results_folder` (nothing is written).
    """
    out = Path(out)
    with results_lock(out):
        _recheck(out, identity)
        if before is not None:
            before()
        write_csv(path, PER_CASE_HEADER, rows)


def check_preprocessed_folder(root: str | Path) -> None:
    """Refuse a data folder (``--datapath``) that is not a preprocessed one, saying what it is instead.

    A preprocessed folder holds ``vol/`` (``preprocess.py``'s output, or upstream's preprocessing); the checks of
    the cases themselves come later (``data.check_cases``).

    Raises:
        UsageError: the folder does not exist, is a file, holds BraTS NIfTI files (the raw data), or lacks ``vol/``.
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"--datapath {root}: folder does not exist (pass the folder preprocess.py wrote)")
    if not root.is_dir():
        raise UsageError(f"--datapath {root}: not a folder (pass the folder preprocess.py wrote)")
    if (root / "vol").is_dir():
        return
    entries = sorted(root.iterdir())
    nifti = any(p.name.lower().endswith((".nii", ".nii.gz")) for p in entries)
    # a few folders suffice to recognise BraTS case folders; a large unrelated folder is not listed in full
    if nifti or any(has_case_files(p) for p in [p for p in entries if p.is_dir()][:20]):
        raise UsageError(
            f"--datapath {root}: holds NIfTI files, not preprocessed (run preprocess.py --input-path {root} "
            "--output-path <folder>, and pass that folder)"
        )
    raise UsageError(
        f"--datapath {root}: not preprocessed, it has no vol/ folder (run preprocess.py on the BraTS folder, and "
        "pass its --output-path)"
    )


def check_pipeline(model: SegModel, root: str | Path, cases: Sequence[str]) -> None:
    """Refuse cases preprocessed by another method's pipeline (other normalisation and crop: wrong numbers).

    Raises:
        UsageError: naming the first such case, its pipeline and the one ``model`` needs.
    """
    from brats_core.data.preprocessing import output_paths

    for case in cases:
        meta = output_paths(root, case).meta
        found = (read_case_meta(root, case) or {}).get("pipeline")
        if found != model.data_pipeline:

            def name(p: str | None) -> str:
                return f"the {p} pipeline" if p else "preprocess.py"

            raise UsageError(
                f"{meta}: case {case} was prepared by {name(found)}, but {model.method_name} is evaluated on data "
                f"prepared by {name(model.data_pipeline)}: point --datapath at that folder"
            )


def case_list_identity(cases: Sequence[str]) -> str:
    """``"N cases, sha256 …"`` of a case list (order-independent)."""
    digest = hashlib.sha256("\n".join(sorted(cases)).encode()).hexdigest()[:16]
    return f"{len(cases)} case" + "s" * (len(cases) != 1) + f", sha256 {digest}"


def data_identity(root: str | Path, cases: Sequence[str]) -> dict[str, str]:
    """The data an evaluation scores: the case list, and a digest of how its cases were preprocessed (their
    metadata without source paths; the volume sizes where there is none), so that moving or copying the data folder
    keeps the identity while another preprocessing of the same cases does not."""
    from brats_core.data.preprocessing import output_paths

    h = hashlib.sha256()
    for case in sorted(cases):
        paths = output_paths(root, case)
        meta = read_case_meta(root, case)
        if meta is not None:
            h.update(json.dumps({k: v for k, v in meta.items() if k != "source_files"}, sort_keys=True).encode())
        else:  # e.g. folders preprocessed by the upstream code
            h.update(f"{case} {paths.vol.stat().st_size if paths.vol.is_file() else -1}".encode())
    return {"data": f"preprocessing sha256 {h.hexdigest()[:16]}", "cases": case_list_identity(cases)}


def evaluation_identity(
    model: SegModel,
    options: EvalOptions,
    root: str | Path,
    cases: Sequence[str],
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """What makes two evaluations' rows comparable: the method and weights, the data and cases, and the settings
    that change numbers (``device`` decides what ``--amp`` does: bf16 or fp16 autocast on CUDA, nothing on CPU)."""
    autocast = amp_dtype(torch.device(device), options.amp)
    return {
        **data_identity(root, cases),
        "method": model.method_name,
        "weights": weights_digest(model),
        # the window is not part of the weights (ShaSpec's --input_size), and runtime fields such as RobustSeg's
        # inference dropout change the outputs of the same weights
        "window": model.patch_size,
        "config": output_config(model),
        "overlap": options.overlap,
        "blend": options.blend or model.default_blend,
        "tta": options.tta,
        # the autocast dtype ("bfloat16", "float16"), or False: rows of fp16 and bf16 runs never mix
        "amp": str(autocast).removeprefix("torch.") if autocast is not None else False,
        # batched decoding, and batches of windows, round differently (not bit-exact)
        "scenario_batch": options.scenario_batch > 1,
        "sw_batch": options.sw_batch_size > 1,
        "etpp_threshold": options.etpp_threshold,
        "hd95": options.hd95,
        "lesion_wise": options.lesion_wise,
    }


PER_CASE_HEADER = ("case", "scenario", "bits", *SCORE_KEYS, *LESION_WISE_KEYS, "seconds")
_REQUIRED_COLUMNS = ("case", "scenario", "bits", *DICE_KEYS)  # written by every version of the evaluator
_SCENARIO_BY_NAME = {s.name: s for s in SCENARIOS}


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _row_problem(
    row: Mapping[str, str],
    width: int,
    header: Sequence[str],
    scenarios: Collection[str] | None,
    hd95: bool,
    lesion_wise: bool = False,
) -> str | None:
    """Why a per-case row cannot be a finished result (None: it can)."""
    if width != len(header):
        return f"{width} fields, the header has {len(header)}"
    return (
        _identity_problem(row, scenarios)
        or _score_problem(row, hd95, lesion_wise)
        or (
            f"seconds {row['seconds']!r} is not a number"
            if row.get("seconds") and _number(row["seconds"]) is None
            else None
        )
    )


def _identity_problem(row: Mapping[str, str], scenarios: Collection[str] | None) -> str | None:
    """What is wrong with a row's case, scenario and bits (None: nothing)."""
    scenario = _SCENARIO_BY_NAME.get(row["scenario"])
    if not row["case"].strip():
        return "no case"
    if scenario is None:
        return f"unknown scenario {row['scenario']!r}"
    if scenarios is not None and scenario.name not in scenarios:
        return f"scenario {scenario.name} does not belong in this file"
    if row["bits"] != scenario.bits:
        return f"bits {row['bits']!r}, scenario {scenario.name} has {scenario.bits}"
    return None


def _score_problem(row: Mapping[str, str], hd95: bool, lesion_wise: bool) -> str | None:
    """The first score cell of a row that is not a valid value (None: all are)."""
    cells = [(key, row[key], "dice", key != "ETpp") for key in DICE_KEYS]  # ETpp: empty from scorers without it
    cells += [(key, row[key], "distance", hd95) for key in SCORE_KEYS if key.startswith("HD95_") and key in row]
    cells += [
        (key, row.get(key, ""), "dice" if key.startswith("LesionWise_Dice") else "distance", lesion_wise)
        for key in LESION_WISE_KEYS  # absent from the files of older versions
    ]
    for key, cell, kind, required in cells:
        if not cell:  # empty: computed without that metric, or cut short
            if required:
                return f"no {key}"
            continue
        if cell == "nan" and key in LESION_WISE_KEYS:  # no lesion of the region in the prediction nor the truth
            continue
        value = _number(cell)
        if value is None or value < 0 or (kind == "dice" and value > 1):
            return f"{key} {cell!r} is not a {'Dice score' if kind == 'dice' else 'distance'}"
    return None


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank ``(line number, fields)`` of a per-case results file (none when it does not
    exist), refusing a file that cannot be one (see :func:`read_rows`)."""
    if not path.exists() and not path.is_symlink():
        return list(PER_CASE_HEADER), []
    if not path.is_file():
        raise _damaged(path, "not a file")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            lines = [(reader.line_num, values) for values in reader if values]
    except (UnicodeDecodeError, csv.Error) as err:
        raise _damaged(path, f"not a per-case results file ({type(err).__name__}: {err})") from None
    if header is None or not set(_REQUIRED_COLUMNS) <= set(header):
        raise _damaged(path, f"not a per-case results file (columns {header}, expected {','.join(PER_CASE_HEADER)})")
    return header, lines


def read_rows(
    path: Path,
    scenarios: Sequence[Scenario] | None = None,
    hd95: bool = False,
    damaged: str = "ignored",
    lesion_wise: bool = False,
) -> list[dict[str, str]]:
    """The valid rows of a per-case results file (``per_case_<tag>.csv``); none when it does not exist.

    A row is valid when it has every column of its file's header, a case, a known scenario (one of ``scenarios``
    when given) with its bits, Dice scores in [0, 1], and numbers (or, without ``hd95``, nothing) in the other
    columns; lesion-wise columns hold numbers or ``nan``, and may be empty or absent (files of older versions)
    unless ``lesion_wise`` asks for them. Damaged rows, e.g. one cut short by a full disk, are left out with a
    warning naming the file and line that says what happens to them (``damaged``: e.g. "computed again").

    Raises:
        DamagedResultsError: the path is not a file, not UTF-8 CSV text, or lacks the evaluator's columns.
    """
    header, lines = _read_table(path)
    names = {s.name for s in scenarios} if scenarios is not None else None
    rows = []
    for line, values in lines:
        row = dict(zip(header, values + [""] * (len(header) - len(values)), strict=False))
        problem = _row_problem(row, len(values), header, names, hd95, lesion_wise)
        if problem is None:
            rows.append(row)
        else:
            log.warning("%s, line %d: damaged row (%s): %s", path, line, problem, damaged)
    return rows


def evaluate(
    model: SegModel,
    root: str | Path,
    cases: Sequence[str],
    out_dir: str | Path,
    scenarios: Sequence[Scenario] = SCENARIOS,
    options: EvalOptions | None = None,
    device: torch.device | str = "cpu",
    save_nifti: bool = False,
    overwrite: bool = False,
) -> list[dict[str, str]]:
    """Score ``cases`` under every scenario; resumable and shard-friendly (see the module docstring).

    ``overwrite`` discards the results already in ``out_dir``; without it, results of another model or other
    settings there stop the run (:class:`ResultsMismatchError`), and so do results files it cannot read
    (:class:`DamagedResultsError`), before any scenario is computed. Damaged rows are computed again.

    Returns:
        The summary rows (also written to ``summary.*``).
    """
    options = options or EvalOptions()
    device = torch.device(device)
    out = Path(out_dir)
    check_cases(root, cases)
    check_pipeline(model, root, cases)
    if options.lesion_wise:
        check_lesion_wise()
    predictions = out / "predictions"
    if save_nifti and predictions.exists() and not predictions.is_dir():
        raise DamagedResultsError(f"{predictions}: not a folder, where --save_nifti writes label maps: move it away")
    per_case = shard_file(out, scenarios)
    identity = evaluation_identity(model, options, root, cases, device)
    claim_results_folder(out, identity, overwrite, per_case)
    rows = read_rows(per_case, scenarios, hd95=options.hd95, damaged="computed again", lesion_wise=options.lesion_wise)
    done = {(r["case"], r["scenario"]) for r in rows}

    def needed(case: str, s: Scenario) -> bool:
        # a finished row is redone when --save_nifti asks for a label map it did not write (an earlier run without)
        return (case, s.name) not in done or (save_nifti and not (predictions / _prediction_name(case, s)).is_file())

    model.eval()
    for case in tqdm(cases, desc="cases", disable=not options.progress):
        todo = [s for s in scenarios if needed(case, s)]
        if not todo:
            continue
        redone = {s.name for s in todo}
        rows = [r for r in rows if not (r["case"] == case and r["scenario"] in redone)]
        t0 = time.time()
        image, label = load_case(root, case)
        origin = case_origin(model, root, case)
        spacing = case_spacing(root, case)
        preds = segment(model, torch.from_numpy(image), [s.mask for s in todo], options, device, origin)
        seconds = (time.time() - t0) / len(todo)
        lesion_scorer = lesion_wise_scorer(root, case, label) if options.lesion_wise else None
        for s, pred in zip(todo, preds, strict=True):
            scores = case_scores(
                pred.numpy(), label, etpp_threshold=options.etpp_threshold, spacing=spacing, hd95=options.hd95
            )
            lesion = lesion_scorer(pred.numpy()) if lesion_scorer is not None else None
            rows.append(
                {"case": case, "scenario": s.name, "bits": s.bits, "seconds": f"{seconds:.2f}",
                 **score_cells(scores, lesion)}
            )  # fmt: skip
        # the label maps too are written only while the folder is still this evaluation's
        save_maps = partial(_save_predictions, root, case, todo, preds, predictions) if save_nifti else None
        write_results(out, identity, per_case, rows, save_maps)
    return summarize(out, identity)


def _save_predictions(
    root: str | Path, case: str, scenarios: Sequence[Scenario], preds: torch.Tensor, out: Path
) -> None:
    """Write the label maps ``preds`` ``(S, H, W, D)`` of one case in its original geometry (uncropped; source
    affine and header), one per scenario."""
    from brats_core.data.preprocessing import write_label_original_geometry

    out.mkdir(parents=True, exist_ok=True)
    for scenario, pred in zip(scenarios, preds, strict=True):
        write_label_original_geometry(pred.numpy(), root, case, out / _prediction_name(case, scenario))


def _prediction_name(case: str, scenario: Scenario) -> str:
    return f"{case}_{scenario.bits}.nii.gz"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarize(out_dir: str | Path, identity: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """Merge every ``per_case_*.csv`` in ``out_dir`` into ``summary.csv``, ``summary.md`` and ``summary.json``.

    Rows: the scenarios present, in upstream order, each the mean over its cases, then ``mean`` over scenarios.
    Damaged rows and files that cannot be read as results are left out with a warning. With ``identity`` (the
    evaluation that writes the folder) the summary is written only while the folder's record is still its own.
    """
    out = Path(out_dir)
    with results_lock(out):
        if identity is not None:
            _recheck(out, identity)
        return _summarize(out)


def _summarize(out: Path) -> list[dict[str, str]]:
    merged: dict[tuple[str, str], dict[str, str]] = {}
    for path in result_files(out):
        try:
            rows = read_rows(path, damaged="left out of the summary")
        except DamagedResultsError as err:
            log.warning("%s (left out of the summary)", err)
            continue
        for r in rows:
            merged[(r["case"], r["scenario"])] = r
    by_scenario: dict[str, list[dict[str, str]]] = {}
    for r in merged.values():
        by_scenario.setdefault(r["scenario"], []).append(r)
    metrics = [m for m in (*SCORE_KEYS, *LESION_WISE_KEYS) if any(r.get(m) not in (None, "") for r in merged.values())]
    summary: list[dict[str, str]] = []
    for s in SCENARIOS:
        if s.name not in by_scenario:
            continue
        rs = by_scenario[s.name]
        summary.append(
            {
                "scenario": s.name,
                "display": s.display,
                "bits": s.bits,
                "cases": str(len(rs)),
                **{m: f"{_mean([float(r[m]) for r in rs if r.get(m)]):.4f}" for m in metrics},
            }
        )
    if summary:
        summary.append(
            {
                "scenario": "mean",
                "display": "Mean",
                "bits": "",
                "cases": str(len({c for c, _ in merged})),
                **{m: f"{_mean([float(r[m]) for r in summary]):.4f}" for m in metrics},
            }
        )
    header = ("scenario", "display", "bits", "cases", *metrics)
    write_csv(out / "summary.csv", header, summary)
    md = ["| Scenario | Cases | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    md += [f"| {r['display']} | {r['cases']} | " + " | ".join(r[m] for m in metrics) + " |" for r in summary]
    save_text(out / "summary.md", "\n".join(md) + "\n")
    save_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def format_table(summary: Sequence[Mapping[str, str]]) -> str:
    """The summary as a fixed-width text table for the terminal."""
    if not summary:
        return "(no results)"
    metrics = [k for k in (*SCORE_KEYS, *LESION_WISE_KEYS) if k in summary[0]]
    widths = [max(9, len(m) + 1) for m in metrics]
    lines = [f"{'scenario':<26}" + "".join(f"{m:>{w}}" for m, w in zip(metrics, widths, strict=True))]
    lines += [
        f"{r['display']:<26}" + "".join(f"{float(r[m]):>{w}.4f}" for m, w in zip(metrics, widths, strict=True))
        for r in summary
    ]
    return "\n".join(lines)
