"""BraTS 2023 folder + split → nnU-Net v2 raw dataset for MaM, then (optionally) nnU-Net planning, preprocessing and
the ``3d_fullres_multiencoder_recon`` plans entry.

    python MaM/prepare_dataset.py --input-path <BraTS2023> --output-path $nnUNet_raw --split_dir <splits> --plan

Writes ``<output>/Dataset138_MaM/``:

- ``imagesTr/<case>_000{0,1,2,3}.nii.gz`` (train + val cases) and ``imagesTs/`` (test cases) with upstream's channel
  order ``_0000`` FLAIR (t2f), ``_0001`` T1 (t1n), ``_0002`` T1ce (t1c), ``_0003`` T2 (t2w); ``labelsTr/``,
  ``labelsTs/`` keep the BraTS labels;
- ``dataset.json`` with the channel names of that order (upstream's file named them T2, T1c, T1, Flair), regions
  WT {1,2,3}, TC {1,3}, ET {3} and ``regions_class_order`` [2, 1, 3], so that nnU-Net writes BraTS labels
  (WT only → 2 ED, TC without ET → 1 NCR, ET → 3) and no label swap is needed afterwards (upstream wrote [1, 2, 3]
  and swapped 1↔2 in its scorer);
- ``splits_final.json`` whose fold 0 is the paper split (train = ``train.txt``, val = ``val15splits.csv``), and the
  split files themselves (``train.txt``, ``val15splits.csv``, ``test15splits.csv``).

With ``--plan`` (needs ``nnUNet_preprocessed``) it runs nnU-Net's fingerprint extraction, planning and 3d_fullres
preprocessing, adds the ``3d_fullres_multiencoder_recon`` configuration to ``nnUNetPlans.json`` and copies
``splits_final.json`` and ``val15splits.csv`` into the preprocessed folder, where the trainer reads them.
``--add_plans`` does only the last step (after a manual ``nnUNetv2_plan_and_preprocess -d 138``).
Existing identical files are kept, so an interrupted run can simply be restarted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib

from brats_core.data.splits import Split, load_split
from brats_core.modalities import DISPLAY_NAMES, MODALITIES
from brats_core.utils.cli import run_main
from brats_core.utils.io import atomic_path, find_case_files
from MaM.model import NATIVE_ORDER, MaMConfig

log = logging.getLogger(__name__)

CONFIGURATION = "3d_fullres_multiencoder_recon"
"""Name of MaM's nnU-Net configuration (upstream's)."""
PARENT_CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"
DATASET_ID = 138
DATASET_NAME = "MaM"
TRAINER = "nnUNetTrainerMissingReconBaseline"
NETWORK_CLASS = "MaM.model.MultimodalRecon"
FILE_ENDING = ".nii.gz"
VAL_CSV = "val15splits.csv"

REGION_LABELS: dict[str, Any] = {
    "background": 0,
    "whole_tumor": [1, 2, 3],
    "tumor_core": [1, 3],
    "enhancing_tumor": [3],
}
REGIONS_CLASS_ORDER: list[int] = [2, 1, 3]
"""Label written for each region channel (WT, TC, ET) in turn: WT-only → ED 2, TC-not-ET → NCR 1, ET → 3."""


def dataset_folder_name(dataset_id: int = DATASET_ID, name: str = DATASET_NAME) -> str:
    """``Dataset138_MaM``."""
    return f"Dataset{dataset_id:03d}_{name}"


def channel_names() -> dict[str, str]:
    """nnU-Net channel index → modality, in MaM's order (``{"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"}``)."""
    return {str(i): DISPLAY_NAMES[m] for i, m in enumerate(NATIVE_ORDER)}


def dataset_json(num_training: int, name: str = DATASET_NAME) -> dict[str, Any]:
    """The nnU-Net ``dataset.json`` of MaM (with correct channel names and label-writing region order)."""
    return {
        "name": name,
        "description": "BraTS 2023 GLI for Missing-as-Masking; channels FLAIR, T1, T1ce, T2",
        "channel_names": channel_names(),
        "labels": REGION_LABELS,
        "regions_class_order": REGIONS_CLASS_ORDER,
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
    }


def with_brats_region_order(dataset: dict[str, Any]) -> dict[str, Any]:
    """A copy of an nnU-Net ``dataset.json`` whose ``regions_class_order`` writes BraTS labels.

    Raises:
        ValueError: the label regions are not WT {1,2,3}, TC {1,3}, ET {3} in this order (then MaM's head and the
            BraTS conversion do not apply).
    """
    regions = [sorted(v) if isinstance(v, list | tuple) else [v] for k, v in dataset.get("labels", {}).items()
               if k != "background"]  # fmt: skip
    if regions != [[1, 2, 3], [1, 3], [3]]:
        raise ValueError(f"dataset.json labels {dataset.get('labels')} are not the regions WT, TC, ET of MaM")
    return {**dataset, "regions_class_order": list(REGIONS_CLASS_ORDER)}


def splits_final(split: Split) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` content: one fold, train = the train list, val = the val cases."""
    return [{"train": list(split.train), "val": [c for c, _ in split.val]}]


def _place(src: Path, dest: Path, symlink: bool) -> None:
    """Copy (or link) one NIfTI to ``dest`` (``.nii.gz``); an existing file of the same size is kept."""
    if dest.is_symlink() or dest.exists():
        if symlink and dest.is_symlink() and dest.resolve() == src.resolve():
            return
        same_size = not dest.is_symlink() and dest.stat().st_size == src.stat().st_size
        if not symlink and src.name.endswith(FILE_ENDING) and same_size:
            return
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not src.name.endswith(FILE_ENDING):  # plain .nii: nnU-Net needs one file ending, so compress
        with atomic_path(dest) as tmp:
            nib.save(nib.load(src), tmp)
    elif symlink:
        dest.symlink_to(src.resolve())
    else:
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)


def convert_case(case_dir: Path, images_dir: Path, labels_dir: Path, symlink: bool = False) -> None:
    """One BraTS case folder → ``<images_dir>/<case>_000k.nii.gz`` (MaM order) and ``<labels_dir>/<case>.nii.gz``."""
    files = find_case_files(case_dir, MODALITIES, require_label=True)
    for k, modality in enumerate(NATIVE_ORDER):
        _place(files.images[modality], images_dir / f"{files.case}_{k:04d}{FILE_ENDING}", symlink)
    assert files.label is not None
    _place(files.label, labels_dir / f"{files.case}{FILE_ENDING}", symlink)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def convert_dataset(
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    split: Split,
    dataset_id: int = DATASET_ID,
    name: str = DATASET_NAME,
    symlink: bool = False,
) -> Path:
    """Write the nnU-Net raw dataset (see the module docstring).

    Args:
        input_dir: BraTS folder with one sub-folder per case.
        output_dir: the ``nnUNet_raw`` folder; the dataset folder is created inside.
        split: train / val / test cases (val and test masks canonical).
        symlink: link the NIfTI files instead of copying them.

    Returns:
        The dataset folder.
    """
    src = Path(input_dir)
    out = Path(output_dir) / dataset_folder_name(dataset_id, name)
    split.check_disjoint()
    train_val = list(split.train) + [c for c, _ in split.val]
    test = [c for c, _ in split.test]
    absent = [c for c in train_val + test if not (src / c).is_dir()]
    if absent:
        raise FileNotFoundError(
            f"{src}: {len(absent)} case folder(s) of the split are missing, e.g. {', '.join(absent[:5])}"
        )
    for part, cases in (("Tr", train_val), ("Ts", test)):
        for i, case in enumerate(cases):
            convert_case(src / case, out / f"images{part}", out / f"labels{part}", symlink)
            if (i + 1) % 100 == 0:
                log.info("%s: %d / %d cases", part, i + 1, len(cases))
    write_json(out / "dataset.json", dataset_json(len(train_val), name))
    write_json(out / "splits_final.json", splits_final(split))
    split.write(out)
    log.info("nnU-Net raw dataset: %s (%d train+val, %d test cases)", out, len(train_val), len(test))
    return out


def mam_configuration(plans: dict[str, Any], config: MaMConfig, num_classes: int = 3) -> dict[str, Any]:
    """The ``3d_fullres_multiencoder_recon`` plans entry: inherits ``3d_fullres``; batch 1, the cubic patch, 512
    maximum features and the MultimodalRecon architecture."""
    if PARENT_CONFIGURATION not in plans.get("configurations", {}):
        raise KeyError(f"the plans have no {PARENT_CONFIGURATION!r} configuration to inherit from")
    parent = plans["configurations"][PARENT_CONFIGURATION]
    if parent.get("patch_size") != [config.patch_size] * 3:
        log.info("%s: patch %s instead of 3d_fullres' %s", CONFIGURATION, [config.patch_size] * 3,
                 parent.get("patch_size"))  # fmt: skip
    kwargs = config.arch_kwargs()
    return {
        "inherits_from": PARENT_CONFIGURATION,
        "batch_size": 1,
        "patch_size": [config.patch_size] * 3,
        "unet_max_num_features": config.max_features,
        "architecture": {
            "network_class_name": NETWORK_CLASS,
            "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
    }


def add_mam_configuration(
    preprocessed_dataset_dir: str | os.PathLike[str], config: MaMConfig, raw_dataset_dir: str | os.PathLike[str]
) -> Path:
    """Add the MaM configuration to ``nnUNetPlans.json`` and copy the split files into the preprocessed folder."""
    pre = Path(preprocessed_dataset_dir)
    plans_file = pre / f"{PLANS}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: run nnU-Net planning first (--plan)")
    plans = json.loads(plans_file.read_text())
    plans["configurations"][CONFIGURATION] = mam_configuration(plans, config)
    write_json(plans_file, plans)
    raw = Path(raw_dataset_dir)
    for name in ("splits_final.json", VAL_CSV):
        if not (raw / name).is_file():
            raise FileNotFoundError(f"{raw / name} not found: run the conversion first")
        shutil.copyfile(raw / name, pre / name)
    log.info("added %s to %s; splits_final.json and %s copied", CONFIGURATION, plans_file, VAL_CSV)
    return plans_file


def plan_and_preprocess(dataset_id: int, num_processes: int, verify: bool) -> None:
    """nnU-Net's fingerprint extraction, planning (ExperimentPlanner) and 3d_fullres preprocessing."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=verify, verbose=False)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which crashes for 0 (single-threaded data
    # augmentation, e.g. on CPU machines): plan with 1 and restore the setting afterwards.
    saved = os.environ.get("nnUNet_n_proc_DA")  # noqa: SIM112
    if saved is not None and int(saved) < 1:
        os.environ["nnUNet_n_proc_DA"] = "1"  # noqa: SIM112
    try:
        plan_experiments([dataset_id])
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved  # noqa: SIM112
    preprocess([dataset_id], PLANS, configurations=(PARENT_CONFIGURATION,), num_processes=(num_processes,))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="MaM/prepare_dataset.py", description=__doc__.splitlines()[0])
    p.add_argument("--input-path", "--input-dir", "--input_path", dest="input_path", default=None,
                   help="BraTS 2023 folder with one sub-folder per case")  # fmt: skip
    p.add_argument("--output-path", "--output-dir", "--output_path", dest="output_path", default=None,
                   help="nnUNet_raw folder (default: $nnUNet_raw); the dataset folder is created inside")  # fmt: skip
    p.add_argument("--split_dir", default=None,
                   help="folder with train.txt, val15splits.csv, test15splits.csv (default: <input-path>/splits; "
                        "`python -m brats_core.data.splits download --out DIR` fetches the paper's)")  # fmt: skip
    p.add_argument("--dataset_id", "-d", type=int, default=DATASET_ID)
    p.add_argument("--dataset_name", default=DATASET_NAME)
    p.add_argument("--symlink", action="store_true", help="link the NIfTI files instead of copying them")
    p.add_argument("--plan", action="store_true",
                   help="also run nnU-Net planning + 3d_fullres preprocessing and add the MaM configuration "
                        "(needs nnUNet_preprocessed)")  # fmt: skip
    p.add_argument(
        "--add_plans",
        action="store_true",
        help="only add the MaM configuration to existing plans (after nnUNetv2_plan_and_preprocess)",
    )
    p.add_argument("--patch_size", type=int, default=128, help="cubic patch of the MaM configuration (paper: 128)")
    p.add_argument("--base_features", type=int, default=32, help="features of the first stage (paper: 32)")
    p.add_argument("--num_processes", "-np", type=int, default=4, help="nnU-Net fingerprint/preprocessing workers")
    p.add_argument("--verify_dataset_integrity", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = args.output_path or os.environ.get("nnUNet_raw")  # noqa: SIM112
    if not output:
        parser.error("--output-path is required when nnUNet_raw is not set")
    raw_dir = Path(output) / dataset_folder_name(args.dataset_id, args.dataset_name)
    try:
        config = MaMConfig(patch_size=args.patch_size, base_features=args.base_features)
    except ValueError as err:
        parser.error(str(err))
    if not args.add_plans:
        if not args.input_path:
            parser.error("--input-path is required (unless --add_plans)")
        split_dir = Path(args.split_dir) if args.split_dir else Path(args.input_path) / "splits"
        convert_dataset(args.input_path, output, load_split(split_dir), args.dataset_id, args.dataset_name,
                        args.symlink)  # fmt: skip
    if args.plan or args.add_plans:
        preprocessed = os.environ.get("nnUNet_preprocessed")  # noqa: SIM112
        if not preprocessed:
            parser.error("--plan/--add_plans need the nnUNet_preprocessed environment variable")
        # nnU-Net reads its folders from the environment when it uses them: point it at this dataset's raw root.
        os.environ["nnUNet_raw"] = str(Path(output).resolve())  # noqa: SIM112
        if args.plan:
            plan_and_preprocess(args.dataset_id, args.num_processes, args.verify_dataset_integrity)
        add_mam_configuration(Path(preprocessed) / raw_dir.name, config, raw_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
