"""Evaluate ShaSpec (upstream ``ShaSpec/eval.py``) on the test list, one or all 15 scenarios.

    python ShaSpec/eval.py --data_dir <BraTS2023> --data_list BraTS23/BraTS23_test.csv \
        --restore_from snapshots/random/final.pth --mode 0,1          # FLAIR + T1 (ShaSpec order FLAIR,T1,T1ce,T2)
    python ShaSpec/eval.py ... --mode all                              # the 15 scenarios in one run

By default every scenario is scored by the project's shared protocol (``brats_core.engine.evaluation``: window = crop,
overlap 0.5, blended logits, nested regions, Dice with ε = 1e-8 and empty/empty = 1, ETpp, HD95), so ShaSpec's numbers
compare with the other methods. ``--reference-quirks`` reproduces upstream's scoring instead: tiles with overlap 1/3,
averaged sigmoid probabilities rounded per region, Dice ``2Σp·g/(Σp + Σg + 1)`` per region (ET, WT, TC), no ETpp.
Both write ``<savepath>/<mode>_output2.txt`` ("Average score: ET, WT, TC") per scenario as upstream did.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from brats_core.apps.arguments import add_overwrite_arg, add_runtime_args
from brats_core.apps.scripts import load_for_test, read_test_list
from brats_core.data.dataset import load_case
from brats_core.engine.evaluation import EvalOptions, evaluate, format_table, write_csv
from brats_core.engine.metrics import LESION_WISE_HELP
from brats_core.modalities import SCENARIOS, Scenario, format_shaspec_mode, parse_shaspec_mode, scenario_for
from brats_core.utils.cli import add_progress_arg, run_main, setup_logging
from brats_core.utils.device import resolve_device
from ShaSpec.data import prepare_cache
from ShaSpec.model import ShaSpec
from ShaSpec.scoring import REGIONS, region_scores, upstream_binarise, upstream_sliding_window
from ShaSpec.train_SS import apply_input_size, read_entries, resolve_list

log = logging.getLogger("ShaSpec.eval")

README_MODES: tuple[str, ...] = (
    "0", "0,1", "0,1,2", "0,1,2,3", "0,1,3", "0,2", "0,2,3", "0,3", "1", "1,2", "1,2,3", "1,3", "2", "2,3", "3",
)  # fmt: skip
"""The 15 ``--mode`` strings upstream's README lists (present indices in FLAIR, T1, T1ce, T2 order)."""


def parse_modes(text: str) -> list[Scenario]:
    """``--mode``: ``all`` (the 15 scenarios, upstream test order), one present-index list (``0,1``), or several
    separated by ``;`` (``0;0,1``); each translated to the canonical scenario."""
    if text.strip().lower() == "all":
        return list(SCENARIOS)
    out: list[Scenario] = []
    for part in text.split(";"):
        s = scenario_for(parse_shaspec_mode(part))
        listed = [int(t) for t in part.replace(" ", "").split(",") if t]
        if listed != sorted(listed):
            log.warning(
                "--mode %s: missing modalities take the shared feature of the first present one in ShaSpec order "
                "(%d); upstream took the first listed (%d). The README's modes are all in ascending order.",
                part, min(listed), listed[0],
            )  # fmt: skip
        if s not in out:
            out.append(s)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ShaSpec/eval.py", description=__doc__.splitlines()[0])
    g = p.add_argument_group("upstream flags")
    g.add_argument("--data_dir", default="./datalist/", help="folder with the BraTS case folders (and the lists)")
    g.add_argument("--data_list", default="BraTS20_test.csv", help="test list (case column; paths or ids)")
    g.add_argument("--input_size", default=None, help='window "D,H,W" (default: the checkpoint\'s)')
    g.add_argument("--num_classes", type=int, default=3)
    g.add_argument("--restore_from", required=True, help="checkpoint written by train_SS.py (final.pth, best.pth)")
    g.add_argument("--gpu", default="0", help="accepted for compatibility; use --device")
    g.add_argument("--weight_std", action="store_true", default=True, help="always on, as upstream")
    g.add_argument("--norm_cfg", default="IN", choices=["IN"])
    g.add_argument("--activation_cfg", default="LeakyReLU", choices=["LeakyReLU"])
    g.add_argument("--mode", default="0,1,2,3", help="present indices (FLAIR,T1,T1ce,T2), e.g. 0,1; or 'all'")
    o = p.add_argument_group("added")
    o.add_argument("--cache_dir", default=None, help="normalised-volume cache (default: <checkpoint dir>/../cache)")
    o.add_argument("--savepath", default="outputs", help="output folder (per-case CSV, summaries, *_output2.txt)")
    o.add_argument("--overlap", type=float, default=0.5, help="shared protocol window overlap (paper: 0.5)")
    o.add_argument("--sw_batch_size", type=int, default=1, help="windows per forward pass (shared protocol)")
    o.add_argument(
        "--scenario_batch", type=int, default=1,
        help="scenarios decoded in one batch (shared protocol; faster, not bit-exact with 1)",
    )  # fmt: skip
    o.add_argument("--no_hd95", action="store_true", help="skip HD95 (faster)")
    o.add_argument("--lesion_wise", action="store_true", help=f"{LESION_WISE_HELP} (shared protocol)")
    o.add_argument(
        "--save_nifti", action="store_true", help="write predicted label maps as NIfTI in the original geometry"
    )
    add_progress_arg(o)
    add_overwrite_arg(o)
    add_runtime_args(p)
    return p


def write_output2(savepath: Path, scenario: Scenario, et: float, wt: float, tc: float) -> Path:
    """Upstream's ``outputs/<mode>_output2.txt`` line for one scenario."""
    path = savepath / f"{format_shaspec_mode(scenario.mask)}_output2.txt"
    path.write_text(f"Average score: {et:.4f}, {wt:.4f}, {tc:.4f}\n")
    return path


def evaluate_upstream(
    model: ShaSpec, cache: Path, cases: Sequence[str], scenarios: Sequence[Scenario], savepath: Path, progress: bool
) -> list[dict[str, str]]:
    """Upstream's scoring (``--reference-quirks``); writes ``per_case_upstream.csv`` and ``summary_upstream.csv``."""
    rows: list[dict[str, str]] = []
    for case in tqdm(cases, desc="cases", disable=not progress):
        image, label = load_case(cache, case)
        probs = upstream_sliding_window(model, torch.from_numpy(image), [s.mask for s in scenarios], probabilities=True)
        for s, p in zip(scenarios, probs, strict=True):
            scores = region_scores(upstream_binarise(p), label)
            rows.append({"case": case, "scenario": s.name, "mode": format_shaspec_mode(s.mask),
                         **{r: f"{scores[r]:.6f}" for r in REGIONS}})  # fmt: skip
    write_csv(savepath / "per_case_upstream.csv", ["case", "scenario", "mode", *REGIONS], rows)
    summary = []
    for s in scenarios:
        means = {r: float(np.mean([float(x[r]) for x in rows if x["scenario"] == s.name])) for r in REGIONS}
        write_output2(savepath, s, means["ET"], means["WT"], means["TC"])
        summary.append(
            {"scenario": s.name, "mode": format_shaspec_mode(s.mask), **{r: f"{means[r]:.4f}" for r in REGIONS}}
        )
    summary.append({"scenario": "mean", "mode": "",
                    **{r: f"{np.mean([float(x[r]) for x in summary]):.4f}" for r in REGIONS}})  # fmt: skip
    write_csv(savepath / "summary_upstream.csv", ["scenario", "mode", *REGIONS], summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        scenarios = parse_modes(args.mode)
    except ValueError as err:
        parser.error(str(err))
    if args.reference_quirks and args.lesion_wise:
        parser.error("--lesion_wise belongs to the shared protocol; upstream's scoring (--reference-quirks) has none")
    savepath = Path(args.savepath)
    setup_logging()  # stderr only until the inputs are checked: a refused run leaves no output folder behind
    device = resolve_device(args.device)
    flags: dict = {"weight_std": args.weight_std, "num_classes": args.num_classes}
    model = load_for_test(args.restore_from, "shaspec", flags, lambda sd: {}, device)
    assert isinstance(model, ShaSpec)
    apply_input_size(parser, model, args.input_size)
    entries = read_test_list(resolve_list(args.data_dir, args.data_list), read_entries)
    cache = Path(args.cache_dir) if args.cache_dir else Path(args.restore_from).resolve().parent.parent / "cache"
    cases = prepare_cache(args.data_dir, entries, cache)
    setup_logging(savepath, "eval_log.txt")
    log.info("ShaSpec eval: %d cases x %d scenarios, %s scoring", len(cases), len(scenarios),
             "upstream" if args.reference_quirks else "shared")  # fmt: skip
    if args.reference_quirks:
        summary = evaluate_upstream(model, cache, cases, scenarios, savepath, not args.no_progress)
        for r in summary:
            print(f"{r['scenario']:<22} mode {r['mode']:<8} " + " ".join(f"{k} {r[k]}" for k in REGIONS))
        return 0
    options = EvalOptions(
        overlap=args.overlap, sw_batch_size=args.sw_batch_size, amp=args.amp, hd95=not args.no_hd95,
        progress=not args.no_progress, scenario_batch=args.scenario_batch, lesion_wise=args.lesion_wise,
    )  # fmt: skip
    summary = evaluate(
        model, cache, cases, savepath, scenarios, options, device, save_nifti=args.save_nifti,
        overwrite=args.overwrite,
    )  # fmt: skip
    for r in summary:
        if r["scenario"] != "mean":
            write_output2(
                savepath, scenario_for([c == "1" for c in r["bits"]]), *(float(r[k]) for k in ("ET", "WT", "TC"))
            )
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
