"""Cost of each method at its paper configuration: training step, data pipeline, evaluation, FLOPs and compute bill.

    python benchmarks/paper_scale.py --case /data/BraTS2023/BraTS-GLI-00000-000 --out paper_scale.md
    python benchmarks/paper_scale.py --case CASE --sections flops --methods imfuse --patch 32 --out quick.md

Sections (``--sections``, any subset, each per method in a fresh subprocess with ``--threads`` threads and an address
space limit of ``--mem_limit_gb`` through ``RLIMIT_AS``):

* ``train``: one training step on CPU as ``benchmarks/train_step.py`` runs it (forward, the method's loss, backward,
  its optimiser; random inputs; the paper batch), median of ``--steps`` after one warm-up, and peak RSS. The model is
  the paper configuration (``paper`` preset, IM-Fuse with ``--mamba_skip --interleaved_tokenization``). When the
  paper patch does not fit, a method whose training script offers activation checkpointing (ShaSpec's
  ``--activation_checkpointing``) is retried with it (reported), then the patch steps down by 16 until a step fits;
  the memory at the paper patch is extrapolated linearly in voxels through the two largest patches that fit (one
  patch only: proportionally, an upper bound) and the step time proportionally to voxels.
* ``data``: the training data pipeline at the paper patch on one worker (load the preprocessed case, crop, augment,
  collate a batch): seconds per sample, and the loader workers needed to keep pace with the measured step time, with
  each ``--step_times`` and with the H100 step the FLOPs imply. The shared RFNet pipeline
  (``brats_core.data.transforms.rfnet_augmentation``), ShaSpec's and M3AE's own; MaM's is nnU-Net's loader (not
  measured).
* ``eval``: the test scripts' 15-scenario evaluation of the case (the method's preprocessing, sliding window at the
  paper window with overlap 0.5, encode-once, Dice and HD95 per scenario): seconds and peak RSS.
* ``flops``: floating-point operations of one training step and of one evaluation window, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention, forward and backward;
  elementwise ops, norms and the optimiser update are not counted). The Mamba selective scan is not an op the counter
  sees: it runs outside the counter and is counted analytically, :func:`scan_flops`, with its backward as twice its
  forward. From them the compute bill of each paper schedule (``brats_core.apps.reproduce.RECIPES``): total PFLOP and
  GPU-hours at :data:`PEAK_TFLOPS` and the ``--utilisation`` range (:data:`UTILISATION`: 5–20 % of peak). These
  hours are an estimate, not a measurement: ``benchmarks/gpu_check.py`` measures steps on a real GPU. When counting
  at the paper window runs out of memory, the FLOPs are counted at the two largest smaller windows that fit and
  extrapolated linearly in voxels (said in the report).

``--patch N`` overrides every window side for a quick run (ShaSpec's crop becomes N³). Without ``--case`` (or when
the folder is absent) the ``data`` and ``eval`` sections are skipped with the reason. Output: a Markdown table per
section in ``--out`` and the rows as JSON beside it (``.json``); an existing file is replaced only with
``--overwrite``. ``--merge A.json B.json … --out ALL.md`` measures nothing and combines runs (e.g. one per method,
as the paper-size figures in ``benchmarks/RESULTS.md`` were taken) into one report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.train_step import (
    PAPER_BATCH,
    _loss_and_optimiser,
    _one_method,
    build_paper_model,
    random_batch,
    window_shape,
)
from brats_core.apps.reproduce import format_range
from brats_core.utils.cli import UsageError, run_main
from brats_core.utils.io import atomic_path

SECTIONS = ("train", "data", "eval", "flops")

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # dense peaks from the vendors' data sheets (SXM parts; no sparsity)
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
}
"""Assumed peak TFLOP/s per GPU and precision (PyTorch runs fp32 convolutions in TF32 on these GPUs by default)."""

UTILISATION = (0.05, 0.2)
"""Assumed range of the fraction of a GPU's peak that a training step reaches. 3D segmentation networks at batch 1–3
spend much of a step in memory-bound layers (normalisation, activations, the Mamba scan), far from the tensor-core
peak: nnU-Net's documentation gives 48.5 s per 250-iteration epoch for its 3D U-Net on an A100 with random inputs,
which by this script's count of that network (MaM is nnU-Net's: about 1.1 MFLOP per voxel of a training sample) and its
batch of two patches of 2–2.5 million voxels is roughly 5–10 % of the A100's fp16 peak."""

N_TRAIN = 875
"""Training cases of the paper's BraTS 2023 split (``train.txt``); SFusion trains on ``train2.txt``, 872 cases."""
N_TRAIN_SFUSION = 872
N_TEST = 251
"""Test cases of the split: the evaluation bill is 251 × the case's 15-scenario evaluation."""
MAM_EPOCHS, MAM_ITERATIONS = 500, 150  # upstream MaM's trainer (MaM/trainer.py), not nnU-Net's 1000 × 250
STEP_GPU = ("H100", "tf32")
"""The GPU and precision of the estimated step time that the loader must keep pace with (the paper recipes train
without ``--amp``: convolutions run in TF32, PyTorch's default on these GPUs)."""
CHECKPOINTING = {"shaspec": "activation_checkpointing"}
"""Methods whose training script offers activation checkpointing, and the config field that turns it on."""
RFNET_PIPELINE = {"imfuse": {}, "mmformer": {}, "robustseg": {}, "sfusion": {"intensity": False}, "uhved": {}}
"""``rfnet_augmentation`` options of the methods on the shared data pipeline."""
_OOM_MARKS = ("MemoryError", "can't allocate memory", "bad_alloc", "Cannot allocate memory", "out of memory")


# ---------------------------------------------------------------------------------------------------- FLOP counting


def scan_flops(b: int, d: int, length: int, n: int, with_d: bool = True, with_z: bool = True) -> int:
    """Forward FLOPs of one Mamba-1 selective scan, ``u, delta, z: (b, d, L)``, ``A: (d, n)``, ``B, C: (b, n, L)``.

    Per (b, d, t, n) of the recurrence ``h_t = exp(dt_t·A) ⊙ h_{t-1} + dt_t·B_t·u_t``, ``y_t = Σ_n C_t·h_t``:
    dt·A, exp, dt·u, ·B, the multiply-add into h and the multiply-add into y: 9 FLOPs as mamba-ssm counts them
    (``9·b·d·L·n``), plus one per (b, d, t) for ``D·u`` and one for the gate ``y·silu(z)``.
    """
    per_token = b * d * length
    return 9 * per_token * n + per_token * int(with_d) + per_token * int(with_z)


@dataclasses.dataclass
class FlopCount:
    """FLOPs of a counted call: ``counted`` by FlopCounterMode, ``scan_forward`` added analytically."""

    counted: int = 0
    scan_forward: int = 0
    scans: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
    backward: bool = False

    @property
    def scan(self) -> int:
        """Scan FLOPs: the forward, plus twice it for the backward when one ran."""
        return self.scan_forward * (3 if self.backward else 1)

    @property
    def total(self) -> int:
        return self.counted + self.scan


class _OutsideCounter(torch.autograd.Function):
    """Runs the scan (forward and backward) with every dispatch mode suspended, so the counter does not see it."""

    @staticmethod
    def forward(ctx: Any, call: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:  # type: ignore[override]
        from torch.utils._python_dispatch import _disable_current_modes

        with torch.enable_grad(), _disable_current_modes():
            leaves = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args]
            out = call(*leaves)
        ctx.leaves, ctx.out = leaves, out
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        from torch.utils._python_dispatch import _disable_current_modes

        wanted = [a for a in ctx.leaves if torch.is_tensor(a) and a.requires_grad]
        with _disable_current_modes():
            grads = iter(torch.autograd.grad(ctx.out, wanted, grad, allow_unused=True))
        return (None, *[next(grads) if torch.is_tensor(a) and a.requires_grad else None for a in ctx.leaves])


@contextmanager
def counting_flops(count: FlopCount) -> Iterator[None]:
    """Count the FLOPs of the enclosed code into ``count``; Mamba scans are recorded and counted analytically."""
    import brats_core.nn.mamba as mamba

    real = mamba.selective_scan

    def scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
             **kwargs: Any) -> Any:  # fmt: skip
        b, d, length = u.shape
        count.scans.append((b, d, length, A.shape[1]))
        count.scan_forward += scan_flops(b, d, length, A.shape[1], D is not None, z is not None)

        def call(*a: Any) -> Any:
            return real(*a, **kwargs)

        args = (u, delta, A, B, C, D, z, delta_bias)
        if torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args):
            return _OutsideCounter.apply(call, *args)
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return call(*args)

    mamba.selective_scan = scan
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            yield
    finally:
        mamba.selective_scan = real
        count.counted += counter.get_total_flops()


# ------------------------------------------------------------------------------------------------------ models


def train_step_flops(method: str, patch: int = 0, batch: int = 0) -> dict[str, Any]:
    """FLOPs of one training step (forward, loss, backward; the optimiser update is elementwise, not counted)."""
    torch.manual_seed(0)
    model = build_paper_model(method, patch).train()
    loss_fn, optimizer = _loss_and_optimiser(method, model)
    data = random_batch(batch or PAPER_BATCH[method], window_shape(model), torch.Generator().manual_seed(0))
    count = FlopCount(backward=True)
    with counting_flops(count):
        loss, _ = loss_fn(model, data, 0)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    return {"train_flops": count.total, "train_scan_flops": count.scan, "window": list(window_shape(model))}


def eval_window_flops(method: str, patch: int = 0) -> dict[str, Any]:
    """FLOPs of one evaluation window, batch 1: one forward, and the window's 15 scenarios as the evaluator runs
    them (encode once + 15 decodes when the model supports it, else 15 forwards)."""
    from brats_core.modalities import SCENARIOS

    torch.manual_seed(0)
    model = build_paper_model(method, patch).eval()
    w = torch.randn(1, 4, *window_shape(model))
    mask = SCENARIOS[-1].tensor(1)
    positional = getattr(model, "window_origin", None) is not None  # M3AE: windows indexed by position
    kwargs = {"origin": torch.zeros(1, 3, dtype=torch.int64)} if positional else {}
    forward = FlopCount()
    with torch.no_grad(), counting_flops(forward):  # not inference_mode: the counter hooks the parameters
        model(w, mask, **kwargs)
    if not model.supports_encode:
        return {"window_flops": forward.total, "window_15_flops": 15 * forward.total}
    encode, decode = FlopCount(), FlopCount()
    with torch.no_grad():
        with counting_flops(encode):
            features = model.encode(w)
        with counting_flops(decode):
            model.decode(features, mask)
    return {"window_flops": forward.total, "window_15_flops": encode.total + 15 * decode.total}


# ------------------------------------------------------------------------------------------------ schedules, bills


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training stage of a paper schedule: ``steps`` optimiser steps of the paper batch."""

    name: str
    steps: int
    note: str = ""


def _flag(flags: Sequence[str], *names: str) -> str | None:
    for name in names:
        if name in flags:
            return flags[flags.index(name) + 1]
    return None


def paper_schedule(method: str, n_train: int = N_TRAIN) -> list[Phase]:
    """The training stages of ``RECIPES[method]`` (its paper flags): epochs × steps per epoch, or ``--num_steps``.

    An epoch is N_train steps (the RFNet family and M3AE fine-tuning; SFusion's ``train2.txt`` has 872 cases), N_train
    // batch for M3AE pre-training, 150 iterations for MaM's nnU-Net trainer (500 epochs).
    """
    from brats_core.apps.reproduce import RECIPES

    phases = []
    for step in RECIPES[method].steps:
        if step.kind != "train":
            continue
        flags = list(step.paper)
        if method == "mam":
            phases.append(Phase(step.name, MAM_EPOCHS * MAM_ITERATIONS, "nnU-Net trainer: 500 epochs × 150"))
            continue
        steps = _flag(flags, "--num_steps")
        if steps is not None and "--reload_from_checkpoint" in step.args:
            # ShaSpec's second stage continues the warm-up's global iteration counter up to --num_steps: from the
            # warm-up's best checkpoint, so at least the difference (exactly it when that checkpoint is the last)
            done = sum(p.steps for p in phases)
            phases.append(Phase(step.name, int(steps) - done, f"global iterations {done:,} → {int(steps):,}"))
            continue
        if steps is not None:
            phases.append(Phase(step.name, int(steps)))
            continue
        epochs = int(_flag(flags, "--num_epochs", "--epochs") or 0)
        cases = N_TRAIN_SFUSION if "train2" in (_flag(flags, "--train_file") or "") else n_train
        per_epoch = cases // int(_flag(flags, "--batch_size") or 1) if step.name == "pretrain" else cases
        note = f"{epochs} epochs × {per_epoch}"
        if step.name == "pretrain":
            note += "; FLOPs per step taken as the fine-tuning step's (same network, 2 windows)"
        phases.append(Phase(step.name, epochs * per_epoch, note))
    return phases


def gpu_hours(flop: float, peak_tflops: float, utilisation: float) -> float:
    """Hours of one GPU delivering ``utilisation`` × ``peak_tflops`` for ``flop`` floating-point operations."""
    return flop / (peak_tflops * 1e12 * utilisation) / 3600


def compute_bill(train_flops: float, phases: Sequence[Phase], eval_case_flops: float | None,
                 utilisation: Sequence[float], n_test: int = N_TEST) -> dict[str, Any]:  # fmt: skip
    """Total PFLOP of the schedule (training steps + ``n_test`` case evaluations when known) and GPU-hours for each
    GPU and precision of :data:`PEAK_TFLOPS` at the lowest and highest ``utilisation`` (``[high-util, low-util]``)."""
    steps = sum(p.steps for p in phases)
    flop = steps * train_flops + (n_test * eval_case_flops if eval_case_flops else 0.0)
    lo, hi = min(utilisation), max(utilisation)
    hours = {
        f"{gpu} {precision}": [gpu_hours(flop, peak, hi), gpu_hours(flop, peak, lo)]
        for gpu, peaks in PEAK_TFLOPS.items()
        for precision, peak in peaks.items()
    }
    return {"steps": steps, "pflop": flop / 1e15, "gpu_hours": hours}


def workers_needed(sample_s: float, batch: int, step_s: float) -> int:
    """Loader workers that prepare a batch of ``batch`` samples (``sample_s`` each, one worker) within ``step_s``."""
    return max(1, math.ceil(sample_s * batch / step_s))


def extrapolate(points: Sequence[tuple[int, float]], voxels: int) -> tuple[float, str]:
    """A quantity at ``voxels`` from ``(voxels, value)`` measurements: linear through the two largest, or
    proportional through one (for memory with a fixed part, an upper bound)."""
    pts = sorted(points)[-2:]
    if len(pts) == 1 or pts[0][0] == pts[1][0]:
        v, y = pts[-1]
        return y * voxels / v, "proportional to voxels"
    (v0, y0), (v1, y1) = pts
    return y1 + (y1 - y0) / (v1 - v0) * (voxels - v1), "linear in voxels through two patches"


# ----------------------------------------------------------------------------------------------- data, evaluation


def load_case(case_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A raw BraTS case folder: modality -> ``(X, Y, Z)`` float32 and the label map."""
    from brats_core.data.preprocessing import read_case_images
    from brats_core.utils.io import find_case_files

    images, label, _ = read_case_images(find_case_files(case_dir, require_label=True))
    assert label is not None
    return images, label


def _timed_batches(dataset: Any, batch: int, samples: int, key: Callable[[int], Any] = lambda i: (0, i)) -> list[float]:
    """Seconds per sample of ``samples`` collated batches of ``batch`` items ``dataset[key(i)]``."""
    from torch.utils.data import default_collate

    times = []
    for i in range(samples):
        t0 = time.perf_counter()
        default_collate([dataset[key(i * batch + j)] for j in range(batch)])
        times.append((time.perf_counter() - t0) / batch)
    return times


def data_pipeline_seconds(method: str, case_dir: Path, batch: int, samples: int = 5, patch: int = 0) -> dict[str, Any]:
    """Seconds per sample of the method's training pipeline on one worker: the case preprocessed as the method's
    training reads it (into a temporary folder), then read (memory-mapped ``.npy`` as in training), cropped,
    augmented and collated in batches of ``batch``; median over ``samples`` batches. M3AE's item is one window in its
    copies (one item per step); MaM's pipeline is nnU-Net's own loader, not measured here. ``patch``: the window
    side override (0: the paper's; ShaSpec's crop becomes ``patch``³)."""
    if method not in (*RFNET_PIPELINE, "shaspec", "m3ae"):
        return {"skipped": "nnU-Net's own loader (MaM), not measured"}
    model = build_paper_model(method, patch)
    patch = model.patch_size
    window = f"{patch}³"
    with tempfile.TemporaryDirectory() as root:
        if method in RFNET_PIPELINE:
            from brats_core.data.dataset import TrainDataset, label_path, volume_path
            from brats_core.data.preprocessing import preprocess_arrays
            from brats_core.data.transforms import rfnet_augmentation

            images, label = load_case(case_dir)
            vol, seg, _ = preprocess_arrays(images, label, patch_size=patch)
            for path, array in ((volume_path(root, "case"), vol), (label_path(root, "case"), seg)):
                path.parent.mkdir(parents=True)
                np.save(path, array)
            data = TrainDataset(root, ["case"], rfnet_augmentation(patch, **RFNET_PIPELINE[method]))
        elif method == "shaspec":
            from ShaSpec.data import ShaSpecTrainDataset, prepare_cache

            crop = (model.config.patch_depth, model.config.patch_size, model.config.patch_size)
            cases = prepare_cache(case_dir.parent, [case_dir.name], root)
            data = ShaSpecTrainDataset(root, cases, crop, mode="random", random_scale=True, random_mirror=True)
            window = "×".join(map(str, window_shape(model)))  # canonical (X, Y, Z), as the training table
        elif method == "m3ae":
            from m3ae.data import FinetuneDataset, preprocess_case
            from m3ae.model import completion_array

            status = preprocess_case(case_dir, root)
            if status != "written":
                raise RuntimeError(f"{case_dir}: M3AE preprocessing {status}")
            completion = completion_array(model)
            data = FinetuneDataset(root, [case_dir.name], patch, completion, copies=PAPER_BATCH[method])
            batch = 1  # one item holds the step's copies of one window
        times = _timed_batches(data, batch, samples)
    return {"sample_s": statistics.median(times), "data_patch": window, "data_batch": batch}


def evaluate_case(method: str, images: Mapping[str, np.ndarray], label: np.ndarray, patch: int = 0) -> dict[str, Any]:
    """The 15-scenario evaluation of one case as the test scripts run it (the method's preprocessing, sliding window,
    encode-once, Dice and HD95 per scenario): seconds, windows and mean Dice of the full-modality scenario."""
    from brats_core.data.preprocessing import crop
    from brats_core.engine.evaluation import EvalOptions, segment, window_origin
    from brats_core.engine.inference import window_starts
    from brats_core.engine.metrics import case_scores
    from brats_core.modalities import SCENARIOS

    torch.manual_seed(0)
    model = build_paper_model(method, patch).eval()
    t0 = time.perf_counter()
    vol, meta = model.preprocess(images)
    image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, -1, 0)))
    labels = segment(model, image, [s.mask for s in SCENARIOS], EvalOptions(progress=False), torch.device("cpu"),
                     origin=window_origin(model, meta))  # fmt: skip
    reference = crop(np.asarray(label), meta["crop_box"])
    scores = [case_scores(lab.numpy(), reference, hd95=True) for lab in labels]
    seconds = time.perf_counter() - t0
    # a crop shorter than the window along an axis is padded to it (M3AE: brain boxes under 128 slices)
    windows = math.prod(
        len(window_starts(max(d, p), p)) for d, p in zip(image.shape[1:], window_shape(model), strict=True)
    )
    return {
        "eval_s": seconds,
        "eval_window": list(window_shape(model)),
        "case_shape": list(image.shape[1:]),
        "windows": windows,
        "dice_full": float(np.mean([scores[-1][k] for k in ("WT", "TC", "ET")])),
    }


# ------------------------------------------------------------------------------------------------------- workers


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_worker(task: Mapping[str, Any]) -> dict[str, Any]:
    """One measurement in this process (``section``, ``method``, ``patch`` (0: paper), ``batch``, …)."""
    torch.set_num_threads(int(task.get("threads", 2)))
    method, patch, section = task["method"], int(task.get("patch", 0)), task["section"]
    batch = int(task.get("batch") or PAPER_BATCH[method])
    if section == "train":
        extra = {CHECKPOINTING[method]: True} if task.get("checkpointing") else {}
        row = _one_method(method, patch, batch, int(task.get("steps", 1)), "cpu", False, **extra)
        return row | {"voxels": math.prod(window_shape(build_paper_model(method, patch)))}
    if section == "flops":
        return train_step_flops(method, patch, batch) | eval_window_flops(method, patch)
    if section == "data":
        return data_pipeline_seconds(method, Path(task["case"]), batch, int(task.get("samples", 5)), patch)
    images, label = load_case(Path(task["case"]))
    row = evaluate_case(method, images, label, patch)
    return row | {"eval_peak_rss_gb": _peak_rss_gb()}


def _limit_memory(gb: float) -> Callable[[], None]:
    def apply() -> None:
        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_subprocess(task: Mapping[str, Any], mem_limit_gb: float, timeout_s: float | None = None) -> dict[str, Any]:
    """:func:`run_worker` in a fresh process under an address-space limit: its row, ``{"oom": True}`` when it ran out
    of memory, or ``{"error": last line of stderr}``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(dict(task))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_memory(mem_limit_gb),
                              timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    if done.returncode == -signal.SIGKILL or any(mark in done.stderr for mark in _OOM_MARKS):
        return {"oom": True}  # an allocation refused under the limit, or the kernel's OOM killer
    if done.returncode < 0:
        return {"error": f"killed by {signal.Signals(-done.returncode).name}"}
    return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}


def step_down(paper: int) -> list[int]:
    """Smaller window sides to try when the paper one does not fit: multiples of 16 below it, down to 32."""
    return [p for p in range(paper - paper % 16, 31, -16) if p < paper]


def two_largest_fits(run: Callable[[int], dict[str, Any]], paper_side: int) -> list[dict[str, Any]] | dict[str, Any]:
    """``run(side)`` at the :func:`step_down` sides until two fit in memory (one when only the last fits): their
    rows, largest first; or the first error row, or an error row when none fits."""
    fits: list[dict[str, Any]] = []
    for side in step_down(paper_side):
        row = run(side)
        if row.get("oom"):
            continue
        if "error" in row:
            return row
        fits.append(row)
        if len(fits) == 2:
            break
    return fits or {"error": "no window down to 32 fits in the memory limit"}


def fit_search(run: Callable[[int, bool], dict[str, Any]], method: str, paper_side: int, paper_voxels: int,
               can_checkpoint: bool) -> dict[str, Any]:  # fmt: skip
    """``run(patch, checkpointing)`` at the paper size (patch 0), then with checkpointing when offered, then at
    :func:`step_down` sides until two fit (one when the last fits); extrapolates memory and time to the paper size."""
    row = run(0, False)
    if not row.get("oom"):
        return row
    if can_checkpoint:
        row = run(0, True)
        if not row.get("oom"):
            return row | {"checkpointing": True}
    fits = two_largest_fits(lambda side: run(side, can_checkpoint), paper_side)
    if isinstance(fits, dict):
        return {"method": method} | fits
    rss, how = extrapolate([(r["voxels"], r["peak_rss_gb"]) for r in fits], paper_voxels)
    step, _ = extrapolate([(fits[0]["voxels"], fits[0]["step_s"])], paper_voxels)
    return fits[0] | {
        "fits": False, "largest_fit": fits[0]["patch"], "checkpointing": can_checkpoint,
        "extrapolated_rss_gb": rss, "extrapolated_step_s": step, "extrapolation": how,
    }  # fmt: skip


def measure(method: str, section: str, args: argparse.Namespace) -> dict[str, Any]:
    """One section of one method, in subprocesses (the training step with the fit search)."""
    base = {"method": method, "section": section, "threads": args.threads, "batch": args.batch, "steps": args.steps,
            "case": str(args.case) if args.case else None, "samples": args.samples}  # fmt: skip
    if section in ("data", "eval") and not (args.case and Path(args.case).is_dir()):
        return {"method": method, "skipped": f"no case folder ({args.case or 'give --case'})"}
    if section not in ("train", "flops") or args.patch:
        return {"method": method} | run_subprocess(base | {"patch": args.patch}, args.mem_limit_gb, args.timeout_s)
    from brats_core.registry import make_config

    config = make_config(method, "paper")
    shape = (getattr(config, "patch_depth", config.patch_size), config.patch_size, config.patch_size)

    def run(patch: int, checkpointing: bool = False) -> dict[str, Any]:
        task = base | {"patch": patch, "checkpointing": checkpointing}
        return run_subprocess(task, args.mem_limit_gb, args.timeout_s)

    if section == "flops":
        return {"method": method} | flops_search(run, max(shape), list(shape))
    row = fit_search(run, method, max(shape), math.prod(shape), method in CHECKPOINTING)
    return {"method": method} | row


FLOP_KEYS = ("train_flops", "train_scan_flops", "window_flops", "window_15_flops")


def flops_search(run: Callable[[int], dict[str, Any]], paper_side: int, paper_shape: list[int]) -> dict[str, Any]:
    """The FLOPs at the paper window (``run(0)``), or, when counting there runs out of memory, at the two largest
    :func:`step_down` windows that fit, extrapolated to the paper window linearly in voxels (exact for the
    convolutions and matrix products, which are proportional to voxels; said in ``flops_extrapolated``)."""
    row = run(0)
    if not row.get("oom"):
        return row
    fits = two_largest_fits(run, paper_side)
    if isinstance(fits, dict):
        return fits
    voxels = math.prod(paper_shape)
    out = dict(fits[0]) | {"window": paper_shape}
    for key in FLOP_KEYS:
        out[key], how = extrapolate([(math.prod(f["window"]), f[key]) for f in fits], voxels)
    sides = " and ".join("×".join(map(str, f["window"])) for f in fits)
    return out | {"flops_extrapolated": f"{how} from {sides}"}


# ---------------------------------------------------------------------------------------------------------- output


def _g(value: Any, fmt: str = ".2f") -> str:
    return format(value, fmt) if isinstance(value, int | float) else ""


def _status(row: Mapping[str, Any]) -> str | None:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "error" in row:
        return f"failed: {row['error']}"
    if row.get("oom"):
        return "out of memory"
    return None


def _cpu_step(row: Mapping[str, Any]) -> str:
    if (s := _status(row)) is not None or not row:
        return s or ""
    if "extrapolated_rss_gb" in row:
        return (f"does not fit: about {row['extrapolated_rss_gb']:.0f} GB and {row['extrapolated_step_s']:.0f} s "
                f"(largest fit {row['largest_fit']})")  # fmt: skip
    return f"{row['step_s']:.0f} s, {row['peak_rss_gb']:.1f} GB" + (
        " (checkpointing)" if row.get("checkpointing") else ""
    )


def summary(rows: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """One row per method: the paper schedule, its GPU-hours (estimate), the loader workers for that GPU step, the
    CPU training step at paper size and the CPU evaluation of one case and of the :data:`N_TEST` test cases."""
    gpu = " ".join(STEP_GPU)
    out = ["## Summary", "",
           f"| method | optimiser steps | GPU-hours, one H100 / one A100 (TF32, estimate) | loader workers @ {gpu} "
           f"step (estimate) | CPU training step at paper size | CPU evaluation per case | {N_TEST} test cases |",
           "|---|---:|---|---:|---|---:|---:|"]  # fmt: skip
    methods = list(dict.fromkeys(m for section in rows.values() for m in section))
    for m in methods:
        flops, data = rows.get("flops", {}).get(m, {}), rows.get("data", {}).get(m, {})
        train, ev = rows.get("train", {}).get(m, {}), rows.get("eval", {}).get(m, {})
        bill = flops.get("bill")
        steps = f"{bill['steps']:,}" if bill else ""
        hours = (f"{format_range(bill['gpu_hours']['H100 tf32'], ' h')} / "
                 f"{format_range(bill['gpu_hours']['A100 tf32'], ' h')}"
                 if bill else "")  # fmt: skip
        workers = format_range(data["workers_gpu_step"]) if "workers_gpu_step" in data else (_status(data) or "")
        case = f"{ev['eval_s'] / 60:.1f} min" if "eval_s" in ev else (_status(ev) or "")
        test = f"{ev['eval_s'] * N_TEST / 3600:.0f} h" if "eval_s" in ev else ""
        out.append(f"| {train.get('display', m)} | {steps} | {hours} | {workers} | {_cpu_step(train)} | {case} | "
                   f"{test} |")  # fmt: skip
    return [*out, ""]


def markdown(rows: Mapping[str, Mapping[str, Mapping[str, Any]]], args: argparse.Namespace) -> str:
    """The report: a summary, then one table per section run, rows per method (``rows[section][method]``)."""
    lo, hi = min(args.utilisation), max(args.utilisation)
    out = [
        "# Paper-scale cost per method (`benchmarks/paper_scale.py`)",
        "",
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"memory limit {args.mem_limit_gb} GB (RLIMIT_AS), window: {'paper' if not args.patch else f'{args.patch}³'}.",
        "",
        *summary(rows),
    ]
    if "train" in rows:
        out += ["## Training step (CPU)", "",
                "| method | patch | batch | params | step s | peak RSS GB | fits | checkpointing | paper-size need |",
                "|---|---|---:|---:|---:|---:|---|---|---|"]  # fmt: skip
        for m, r in rows["train"].items():
            if (s := _status(r)) is not None:
                out.append(f"| {m} | | | | | | {s} | | |")
                continue
            need = (f"{r['extrapolated_rss_gb']:.1f} GB, {r['extrapolated_step_s']:.1f} s ({r['extrapolation']})"
                    if "extrapolated_rss_gb" in r else "")  # fmt: skip
            out.append(f"| {r.get('display', m)} | {r['patch']} | {r['batch']} | {r['params'] / 1e6:.2f} M | "
                       f"{_g(r['step_s'])} | {_g(r['peak_rss_gb'])} | {'no' if r.get('fits') is False else 'yes'} | "
                       f"{'yes' if r.get('checkpointing') else 'no'} | {need} |")  # fmt: skip
        out.append("")
    if "data" in rows:
        steps = ", ".join(f"@{t:g} s" for t in args.step_times)
        out += ["## Data pipeline (one worker)", "",
                f"| method | patch | batch | s per sample | workers @ CPU step | workers {steps} | "
                f"workers @ {' '.join(STEP_GPU)} step (estimate) |",
                "|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
        for m, r in rows["data"].items():
            if (s := _status(r)) is not None:
                out.append(f"| {m} | | | {s} | | | |")
                continue
            gpu = format_range(r["workers_gpu_step"]) if "workers_gpu_step" in r else ""
            out.append(f"| {m} | {r['data_patch']} | {r['data_batch']} | {r['sample_s']:.3f} | "
                       f"{r.get('workers_cpu_step', '')} | {', '.join(map(str, r['workers']))} | {gpu} |")  # fmt: skip
        out.append("")
    if "eval" in rows:
        out += ["## 15-scenario evaluation of the case (CPU; untrained weights: time and memory only)", "",
                "| method | window | case shape | windows | s | peak RSS GB |",
                "|---|---|---|---:|---:|---:|"]  # fmt: skip
        for m, r in rows["eval"].items():
            if (s := _status(r)) is not None:
                out.append(f"| {m} | | | | {s} | |")
                continue
            window, shape = "×".join(map(str, r["eval_window"])), "×".join(map(str, r["case_shape"]))
            out.append(f"| {m} | {window} | {shape} | {r['windows']} | {r['eval_s']:.1f} | "
                       f"{r['eval_peak_rss_gb']:.2f} |")  # fmt: skip
        out.append("")
    if "flops" in rows:
        gpus = [f"{g} {p}" for g, peaks in PEAK_TFLOPS.items() for p in peaks]
        out += ["## FLOPs and compute bill (estimate)", "",
                f"FlopCounterMode counts; Mamba scans analytic (9·b·d·L·n + 2·b·d·L forward, backward 2×). GPU-hours "
                f"at {lo:.0%}–{hi:.0%} of peak, peaks assumed (TFLOP/s): "
                + "; ".join(f"{g} {p} {v:g}" for g, peaks in PEAK_TFLOPS.items() for p, v in peaks.items()) + ".",
                "",
                "| method | train step GFLOP (scan) | window GFLOP | window × 15 GFLOP | steps | PFLOP | "
                + " | ".join(f"{g} h" for g in gpus) + " |",
                "|---|---:|---:|---:|---:|---:|" + "---:|" * len(gpus)]  # fmt: skip
        for m, r in rows["flops"].items():
            if (s := _status(r)) is not None:
                out.append(f"| {m} | {s} |" + " |" * (5 + len(gpus)))
                continue
            bill = r["bill"]
            hours = " | ".join(format_range(h) for h in bill["gpu_hours"].values())
            out.append(f"| {m} | {r['train_flops'] / 1e9:,.1f} ({r['train_scan_flops'] / 1e9:,.1f}) | "
                       f"{r['window_flops'] / 1e9:,.1f} | {r['window_15_flops'] / 1e9:,.1f} | {bill['steps']:,} | "
                       f"{bill['pflop']:,.1f} | {hours} |")  # fmt: skip
        out.append("")
        out += [f"- {m}: counting at the paper window ran out of memory; FLOPs extrapolated, {r['flops_extrapolated']}."
                for m, r in rows["flops"].items() if "flops_extrapolated" in r]  # fmt: skip
    return "\n".join(out)


def finish(rows: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    """Derived columns: the compute bill from the FLOPs (and the case's windows when the eval section ran, else the
    evaluation is left out of the bill), the H100 step time it implies, and the loader workers that keep pace with
    the measured CPU step, with each ``--step_times`` and with that H100 step."""
    for m, r in rows.get("flops", {}).items():
        if "train_flops" not in r:
            continue
        windows = rows.get("eval", {}).get(m, {}).get("windows")
        case = windows * r["window_15_flops"] if windows else None
        phases = paper_schedule(m)
        r["schedule"] = [dataclasses.asdict(p) for p in phases]
        r["bill"] = compute_bill(r["train_flops"], phases, case, args.utilisation) | {"eval_included": bool(case)}
        peak = PEAK_TFLOPS[STEP_GPU[0]][STEP_GPU[1]] * 1e12
        r["gpu_step_s"] = [r["train_flops"] / (peak * u) for u in (max(args.utilisation), min(args.utilisation))]
    for m, r in rows.get("data", {}).items():
        if "sample_s" not in r:
            continue
        r["workers"] = [workers_needed(r["sample_s"], r["data_batch"], t) for t in args.step_times]
        step = rows.get("train", {}).get(m, {})
        step_s = step.get("extrapolated_step_s", step.get("step_s"))
        if step_s:
            r["workers_cpu_step"] = workers_needed(r["sample_s"], r["data_batch"], step_s)
        gpu_step = rows.get("flops", {}).get(m, {}).get("gpu_step_s")
        if gpu_step:
            r["workers_gpu_step"] = [workers_needed(r["sample_s"], r["data_batch"], s) for s in gpu_step]


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(t) for t in text.split(",") if t]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/paper_scale.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="Markdown report (the JSON rows go beside it, .json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--case", type=Path, default=None, help="a raw BraTS case folder (for the data and eval sections)")
    p.add_argument("--methods", type=_csv(str), default=list(PAPER_BATCH))
    p.add_argument("--sections", type=_csv(str), default=list(SECTIONS))
    p.add_argument("--patch", type=int, default=0, help="window side override (0: each method's paper window)")
    p.add_argument("--batch", type=int, default=0, help="batch override (0: each method's paper batch)")
    p.add_argument("--steps", type=int, default=1, help="timed training steps after one warm-up")
    p.add_argument("--samples", type=int, default=5, help="batches timed in the data section (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mem_limit_gb", type=float, default=22.0, help="address-space limit of each measurement")
    p.add_argument("--timeout_s", type=float, default=None, help="give up on a measurement after this long")
    p.add_argument(
        "--utilisation",
        type=_csv(float),
        default=list(UTILISATION),
        help="range of GPU utilisation (fraction of peak) for the GPU-hours (default: 0.05,0.2)",
    )
    p.add_argument("--step_times", type=_csv(float), default=[0.5, 1.0], help="step times (s) for the loader workers")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="measure nothing: combine the JSON files of earlier runs (e.g. one per method) into --out",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if args.out is None:
        raise UsageError("benchmarks/paper_scale.py: give the report file with --out")
    unknown = [s for s in args.sections if s not in SECTIONS] + [m for m in args.methods if m not in PAPER_BATCH]
    if unknown:
        raise UsageError(f"benchmarks/paper_scale.py: unknown section or method {unknown}; "
                         f"sections {', '.join(SECTIONS)}, methods {', '.join(PAPER_BATCH)}")  # fmt: skip
    json_out = args.out.with_suffix(".json")
    for path in (args.out, json_out):
        if path.exists() and not args.overwrite:
            raise UsageError(f"{path} exists: choose another --out or pass --overwrite")
    rows = merge_reports(args.merge, args) if args.merge else measure_all(args)
    finish(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"patch": args.patch, "threads": args.threads, "mem_limit_gb": args.mem_limit_gb,
              "utilisation": args.utilisation, "step_times": args.step_times, "rows": rows}  # fmt: skip
    with atomic_path(args.out) as tmp:
        tmp.write_text(markdown(rows, args))
    with atomic_path(json_out) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} and {json_out}")
    return 0


def measure_all(args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    """Every section of every method of ``args``, each row printed as JSON when measured."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for section in [s for s in SECTIONS if s in args.sections]:  # train first: data uses its step times
        for method in args.methods:
            rows.setdefault(section, {})[method] = measure(method, section, args)
            print(json.dumps(rows[section][method]), flush=True)
    return rows


def merge_reports(paths: Sequence[Path], args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    """The rows of several runs' JSON files, in method order (a later file wins for the same section and method);
    ``args.patch``, ``args.threads`` and ``args.mem_limit_gb`` are set from the files, which must agree on them."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    settings: dict[str, set[Any]] = {"patch": set(), "threads": set(), "mem_limit_gb": set()}
    for path in paths:
        try:
            report = json.loads(path.read_text())
            parts = report["rows"].items()
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
            raise UsageError(f"{path}: not a JSON file written by benchmarks/paper_scale.py ({err})") from err
        for key, seen in settings.items():
            seen.add(report.get(key, getattr(args, key)))
        for section, methods in parts:
            rows.setdefault(section, {}).update(methods)
    for key, seen in settings.items():
        if len(seen) > 1:
            raise UsageError(f"the files to merge were measured with different --{key} ({sorted(seen)})")
        setattr(args, key, seen.pop())
    order = {m: i for i, m in enumerate(PAPER_BATCH)}
    return {s: dict(sorted(ms.items(), key=lambda kv: order.get(kv[0], len(order)))) for s, ms in rows.items()}


if __name__ == "__main__":
    raise SystemExit(run_main(main))
