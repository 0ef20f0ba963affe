"""Every method's command sequence from preprocessed data to the 15-scenario evaluation, with the paper's settings.

    python reproduce.py --datapath /data/BRATS2023_Training_npy --raw /data/BraTS2023 --runs runs/      # print
    python reproduce.py ... --method imfuse --run                    # run it here (one GPU, or --gpus N: torchrun)
    python reproduce.py ... --slurm slurm/ [--gpus 4]                # write SLURM scripts + submit_all.sh
    python reproduce.py --smoke                                      # every landed method, 2 steps, synthetic data

Each method's recipe is data: a list of steps (script, flags, the checkpoint that makes a re-run continue). Every
step is resumable: training steps continue from their last checkpoint when it exists (the printed and SLURM commands
test for it), evaluation skips the (case, scenario) rows already in its per-case CSV, and SLURM evaluation runs as a
15-task array (one scenario per task, one shared output folder). Only methods that are registered
(:func:`brats_core.registry.list_methods`) and whose scripts exist are included, so the methods still being written
appear as soon as they land. After the runs, ``python report.py`` (printed at the end) merges the evaluations.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brats_core.utils.cli import run_main

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of a method's sequence.

    Flags are templates filled by :meth:`Recipe.context`: ``{datapath}`` (preprocessed data), ``{split_dir}``,
    ``{raw}`` (the BraTS NIfTI folder, for methods with their own pipeline), ``{run}`` (this method's run folder),
    ``{device}``, ``{ckpt}`` (the checkpoint the evaluation loads: ``best.pth`` or ``model_last.pth``).

    Attributes:
        name: short step name (``train``, ``test``, ``pretrain``, ``warmup`` …).
        script: path of the script relative to the repository (run as ``python <script>``).
        args: flags used in every mode.
        paper: flags of the paper's settings (left out in ``--smoke``).
        smoke: flags of ``--smoke`` (tiny preset, 2 optimiser steps, CPU).
        resume_file: template of the checkpoint whose existence makes a re-run continue.
        resume_args: flags appended when ``resume_file`` exists (later flags win in argparse).
        kind: ``prepare``, ``train`` or ``test``.
        ddp: the script trains with DDP under ``torchrun`` (``--gpus N``).
        scenario_array: the evaluation accepts ``--scenarios N`` and shares its output folder between shards.
    """

    name: str
    script: str
    args: tuple[str, ...]
    paper: tuple[str, ...] = ()
    smoke: tuple[str, ...] = ()
    resume_file: str | None = None
    resume_args: tuple[str, ...] = ()
    kind: str = "train"
    ddp: bool = False
    scenario_array: bool = False

    @property
    def module(self) -> str:
        """The script as a module name (``IMFuse/train_poly.py`` → ``IMFuse.train_poly``)."""
        return self.script.removesuffix(".py").replace("/", ".")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A method's steps. ``test_dir`` (relative to the run folder) holds the evaluation read by the report; ``env``
    are environment variables (templates) every step needs, e.g. nnU-Net's folders for MaM."""

    method: str
    steps: tuple[Step, ...]
    ckpt: str = "best.pth"
    env: tuple[tuple[str, str], ...] = ()
    test_dir: str = "test"
    provisional: bool = False
    notes: str = ""


_DATA = ("--datapath", "{datapath}", "--split_dir", "{split_dir}", "--dataname", "BRATS2023")
_RUNTIME = ("--device", "{device}", "--no_progress")
_SMOKE_TRAIN = (
    "--preset",
    "tiny",
    "--num_epochs",
    "1",
    "--iter_per_epoch",
    "2",
    "--max_steps",
    "2",
    "--batch_size",
    "1",
    "--workers",
    "0",
)
_SMOKE_TEST = ("--no_hd95", "--save_nifti")


def _rfnet_family(
    method: str, train: str, test: str, paper: tuple[str, ...], ckpt: str = "best.pth", notes: str = ""
) -> Recipe:
    """The two steps of the methods on the shared pipeline (``brats_core.apps.scripts``): train, then test."""
    return Recipe(
        method,
        (
            Step(
                "train",
                train,
                (*_DATA, "--savepath", "{run}", *_RUNTIME),
                paper=paper,
                smoke=_SMOKE_TRAIN,
                resume_file="{run}/model_last.pth",
                resume_args=("--resume", "{run}/model_last.pth"),
                ddp=True,
            ),
            Step(
                "test",
                test,
                (*_DATA, "--savepath", "{run}/test", "--resume", "{run}/{ckpt}", *_RUNTIME),
                smoke=_SMOKE_TEST,
                kind="test",
                scenario_array=True,
            ),
        ),
        ckpt=ckpt,
        notes=notes,
    )


RECIPES: dict[str, Recipe] = {
    "imfuse": _rfnet_family(
        "imfuse",
        "IMFuse/train_poly.py",
        "IMFuse/test.py",
        ("--num_epochs", "1000", "--batch_size", "1", "--mamba_skip", "--interleaved_tokenization"),
        notes="RAdam 2e-4, poly 0.9 per epoch, 1000 epochs × N_train steps, batch 1.",
    ),
    "mmformer": _rfnet_family(
        "mmformer",
        "mmFormer/train.py",
        "mmFormer/test.py",
        ("--num_epochs", "1000", "--batch_size", "3"),
        ckpt="model_last.pth",
        notes="Adam(amsgrad) 2e-4, poly, 1000 epochs, README batch 3; upstream never validates: model_last.pth.",
    ),
    "robustseg": _rfnet_family(
        "robustseg",
        "RobustSeg/train_robustseg.py",
        "RobustSeg/test_robustseg.py",
        ("--num_epochs", "300", "--batch_size", "1"),
        notes="Adam(amsgrad) 1e-4, poly, 300 epochs, batch 1, 80³ patches.",
    ),
    "sfusion": _rfnet_family(
        "sfusion",
        "SFusion/train_sfusion.py",
        "SFusion/test_sfusion.py",
        ("--num_epochs", "200", "--batch_size", "1", "--feature_maps", "16", "--train_file", "{split_dir}/train2.txt"),
        notes="Adam(amsgrad) 1e-4, poly, 200 epochs, batch 1, F = 16 (upstream README/test script), on train2.txt "
        "(872 cases, derived by `brats_core.data.splits download`).",
    ),
    "uhved": _rfnet_family(
        "uhved",
        "UHVED/train_uhved.py",
        "UHVED/test_uhved.py",
        ("--num_epochs", "400", "--batch_size", "1"),
        notes="Adam(amsgrad) 1e-3, LR plateau on the validation loss, 400 epochs (README), batch 1, 112³ patches.",
    ),
    # M3AE and ShaSpec read the BraTS NIfTI folder (--raw) through their own pipelines and caches;
    # their flags were checked against their scripts' parsers while those were being finished.
    "m3ae": Recipe(
        "m3ae",
        (
            Step(
                "pretrain",
                "m3ae/pretrain.py",
                (
                    "--datapath",
                    "{run}/cache",
                    "--raw_path",
                    "{raw}",
                    "--split_dir",
                    "{split_dir}",
                    "--savepath",
                    "{run}/pretrain",
                    *_RUNTIME,
                ),
                paper=("--batch_size", "2", "--mdp", "3", "--mask_ratio", "0.875", "--lr", "0.0003", "--epochs", "600"),
                smoke=(
                    "--preset",
                    "tiny",
                    "--epochs",
                    "1",
                    "--iter_per_epoch",
                    "2",
                    "--max_steps",
                    "2",
                    "--batch_size",
                    "2",
                    "--workers",
                    "0",
                ),
                resume_file="{run}/pretrain/model_last.pth",
                resume_args=("--resume", "{run}/pretrain/model_last.pth"),
            ),
            Step(
                "train",
                "m3ae/train.py",
                (
                    "--datapath",
                    "{run}/cache",
                    "--raw_path",
                    "{raw}",
                    "--split_dir",
                    "{split_dir}",
                    "--savepath",
                    "{run}",
                    "--pretrained",
                    "{run}/pretrain/model_last.pth",
                    "--deep_supervised",
                    *_RUNTIME,
                ),
                paper=(
                    "--batch_size",
                    "2",
                    "--lr",
                    "0.0003",
                    "--seed",
                    "999",
                    "--weight_kl",
                    "0.1",
                    "--feature_level",
                    "2",
                    "--epochs",
                    "300",
                    "--mdp",
                    "3",
                    "--wd",
                    "0.0001",
                    "--patch_shape",
                    "128",
                ),
                smoke=(
                    "--preset",
                    "tiny",
                    "--epochs",
                    "1",
                    "--iter_per_epoch",
                    "2",
                    "--max_steps",
                    "2",
                    "--batch_size",
                    "2",
                    "--workers",
                    "0",
                ),
                resume_file="{run}/model_last.pth",
                resume_args=("--resume", "{run}/model_last.pth"),
            ),
            Step(
                "test",
                "m3ae/test.py",
                (
                    "--datapath",
                    "{run}/cache",
                    "--raw_path",
                    "{raw}",
                    "--split_dir",
                    "{split_dir}",
                    "--checkpoint",
                    "{run}/{ckpt}",
                    "--savepath",
                    "{run}/test",
                    *_RUNTIME,
                ),
                smoke=_SMOKE_TEST,
                kind="test",
                scenario_array=True,
            ),
        ),
        notes="Stage 1: masked-autoencoder pre-training, 600 epochs, batch 2; stage 2: fine-tuning from the stage-1 "
        "checkpoint, 300 epochs, 2 masked copies per case, --mdp 3.",
    ),
    "shaspec": Recipe(
        "shaspec",
        (
            Step(
                "warmup",
                "ShaSpec/train_SS.py",
                (
                    "--data_dir",
                    "{raw}",
                    "--train_list",
                    "{split_dir}/train.txt",
                    "--val_list",
                    "{split_dir}/val15splits.csv",
                    "--cache_dir",
                    "{run}/cache",
                    "--snapshot_dir",
                    "{run}/warmup",
                    "--warm_up",
                    "--mode",
                    "0,1,2,3",
                    "--device",
                    "{device}",
                ),
                paper=(
                    "--num_steps",
                    "245000",
                    "--batch_size",
                    "1",
                    "--learning_rate",
                    "1e-2",
                    "--input_size",
                    "80,160,160",
                    "--random_mirror",
                    "--random_scale",
                ),
                smoke=("--preset", "tiny", "--num_steps", "2", "--learning_rate", "1e-2", "--workers", "0"),
                resume_file="{run}/warmup/last.pth",
                resume_args=("--reload_from_checkpoint", "--reload_path", "{run}/warmup/last.pth"),
            ),
            Step(
                "random",
                "ShaSpec/train_SS.py",
                (
                    "--data_dir",
                    "{raw}",
                    "--train_list",
                    "{split_dir}/train.txt",
                    "--val_list",
                    "{split_dir}/val15splits.csv",
                    "--cache_dir",
                    "{run}/cache",
                    "--snapshot_dir",
                    "{run}/random",
                    "--mode",
                    "random",
                    "--reload_from_checkpoint",
                    "--reload_path",
                    "{run}/warmup/best.pth",
                    "--device",
                    "{device}",
                ),
                paper=(
                    "--num_steps",
                    "406000",
                    "--batch_size",
                    "1",
                    "--learning_rate",
                    "1e-2",
                    "--input_size",
                    "80,160,160",
                    "--random_mirror",
                    "--random_scale",
                ),
                smoke=("--preset", "tiny", "--num_steps", "4", "--learning_rate", "1e-2", "--workers", "0"),
                resume_file="{run}/random/last.pth",
                resume_args=("--reload_path", "{run}/random/last.pth"),
            ),
            Step(
                "test",
                "ShaSpec/eval.py",
                (
                    "--data_dir",
                    "{raw}",
                    "--data_list",
                    "{split_dir}/test15splits.csv",
                    "--cache_dir",
                    "{run}/cache",
                    "--restore_from",
                    "{run}/random/{ckpt}",
                    "--mode",
                    "all",
                    "--savepath",
                    "{run}/test",
                    *_RUNTIME,
                ),
                smoke=_SMOKE_TEST,
                kind="test",
            ),
        ),
        ckpt="final.pth",
        notes="Warm-up with all modalities to 245k iterations, then random missing modalities continuing the same "
        "poly schedule to 406k iterations from the warm-up's best.pth.",
    ),
    # MaM runs on nnU-Net v2: its folders are environment variables, the dataset is prepared (and planned) once.
    "mam": Recipe(
        "mam",
        (
            Step(
                "prepare",
                "MaM/prepare_dataset.py",
                ("--input-path", "{raw}", "--output-path", "{run}/nnUNet_raw", "--split_dir", "{split_dir}", "--plan"),
                smoke=("--patch_size", "32", "--base_features", "16", "-np", "1"),
                kind="prepare",
            ),
            Step(
                "train",
                "MaM/train.py",
                ("138", "3d_fullres_multiencoder_recon", "0", "-tr", "nnUNetTrainerMissingReconBaseline"),
                paper=("-device", "{nnunet_device}"),
                smoke=(
                    "-device",
                    "cpu",
                    "--num_epochs",
                    "1",
                    "--num_iterations_per_epoch",
                    "2",
                    "--num_val_iterations_per_epoch",
                    "1",
                ),
                resume_file="{run}/nnUNet_results/Dataset138_MaM/nnUNetTrainerMissingReconBaseline__nnUNetPlans__"
                "3d_fullres_multiencoder_recon/fold_0/checkpoint_latest.pth",
                resume_args=("--c",),
            ),
            Step(
                "test",
                "MaM/test.py",
                (
                    "--output-path",
                    "{run}/predictions",
                    "--savepath",
                    "{run}/test",
                    "--checkpoint-path",
                    "{ckpt}",
                    "--test_file",
                    "{split_dir}/test15splits.csv",
                ),
                paper=("-device", "{nnunet_device}"),
                smoke=("-device", "cpu", "--no_hd95"),
                kind="test",
            ),
        ),
        ckpt="checkpoint_final.pth",
        env=(
            ("nnUNet_raw", "{run}/nnUNet_raw"),
            ("nnUNet_preprocessed", "{run}/nnUNet_preprocessed"),
            ("nnUNet_results", "{run}/nnUNet_results"),
            ("nnUNet_n_proc_DA", "{workers}"),
        ),
        notes="nnU-Net v2 trainer, SGD 1e-2, poly, 500 epochs × 150 iterations, batch 1, AMP.",
    ),
}


def landed_methods() -> list[str]:
    """Methods with a checked (non-provisional) recipe that are registered and whose scripts all exist, in registry
    order. A provisional recipe (flags not yet checked against its scripts) stays out until it is marked checked."""
    from brats_core.registry import list_methods

    return [
        m
        for m in list_methods()
        if m in RECIPES and not RECIPES[m].provisional and all((REPO / s.script).is_file() for s in RECIPES[m].steps)
    ]


@dataclasses.dataclass
class Context:
    """Where the data and runs are."""

    datapath: Path
    split_dir: Path
    raw: Path | None
    runs: Path
    device: str = "auto"
    gpus: int = 1
    batch_per_gpu: int | None = None
    smoke: bool = False

    def values(self, recipe: Recipe) -> dict[str, str]:
        return {
            "datapath": str(self.datapath),
            "split_dir": str(self.split_dir),
            "raw": str(self.raw) if self.raw else "<BraTS NIfTI folder: pass --raw>",
            "run": str(self.runs / recipe.method),
            "device": self.device,
            # nnU-Net's -device has no "auto"; training on a CPU is only for --smoke
            "nnunet_device": "cpu" if self.device == "cpu" else "cuda",
            "ckpt": "model_last.pth" if self.smoke and recipe.ckpt == "best.pth" else recipe.ckpt,
            "workers": "0" if self.smoke else "8",
        }


def _uses_raw(recipe: Recipe) -> bool:
    """Whether a step of ``recipe`` reads the BraTS NIfTI folder (``{raw}``)."""
    return any(
        "{raw}" in item for step in recipe.steps for item in (*step.args, *step.paper, *step.smoke, *step.resume_args)
    ) or any("{raw}" in v for _, v in recipe.env)


def _fill(items: Sequence[str], values: dict[str, str]) -> list[str]:
    return [item.format(**values) for item in items]


def _batch_flags(step: Step, args: list[str], ctx: Context) -> list[str]:
    """With several GPUs, DDP splits ``--batch_size`` over the processes: check it divides, or apply
    ``--batch_per_gpu`` (a deviation from the paper's batch, said in the printed command's comment)."""
    if not step.ddp or ctx.gpus <= 1 or "--batch_size" not in args:
        return args
    i = args.index("--batch_size")
    if ctx.batch_per_gpu:
        args[i + 1] = str(ctx.batch_per_gpu * ctx.gpus)
    elif int(args[i + 1]) % ctx.gpus:
        raise SystemExit(
            f"{step.script}: the paper's --batch_size {args[i + 1]} cannot be split over {ctx.gpus} GPUs; use --gpus 1 "
            f"(the paper's setting) or --batch_per_gpu B (global batch B × {ctx.gpus}, not the paper's)"
        )
    return args


def _batch_note(recipe: Recipe, step: Step, ctx: Context) -> str | None:
    """The deviation ``--batch_per_gpu`` makes in this step, for the printed comment; None when there is none."""
    paper = _fill(step.args, ctx.values(recipe)) + _fill(step.smoke if ctx.smoke else step.paper, ctx.values(recipe))
    if not (step.ddp and ctx.gpus > 1 and ctx.batch_per_gpu and "--batch_size" in paper):
        return None
    batch = paper[paper.index("--batch_size") + 1]
    return (
        f"--batch_per_gpu {ctx.batch_per_gpu}: global batch {ctx.batch_per_gpu * ctx.gpus} over {ctx.gpus} GPUs, "
        f"not the paper's {batch}"
    )


def step_args(recipe: Recipe, step: Step, ctx: Context) -> list[str]:
    """The step's flags (without the resume flags) for ``ctx``."""
    values = ctx.values(recipe)
    args = _fill(step.args, values) + _fill(step.smoke if ctx.smoke else step.paper, values)
    return _batch_flags(step, args, ctx)


def launcher(step: Step, ctx: Context, python: str) -> list[str]:
    """``python`` or, for DDP training on several GPUs, ``torchrun --standalone --nproc_per_node N``."""
    if step.ddp and ctx.gpus > 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={ctx.gpus}"]
    return [python]


def shell_lines(recipe: Recipe, step: Step, ctx: Context, python: str = "python", array: bool = False) -> list[str]:
    """The step as bash lines: the resume test (when resumable) and the command.

    Args:
        array: evaluate one scenario per SLURM array task (``--scenarios $SLURM_ARRAY_TASK_ID``).
    """
    values = ctx.values(recipe)
    env = [f"{k}={shlex.quote(v.format(**values))}" for k, v in recipe.env]
    command = " ".join([*env, shlex.join([*launcher(step, ctx, python), step.script, *step_args(recipe, step, ctx)])])
    lines = []
    note = _batch_note(recipe, step, ctx)
    if note:
        lines.append(f"# {note}")
    if step.resume_file:
        check = shlex.quote(step.resume_file.format(**values))
        extra = shlex.join(_fill(step.resume_args, values))
        lines.append(f"RESUME=(); if [ -f {check} ]; then RESUME=({extra}); fi")
        command += ' ${RESUME[@]+"${RESUME[@]}"}'  # bash < 4.4 calls an empty array unbound under set -u
    if array and step.scenario_array:
        command += ' --scenarios "$SLURM_ARRAY_TASK_ID"'
    return [*lines, command]


def resolved_command(recipe: Recipe, step: Step, ctx: Context, python: str = sys.executable) -> list[str]:
    """The step's argv as it runs now (resume flags added when its checkpoint exists)."""
    values = ctx.values(recipe)
    argv = [*launcher(step, ctx, python), step.script, *step_args(recipe, step, ctx)]
    if step.resume_file and Path(step.resume_file.format(**values)).is_file():
        argv += _fill(step.resume_args, values)
    return argv


PAPER_COSTS = REPO / "benchmarks" / "paper_scale.json"
"""What each method costs at its paper settings, measured by ``benchmarks/paper_scale.py`` (shown beside its
commands)."""


def read_costs(path: Path | None = None) -> Mapping[str, Any] | None:
    """The report of ``benchmarks/paper_scale.py`` (default :data:`PAPER_COSTS`; ``{"rows": {section: {method:
    row}}, "utilisation": [lo, hi], …}``); None when the file is absent or not such a report (the commands are then
    printed without the figures)."""
    try:
        report = json.loads((path or PAPER_COSTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(report, dict) and isinstance(report.get("rows"), dict) and report.get("utilisation")):
        return None
    return report


def format_range(values: Sequence[float], unit: str = "") -> str:
    """``low–high`` (or one value when they print alike): integers as they are, other numbers with one decimal
    below 10 and none above."""

    def one(v: float) -> str:
        return f"{v:,}" if isinstance(v, int) else f"{v:.1f}" if v < 10 else f"{v:,.0f}"

    low, high = one(min(values)), one(max(values))
    return (low if low == high else f"{low}–{high}") + unit


def cost_lines(method: str, report: Mapping[str, Any] | None) -> list[str]:
    """Comment lines with ``method``'s paper-scale figures: the schedule's optimiser steps, the GPU-hours estimated
    from its FLOPs, the loader workers that keep the estimated H100 step busy and the CPU evaluation of one case."""
    if report is None:
        return []
    rows = {section: report["rows"].get(section, {}).get(method, {}) for section in ("flops", "data", "eval")}
    parts = []
    bill = rows["flops"].get("bill")
    if bill:
        hours, utilisation = bill["gpu_hours"], report["utilisation"]
        parts.append(
            f"{bill['steps']:,} optimiser steps, {bill['pflop']:,.0f} PFLOP: "
            f"one H100 {format_range(hours['H100 tf32'], ' h')}, one A100 {format_range(hours['A100 tf32'], ' h')} "
            f"(estimate: TF32 at {min(utilisation):.0%}–"
            f"{max(utilisation):.0%} of peak)"
        )
    if rows["data"].get("workers_gpu_step"):
        parts.append(
            f"{format_range(rows['data']['workers_gpu_step'])} loader workers to keep pace with that H100 step"
        )
    if "eval_s" in rows["eval"]:
        minutes = rows["eval"]["eval_s"] / 60
        parts.append(f"evaluation {minutes:.0f} min per case on {report.get('threads', 2)} CPU threads")
    if not parts:
        return ["# cost: not measured by benchmarks/paper_scale.py"]
    return ["# cost (measured by benchmarks/paper_scale.py):", *(f"#   {part}" for part in parts)]


def print_plan(methods: Sequence[str], ctx: Context) -> str:
    """The bash script of every method's sequence, with comments (what ``reproduce.py`` prints)."""
    out = ["#!/bin/bash", "# generated by reproduce.py: every step continues where it stopped when re-run", "set -e"]
    costs = read_costs()
    for method in methods:
        recipe = RECIPES[method]
        out += ["", f"# ---- {method}: {recipe.notes}", *cost_lines(method, costs)]
        if recipe.provisional:
            out.append("# (provisional recipe: flags not yet checked against the final scripts)")
        for step in recipe.steps:
            out.append(f"# {method} {step.name}")
            out += shell_lines(recipe, step, ctx)
    out += ["", "# the comparison table and figures", shlex.join(report_command(methods, ctx, "python"))]
    return "\n".join(out) + "\n"


def report_command(methods: Sequence[str], ctx: Context, python: str, out: Path | None = None) -> list[str]:
    argv = [python, "report.py", "--out", str(out or ctx.runs / "report"), "--datapath", str(ctx.datapath)]
    for m in methods:
        argv += ["--run", f"{m}={ctx.runs / m / RECIPES[m].test_dir}"]
    return argv


def write_slurm(
    methods: Sequence[str], ctx: Context, out_dir: Path, time_limit: str, cpus: int, options: Sequence[str]
) -> list[Path]:
    """One ``.sbatch`` per step (evaluations as 15-task arrays) and ``submit_all.sh`` chaining them per method with
    ``--dependency=afterok``. Every script is resumable, so a job that hit its time limit is simply resubmitted."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # jobs start in the repository: make the data and run paths independent of the submitting shell's folder
    ctx = dataclasses.replace(
        ctx,
        datapath=ctx.datapath.resolve(),
        split_dir=ctx.split_dir.resolve(),
        runs=ctx.runs.resolve(),
        raw=ctx.raw.resolve() if ctx.raw else None,
    )
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    written: list[Path] = []
    submit = [
        "#!/bin/bash",
        "# submit every method's chain; re-running resubmits and each step continues",
        "set -e",
        f"cd {shlex.quote(str(out_dir.resolve()))}",
    ]
    for method in methods:
        recipe = RECIPES[method]
        previous = None
        for k, step in enumerate(recipe.steps, start=1):
            name = f"{method}_{k}_{step.name}"
            array = step.kind == "test" and step.scenario_array
            gpus = 0 if step.kind == "prepare" else (ctx.gpus if step.kind == "train" else 1)
            header = [
                "#!/bin/bash",
                f"#SBATCH --job-name={name}",
                f"#SBATCH --time={time_limit}",
                f"#SBATCH --cpus-per-task={cpus}",
                f"#SBATCH --output={logs.resolve()}/%x-%A_%a.out",
                *([f"#SBATCH --gres=gpu:{gpus}"] if gpus else []),
                *(["#SBATCH --array=1-15"] if array else []),
                *(f"#SBATCH {o}" for o in options),
            ]
            body = [
                "set -euo pipefail",
                f"cd {shlex.quote(str(REPO))}",
                'PYTHON="${PYTHON:-python}"',
                f"# step: {method} {step.name}",
                *shell_lines(recipe, step, ctx, python="$PYTHON", array=array),
            ]
            body[-1] = body[-1].replace("'$PYTHON'", '"$PYTHON"')
            path = out_dir / f"{name}.sbatch"
            path.write_text("\n".join(header + body) + "\n")
            written.append(path)
            dep = f"--dependency=afterok:${previous} " if previous else ""
            var = f"J_{method}_{k}"
            submit.append(f"{var}=$(sbatch --parsable {dep}{path.name})")
            previous = "{" + var + "}"
    report = shlex.join(report_command(methods, ctx, "python"))
    submit.append("echo " + shlex.quote(f"submitted; when every job has finished: {report}"))
    path = out_dir / "submit_all.sh"
    path.write_text("\n".join(submit) + "\n")
    path.chmod(0o755)
    return [*written, path]


def _run(argv: Sequence[str], env: dict[str, str] | None = None) -> None:
    print(f"\n$ {shlex.join(argv)}", flush=True)
    t0 = time.time()
    done = subprocess.run(list(argv), cwd=REPO, env=env)
    if done.returncode:
        # the step printed its own error; a traceback of this process would only repeat the command line
        raise SystemExit(
            f"the step above failed (exit status {done.returncode}); fix what it names and re-run: each step "
            "continues where it stopped"
        )
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def run_methods(methods: Sequence[str], ctx: Context, env: dict[str, str] | None = None) -> None:
    """Run every step of every method here, in order (each continues where it stopped)."""
    for method in methods:
        recipe = RECIPES[method]
        values = ctx.values(recipe)
        step_env = {**(env or os.environ), **{k: v.format(**values) for k, v in recipe.env}}
        for step in recipe.steps:
            _run(resolved_command(recipe, step, ctx), step_env)


def smoke(out: Path, methods: Sequence[str], cases: int, shape: Sequence[int], seed: int) -> Path:
    """Synthetic data → preprocessing → split → every method for 2 steps → evaluation → report (CPU, tiny presets).

    Returns:
        The report folder.
    """
    out = out.resolve()
    raw, pre = out / "raw", out / "preprocessed"
    py = sys.executable
    if not (raw / "done").is_file():
        _run(
            [
                py,
                "-m",
                "brats_core.data.synthetic",
                "--out",
                str(raw),
                "--n",
                str(cases),
                "--shape",
                *map(str, shape),
                "--seed",
                str(seed),
            ]
        )
        (raw / "done").write_text("")
    _run(
        [
            py,
            "preprocess.py",
            "--input-path",
            str(raw),
            "--output-path",
            str(pre),
            "--patch_size",
            "32",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    if not (pre / "splits" / "train.txt").is_file():
        _run(
            [
                py,
                "-m",
                "brats_core.data.splits",
                "generate",
                "--datapath",
                str(pre),
                "--out",
                str(pre / "splits"),
                "--seed",
                str(seed),
            ]
        )
    ctx = Context(pre, pre / "splits", raw, out / "runs", device="cpu", smoke=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run_methods(methods, ctx, env)
    report = out / "report"
    _run(report_command(methods, ctx, py, report), env)
    return report


def parser_for(step: Step) -> argparse.ArgumentParser:
    """The step script's own argument parser (its module's ``build_parser()``)."""
    module = importlib.import_module(step.module)
    build = getattr(module, "build_parser", None)
    if build is None:
        raise AttributeError(f"{step.script} has no build_parser()")
    return build()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__.splitlines()[0])
    p.add_argument("--datapath", default="data/BRATS2023_Training_npy", help="preprocessed data (preprocess.py)")
    p.add_argument("--split_dir", default=None, help="split files (default: <datapath>/splits)")
    p.add_argument("--raw", default=None, help="the BraTS 2023 NIfTI folder (M3AE, ShaSpec and MaM read it)")
    p.add_argument("--runs", default="runs", help="one sub-folder per method (default: runs)")
    p.add_argument("--method", action="append", default=None, help="only this method (repeatable; default: all landed)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--gpus", type=int, default=1, help="GPUs per training job; >1 trains through torchrun (DDP)")
    p.add_argument(
        "--batch_per_gpu",
        type=int,
        default=None,
        help="with --gpus N: per-GPU batch (global batch N·B; NOT the paper's setting)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run the steps here instead of printing them")
    mode.add_argument("--slurm", default=None, metavar="DIR", help="write SLURM scripts and submit_all.sh to DIR")
    mode.add_argument("--smoke", action="store_true", help="every landed method for 2 steps on synthetic data + report")
    g = p.add_argument_group("SLURM")
    g.add_argument("--time", default="72:00:00", help="--time of every job (steps resume when resubmitted)")
    g.add_argument("--cpus", type=int, default=8, help="--cpus-per-task")
    g.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH line, e.g. --sbatch=--partition=gpu (repeatable)",
    )
    g = p.add_argument_group("smoke")
    g.add_argument("--smoke_dir", default="runs/smoke", help="working folder of --smoke (default: runs/smoke)")
    g.add_argument("--cases", type=int, default=10, help="synthetic cases of --smoke (default 10: 2 test cases)")
    g.add_argument("--shape", type=int, nargs=3, default=(48, 48, 40), help="synthetic volume shape of --smoke")
    g.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    landed = landed_methods()
    methods = args.method or landed
    unknown = [m for m in methods if m not in RECIPES]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; recipes: {', '.join(RECIPES)}")
    missing = [m for m in methods if m not in landed]
    if missing:
        parser.error(f"method(s) {missing} are not available here yet (landed: {', '.join(landed) or 'none'})")
    if args.gpus < 1:
        parser.error("--gpus must be at least 1")
    if args.smoke:
        report = smoke(Path(args.smoke_dir), methods, args.cases, args.shape, args.seed)
        print(f"\nsmoke run finished: {report / 'report.md'}")
        return 0
    if (args.run or args.slurm) and not args.raw:
        need = [m for m in methods if _uses_raw(RECIPES[m])]
        if need:
            parser.error(f"{', '.join(need)} read the BraTS NIfTI folder: pass --raw")
    datapath = Path(args.datapath)
    split_dir = Path(args.split_dir) if args.split_dir else datapath / "splits"
    from brats_core.data.splits import (
        SFUSION_TRAIN_FILE,  # imports torch, which printing the plan does not need
    )

    if (args.run or args.slurm) and "sfusion" in methods and not (split_dir / SFUSION_TRAIN_FILE).is_file():
        parser.error(
            f"sfusion trains on {split_dir / SFUSION_TRAIN_FILE} (the paper's 872 cases), which is missing: run "
            f"`python -m brats_core.data.splits download --out {split_dir}` (it derives the file from train.txt)"
        )
    ctx = Context(
        datapath,
        split_dir,
        Path(args.raw) if args.raw else None,
        Path(args.runs),
        args.device,
        args.gpus,
        args.batch_per_gpu,
    )
    if args.slurm:
        files = write_slurm(methods, ctx, Path(args.slurm), args.time, args.cpus, args.sbatch)
        print(f"wrote {len(files)} files to {args.slurm}; submit with: bash {Path(args.slurm) / 'submit_all.sh'}")
        return 0
    if args.run:
        run_methods(methods, ctx)
        _run(report_command(methods, ctx, sys.executable))
        return 0
    print(print_plan(methods, ctx), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
