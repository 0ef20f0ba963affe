"""Triton selective scan (Mamba-1), forward and backward, chunk-parallel: the ``"triton"`` backend of
:func:`brats_core.nn.ops.selective_scan`.

Same semantics, arguments and (b, d, L) layout as mamba-ssm's ``selective_scan_fn`` (see
:func:`brats_core.nn.ops.selective_scan`), with ``softplus(delta + delta_bias)``, the ``D`` skip and the
``silu(z)`` gate fused into the kernels. The state is kept in fp32 registers and inputs of any float dtype are read
through their strides (the Mamba block passes transposed views of token-major tensors; nothing is copied).

Algorithm (the reduce-then-scan of :class:`~brats_core.nn.ops.ChunkedSelectiveScanFn`): the sequence is cut into
``nc`` chunks of ``T`` steps and every kernel runs on a grid of ``(chunk, d_inner block, batch)`` programs, each
holding a ``(BD, BN)`` fp32 state.

Forward:
  1. ``_chunk_state_kernel``: each chunk's end state started from zero, and its ``Σ dt`` (the chunk's total decay is
     ``exp(A · Σ dt)``).
  2. ``_carry_kernel``: a scan over chunks (parallel within tiles of 64 chunks, sequential across tiles) turns
     those into each chunk's exact carry-in state (saved for backward: ``b·nc·d·n`` floats).
  3. ``_chunk_scan_fwd_kernel``: every chunk re-run from its carry-in, emitting ``(Σ_n C·h + D·u) · silu(z)`` and
     the last state.

Backward (the adjoint ``G_t = ∂loss/∂h_t = gy_t ⊗ C_t + a_{t+1} ⊙ G_{t+1}`` is a reverse scan of the same form):
  1. ``_chunk_bwd_reduce_kernel``: from the carries, each chunk stores a state checkpoint every ``K ≈ √T`` steps and
     reduces the adjoint over the chunk (``Σ_t (Π_{s≤τ≤t} a_τ) ⊙ gy_t ⊗ C_t``, formed forward in time).
  2. ``_carry_kernel`` in reverse: the adjoint entering every chunk from its right.
  3. ``_chunk_scan_bwd_kernel``: per chunk, K-step blocks from last to first: the block's states are recomputed from
     its checkpoint into a small scratch (emitting ``dC`` and ``dz`` on the way), then walked backwards forming
     ``∂loss/∂(dt·A) = G_t ⊙ a_t ⊙ h_{t-1}`` directly (no cumulative-sum closed form, no telescoping: both lose fp32
     precision), and ``du, ddelta, dB`` per step, ``dA, dD`` per program.

Reductions across programs (``dB``/``dC`` over d-blocks, ``dA``/``dD`` over chunks and batch) go through small
per-program partial buffers summed by torch, so results are deterministic — except ``dB``/``dC`` with more than 8
d-blocks (the bottleneck), accumulated with fp32 atomics to keep those buffers (b, L, n)-sized. Extra memory:
forward ``b·nc·d·n`` floats; backward about ``b·d·n·L·(1/K + K/T)`` floats plus the (b, L, ·)-sized gradients — no
(L, d, n) tensor.

A kernel call that fails (e.g. a variant that does not compile on this GPU) makes ``brats_core.nn.ops.kernels`` fall
back to the chunked scan and retire this backend; in the backward the failing scan's gradients are recomputed with
the chunked scan, so a training step never dies of it.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported, CPU
tensors); that is how ``tests/test_triton_scan.py`` checks them against the fp64 reference.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ops.chunked import selective_scan_chunked

__all__ = ["TritonSelectiveScanFn", "backward_failed", "interpreter_active", "selective_scan_triton", "triton_plan"]

logger = logging.getLogger(__name__)

# Programs per launch the automatic chunking aims for: a few waves on a 132-SM H100, whatever d_inner is.
_TARGET_PROGRAMS = 4096
# Shorter chunks make the chunk reduction and carry passes dominate.
_MIN_CHUNK_LEN = 16
# fp32 state elements per program (BD · BN): registers for h, A, G and dA in the backward kernel.
_STATE_ELEMS = 1024
# Carry pass: chunks per associative-scan tile, and elements per (chunks × d·n) tile.
_CARRY_TILE = 64
_CARRY_TILE_ELEMS = 4096
# 4 warps spill on sm_90 in the scan of a 64 × 64 tile (255 registers); 8 warps need at most 148.
_CARRY_WARPS = 8
# Up to this many d-blocks dB/dC are reduced through deterministic per-block partial buffers, beyond atomically.
_MAX_PARTIAL_DBLK = 8


_backward_failures: list[str] = []


def backward_failed() -> bool:
    """Whether a backward kernel failed in this process (the backend then stops being selected)."""
    return bool(_backward_failures)


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _softplus_dt(delta_ptrs, bias, mask_d, SOFTPLUS: tl.constexpr):
    """dt = softplus(delta + bias) with mamba-ssm's threshold 20 (0 on masked rows); also returns delta + bias."""
    pre = tl.load(delta_ptrs, mask=mask_d, other=0.0).to(tl.float32) + bias
    if SOFTPLUS:
        e = tl.exp(tl.minimum(pre, 20.0))
        # log1p(e) without a log1p intrinsic (not in the interpreter): log(w)·e/(w − 1) with w = fl(1 + e) cancels
        # the rounding of 1 + e (Goldberg's trick), so small dt (IM-Fuse's start in [1e-3, 0.1]) keep fp32 accuracy
        w = 1.0 + e
        sp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
        dt = tl.where(pre > 20.0, pre, sp)
    else:
        dt = pre
    return tl.where(mask_d, dt, 0.0), pre


@triton.jit
def _seq_ptrs(ptr, pid_b, s_b, pid_blk, BLK: tl.constexpr, s_x, t0, s_l):
    """Pointers to element (pid_b, pid_blk·BLK + lane, t0) of a strided (b, ·, L) tensor, for the BLK lanes.

    All offsets are int64: strides fit in int32, but offset · stride of a (b, d, L)-contiguous input passes 2^31 once
    d·L ≥ 2^31 (as launched for IM-Fuse, this costs no registers: benchmarks/triton_compile_check.py).
    """
    base = pid_b * s_b + tl.cast(pid_blk * BLK, tl.int64) * s_x + t0 * s_l  # scalar: the block's first lane
    return ptr + base + tl.arange(0, BLK).to(tl.int64) * s_x


@triton.jit
def _chunk_state_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    bias_ptr,
    E_ptr,
    dtsum_ptr,
    L,
    d,
    n,
    T,
    su_b,
    su_d,
    su_l,
    sd_b,
    sd_d,
    sd_l,
    sB_b,
    sB_n,
    sB_l,
    SOFTPLUS: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
):
    """Forward phase 1: end state of every chunk from h = 0 → E (b, nc, d, n); Σ dt → dtsum (b, nc, d)."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    nc = tl.num_programs(0)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < d
    mask_n = offs_n < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A2 = tl.load(A_ptr + offs_d[:, None] * n + offs_n[None, :], mask=mask_dn, other=0.0) * 1.4426950408889634
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    t0 = pid_c.to(tl.int64) * T
    steps = tl.minimum(T, L - t0)
    u_p = _seq_ptrs(u_ptr, pid_b, su_b, pid_d, BD, su_d, t0, su_l)
    dl_p = _seq_ptrs(delta_ptr, pid_b, sd_b, pid_d, BD, sd_d, t0, sd_l)
    B_p = _seq_ptrs(B_ptr, pid_b, sB_b, 0, BN, sB_n, t0, sB_l)
    h = tl.zeros((BD, BN), dtype=tl.float32)
    dtsum = tl.zeros((BD,), dtype=tl.float32)
    for i in range(steps):
        dt, _ = _softplus_dt(dl_p + i * sd_l, bias, mask_d, SOFTPLUS)
        u = tl.load(u_p + i * su_l, mask=mask_d, other=0.0).to(tl.float32)
        Bt = tl.load(B_p + i * sB_l, mask=mask_n, other=0.0).to(tl.float32)
        h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
        dtsum += dt
    row = (pid_b * nc + pid_c) * d + offs_d
    tl.store(E_ptr + row[:, None] * n + offs_n[None, :], h, mask=mask_dn)
    tl.store(dtsum_ptr + row, dtsum, mask=mask_d)


@triton.jit
def _affine_combine(p1, e1, p2, e2):
    """Compose the affine maps x ↦ p1·x + e1 (earlier) and x ↦ p2·x + e2 (later)."""
    return p1 * p2, p2 * e1 + e2


@triton.jit
def _carry_kernel(
    E_ptr,
    dtsum_ptr,
    A_ptr,
    init_ptr,
    S_ptr,
    nc,
    dn,
    n,
    HAS_INIT: tl.constexpr,
    REVERSE: tl.constexpr,
    NCB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Phase 2: S[c] = the state entering chunk c, for E, S (b, nc, d·n) and dtsum (b, nc, d).

    Forward (chunks in order): S[0] = 0, S[c+1] = P[c] ⊙ S[c] + E[c] with P[c] = exp(A · dtsum[c]): the carry-in
    states. REVERSE (chunks from the last): S[nc-1] = init (or 0), S[c-1] = P[c] ⊙ S[c] + E[c]: the adjoint entering
    each chunk from its right. Tiles of NCB chunks are combined with a parallel associative scan of the affine maps,
    so the sequential part is nc / NCB steps rather than nc dependent loads.
    """
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dn
    A2 = tl.load(A_ptr + offs, mask=mask, other=0.0) * 1.4426950408889634
    dcol = offs // n
    d = dn // n
    if HAS_INIT:
        s = tl.load(init_ptr + pid_b * dn + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    first = nc - 1 if REVERSE else 0
    tl.store(S_ptr + (pid_b * nc + first) * dn + offs, s, mask=mask)
    rows = tl.arange(0, NCB)
    for tile in range(tl.cdiv(nc, NCB)):
        r = tile * NCB + rows  # position in processing order
        valid = r < nc
        c = (nc - 1 - r) if REVERSE else r
        base = pid_b * nc + c
        m2 = valid[:, None] & mask[None, :]
        e = tl.load(E_ptr + base[:, None] * dn + offs[None, :], mask=m2, other=0.0)
        dts = tl.load(dtsum_ptr + base[:, None] * d + dcol[None, :], mask=m2, other=0.0)
        p = tl.exp2(dts * A2[None, :])  # invalid rows: p = 1, e = 0 → identity maps
        cum_p, acc = tl.associative_scan((p, e), 0, _affine_combine)
        after = cum_p * s[None, :] + acc  # the state after processing chunk r
        nxt = (c - 1) if REVERSE else (c + 1)
        nvalid = (r + 1) < nc
        tl.store(S_ptr + (pid_b * nc + nxt)[:, None] * dn + offs[None, :], after, mask=nvalid[:, None] & mask[None, :])
        # identity rows past the end repeat the last valid state, so the tile's last row is the carry onwards
        s = tl.sum(tl.where(rows[:, None] == NCB - 1, after, 0.0), axis=0)


@triton.jit
def _chunk_scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    H0_ptr,
    out_ptr,
    last_ptr,
    L,
    d,
    n,
    T,
    su_b,
    su_d,
    su_l,
    sd_b,
    sd_d,
    sd_l,
    sB_b,
    sB_n,
    sB_l,
    sC_b,
    sC_n,
    sC_l,
    sz_b,
    sz_d,
    sz_l,
    so_b,
    so_d,
    so_l,
    HAS_H0: tl.constexpr,
    HAS_Z: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
):
    """Forward phase 3: every chunk from its carry-in; out_t = (Σ_n C_t·h_t + D·u_t)·silu(z_t); last state."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    nc = tl.num_programs(0)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < d
    mask_n = offs_n < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A2 = tl.load(A_ptr + offs_d[:, None] * n + offs_n[None, :], mask=mask_dn, other=0.0) * 1.4426950408889634
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    t0 = pid_c.to(tl.int64) * T
    steps = tl.minimum(T, L - t0)
    state_off = ((pid_b * nc + pid_c) * d + offs_d)[:, None] * n + offs_n[None, :]
    h = tl.load(H0_ptr + state_off, mask=mask_dn, other=0.0) if HAS_H0 else tl.zeros((BD, BN), dtype=tl.float32)
    u_p = _seq_ptrs(u_ptr, pid_b, su_b, pid_d, BD, su_d, t0, su_l)
    dl_p = _seq_ptrs(delta_ptr, pid_b, sd_b, pid_d, BD, sd_d, t0, sd_l)
    B_p = _seq_ptrs(B_ptr, pid_b, sB_b, 0, BN, sB_n, t0, sB_l)
    C_p = _seq_ptrs(C_ptr, pid_b, sC_b, 0, BN, sC_n, t0, sC_l)
    z_p = _seq_ptrs(z_ptr, pid_b, sz_b, pid_d, BD, sz_d, t0, sz_l)
    o_p = _seq_ptrs(out_ptr, pid_b, so_b, pid_d, BD, so_d, t0, so_l)
    for i in range(steps):
        dt, _ = _softplus_dt(dl_p + i * sd_l, bias, mask_d, SOFTPLUS)
        u = tl.load(u_p + i * su_l, mask=mask_d, other=0.0).to(tl.float32)
        Bt = tl.load(B_p + i * sB_l, mask=mask_n, other=0.0).to(tl.float32)
        Ct = tl.load(C_p + i * sC_l, mask=mask_n, other=0.0).to(tl.float32)
        h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
        if HAS_Z:
            zt = tl.load(z_p + i * sz_l, mask=mask_d, other=0.0).to(tl.float32)
            y = y * zt * tl.sigmoid(zt)
        tl.store(o_p + i * so_l, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    if pid_c == nc - 1:
        tl.store(last_ptr + (pid_b * d + offs_d)[:, None] * n + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def _chunk_bwd_reduce_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    z_ptr,
    bias_ptr,
    gout_ptr,
    H0_ptr,
    ckpt_ptr,
    R_ptr,
    dtsum_ptr,
    L,
    d,
    n,
    T,
    K,
    NBLK,
    su_b,
    su_d,
    su_l,
    sd_b,
    sd_d,
    sd_l,
    sB_b,
    sB_n,
    sB_l,
    sC_b,
    sC_n,
    sC_l,
    sz_b,
    sz_d,
    sz_l,
    sg_b,
    sg_d,
    sg_l,
    HAS_H0: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_GOUT: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
):
    """Backward phase 1: checkpoints h_{t0+jK-1} (the state entering block j) → ckpt (b, nc, NBLK, d, n), the
    chunk's adjoint reduction R = Σ_t (Π_{s≤τ≤t} a_τ) ⊙ (gy_t ⊗ C_t) → R (b, nc, d, n), and Σ dt → dtsum (b, nc, d)."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    nc = tl.num_programs(0)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < d
    mask_n = offs_n < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn_off = offs_d[:, None] * n + offs_n[None, :]
    A2 = tl.load(A_ptr + dn_off, mask=mask_dn, other=0.0) * 1.4426950408889634
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    t0 = pid_c.to(tl.int64) * T
    steps = tl.minimum(T, L - t0)
    chunk = pid_b * nc + pid_c
    if HAS_H0:
        h = tl.load(H0_ptr + chunk * d * n + dn_off, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros((BD, BN), dtype=tl.float32)
    u_p = _seq_ptrs(u_ptr, pid_b, su_b, pid_d, BD, su_d, t0, su_l)
    dl_p = _seq_ptrs(delta_ptr, pid_b, sd_b, pid_d, BD, sd_d, t0, sd_l)
    B_p = _seq_ptrs(B_ptr, pid_b, sB_b, 0, BN, sB_n, t0, sB_l)
    C_p = _seq_ptrs(C_ptr, pid_b, sC_b, 0, BN, sC_n, t0, sC_l)
    z_p = _seq_ptrs(z_ptr, pid_b, sz_b, pid_d, BD, sz_d, t0, sz_l)
    g_p = _seq_ptrs(gout_ptr, pid_b, sg_b, pid_d, BD, sg_d, t0, sg_l)
    cum = tl.full((BD, BN), 1.0, dtype=tl.float32)
    red = tl.zeros((BD, BN), dtype=tl.float32)
    dtsum = tl.zeros((BD,), dtype=tl.float32)
    nblk = tl.cdiv(steps, K)
    for j in range(nblk):
        tl.store(ckpt_ptr + (chunk * NBLK + j) * d * n + dn_off, h, mask=mask_dn)
        for i in range(j * K, tl.minimum(j * K + K, steps)):
            dt, _ = _softplus_dt(dl_p + i * sd_l, bias, mask_d, SOFTPLUS)
            u = tl.load(u_p + i * su_l, mask=mask_d, other=0.0).to(tl.float32)
            Bt = tl.load(B_p + i * sB_l, mask=mask_n, other=0.0).to(tl.float32)
            a = tl.exp2(dt[:, None] * A2)
            h = a * h + (dt * u)[:, None] * Bt[None, :]
            dtsum += dt
            if HAS_GOUT:
                gy = tl.load(g_p + i * sg_l, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_Z:
                    zt = tl.load(z_p + i * sz_l, mask=mask_d, other=0.0).to(tl.float32)
                    gy = gy * zt * tl.sigmoid(zt)
                Ct = tl.load(C_p + i * sC_l, mask=mask_n, other=0.0).to(tl.float32)
                cum = cum * a
                red += cum * (gy[:, None] * Ct[None, :])
    tl.store(R_ptr + chunk * d * n + dn_off, red, mask=mask_dn)
    tl.store(dtsum_ptr + chunk * d + offs_d, dtsum, mask=mask_d)


@triton.jit
def _chunk_scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    gout_ptr,
    Gin_ptr,
    ckpt_ptr,
    scratch_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dBp_ptr,
    dCp_ptr,
    dAp_ptr,
    dDp_ptr,
    L,
    d,
    n,
    T,
    K,
    NBLK,
    su_b,
    su_d,
    su_l,
    sd_b,
    sd_d,
    sd_l,
    sB_b,
    sB_n,
    sB_l,
    sC_b,
    sC_n,
    sC_l,
    sz_b,
    sz_d,
    sz_l,
    sg_b,
    sg_d,
    sg_l,
    HAS_GIN: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_GOUT: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    ATOMIC: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
):
    """Backward phase 3. Outputs: du, ddelta, dz (b, L, d) fp32; dB/dC as per-d-block partials (b, n_dblk, L, n),
    or with ATOMIC accumulated into zeroed (b, L, n) buffers; dA partials (b, nc, d, n); dD partials (b, nc, d)."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    nc = tl.num_programs(0)
    ndb = tl.num_programs(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < d
    mask_n = offs_n < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn_off = offs_d[:, None] * n + offs_n[None, :]
    A = tl.load(A_ptr + dn_off, mask=mask_dn, other=0.0)
    A2 = A * 1.4426950408889634
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    t0 = pid_c.to(tl.int64) * T
    steps = tl.minimum(T, L - t0)
    chunk = pid_b * nc + pid_c
    prog = (chunk * ndb + pid_d).to(tl.int64)
    if HAS_GIN:
        G = tl.load(Gin_ptr + chunk * d * n + dn_off, mask=mask_dn, other=0.0)
    else:
        G = tl.zeros((BD, BN), dtype=tl.float32)
    u_p = _seq_ptrs(u_ptr, pid_b, su_b, pid_d, BD, su_d, t0, su_l)
    dl_p = _seq_ptrs(delta_ptr, pid_b, sd_b, pid_d, BD, sd_d, t0, sd_l)
    B_p = _seq_ptrs(B_ptr, pid_b, sB_b, 0, BN, sB_n, t0, sB_l)
    C_p = _seq_ptrs(C_ptr, pid_b, sC_b, 0, BN, sC_n, t0, sC_l)
    z_p = _seq_ptrs(z_ptr, pid_b, sz_b, pid_d, BD, sz_d, t0, sz_l)
    g_p = _seq_ptrs(gout_ptr, pid_b, sg_b, pid_d, BD, sg_d, t0, sg_l)
    # Token-major (b, L, d) gradient outputs and (b, n_dblk, L, n) partials.
    row_p = (pid_b * L + t0) * d + offs_d
    part_p = ((pid_b * ndb + pid_d) * L + t0) * n + offs_n if not ATOMIC else (pid_b * L + t0) * n + offs_n
    scr = scratch_ptr + prog * K * BD * BN + tl.arange(0, BD)[:, None] * BN + offs_n[None, :]
    dA_acc = tl.zeros((BD, BN), dtype=tl.float32)
    dD_acc = tl.zeros((BD,), dtype=tl.float32)
    nblk = tl.cdiv(steps, K)
    for jj in range(nblk):
        j = nblk - 1 - jj
        s0 = j * K
        s1 = tl.minimum(s0 + K, steps)
        h = tl.load(ckpt_ptr + (chunk * NBLK + j) * d * n + dn_off, mask=mask_dn, other=0.0)
        # Recompute the block's states forward; keep h_{t-1} per step; emit dC_t and dz_t, which need h_t / y_t.
        for i in range(s0, s1):
            tl.store(scr + (i - s0) * BD * BN, h)
            dt, _ = _softplus_dt(dl_p + i * sd_l, bias, mask_d, SOFTPLUS)
            u = tl.load(u_p + i * su_l, mask=mask_d, other=0.0).to(tl.float32)
            Bt = tl.load(B_p + i * sB_l, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
            if HAS_GOUT:
                g = tl.load(g_p + i * sg_l, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_Z:
                    zt = tl.load(z_p + i * sz_l, mask=mask_d, other=0.0).to(tl.float32)
                    sz = tl.sigmoid(zt)
                    gy = g * zt * sz
                    Ct = tl.load(C_p + i * sC_l, mask=mask_n, other=0.0).to(tl.float32)
                    y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
                    tl.store(dz_ptr + row_p + i * d, g * y * sz * (1.0 + zt * (1.0 - sz)), mask=mask_d)
                else:
                    gy = g
                dCt = tl.sum(h * gy[:, None], axis=0)
            else:
                dCt = tl.zeros((BN,), dtype=tl.float32)
            if ATOMIC:
                tl.atomic_add(dCp_ptr + part_p + i * n, dCt, mask=mask_n)
            else:
                tl.store(dCp_ptr + part_p + i * n, dCt, mask=mask_n)
        tl.debug_barrier()
        # Walk the block backwards: G = G_t after adding gy_t ⊗ C_t; ∂loss/∂(dt_t·A) = G_t ⊙ a_t ⊙ h_{t-1}.
        for ii in range(s1 - s0):
            i = s1 - 1 - ii
            hprev = tl.load(scr + (i - s0) * BD * BN)
            dt, pre = _softplus_dt(dl_p + i * sd_l, bias, mask_d, SOFTPLUS)
            u = tl.load(u_p + i * su_l, mask=mask_d, other=0.0).to(tl.float32)
            Bt = tl.load(B_p + i * sB_l, mask=mask_n, other=0.0).to(tl.float32)
            a = tl.exp2(dt[:, None] * A2)
            if HAS_GOUT:
                gy = tl.load(g_p + i * sg_l, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_Z:
                    zt = tl.load(z_p + i * sz_l, mask=mask_d, other=0.0).to(tl.float32)
                    gy = gy * zt * tl.sigmoid(zt)
                Ct = tl.load(C_p + i * sC_l, mask=mask_n, other=0.0).to(tl.float32)
                G += gy[:, None] * Ct[None, :]
            else:
                gy = tl.zeros((BD,), dtype=tl.float32)
            s1v = tl.sum(G * Bt[None, :], axis=1)
            dBt = tl.sum(G * (dt * u)[:, None], axis=0)
            if ATOMIC:
                tl.atomic_add(dBp_ptr + part_p + i * n, dBt, mask=mask_n)
            else:
                tl.store(dBp_ptr + part_p + i * n, dBt, mask=mask_n)
            q = G * a * hprev
            dA_acc += q * dt[:, None]
            ddt = u * s1v + tl.sum(q * A, axis=1)
            if SOFTPLUS:
                # softplus'(x) = sigmoid(x) below the threshold; 1 above, where the kernel returns x itself.
                ddt = ddt * tl.where(pre > 20.0, 1.0, tl.sigmoid(pre))
            tl.store(du_ptr + row_p + i * d, dt * s1v + Dv * gy, mask=mask_d)
            tl.store(ddelta_ptr + row_p + i * d, ddt, mask=mask_d)
            dD_acc += gy * u
            G = G * a
        tl.debug_barrier()
    tl.store(dAp_ptr + chunk * d * n + dn_off, dA_acc, mask=mask_dn)
    tl.store(dDp_ptr + chunk * d + offs_d, dD_acc, mask=mask_d)


# ---------------------------------------------------------------------------------------------------------------------
# Launch plan and autograd Function
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonPlan:
    """Launch geometry: ``nc`` chunks of ``T`` steps (the last may be shorter), backward checkpoints every ``K``
    steps (``nblk`` per chunk), state tiles of ``BD × BN`` (``BN = next_pow2(n)``), ``n_dblk`` d-blocks; warps per
    program (``bwd_num_warps`` for the backward scan kernel)."""

    nc: int
    T: int
    K: int
    nblk: int
    BD: int
    BN: int
    n_dblk: int
    num_warps: int
    bwd_num_warps: int


def triton_plan(b: int, d: int, n: int, L: int, chunk_size: int | None = None) -> TritonPlan:
    """Choose the chunking and tiling for a (b, d, n, L) scan.

    Args:
        b, d, n, L: batch, d_inner, d_state, sequence length.
        chunk_size: Chunk length T; ``None`` aims at ~4096 programs per launch with chunks of at least 16 steps.
    """
    BN = triton.next_power_of_2(n)
    BD = max(1, min(triton.next_power_of_2(d), _STATE_ELEMS // BN))
    n_dblk = triton.cdiv(d, BD)
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        T = min(chunk_size, L)
    else:
        nc = max(1, min(triton.cdiv(L, _MIN_CHUNK_LEN), triton.cdiv(_TARGET_PROGRAMS, b * n_dblk)))
        T = triton.cdiv(L, nc)
    nc = triton.cdiv(L, T)
    K = max(1, math.isqrt(T))
    nblk = triton.cdiv(T, K)
    num_warps = 4 if BD * BN >= 512 else (2 if BD * BN >= 128 else 1)
    # The backward scan keeps six state-sized tiles live: at 1024 elements 4 warps need 216–247 registers per thread
    # (ptxas, sm_80 and sm_90, as launched for IM-Fuse), 8 warps 191–206 (benchmarks/triton_compile_check.py).
    bwd_num_warps = 8 if BD * BN >= _STATE_ELEMS else num_warps
    return TritonPlan(nc, T, K, nblk, BD, BN, n_dblk, num_warps, bwd_num_warps)


def _device_of(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Triton launches on the current CUDA device: make it ``t``'s (a no-op on CPU under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides3(t: Tensor) -> tuple[int, int, int]:
    s = t.stride()
    return s[0], s[1], s[2]


def _vec(t: Tensor | None, d: int, like: Tensor) -> Tensor:
    """A (d,) fp32 contiguous vector (zeros for None): D and delta_bias are tiny, so copies cost nothing."""
    if t is None:
        return torch.zeros(d, dtype=torch.float32, device=like.device)
    return t.detach().to(torch.float32).contiguous()


class TritonSelectiveScanFn(torch.autograd.Function):
    """Selective scan with Triton forward and backward kernels (see the module docstring); fp32 state and
    accumulation whatever the input dtype (fp64 inputs are computed in fp32)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        delta_softplus: bool,
        return_last_state: bool,
        chunk_size: int | None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        b, d, L = u.shape
        n = A.shape[1]
        plan = triton_plan(b, d, n, L, chunk_size)
        dev = u.device
        A32 = A.detach().to(torch.float32).contiguous()
        D32, bias32 = _vec(D, d, u), _vec(delta_bias, d, u)
        grid = (plan.nc, plan.n_dblk, b)
        meta = {"BD": plan.BD, "BN": plan.BN, "num_warps": plan.num_warps}
        carries = None
        if plan.nc > 1:
            carries = torch.empty(b, plan.nc, d, n, dtype=torch.float32, device=dev)
            dtsum = torch.empty(b, plan.nc, d, dtype=torch.float32, device=dev)
            _chunk_state_kernel[grid](
                u, delta, A32, B, bias32, carries, dtsum, L, d, n, plan.T,
                *_strides3(u), *_strides3(delta), *_strides3(B),
                SOFTPLUS=delta_softplus, **meta,
            )  # fmt: skip
            carries = _launch_carry(carries, dtsum, A32, None, reverse=False)
            del dtsum
        out_t = torch.empty(b, L, d, dtype=u.dtype, device=dev)  # token-major, returned as a (b, d, L) view
        out = out_t.transpose(1, 2)
        last = torch.empty(b, d, n, dtype=torch.float32, device=dev)
        zz = z if z is not None else u
        _chunk_scan_fwd_kernel[grid](
            u, delta, A32, B, C, D32, zz, bias32, carries if carries is not None else last, out, last,
            L, d, n, plan.T,
            *_strides3(u), *_strides3(delta), *_strides3(B), *_strides3(C), *_strides3(zz), *_strides3(out),
            HAS_H0=carries is not None, HAS_Z=z is not None, SOFTPLUS=delta_softplus, **meta,
        )  # fmt: skip
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, carries)
        ctx.plan = plan
        ctx.delta_softplus = delta_softplus
        ctx.return_last_state = return_last_state
        return (out, last) if return_last_state else out

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        try:
            with _device_of(ctx.saved_tensors[0]):
                return TritonSelectiveScanFn._backward(ctx, *grads)
        except torch.OutOfMemoryError:
            raise  # too big for the GPU, not a broken kernel
        except Exception as exc:
            # A kernel variant that fails to compile here (after the forward ran) must not kill a training run:
            # recompute this scan's gradients with the chunked backend, and stop using Triton from now on.
            if not _backward_failures:
                logger.warning(
                    "Triton scan backward failed (%s: %s); these gradients come from the 'chunked' scan and the "
                    "Triton backend is no longer selected",
                    type(exc).__name__,
                    exc,
                )
            _backward_failures.append(type(exc).__name__)
            return _chunked_backward(ctx, *grads)

    @staticmethod
    def _backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, carries = ctx.saved_tensors
        plan: TritonPlan = ctx.plan
        b, d, L = u.shape
        n = A.shape[1]
        dev = u.device
        gout = grads[0]
        glast = grads[1] if ctx.return_last_state else None
        A32 = A.detach().to(torch.float32).contiguous()
        D32, bias32 = _vec(D, d, u), _vec(delta_bias, d, u)
        grid = (plan.nc, plan.n_dblk, b)
        meta = {"BD": plan.BD, "BN": plan.BN, "num_warps": plan.num_warps}
        zz = z if z is not None else u
        gg = gout if gout is not None else u
        f32 = {"dtype": torch.float32, "device": dev}

        ckpt = torch.empty(b, plan.nc, plan.nblk, d, n, **f32)
        gin = torch.empty(b, plan.nc, d, n, **f32)  # R; the carry pass turns it into the adjoint entering each chunk
        dtsum = torch.empty(b, plan.nc, d, **f32)
        _chunk_bwd_reduce_kernel[grid](
            u, delta, A32, B, C, zz, bias32, gg, carries if carries is not None else gin, ckpt, gin, dtsum,
            L, d, n, plan.T, plan.K, plan.nblk,
            *_strides3(u), *_strides3(delta), *_strides3(B), *_strides3(C), *_strides3(zz), *_strides3(gg),
            HAS_H0=carries is not None, HAS_Z=z is not None, HAS_GOUT=gout is not None,
            SOFTPLUS=ctx.delta_softplus, **meta,
        )  # fmt: skip
        init = glast.detach().to(torch.float32).contiguous() if glast is not None else None
        gin = _launch_carry(gin, dtsum, A32, init, reverse=True)
        del dtsum

        scratch = torch.empty(plan.nc * plan.n_dblk * b * plan.K * plan.BD * plan.BN, **f32)
        du = torch.empty(b, L, d, **f32)
        ddelta = torch.empty(b, L, d, **f32)
        dz = torch.empty(b, L, d, **f32) if z is not None and gout is not None else du
        # Per-d-block partials are deterministic but cost b·n_dblk·L·n floats each: with many d-blocks (the
        # bottleneck: 256) accumulate atomically instead.
        atomic = plan.n_dblk > _MAX_PARTIAL_DBLK
        if atomic:
            dB_part = torch.zeros(b, 1, L, n, **f32)
            dC_part = torch.zeros(b, 1, L, n, **f32)
        else:
            dB_part = torch.empty(b, plan.n_dblk, L, n, **f32)
            dC_part = torch.empty(b, plan.n_dblk, L, n, **f32)
        dA_part = torch.empty(b, plan.nc, d, n, **f32)
        dD_part = torch.empty(b, plan.nc, d, **f32)
        _chunk_scan_bwd_kernel[grid](
            u, delta, A32, B, C, D32, zz, bias32, gg, gin, ckpt, scratch,
            du, ddelta, dz, dB_part, dC_part, dA_part, dD_part,
            L, d, n, plan.T, plan.K, plan.nblk,
            *_strides3(u), *_strides3(delta), *_strides3(B), *_strides3(C), *_strides3(zz), *_strides3(gg),
            HAS_GIN=True, HAS_Z=z is not None, HAS_GOUT=gout is not None,
            SOFTPLUS=ctx.delta_softplus, ATOMIC=atomic, **(meta | {"num_warps": plan.bwd_num_warps}),
        )  # fmt: skip
        del ckpt, gin, scratch
        needs = ctx.needs_input_grad

        def cast(g: Tensor, ref: Tensor | None, idx: int) -> Tensor | None:
            return g.to(ref.dtype) if ref is not None and needs[idx] else None

        return (
            cast(du.transpose(1, 2), u, 0),
            cast(ddelta.transpose(1, 2), delta, 1),
            cast(dA_part.sum((0, 1)), A, 2),
            cast(dB_part.sum(1).transpose(1, 2), B, 3),
            cast(dC_part.sum(1).transpose(1, 2), C, 4),
            cast(dD_part.sum((0, 1)), D, 5),
            cast(dz.transpose(1, 2), z, 6) if gout is not None else None,
            cast(ddelta.sum((0, 1)), delta_bias, 7),
            None,
            None,
            None,
        )


def _chunked_backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """Gradients of the scan saved in ``ctx`` through the chunked PyTorch backend (fallback path)."""
    u, delta, A, B, C, D, z, delta_bias, _ = ctx.saved_tensors
    inputs = [u, delta, A, B, C, D, z, delta_bias]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    with torch.enable_grad():
        res = selective_scan_chunked(
            *leaves,
            ctx.delta_softplus,
            ctx.return_last_state,
            None,  # type: ignore[arg-type]
        )
        outs = list(res) if isinstance(res, tuple) else [res]
        pairs = [(o, g) for o, g in zip(outs, grads, strict=False) if g is not None]
        wanted = [t for t, need in zip(leaves, ctx.needs_input_grad[:8], strict=True) if t is not None and need]
        got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    it = iter(got)
    result: list[Tensor | None] = [
        next(it) if t is not None and need else None for t, need in zip(leaves, ctx.needs_input_grad[:8], strict=True)
    ]
    return (*result, None, None, None)


def _launch_carry(E: Tensor, dtsum: Tensor, A32: Tensor, init: Tensor | None, reverse: bool) -> Tensor:
    """Phase 2 (see ``_carry_kernel``): the (b, nc, d, n) states entering each chunk (reverse: from its right)."""
    b, nc, d, n = E.shape
    dn = d * n
    out = torch.empty_like(E)
    ncb = min(_CARRY_TILE, triton.next_power_of_2(nc))
    block = max(1, min(triton.next_power_of_2(dn), _CARRY_TILE_ELEMS // ncb))
    _carry_kernel[(triton.cdiv(dn, block), b)](
        E, dtsum, A32, init if init is not None else E, out, nc, dn, n,
        HAS_INIT=init is not None, REVERSE=reverse, NCB=ncb, BLOCK=block, num_warps=_CARRY_WARPS,
    )  # fmt: skip
    return out


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    return_last_state: bool = False,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton backend; arguments, shapes and returns as :func:`brats_core.nn.ops.selective_scan`.

    ``chunk_size`` is the chunk length T (``None``: automatic, see :func:`triton_plan`). Tensors must be on CUDA, or
    on CPU with Triton's interpreter active. The last state is fp32.
    """
    if not (u.is_cuda or (u.device.type == "cpu" and interpreter_active())):
        raise RuntimeError(
            f"the Triton selective scan needs CUDA tensors (or TRITON_INTERPRET=1 for CPU); got {u.device}"
        )
    with _device_of(u):
        return TritonSelectiveScanFn.apply(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size
        )
