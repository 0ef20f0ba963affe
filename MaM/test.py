"""Predict the test cases under the 15 scenarios with nnU-Net's predictor and score them (upstream ``test_mam.sh`` +
``test_mam.py``).

    python MaM/test.py --input-path $nnUNet_raw/Dataset138_MaM/imagesTs --output-path <dir> \
        --checkpoint-path checkpoint_best.pth

For each case (preprocessed once by nnU-Net) and scenario: nnU-Net's sliding window (step 0.5, Gaussian blending,
mirroring off as upstream evaluates; ``--tta`` turns it on), sigmoid > 0.5 per region, regions → BraTS labels once
(WT only → 2, TC without ET → 1, ET → 3; upstream wrote 1/2 swapped and swapped back in its scorer), un-cropped
and resampled to the original geometry. Predictions go to ``<output-path>/prediction_<bits>/<case>.nii.gz`` with
upstream's bit strings (FLAIR, T1, T1ce, T2), linked as ``<savepath>/predictions/<case>_<canonical bits>.nii.gz``
(the evaluator's naming, which ``report.py`` reads); scores (Dice WT/TC/ET with ε = 1e-8 and empty/empty = 1, ETpp,
HD95; with ``--lesion_wise`` the BraTS lesion-wise Dice and HD95 on the original grid) go to
``<savepath>/per_case_<tag>.csv`` with canonical scenario names, and ``summary.{csv,md,json}`` are
written by ``brats_core.engine.evaluation.summarize``, as for every other method. Finished (case, scenario)
rows are skipped on a re-run. The test cases are those of ``test15splits.csv`` (the same for every method).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brats_core.apps.arguments import add_overwrite_arg
from brats_core.data.splits import read_case_list
from brats_core.engine.evaluation import (
    case_list_identity,
    check_lesion_wise,
    claim_results_folder,
    format_table,
    read_rows,
    score_cells,
    shard_file,
    summarize,
    weights_digest,
    write_results,
)
from brats_core.engine.metrics import LESION_WISE_HELP, case_scores, lesion_wise_scores
from brats_core.modalities import Scenario, format_mam_bits, parse_mam_mask, parse_scenarios, scenario_for
from brats_core.utils.cli import UsageError, run_main
from MaM.prepare_dataset import CONFIGURATION, FILE_ENDING, PLANS, TRAINER, dataset_folder_name

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="MaM/test.py", description=__doc__.splitlines()[0])
    p.add_argument("--input-path", "--input_path", "-i", dest="input_path", default=None,
                   help="imagesTs folder (default: $nnUNet_raw/Dataset138_MaM/imagesTs)")  # fmt: skip
    p.add_argument("--output-path", "--output_path", "-o", dest="output_path", required=True,
                   help="folder for prediction_<bits>/ (and the scores, unless --savepath)")  # fmt: skip
    p.add_argument("--checkpoint-path", "--checkpoint_path", "-chk", dest="checkpoint_path",
                   default="checkpoint_final.pth",
                   help="checkpoint file name inside the model's fold folder, or a path")  # fmt: skip
    p.add_argument("--labels-path", "--labels_path", dest="labels_path", default=None,
                   help="ground-truth folder (default: labelsTs beside --input-path)")  # fmt: skip
    p.add_argument("--savepath", default=None, help="folder for per-case CSV and summary (default: --output-path)")
    p.add_argument("--model_folder", default=None,
                   help="trained model folder holding fold_N/ (default: from -d/-tr/-p/-c "
                        "under $nnUNet_results)")  # fmt: skip
    p.add_argument("-d", dest="dataset", default="138", help="dataset name or id")
    p.add_argument("-tr", dest="trainer", default=TRAINER)
    p.add_argument("-p", dest="plans", default=PLANS)
    p.add_argument("-c", dest="configuration", default=CONFIGURATION)
    p.add_argument("-f", dest="fold", default="0")
    p.add_argument("--test_file", default=None,
                   help="test list (.txt or CSV with a case column; default: test15splits.csv of the raw dataset, "
                        "else every case of --input-path)")  # fmt: skip
    p.add_argument("--scenarios", default="all", help="'all' or names (flair+t1ce), canonical bits (1100), 1-15")
    p.add_argument("-mask", dest="mask", nargs="+", default=None,
                   help="upstream nnUNetv2_predict's scenario: MaM-order bits FLAIR,T1,T1ce,T2 (1 = present), "
                        "e.g. -mask 1,0,1,0; one scenario, instead of --scenarios")  # fmt: skip
    p.add_argument("--disable_tta", action="store_true", help="accepted (mirroring is off unless --tta)")
    p.add_argument("-npp", dest="npp", type=int, default=None, help="accepted for nnUNetv2_predict compatibility")
    p.add_argument("-nps", dest="nps", type=int, default=None, help="accepted for nnUNetv2_predict compatibility")
    p.add_argument("-step_size", "--step_size", dest="step_size", type=float, default=0.5)
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (off in upstream's runs)")
    p.add_argument("--no_hd95", action="store_true", help="skip HD95")
    p.add_argument("--lesion_wise", action="store_true", help=LESION_WISE_HELP)
    p.add_argument("--no_nifti", action="store_true", help="do not write the prediction NIfTI files")
    add_overwrite_arg(p)
    p.add_argument("-device", "--device", dest="device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _model_folder(args: argparse.Namespace) -> Path:
    if args.model_folder:
        return Path(args.model_folder)
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_results.is_set():
        raise UsageError(
            f"checkpoint {args.checkpoint_path} not found; give its path, --model_folder, or set nnUNet_results"
        )
    try:
        name = maybe_convert_to_dataset_name(args.dataset)
    except (RuntimeError, ValueError) as err:  # unknown or ambiguous id: nnU-Net's message says where it looked
        raise UsageError(f"dataset {args.dataset}: {' '.join(str(err).split())}") from err
    return Path(nnUNet_results.require()) / name / f"{args.trainer}__{args.plans}__{args.configuration}"


def _default_raw() -> Path | None:
    raw = os.environ.get("nnUNet_raw")  # noqa: SIM112
    return Path(raw) / dataset_folder_name() if raw else None


def _cases(args: argparse.Namespace, images: Path) -> list[str]:
    test_file = Path(args.test_file) if args.test_file else images.parent / "test15splits.csv"
    if test_file.is_file():
        return read_case_list(test_file)
    if args.test_file:
        raise FileNotFoundError(f"test list {test_file} not found")
    cases = sorted({p.name[: -len(f"_0000{FILE_ENDING}")] for p in images.glob(f"*_0000{FILE_ENDING}")})
    if not cases:
        raise FileNotFoundError(f"{images}: no <case>_0000{FILE_ENDING} files")
    return cases


def run(args: argparse.Namespace, scenarios: Sequence[Scenario]) -> list[dict[str, str]]:
    """Predict and score; returns the summary rows."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from MaM.trained_model import load_trained_model

    device = torch.device(args.device)
    if args.lesion_wise:
        check_lesion_wise()
    ckpt_path = Path(args.checkpoint_path)
    if not ckpt_path.is_file():
        ckpt_path = _model_folder(args) / f"fold_{args.fold}" / args.checkpoint_path
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint_path} not found (also looked for {ckpt_path})")
    model = load_trained_model(ckpt_path, device, step_size=args.step_size, use_mirroring=args.tta)
    predictor, plans_manager, config_manager = model.predictor, model.plans_manager, model.config_manager
    preprocessor = config_manager.preprocessor_class(verbose=False)
    io = plans_manager.image_reader_writer_class()

    raw = _default_raw()
    images = Path(args.input_path) if args.input_path else (raw / "imagesTs" if raw else None)
    if images is None or not images.is_dir():
        raise FileNotFoundError(f"input folder {images} not found (--input-path)")
    labels = Path(args.labels_path) if args.labels_path else images.parent / "labelsTs"
    out = Path(args.output_path)
    save = Path(args.savepath) if args.savepath else out
    cases = _cases(args, images)
    identity = {
        "data": str(images.resolve()), "cases": case_list_identity(cases), "labels": str(labels.resolve()),
        "method": "mam", "weights": weights_digest(model.network), "step_size": args.step_size, "tta": args.tta,
        "hd95": not args.no_hd95, "lesion_wise": args.lesion_wise,
    }  # fmt: skip
    per_case = shard_file(save, scenarios)
    claim_results_folder(save, identity, args.overwrite, per_case)
    rows = read_rows(per_case, scenarios, hd95=not args.no_hd95, damaged="computed again", lesion_wise=args.lesion_wise)
    done = {(r["case"], r["scenario"]) for r in rows}
    log.info("%s: %d cases × %d scenarios → %s", ckpt_path, len(cases), len(scenarios), save)
    for n, case in enumerate(cases, 1):
        todo = [s for s in scenarios if (case, s.name) not in done]
        if not todo:
            continue
        files = [str(images / f"{case}_{k:04d}{FILE_ENDING}") for k in range(4)]
        absent = [f for f in files if not os.path.isfile(f)]
        gt_file = labels / f"{case}{FILE_ENDING}"
        if not gt_file.is_file():
            absent.append(str(gt_file))
        if absent:
            raise FileNotFoundError(f"case {case}: missing {', '.join(absent)}")
        t0 = time.time()
        data, _, properties = preprocessor.run_case(files, None, plans_manager, config_manager, model.dataset_json)
        data = torch.from_numpy(data)
        gt = io.read_seg(str(gt_file))[0][0]
        spacing = [float(s) for s in properties["spacing"]]
        written: list[tuple[Scenario, np.ndarray]] = []
        for s in todo:
            model.scenario_network.set_mask(s.mask)
            logits = predictor.predict_sliding_window_return_logits(data).cpu()
            seg = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, plans_manager, config_manager, predictor.label_manager, properties
            )
            if not args.no_nifti:
                written.append((s, seg))
            scores = case_scores(seg, gt, spacing=spacing, hd95=not args.no_hd95)
            # seg and gt are on the original image grid already (nnU-Net un-crops and resamples the prediction)
            lesion = lesion_wise_scores(seg, gt, spacing=spacing) if args.lesion_wise else None
            rows.append({
                "case": case, "scenario": s.name, "bits": s.bits, "seconds": f"{(time.time() - t0) / len(todo):.2f}",
                **score_cells(scores, lesion),
            })  # fmt: skip
        # label maps and rows are written only while the folder still belongs to this evaluation
        write_results(
            save, identity, per_case, rows, partial(_write_predictions, io, case, written, out, save, properties)
        )
        log.info("%d/%d %s done", n, len(cases), case)
    return summarize(save, identity)


def _write_predictions(
    io: Any, case: str, written: Sequence[tuple[Scenario, np.ndarray]], out: Path, save: Path, properties: dict
) -> None:
    """Write a case's label maps as nnU-Net does, and under the evaluator's names (report.py's panel reads them)."""
    for s, seg in written:
        target = out / f"prediction_{format_mam_bits(s.mask)}" / f"{case}{FILE_ENDING}"
        target.parent.mkdir(parents=True, exist_ok=True)
        io.write_seg(seg, str(target), properties)
        alias = save / "predictions" / f"{case}_{s.bits}{FILE_ENDING}"
        alias.parent.mkdir(parents=True, exist_ok=True)
        alias.unlink(missing_ok=True)
        try:
            os.link(target, alias)
        except OSError:  # another file system
            shutil.copyfile(target, alias)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.tta and args.disable_tta:
        parser.error("--tta and --disable_tta contradict each other")
    try:
        if args.mask is not None:
            if args.scenarios != "all":
                parser.error("give the scenarios with --scenarios or with -mask, not both")
            scenarios = [scenario_for(parse_mam_mask(args.mask))]
        else:
            scenarios = parse_scenarios(args.scenarios)
    except ValueError as err:
        parser.error(str(err))
    summary = run(args, scenarios)  # another evaluation's folder: a UsageError, one line through run_main
    print(format_table(summary))
    print(f"\nper-case CSV and summary (csv, md, json) in {args.savepath or args.output_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
