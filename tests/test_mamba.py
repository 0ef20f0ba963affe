"""Tests of the mamba-ssm compatible Mamba block (brats_core/nn/mamba.py) and its selective-scan ops and backends
(brats_core/nn/ops/)."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from brats_core.nn import mamba as mamba_mod
from brats_core.nn import ops
from brats_core.nn.mamba import (
    ENV_BACKEND,
    ChunkedSelectiveScanFn,
    Mamba,
    available_backends,
    is_backend_usable,
    register_backend,
    resolve_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)
from brats_core.nn.ops import chunked as chunked_mod
from brats_core.nn.ops import common as scan_common
from brats_core.nn.ops import kernels as kernels_mod
from brats_core.nn.ops import registry as registry_mod

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "spec" / "mamba_golden.pt"
SCAN_BACKENDS = ["chunked", "reference"]
SCAN_INPUT_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (norm-wise relative error, robust to near-zero entries)."""
    expected = expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.detach().double() - expected).abs().max() / scale).item()


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    monkeypatch.setattr(scan_common, "_warned", set())


def make_scan_inputs(
    b: int,
    d: int,
    n: int,
    L: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    token_major: bool = False,
    delta_shift: float = -1.0,
) -> list[torch.Tensor]:
    """Random scan inputs (u, delta, A, B, C, D, z, delta_bias) in mamba-ssm's layout, with grads enabled.

    ``token_major`` builds the (b, d, L) tensors as transposed views of (b, L, d) storage, as the Mamba block does.
    ``delta_shift`` moves softplus(delta + bias), i.e. how strongly the state decays per step.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def seq(c: int) -> torch.Tensor:
        return rnd(b, L, c).transpose(1, 2) if token_major else rnd(b, c, L)

    u, delta, z = seq(d), seq(d) + delta_shift, seq(d)
    B, C = seq(n), seq(n)
    A = -torch.exp(rnd(d, n))
    D, delta_bias = rnd(d), 0.5 * rnd(d)
    return [t.to(dtype).requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]


def scan_and_grads(
    inputs: list[torch.Tensor], backend: str, loss_kind: str, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    out, last = selective_scan(
        *inputs, delta_softplus=True, return_last_state=True, backend=backend, chunk_size=chunk_size
    )
    g = torch.Generator().manual_seed(123)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    if loss_kind == "all":
        loss = (out * w).sum()
    elif loss_kind == "last_token":
        loss = (out[..., -1] * w[..., -1]).sum()
    else:  # "last_state": only the returned state, plus a little of everything
        wl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
        loss = (last * wl).sum() + 1e-3 * (out * w).sum()
    grads = torch.autograd.grad(loss, inputs)
    return out, last, grads


# ---------------------------------------------------------------------------------------------------------------------
# Golden parity with mamba-ssm's own Mamba
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden() -> dict:
    if not GOLDEN.exists():
        pytest.skip(f"golden fixture {GOLDEN} is absent (it lives in ../shared beside the development checkout)")
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("case", ["d16", "d64", "d256"])
def test_golden_parity_with_mamba_ssm(golden: dict, case: str, backend: str) -> None:
    data = golden[case]
    model = Mamba(**data["config"], backend=backend)
    model.load_state_dict(data["state_dict"], strict=True)
    x = data["input"].clone().requires_grad_()
    out = model(x)
    assert out.dtype == torch.float32 and out.shape == data["output"].shape
    (out * data["loss_weight"]).sum().backward()
    assert rel_err(out, data["output"]) < 1e-5
    assert rel_err(x.grad, data["grad_input"]) < 1e-5
    for name, p in model.named_parameters():
        assert rel_err(p.grad, data["grad_params"][name]) < 1e-5, name


def test_golden_state_dict_keys_match(golden: dict) -> None:
    for data in golden.values():
        sd = Mamba(**data["config"]).state_dict()
        assert list(sd) == list(data["state_dict"])
        assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in data["state_dict"].items()}


# ---------------------------------------------------------------------------------------------------------------------
# Scan backends against the fp64 sequential reference
# ---------------------------------------------------------------------------------------------------------------------

# (b, d, n, L, chunk_size, token_major, delta_shift)
SCAN_CASES = [
    pytest.param(2, 8, 4, 50, 7, False, -1.0, id="L_not_multiple_of_chunk"),
    pytest.param(2, 6, 5, 64, 16, True, -1.0, id="token_major_views_no_padding"),
    pytest.param(1, 4, 3, 1, None, False, -1.0, id="L1"),
    pytest.param(1, 5, 7, 3, None, True, -1.0, id="L3"),
    pytest.param(2, 6, 6, 200, None, True, -1.0, id="auto_chunking"),
    pytest.param(1, 8, 256, 40, 16, True, 1.0, id="d_state_256_strong_decay"),
    pytest.param(1, 3, 24, 33, 1, False, -1.0, id="chunk_len_1"),
    pytest.param(2, 3, 4, 301, 2, True, -1.0, id="many_chunks_log_depth_carries"),
]


@pytest.mark.parametrize("loss_kind", ["all", "last_token", "last_state"])
@pytest.mark.parametrize(("b", "d", "n", "L", "chunk_size", "token_major", "delta_shift"), SCAN_CASES)
def test_chunked_matches_fp64_reference(
    b: int, d: int, n: int, L: int, chunk_size: int | None, token_major: bool, delta_shift: float, loss_kind: str
) -> None:
    # fp32 inputs; the fp64 runs use exactly the same (fp32-representable) values.
    in32 = make_scan_inputs(b, d, n, L, dtype=torch.float32, token_major=token_major, delta_shift=delta_shift)
    ref_out, ref_last, ref_grads = scan_and_grads(
        [t.detach().double().requires_grad_() for t in in32], "reference", loss_kind
    )

    # fp64: the chunked algorithm is exact, so it must agree to rounding.
    in64 = [t.detach().double().requires_grad_() for t in in32]
    out, last, grads = scan_and_grads(in64, "chunked", loss_kind, chunk_size)
    assert out.dtype == torch.float64
    assert rel_err(out, ref_out) < 1e-12 and rel_err(last, ref_last) < 1e-12
    for name, g, rg in zip(SCAN_INPUT_NAMES, grads, ref_grads, strict=True):
        assert rel_err(g, rg) < 1e-10, name

    # fp32: fp32 precision against the fp64 truth.
    out, last, grads = scan_and_grads(in32, "chunked", loss_kind, chunk_size)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert rel_err(out, ref_out) < 1e-5 and rel_err(last, ref_last) < 1e-5
    for name, g, rg in zip(SCAN_INPUT_NAMES, grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        assert rel_err(g, rg) < 1e-5, name


@pytest.mark.parametrize("nc", [1, 2, 5, 64, 65, 130])
@pytest.mark.parametrize("sequential_max", [0, 10**9])
def test_carry_scan_loop_and_doubling_agree(monkeypatch: pytest.MonkeyPatch, nc: int, sequential_max: int) -> None:
    monkeypatch.setattr(chunked_mod, "_SEQUENTIAL_CARRY_MAX", sequential_max)
    g = torch.Generator().manual_seed(nc)
    P = torch.rand(2, nc, 3, 4, generator=g, dtype=torch.float64)
    E = torch.randn(2, nc, 3, 4, generator=g, dtype=torch.float64)
    expected = E.clone()
    for c in range(1, nc):
        expected[:, c] = P[:, c] * expected[:, c - 1] + E[:, c]
    assert rel_err(chunked_mod._carry_scan(P, E), expected) < 1e-14


def test_reference_backend_fp32_close_to_fp64() -> None:
    ref_out, _, ref_grads = scan_and_grads(make_scan_inputs(2, 4, 8, 30), "reference", "all")
    out, _, grads = scan_and_grads(make_scan_inputs(2, 4, 8, 30, dtype=torch.float32), "reference", "all")
    assert rel_err(out, ref_out) < 1e-5
    for g, rg in zip(grads, ref_grads, strict=True):
        assert rel_err(g, rg) < 1e-5


def test_optional_arguments_and_no_softplus() -> None:
    u, delta, A, B, C, *_ = make_scan_inputs(2, 4, 3, 20)
    delta_pos = F.softplus(delta).detach().requires_grad_()
    for kwargs in ({}, {"delta_softplus": False}):
        d_in = delta_pos if kwargs else delta
        ref = selective_scan_reference(u, d_in, A, B, C, **kwargs)
        out = selective_scan(u, d_in, A, B, C, backend="chunked", chunk_size=6, **kwargs)
        assert rel_err(out, ref) < 1e-12
        g_ref = torch.autograd.grad(ref.sum(), (u, d_in, A, B, C))
        g = torch.autograd.grad(out.sum(), (u, d_in, A, B, C))
        for a, r in zip(g, g_ref, strict=True):
            assert rel_err(a, r) < 1e-10


def test_softplus_threshold_matches_kernel() -> None:
    # Above 20 the kernel's softplus returns its input; F.softplus(threshold=20) is the same function.
    u, delta, A, B, C, D, z, _ = make_scan_inputs(1, 3, 2, 10)
    bias = torch.tensor([25.0, 19.0, -3.0], dtype=torch.float64, requires_grad=True)
    ref = selective_scan_reference(u, delta, A, B, C, D, z, bias)
    out = selective_scan(u, delta, A, B, C, D, z, bias, backend="chunked")
    assert rel_err(out, ref) < 1e-12
    gb_ref, gd_ref = torch.autograd.grad(ref.sum(), (bias, delta))
    gb, gd = torch.autograd.grad(out.sum(), (bias, delta))
    assert rel_err(gb, gb_ref) < 1e-10 and rel_err(gd, gd_ref) < 1e-10


@pytest.mark.parametrize("chunk_size", [3, None])
def test_chunked_gradcheck(chunk_size: int | None) -> None:
    inputs = make_scan_inputs(1, 2, 3, 7, seed=3)

    def fn(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ChunkedSelectiveScanFn.apply(*args, True, True, chunk_size)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_chunked_gradcheck_without_optional_inputs() -> None:
    u, delta, A, B, C, *_ = make_scan_inputs(2, 2, 2, 5, seed=4)

    def fn(*args: torch.Tensor) -> torch.Tensor:
        return ChunkedSelectiveScanFn.apply(*args, None, None, None, True, False, 2)

    assert torch.autograd.gradcheck(fn, (u, delta, A, B, C), eps=1e-6, atol=1e-8, rtol=1e-6)


# (inputs that need a gradient, optional inputs left out): the branches of the chunked backward's steps
GRAD_SUBSETS = [
    pytest.param({"u", "B"}, (), id="u_B_only"),
    pytest.param({"z", "A"}, (), id="z_A_only"),
    pytest.param({"delta", "C", "D", "delta_bias"}, (), id="delta_C_D_bias_no_gate_grad"),
    pytest.param(set(SCAN_INPUT_NAMES), ("z",), id="no_gate"),
    pytest.param(set(SCAN_INPUT_NAMES), ("D", "delta_bias"), id="no_skip_no_bias"),
]


@pytest.mark.parametrize("return_last_state", [True, False])
@pytest.mark.parametrize(("wanted", "absent"), GRAD_SUBSETS)
def test_chunked_backward_steps_match_reference_for_input_subsets(
    wanted: set[str], absent: tuple[str, ...], return_last_state: bool
) -> None:
    """The chunked backward (gate input gradient, recompute pass, adjoint carries, reverse pass, softplus and gate
    gradients) against the reference scan's autograd, in fp64, whichever inputs need a gradient or are absent.
    L = 29 in chunks of 4: 8 chunks, the last one padded, recompute blocks of 2."""
    base = make_scan_inputs(2, 5, 3, 29, seed=11)
    g = torch.Generator().manual_seed(5)
    w_out = torch.randn(2, 5, 29, generator=g, dtype=torch.float64)
    w_last = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    results = {}
    for backend in ("chunked", "reference"):
        ins = [
            None if name in absent else t.detach().clone().requires_grad_(name in wanted)
            for name, t in zip(SCAN_INPUT_NAMES, base, strict=True)
        ]
        res = selective_scan(*ins, return_last_state=return_last_state, backend=backend, chunk_size=4)
        out, last = res if return_last_state else (res, None)
        loss = (out * w_out).sum() + ((last * w_last).sum() if last is not None else 0.0)
        leaves = [t for t in ins if t is not None and t.requires_grad]
        results[backend] = (out, last, torch.autograd.grad(loss, leaves))
    (out, last, grads), (ref_out, ref_last, ref_grads) = results["chunked"], results["reference"]
    assert rel_err(out, ref_out) < 1e-12
    assert (last is None) == (not return_last_state) and (last is None or rel_err(last, ref_last) < 1e-12)
    assert len(grads) == len(wanted - set(absent))
    for g_new, g_ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g_new, g_ref) < 1e-10


def test_shape_validation() -> None:
    u, delta, A, B, C, D, *_ = make_scan_inputs(1, 4, 3, 5)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(u, delta, A, B[:, :2], C)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, delta, A[:2], B, C)
    with pytest.raises(ValueError, match="D must be"):
        selective_scan(u, delta, A, B, C, D[:2])


# ---------------------------------------------------------------------------------------------------------------------
# Memory boundedness of the chunked backend (no timing)
# ---------------------------------------------------------------------------------------------------------------------


def test_chunked_saves_only_inputs_and_chunk_carries() -> None:
    b, d, n, L = 1, 16, 32, 4096
    inputs = make_scan_inputs(b, d, n, L, dtype=torch.float32, token_major=True)
    out = selective_scan(*inputs, backend="chunked")
    saved = out.grad_fn.saved_tensors
    input_ptrs = {t.data_ptr() for t in inputs}
    extra = [t for t in saved if t is not None and t.data_ptr() not in input_ptrs]
    assert len(extra) == 1  # the per-chunk carry-in states
    carry = extra[0]
    assert carry.dim() == 4 and carry.shape[0] == b and sorted(carry.shape[2:]) == sorted((d, n))
    assert carry.numel() <= 1 << 18  # one (b, nc, n, d) state, ≤ 2^18 elements by design
    assert carry.numel() * 8 <= L * d * n  # far from a full (L, d, n) state history


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from brats_core.nn.mamba import selective_scan
    torch.set_num_threads(1)
    b, d, n, L = 1, 128, 128, 8192
    g = torch.Generator().manual_seed(0)
    def seq(c):
        return torch.randn(b, L, c, generator=g).transpose(1, 2).requires_grad_()
    ins = [seq(d), seq(d), (-torch.rand(d, n, generator=g) - 0.5).requires_grad_(), seq(n), seq(n),
           torch.ones(d, requires_grad=True), seq(d), torch.zeros(d, requires_grad=True)]
    small = [t.detach()[..., :64].contiguous().requires_grad_() if t.dim() == 3 else t for t in ins]
    selective_scan(*small, backend="chunked").sum().backward()  # warm-up: libraries, allocator
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = selective_scan(*ins, backend="chunked")
    out.backward(torch.ones_like(out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": peak - base, "state_bytes": L * d * n * 4, "bdl_bytes": b * d * L * 4}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in kB is Linux-specific")
def test_chunked_peak_memory_far_below_one_state_history() -> None:
    """fwd+bwd of a (d=128, n=128, L=8192) scan: one full (L, d, n) fp32 tensor is 537 MB (the sequential reference
    keeps several); the chunked scan's peak RSS growth, O(b·L·(d+n) + b·nc·d·n·√T) including the returned input
    gradients, must stay a fraction of it."""
    res = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(REPO)], capture_output=True, text=True, timeout=300, check=True
    )
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["growth"] < 0.4 * stats["state_bytes"], stats


# ---------------------------------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------------------------------


def test_backends_registered() -> None:
    assert {"mamba_ssm", "chunked", "reference"} <= set(available_backends())


def test_backend_selection_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend(None, "cpu") == "chunked"  # auto on CPU
    assert resolve_backend("auto", "cpu") == "chunked"
    assert resolve_backend("reference", "cpu") == "reference"
    monkeypatch.setenv(ENV_BACKEND, "reference")
    assert resolve_backend(None, "cpu") == "reference"  # env var beats auto
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("chunked", "cpu") == "chunked"  # explicit argument beats env var
    monkeypatch.setenv(ENV_BACKEND, "auto")
    assert resolve_backend(None, "cpu") == "chunked"
    with pytest.raises(ValueError, match="unknown Mamba scan backend"):
        resolve_backend("nonexistent", "cpu")


def test_is_backend_usable() -> None:
    assert is_backend_usable("chunked", "cpu") and is_backend_usable("reference", "cpu")
    assert not is_backend_usable("mamba_ssm", "cpu")  # CUDA kernels only
    with pytest.raises(ValueError, match="unknown Mamba scan backend"):
        is_backend_usable("nonexistent", "cpu")


def test_mamba_module_reexports_the_scan_ops() -> None:
    """Code importing the scan API from brats_core.nn.mamba (as before the ops had their own package) gets the ops'
    own objects, so registering a backend through either name is the same registry."""
    for name in ops.__all__:
        assert getattr(mamba_mod, name) is getattr(ops, name), name
    assert set(mamba_mod.__all__) == {*ops.__all__, "Mamba"}


def test_kernel_adapters_share_one_fallback_path() -> None:
    """No kernel → the chunked scan; a failing kernel → the chunked result, and the kernel retired once;
    out-of-memory → raised to the caller (the chunked scan would not fit either), nothing retired."""
    args = (*make_scan_inputs(1, 3, 2, 9, dtype=torch.float32), True, True, None)
    expected = selective_scan_chunked(*args)
    retired: list[Exception] = []

    def failing() -> torch.Tensor:
        raise RuntimeError("simulated compile failure")

    def out_of_memory() -> torch.Tensor:
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    for kernel in (None, failing):
        out, last = kernels_mod._kernel_or_chunked(kernel, retired.append, args)
        assert torch.equal(out, expected[0]) and torch.equal(last, expected[1])
    assert [str(e) for e in retired] == ["simulated compile failure"]
    with pytest.raises(torch.OutOfMemoryError):
        kernels_mod._kernel_or_chunked(out_of_memory, retired.append, args)
    assert len(retired) == 1


def test_mamba_ssm_adapter_on_cpu_and_retirement(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """CPU tensors never reach mamba-ssm's CUDA kernel (chunked result); a failed call retires the kernels for good,
    with one warning."""
    calls: list[int] = []

    def kernel(*args: object) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("undefined symbol")

    lib = kernels_mod.MambaSsmLib(selective_scan_fn=kernel, mamba_inner_fn=kernel, causal_conv1d_fn=None)
    monkeypatch.setattr(kernels_mod, "_mamba_ssm_cache", [lib])
    args = (*make_scan_inputs(1, 3, 2, 9, dtype=torch.float32), True, False, None)
    assert torch.equal(kernels_mod.mamba_ssm_adapter(*args), selective_scan_chunked(*args))
    assert not calls and kernels_mod.mamba_ssm_lib() is lib
    with caplog.at_level(logging.WARNING, logger=scan_common.logger.name):
        kernels_mod.mark_mamba_ssm_broken(RuntimeError("boom"))
        kernels_mod.mark_mamba_ssm_broken(RuntimeError("boom"))
    assert lib.broken and kernels_mod.mamba_ssm_lib() is None
    assert len([r for r in caplog.records if "mamba_ssm kernel call failed" in r.getMessage()]) == 1


def test_mamba_ssm_on_cpu_falls_back_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=scan_common.logger.name):
        assert resolve_backend("mamba_ssm", "cpu") == "chunked"
        assert resolve_backend("mamba_ssm", "cpu") == "chunked"
        model = Mamba(8, d_state=4, backend="mamba_ssm")
        out = model(torch.randn(1, 5, 8))
    assert out.shape == (1, 5, 8)
    assert len([r for r in caplog.records if "mamba_ssm" in r.getMessage()]) == 1


def test_registered_backend_is_dispatched_by_name_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def spy(*args: object) -> object:
        calls.append("spy")
        return mamba_mod.selective_scan_chunked(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(registry_mod, "_BACKENDS", dict(registry_mod._BACKENDS))
    register_backend("spy", spy, lambda device: True)
    model = Mamba(8, d_state=4)
    x = torch.randn(1, 6, 8)
    expected = Mamba(8, d_state=4, backend="reference")
    expected.load_state_dict(model.state_dict())
    monkeypatch.setenv(ENV_BACKEND, "spy")
    out = model(x)
    assert calls == ["spy"]
    assert rel_err(out, expected(x)) < 1e-5
    monkeypatch.delenv(ENV_BACKEND)
    model(x)
    assert calls == ["spy"]  # auto does not pick a backend without auto_priority
    with pytest.raises(ValueError, match="reserved"):
        register_backend("auto", spy, lambda device: True)


# ---------------------------------------------------------------------------------------------------------------------
# Module: parameters, state dict, initialisation, forward
# ---------------------------------------------------------------------------------------------------------------------


def expected_state_dict_shapes(d_model: int, d_state: int, d_conv: int = 4, expand: int = 2) -> list[tuple]:
    d = expand * d_model
    r = math.ceil(d_model / 16)
    return [
        ("A_log", (d, d_state)),
        ("D", (d,)),
        ("in_proj.weight", (2 * d, d_model)),
        ("conv1d.weight", (d, 1, d_conv)),
        ("conv1d.bias", (d,)),
        ("x_proj.weight", (r + 2 * d_state, d)),
        ("dt_proj.weight", (d, r)),
        ("dt_proj.bias", (d,)),
        ("out_proj.weight", (d_model, d)),
    ]


@pytest.mark.parametrize("d_model", [8, 16, 32, 64, 512])
def test_state_dict_keys_order_and_shapes(d_model: int) -> None:
    d_state = min(d_model, 256)
    sd = Mamba(d_model, d_state=d_state).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == expected_state_dict_shapes(d_model, d_state)
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_bottleneck_state_dict_shapes() -> None:
    sd = Mamba(512, d_state=256).state_dict()
    assert sd["A_log"].shape == (1024, 256)
    assert sd["in_proj.weight"].shape == (2048, 512)
    assert sd["x_proj.weight"].shape == (544, 1024)
    assert sd["dt_proj.weight"].shape == (1024, 32)
    # 1024·256 (A_log) + 1024 (D) + 2048·512 + 1024·4 + 1024 (conv) + 544·1024 + 1024·32 + 1024 (dt_proj) + 512·1024
    assert sum(v.numel() for v in sd.values()) == 2_432_000


def test_initialisation_statistics() -> None:
    torch.manual_seed(0)
    m = Mamba(64, d_state=32)
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert dt.min() < 2e-3 and dt.max() > 0.05  # log-uniform over the whole range
    expected_a_log = torch.log(torch.arange(1, 33, dtype=torch.float32)).expand(128, 32)
    assert torch.equal(m.A_log.detach(), expected_a_log)
    assert torch.equal(m.D.detach(), torch.ones(128))
    bound = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= bound
    assert m.A_log._no_weight_decay and m.D._no_weight_decay  # type: ignore[attr-defined]
    assert m.dt_proj.bias._no_reinit  # type: ignore[attr-defined]
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.conv1d.bias is not None
    assert m.dt_rank == 4 and m.d_inner == 128


def test_init_with_constant_dt_and_floor() -> None:
    m = Mamba(16, d_state=4, dt_init="constant", dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    assert torch.allclose(m.dt_proj.weight, torch.ones_like(m.dt_proj.weight))
    assert torch.allclose(F.softplus(m.dt_proj.bias.detach()), torch.full((32,), 1e-4), rtol=1e-3)
    with pytest.raises(NotImplementedError):
        Mamba(16, dt_init="bogus")


def test_seeded_init_is_deterministic() -> None:
    torch.manual_seed(7)
    a = Mamba(32, d_state=8).state_dict()
    torch.manual_seed(7)
    b = Mamba(32, d_state=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("L", "chunk_size"), [(64, 16), (67, None), (2, None)])
def test_module_chunked_matches_reference_fp64(L: int, chunk_size: int | None) -> None:
    torch.manual_seed(0)
    ref = Mamba(16, d_state=8, backend="reference").double()
    mod = Mamba(16, d_state=8, backend="chunked", chunk_size=chunk_size).double()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, L, 16, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), mod(x2)
    assert y.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-12
    w = torch.randn_like(y)
    (y_ref * w).sum().backward()
    (y * w).sum().backward()
    assert rel_err(x2.grad, x1.grad) < 1e-10
    for (name, p_ref), p in zip(ref.named_parameters(), mod.parameters(), strict=True):
        assert rel_err(p.grad, p_ref.grad) < 1e-10, name


def test_module_fp32_in_fp32_out() -> None:
    m = Mamba(16, d_state=16)
    x = torch.randn(1, 10, 16)
    assert m(x).dtype == torch.float32


def test_causal_conv_matches_nn_conv1d() -> None:
    torch.manual_seed(0)
    for L in (1, 3, 9):
        conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).double()
        x = torch.randn(2, L, 6, dtype=torch.float64, requires_grad=True)
        expected = F.silu(conv(x.transpose(1, 2))[..., :L]).transpose(1, 2)
        got = mamba_mod._CausalConv1dSiLU.apply(x, conv.weight, conv.bias)
        assert rel_err(got, expected) < 1e-12
        assert torch.autograd.gradcheck(
            lambda a, w, bb: mamba_mod._CausalConv1dSiLU.apply(a, w, bb), (x, conv.weight, conv.bias)
        )


@pytest.mark.slow
def test_compiled_block_runs_the_scan_eagerly_and_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    block = Mamba(16, d_state=8, backend="chunked")
    x = torch.randn(2, 300, 16, requires_grad=True)
    eager = block(x)
    eager.square().sum().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in block.parameters())]

    def compiled_run() -> torch.Tensor:
        torch._dynamo.reset()
        x.grad = None
        block.zero_grad()
        out = torch.compile(block)(x)
        out.square().sum().backward()
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        for got, want in zip([x.grad, *(p.grad for p in block.parameters())], grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        return out

    monkeypatch.setattr(mamba_mod, "_eager_fns", {})
    compiled_run()  # the eager wrapper is made while dynamo traces the block
    assert mamba_mod.selective_scan in mamba_mod._eager_fns and mamba_mod.resolve_backend in mamba_mod._eager_fns
    calls = []

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return mamba_mod.selective_scan(*args, **kwargs)

    monkeypatch.setattr(mamba_mod, "_eager_fns", {mamba_mod.selective_scan: torch.compiler.disable(counted)})
    compiled_run()
    assert calls  # the compiled forward handed the scan to the eager path
