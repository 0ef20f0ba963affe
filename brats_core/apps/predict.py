"""Segment new patients: any non-empty subset of FLAIR, T1ce, T1, T2 → a BraTS label map in the original grid.

Python API::

    predictor = Predictor("best.pth")                      # method and architecture come from the checkpoint
    labels = predictor.predict_arrays({"flair": f, "t2": t2})  # (X, Y, Z) uint8 in the input grid
    pred = predictor.predict_case("BraTS-GLI-00001-000/", probabilities=True)  # a Prediction: labels, probabilities,
                                                                               # modalities, affine, header

Command line (``predict.py`` at the repository root, or ``python -m brats_core.apps.predict``)::

    python predict.py --checkpoint best.pth -i CASES/ -o predictions/ [--continue] [--save_probabilities] [--workers 2]
    python predict.py --checkpoint best.pth --flair a_flair.nii.gz --t2 a_t2.nii.gz -o a-seg.nii.gz
    python predict.py --checkpoint fold0.pth fold1.pth -i CASES/ -o predictions/ --save_uncertainty  # an ensemble

Several checkpoints (folds, seeds or methods) make an ensemble: each member runs its own preprocessing and sliding
window, their probabilities are averaged in the input grid, and the labels follow from the mean as for one model
(:class:`Predictor`). ``--save_uncertainty`` writes the voxel-wise entropy of the (averaged) probabilities
(:func:`entropy_map`) as ``<case>-uncertainty.nii.gz``.

Outputs replace only files predict.py wrote (NIfTI files marked in their header, probability files by an entry),
other files only with ``--overwrite``, and a case's ground truth never; temporaries of a killed run are removed
from the output folders.

Preprocessing is the training one (:meth:`SegModel.preprocess`: the shared pipeline unless a method has its own);
missing modalities are masked; the prediction is placed back into the original grid with
:func:`brats_core.data.preprocessing.uncrop` and written (atomically) with the reference modality's affine and header
(the first available one in canonical order). Checkpoints written by a method's own tool (MaM: nnU-Net's
``fold_N/checkpoint_*.pth``) are opened by that method's registered ``checkpoint_reader``, which brings its own
pipeline (:class:`CaseEngine`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from brats_core.data.preprocessing import non_case_note, read_case_images, scan_cases, uncrop
from brats_core.engine.evaluation import EvalOptions, window_origin
from brats_core.engine.inference import outputs_to_labels, outputs_to_probabilities, predict_scenarios
from brats_core.labels import LABEL_NAMES, REGION_NAMES, REGIONS, label_to_regions, regions_to_labels
from brats_core.modalities import MODALITIES
from brats_core.registry import OutputKind, SegModel, build_from_config, checkpoint_readers
from brats_core.utils.checkpoint import load_checkpoint, load_state_dict_strict
from brats_core.utils.cli import UsageError, add_progress_arg, describe_os_error, run_main
from brats_core.utils.device import resolve_device
from brats_core.utils.io import (
    LABEL_KEY,
    PREDICTION_MARK,
    CaseFiles,
    atomic_path,
    broken_link,
    file_key,
    file_stem,
    find_case_files,
    has_case_files,
    load_nifti_header,
    make_output_folder,
    remove_stale_temporaries,
    save_nifti,
    written_by_predict,
)

log = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class PredictError(ValueError):
    """A case cannot be predicted (bad input or checkpoint); the message says why."""


def _strip_nifti(name: str) -> str:
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_name_from_files(files: Mapping[str, str | os.PathLike[str]]) -> str:
    """Case id of explicit modality files: the reference file's name without ``.nii[.gz]`` and its BraTS modality
    ending (a name without one is kept whole)."""
    ref = next(Path(files[m]) for m in MODALITIES if m in files)
    return file_stem(ref.name) or _strip_nifti(ref.name)


def _describe_error(err: BaseException) -> str:
    """One line: an OS error with its file and cause (e.g. ``…-seg.nii.gz: no space left on device (…)``)."""
    return describe_os_error(err) if isinstance(err, OSError) else str(err)


def tumour_volumes_ml(labels: np.ndarray, affine: np.ndarray | None) -> dict[str, float]:
    """WT/TC/ET volumes in ml of a label map ``(X, Y, Z)``; the voxel volume is that of ``affine`` (the one the label
    map is written with, whatever the header's pixdim say), 1 mm³ without one."""
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) if affine is not None else 1.0
    return {r: float(np.count_nonzero(np.isin(labels, REGIONS[r]))) * voxel_mm3 / 1000.0 for r in REGION_NAMES}


@dataclass
class Prediction:
    """One segmented case, in the input (original) voxel grid.

    Attributes:
        labels: uint8 BraTS labels ``(X, Y, Z)`` in {0, 1, 2, 3}.
        modalities: the modalities used, canonical order.
        probabilities: float16 ``(C, X, Y, Z)`` when requested: class probabilities (C = 4, ``channels`` =
            background, NCR, ED, ET; outside the brain crop background = 1) for class methods, region probabilities
            (C = 3, WT, TC, ET; 0 outside the crop) for sigmoid methods.
        channels: names of the probability channels.
        affine, header: the reference modality's (first available in canonical order) when read from files.
        uncertainty: float32 ``(X, Y, Z)`` when requested: the voxel-wise entropy of the probabilities (an
            ensemble's: of its members' mean), in nats, 0 outside the crop (see :func:`entropy_map`).
    """

    labels: np.ndarray
    modalities: tuple[str, ...]
    probabilities: np.ndarray | None = None
    channels: tuple[str, ...] = ()
    affine: np.ndarray | None = None
    header: nib.Nifti1Header | None = None
    uncertainty: np.ndarray | None = None

    def regions(self) -> np.ndarray:
        """Binary region maps, uint8 ``(X, Y, Z, 3)`` in WT, TC, ET order (derived from :attr:`labels`)."""
        return np.moveaxis(label_to_regions(self.labels), 0, -1).astype(np.uint8)


@dataclass
class LoadedCase:
    """The images of one case read from disk, ready for :meth:`Predictor.predict`."""

    images: dict[str, np.ndarray]
    affine: np.ndarray
    header: nib.Nifti1Header
    modalities: tuple[str, ...]


class CaseEngine(Protocol):
    """What a method's ``checkpoint_reader`` returns for a checkpoint another tool wrote (see
    :func:`brats_core.registry.register`; MaM: ``MaM.trained_model.NnUNetCasePredictor``)."""

    model: SegModel

    def predict(
        self, images: Mapping[str, np.ndarray], probabilities: bool, spacing: Sequence[float] | None
    ) -> Prediction: ...


def _open_foreign(path: Path, device: torch.device, options: EvalOptions) -> CaseEngine | None:
    """The first method whose checkpoint reader recognises ``path``, as an engine; None when none does."""
    for method, reader in checkpoint_readers():
        engine = reader(path, device, options)
        if engine is not None:
            log.info("%s: %s checkpoint read by %s's reader", path, method, method)
            return engine
    return None


CheckpointPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""One checkpoint path, or several (an ensemble)."""


class _MemberOutput(NamedTuple):
    """What one checkpoint gives for a case, in the input grid: labels ``(X, Y, Z)`` uint8, the modalities used and,
    when asked for, float32 probabilities ``(C, X, Y, Z)`` with their channel names."""

    labels: np.ndarray
    modalities: tuple[str, ...]
    probabilities: np.ndarray | None = None
    channels: tuple[str, ...] = ()


def probability_kind(model: SegModel) -> str:
    """``"class"`` for softmax and logit methods (probabilities of background, NCR, ED, ET), ``"region"`` for sigmoid
    methods (probabilities of WT, TC, ET): what an ensemble of ``model`` with others averages."""
    return "region" if model.output_kind is OutputKind.REGION_LOGITS else "class"


class _Member:
    """One checkpoint: its model, or the engine of the method whose reader opened it, with its window options."""

    def __init__(self, checkpoint: Path, device: torch.device, options: EvalOptions) -> None:
        self.checkpoint = checkpoint
        self.options = options
        blend = options.blend  # None: the method's own, known once the model is
        try:
            ckpt: dict | None = load_checkpoint(checkpoint)
            failure: Exception | None = None
        except (RuntimeError, ValueError) as err:
            ckpt, failure = None, err
        self.engine: CaseEngine | None = None
        if ckpt is None or not ckpt.get("method"):
            self.engine = _open_foreign(checkpoint, device, options)
            if self.engine is None:
                raise failure or PredictError(
                    f"{checkpoint} does not record which method it holds (no 'method' entry): predict.py needs "
                    "a checkpoint written by this project's training scripts or by nnU-Net for MaM (upstream "
                    "checkpoints: use the method's test script, or re-save the model with "
                    "brats_core.utils.checkpoint.save_checkpoint(..., method=, config=))"
                )
            self.model: SegModel = self.engine.model
        else:
            if "config" not in ckpt:
                raise PredictError(f"{checkpoint} records method {ckpt['method']!r} but no model 'config' entry")
            model = build_from_config(str(ckpt["method"]), dict(ckpt["config"]))
            load_state_dict_strict(model, ckpt["state_dict"], str(checkpoint))
            self.model = model.to(device).eval()
        self.method: str = self.model.method_name
        self.options.blend = blend or self.model.default_blend
        self.device = device

    def run(
        self, images: Mapping[str, np.ndarray], probabilities: bool, spacing: Sequence[float] | None
    ) -> _MemberOutput:
        """The labels (and the probabilities when asked for) of one case."""
        if self.engine is not None:
            pred = self.engine.predict(images, probabilities, spacing)
            probs = None if pred.probabilities is None else pred.probabilities.astype(np.float32)
            return _MemberOutput(pred.labels, pred.modalities, probs, pred.channels)
        vol, meta = self.model.preprocess(images)
        used = tuple(m for m in MODALITIES if m in meta["available"])
        mask = tuple(m in used for m in MODALITIES)
        image = torch.from_numpy(np.ascontiguousarray(vol.transpose(3, 0, 1, 2))).unsqueeze(0).to(self.device)
        o = self.options
        blended = predict_scenarios(
            self.model, image, [mask], overlap=o.overlap, blend=o.blend or self.model.default_blend,
            sw_batch_size=o.sw_batch_size, tta=o.tta,
            amp=o.amp, use_encode=o.use_encode, progress=o.progress, origin=window_origin(self.model, meta),
        )[0]  # fmt: skip
        kind, order = self.model.output_kind, self.model.region_order
        labels = uncrop(outputs_to_labels(blended, kind, order).to(torch.uint8).cpu().numpy(), meta)
        if not probabilities:
            return _MemberOutput(labels, used)
        probs, channels = outputs_to_probabilities(blended, kind, order)
        # Outside the crop there is no tumour: background probability 1 for classes, 0 for every region.
        full = np.zeros((len(channels), *meta["original_shape"]), dtype=np.float32)
        if channels[0] == LABEL_NAMES[0]:
            full[0] = 1
        full[(slice(None), *(slice(int(lo), int(hi)) for lo, hi in meta["crop_box"]))] = (
            probs.float().clamp(0, 1).cpu().numpy()
        )
        return _MemberOutput(labels, used, full, channels)


def labels_from_probabilities(probabilities: np.ndarray, channels: Sequence[str]) -> np.ndarray:
    """The label map of (averaged) probabilities ``(C, X, Y, Z)``, by a single model's rule: the most probable class
    for class probabilities (ties: the first), regions with probability > 0.5 (i.e. logit > 0) nested ET ⊂ TC ⊂ WT
    for region probabilities in WT, TC, ET order. Returns uint8 ``(X, Y, Z)``."""
    if tuple(channels) == REGION_NAMES:
        return regions_to_labels(probabilities > 0.5, REGION_NAMES)
    return outputs_to_labels(torch.from_numpy(probabilities), OutputKind.PROBABILITIES).to(torch.uint8).numpy()


def entropy_map(probabilities: np.ndarray, channels: Sequence[str]) -> np.ndarray:
    """Voxel-wise entropy in nats (natural logarithm) of probabilities ``(C, X, Y, Z)``, float32 ``(X, Y, Z)``.

    Class probabilities: ``H = −Σ_c p_c ln p_c`` (0 to ln 4 ≈ 1.386). Region probabilities (WT, TC, ET: three
    sigmoids, not a distribution): the sum of the three binary entropies ``−p ln p − (1 − p) ln(1 − p)`` (0 to
    3 ln 2 ≈ 2.079). With ``0 ln 0 = 0``, a certain voxel (e.g. outside the brain crop: background 1, every region 0)
    has entropy 0.
    """
    p = torch.from_numpy(np.asarray(probabilities, dtype=np.float32)).clamp(0, 1)
    entropy = torch.special.entr(p).sum(dim=0)
    if tuple(channels) == REGION_NAMES:
        entropy += torch.special.entr(1 - p).sum(dim=0)
    return entropy.numpy()


def _checkpoint_paths(checkpoint: CheckpointPaths) -> list[Path]:
    """The checkpoint paths of a :class:`Predictor`, refusing none and repeats."""
    paths = [Path(checkpoint)] if isinstance(checkpoint, str | os.PathLike) else [Path(c) for c in checkpoint]
    if not paths:
        raise UsageError("no checkpoint given: give one, or several to ensemble them")
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise UsageError(f"{path} is given twice: an ensemble averages different checkpoints, give each once")
        seen.add(path.resolve())
    return paths


def _check_one_kind(members: Sequence[_Member]) -> None:
    """Refuse an ensemble of class-probability and region-probability methods (UsageError naming each)."""
    if len({probability_kind(m.model) for m in members}) > 1:
        listing = ", ".join(f"{m.checkpoint} ({m.method}: {probability_kind(m.model)} probabilities)" for m in members)
        raise UsageError(
            f"cannot ensemble {listing}: class probabilities (background, NCR, ED, ET) and region probabilities (WT, "
            "TC, ET) do not average; give checkpoints of softmax methods only or of sigmoid (region) methods only"
        )


def _probabilities_of(out: _MemberOutput, checkpoint: Path) -> np.ndarray:
    if out.probabilities is None:  # a method's reader that ignored the request
        raise PredictError(f"{checkpoint}: its reader returned no probabilities to average")
    return out.probabilities


class Predictor:
    """A trained model, or an ensemble of several, ready to segment cases with any subset of the modalities.

    An ensemble (several checkpoints: folds, seeds or methods) averages its members' probabilities in the input
    grid, each member running its own preprocessing and sliding window (window size, crop and normalisation may
    differ between methods); the labels then follow from the mean as for a single model (see
    :func:`labels_from_probabilities`). All members must give probabilities of one kind (:func:`probability_kind`):
    class probabilities (softmax and logit methods, mixed freely) or region probabilities (sigmoid methods, whatever
    their region order). A single checkpoint gives exactly its own labels and probabilities. With ``tta`` each
    member's probabilities are those of its outputs averaged over the 8 flips, as the method blends its windows
    (probabilities for the softmax methods, logits before the softmax or sigmoid for the others), and the members'
    are then averaged.

    Args:
        checkpoint: one checkpoint, or several to ensemble: ours (``.pth`` or ``.safetensors``) recording ``method``
            and ``config``, or one a method's own tool wrote (MaM: nnU-Net's ``fold_N/checkpoint_*.pth``), which that
            method's registered reader opens.
        device: ``auto``, ``cpu`` or ``cuda``.
        overlap, blend, tta, sw_batch_size, amp: sliding-window options (see :class:`EvalOptions`); ``blend`` None
            is each method's own (:attr:`SegModel.default_blend`).
        progress: a progress bar over the sliding windows of each case.

    Attributes:
        checkpoints: the checkpoint paths; ``checkpoint`` is the first.
        model, options: the first checkpoint's model and window options.
        method: the method's name; for an ensemble of several methods their names joined by ``+``.

    Raises:
        PredictError: a checkpoint does not record its method and no method's reader recognises it (e.g. an
            upstream checkpoint: use the method's test script, which infers the architecture from the weights).
        UsageError: no checkpoint, one given twice, or an ensemble mixing class and region probabilities.
    """

    def __init__(
        self,
        checkpoint: CheckpointPaths,
        device: str | torch.device = "auto",
        overlap: float = 0.5,
        blend: str | None = None,
        tta: bool = False,
        sw_batch_size: int = 1,
        amp: bool = False,
        progress: bool = False,
    ) -> None:
        self.checkpoints = tuple(_checkpoint_paths(checkpoint))
        self.device = resolve_device(device) if isinstance(device, str) else device
        self._members = tuple(
            _Member(
                path, self.device,
                EvalOptions(overlap=overlap, blend=blend, tta=tta, sw_batch_size=sw_batch_size, amp=amp, hd95=False,
                            progress=progress),
            )
            for path in self.checkpoints
        )  # fmt: skip
        _check_one_kind(self._members)
        first = self._members[0]
        self.checkpoint: Path = first.checkpoint
        self.model: SegModel = first.model
        self.options: EvalOptions = first.options
        self._engine: CaseEngine | None = first.engine
        self.method: str = "+".join(dict.fromkeys(m.method for m in self._members))
        if len(self._members) > 1:
            log.info(
                "ensemble of %d checkpoints (%s): their %s probabilities are averaged",
                len(self._members), ", ".join(f"{m.checkpoint} ({m.method})" for m in self._members),
                probability_kind(first.model),
            )  # fmt: skip

    @property
    def patch_size(self) -> int:
        """The (first) model's training patch side (also the crop minimum and sliding-window size)."""
        return self.model.patch_size

    def _run(self, images: Mapping[str, np.ndarray], probabilities: bool, spacing: Sequence[float] | None
             ) -> _MemberOutput:  # fmt: skip
        """One model's output, or the ensemble's: its members' mean probabilities and the labels they give."""
        if len(self._members) == 1:
            return self._members[0].run(images, probabilities, spacing)
        first, *others = (member.run(images, True, spacing) for member in self._members)
        total = _probabilities_of(first, self.checkpoint)
        for member, out in zip(self._members[1:], others, strict=True):
            probs = _probabilities_of(out, member.checkpoint)
            if out.channels != first.channels or probs.shape != total.shape:
                raise PredictError(
                    f"{member.checkpoint} gives probabilities {out.channels} of shape {probs.shape}, "
                    f"{self.checkpoint} {first.channels} of shape {total.shape}: they cannot be averaged"
                )
            total += probs
        total /= len(self._members)
        return _MemberOutput(labels_from_probabilities(total, first.channels), first.modalities, total, first.channels)

    def predict_probabilities(
        self, images: Mapping[str, np.ndarray], spacing: Sequence[float] | None = None
    ) -> tuple[np.ndarray, tuple[str, ...]]:
        """The probabilities of one case held in memory, in float32: the model's, or the mean of the members' for an
        ensemble (what its labels and uncertainty derive from).

        Returns:
            ``(probabilities (C, X, Y, Z) float32, channel names)``, as :attr:`Prediction.probabilities`.
        """
        out = self._run(images, True, spacing)
        assert out.probabilities is not None
        return out.probabilities, out.channels

    def predict(
        self,
        images: Mapping[str, np.ndarray],
        probabilities: bool = False,
        spacing: Sequence[float] | None = None,
        uncertainty: bool = False,
    ) -> Prediction:
        """Segment one case held in memory.

        Args:
            images: modality key (``flair``, ``t1ce``, ``t1``, ``t2``) -> ``(X, Y, Z)``, any non-empty subset; absent
                modalities are masked.
            probabilities: also return the per-voxel probabilities (float16).
            spacing: voxel size in mm along X, Y, Z; only models that resample (MaM's nnU-Net pipeline) use it,
                assuming their training spacing when it is None.
            uncertainty: also return the voxel-wise entropy of the (averaged) probabilities (:func:`entropy_map`).

        Returns:
            The :class:`Prediction` in the input grid (no affine/header: arrays carry none).
        """
        out = self._run(images, probabilities or uncertainty, spacing)
        pred = Prediction(out.labels, out.modalities)
        if out.probabilities is not None:
            if probabilities:
                pred.probabilities = torch.from_numpy(out.probabilities).to(torch.float16).numpy()
                pred.channels = out.channels
            if uncertainty:
                pred.uncertainty = entropy_map(out.probabilities, out.channels)
        return pred

    def predict_arrays(self, images: Mapping[str, np.ndarray], affine: np.ndarray | None = None) -> np.ndarray:
        """Labels only: ``predict(images).labels``, uint8 ``(X, Y, Z)``; ``affine`` (4, 4) is only shape-checked."""
        if affine is not None and np.shape(affine) != (4, 4):
            raise ValueError(f"affine must be (4, 4), got {np.shape(affine)}")
        return self.predict(images).labels

    @staticmethod
    def load(case: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]) -> LoadedCase:
        """Read a case folder (BraTS 2023 or 2018–2021 names, any non-empty subset) or a modality -> file mapping.

        Raises:
            CaseFilesError, NiftiError, ValueError: missing/ambiguous/unreadable files, or modalities whose shapes or
                affines differ (the message names the files).
        """
        files = resolve_case(case)
        images, _, _ = read_case_images(CaseFiles(files.case, files.folder, files.images))
        affine, header = load_nifti_header(files.images[files.available[0]])
        _warn_unlike_brats(files.case, affine)
        return LoadedCase(images, affine, header, tuple(files.available))

    def predict_case(
        self, case: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]] | LoadedCase,
        probabilities: bool = False, uncertainty: bool = False,
    ) -> Prediction:  # fmt: skip
        """Segment one case from files (see :meth:`load`); the result carries the reference affine and header."""
        loaded = case if isinstance(case, LoadedCase) else self.load(case)
        spacing = tuple(float(z) for z in loaded.header.get_zooms()[:3])
        pred = self.predict(loaded.images, probabilities, spacing, uncertainty)
        pred.affine, pred.header = loaded.affine, loaded.header
        return pred


def _warn_unlike_brats(case: str, affine: np.ndarray) -> None:
    """Nothing is reoriented or resampled (except by MaM's nnU-Net pipeline, which resamples): the models learnt
    BraTS's voxel grid, LPS-oriented at 1 mm, so say when a case differs."""
    axes = "".join(nib.aff2axcodes(affine))
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    if axes != "LPS" or np.any(np.abs(spacing - 1.0) > 0.1):
        log.warning(
            "%s: voxel axes %s at %s mm, the BraTS training data are LPS at 1 mm; the voxel grid is used as it is "
            "(no reorientation or resampling), which may lower the accuracy",
            case, axes, "×".join(f"{v:.2g}" for v in spacing),
        )  # fmt: skip


def resolve_case(case: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]) -> CaseFiles:
    """The :class:`CaseFiles` of a case folder or of an explicit modality -> file mapping (label ignored)."""
    if isinstance(case, Mapping):
        unknown = set(case) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modality keys {sorted(unknown)}; use {list(MODALITIES)}")
        given = {m: Path(case[m]) for m in MODALITIES if case.get(m) is not None}
        if not given:
            raise ValueError("no modality file given")
        _check_files_exist(given.values())
        first = next(iter(given.values()))
        return CaseFiles(case_name_from_files(given), first.parent, given)
    files = find_case_files(case, require=(), label=False)  # the label map is never read here
    note = files.ignored_note()
    if note:
        log.warning("%s", note)
    return files


def _check_files_exist(paths: Iterable[Path]) -> None:
    """Raise FileNotFoundError naming the first of ``paths`` that is not a readable file (a broken or looping
    symbolic link is named as such, not as an absent file)."""
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(broken_link(path) or f"{path}: no such file")


# ---------------------------------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class Job:
    """One case to predict: its id, input (folder or explicit files) and label-map file."""

    case: str
    source: Path | dict[str, Path]
    output: Path

    def _sibling(self, ending: str) -> Path:
        stem = _strip_nifti(self.output.name)
        stem = stem[: -len("-seg")] if stem.endswith("-seg") else stem
        return self.output.with_name(stem + ending)

    @property
    def probabilities(self) -> Path:
        """``<case>-prob.npz`` beside the label map (NIfTI has no float16)."""
        return self._sibling("-prob.npz")

    @property
    def regions(self) -> Path:
        """``<case>-regions.nii.gz`` beside the label map."""
        return self._sibling("-regions.nii.gz")

    @property
    def uncertainty(self) -> Path:
        """``<case>-uncertainty.nii.gz`` beside the label map."""
        return self._sibling("-uncertainty.nii.gz")

    def outputs(
        self, save_probabilities: bool = False, save_regions: bool = False, save_uncertainty: bool = False
    ) -> list[Path]:
        """The files this case writes: the label map and the requested extras."""
        paths = [self.output]
        if save_probabilities:
            paths.append(self.probabilities)
        if save_regions:
            paths.append(self.regions)
        if save_uncertainty:
            paths.append(self.uncertainty)
        return paths


def _is_nifti_path(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """The cases named on the command line with their output files."""
    explicit = {m: Path(getattr(args, m)) for m in MODALITIES if getattr(args, m)}
    output = Path(args.output) if args.output else None
    if explicit:
        _check_files_exist(explicit.values())
        case = case_name_from_files(explicit)
        if output is None:
            output = Path("predictions")
        target = output if _is_nifti_path(output) else output / f"{case}-seg.nii.gz"
        return [Job(case, explicit, target)]
    root = Path(args.input)
    if not root.is_dir():
        raise PredictError(f"{root}: not a folder (give a case folder or a folder of case folders)")
    if has_case_files(root):
        folders = [root]
    else:
        cases, others = scan_cases(root)
        folders = [root / case for case in cases]
        if not folders:
            raise PredictError(f"{root}: neither a case folder (no modality files found) nor a folder of case folders")
        note = non_case_note(root, others)
        if note:  # e.g. an empty case folder: the count of cases would not show it
            log.warning("%s", note)
    if output is None:
        output = Path("predictions")
    if _is_nifti_path(output):
        if len(folders) != 1:
            raise PredictError(f"-o {output} is a file name but {root} holds {len(folders)} cases: give a folder")
        return [Job(folders[0].name, folders[0], output)]
    return [Job(f.name, f, output / f"{f.name}-seg.nii.gz") for f in folders]


def check_outputs(
    jobs: Sequence[Job],
    save_probabilities: bool = False,
    save_regions: bool = False,
    overwrite: bool = False,
    *,
    save_uncertainty: bool = False,
) -> None:
    """Refuse outputs that would overwrite or shadow inputs or replace a user's files, and make sure every output
    folder can be written, before any model runs; then remove the temporaries a killed run left there.

    Args:
        jobs: the cases.
        save_probabilities, save_regions, save_uncertainty: the extras each case writes (see :meth:`Job.outputs`).
        overwrite: replace existing files that predict.py did not write (never a ground truth or an input).

    Raises:
        PredictError: an output inside a case folder (any folder holding modality files: BraTS 2023 names the ground
            truth ``<case>-seg.nii.gz``) or equal to an input file, an existing output file that predict.py did not
            write (without ``overwrite``), a non-lower-case NIfTI suffix, or an output folder that cannot be created
            or written.
    """
    for job in jobs:
        inputs = list(job.source.values()) if isinstance(job.source, dict) else []
        folder = job.source if isinstance(job.source, Path) else None
        name = job.output.name
        if _is_nifti_path(name) and not name.endswith((".nii", ".nii.gz")):
            raise PredictError(f"{job.output}: write the suffix in lower case (.nii.gz or .nii)")
        if any(job.output.resolve() == Path(f).resolve() for f in inputs):
            raise PredictError(f"{job.output}: this is an input file of case {job.case}; choose another output")
        parent = job.output.parent
        if folder is not None and parent.resolve() == folder.resolve():
            raise PredictError(
                f"-o {parent}: the output would go into the case folder {folder}, where it would overwrite "
                "or shadow the case's files (BraTS names the ground truth <case>-seg.nii.gz): choose another folder"
            )
        for out in job.outputs(save_probabilities, save_regions, save_uncertainty):
            _check_replaceable(out, overwrite)
    for parent in sorted({job.output.parent for job in jobs}):
        try:
            make_output_folder(parent)
        except OSError as err:
            raise PredictError(str(err)) from err
        remove_stale_temporaries(parent)  # logs each file it removes


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """Raise PredictError unless ``out`` is absent, a file predict.py wrote, or (with ``overwrite``) another file
    that is not a ground truth."""
    if out.is_dir():
        raise PredictError(f"{out} is a folder: choose another output")
    if not out.exists() or written_by_predict(out):
        return
    # e.g. modality files given one by one with -o their folder, or -o into another case's folder
    if file_key(out.name) == LABEL_KEY and has_case_files(out.parent):
        raise PredictError(
            f"{out} exists beside a case's images and was not written by predict.py (the ground truth?): "
            "choose another output"
        )
    if not overwrite:
        raise PredictError(
            f"{out} exists and was not written by predict.py: choose another output, or pass --overwrite to replace it"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predict.py",
        description="Segment brain tumours in new cases with any subset of FLAIR, T1ce, T1, T2 (missing ones masked).",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        metavar="CHECKPOINT",
        help="checkpoint written by a training script (records the method), or MaM's nnU-Net fold_N/checkpoint_*.pth; "
        "several (folds, seeds or methods, all softmax or all sigmoid methods) are ensembled: their probabilities "
        "are averaged",
    )
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
    p.add_argument(
        "--blend",
        default=None,
        choices=["uniform", "gaussian"],
        help="window blending (default: the method's own: uniform as the paper's protocol, Gaussian for MaM)",
    )
    p.add_argument("--tta", action="store_true", help="average over the 8 flips")
    p.add_argument("--sw_batch_size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    p.add_argument(
        "--save_probabilities",
        action="store_true",
        help="also write <case>-prob.npz: float16 (C, X, Y, Z) probabilities per class (background, NCR, ED, ET) or, "
        "for region methods, per region (WT, TC, ET), with their channel names and the affine",
    )
    p.add_argument(
        "--save_regions", action="store_true", help="also write <case>-regions.nii.gz: uint8 (X, Y, Z, 3) WT, TC, ET"
    )
    p.add_argument(
        "--save_uncertainty",
        action="store_true",
        help="also write <case>-uncertainty.nii.gz: float32 voxel-wise entropy in nats of the probabilities "
        "--save_probabilities writes (several checkpoints: their mean; with --tta: of the outputs averaged over the "
        "flips): -sum p ln p over the classes, or the sum of the WT, TC, ET binary entropies for region methods; "
        "0 outside the brain crop",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="threads that read the next cases and write finished ones while the model runs (0: all in turn)",
    )
    p.add_argument("--continue", dest="resume", action="store_true", help="skip cases whose output files already exist")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files that predict.py did not write (by default they are refused; its own "
        "outputs are replaced, a ground truth beside a case's images never)",
    )
    add_progress_arg(p)
    return p


def _summary_line(case: str, used: Sequence[str], volumes: Mapping[str, float], started: float) -> str:
    vols = " ".join(f"{r} {volumes[r]:.1f}" for r in REGION_NAMES)
    return f"{case}: modalities {'+'.join(used)} | volumes (ml) {vols} | {time.perf_counter() - started:.1f} s"


def write_prediction(
    job: Job, pred: Prediction, save_probabilities: bool, save_regions: bool, save_uncertainty: bool = False
) -> None:
    """Write the label map (and the requested extras) of one case, each file atomically; extras first, so an
    interrupted run never leaves a label map without the files ``--continue`` would then expect."""
    if save_probabilities:
        if pred.probabilities is None:
            raise ValueError("probabilities were not computed")
        with atomic_path(job.probabilities) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(
                handle, probabilities=pred.probabilities, channels=np.array(pred.channels), affine=pred.affine,
                writer=np.array(PREDICTION_MARK),
            )  # fmt: skip
    if save_regions:
        save_nifti(job.regions, pred.regions(), pred.affine, pred.header, PREDICTION_MARK)
    if save_uncertainty:
        if pred.uncertainty is None:
            raise ValueError("the uncertainty was not computed")
        save_nifti(job.uncertainty, pred.uncertainty, pred.affine, pred.header, PREDICTION_MARK)
    save_nifti(job.output, pred.labels, pred.affine, pred.header, PREDICTION_MARK)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors that argparse cannot see (exit status 2 with the usage line)."""
    explicit = [m for m in MODALITIES if getattr(args, m)]
    if bool(args.input) == bool(explicit):
        parser.error("give either -i INPUT or at least one of --flair/--t1ce/--t1/--t2 (not both)")
    if not 0 <= args.overlap < 1:
        parser.error(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.sw_batch_size < 1:
        parser.error(f"--sw_batch_size must be positive, got {args.sw_batch_size}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")


def main(argv: Sequence[str] | None = None) -> int:
    """``predict.py``: returns 0 when every case was written or skipped, 1 when any failed, 2 on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        jobs = plan_jobs(args)
        predictor = Predictor(
            args.checkpoint, args.device, overlap=args.overlap, blend=args.blend, tta=args.tta,
            sw_batch_size=args.sw_batch_size, amp=args.amp, progress=not args.no_progress,
        )  # fmt: skip
        # before any case runs, after the checkpoint (which creates nothing) was found good
        check_outputs(jobs, args.save_probabilities, args.save_regions, args.overwrite,
                      save_uncertainty=args.save_uncertainty)  # fmt: skip
    except UsageError:
        raise  # one line, exit status 2 (run_main), before any output exists: e.g. an ensemble of mixed kinds
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {_describe_error(err)}", file=sys.stderr)
        return 1

    def done(job: Job) -> bool:
        return all(p.is_file() for p in job.outputs(args.save_probabilities, args.save_regions, args.save_uncertainty))

    todo = [job for job in jobs if not (args.resume and done(job))]
    for job in jobs:
        if job not in todo:
            print(f"{job.case}: skipped ({job.output} exists)")
    written, failed = _run_jobs(args, predictor, todo)
    print(f"done: {written} written, {len(jobs) - len(todo)} skipped, {len(failed)} failed (of {len(jobs)})")
    for case, reason in failed:
        print(f"  failed {case}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def _run_jobs(args: argparse.Namespace, predictor: Predictor, todo: Sequence[Job]) -> tuple[int, list[tuple[str, str]]]:
    """Predict and write ``todo``; returns the number written and ``(case, reason)`` of each failed case (one bad
    case never stops the others)."""
    written, failed = 0, []
    bar = tqdm(total=len(todo), desc="cases", unit="case", disable=args.no_progress or len(todo) < 2, file=sys.stderr)

    def fail(job: Job, err: Exception) -> None:
        failed.append((job.case, _describe_error(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"))
        tqdm.write(f"{job.case}: FAILED: {_describe_error(err)}", file=sys.stderr)
        bar.update()

    def settle(job: Job, pred: Prediction, started: float, write: Future[None]) -> None:
        nonlocal written
        try:
            write.result()
        except Exception as err:
            fail(job, err)
            return
        written += 1
        line = _summary_line(job.case, pred.modalities, tumour_volumes_ml(pred.labels, pred.affine), started)
        tqdm.write(line, file=sys.stdout)
        bar.update()

    # Up to --workers cases are read ahead and written behind while the model runs (gzip I/O mostly releases the
    # GIL); with --workers 0 every step runs in turn.
    ahead = args.workers
    with ThreadPoolExecutor(max_workers=max(ahead, 1)) as pool:
        queue = iter(todo)
        loads: deque[Future[LoadedCase]] = deque()
        writes: deque[tuple[Job, Prediction, float, Future[None]]] = deque()

        def read_next() -> None:
            if ahead and (job := next(queue, None)) is not None:
                loads.append(pool.submit(predictor.load, job.source))

        for _ in range(ahead):
            read_next()
        for job in todo:
            started = time.perf_counter()
            try:
                loaded = loads.popleft().result() if ahead else predictor.load(job.source)
                pred = predictor.predict_case(
                    loaded, probabilities=args.save_probabilities, uncertainty=args.save_uncertainty
                )
            except Exception as err:
                fail(job, err)
                continue
            finally:
                read_next()
            writes.append((job, pred, started, pool.submit(write_prediction, job, pred, args.save_probabilities,
                                                           args.save_regions, args.save_uncertainty)))  # fmt: skip
            while writes and (not ahead or writes[0][3].done()):
                settle(*writes.popleft())
        while writes:
            settle(*writes.popleft())
    bar.close()
    return written, failed


__all__ = [
    "LoadedCase",
    "PredictError",
    "Prediction",
    "Predictor",
    "check_outputs",
    "entropy_map",
    "labels_from_probabilities",
    "main",
    "plan_jobs",
    "probability_kind",
    "resolve_case",
    "tumour_volumes_ml",
    "write_prediction",
]

if __name__ == "__main__":
    raise SystemExit(run_main(main))
