"""benchmarks/paper_scale.py: FLOP counting (hand-counted conv net, analytic Mamba scan), schedules and GPU-hours,
memory extrapolation and the fit search, data pipeline and evaluation on synthetic data, the report's columns."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brats_core.data.synthetic import make_synthetic_case, write_synthetic_case

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "brats_sample" / "BraTS-SAMPLE-00000-000"


def _load():
    spec = importlib.util.spec_from_file_location("paper_scale", REPO / "benchmarks" / "paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_scale"] = module
    spec.loader.exec_module(module)
    return module


ps = _load()


def test_flop_counter_matches_hand_count_for_a_conv_net():
    net = torch.nn.Sequential(
        torch.nn.Conv3d(4, 8, 3, padding=1, bias=False), torch.nn.ReLU(), torch.nn.Conv3d(8, 2, 1, bias=False)
    )
    x = torch.randn(1, 4, 8, 8, 8)
    conv1 = 2 * 8**3 * 8 * 4 * 27  # 2 FLOPs per multiply-add × output voxels × C_out × C_in × kernel
    conv2 = 2 * 8**3 * 2 * 8
    forward = ps.FlopCount()
    with ps.counting_flops(forward):
        net(x)
    assert forward.total == conv1 + conv2 == 901_120
    # backward: conv2's input and weight gradients, conv1's weight gradient only (x needs no gradient)
    step = ps.FlopCount(backward=True)
    with ps.counting_flops(step):
        net(x).sum().backward()
    assert step.total == conv1 + conv2 + 2 * conv2 + conv1 == 1_818_624
    assert step.scan == 0


def test_scan_flops_formula():
    assert ps.scan_flops(2, 4, 10, 3) == 9 * 2 * 4 * 10 * 3 + 2 * 4 * 10 + 2 * 4 * 10 == 2320
    assert ps.scan_flops(2, 4, 10, 3, with_d=False, with_z=False) == 2160


def test_mamba_scan_counted_analytically_and_not_by_the_counter():
    from brats_core.nn.mamba import Mamba

    torch.manual_seed(0)
    block = Mamba(d_model=8, d_state=4)  # d_inner = 16
    x = torch.randn(1, 10, 8, requires_grad=True)
    expected = ps.scan_flops(1, 16, 10, 4)
    forward = ps.FlopCount()
    with torch.no_grad(), ps.counting_flops(forward):
        reference = block(x)
    assert forward.scans == [(1, 16, 10, 4)] and forward.scan == expected
    step = ps.FlopCount(backward=True)
    with ps.counting_flops(step):
        out = block(x)
        out.sum().backward()
    assert torch.allclose(out, reference)  # the scan outside the counter computes the same output
    assert step.scan == 3 * expected
    assert x.grad is not None and block.A_log.grad is not None  # gradients flow through the uncounted scan
    # the counted part holds the projections only: the same count with the scan replaced by elementwise ops (not
    # counted) that still send gradients to every input, so that the same projections run backward
    import brats_core.nn.mamba as mamba

    real = mamba.selective_scan
    mamba.selective_scan = lambda u, delta, A, B, C, D=None, z=None, **k: u * delta + (B + C).sum(1, keepdim=True) * z
    try:
        plain = ps.FlopCounterMode(display=False)
        with plain:
            block(x).sum().backward()
    finally:
        mamba.selective_scan = real
    assert step.counted == plain.get_total_flops()


def test_gpu_hours_and_bill_on_hand_numbers():
    # one hour of an A100 at 50% of 312 TFLOP/s: 312e12 × 0.5 × 3600 = 5.616e17 FLOP
    assert ps.gpu_hours(5.616e17, 312.0, 0.5) == pytest.approx(1.0)
    bill = ps.compute_bill(1e12, [ps.Phase("a", 600), ps.Phase("b", 400)], 2e12, [0.5, 0.25], n_test=10)
    assert bill["steps"] == 1000
    assert bill["pflop"] == pytest.approx(1.02)  # 1000 × 1e12 + 10 × 2e12 = 1.02e15
    # 1.02e15 / (156e12 × 0.5) / 3600 = 0.0036325 h, and twice that at 25%
    assert bill["gpu_hours"]["A100 tf32"] == pytest.approx([1.02e15 / 78e12 / 3600, 1.02e15 / 39e12 / 3600])
    assert set(bill["gpu_hours"]) == {"A100 bf16", "A100 tf32", "A100 fp32", "H100 bf16", "H100 tf32", "H100 fp32"}


def test_paper_schedules_from_the_recipes():
    steps = {m: [(p.name, p.steps) for p in ps.paper_schedule(m)] for m in ps.PAPER_BATCH}
    assert steps["imfuse"] == [("train", 1000 * 875)]
    assert steps["mmformer"] == [("train", 1000 * 875)]
    assert steps["robustseg"] == [("train", 300 * 875)]
    assert steps["sfusion"] == [("train", 200 * 872)]
    assert steps["uhved"] == [("train", 400 * 875)]
    assert steps["m3ae"] == [("pretrain", 600 * 437), ("train", 300 * 875)]
    # the second stage continues the global iteration counter to 406,000 (it counted 651,000 steps before)
    assert steps["shaspec"] == [("warmup", 245_000), ("random", 161_000)]
    assert steps["mam"] == [("train", 500 * 150)]


def test_workers_and_extrapolation():
    assert ps.workers_needed(0.3, 3, 0.5) == 2  # 0.9 s of loading per 0.5 s step
    assert ps.workers_needed(0.2, 1, 1.0) == 1
    assert ps.extrapolate([(1000, 2.0), (2000, 3.0)], 4000) == (5.0, "linear in voxels through two patches")
    assert ps.extrapolate([(1000, 2.0)], 4000) == (8.0, "proportional to voxels")
    assert ps.step_down(128) == [112, 96, 80, 64, 48, 32]
    assert ps.step_down(80) == [64, 48, 32]


def test_fit_search_steps_down_and_extrapolates():
    calls = []

    def run(patch, checkpointing):
        calls.append((patch, checkpointing))
        side = patch or 128
        if side > 96:
            return {"oom": True}
        v = side**3
        return {"patch": f"{side}³", "voxels": v, "peak_rss_gb": 1.0 + v * 1e-6, "step_s": v * 1e-5}

    row = ps.fit_search(run, "x", 128, 128**3, can_checkpoint=True)
    assert calls == [(0, False), (0, True), (112, True), (96, True), (80, True)]
    assert row["fits"] is False and row["largest_fit"] == "96³" and row["checkpointing"] is True
    assert row["extrapolated_rss_gb"] == pytest.approx(1.0 + 128**3 * 1e-6)
    assert row["extrapolated_step_s"] == pytest.approx(128**3 * 1e-5)
    assert ps.fit_search(lambda p, c: {"step_s": 1.0}, "x", 128, 128**3, False) == {"step_s": 1.0}


def _synthetic(side: int = 32):
    images, label = make_synthetic_case((side, side, side), 0)
    return images, label


@pytest.mark.parametrize(("method", "batch", "window"), [("sfusion", 2, "32³"), ("shaspec", 2, "32×32×32"),
                                                         ("m3ae", 1, "32³")])  # fmt: skip
def test_data_pipeline_on_a_synthetic_case_folder(tmp_path, method, batch, window):
    """Each pipeline from the raw case folder, as the method's training prepares and reads it (M3AE: one item, its
    two copies of a window, per step)."""
    images, label = _synthetic(40)
    case = write_synthetic_case(tmp_path, "BraTS-GLI-00001-000", images, label)
    row = ps.data_pipeline_seconds(method, case, batch=2, samples=2, patch=32)
    assert row["sample_s"] > 0 and row["data_patch"] == window and row["data_batch"] == batch
    assert "skipped" in ps.data_pipeline_seconds("mam", case, batch=1, patch=32)


def test_evaluation_of_a_synthetic_case():
    images, label = _synthetic(32)
    torch.set_num_threads(2)
    row = ps.evaluate_case("uhved", images, label, patch=32)
    assert row["windows"] == 1 and row["eval_window"] == [32, 32, 32] and row["eval_s"] > 0
    assert 0.0 <= row["dice_full"] <= 1.0


def test_evaluation_of_a_crop_shorter_than_the_window():
    """M3AE's brain box of the sample case is 127 slices deep under a 128³ window: the evaluator pads the crop, and
    the window count follows the padded volume (it raised before)."""
    images, label = _synthetic(24)
    torch.set_num_threads(2)
    row = ps.evaluate_case("m3ae", images, label, patch=32)
    assert row["eval_window"] == [32, 32, 32] and row["windows"] == 1
    assert all(d < 32 for d in row["case_shape"])


def test_imfuse_flops_at_a_tiny_patch():
    torch.set_num_threads(2)
    train = ps.train_step_flops("imfuse", patch=32)
    assert train["train_flops"] > train["train_scan_flops"] > 0
    window = ps.eval_window_flops("imfuse", patch=32)
    # encode once + 15 decodes costs more than one forward and less than 15 forwards
    assert window["window_flops"] < window["window_15_flops"] < 15 * window["window_flops"]


def test_report_columns_and_json(tmp_path):
    out = tmp_path / "r.md"
    argv = ["--sections", "flops,data", "--methods", "mam", "--patch", "32", "--out", str(out), "--threads", "2"]
    assert ps.main(argv) == 0
    text = out.read_text()
    header = "| method | train step GFLOP (scan) | window GFLOP | window × 15 GFLOP | steps | PFLOP | A100 bf16 h |"
    assert header in text
    assert "| method | patch | batch | s per sample |" in text and "skipped: no case folder" in text
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    flops = rows["flops"]["mam"]
    assert flops["train_flops"] > 0 and flops["train_scan_flops"] == 0  # MaM has no Mamba scan
    assert flops["bill"]["steps"] == 75_000
    assert flops["bill"]["pflop"] == pytest.approx(75_000 * flops["train_flops"] / 1e15)
    with pytest.raises(ps.UsageError, match="--overwrite"):
        ps.main(argv)


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE.is_dir(), reason="the real sample case (../shared/data/brats_sample) is absent")
def test_data_pipeline_on_the_sample_case_at_the_paper_patch():
    row = ps.data_pipeline_seconds("imfuse", SAMPLE, batch=1, samples=2)
    assert row["sample_s"] > 0 and math.isfinite(row["sample_s"]) and row["data_patch"] == "128³"
    _, label = ps.load_case(SAMPLE)
    assert np.asarray(label).shape == (240, 240, 155)


def test_worker_out_of_its_memory_limit_is_reported_as_oom():
    task = {"section": "flops", "method": "mam", "patch": 32, "threads": 1}
    assert ps.run_subprocess(task, mem_limit_gb=1.0, timeout_s=120) == {"oom": True}


def _report(path: Path, rows: dict, threads: int = 2) -> Path:
    path.write_text(json.dumps({"patch": 0, "threads": threads, "mem_limit_gb": 22.0, "rows": rows}))
    return path


def test_merge_combines_runs_in_method_order_and_recomputes_the_bill(tmp_path):
    """One run per method (the way paper-size measurements are taken), merged into one report."""
    train = {"method": "mam", "patch": "128³", "batch": 2, "params": 1e6, "step_s": 10.0, "peak_rss_gb": 3.0}
    flops = {"train_flops": 2e12, "train_scan_flops": 0, "window": [128] * 3, "window_flops": 1e12,
             "window_15_flops": 15e12}  # fmt: skip
    data = {"sample_s": 2.0, "data_patch": 128, "data_batch": 1}
    mam = _report(tmp_path / "mam.json", {"train": {"mam": train}, "flops": {"mam": flops}})
    imfuse = _report(tmp_path / "imfuse.json", {"train": {"imfuse": train | {"method": "imfuse"}},
                                                "data": {"imfuse": data}, "flops": {"imfuse": flops}})  # fmt: skip
    out = tmp_path / "all.md"
    argv = ["--merge", str(mam), str(imfuse), "--out", str(out), "--step_times", "0.5", "--utilisation", "0.1,0.2"]
    assert ps.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["rows"]["train"]) == ["imfuse", "mam"]  # the methods' order, not the files'
    assert report["rows"]["flops"]["mam"]["bill"]["steps"] == 75_000
    assert report["rows"]["data"]["imfuse"]["workers"] == [4]  # 2 s per sample, a 0.5 s step
    assert report["rows"]["data"]["imfuse"]["workers_cpu_step"] == 1  # the measured 10 s CPU step
    assert report["step_times"] == [0.5] and report["threads"] == 2
    # an H100 (494 TFLOP/s in TF32) at 20 % and 10 % of peak takes 2e12 / (494e12 · u) s per step
    h100_steps = [2e12 / (494e12 * u) for u in (0.2, 0.1)]
    assert report["rows"]["flops"]["imfuse"]["gpu_step_s"] == pytest.approx(h100_steps)
    workers = [math.ceil(2.0 / s) for s in h100_steps]
    assert report["rows"]["data"]["imfuse"]["workers_gpu_step"] == workers == [99, 50]  # ⌈2 s · 494e12 · u / 2e12⌉
    text = out.read_text()
    assert "| imfuse | 128 | 1 | 2.000 | 1 | 4 | 50–99 |" in text
    # the summary: 75,000 MaM steps of 2 TFLOP = 150 PFLOP; an H100 in TF32 at 20 % / 10 % of 494 TFLOP/s
    h100 = [150e15 / (494e12 * u) / 3600 for u in (0.2, 0.1)]
    assert report["rows"]["flops"]["mam"]["bill"]["gpu_hours"]["H100 tf32"] == pytest.approx(h100)
    (mam_row,) = [line for line in text.splitlines() if line.startswith("| mam | 75,000 |")]
    # 0.42–0.84 h on the H100; 150e15 / (156e12 · u) = 1.34–2.67 h on the A100
    assert "| 0.4–0.8 h / 1.3–2.7 h |" in mam_row and "| 10 s, 3.0 GB |" in mam_row


def test_merge_refuses_runs_of_other_settings_and_foreign_files(tmp_path):
    a = _report(tmp_path / "a.json", {"train": {}}, threads=2)
    b = _report(tmp_path / "b.json", {"train": {}}, threads=8)
    with pytest.raises(ps.UsageError, match="different --threads"):
        ps.main(["--merge", str(a), str(b), "--out", str(tmp_path / "m.md")])
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    with pytest.raises(ps.UsageError, match="junk.json: not a JSON file written by benchmarks/paper_scale.py"):
        ps.main(["--merge", str(junk), "--out", str(tmp_path / "m.md")])
    assert not (tmp_path / "m.md").exists()


def test_flops_search_extrapolates_when_the_paper_window_does_not_fit():
    """Counting at 128³ runs out of memory: counted at 112³ and 96³, extrapolated linearly in voxels; a network
    whose FLOPs are proportional to voxels gets its exact 128³ count back."""
    per_voxel = {"train_flops": 30.0, "train_scan_flops": 0.0, "window_flops": 10.0, "window_15_flops": 60.0}

    def run(side: int) -> dict:
        if side in (0, 128, 112 + 16):
            return {"oom": True}
        return {"window": [side] * 3} | {k: v * side**3 for k, v in per_voxel.items()}

    row = ps.flops_search(run, 128, [128, 128, 128])
    assert row["window"] == [128, 128, 128]
    for key, value in per_voxel.items():
        assert row[key] == pytest.approx(value * 128**3)
    assert row["flops_extrapolated"] == "linear in voxels through two patches from 112×112×112 and 96×96×96"
    assert ps.flops_search(lambda side: {"oom": True}, 64, [64] * 3) == {
        "error": "no window down to 32 fits in the memory limit"
    }
    assert ps.flops_search(lambda side: {"train_flops": 1, "window": [64] * 3}, 64, [64] * 3)["train_flops"] == 1


def test_window_of_the_non_cubic_paper_shaspec():
    """ShaSpec's paper window is 160 × 160 × 80 (its ``patch_size`` is a tuple): the random batch and the window
    count take it as it is (a nested tuple failed in ``torch.randn`` before)."""
    model = ps.build_paper_model("shaspec")
    assert ps.window_shape(model) == (160, 160, 80)
    batch = ps.random_batch(1, ps.window_shape(model), torch.Generator().manual_seed(0))
    assert batch["image"].shape == (1, 4, 160, 160, 80) and batch["label"].shape == (1, 160, 160, 80)


@pytest.mark.parametrize(("code", "stderr", "row"), [
    (-9, "", {"oom": True}),  # the kernel's OOM killer
    (-15, "", {"error": "killed by SIGTERM"}),  # stopped by someone: not a memory verdict
    (1, "Traceback …\nMemoryError\n", {"oom": True}),
    (1, "Traceback …\nValueError: bad\n", {"error": "ValueError: bad"}),
])  # fmt: skip
def test_worker_exit_is_classified(monkeypatch, code, stderr, row):
    import subprocess

    done = subprocess.CompletedProcess([], code, stdout="", stderr=stderr)
    monkeypatch.setattr(ps.subprocess, "run", lambda *a, **k: done)
    assert ps.run_subprocess({"section": "flops", "method": "mam"}, mem_limit_gb=1.0) == row
