"""Tests of the Triton selective-scan backend (brats_core/nn/triton_scan.py), its adapter (brats_core/nn/ops/kernels.py)
and its selection for the Mamba block.

The kernels run in Triton's CPU interpreter, which must be switched on (``TRITON_INTERPRET=1``) before ``triton`` is
imported; other test modules may already have imported it in this process, so every kernel check runs this file as a
script in a fresh subprocess (``python tests/test_triton_scan.py CASE...``) and the test asserts on the JSON it
prints: max relative errors (max |Δ| / max |ref|) of the fp32 Triton scan against the fp64 sequential reference for
the output, the last state and the gradients of all eight inputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
INPUT_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
TOL = 1e-5  # fp32 kernel vs fp64 reference; measured errors are ~1e-7 … 1e-6

# name → (b, d, n, L, chunk_size, options). Options: z / bias / softplus (default True), token_major (inputs as
# transposed views of (b, L, ·) storage, the Mamba block's layout), loss ("all": output and last state, "out",
# "last": last state only), delta_shift (moves delta + bias; large values cross softplus's threshold of 20),
# carry_tile (chunks per tile of the carry pass), max_partial_dblk (more d-blocks → atomic dB/dC).
CASES: dict[str, tuple[int, int, int, int, int | None, dict[str, Any]]] = {
    # L = 37 is not a multiple of the chunk (5 chunks, the last 5 long), n = 5 is not a power of two.
    "chunks_padding": (2, 8, 5, 37, 8, {}),
    "no_z_no_bias_no_softplus": (1, 6, 4, 23, 6, {"z": False, "bias": False, "softplus": False, "loss": "out"}),
    "token_major_views": (2, 6, 4, 24, 8, {"token_major": True}),
    "single_chunk_auto_plan": (1, 4, 3, 10, None, {}),
    "last_state_loss_only": (1, 5, 3, 17, 4, {"loss": "last"}),
    # n = 130 → BN = 256, BD = 4: three d-blocks (the last one masked) → dB/dC reduced over d-blocks, through
    # per-block partial buffers or (as at the bottleneck, 256 d-blocks) atomically.
    "several_d_blocks_atomic": (1, 10, 130, 9, 4, {"max_partial_dblk": 1}),
    "several_d_blocks_partials": (1, 10, 130, 9, 4, {}),
    "softplus_threshold": (1, 4, 3, 12, 5, {"delta_shift": 20.0}),
    # dt ≈ e^-7 ≈ 1e-3, IM-Fuse's initial range: softplus must keep fp32 accuracy where log(1 + e) rounds
    "small_dt": (1, 4, 3, 12, 5, {"delta_shift": -7.0}),
    "z_without_bias": (2, 4, 4, 11, 3, {"bias": False}),
    "chunk_of_one_step": (1, 3, 2, 5, 1, {}),
    # 13 chunks in carry tiles of 4 (64 by default): the carry passes chain 4 tiles, the last one partial.
    "several_carry_tiles": (1, 3, 2, 25, 2, {"carry_tile": 4}),
}
FAST_CASES = [
    "chunks_padding",
    "no_z_no_bias_no_softplus",
    "several_d_blocks_atomic",
    "several_carry_tiles",
    "small_dt",
]

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _interpreter_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.pop("BRATS_MAMBA_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _run_worker(*args: str) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=_interpreter_env(),
        cwd=REPO,
    )
    assert res.returncode == 0, f"interpreter worker failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_errors(errors: dict[str, float], case: str) -> None:
    bad = {k: v for k, v in errors.items() if not v < TOL}  # `not <` also catches NaN
    assert not bad, f"{case}: relative errors above {TOL}: {bad} (all: {errors})"


# ---------------------------------------------------------------------------------------------------------------------
# Kernels under the interpreter vs the fp64 reference
# ---------------------------------------------------------------------------------------------------------------------


@needs_triton
def test_triton_scan_fast_subset_matches_fp64_reference() -> None:
    results = _run_worker("cases", *FAST_CASES)
    assert set(results) == set(FAST_CASES)
    for case, errors in results.items():
        # every quantity present: output, last state and the gradient of each input the case has
        assert {"out", "last", "grad_u", "grad_delta", "grad_A", "grad_B", "grad_C", "grad_D"} <= set(errors), case
        _assert_errors(errors, case)
    assert {"grad_z", "grad_delta_bias"} <= set(results["chunks_padding"])
    assert not {"grad_z", "grad_delta_bias"} & set(results["no_z_no_bias_no_softplus"])


@needs_triton
@pytest.mark.slow
def test_triton_scan_all_cases_match_fp64_reference() -> None:
    slow_cases = [c for c in CASES if c not in FAST_CASES]
    results = _run_worker("cases", *slow_cases)
    assert set(results) == set(slow_cases)
    # the threshold case has delta + bias on both sides of 20 (otherwise it tests nothing new)
    assert 0.05 < results["softplus_threshold"].pop("frac_above_threshold") < 0.95
    for case, errors in results.items():
        _assert_errors(errors, case)


@needs_triton
def test_mamba_block_triton_backend_selection_probe_and_backward_fallback() -> None:
    res = _run_worker("module")
    assert res["auto_cpu"] == "chunked"  # never picked automatically on CPU, even with the interpreter on
    assert res["explicit_cpu"] == "triton"
    assert res["env_cpu"] == "triton"
    assert res["probe_cpu"] is True
    _assert_errors(res["errors"], "Mamba block")
    assert res["n_param_grads"] == 9
    # a failing backward kernel: chunked gradients instead, and the backend is retired
    _assert_errors(res["fallback_errors"], "backward fallback")
    assert res["backward_failed"] is True and res["after_failure_explicit_cpu"] == "chunked"
    assert res["probe_with_failing_backward"] is False  # a fallen-back backward does not pass the probe


@needs_triton
def test_triton_scan_offsets_past_int32() -> None:
    # (b, d, L)-contiguous inputs with d·L ≥ 2^31 elements: int32 offset products overflow (a crash or wrong reads)
    results = _run_worker("large_strides")
    for name, res in results.items():
        if "skipped" in res:
            pytest.skip(res["skipped"])
        assert res.pop("n_dblk") == (3 if name == "block_base" else 1), name
        _assert_errors(res, name)
        assert {"out", "last", "grad_u", "grad_delta", "grad_B", "grad_C", "grad_z"} <= set(res), name


@needs_triton
def test_triton_plan_geometry() -> None:
    # Importing triton_scan in this process is fine: triton_plan launches nothing.
    from brats_core.nn.triton_scan import triton_plan

    p = triton_plan(1, 32, 16, 1_310_720)  # the 64³ skip block (d_inner 32, d_state 16)
    assert p.BN == 16 and p.BD == 32 and p.n_dblk == 1
    assert p.nc * p.T >= 1_310_720 > (p.nc - 1) * p.T
    assert 1000 <= p.nc * p.n_dblk <= 8192  # enough programs to fill a GPU, not a flood of tiny chunks
    assert p.K * p.K <= p.T < (p.K + 1) ** 2 and p.nblk == -(-p.T // p.K)
    p = triton_plan(2, 1024, 256, 2560)  # bottleneck: BN = 256 → BD = 4, 256 d-blocks
    assert (p.BD, p.BN, p.n_dblk) == (4, 256, 256) and p.T >= 16
    p = triton_plan(1, 8, 4, 100, chunk_size=7)
    assert (p.nc, p.T) == (15, 7)
    with pytest.raises(ValueError, match="chunk_size"):
        triton_plan(1, 8, 4, 100, chunk_size=0)


# ---------------------------------------------------------------------------------------------------------------------
# Registration and selection (no kernel runs)
# ---------------------------------------------------------------------------------------------------------------------


def test_import_does_not_need_triton() -> None:
    """The project imports and selects a working backend when triton is absent (simulated by blocking the import)."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import os; os.environ['BRATS_MAMBA_BACKEND'] = 'triton'\n"
        "import torch\n"
        "from brats_core.nn import mamba\n"
        "from brats_core.nn.ops import kernels\n"
        "assert 'triton' in mamba.available_backends()\n"
        "print(mamba.resolve_backend(None, 'cpu'), mamba.resolve_backend(None, 'cuda'),"
        " kernels._triton_module() is None)\n"
    )
    env = _interpreter_env()
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["chunked", "chunked", "True"]


def test_importing_mamba_does_not_import_triton() -> None:
    script = "import sys\nimport brats_core.nn.mamba\nprint('triton' in sys.modules)\n"
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=_interpreter_env(), cwd=REPO
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "False"


def test_cuda_auto_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA: mamba_ssm if usable → triton if its probe passed → chunked; the env var forces a backend."""
    from brats_core.nn import mamba
    from brats_core.nn.ops import common, kernels

    monkeypatch.delenv(mamba.ENV_BACKEND, raising=False)
    monkeypatch.setattr(common, "_warned", set())
    monkeypatch.setattr(kernels, "_mamba_ssm_cache", [None])  # mamba_ssm not importable
    monkeypatch.setattr(kernels, "_triton_state", {"probe:cuda": True, "module": object()})
    assert mamba.resolve_backend(None, "cuda") == "triton"
    monkeypatch.setenv(mamba.ENV_BACKEND, "chunked")
    assert mamba.resolve_backend(None, "cuda") == "chunked"
    monkeypatch.delenv(mamba.ENV_BACKEND)
    kernels._triton_state["probe:cuda"] = False  # probe compile failed
    assert mamba.resolve_backend(None, "cuda") == "chunked"
    kernels._triton_state["probe:cuda"] = True
    lib = kernels.MambaSsmLib(selective_scan_fn=print, mamba_inner_fn=print, causal_conv1d_fn=None)
    monkeypatch.setattr(kernels, "_mamba_ssm_cache", [lib])
    assert mamba.resolve_backend(None, "cuda") == "mamba_ssm"
    monkeypatch.setenv(mamba.ENV_BACKEND, "triton")
    assert mamba.resolve_backend(None, "cuda") == "triton"
    kernels._triton_state["broken"] = True  # a kernel call failed after the probe: no longer selected
    assert mamba.resolve_backend(None, "cuda") == "mamba_ssm"


def test_kernel_failure_falls_back_to_chunked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Triton call that raises (e.g. a kernel variant failing to compile after the probe passed) returns the chunked
    result and marks the backend broken, so it is no longer selected."""
    from brats_core.nn import mamba
    from brats_core.nn.ops import common, kernels

    class FailingModule:
        calls = 0

        @classmethod
        def selective_scan_triton(cls, *args: Any) -> torch.Tensor:
            cls.calls += 1
            raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(common, "_warned", set())
    monkeypatch.setattr(kernels, "_triton_state", {"module": FailingModule, "probe:cuda": True})
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, 3, 9, generator=g) for _ in range(3))
    A, B, C = -torch.rand(3, 2, generator=g), torch.randn(1, 2, 9, generator=g), torch.randn(1, 2, 9, generator=g)
    args = (u, delta, A, B, C, torch.ones(3), z, torch.zeros(3), True, False, None)
    out = kernels.triton_adapter(*args)
    assert torch.equal(out, mamba.selective_scan_chunked(*args))
    assert FailingModule.calls == 1 and kernels._triton_state["broken"]
    kernels.triton_adapter(*args)
    assert FailingModule.calls == 1  # not retried
    monkeypatch.setattr(kernels, "_mamba_ssm_cache", [None])
    assert mamba.resolve_backend(None, "cuda") == "chunked"


def test_out_of_memory_does_not_retire_the_triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """An input too big for the GPU is not a broken kernel: the error reaches the caller, the backend stays."""
    from brats_core.nn import mamba
    from brats_core.nn.ops import kernels

    class OutOfMemory:
        @staticmethod
        def selective_scan_triton(*args: Any) -> torch.Tensor:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(kernels, "_triton_state", {"module": OutOfMemory, "probe:cuda": True})
    x = torch.zeros(1, 2, 3)
    with pytest.raises(torch.OutOfMemoryError):
        kernels.triton_adapter(x, x, -torch.ones(2, 2), x[:, :2], x[:, :2], None, None, None, True, False, None)
    assert not kernels._triton_state.get("broken")
    monkeypatch.setattr(kernels, "_mamba_ssm_cache", [None])
    assert mamba.resolve_backend(None, "cuda") == "triton"


def test_triton_not_usable_on_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from brats_core.nn import mamba
    from brats_core.nn.ops import common

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(mamba.ENV_BACKEND, "triton")
    monkeypatch.setattr(common, "_warned", set())
    assert mamba.resolve_backend(None, "cpu") == "chunked"  # falls back with a warning


# ---------------------------------------------------------------------------------------------------------------------
# benchmarks/gpu_check.py: the code paths that do not need a GPU
# ---------------------------------------------------------------------------------------------------------------------

GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"


def _load_gpu_check(monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_gpu_check_block_sizes_are_imfuse_paper_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_check = _load_gpu_check(monkeypatch)
    sizes = [(b.d_model, b.d_state, b.L) for b in gpu_check.imfuse_blocks(quick=False)]
    # IM-Fuse's 128³ … 16³ skip levels and the 8³ bottleneck; L = 5 token sets × positions
    assert sizes == [(8, 8, 10_485_760), (16, 16, 1_310_720), (32, 32, 163_840), (64, 64, 20_480), (512, 256, 2_560)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit; this machine has CUDA")
def test_gpu_check_exits_cleanly_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    res = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no CUDA device" in res.stdout and not out.exists()


def test_gpu_check_keeps_the_report_of_sections_that_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_check = _load_gpu_check(monkeypatch)
    out = tmp_path / "r.md"
    seen: list[str] = []

    def parity(*args: object) -> list[str]:
        seen.append(out.read_text())  # the report already exists, marked incomplete, while sections run
        return ["## Backend parity", "measured", ""]

    def timing(*args: object, **kwargs: object) -> list[str]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "parity_section", parity)
    monkeypatch.setattr(gpu_check, "timing_section", timing)
    assert gpu_check.main(["--device", "cpu", "--quick", "--skip_train_step", "--out", str(out)]) == 0
    assert "## Versions" in seen[0] and gpu_check.INCOMPLETE in seen[0]
    report = out.read_text()
    assert "measured" in report and "Section failed: RuntimeError: CUDA error" in report
    assert report.count("Section failed") == 2  # both timing sections (b = 1, then b = 2)
    assert gpu_check.INCOMPLETE not in report and "Total wall time" in report


def _gpu_check_dry_run(tmp_path: Path, *extra: str, interpreter: bool) -> str:
    out = tmp_path / "dry.md"
    env = _interpreter_env() if interpreter else {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--device", "cpu", "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    report = out.read_text()
    assert "## Versions" in report and "## Backend parity" in report and "## Mamba block timing" in report
    assert "error" not in report and "skipped" not in report and "Section failed" not in report, report
    return report


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_chunked(tmp_path: Path) -> None:
    report = _gpu_check_dry_run(tmp_path, "--skip_train_step", "--batch_sizes", "1", interpreter=False)
    parity = [r for r in report.splitlines() if r.startswith("| skip") or r.startswith("| bottleneck")]
    assert len(parity) == 2 * 5  # five blocks in the parity table and in the timing table
    for row in parity[:5]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == "chunked" and all(float(c) < 1e-5 for c in cells[4:7]), row


@needs_triton
@pytest.mark.slow
def test_gpu_check_cpu_dry_run_with_triton_interpreter_and_train_step(tmp_path: Path) -> None:
    # the interpreter is slow: short sequences, and a budget that never skips
    report = _gpu_check_dry_run(tmp_path, "--max_len", "48", "--budget_s", "3600", interpreter=True)
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in report.splitlines() if r.startswith("| ")]
    triton_parity = [r for r in rows if len(r) == 8 and r[3] == "triton"]
    assert len(triton_parity) == 5 and all(float(c) < 1e-5 for r in triton_parity for c in r[4:7])
    assert sum(r[3] == "triton" for r in rows if len(r) == 10) == 2 * 5  # timed at b = 1 and 2
    assert any(r[0] == "fp32" for r in rows) and any(r[0].startswith("AMP") for r in rows)
    assert "PASS" not in report and "FAIL" not in report  # GPU targets are not judged on CPU


# ---------------------------------------------------------------------------------------------------------------------
# Worker (runs in the subprocess, TRITON_INTERPRET=1 set by the parent before anything imports triton)
# ---------------------------------------------------------------------------------------------------------------------


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|; an all-zero ``expected`` needs ``actual`` zero to within 1e-30."""
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _case_errors(name: str) -> dict[str, float]:
    from brats_core.nn import triton_scan
    from brats_core.nn.mamba import selective_scan, selective_scan_reference

    b, d, n, L, chunk, opt = CASES[name]
    triton_scan._CARRY_TILE = opt.get("carry_tile", 64)
    triton_scan._MAX_PARTIAL_DBLK = opt.get("max_partial_dblk", 8)
    g = torch.Generator().manual_seed(sum(map(ord, name)))

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def seq(c: int) -> torch.Tensor:
        return rnd(b, L, c).transpose(1, 2) if opt.get("token_major") else rnd(b, c, L)

    softplus = opt.get("softplus", True)
    delta = seq(d) + opt.get("delta_shift", -1.0)
    if not softplus:
        delta = torch.nn.functional.softplus(delta)  # dt must stay positive without the softplus
    tensors: dict[str, torch.Tensor | None] = {
        "u": seq(d),
        "delta": delta,
        "A": -torch.exp(rnd(d, n)),
        "B": seq(n),
        "C": seq(n),
        "D": rnd(d),
        "z": seq(d) if opt.get("z", True) else None,
        "delta_bias": 0.5 * rnd(d) if opt.get("bias", True) else None,
    }
    loss_kind = opt.get("loss", "all")
    w_out = rnd(b, d, L)
    w_last = rnd(b, d, n)
    names = [k for k, v in tensors.items() if v is not None]

    def run(dtype: torch.dtype, backend: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        ins = {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in tensors.items()}
        kwargs: dict[str, Any] = {"delta_softplus": softplus, "return_last_state": True}
        if backend == "reference":
            out, last = selective_scan_reference(*ins.values(), **kwargs)
        else:
            out, last = selective_scan(*ins.values(), **kwargs, backend=backend, chunk_size=chunk)
        loss = torch.zeros((), dtype=torch.float64)
        if loss_kind in ("all", "out"):
            loss = loss + (out.double() * w_out).sum()
        if loss_kind in ("all", "last"):
            loss = loss + (last.double() * w_last).sum()
        leaves = [ins[k] for k in names]
        # with a loss on the last state only, C, D and z are unused by the reference: their gradient must be 0
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        return out, last, list(grads)

    out, last, grads = run(torch.float32, "triton")
    assert out.dtype == torch.float32 and out.shape == (b, d, L) and last.shape == (b, d, n)
    ref_out, ref_last, ref_grads = run(torch.float64, "reference")
    errors = {"out": _rel(out, ref_out), "last": _rel(last, ref_last)}
    for k, gt, gr in zip(names, grads, ref_grads, strict=True):
        errors[f"grad_{k}"] = _rel(gt, gr)
    if name == "softplus_threshold":
        pre = tensors["delta"] + tensors["delta_bias"][:, None]  # type: ignore[index]
        errors["frac_above_threshold"] = (pre > 20).double().mean().item()  # not an error: popped by the test
    return errors


def _module_check() -> dict[str, Any]:
    from brats_core.nn import mamba
    from brats_core.nn.ops import kernels

    res: dict[str, Any] = {"auto_cpu": mamba.resolve_backend(None, "cpu"), "explicit_cpu": None}
    res["explicit_cpu"] = mamba.resolve_backend("triton", "cpu")
    os.environ[mamba.ENV_BACKEND] = "triton"
    res["env_cpu"] = mamba.resolve_backend(None, "cpu")
    del os.environ[mamba.ENV_BACKEND]
    with torch.inference_mode():  # the first resolve may come from an evaluation loop: the probe must still work
        res["probe_cpu"] = kernels._triton_probe(torch.device("cpu"))  # the CUDA probe's code, in the interpreter
    torch.manual_seed(0)
    block = mamba.Mamba(d_model=8, d_state=8, backend="chunked").double()
    x = torch.randn(2, 21, 8, dtype=torch.float64)
    w = torch.randn(2, 21, 8, dtype=torch.float64)
    outs = {}
    for backend, dtype in (("chunked", torch.float64), ("triton", torch.float32)):
        m = mamba.Mamba(d_model=8, d_state=8, backend=backend, chunk_size=6).to(dtype)
        m.load_state_dict(block.state_dict())
        xi = x.detach().to(dtype).requires_grad_()
        y = m(xi)
        (y.double() * w).sum().backward()
        outs[backend] = (y, xi.grad, {k: p.grad for k, p in m.named_parameters()})
    (y64, gx64, gp64), (y32, gx32, gp32) = outs["chunked"], outs["triton"]
    res["errors"] = {"out": _rel(y32, y64), "grad_x": _rel(gx32, gx64)}
    res["errors"].update({f"grad_{k}": _rel(gp32[k], gp64[k]) for k in gp64})
    res["n_param_grads"] = sum(g is not None for g in gp32.values())
    res.update(_backward_fallback_check())
    return res


def _backward_fallback_check() -> dict[str, Any]:
    """A backward kernel that fails (simulated) yields the chunked gradients and retires the backend."""
    from brats_core.nn import mamba, triton_scan

    class Broken:
        def __getitem__(self, grid: Any) -> Any:
            raise RuntimeError("simulated compile failure")

    g = torch.Generator().manual_seed(5)
    b, d, n, L = 1, 4, 3, 11
    shapes = [(b, d, L), (b, d, L), (d, n), (b, n, L), (b, n, L), (d,), (b, d, L), (d,)]
    base = [torch.randn(s, generator=g) for s in shapes]
    base[2] = -base[2].exp()
    grads = {}
    assert not triton_scan.backward_failed()
    triton_scan._chunk_scan_bwd_kernel = Broken()  # this process ends after the check
    for backend in ("triton", "chunked"):
        ins = [t.clone().requires_grad_() for t in base]
        out, last = mamba.selective_scan(*ins, return_last_state=True, backend=backend, chunk_size=4)
        grads[backend] = torch.autograd.grad(out.square().sum() + last.sum(), ins)
    return {
        "fallback_errors": {
            f"grad_{k}": _rel(a, e) for k, a, e in zip(INPUT_NAMES, grads["triton"], grads["chunked"], strict=True)
        },
        "backward_failed": triton_scan.backward_failed(),
        "after_failure_explicit_cpu": mamba.resolve_backend("triton", "cpu"),
        "probe_with_failing_backward": _probe_again(),
    }


def _probe_again() -> bool:
    """The probe's verdict when its backward falls back to the chunked scan (chunked vs chunked gradients agree)."""
    from brats_core.nn import triton_scan
    from brats_core.nn.ops import kernels

    triton_scan._backward_failures.clear()
    kernels._triton_state.pop("probe:cpu", None)
    return kernels._triton_probe(torch.device("cpu"))


# name → (d, n, d-stride, n-stride or None for contiguous B and C): offsets past 2^31 within the lanes of one block,
# or only at the start of the third d-block (BD = 4 as n = 130)
LARGE_STRIDES = {"wide_lanes": (3, 3, 2**30 + 8, 2**30 + 8), "block_base": (10, 130, 2**28 + 8, None)}


def _large_stride_errors(name: str) -> dict[str, Any]:
    """The scan of (1, ·, 5) inputs with huge strides, against the fp64 reference on contiguous copies.

    The strided inputs are views into one lazily allocated buffer of ~9 GB of address space; only the few pages they
    use are touched. The kernels are called directly: a failure must not be hidden by the backend's chunked fallback.
    """
    from brats_core.nn import triton_scan
    from brats_core.nn.mamba import selective_scan_reference

    d, n, stride_d, stride_n = LARGE_STRIDES[name]
    L = 5
    try:
        storage = torch.empty(stride_d * (d - 1) + 5 * L)
    except RuntimeError as exc:  # a machine that refuses the virtual allocation
        return {"skipped": f"cannot reserve {4 * stride_d * d / 1e9:.1f} GB of address space: {exc}"}
    g = torch.Generator().manual_seed(3)
    values = [torch.randn(1, c, L, generator=g) for c in (d, d, n, n, d)]  # u, delta, B, C, z
    views = []
    for k, v in enumerate(values):
        stride = stride_d if v.shape[1] == d else stride_n
        if stride is None:
            view = v.clone()
        else:
            view = storage.as_strided(v.shape, (stride * v.shape[1], stride, 1), k * L)
            view.copy_(v)
        views.append(view.requires_grad_())
    A = -torch.rand(d, n, generator=g) - 0.5
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    u, delta, B, C, z = views
    plan = triton_scan.triton_plan(1, d, n, L, 2)
    out, last = triton_scan.selective_scan_triton(u, delta, A, B, C, D, z, bias, True, True, 2)
    grads = torch.autograd.grad(out.sum() + last.sum(), views)
    ref = [v.double().requires_grad_() for v in values]
    ru, rdelta, rB, rC, rz = ref
    ref_out, ref_last = selective_scan_reference(
        ru, rdelta, A.double(), rB, rC, D.double(), rz, bias.double(), delta_softplus=True, return_last_state=True
    )
    ref_grads = torch.autograd.grad(ref_out.sum() + ref_last.sum(), ref)
    errors: dict[str, Any] = {"out": _rel(out, ref_out), "last": _rel(last, ref_last)}
    for key, gt, gr in zip(("u", "delta", "B", "C", "z"), grads, ref_grads, strict=True):
        errors[f"grad_{key}"] = _rel(gt, gr)
    errors["n_dblk"] = plan.n_dblk  # not an error: popped by the test
    return errors


def _worker(argv: list[str]) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    torch.set_num_threads(1)
    if argv[0] == "cases":
        result: dict[str, Any] = {name: _case_errors(name) for name in argv[1:]}
    elif argv[0] == "large_strides":
        result = {name: _large_stride_errors(name) for name in LARGE_STRIDES}
    else:
        result = _module_check()
    print(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1:])


# benchmarks/triton_compile_check.py: the kernels compiled for real GPUs (Triton + the wheel's ptxas, no GPU needed)
COMPILE_CHECK = REPO / "benchmarks" / "triton_compile_check.py"
TILES = {(16, 8), (32, 16), (32, 32), (16, 64), (4, 256)}  # BD × BN of IM-Fuse's five Mamba blocks


def _compile_check(tmp_path: Path, targets: str) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # an empty cache: every variant is really compiled
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, str(COMPILE_CHECK), "--targets", targets, "--json", str(out)],
        capture_output=True, text=True, timeout=1200, env=env, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and not [r for r in rows if "error" in r]
    assert {r["target"] for r in rows} == {f"sm_{t}" for t in targets.split(",")}
    for kernel in ("chunk_state_kernel", "chunk_scan_fwd_kernel", "chunk_bwd_reduce_kernel", "chunk_scan_bwd_kernel"):
        assert {(r["BD"], r["BN"]) for r in rows if r["kernel"] == kernel} == TILES, kernel
    carries = {(r["REVERSE"], r["NCB"]) for r in rows if r["kernel"] == "carry_kernel"}
    assert {reverse for reverse, _ in carries} == {False, True} and {ncb for _, ncb in carries} >= {64}
    # the per-step loops of the scans and the carry pass's associative scan must not spill
    hot = [r for r in rows if r["kernel"] in ("chunk_scan_bwd_kernel", "chunk_scan_fwd_kernel", "carry_kernel")]
    assert all(r["spill_stores"] == 0 and 0 < r["registers"] <= 255 for r in hot), hot
    bwd = [r for r in rows if r["kernel"] == "chunk_scan_bwd_kernel"]
    assert {r["num_warps"] for r in bwd if r["BD"] * r["BN"] >= 1024} == {8}
    # strides of 1 are compiled in as constants, as a real launch does (the Mamba block's token-major layout)
    assert all(r["constant_args"] > 0 for r in rows if r["kernel"] != "carry_kernel")
    # and the form with int64 strides (inputs past 2^31 elements) for every kernel that reads strided sequences
    wide = {r["kernel"] for r in rows if r["i64_args"]}
    assert wide == {"chunk_state_kernel", "chunk_scan_fwd_kernel", "chunk_bwd_reduce_kernel", "chunk_scan_bwd_kernel"}
    return rows


@needs_triton
def test_kernels_compile_for_hopper_without_spills_in_the_backward_scan(tmp_path: Path) -> None:
    _compile_check(tmp_path, "90")


@needs_triton
@pytest.mark.slow
def test_kernels_compile_for_ampere_and_hopper(tmp_path: Path) -> None:
    rows = _compile_check(tmp_path, "80,90")
    assert len([r for r in rows if r["target"] == "sm_80"]) == len([r for r in rows if r["target"] == "sm_90"])
