"""Evaluate an M3AE checkpoint on the test list under all 15 scenarios (upstream ``m3ae/test.py``).

    python m3ae/test.py --datapath <m3ae cache> --checkpoint runs/m3ae_train/best.pth --savepath <out>

Default: the shared protocol (``brats_core.engine.evaluation``: window 128³, overlap 0.5, uniform blending, regions →
labels with ET ⊂ TC ⊂ WT, per-case Dice with ε 1e-8, ETpp, HD95), with the completion image cropped at each
window's position in the ORIGINAL image grid, as in training. ``--reference-quirks`` reproduces upstream instead:
the completion image cropped at the window's position in the preprocessed crop (upstream's misalignment), fp16
autocast on CUDA, each region thresholded on its own channel (sigmoid > 0.5), Dice ``2|P∩G|/(|P|+|G|)`` with
empty/empty = 1 and empty GT + non-empty prediction = 0, no ETpp, and upstream's ``test_final.txt``.
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from brats_core.apps.arguments import add_data_args, add_eval_args, add_runtime_args, check_scenarios
from brats_core.apps.scripts import load_for_test, read_test_list, resolve_test_file, test_from_args
from brats_core.data.dataset import load_case
from brats_core.engine.evaluation import check_pipeline, check_preprocessed_folder
from brats_core.engine.inference import predict_scenarios
from brats_core.labels import label_to_regions
from brats_core.modalities import METHOD_ORDERS, SCENARIOS, Scenario, format_bool_list, to_canonical
from brats_core.registry import SegModel
from brats_core.utils.cli import UsageError, add_progress_arg, run_main, setup_logging
from brats_core.utils.device import resolve_device
from m3ae.common import add_compat_flags, add_m3ae_data_flags, apply_devices, default_savepath
from m3ae.data import ensure_cache
from m3ae.model import REGION_ORDER, infer_architecture

log = logging.getLogger("m3ae.test")

UPSTREAM_REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
"""Column order of upstream's ``test_final.txt``."""


def upstream_scenarios() -> list[tuple[str, Scenario]]:
    """Upstream's 15 test masks as printed (its FLAIR, T1ce, T1, T2 list) with the scenario M3AE actually ran: the
    list is read in M3AE's order T1, T1ce, T2, FLAIR, so the printed labels are wrong."""
    out = []
    for listed in SCENARIOS:
        actual = to_canonical(listed.mask, METHOD_ORDERS["m3ae"])
        out.append((format_bool_list(listed.mask), next(s for s in SCENARIOS if s.mask == actual)))
    return out


def upstream_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Upstream's per-case Dice: empty GT → 1 if the prediction is empty too, else 0; otherwise 2|P∩G|/(|P|+|G|)."""
    if not gt.any():
        return 1.0 if not pred.any() else 0.0
    return float(2.0 * np.count_nonzero(pred & gt) / (np.count_nonzero(pred) + np.count_nonzero(gt)))


def evaluate_upstream(
    model: SegModel,
    root: str | Path,
    cases: Sequence[str],
    out_dir: str | Path,
    device: torch.device,
    amp: bool = True,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Upstream's scoring (see the module docstring) over upstream's 15 masks.

    Writes ``per_case_upstream.csv`` (case, scenario, WT, TC, ET) and ``test_final.txt`` in upstream's format.

    Returns:
        scenario name → mean WT, TC, ET over cases.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    listed = upstream_scenarios()
    masks = [s.mask for _, s in listed]
    scores: dict[str, dict[str, list[float]]] = {s.name: {r: [] for r in UPSTREAM_REGIONS} for _, s in listed}
    rows = []
    model.eval()
    for case in tqdm(cases, desc="cases", disable=not progress):
        image, label = load_case(root, case)
        if label is None:
            raise FileNotFoundError(f"test case {case} has no label map under {root}")
        gt = dict(zip(UPSTREAM_REGIONS, label_to_regions(label, UPSTREAM_REGIONS), strict=True))
        # window positions relative to the crop: the completion image is misaligned, as upstream
        blended = predict_scenarios(
            model, torch.from_numpy(image)[None], masks, amp=amp, origin=None, autocast_dtype=torch.float16
        ).cpu()  # upstream's autocast: fp16
        for (_, scenario), logits in zip(listed, blended, strict=True):
            regions = dict(zip(REGION_ORDER, (logits > 0).numpy(), strict=True))  # sigmoid > 0.5 per channel
            row = {r: upstream_dice(regions[r], gt[r]) for r in UPSTREAM_REGIONS}
            rows.append({"case": case, "scenario": scenario.name, **{r: f"{v:.6f}" for r, v in row.items()}})
            for r, v in row.items():
                scores[scenario.name][r].append(v)
    with (out / "per_case_upstream.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "scenario", *UPSTREAM_REGIONS])
        writer.writeheader()
        writer.writerows(rows)
    means = {name: {r: float(np.nanmean(v)) for r, v in per.items()} for name, per in scores.items()}
    lines = [
        f"Performance missing scenario = {printed}, "
        + ", ".join(f"{r} = {means[s.name][r]:.4f}" for r in UPSTREAM_REGIONS)
        + f"   (actually {s.display})"
        for printed, s in listed
    ]
    overall = {r: float(np.mean([means[s.name][r] for _, s in listed])) for r in UPSTREAM_REGIONS}
    lines.append("Overall Averages: " + ", ".join(f"{r} = {overall[r]:.4f}" for r in UPSTREAM_REGIONS))
    (out / "test_final.txt").write_text("\n".join(lines) + "\n")
    return means


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3ae/test.py", description=__doc__.splitlines()[0])
    add_data_args(p)
    add_runtime_args(p)
    add_m3ae_data_flags(p)
    add_eval_args(p)
    p.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint (ours, or upstream's .pth.tar)")
    p.add_argument(
        "--test_file",
        default=None,
        help="test list (default: <split_dir>/test15splits.csv); a missing path is looked up in --split_dir",
    )
    add_progress_arg(p)
    add_compat_flags(
        p,
        [
            (["--modal_list"], {"nargs": "+", "default": None}),
            (["--mdp"], {"type": int, "default": 0}),
            (["--start-epoch", "--start_epoch"], {"dest": "start_epoch", "type": int, "default": 0}),
            (["--epochs"], {"type": int, "default": None}),
            (["-b", "--batch-size", "--batch_size"], {"dest": "batch_size", "type": int, "default": 1}),
            (["--lr", "--learning-rate"], {"dest": "lr", "type": float, "default": None}),
            (["--wd", "--weight-decay"], {"dest": "weight_decay", "type": float, "default": None}),
            (["--val"], {"type": int, "default": None}),
            (["--fold"], {"type": int, "default": 0}),
            (["--num_classes"], {"type": int, "default": 3, "choices": [3]}),
            (["--seed"], {"type": int, "default": 1234}),
            (["--resume"], {"default": None}),
            (["--mae_imp"], {"default": None}),
        ],
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_scenarios(parser, args)
    if args.reference_quirks and len(args.scenario_list) != len(SCENARIOS):
        parser.error("--reference-quirks reproduces upstream's run over all 15 scenarios; drop --scenarios")
    if args.reference_quirks and args.lesion_wise:
        parser.error("--lesion_wise belongs to the shared protocol; upstream's scoring (--reference-quirks) has none")
    default_savepath(args, "m3ae_train", "model_1")
    apply_devices(args.devices)
    setup_logging()  # stderr only until the inputs are checked: a refused run leaves no output folder behind
    if args.raw_path is None:  # otherwise the cache is built from --raw_path below
        check_preprocessed_folder(args.datapath)
    cases = read_test_list(resolve_test_file(args))
    device = resolve_device(args.device)
    model = load_for_test(args.checkpoint, "m3ae", {}, infer_architecture, device)
    if model.config.pre_train:
        raise UsageError(
            f"{args.checkpoint} is a pre-training checkpoint (4 reconstruction outputs): fine-tune it first "
            f"(m3ae/train.py --pretrained {args.checkpoint})"
        )
    ensure_cache(args.datapath, cases, args.raw_path, args.workers)
    check_pipeline(model, args.datapath, cases)
    setup_logging(args.savepath, "test.txt")
    if not args.reference_quirks:
        test_from_args(args, model, cases)
        return 0
    model.window_origin = "crop"  # type: ignore[attr-defined]
    log.info("--reference-quirks: completion image at crop-relative window positions, upstream scoring")
    means = evaluate_upstream(
        model, args.datapath, cases, args.savepath, device, amp=True, progress=not args.no_progress
    )
    print(f"{'scenario':<26}" + "".join(f"{r:>9}" for r in UPSTREAM_REGIONS))
    for s in SCENARIOS:
        print(f"{s.display:<26}" + "".join(f"{means[s.name][r]:>9.4f}" for r in UPSTREAM_REGIONS))
    overall = [float(np.mean([m[r] for m in means.values()])) for r in UPSTREAM_REGIONS]
    print(f"{'Mean':<26}" + "".join(f"{v:>9.4f}" for v in overall))
    print(f"\nupstream-style test_final.txt and per_case_upstream.csv in {args.savepath}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
