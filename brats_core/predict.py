"""Segment new patients: any non-empty subset of FLAIR, T1ce, T1, T2 → a BraTS label map in the original grid.

Python API::

    predictor = Predictor("best.pth")                      # method and architecture come from the checkpoint
    labels = predictor.predict_arrays({"flair": f, "t2": t2})  # (X, Y, Z) uint8 in the input grid
    labels, affine, header, used = predictor.predict_case("BraTS-GLI-00001-000/")

Command line (``predict.py`` at the repository root)::

    python predict.py --checkpoint best.pth -i CASES/ -o predictions/ [--continue]
    python predict.py --checkpoint best.pth --flair a_flair.nii.gz --t2 a_t2.nii.gz -o a-seg.nii.gz

Preprocessing is the training one (:func:`brats_core.preprocessing.preprocess_arrays` with the model's patch size);
missing modalities are masked; the prediction is placed back into the original grid with
:func:`brats_core.preprocessing.uncrop` and written (atomically) with the reference modality's affine and header (the
first available one in canonical order).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint, load_state_dict_strict
from .evaluation import EvalOptions, segment
from .io import CaseFiles, find_case_files, load_nifti_header, save_nifti
from .labels import REGION_NAMES, REGIONS
from .modalities import BRATS2023_SUFFIXES, LEGACY_SUFFIXES, MODALITIES
from .preprocessing import load_case, preprocess_arrays, uncrop
from .registry import SegModel, build_from_config
from .training import resolve_device

log = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_ENDING_RE = re.compile(
    r"[-_](" + "|".join(sorted({*BRATS2023_SUFFIXES.values(), *LEGACY_SUFFIXES.values()}, key=len, reverse=True))
    + r")$",
    re.IGNORECASE,
)  # fmt: skip


class PredictError(ValueError):
    """A case cannot be predicted (bad input or checkpoint); the message says why."""


def _strip_nifti(name: str) -> str:
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_name_from_files(files: Mapping[str, str | os.PathLike[str]]) -> str:
    """Case id of explicit modality files: the reference file's name without ``.nii[.gz]`` and modality ending."""
    ref = next(Path(files[m]) for m in MODALITIES if m in files)
    return _ENDING_RE.sub("", _strip_nifti(ref.name)) or _strip_nifti(ref.name)


def tumour_volumes_ml(labels: np.ndarray, header: nib.Nifti1Header | None) -> dict[str, float]:
    """WT/TC/ET volumes in ml of a label map ``(X, Y, Z)``, from the header's voxel spacing (1 mm³ without one)."""
    voxel_mm3 = float(np.prod(header.get_zooms()[:3])) if header is not None else 1.0
    return {r: float(np.count_nonzero(np.isin(labels, REGIONS[r]))) * voxel_mm3 / 1000.0 for r in REGION_NAMES}


class Predictor:
    """A trained model ready to segment cases with any subset of the modalities.

    Args:
        checkpoint: one of our checkpoints (``.pth`` or ``.safetensors``) recording ``method`` and ``config``.
        device: ``auto``, ``cpu`` or ``cuda``.
        overlap, blend, tta, sw_batch_size, amp: sliding-window options (see :class:`EvalOptions`).

    Raises:
        PredictError: the checkpoint does not record its method (e.g. an upstream checkpoint: use the method's
            test script, which infers the architecture from the weights).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        device: str | torch.device = "auto",
        overlap: float = 0.5,
        blend: str = "uniform",
        tta: bool = False,
        sw_batch_size: int = 1,
        amp: bool = False,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        ckpt = load_checkpoint(self.checkpoint)
        method = ckpt.get("method")
        if not method:
            raise PredictError(
                f"{self.checkpoint} does not record which method it holds (no 'method' entry): predict.py needs a "
                "checkpoint written by this project's training scripts (upstream checkpoints: use the method's "
                "test script, or re-save the model with brats_core.checkpoint.save_checkpoint(..., method=, config=))"
            )
        if "config" not in ckpt:
            raise PredictError(f"{self.checkpoint} records method {method!r} but no model 'config' entry")
        self.method: str = str(method)
        self.device = resolve_device(device) if isinstance(device, str) else device
        model = build_from_config(self.method, dict(ckpt["config"]))
        load_state_dict_strict(model, ckpt["state_dict"], str(self.checkpoint))
        self.model: SegModel = model.to(self.device).eval()
        self.options = EvalOptions(
            overlap=overlap, blend=blend, tta=tta, sw_batch_size=sw_batch_size, amp=amp, hd95=False, progress=False
        )

    @property
    def patch_size(self) -> int:
        """The model's training patch side (also the crop minimum and sliding-window size)."""
        return self.model.patch_size

    def predict_arrays(self, images: Mapping[str, np.ndarray], affine: np.ndarray | None = None) -> np.ndarray:
        """Segment one case held in memory.

        Args:
            images: modality key (``flair``, ``t1ce``, ``t1``, ``t2``) -> ``(X, Y, Z)``, any non-empty subset; absent
                modalities are masked.
            affine: ``(4, 4)`` voxel-to-world of the images; the prediction is in the voxel grid, so it is not needed,
                and only checked for shape.

        Returns:
            uint8 BraTS labels ``(X, Y, Z)`` in {0, 1, 2, 3}, in the input grid.
        """
        if affine is not None and np.shape(affine) != (4, 4):
            raise ValueError(f"affine must be (4, 4), got {np.shape(affine)}")
        vol, _, meta = preprocess_arrays(images, patch_size=self.patch_size)
        mask = tuple(m in meta["available"] for m in MODALITIES)
        image = torch.from_numpy(np.ascontiguousarray(vol.transpose(3, 0, 1, 2)))
        with torch.no_grad():
            labels = segment(self.model, image, [mask], self.options, self.device)[0].numpy()  # type: ignore[list-item]
        return uncrop(labels.astype(np.uint8), meta)

    def predict_case(
        self, case: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]
    ) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header, tuple[str, ...]]:
        """Segment one case from files.

        Args:
            case: a case folder (BraTS 2023 or 2018–2021 names, any non-empty subset of modalities) or an explicit
                mapping modality key -> file.

        Returns:
            ``(labels uint8 (X, Y, Z), reference affine (4, 4), reference header, modalities used)``; the reference
            is the first available modality in canonical order.

        Raises:
            CaseFilesError, NiftiError, ValueError: missing/ambiguous/unreadable files, or modalities whose shapes or
                affines differ (the message names the files).
        """
        files = resolve_case(case)
        images, _, _ = load_case(CaseFiles(files.case, files.folder, files.images))
        ref = files.images[files.available[0]]
        affine, header = load_nifti_header(ref)
        return self.predict_arrays(images, affine), affine, header, files.available


def resolve_case(case: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]) -> CaseFiles:
    """The :class:`CaseFiles` of a case folder or of an explicit modality -> file mapping (label ignored)."""
    if isinstance(case, Mapping):
        unknown = set(case) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modality keys {sorted(unknown)}; use {list(MODALITIES)}")
        given = {m: Path(case[m]) for m in MODALITIES if case.get(m) is not None}
        if not given:
            raise ValueError("no modality file given")
        for path in given.values():
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
        first = next(iter(given.values()))
        return CaseFiles(case_name_from_files(given), first.parent, given)
    return find_case_files(case, require=())


# ---------------------------------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class Job:
    """One case to predict: its id, input (folder or explicit files) and output file."""

    case: str
    source: Path | dict[str, Path]
    output: Path


def _is_nifti_path(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


def _has_case_files(folder: Path) -> bool:
    """A folder holding NIfTI files is a case (its discovery errors, e.g. an ambiguous modality, surface later);
    otherwise it is a folder of cases."""
    return any(p.is_file() and _is_nifti_path(p) for p in folder.iterdir())


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """The cases named on the command line with their output files."""
    explicit = {m: Path(getattr(args, m)) for m in MODALITIES if getattr(args, m)}
    output = Path(args.output) if args.output else None
    if explicit:
        case = case_name_from_files(explicit)
        if output is None:
            output = Path("predictions")
        target = output if _is_nifti_path(output) else output / f"{case}-seg.nii.gz"
        return [Job(case, explicit, target)]
    root = Path(args.input)
    if not root.is_dir():
        raise PredictError(f"{root}: not a folder (give a case folder or a folder of case folders)")
    if _has_case_files(root):
        folders = [root]
    else:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise PredictError(f"{root}: neither a case folder (no modality files found) nor a folder of case folders")
    if output is None:
        output = Path("predictions")
    if _is_nifti_path(output):
        if len(folders) != 1:
            raise PredictError(f"-o {output} is a file name but {root} holds {len(folders)} cases: give a folder")
        return [Job(folders[0].name, folders[0], output)]
    return [Job(f.name, f, output / f"{f.name}-seg.nii.gz") for f in folders]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predict.py",
        description="Segment brain tumours in new cases with any subset of FLAIR, T1ce, T1, T2 (missing ones masked).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint written by a training script (records the method)")
    src = p.add_argument_group("input (either -i or explicit modality files)")
    src.add_argument("-i", "--input", default=None, help="a case folder, or a folder of case folders")
    for m in MODALITIES:
        src.add_argument(f"--{m}", default=None, metavar="FILE", help=f"{m} NIfTI file of a single case")
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="output folder (<output>/<case>-seg.nii.gz; default ./predictions) or, for one case, a .nii.gz file",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: CUDA when available")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    p.add_argument("--blend", default="uniform", choices=["uniform", "gaussian"], help="window blending")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips")
    p.add_argument("--sw_batch_size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    p.add_argument("--continue", dest="resume", action="store_true", help="skip cases whose output file already exists")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _summary_line(case: str, used: Sequence[str], volumes: Mapping[str, float], seconds: float) -> str:
    vols = " ".join(f"{r} {volumes[r]:.1f}" for r in REGION_NAMES)
    return f"{case}: modalities {'+'.join(used)} | volumes (ml) {vols} | {seconds:.1f} s"


def main(argv: Sequence[str] | None = None) -> int:
    """``predict.py``: returns 0 when every case was written or skipped, 1 when any failed, 2 on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = [m for m in MODALITIES if getattr(args, m)]
    if bool(args.input) == bool(explicit):
        parser.error("give either -i INPUT or at least one of --flair/--t1ce/--t1/--t2 (not both)")
    if not 0 <= args.overlap < 1:
        parser.error(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.sw_batch_size < 1:
        parser.error(f"--sw_batch_size must be positive, got {args.sw_batch_size}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        jobs = plan_jobs(args)
        predictor = Predictor(
            args.checkpoint, args.device, overlap=args.overlap, blend=args.blend, tta=args.tta,
            sw_batch_size=args.sw_batch_size, amp=args.amp,
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    written, skipped, failed = 0, 0, []
    bar = tqdm(jobs, desc="cases", unit="case", disable=args.no_progress or len(jobs) < 2, file=sys.stderr)
    for job in bar:
        if args.resume and job.output.is_file():
            skipped += 1
            tqdm.write(f"{job.case}: skipped ({job.output} exists)", file=sys.stdout)
            continue
        start = time.perf_counter()
        try:
            labels, affine, header, used = predictor.predict_case(job.source)
            save_nifti(job.output, labels, affine, header)
        except Exception as err:  # one bad case must not stop the others; the summary lists it
            failed.append((job.case, f"{type(err).__name__}: {err}"))
            tqdm.write(f"{job.case}: FAILED: {err}", file=sys.stderr)
            continue
        written += 1
        volumes = tumour_volumes_ml(labels, header)
        tqdm.write(_summary_line(job.case, used, volumes, time.perf_counter() - start), file=sys.stdout)
    bar.close()
    print(f"done: {written} written, {skipped} skipped, {len(failed)} failed (of {len(jobs)})")
    for case, reason in failed:
        print(f"  failed {case}: {reason}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["PredictError", "Predictor", "main", "plan_jobs", "resolve_case", "tumour_volumes_ml"]
