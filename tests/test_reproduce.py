"""The reproduce runner: recipes, printed and SLURM commands parsed by each method's own parser, resume, smoke."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest

from brats_core.apps import reproduce
from brats_core.modalities import SCENARIOS
from brats_core.registry import list_methods, method_info

LANDED = reproduce.landed_methods()
RFNET = {"imfuse", "mmformer", "robustseg", "sfusion", "uhved"}  # the methods on the shared train/test scripts


def _parse_command(line: str, resume_line: str | None) -> tuple[str, list[str]]:
    """(script, argv) of a generated command line: launcher dropped, the ``${RESUME[@]+…}`` expansion replaced by
    the flags that the preceding ``RESUME=(...)`` line sets, the array task id replaced by 7."""
    tokens = shlex.split(line)
    script_at = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
    script, argv = tokens[script_at], tokens[script_at + 1 :]
    resume: list[str] = []
    if resume_line is not None:
        resume = shlex.split(re.search(r"then RESUME=\((.*)\); fi", resume_line).group(1))
    out: list[str] = []
    for t in argv:
        out += resume if t == "${RESUME[@]+${RESUME[@]}}" else ["7" if t == "$SLURM_ARRAY_TASK_ID" else t]
    return script, out


def _steps(text: str) -> list[tuple[str, str, str | None]]:
    """(marker, command line, resume line) for every ``# step:`` (SLURM) or ``# <method> <step>`` (plan) block."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.startswith("# step: ") or re.fullmatch(r"# [a-z0-9]+ [a-z]+", line):
            resume = lines[i + 1] if lines[i + 1].startswith("RESUME=") else None
            found.append((line, lines[i + 2] if resume else lines[i + 1], resume))
    return found


def test_landed_methods_are_registered_and_have_scripts() -> None:
    # written out, not taken from the code under test: a recipe pointing at a missing script must not drop a method
    assert LANDED == ["imfuse", "mmformer", "robustseg", "sfusion", "uhved", "m3ae", "shaspec", "mam"]
    assert not any(r.provisional for r in reproduce.RECIPES.values())
    assert set(LANDED) <= set(list_methods())
    for m in LANDED:
        assert all((reproduce.REPO / s.script).is_file() for s in reproduce.RECIPES[m].steps)
    for m in set(reproduce.RECIPES) - set(LANDED):  # not registered, a script missing, or a provisional recipe
        recipe = reproduce.RECIPES[m]
        scripts = all((reproduce.REPO / s.script).is_file() for s in recipe.steps)
        assert m not in list_methods() or not scripts or recipe.provisional
    for recipe in reproduce.RECIPES.values():
        assert recipe.steps[-1].kind == "test" and recipe.method in reproduce.RECIPES


def test_slurm_scripts_parse_with_each_method_parser(tmp_path: Path) -> None:
    out = tmp_path / "slurm"
    data, runs = tmp_path / "data", tmp_path / "runs"
    (data / "splits").mkdir(parents=True)
    (data / "splits" / "train2.txt").write_text("")  # SFusion's list (`brats_core.data.splits download` derives it)
    assert reproduce.main(["--slurm", str(out), "--datapath", str(data), "--runs", str(runs), "--raw", "raw"]) == 0
    n_parsed = 0
    for method in LANDED:
        recipe = reproduce.RECIPES[method]
        for k, step in enumerate(recipe.steps, start=1):
            text = (out / f"{method}_{k}_{step.name}.sbatch").read_text()
            assert text.startswith("#!/bin/bash\n#SBATCH --job-name=")
            assert ("#SBATCH --array=1-15" in text) == step.scenario_array
            ((marker, command, resume),) = _steps(text)
            assert marker == f"# step: {method} {step.name}" and '"$PYTHON" ' in command
            script, argv = _parse_command(command, resume)
            assert script == step.script
            args = reproduce.parser_for(step).parse_args(argv)
            n_parsed += 1
            if step.resume_file:  # the resume branch's flags parse too and name the step's own checkpoint
                assert str(runs.resolve() / method) in resume
            if method not in RFNET:
                continue
            assert Path(args.datapath) == data.resolve() and Path(args.split_dir) == data.resolve() / "splits"
            if step.kind == "train":
                paper = dict(zip(step.paper[::2], step.paper[1::2], strict=False))
                assert str(args.num_epochs) == paper["--num_epochs"]
                assert str(args.batch_size) == paper["--batch_size"]
                assert Path(args.resume) == runs.resolve() / method / "model_last.pth"
                assert Path(args.savepath) == runs.resolve() / method
                if method == "imfuse":
                    assert args.mamba_skip and args.interleaved_tokenization
            else:
                assert args.scenarios == "7"
                assert Path(args.resume) == runs.resolve() / method / recipe.ckpt
                assert Path(args.savepath) == runs.resolve() / method / "test"
    assert n_parsed == sum(len(reproduce.RECIPES[m].steps) for m in LANDED)
    submit = (out / "submit_all.sh").read_text()
    for method in LANDED:
        n = len(reproduce.RECIPES[method].steps)
        assert f"--dependency=afterok:${{J_{method}_{n - 1}}} {method}_{n}_test.sbatch" in submit
    assert "report.py" in submit


def test_printed_plan_parses_and_torchrun(tmp_path: Path, capsys) -> None:
    assert reproduce.main(["--datapath", "d", "--runs", "r"]) == 0
    plan = capsys.readouterr().out
    steps = _steps(plan)
    assert len(steps) == sum(len(reproduce.RECIPES[m].steps) for m in LANDED)
    for method in LANDED:
        for step in reproduce.RECIPES[method].steps:
            assert f"# {method} {step.name}\n" in plan
    for _, command, resume in steps:
        script, argv = _parse_command(command, resume)
        step = next(s for m in LANDED for s in reproduce.RECIPES[m].steps if s.script == script)
        reproduce.parser_for(step).parse_args(argv)
    assert "python report.py --out r/report --datapath d --run " in plan
    # several GPUs: torchrun for training, batch sizes must split over the processes
    ctx = reproduce.Context(Path("d"), Path("d/splits"), None, Path("r"), gpus=3)
    mm = reproduce.RECIPES["mmformer"]
    (line,) = reproduce.shell_lines(mm, mm.steps[0], ctx)[1:]
    assert line.startswith("torchrun --standalone --nproc_per_node=3 mmFormer/train.py ")
    assert reproduce.parser_for(mm.steps[0]).parse_args(_parse_command(line, None)[1]).batch_size == 3
    im = reproduce.RECIPES["imfuse"]
    with pytest.raises(SystemExit, match="cannot be split over 3 GPUs"):
        reproduce.shell_lines(im, im.steps[0], ctx)
    ctx.batch_per_gpu = 2
    note, _, line = reproduce.shell_lines(im, im.steps[0], ctx)
    assert "--batch_size 6" in line and note == "# --batch_per_gpu 2: global batch 6 over 3 GPUs, not the paper's 1"
    assert reproduce.shell_lines(im, im.steps[1], ctx)[0].startswith("python IMFuse/test.py")  # tests stay 1 process
    # MaM's nnU-Net scripts take -device cpu|cuda: --device reaches them ("auto" → cuda)
    mam = reproduce.RECIPES["mam"]
    for device, expected in (("cpu", "-device cpu"), ("auto", "-device cuda")):
        ctx = reproduce.Context(Path("d"), Path("d/splits"), None, Path("r"), device=device)
        assert all(expected in reproduce.shell_lines(mam, step, ctx)[-1] for step in mam.steps[1:])


def test_resume_flag_only_when_checkpoint_exists(tmp_path: Path) -> None:
    ctx = reproduce.Context(tmp_path / "d", tmp_path / "d" / "splits", None, tmp_path / "runs")
    recipe = reproduce.RECIPES["imfuse"]
    train = recipe.steps[0]
    assert "--resume" not in reproduce.resolved_command(recipe, train, ctx, "py")
    (tmp_path / "runs" / "imfuse").mkdir(parents=True)
    (tmp_path / "runs" / "imfuse" / "model_last.pth").write_bytes(b"")
    argv = reproduce.resolved_command(recipe, train, ctx, "py")
    assert argv[:2] == ["py", "IMFuse/train_poly.py"] and argv[-2:] == [
        "--resume",
        str(ctx.runs / "imfuse/model_last.pth"),
    ]
    smoke = reproduce.Context(ctx.datapath, ctx.split_dir, None, ctx.runs, device="cpu", smoke=True)
    test_argv = reproduce.resolved_command(recipe, recipe.steps[1], smoke, "py")
    assert str(ctx.runs / "imfuse/model_last.pth") in test_argv  # smoke runs never validate: no best.pth
    args = reproduce.parser_for(train).parse_args(reproduce.resolved_command(recipe, train, smoke, "py")[2:])
    assert (args.preset, args.max_steps, args.device) == ("tiny", 2, "cpu")


def test_rejects_unknown_methods(capsys) -> None:
    with pytest.raises(SystemExit):
        reproduce.main(["--method", "nosuch"])
    assert "unknown method" in capsys.readouterr().err


def test_run_and_slurm_need_raw_only_for_methods_that_read_it(tmp_path: Path, capsys) -> None:
    base = ["--datapath", str(tmp_path / "d"), "--runs", str(tmp_path / "runs")]
    with pytest.raises(SystemExit):
        reproduce.main([*base, "--slurm", str(tmp_path / "s"), "--method", "imfuse", "--method", "m3ae"])
    assert "m3ae read the BraTS NIfTI folder: pass --raw" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    assert reproduce.main([*base, "--slurm", str(tmp_path / "s"), "--method", "imfuse"]) == 0
    with pytest.raises(SystemExit):  # SFusion's paper list must exist before anything runs
        reproduce.main([*base, "--slurm", str(tmp_path / "s2"), "--method", "sfusion"])
    assert "sfusion trains on" in capsys.readouterr().err and not (tmp_path / "s2").exists()


def test_generated_resume_lines_run_under_strict_bash(tmp_path: Path) -> None:
    """The resume expansion works with ``set -u`` whether or not a checkpoint exists (bash < 4.4 included)."""
    import subprocess

    ctx = reproduce.Context(tmp_path / "d", tmp_path / "d" / "splits", None, tmp_path / "runs")
    recipe = reproduce.RECIPES["imfuse"]
    lines = reproduce.shell_lines(recipe, recipe.steps[0], ctx, "echo")
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    first = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert first.startswith("IMFuse/train_poly.py ") and first.endswith(" --interleaved_tokenization\n")
    (tmp_path / "runs" / "imfuse").mkdir(parents=True)
    (tmp_path / "runs" / "imfuse" / "model_last.pth").write_bytes(b"")
    again = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert again.endswith(f" --resume {tmp_path / 'runs' / 'imfuse' / 'model_last.pth'}\n")


@pytest.mark.slow
def test_smoke_runs_every_landed_method_and_the_report(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    assert reproduce.main(["--smoke", "--smoke_dir", str(out)]) == 0
    splits = out / "preprocessed" / "splits"
    test_cases = {row[0] for row in csv.reader((splits / "test15splits.csv").open()) if row and row[0] != "case"}
    assert 2 <= len(test_cases) <= 3
    for method in LANDED:
        with (out / "runs" / method / "test" / "per_case_all.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert {(r["case"], r["scenario"]) for r in rows} == {(c, s.name) for c in test_cases for s in SCENARIOS}
    table = (out / "report" / "table.md").read_text()
    for method in LANDED:
        assert f"{method_info(method).display} WT" in table
    for name in ("bars.png", "dice_vs_params.png", "qualitative.png", "table.csv", "table.tex", "wilcoxon.csv"):
        assert (out / "report" / name).stat().st_size > 0


def test_repo_is_the_repository_root() -> None:
    """The recipes' scripts are found relative to it (it moved with ``reproduce.py`` into ``brats_core/apps``)."""
    assert (reproduce.REPO / "pyproject.toml").is_file() and (reproduce.REPO / "IMFuse" / "train_poly.py").is_file()


_COSTS = {
    "threads": 2,
    "utilisation": [0.05, 0.2],
    "rows": {
        "flops": {"imfuse": {"bill": {"steps": 875_000, "pflop": 1234.4,
                                      "gpu_hours": {"H100 tf32": [11.2, 18.7], "A100 tf32": [35.1, 58.6]}}}},
        "data": {"imfuse": {"sample_s": 0.6, "workers_gpu_step": [20, 5]}},
        "eval": {"imfuse": {"eval_s": 600.0}},
    },
}  # fmt: skip


def test_cost_lines_state_the_measured_figures_and_their_assumptions() -> None:
    head, *lines = reproduce.cost_lines("imfuse", _COSTS)
    assert head == "# cost (measured by benchmarks/paper_scale.py):" and all(x.startswith("#   ") for x in lines)
    line = " ".join(lines)
    assert "875,000 optimiser steps, 1,234 PFLOP: one H100 11–19 h, one A100 35–59 h" in line
    assert "(estimate: TF32 at 5%–20% of peak)" in line
    assert "5–20 loader workers to keep pace with that H100 step" in line
    assert "evaluation 10 min per case on 2 CPU threads" in line
    assert reproduce.cost_lines("mmformer", _COSTS) == ["# cost: not measured by benchmarks/paper_scale.py"]
    assert reproduce.cost_lines("imfuse", None) == []


def test_plan_shows_costs_from_the_report_and_survives_a_damaged_one(tmp_path, monkeypatch) -> None:
    ctx = reproduce.Context(Path("d"), Path("d/splits"), None, Path("r"))
    report = tmp_path / "paper_scale.json"
    monkeypatch.setattr(reproduce, "PAPER_COSTS", report)
    report.write_text(json.dumps(_COSTS))
    plan = reproduce.print_plan(["imfuse", "mmformer"], ctx).splitlines()
    at = plan.index(next(line for line in plan if line.startswith("# ---- imfuse")))
    assert plan[at + 1] == "# cost (measured by benchmarks/paper_scale.py):"
    assert plan[at + 2].startswith("#   875,000 optimiser steps")
    assert "# cost: not measured by benchmarks/paper_scale.py" in plan
    for damaged in ("{not json", '{"rows": 3}', "[]", '{"rows": {}}'):
        report.write_text(damaged)
        assert not [line for line in reproduce.print_plan(["imfuse"], ctx).splitlines() if "cost" in line]
    report.unlink()
    assert reproduce.read_costs() is None


def test_format_range() -> None:
    assert reproduce.format_range([20, 5]) == "5–20" and reproduce.format_range([3, 3]) == "3"
    assert reproduce.format_range([0.42, 0.84], " h") == "0.4–0.8 h"
    assert reproduce.format_range([7.04, 28.1], " h") == "7.0–28 h"
    assert reproduce.format_range([1234.4, 4937.7], " h") == "1,234–4,938 h"


def test_the_committed_report_covers_every_method() -> None:
    """``benchmarks/paper_scale.json`` (the paper-size measurements) gives each landed method a cost line."""
    report = reproduce.read_costs()
    assert report is not None, f"{reproduce.PAPER_COSTS} is missing or damaged"
    for method in LANDED:
        text = "\n".join(reproduce.cost_lines(method, report))
        assert "optimiser steps" in text and "min per case" in text, (method, text)
