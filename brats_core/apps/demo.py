"""End-to-end demo on built-in synthetic data: generate → preprocess → split → train IM-Fuse (tiny) → test 15 scenarios.

Runs each step as the command a user would type (printed before it runs), so the demo doubles as a walkthrough.
Every step is resumable: re-running skips finished work.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from brats_core.data.splits import read_mask_csv
from brats_core.utils.cli import run_main
from brats_core.utils.io import RECORD_FILE

REPO = Path(__file__).resolve().parents[2]
STOP_SECONDS = 60.0
"""How long an interrupted demo waits for its running step to stop by itself before terminating it."""


def run_step(argv: list[str]) -> None:
    """Run one step's command, echoed first, and stop the demo when it fails.

    Ctrl-C reaches the step too (the terminal signals the whole foreground process group): the demo waits for the
    step to stop by itself, which takes a moment (it prints one line and leaves no half-written file), and then
    stops with its own one line (``cli.run_main``). ``subprocess.run`` would kill the step after a quarter second.
    """
    print(f"\n$ {shlex.join(argv)}", flush=True)
    t0 = time.time()
    step = subprocess.Popen(argv, cwd=REPO)
    try:
        code = step.wait()
    except KeyboardInterrupt:
        try:
            step.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:  # the interrupt reached the demo alone (kill -INT <pid>)
            step.terminate()
            step.wait()
        raise
    if code:
        raise SystemExit(f"the step above failed (exit status {code}); re-run the demo to continue")
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brats_core.apps.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="working folder (default: runs/demo)")
    parser.add_argument("--cases", type=int, default=16, help="synthetic cases (default: 16)")
    parser.add_argument("--shape", type=int, nargs=3, default=(72, 72, 60), help="synthetic volume shape")
    parser.add_argument("--num_epochs", type=int, default=32, help="IM-Fuse epochs of 25 steps (default: 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_epochs < 1 or args.cases < 5:
        parser.error(
            "--num_epochs must be at least 1 and --cases at least 5 (train and test cases; 10 or more have validation "
            "cases too)"
        )
    out = Path(args.out).resolve()
    raw, pre, run, test = out / "raw", out / "preprocessed", out / "imfuse", out / "imfuse_test"
    py = sys.executable

    run_step([py, "-m", "brats_core.data.synthetic", "--out", str(raw), "--n", str(args.cases), "--shape",
             *map(str, args.shape), "--seed", str(args.seed)])  # fmt: skip
    run_step([py, "preprocess.py", "--input-path", str(raw), "--output-path", str(pre), "--patch_size", "32"])
    if not (pre / "splits" / "train.txt").is_file():
        run_step([py, "-m", "brats_core.data.splits", "generate", "--datapath", str(pre), "--out", str(pre / "splits"),
                  "--seed", str(args.seed)])  # fmt: skip
    # The paper configuration (--mamba_skip --interleaved_tokenization) at the tiny preset; a higher learning rate
    # than the paper's 2e-4 so that a few hundred CPU steps suffice on the synthetic data. Validation every 4
    # epochs (every epoch for shorter runs) keeps best.pth; a split without validation cases (fewer than 10
    # synthetic cases) trains without (an interval beyond the run) and the last checkpoint is tested.
    # --no_progress: the training logs its step, loss and time left after the first step and every 30 s, which
    # reads well in a terminal and in a saved log alike (a bar's redraws do not).
    validates = bool(read_mask_csv(pre / "splits" / "val15splits.csv", allow_empty=True))
    val_every = min(4, args.num_epochs) if validates else args.num_epochs + 1
    resume = ["--resume", str(run / "model_last.pth")] if (run / "model_last.pth").is_file() else []
    run_step([py, "IMFuse/train_poly.py", "--datapath", str(pre), "--dataname", "BRATS2023", "--savepath", str(run),
             "--mamba_skip", "--interleaved_tokenization", "--preset", "tiny", "--num_epochs", str(args.num_epochs),
             "--iter_per_epoch", "25", "--batch_size", "2", "--lr", "5e-3", "--val_every", str(val_every),
             "--workers", "2", "--device", "cpu", "--no_progress", *resume])  # fmt: skip
    best = run / "best.pth" if (run / "best.pth").is_file() else run / "model_last.pth"
    record = test / RECORD_FILE
    # a best.pth newer than the last evaluation (more epochs since) replaces its results; otherwise they resume
    stale = record.is_file() and best.stat().st_mtime > record.stat().st_mtime
    run_step([py, "IMFuse/test.py", "--datapath", str(pre), "--dataname", "BRATS2023", "--savepath", str(test),
             "--resume", str(best), "--mamba_skip", "--interleaved_tokenization", "--device", "cpu", "--no_progress",
             *(["--overwrite"] if stale else [])])  # fmt: skip
    print(f"\nPer-case scores: {test / 'per_case_all.csv'}\nSummary table:   {test / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
