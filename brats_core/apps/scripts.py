"""Plumbing shared by every method's train and test scripts, so that a method's script only states what is its own
(architecture flags, loss, optimiser, schedule, validation epochs)."""

from __future__ import annotations

import argparse
import csv
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from brats_core.apps.arguments import add_data_args, add_eval_args, add_runtime_args, check_scenarios, split_dir
from brats_core.data.dataset import (
    MaskSampler,
    TrainDataset,
    check_cases,
    check_validation_cases,
    uniform_scenario,
)
from brats_core.data.splits import Split, load_split, read_case_list
from brats_core.data.transforms import Transform
from brats_core.engine.evaluation import (
    EvalOptions,
    check_pipeline,
    check_preprocessed_folder,
    evaluate,
    format_table,
    validate,
)
from brats_core.engine.training import FitConfig, FitResult, LossFn, Trainer
from brats_core.registry import SegModel, build_from_config, method_info
from brats_core.utils.checkpoint import CheckpointError, StateDictMismatchError, load_checkpoint, load_state_dict_strict
from brats_core.utils.cli import UsageError, add_progress_arg, describe_os_error, positive_int, setup_logging
from brats_core.utils.device import resolve_device

log = logging.getLogger(__name__)


def train_from_args(
    args: argparse.Namespace,
    model: SegModel,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    *,
    transform: Transform,
    scheduler: Any | None = None,
    val_epochs: Collection[int] = (),
    mask_sampler: MaskSampler = uniform_scenario,
    split: Split | None = None,
    extra_validation: Callable[[SegModel, Split], Mapping[str, float]] | None = None,
) -> FitResult:
    """Train ``model`` on ``<split_dir>/train.txt`` with validation on ``val15splits.csv`` after ``val_epochs``.

    The checkpoint records the method, its resolved config and the arguments, so the test script rebuilds the
    exact architecture. ``extra_validation(model, split)`` adds method-specific validation scores (e.g. U-HVED's
    ``val_loss`` for its plateau scheduler) to the standard Dice scores.

    Everything is checked before the first step, and before the trainer makes ``--savepath``: the data folder, the
    lists, every training case and, when the run validates, every validation case.
    """
    if split is None:
        check_preprocessed_folder(args.datapath)  # before the lists: their default place is inside it
        split = load_split(split_dir(args))
    if val_epochs:
        check_validation_cases(args.datapath, [c for c, _ in split.val], split_dir(args) / "val15splits.csv")
    device = resolve_device(args.device)
    options = EvalOptions(progress=not args.no_progress)
    train_set = TrainDataset(args.datapath, split.train, transform, mask_sampler)
    config = FitConfig.from_args(args, model, val_epochs=set(val_epochs))
    log.info(
        "training %s on %d cases (%d val) → %s", model.method_name, len(split.train), len(split.val), args.savepath
    )

    def run_validation(m: torch.nn.Module, epoch: int) -> Mapping[str, float]:
        scores = dict(validate(m, args.datapath, split.val, options, device))  # type: ignore[arg-type]
        if extra_validation is not None:
            scores |= extra_validation(m, split)  # type: ignore[arg-type]
        return scores

    trainer = Trainer(model, loss_fn, optimizer, config, scheduler, run_validation if val_epochs else None)
    result = trainer.run_training(train_set)
    log.info("done: %d steps, last checkpoint %s, best validation mean Dice %.4f", result.global_step,
             result.last_checkpoint, result.best_score)  # fmt: skip
    return result


TEST_SCRIPTS: dict[str, str] = {
    "imfuse": "IMFuse/test.py",
    "mmformer": "mmFormer/test.py",
    "robustseg": "RobustSeg/test_robustseg.py",
    "sfusion": "SFusion/test_sfusion.py",
    "uhved": "UHVED/test_uhved.py",
    "m3ae": "m3ae/test.py",
    "shaspec": "ShaSpec/eval.py",
    "mam": "MaM/test.py",
}
"""The script that evaluates each registered method's checkpoints (named when one is given another's)."""


def _display(method: str) -> str:
    try:
        return method_info(method).display
    except KeyError:  # a checkpoint of a method this version does not know
        return repr(method)


def model_from_checkpoint(
    path: str | Path,
    method: str,
    flags: Mapping[str, Any],
    infer_config: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[SegModel, dict[str, Any]]:
    """Build the architecture a checkpoint was trained with and load it strictly.

    Our checkpoints store the method and config; for upstream checkpoints ``infer_config`` (from the state-dict
    shapes) and then ``flags`` decide. Command-line ``flags`` that disagree with the checkpoint produce a warning
    and are ignored, because the weights only fit the architecture they were trained with.

    Returns:
        the model in eval mode on ``device`` and the checkpoint dict.

    Raises:
        CheckpointError: the file cannot be read, or holds another method's model (the message names the script
            that evaluates it).
    """
    ckpt = load_checkpoint(path)
    stored_method = ckpt.get("method", method)
    if stored_method != method:
        script = TEST_SCRIPTS.get(stored_method, f"the test script of {_display(stored_method)}")
        raise CheckpointError(
            f"{path} holds a {_display(stored_method)} model, not {_display(method)}: evaluate it with {script}"
        )
    if "config" in ckpt:
        config = dict(ckpt["config"])
    else:
        config = {**flags, **(infer_config(ckpt["state_dict"]) if infer_config else {})}
        log.info("%s is an upstream checkpoint: architecture %s", path, config)
    for key, value in flags.items():
        if key in config and config[key] != value:
            log.warning(
                "--%s %s on the command line disagrees with the checkpoint (%s); using the checkpoint's",
                key,
                value,
                config[key],
            )
    model = build_from_config(method, config)
    load_state_dict_strict(model, ckpt["state_dict"], str(path))
    return model.to(device).eval(), ckpt


def load_for_test(
    path: str | Path,
    method: str,
    flags: Mapping[str, Any],
    infer_config: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]] | None,
    device: torch.device,
) -> SegModel:
    """:func:`model_from_checkpoint` for a test script.

    Raises:
        UsageError: a missing, unreadable or unfitting checkpoint, or another method's (one line naming the file;
            no usage block).
    """
    try:
        return model_from_checkpoint(path, method, flags, infer_config, device)[0]
    except (CheckpointError, StateDictMismatchError) as err:
        raise UsageError(str(err)) from None
    except FileNotFoundError as err:
        raise UsageError(describe_os_error(err)) from None


def resolve_test_file(args: argparse.Namespace) -> Path:
    """The test list: ``--test_file`` (an upstream-style name such as ``datalist/test15splits.csv`` is looked up in
    ``--split_dir`` too) or ``<split_dir>/test15splits.csv``.

    Raises:
        FileNotFoundError: naming the paths tried.
    """
    if not args.test_file:
        tried = [split_dir(args) / "test15splits.csv"]
    else:
        tried = [Path(args.test_file), split_dir(args) / Path(args.test_file).name]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"test list not found (looked for {', '.join(map(str, tried))}): pass --test_file or --split_dir "
            "(see `python -m brats_core.data.splits`)"
        )
    if found != tried[0]:
        log.warning("--test_file %s does not exist: using %s", args.test_file, found)
    return found


def read_test_list(path: Path, read: Callable[[Path], list[str]] = read_case_list) -> list[str]:
    """The entries of the test list ``path`` (``read`` parses it: the case ids by default).

    Raises:
        UsageError: the list cannot be read (not a case list, not text) or holds no cases; one line naming it.
    """
    try:
        cases = read(path)
    except (ValueError, csv.Error) as err:  # UnicodeDecodeError is a ValueError
        message = str(err)
        raise UsageError(message if str(path) in message else f"{path}: {message}") from None
    if not cases:
        raise UsageError(f"{path}: the test list holds no cases (expected a 'case' column with one row per case)")
    return cases


def test_main(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    method: str,
    infer_config: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]] | None = None,
    flags: Callable[[argparse.Namespace], Mapping[str, Any]] | None = None,
    prepare: Callable[[SegModel, argparse.Namespace], None] | None = None,
) -> int:
    """The body of every test script: parse, check the inputs, rebuild the checkpoint's model, evaluate, print the
    table. Nothing is written (not even the output folder) before the data folder, the test list, its cases and
    the checkpoint have been checked.

    Args:
        parser: the script's parser (from :func:`build_test_parser`).
        argv: command line (None: ``sys.argv``).
        method: registry name.
        infer_config: architecture of upstream checkpoints from their weights (see :func:`model_from_checkpoint`).
        flags: architecture flags given on the command line, compared with the checkpoint's.
        prepare: applies inference-time options to the loaded model (e.g. RobustSeg's reference-quirks dropout).
    """
    args = parser.parse_args(argv)
    check_scenarios(parser, args)
    setup_logging()  # stderr only until the inputs are checked: a refused run leaves no output folder behind
    check_preprocessed_folder(args.datapath)
    cases = read_test_list(resolve_test_file(args))
    check_cases(args.datapath, cases)
    device = resolve_device(args.device)
    model = load_for_test(args.resume, method, flags(args) if flags else {}, infer_config, device)
    check_pipeline(model, args.datapath, cases)
    if prepare is not None:
        prepare(model, args)
    setup_logging(args.savepath, "test.txt")
    test_from_args(args, model, cases)
    return 0


def test_from_args(
    args: argparse.Namespace, model: SegModel, cases: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """Evaluate ``cases`` (default: those of the test list, ``--test_file`` or ``<split_dir>/test15splits.csv``)
    over the chosen scenarios, and print the summary table."""
    if cases is None:
        cases = read_test_list(resolve_test_file(args))
    device = resolve_device(args.device)
    # results of another evaluation in --savepath raise a ResultsMismatchError: a UsageError for run_main
    summary = evaluate(
        model.to(device).eval(),
        args.datapath,
        cases,
        args.savepath,
        args.scenario_list,
        EvalOptions.from_args(args),
        device,
        save_nifti=args.save_nifti,
        overwrite=args.overwrite,
    )
    print(format_table(summary))
    print(f"\nper-case CSV and summary (csv, md, json) in {args.savepath}")
    return summary


def add_val_args(group: argparse._ArgumentGroup) -> None:
    """``--debug`` (validate after every epoch, as upstream) and ``--val_every N``; see :func:`select_val_epochs`."""
    group.add_argument("--debug", action="store_true", help="validate after every epoch")
    group.add_argument(
        "--val_every", type=positive_int, default=None, help="validate every N epochs instead of upstream's list"
    )


def select_val_epochs(
    upstream: Sequence[int], num_epochs: int, debug: bool = False, val_every: int | None = None
) -> list[int]:
    """Validation epochs (1-based): every epoch with ``--debug`` (as upstream), every ``val_every`` epochs when
    given, otherwise the method's upstream list, continued every 10 epochs past its end (a run longer than upstream's
    would otherwise never update ``best.pth`` again; nothing changes within upstream's length)."""
    if debug:
        return list(range(1, num_epochs + 1))
    if val_every:
        return list(range(val_every, num_epochs + 1, val_every))
    beyond = range(max(upstream) + 10, num_epochs + 1, 10) if upstream else range(0)
    return [e for e in upstream if e <= num_epochs] + list(beyond)


def build_test_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags every test script shares: upstream's ``--datapath``, ``--resume``, ``--savepath`` (default ``eval``),
    ``--test_file`` and ``--batch_size`` (accepted as upstream READMEs pass it; windows are batched with
    ``--sw_batch_size``), plus the shared evaluation and runtime flags."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_data_args(p)
    p.set_defaults(savepath="eval")
    p.add_argument("--resume", required=True, help="checkpoint (ours, or upstream's model_last.pth / best.pth)")
    p.add_argument(
        "--test_file",
        default=None,
        help="test list (default: <split_dir>/test15splits.csv); a missing path is looked up in --split_dir",
    )
    p.add_argument("--batch_size", type=int, default=1, help="accepted for compatibility; unused")
    add_progress_arg(p)
    add_eval_args(p)
    add_runtime_args(p)
    return p
