"""A MaM model trained with nnU-Net, loaded for prediction by ``MaM/test.py`` and by the top-level ``predict.py``.

nnU-Net's trainer writes ``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_N/checkpoint_*.pth``:
the weights plus the plans and ``dataset.json`` it was trained with (``init_args``), so the file alone rebuilds the
model. :func:`load_trained_model` rebuilds it with nnU-Net's predictor around it; :class:`NnUNetCasePredictor` is
``predict.py``'s engine for such files (found through the registry's ``checkpoint_reader`` of ``mam``): nnU-Net's own
preprocessing (crop to the non-zero region, z-score inside it, resampling to the plans' spacing), its sliding window
(Gaussian blending by default) and its regions → labels conversion, un-cropping and resampling back. A case
segmented by ``predict.py`` therefore gets the label map ``MaM/test.py`` writes for it, in the same geometry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from brats_core.data.preprocessing import validate_images
from brats_core.labels import REGION_NAMES
from brats_core.modalities import MODALITIES

# the project's wording of load failures (never advising unsafe loading), shared with brats_core.utils.checkpoint
from brats_core.utils.checkpoint import CheckpointError, load_state_dict_strict, safe_torch_load
from MaM.model import NATIVE_ORDER, MultimodalRecon
from MaM.prepare_dataset import TRAINER, with_brats_region_order

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

    from brats_core.apps.predict import Prediction
    from brats_core.engine.evaluation import EvalOptions
    from MaM.trainer import ScenarioNetwork

__all__ = [
    "NnUNetCasePredictor",
    "TrainedModel",
    "load_nnunet_checkpoint",
    "load_trained_model",
    "open_checkpoint",
    "read_nnunet_checkpoint",
]

log = logging.getLogger(__name__)

NNUNET_CHECKPOINT_KEYS: tuple[str, ...] = ("network_weights", "init_args", "trainer_name")
# Readers whose arrays are the file's voxel grid in (z, y, x) order, which NnUNetCasePredictor rebuilds from
# nibabel's (x, y, z) arrays; a reorienting reader would need the file itself.
_GRID_READERS: tuple[str, ...] = ("SimpleITKIO", "NibabelIO")
# nnU-Net's training log holds numpy scalars, pickled under numpy 2's module name or numpy 1's.
_SCALAR = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
_NUMPY_GLOBALS: list[Any] = [
    (_SCALAR, "numpy._core.multiarray.scalar"), (_SCALAR, "numpy.core.multiarray.scalar"), np.dtype,
    *(getattr(np.dtypes, f"{kind}DType") for kind in ("Float64", "Float32", "Float16", "Int64", "Int32", "Bool")),
]  # fmt: skip


def load_nnunet_checkpoint(
    path: str | Path, required: Sequence[str] = NNUNET_CHECKPOINT_KEYS, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load an nnU-Net ``checkpoint_*.pth`` (prediction, ``-pretrained_weights``, ``--c``, ``--val``) safely.

    The file is unpickled with torch's weights-only loader, allowing only the numpy scalars of nnU-Net's training
    log beside tensors and plain Python values, so an untrusted file cannot run code (nnU-Net's own loaders unpickle
    anything).

    Args:
        path: the checkpoint file.
        required: entries the checkpoint must hold (default: those of every nnU-Net checkpoint).
        map_location: where the tensors go.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is empty, damaged or not a PyTorch file, holds other Python objects (refused), or
            lacks a ``required`` entry; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = safe_torch_load(path, map_location, _NUMPY_GLOBALS, what="nnU-Net checkpoint")
    if not isinstance(ckpt, Mapping):
        ckpt = {}  # a bare tensor or list: lacks every entry
    missing = [k for k in required if k not in ckpt]
    weights = ckpt.get("network_weights", {})
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        missing.append("network_weights of tensors")
    if missing:
        raise CheckpointError(
            f"{path} is not an nnU-Net checkpoint of MaM (no {', '.join(missing)}): give a "
            "fold_N/checkpoint_*.pth written by MaM/train.py"
        )
    return dict(ckpt)


def read_nnunet_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """:func:`load_nnunet_checkpoint`, but None when the file cannot be read as one (``predict.py`` then tries the
    other readers, which report the file)."""
    try:
        return load_nnunet_checkpoint(path)
    except CheckpointError:
        return None


@dataclass
class TrainedModel:
    """A trained MaM network with nnU-Net's plans, ``dataset.json`` and predictor around it."""

    network: MultimodalRecon
    scenario_network: ScenarioNetwork  # the network under one scenario (``set_mask``), as nnU-Net's predictor calls it
    predictor: nnUNetPredictor
    plans_manager: PlansManager
    config_manager: ConfigurationManager
    dataset_json: dict[str, Any]
    checkpoint: Path


def load_trained_model(
    checkpoint: str | Path,
    device: torch.device,
    step_size: float = 0.5,
    use_gaussian: bool = True,
    use_mirroring: bool = False,
    progress: bool = False,
    ckpt: Mapping[str, Any] | None = None,
) -> TrainedModel:
    """Rebuild a MaM model from nnU-Net's checkpoint and wrap it in nnU-Net's predictor.

    Args:
        checkpoint: ``fold_N/checkpoint_*.pth`` written by ``MaM/train.py`` (or upstream's nnU-Net fork).
        device: where the network runs.
        step_size, use_gaussian, use_mirroring: nnU-Net's sliding-window options (step as a fraction of the patch).
        progress: nnU-Net's progress bar over the windows.
        ckpt: the already loaded checkpoint (:func:`load_nnunet_checkpoint`), to avoid reading it twice.

    Raises:
        CheckpointError: the file cannot be read safely, is not an nnU-Net checkpoint or lacks its plans.
        StateDictMismatchError: its weights are not those of MaM's network for its plans.
        (Every message names the file.)
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from MaM.trainer import ScenarioNetwork, nnUNetTrainerMissingReconBaseline

    checkpoint = Path(checkpoint)
    ckpt = ckpt if ckpt is not None else load_nnunet_checkpoint(checkpoint)
    init = ckpt["init_args"]
    missing = [k for k in ("plans", "configuration", "dataset_json") if not isinstance(init, Mapping) or k not in init]
    if missing:
        raise CheckpointError(f"{checkpoint}: nnU-Net checkpoint without {', '.join(missing)} in its init_args")
    plans_manager = PlansManager(dict(init["plans"]))
    dataset_json = with_brats_region_order(dict(init["dataset_json"]))
    try:
        config_manager = plans_manager.get_configuration(init["configuration"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{checkpoint}: configuration {init['configuration']!r} not in its plans ({err})"
        ) from err
    network = nnUNetTrainerMissingReconBaseline.build_network_architecture(
        plans_manager, config_manager, 4, 3, enable_deep_supervision=False
    )
    load_state_dict_strict(network, ckpt["network_weights"], f"{checkpoint} (trainer {ckpt['trainer_name']!r})")
    scenario_network = ScenarioNetwork(network).to(device).eval()
    predictor = nnUNetPredictor(
        tile_step_size=step_size, use_gaussian=use_gaussian, use_mirroring=use_mirroring,
        perform_everything_on_device=device.type == "cuda", device=device, verbose=False, verbose_preprocessing=False,
        allow_tqdm=progress,
    )  # fmt: skip
    predictor.manual_initialization(
        scenario_network, plans_manager, config_manager, None, dataset_json, TRAINER,
        ckpt.get("inference_allowed_mirroring_axes"),
    )  # fmt: skip
    return TrainedModel(network, scenario_network, predictor, plans_manager, config_manager, dataset_json, checkpoint)


class NnUNetCasePredictor:
    """``predict.py``'s engine for MaM checkpoints written by nnU-Net (see the module docstring).

    Cases arrive as nibabel arrays ``(X, Y, Z)``; nnU-Net's readers give the same voxels as ``(Z, Y, X)``, so the
    arrays are reversed on the way in and the label map on the way out.
    """

    def __init__(self, trained: TrainedModel) -> None:
        reader = trained.plans_manager.plans.get("image_reader_writer", "SimpleITKIO")
        if reader not in _GRID_READERS:
            raise ValueError(
                f"{trained.checkpoint}: its plans read images with {reader}, which reorients them; predict.py "
                f"supports {' and '.join(_GRID_READERS)} (use MaM/test.py for this model)"
            )
        self.trained = trained
        self.model: MultimodalRecon = trained.network
        self.preprocessor = trained.config_manager.preprocessor_class(verbose=False)

    def _spacing_zyx(self, spacing: Sequence[float] | None) -> list[float]:
        if spacing is not None:
            return [float(s) for s in reversed(tuple(spacing)[:3])]
        # Unknown spacing (arrays without a header): assume the plans' own, so nothing is resampled.
        target = self.trained.config_manager.spacing
        zyx = [0.0, 0.0, 0.0]
        for i, axis in enumerate(self.trained.plans_manager.transpose_forward):
            zyx[axis] = float(target[i])
        return zyx

    def predict(
        self, images: Mapping[str, np.ndarray], probabilities: bool = False, spacing: Sequence[float] | None = None
    ) -> Prediction:
        """Segment one case.

        Args:
            images: modality key -> ``(X, Y, Z)``, any non-empty subset (absent modalities are masked).
            probabilities: also return the WT/TC/ET sigmoid probabilities, float16 ``(3, X, Y, Z)``.
            spacing: voxel size in mm along X, Y, Z (``None``: the plans' spacing, i.e. no resampling).
        """
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        from brats_core.apps.predict import Prediction

        images = {m: np.asarray(a) for m, a in images.items() if m in MODALITIES}
        if not images:
            raise ValueError(f"no modality given (expected any of {', '.join(MODALITIES)})")
        validate_images(images)
        shape = next(iter(images.values())).shape
        # Absent modalities are zero channels: they add nothing to the non-zero crop and z-score to 0.
        data = np.zeros((len(NATIVE_ORDER), *shape[::-1]), dtype=np.float32)
        for m, array in images.items():
            data[NATIVE_ORDER.index(m)] = array.T
        used = tuple(m for m in MODALITIES if m in images)
        t = self.trained
        pre, _, props = self.preprocessor.run_case_npy(
            data, None, {"spacing": self._spacing_zyx(spacing)}, t.plans_manager, t.config_manager, t.dataset_json
        )
        t.scenario_network.set_mask(tuple(m in used for m in MODALITIES))
        with torch.inference_mode():
            logits = t.predictor.predict_sliding_window_return_logits(torch.from_numpy(pre)).cpu()
        result = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, t.plans_manager, t.config_manager, t.predictor.label_manager, props,
            return_probabilities=probabilities, num_threads_torch=torch.get_num_threads(),
        )  # fmt: skip
        seg, probs = result if probabilities else (result, None)
        labels = np.ascontiguousarray(np.asarray(seg).T, dtype=np.uint8)
        if probs is None:
            return Prediction(labels, used)
        probs = np.ascontiguousarray(np.asarray(probs).transpose(0, 3, 2, 1)).astype(np.float16)
        return Prediction(labels, used, probs, tuple(REGION_NAMES))


def open_checkpoint(path: str | Path, device: torch.device, options: EvalOptions) -> NnUNetCasePredictor | None:
    """The ``mam`` method's checkpoint reader for ``predict.py``: an engine for an nnU-Net checkpoint, else None.

    ``options.blend`` None means MaM's default (nnU-Net's Gaussian); ``sw_batch_size`` and ``amp`` do not apply
    (nnU-Net's predictor runs one window at a time, under autocast on CUDA).
    """
    ckpt = read_nnunet_checkpoint(path)
    if ckpt is None:
        return None
    if options.sw_batch_size != 1:
        log.info("MaM (nnU-Net checkpoint): nnU-Net's predictor runs one window at a time; --sw_batch_size ignored")
    blend = options.blend or MultimodalRecon.default_blend
    trained = load_trained_model(
        path, device, step_size=1.0 - options.overlap, use_gaussian=blend == "gaussian", use_mirroring=options.tta,
        progress=options.progress, ckpt=ckpt,
    )  # fmt: skip
    return NnUNetCasePredictor(trained)
