"""predict.py with MaM checkpoints written by nnU-Net: the registry's checkpoint reader, safe loading, and the label
maps equal to MaM/test.py's (nnU-Net's file-based path) for all four and for two modalities, with resampling."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_core.apps import predict
from brats_core.data.splits import Split
from brats_core.data.synthetic import write_synthetic_dataset
from brats_core.modalities import BRATS2023_SUFFIXES
from brats_core.registry import build_method, checkpoint_readers, config_dict, make_config
from brats_core.utils.checkpoint import CheckpointError, save_checkpoint
from MaM import prepare_dataset, test
from MaM.model import MaMConfig
from MaM.trained_model import read_nnunet_checkpoint

# nnU-Net 2.8.1's 3d_fullres plans for 1 mm BraTS-like data (what its planner writes for the synthetic cases; the
# slow test in test_mam.py runs the planner itself), with MaM's entry added as prepare_dataset does.
_RESAMPLING = "resample_data_or_seg_to_shape"


def nnunet_plans(config: MaMConfig) -> dict[str, Any]:
    def kwargs(is_seg: bool, order: int) -> dict[str, Any]:
        return {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}

    plans: dict[str, Any] = {
        "dataset_name": "Dataset138_MaM", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": [31, 29, 30],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0, "percentile_00_5": 0.0,
                     "percentile_99_5": 1.0, "std": 0.1} for c in range(4)
        },
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [config.patch_size] * 3, "median_image_size_in_voxels": [31.0, 29.0, 30.0],
            "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"] * 4,
            "use_mask_for_norm": [True] * 4, "resampling_fn_data": _RESAMPLING, "resampling_fn_seg": _RESAMPLING,
            "resampling_fn_data_kwargs": kwargs(False, 3), "resampling_fn_seg_kwargs": kwargs(True, 1),
            "resampling_fn_probabilities": _RESAMPLING, "resampling_fn_probabilities_kwargs": kwargs(False, 1),
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": {}, "_kw_requires_import": []},
            "batch_dice": False,
        }},
    }  # fmt: skip
    plans["configurations"][prepare_dataset.CONFIGURATION] = prepare_dataset.mam_configuration(plans, config)
    return plans


def write_nnunet_checkpoint(path: Path, seed: int = 0, **init_overrides: Any) -> None:
    """A checkpoint laid out as nnU-Net's trainer saves it (numpy scalars in the log included), random weights."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from MaM.trainer import nnUNetTrainerMissingReconBaseline

    plans = nnunet_plans(make_config("mam", "tiny"))
    manager = PlansManager(plans)
    torch.manual_seed(seed)
    network = nnUNetTrainerMissingReconBaseline.build_network_architecture(
        manager, manager.get_configuration(prepare_dataset.CONFIGURATION), 4, 3, enable_deep_supervision=False
    )
    init = {
        "plans": plans, "configuration": prepare_dataset.CONFIGURATION, "fold": 0,
        "dataset_json": prepare_dataset.dataset_json(1), "device": torch.device("cpu"), **init_overrides,
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"network_weights": network.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
         "logging": {"ema_fg_dice": [np.float64(0.25)], "mean_fg_dice": [np.float64(0.5)]},
         "_best_ema": np.float64(0.25), "current_epoch": 1, "init_args": init,
         "trainer_name": prepare_dataset.TRAINER, "inference_allowed_mirroring_axes": (0, 1, 2)},
        path,
    )  # fmt: skip


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("this must never run",))


def test_mam_registers_a_checkpoint_reader() -> None:
    assert [name for name, _ in checkpoint_readers()] == ["mam"]


def test_reader_loads_nnunet_checkpoints_safely_and_ignores_other_files(tmp_path, capsys) -> None:
    ckpt = tmp_path / "fold_0" / "checkpoint_final.pth"
    write_nnunet_checkpoint(ckpt)
    loaded = read_nnunet_checkpoint(ckpt)
    assert loaded is not None and loaded["trainer_name"] == prepare_dataset.TRAINER
    assert float(loaded["_best_ema"]) == 0.25
    ours = tmp_path / "ours.pth"
    model = build_method("mam", "tiny")
    save_checkpoint(ours, model, method="mam", config=config_dict(model))
    assert read_nnunet_checkpoint(ours) is None
    hostile = tmp_path / "hostile.pth"
    torch.save({"network_weights": {}, "init_args": _Payload(), "trainer_name": "x"}, hostile)
    assert read_nnunet_checkpoint(hostile) is None and "must never run" not in capsys.readouterr().out
    text = tmp_path / "notes.pth"
    text.write_bytes(pickle.dumps("not a checkpoint", protocol=2))
    assert read_nnunet_checkpoint(text) is None
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        read_nnunet_checkpoint(tmp_path / "absent.pth")


def test_broken_nnunet_checkpoints_are_reported_by_name(tmp_path, capsys) -> None:
    ckpt = tmp_path / "fold_0" / "checkpoint_best.pth"
    write_nnunet_checkpoint(ckpt, configuration="3d_lowres")
    with pytest.raises(CheckpointError, match=r"checkpoint_best\.pth: configuration '3d_lowres'"):
        predict.Predictor(ckpt, device="cpu")
    case = write_synthetic_dataset(tmp_path / "brats", 1, shape=(24, 24, 24), seed=1)[0]
    code = predict.main(["--checkpoint", str(ckpt), "-i", str(tmp_path / "brats" / case), "-o", str(tmp_path / "o")])
    assert code == 1 and "checkpoint_best.pth" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _respace(case_dir: Path, zooms: tuple[float, float, float]) -> None:
    """Rewrite every NIfTI of a case with a non-isotropic voxel size (so nnU-Net resamples on the way)."""
    for f in case_dir.glob("*.nii.gz"):
        img = nib.load(f)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([*zooms, 1.0]), img.header), f)


def test_predict_matches_mam_test_py_on_nnunet_checkpoints(tmp_path) -> None:
    ckpt = tmp_path / "results" / "fold_0" / "checkpoint_final.pth"
    write_nnunet_checkpoint(ckpt, seed=3)
    cases = write_synthetic_dataset(tmp_path / "brats", 3, shape=(44, 40, 34), seed=7)
    case = cases[2]
    _respace(tmp_path / "brats" / case, (1.25, 1.0, 0.8))
    split = Split(cases[:1], [(cases[1], (True, True, True, True))], [(case, (True, True, True, True))])
    raw = prepare_dataset.convert_dataset(tmp_path / "brats", tmp_path / "raw", split)
    ref = tmp_path / "ref"
    args = ["--input-path", str(raw / "imagesTs"), "--output-path", str(ref), "--checkpoint-path", str(ckpt),
            "-device", "cpu", "--scenarios", "flair+t1ce+t1+t2,t1ce+t2", "--no_hd95"]  # fmt: skip
    assert test.main(args) == 0

    out = tmp_path / "pred"
    src = tmp_path / "brats" / case
    assert predict.main(["--checkpoint", str(ckpt), "-i", str(src), "-o", str(out), "--device", "cpu",
                         "--save_probabilities", "--no_progress"]) == 0  # fmt: skip
    two = tmp_path / "two-seg.nii.gz"
    files = {m: str(src / f"{case}-{BRATS2023_SUFFIXES[m]}.nii.gz") for m in ("t1ce", "t2")}
    assert predict.main(["--checkpoint", str(ckpt), "--t1ce", files["t1ce"], "--t2", files["t2"], "-o", str(two),
                         "--device", "cpu", "--no_progress"]) == 0  # fmt: skip

    reference = nib.load(src / f"{case}-t2f.nii.gz")
    for ours, bits in ((out / f"{case}-seg.nii.gz", "1111"), (two, "0011")):  # MaM bits: FLAIR, T1, T1ce, T2
        mine = nib.load(ours)
        theirs = np.asarray(nib.load(ref / f"prediction_{bits}" / f"{case}.nii.gz").dataobj)
        labels = np.asarray(mine.dataobj)
        assert mine.shape == reference.shape and np.allclose(mine.affine, reference.affine)
        assert np.array_equal(labels, theirs), f"{bits}: {np.count_nonzero(labels != theirs)} voxels differ"
        assert 0.01 < np.count_nonzero(labels) / labels.size < 0.99 and len(np.unique(labels)) >= 3  # not trivial
    full = np.asarray(nib.load(out / f"{case}-seg.nii.gz").dataobj)
    assert not np.array_equal(full, np.asarray(nib.load(two).dataobj))  # the mask reaches the network

    saved = np.load(out / f"{case}-prob.npz")
    probs = saved["probabilities"].astype(np.float32)
    assert probs.dtype == np.float32 and probs.shape == (3, *reference.shape)
    assert list(saved["channels"]) == ["WT", "TC", "ET"]
    # nnU-Net writes each region's label in regions_class_order, over the previous ones (regions need not nest)
    expected = np.zeros(full.shape, dtype=np.uint8)
    for channel, label in enumerate(prepare_dataset.REGIONS_CLASS_ORDER):
        expected[probs[channel] > 0.5] = label
    certain = (np.abs(probs - 0.5) > 1e-3).all(axis=0)  # float16 rounding may cross 0.5 right at the threshold
    assert certain.mean() > 0.99 and np.array_equal(expected[certain], full[certain])


def test_predictor_uses_nnunets_gaussian_blending_unless_told(tmp_path) -> None:
    ckpt = tmp_path / "fold_0" / "checkpoint_final.pth"
    write_nnunet_checkpoint(ckpt)
    p = predict.Predictor(ckpt, device="cpu")
    assert p.method == "mam" and p.options.blend == "gaussian" and p.patch_size == 32
    assert p._engine is not None and p._engine.trained.predictor.use_gaussian
    p = predict.Predictor(ckpt, device="cpu", blend="uniform", overlap=0.25, tta=True)
    assert p.options.blend == "uniform" and not p._engine.trained.predictor.use_gaussian
    assert p._engine.trained.predictor.tile_step_size == 0.75 and p._engine.trained.predictor.use_mirroring
    ours = tmp_path / "ours.pth"
    model = build_method("mmformer", "tiny")
    save_checkpoint(ours, model, method="mmformer", config=config_dict(model))
    assert predict.Predictor(ours, device="cpu").options.blend == "uniform"
