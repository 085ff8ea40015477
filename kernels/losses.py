"""Triton kernels for the consistency-model losses: pseudo-Huber, sCM and MeanFlow.

Layout: every per-element input is contiguous and viewed as (B, D); per-sample parameters are
contiguous (B,) tensors in the compute dtype. A forward is one streaming pass: a 1-D grid of
(chunk, sample) programs (_chunk_and_sample), each looping over `blocks_per_chunk` blocks of one sample and writing
its partial per-sample sums, then a one-program epilogue that adds the partials in a fixed order
(deterministic, no atomics), evaluates the per-sample loss, saves the few per-sample numbers the
backward needs and applies the batch reduction.

Backward, two designs. Without a saved tensor, one elementwise pass rebuilds the per-element term
from all the inputs and those per-sample numbers (pseudo-Huber; the fallbacks below). When the
forward saved the per-element residual (one N-element tensor), the backward reads only that
residual: grad = G_b·coef_b·residual, one read and one write. The residual is kept in the compute
dtype: a 16-bit residual would round the gradient twice (residual, then output), which can exceed
the bf16/fp16 gradient tolerance (it does in the Triton interpreter, whose 16-bit stores round
toward zero). So it is saved only where its write + read costs fewer bytes than the k inputs
the backward would otherwise re-read (residual_pays): sCM (k = 5) in every dtype, MeanFlow (k = 3)
in float32 and float64 but not bf16/fp16 (8 bytes written and read against 6 re-read).

MeanFlow saves e = u − u_tgt from its streaming pass: e does not depend on the per-sample weight.

The sCM residual F − F⁻ − g/(‖g‖+c) does depend on the per-sample ‖g‖, so it can only be written
once the sample's reduction is done. Where a sample fits on chip (SCM_ON_CHIP_ELEMENTS), one
program holds the whole sample in registers: it loads the five inputs once, reduces ‖g‖², and
writes the final residual from registers. Larger samples use the streaming pass, which assembles
‖F − F⁻ − ĝ‖² from ‖Δ‖², ⟨Δ,g⟩ and ‖g‖² (Δ = F − F⁻) so the inputs are read once, and a backward
that re-reads all five inputs; in the usual sCM setting F⁻ is F detached, Δ = 0 and the expansion
is exact.

The upstream gradient is a 0-d tensor (mean, sum) or a (B,) tensor (none), read with its stride
(0 for a scalar) and multiplied by `grad_scale` (1/B for mean).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, compute_type, float_param, per_sample_blocks

BLOCK = 2048
NUM_WARPS = 8
# Enough (chunk, sample) programs to fill a GPU when B is small; B·chunks ≥ TARGET_PROGRAMS
# when the samples are large enough.
TARGET_PROGRAMS = 1024
EPILOGUE_TILE = 2048
# Largest sCM sample (elements) held in one program's registers: at the launch's 16 warps the five
# inputs then take 80 and the two live fp32 arrays (Δ, g) 32 of a thread's 128 registers. Halved
# for float64. A 4x128x128 sample (64K fp32 elements, 512 KiB for Δ and g) would not fit even in an
# SM's whole register file (256 KiB) or shared memory (228 KiB).
SCM_ON_CHIP_ELEMENTS = 8192
ON_CHIP_NUM_WARPS = 16
TANGENT_NORM_IDS = {"none": 0, "l2": 1, "rms": 2}
REDUCTION_IDS = {"none": 0, "mean": 1, "sum": 2}


@triton.jit
def _chunk_columns(block_index, per_sample, BLOCK_SIZE: tl.constexpr):
    cols = block_index * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    return cols, cols < per_sample


@triton.jit
def _chunk_and_sample(n_chunks):
    """This program's (chunk, sample) in the 1-D grid of n_chunks·B programs, a sample's chunks
    adjacent. One axis because CUDA caps grid axes 1 and 2 at 65535, too few for a batch."""
    program = tl.program_id(0)
    return program % n_chunks, program // n_chunks


@triton.jit
def _upstream_grad(grad_ptr, grad_stride, grad_scale, sample, COMPUTE: tl.constexpr):
    return tl.load(grad_ptr + sample * grad_stride).to(COMPUTE) * float_param(grad_scale, COMPUTE)


@triton.jit
def _write_loss(out_ptr, rows, row_mask, loss, total, REDUCTION: tl.constexpr):
    if REDUCTION == 0:
        tl.store(out_ptr + rows, loss.to(out_ptr.dtype.element_ty), mask=row_mask)
        return total
    return total + tl.where(row_mask, loss, 0.0)


@triton.jit
def _finish_reduction(out_ptr, total, batch, REDUCTION: tl.constexpr):
    if REDUCTION == 1:
        tl.store(out_ptr, (tl.sum(total, axis=0) / batch).to(out_ptr.dtype.element_ty))
    if REDUCTION == 2:
        tl.store(out_ptr, tl.sum(total, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def _sum_partials(partial_ptr, rows, row_mask, n_chunks, BLOCK_C: tl.constexpr):
    cols = tl.arange(0, BLOCK_C)
    mask = row_mask[:, None] & (cols[None, :] < n_chunks)
    return tl.sum(tl.load(partial_ptr + rows[:, None] * n_chunks + cols[None, :], mask=mask, other=0.0), axis=1)


@triton.jit
def _residual_bwd_kernel(
    residual_ptr,
    grad_ptr,
    grad_stride,
    grad_scale: tl.float64,
    coef_ptr,
    grad_x_ptr,
    per_sample,
    blocks_per_chunk,
    n_chunks,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """grad = G_b·grad_scale·coef_b·residual: the backward of a loss whose forward saved its residual."""
    chunk, sample = _chunk_and_sample(n_chunks)
    base = sample.to(tl.int64) * per_sample
    coef = _upstream_grad(grad_ptr, grad_stride, grad_scale, sample, COMPUTE) * tl.load(coef_ptr + sample)
    for i in range(blocks_per_chunk):
        cols, mask = _chunk_columns(chunk * blocks_per_chunk + i, per_sample, BLOCK_SIZE)
        residual = tl.load(residual_ptr + base + cols, mask=mask).to(COMPUTE)
        tl.store(grad_x_ptr + base + cols, (coef * residual).to(grad_x_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- pseudo-Huber


@triton.jit
def _huber_partial_kernel(
    x_ptr, y_ptr, partial_ptr, per_sample, blocks_per_chunk, n_chunks, COMPUTE: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    chunk, sample = _chunk_and_sample(n_chunks)
    base = sample.to(tl.int64) * per_sample
    acc = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    for i in range(blocks_per_chunk):
        cols, mask = _chunk_columns(chunk * blocks_per_chunk + i, per_sample, BLOCK_SIZE)
        diff = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(COMPUTE) - tl.load(
            y_ptr + base + cols, mask=mask, other=0.0
        ).to(COMPUTE)
        acc += diff * diff
    tl.store(partial_ptr + sample * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _huber_epilogue_kernel(
    partial_ptr,
    weight_ptr,
    distance_ptr,
    inv_root_ptr,
    out_ptr,
    batch,
    n_chunks,
    c: tl.float64,
    HAS_WEIGHT: tl.constexpr,
    REDUCTION: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = float_param(c, COMPUTE)
    total = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for start in range(0, batch, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_mask = rows < batch
        sq_dist = _sum_partials(partial_ptr, rows, row_mask, n_chunks, BLOCK_C)
        root = tl.sqrt(sq_dist + c * c)
        # √(s + c²) − c written as s / (√(s + c²) + c): no cancellation when s ≪ c². With c = 0 (ECT's √L)
        # a zero distance gets distance 0 and gradient 0 instead of 0/0.
        positive = root > 0
        safe_root = tl.where(positive, root, 1.0)
        distance = tl.where(positive, sq_dist / (safe_root + c), 0.0)
        tl.store(distance_ptr + rows, distance, mask=row_mask)
        tl.store(inv_root_ptr + rows, tl.where(positive, 1.0 / safe_root, 0.0), mask=row_mask)
        loss = distance
        if HAS_WEIGHT:
            loss = loss * tl.load(weight_ptr + rows, mask=row_mask, other=0.0)
        total = _write_loss(out_ptr, rows, row_mask, loss, total, REDUCTION)
    _finish_reduction(out_ptr, total, batch, REDUCTION)


@triton.jit
def _huber_bwd_kernel(
    x_ptr,
    y_ptr,
    grad_ptr,
    grad_stride,
    grad_scale: tl.float64,
    weight_ptr,
    inv_root_ptr,
    grad_x_ptr,
    grad_y_ptr,
    per_sample,
    blocks_per_chunk,
    n_chunks,
    HAS_WEIGHT: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_Y: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    chunk, sample = _chunk_and_sample(n_chunks)
    base = sample.to(tl.int64) * per_sample
    coef = _upstream_grad(grad_ptr, grad_stride, grad_scale, sample, COMPUTE) * tl.load(inv_root_ptr + sample)
    if HAS_WEIGHT:
        coef = coef * tl.load(weight_ptr + sample)
    for i in range(blocks_per_chunk):
        cols, mask = _chunk_columns(chunk * blocks_per_chunk + i, per_sample, BLOCK_SIZE)
        grad = coef * (
            tl.load(x_ptr + base + cols, mask=mask).to(COMPUTE) - tl.load(y_ptr + base + cols, mask=mask).to(COMPUTE)
        )
        if NEED_X:
            tl.store(grad_x_ptr + base + cols, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if NEED_Y:
            tl.store(grad_y_ptr + base + cols, (-grad).to(grad_y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- sCM


@triton.jit
def _scm_tangent_block(
    fm_ptr, fj_ptr, xt_ptr, dxdt_ptr, offsets, mask, cos_t, sin_t, r, sigma_data, COMPUTE: tl.constexpr
):
    """g = −cos²t·(σd·F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + σd·F_jvp), zero where masked."""
    f_minus = tl.load(fm_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    f_jvp = tl.load(fj_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    x_t = tl.load(xt_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    dx_dt = tl.load(dxdt_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    g = -cos_t * cos_t * (sigma_data * f_minus - dx_dt) - r * (cos_t * sin_t * x_t + sigma_data * f_jvp)
    return g, f_minus


@triton.jit
def _scm_partial_kernel(
    f_ptr,
    fm_ptr,
    fj_ptr,
    xt_ptr,
    dxdt_ptr,
    t_ptr,
    r_ptr,
    gg_ptr,
    dg_ptr,
    dd_ptr,
    per_sample,
    blocks_per_chunk,
    n_chunks,
    sigma_data: tl.float64,
    HAS_F: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    chunk, sample = _chunk_and_sample(n_chunks)
    base = sample.to(tl.int64) * per_sample
    sigma_data = float_param(sigma_data, COMPUTE)
    t = tl.load(t_ptr + sample)
    cos_t = tl.cos(t)
    sin_t = tl.sin(t)
    r = tl.load(r_ptr + sample)
    acc_gg = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    acc_dg = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    acc_dd = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    for i in range(blocks_per_chunk):
        cols, mask = _chunk_columns(chunk * blocks_per_chunk + i, per_sample, BLOCK_SIZE)
        g, f_minus = _scm_tangent_block(
            fm_ptr, fj_ptr, xt_ptr, dxdt_ptr, base + cols, mask, cos_t, sin_t, r, sigma_data, COMPUTE
        )
        acc_gg += g * g
        if HAS_F:
            delta = tl.load(f_ptr + base + cols, mask=mask, other=0.0).to(COMPUTE) - f_minus
            acc_dg += delta * g
            acc_dd += delta * delta
    slot = sample * n_chunks + chunk
    tl.store(gg_ptr + slot, tl.sum(acc_gg, axis=0))
    if HAS_F:
        tl.store(dg_ptr + slot, tl.sum(acc_dg, axis=0))
        tl.store(dd_ptr + slot, tl.sum(acc_dd, axis=0))


@triton.jit
def _scm_on_chip_kernel(
    f_ptr,
    fm_ptr,
    fj_ptr,
    xt_ptr,
    dxdt_ptr,
    t_ptr,
    r_ptr,
    gg_ptr,
    rr_ptr,
    residual_ptr,
    per_sample,
    sigma_data: tl.float64,
    tangent_norm_c: tl.float64,
    TANGENT_NORM: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per sample, the whole sample in registers: writes ‖g‖², ‖F − F⁻ − ĝ‖² and the
    residual F − F⁻ − ĝ itself, which needs ‖g‖ first and so cannot be streamed out."""
    sample = tl.program_id(0)
    base = sample.to(tl.int64) * per_sample
    sigma_data = float_param(sigma_data, COMPUTE)
    tangent_norm_c = float_param(tangent_norm_c, COMPUTE)
    t = tl.load(t_ptr + sample)
    cols, mask = _chunk_columns(0, per_sample, BLOCK_SIZE)
    g, f_minus = _scm_tangent_block(
        fm_ptr,
        fj_ptr,
        xt_ptr,
        dxdt_ptr,
        base + cols,
        mask,
        tl.cos(t),
        tl.sin(t),
        tl.load(r_ptr + sample),
        sigma_data,
        COMPUTE,
    )
    delta = tl.load(f_ptr + base + cols, mask=mask, other=0.0).to(COMPUTE) - f_minus
    gg = tl.sum(g * g, axis=0)
    residual = delta - _scm_norm_scale(gg, per_sample, tangent_norm_c, TANGENT_NORM) * g
    tl.store(residual_ptr + base + cols, residual.to(residual_ptr.dtype.element_ty), mask=mask)
    tl.store(gg_ptr + sample, gg)
    tl.store(rr_ptr + sample, tl.sum(residual * residual, axis=0))


@triton.jit
def _scm_norm_scale(gg, per_sample, tangent_norm_c, TANGENT_NORM: tl.constexpr):
    """k with ĝ = k·g: 1/(‖g‖ + c) (l2), 1/(‖g‖/√D + c) (rms), 1 (none)."""
    if TANGENT_NORM == 0:
        return gg * 0.0 + 1.0
    if TANGENT_NORM == 1:
        return 1.0 / (tl.sqrt(gg) + tangent_norm_c)
    return 1.0 / (tl.sqrt(gg / per_sample) + tangent_norm_c)


@triton.jit
def _scm_epilogue_kernel(
    gg_ptr,
    dg_ptr,
    dd_ptr,
    weight_ptr,
    logvar_ptr,
    stats_ptr,
    out_ptr,
    batch,
    n_chunks,
    per_sample,
    tangent_norm_c: tl.float64,
    HAS_WEIGHT: tl.constexpr,
    HAS_LOGVAR: tl.constexpr,
    RESIDUAL_SUM: tl.constexpr,
    TANGENT_NORM: tl.constexpr,
    REDUCTION: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """stats rows: 0 k (ĝ = k·g), 1 scale = w·e^{−logvar}, 2 mse = ‖Δ − ĝ‖²/D.
    RESIDUAL_SUM: dd already holds ‖Δ − ĝ‖² (the on-chip pass); dg is not read."""
    tangent_norm_c = float_param(tangent_norm_c, COMPUTE)
    total = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for start in range(0, batch, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_mask = rows < batch
        gg = _sum_partials(gg_ptr, rows, row_mask, n_chunks, BLOCK_C)
        dd = _sum_partials(dd_ptr, rows, row_mask, n_chunks, BLOCK_C)
        k = _scm_norm_scale(gg, per_sample, tangent_norm_c, TANGENT_NORM)
        if RESIDUAL_SUM:
            mse = dd / per_sample
        else:
            dg = _sum_partials(dg_ptr, rows, row_mask, n_chunks, BLOCK_C)
            # ‖Δ − k·g‖² ≥ 0; the clamp only removes rounding below zero when Δ ≈ ĝ.
            mse = tl.maximum(dd - 2.0 * k * dg + k * k * gg, 0.0) / per_sample
        scale = tl.zeros([BLOCK_B], dtype=COMPUTE) + 1.0
        if HAS_WEIGHT:
            scale = tl.load(weight_ptr + rows, mask=row_mask, other=0.0)
        loss = scale * mse
        if HAS_LOGVAR:
            logvar = tl.load(logvar_ptr + rows, mask=row_mask, other=0.0)
            scale = scale * tl.exp(-logvar)
            loss = scale * mse + logvar
        tl.store(stats_ptr + rows, k, mask=row_mask)
        tl.store(stats_ptr + batch + rows, scale, mask=row_mask)
        tl.store(stats_ptr + 2 * batch + rows, mse, mask=row_mask)
        total = _write_loss(out_ptr, rows, row_mask, loss, total, REDUCTION)
    _finish_reduction(out_ptr, total, batch, REDUCTION)


@triton.jit
def _scm_tangent_epilogue_kernel(
    gg_ptr,
    k_ptr,
    batch,
    n_chunks,
    per_sample,
    tangent_norm_c: tl.float64,
    TANGENT_NORM: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tangent_norm_c = float_param(tangent_norm_c, COMPUTE)
    for start in range(0, batch, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_mask = rows < batch
        gg = _sum_partials(gg_ptr, rows, row_mask, n_chunks, BLOCK_C)
        tl.store(k_ptr + rows, _scm_norm_scale(gg, per_sample, tangent_norm_c, TANGENT_NORM), mask=row_mask)


@triton.jit
def _scm_apply_kernel(
    f_ptr,
    fm_ptr,
    fj_ptr,
    xt_ptr,
    dxdt_ptr,
    t_ptr,
    r_ptr,
    stats_ptr,
    grad_ptr,
    grad_stride,
    grad_scale: tl.float64,
    out_ptr,
    batch,
    per_sample,
    blocks_per_chunk,
    n_chunks,
    sigma_data: tl.float64,
    IS_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """IS_GRAD: out = ∂loss/∂F = G·scale·(2/D)·(F − F⁻ − k·g) (2/D folded into grad_scale);
    otherwise out = ĝ = k·g."""
    chunk, sample = _chunk_and_sample(n_chunks)
    base = sample.to(tl.int64) * per_sample
    sigma_data = float_param(sigma_data, COMPUTE)
    t = tl.load(t_ptr + sample)
    cos_t = tl.cos(t)
    sin_t = tl.sin(t)
    r = tl.load(r_ptr + sample)
    k = tl.load(stats_ptr + sample)
    coef = k
    if IS_GRAD:
        coef = _upstream_grad(grad_ptr, grad_stride, grad_scale, sample, COMPUTE) * tl.load(stats_ptr + batch + sample)
    for i in range(blocks_per_chunk):
        cols, mask = _chunk_columns(chunk * blocks_per_chunk + i, per_sample, BLOCK_SIZE)
        g, f_minus = _scm_tangent_block(
            fm_ptr, fj_ptr, xt_ptr, dxdt_ptr, base + cols, mask, cos_t, sin_t, r, sigma_data, COMPUTE
        )
        if IS_GRAD:
            value = coef * (tl.load(f_ptr + base + cols, mask=mask).to(COMPUTE) - f_minus - k * g)
        else:
            value = coef * g
        tl.store(out_ptr + base + cols, value.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- MeanFlow


@triton.jit
def _meanflow_error_block(u_ptr, v_ptr, dudt_ptr, offsets, mask, t_minus_r, COMPUTE: tl.constexpr):
    """u − (v − (t − r)·du/dt), zero where masked."""
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    dudt = tl.load(dudt_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    return u - (v - t_minus_r * dudt)


@triton.jit
def _meanflow_partial_kernel(
    u_ptr,
    v_ptr,
    dudt_ptr,
    t_ptr,
    r_ptr,
    partial_ptr,
    residual_ptr,
    per_sample,
    blocks_per_chunk,
    n_chunks,
    SAVE_RESIDUAL: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    chunk, sample = _chunk_and_sample(n_chunks)
    base = sample.to(tl.int64) * per_sample
    t_minus_r = tl.load(t_ptr + sample) - tl.load(r_ptr + sample)
    acc = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    for i in range(blocks_per_chunk):
        cols, mask = _chunk_columns(chunk * blocks_per_chunk + i, per_sample, BLOCK_SIZE)
        error = _meanflow_error_block(u_ptr, v_ptr, dudt_ptr, base + cols, mask, t_minus_r, COMPUTE)
        acc += error * error
        if SAVE_RESIDUAL:
            tl.store(residual_ptr + base + cols, error.to(residual_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + sample * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _meanflow_epilogue_kernel(
    partial_ptr,
    inv_weight_ptr,
    out_ptr,
    batch,
    n_chunks,
    eps: tl.float64,
    p: tl.float64,
    REDUCTION: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    eps = float_param(eps, COMPUTE)
    p = float_param(p, COMPUTE)
    total = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for start in range(0, batch, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_mask = rows < batch
        sq_error = _sum_partials(partial_ptr, rows, row_mask, n_chunks, BLOCK_C)
        inv_weight = tl.exp(-p * tl.log(sq_error + eps))
        tl.store(inv_weight_ptr + rows, inv_weight, mask=row_mask)
        total = _write_loss(out_ptr, rows, row_mask, sq_error * inv_weight, total, REDUCTION)
    _finish_reduction(out_ptr, total, batch, REDUCTION)


@triton.jit
def _meanflow_bwd_kernel(
    u_ptr,
    v_ptr,
    dudt_ptr,
    t_ptr,
    r_ptr,
    inv_weight_ptr,
    grad_ptr,
    grad_stride,
    grad_scale: tl.float64,
    grad_u_ptr,
    per_sample,
    blocks_per_chunk,
    n_chunks,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    chunk, sample = _chunk_and_sample(n_chunks)
    base = sample.to(tl.int64) * per_sample
    t_minus_r = tl.load(t_ptr + sample) - tl.load(r_ptr + sample)
    coef = 2.0 * _upstream_grad(grad_ptr, grad_stride, grad_scale, sample, COMPUTE) * tl.load(inv_weight_ptr + sample)
    for i in range(blocks_per_chunk):
        cols, mask = _chunk_columns(chunk * blocks_per_chunk + i, per_sample, BLOCK_SIZE)
        error = _meanflow_error_block(u_ptr, v_ptr, dudt_ptr, base + cols, mask, t_minus_r, COMPUTE)
        tl.store(grad_u_ptr + base + cols, (coef * error).to(grad_u_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers


def _geometry(x: torch.Tensor):
    """(batch, per_sample, block, blocks_per_chunk, n_chunks, compute dtype)."""
    batch, per_sample, block, n_blocks = per_sample_blocks(x, BLOCK)
    chunks = min(n_blocks, max(1, triton.cdiv(TARGET_PROGRAMS, batch)))
    blocks_per_chunk = triton.cdiv(n_blocks, chunks)
    n_chunks = triton.cdiv(n_blocks, blocks_per_chunk)
    return batch, per_sample, block, blocks_per_chunk, n_chunks, compute_type(x)


def _epilogue_tiles(batch: int, n_chunks: int):
    block_c = triton.next_power_of_2(n_chunks)
    block_b = max(1, min(triton.next_power_of_2(batch), EPILOGUE_TILE // block_c))
    return {"BLOCK_B": block_b, "BLOCK_C": block_c}


def _loss_output(x: torch.Tensor, reduction: str) -> torch.Tensor:
    return torch.empty((x.shape[0],) if reduction == "none" else (), dtype=x.dtype, device=x.device)


def _grad_layout(grad_out: torch.Tensor, reduction: str, batch: int):
    stride = grad_out.stride(0) if grad_out.dim() else 0
    return stride, (1.0 / batch if reduction == "mean" else 1.0)


def pseudo_huber_forward(
    input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], c: float, reduction: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """input, target: contiguous (B, ...); weight: (B,) or None. Returns (loss, stats) with
    stats = [distance_b; 1/√(s_b + c²)], shape (2, B)."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(input)
    partials = torch.empty((batch, n_chunks), dtype=compute_dtype(input), device=input.device)
    stats = torch.empty((2, batch), dtype=compute_dtype(input), device=input.device)
    out = _loss_output(input, reduction)
    _huber_partial_kernel[(n_chunks * batch,)](
        input,
        target,
        partials,
        per_sample,
        blocks_per_chunk,
        n_chunks,
        COMPUTE=compute,
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    _huber_epilogue_kernel[(1,)](
        partials,
        stats if weight is None else weight,
        stats[0],
        stats[1],
        out,
        batch,
        n_chunks,
        float(c),
        HAS_WEIGHT=weight is not None,
        REDUCTION=REDUCTION_IDS[reduction],
        COMPUTE=compute,
        **_epilogue_tiles(batch, n_chunks),
    )
    return out, stats


def pseudo_huber_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    reduction: str,
    need_input: bool,
    need_target: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_target); one not asked for is an empty (0,) tensor."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(input)
    unused = input.new_empty(0)
    grad_input = torch.empty_like(input) if need_input else unused
    grad_target = torch.empty_like(target) if need_target else unused
    grad_stride, grad_scale = _grad_layout(grad_out, reduction, batch)
    _huber_bwd_kernel[(n_chunks * batch,)](
        input,
        target,
        grad_out,
        grad_stride,
        grad_scale,
        stats if weight is None else weight,
        stats[1],
        grad_input,
        grad_target,
        per_sample,
        blocks_per_chunk,
        n_chunks,
        HAS_WEIGHT=weight is not None,
        NEED_X=need_input,
        NEED_Y=need_target,
        COMPUTE=compute,
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    return grad_input, grad_target


def _scm_partials(
    F: Optional[torch.Tensor],
    F_minus: torch.Tensor,
    F_jvp: torch.Tensor,
    x_t: torch.Tensor,
    dx_dt: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    sigma_data: float,
):
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(F_minus)
    sums = torch.empty(
        (3 if F is not None else 1, batch, n_chunks), dtype=compute_dtype(F_minus), device=F_minus.device
    )
    gg, dg, dd = (sums[0], sums[1], sums[2]) if F is not None else (sums[0], sums[0], sums[0])
    _scm_partial_kernel[(n_chunks * batch,)](
        F_minus if F is None else F,
        F_minus,
        F_jvp,
        x_t,
        dx_dt,
        t,
        r,
        gg,
        dg,
        dd,
        per_sample,
        blocks_per_chunk,
        n_chunks,
        float(sigma_data),
        HAS_F=F is not None,
        COMPUTE=compute,
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    return (gg, dg, dd), n_chunks


def residual_pays(x: torch.Tensor, inputs_reread: int) -> bool:
    """Whether a residual saved in the compute dtype (written once, read once) moves fewer bytes than
    a backward that re-reads `inputs_reread` inputs shaped and typed like x."""
    return 2 * compute_dtype(x).itemsize < inputs_reread * x.element_size()


def scm_saves_residual(x: torch.Tensor, save_residual: bool) -> bool:
    """Whether scm_forward saves the residual: asked to, it pays, and one sample of x fits in a
    program's registers."""
    on_chip = x.numel() // x.shape[0] <= SCM_ON_CHIP_ELEMENTS // (2 if x.dtype == torch.float64 else 1)
    return save_residual and on_chip and residual_pays(x, 5)


def meanflow_saves_residual(x: torch.Tensor, save_residual: bool) -> bool:
    """Whether meanflow_forward saves the residual: asked to, and it pays."""
    return save_residual and residual_pays(x, 3)


def scm_forward(
    F: torch.Tensor,
    F_minus: torch.Tensor,
    F_jvp: torch.Tensor,
    x_t: torch.Tensor,
    dx_dt: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    weight: Optional[torch.Tensor],
    logvar: Optional[torch.Tensor],
    sigma_data: float,
    tangent_norm_c: float,
    tangent_norm: str,
    reduction: str,
    save_residual: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All per-element inputs contiguous (B, ...); t, r (and weight, logvar): (B,). Returns
    (loss, stats, residual) with stats = [k; w·e^{−logvar}; ‖F − F⁻ − k·g‖²/D], shape (3, B), and
    residual = F − F⁻ − ĝ in the compute dtype where scm_saves_residual(F, save_residual), otherwise an
    empty (0,) tensor (the inputs are then streamed and nothing per-element is written)."""
    batch, per_sample, _, _, _, compute = _geometry(F)
    on_chip = scm_saves_residual(F, save_residual)
    if on_chip:
        sums = torch.empty((2, batch, 1), dtype=compute_dtype(F), device=F.device)
        (gg, dd), dg, n_chunks = sums, sums[1], 1
        residual = torch.empty(F.shape, dtype=compute_dtype(F), device=F.device)
        block = max(triton.next_power_of_2(per_sample), 16)
        _scm_on_chip_kernel[(batch,)](
            F,
            F_minus,
            F_jvp,
            x_t,
            dx_dt,
            t,
            r,
            gg,
            dd,
            residual,
            per_sample,
            float(sigma_data),
            float(tangent_norm_c),
            TANGENT_NORM=TANGENT_NORM_IDS[tangent_norm],
            COMPUTE=compute,
            BLOCK_SIZE=block,
            num_warps=max(1, min(ON_CHIP_NUM_WARPS, block // 512)),
        )
    else:
        (gg, dg, dd), n_chunks = _scm_partials(F, F_minus, F_jvp, x_t, dx_dt, t, r, sigma_data)
        residual = F.new_empty(0)
    stats = torch.empty((3, batch), dtype=compute_dtype(F), device=F.device)
    out = _loss_output(F, reduction)
    _scm_epilogue_kernel[(1,)](
        gg,
        dg,
        dd,
        stats if weight is None else weight,
        stats if logvar is None else logvar,
        stats,
        out,
        batch,
        n_chunks,
        per_sample,
        float(tangent_norm_c),
        HAS_WEIGHT=weight is not None,
        HAS_LOGVAR=logvar is not None,
        RESIDUAL_SUM=on_chip,
        TANGENT_NORM=TANGENT_NORM_IDS[tangent_norm],
        REDUCTION=REDUCTION_IDS[reduction],
        COMPUTE=compute,
        **_epilogue_tiles(batch, n_chunks),
    )
    return out, stats, residual


def scm_backward(
    grad_out: torch.Tensor,
    F: torch.Tensor,
    F_minus: torch.Tensor,
    F_jvp: torch.Tensor,
    x_t: torch.Tensor,
    dx_dt: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    stats: torch.Tensor,
    sigma_data: float,
    reduction: str,
) -> torch.Tensor:
    """∂loss/∂F = G_b·w_b·e^{−logvar_b}·2·(F − F⁻ − ĝ)/D in one pass."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(F)
    grad_F = torch.empty_like(F)
    grad_stride, grad_scale = _grad_layout(grad_out, reduction, batch)
    _scm_apply_kernel[(n_chunks * batch,)](
        F,
        F_minus,
        F_jvp,
        x_t,
        dx_dt,
        t,
        r,
        stats,
        grad_out,
        grad_stride,
        grad_scale * 2.0 / per_sample,
        grad_F,
        batch,
        per_sample,
        blocks_per_chunk,
        n_chunks,
        float(sigma_data),
        IS_GRAD=True,
        COMPUTE=compute,
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    return grad_F


def scm_tangent(
    F_minus: torch.Tensor,
    F_jvp: torch.Tensor,
    x_t: torch.Tensor,
    dx_dt: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    sigma_data: float,
    tangent_norm_c: float,
    tangent_norm: str,
) -> torch.Tensor:
    """ĝ = g/(‖g‖ + c): one pass for ‖g‖² (skipped for tangent_norm='none'), one pass writing ĝ."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(F_minus)
    k = torch.empty((batch,), dtype=compute_dtype(F_minus), device=F_minus.device)
    if tangent_norm == "none":
        k.fill_(1.0)
    else:
        (gg, _, _), n_chunks = _scm_partials(None, F_minus, F_jvp, x_t, dx_dt, t, r, sigma_data)
        _scm_tangent_epilogue_kernel[(1,)](
            gg,
            k,
            batch,
            n_chunks,
            per_sample,
            float(tangent_norm_c),
            TANGENT_NORM=TANGENT_NORM_IDS[tangent_norm],
            COMPUTE=compute,
            **_epilogue_tiles(batch, n_chunks),
        )
    g_hat = torch.empty_like(F_minus)
    _scm_apply_kernel[(n_chunks * batch,)](
        F_minus,
        F_minus,
        F_jvp,
        x_t,
        dx_dt,
        t,
        r,
        k,
        k,
        0,
        1.0,
        g_hat,
        batch,
        per_sample,
        blocks_per_chunk,
        n_chunks,
        float(sigma_data),
        IS_GRAD=False,
        COMPUTE=compute,
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    return g_hat


def meanflow_forward(
    u: torch.Tensor,
    v: torch.Tensor,
    dudt: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    eps: float,
    p: float,
    reduction: str,
    save_residual: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, inv_weight, residual) with inv_weight_b = (L_b + ε)^{−p}, shape (B,), and
    residual = u − u_tgt in the compute dtype, written by the same pass, where
    meanflow_saves_residual(u, save_residual) (else an empty (0,) tensor)."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(u)
    partials = torch.empty((batch, n_chunks), dtype=compute_dtype(u), device=u.device)
    inv_weight = torch.empty((batch,), dtype=compute_dtype(u), device=u.device)
    save = meanflow_saves_residual(u, save_residual)
    residual = torch.empty(u.shape, dtype=compute_dtype(u), device=u.device) if save else u.new_empty(0)
    out = _loss_output(u, reduction)
    _meanflow_partial_kernel[(n_chunks * batch,)](
        u,
        v,
        dudt,
        t,
        r,
        partials,
        residual if save else partials,
        per_sample,
        blocks_per_chunk,
        n_chunks,
        SAVE_RESIDUAL=save,
        COMPUTE=compute,
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    _meanflow_epilogue_kernel[(1,)](
        partials,
        inv_weight,
        out,
        batch,
        n_chunks,
        float(eps),
        float(p),
        REDUCTION=REDUCTION_IDS[reduction],
        COMPUTE=compute,
        **_epilogue_tiles(batch, n_chunks),
    )
    return out, inv_weight, residual


def meanflow_backward(
    grad_out: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    dudt: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    inv_weight: torch.Tensor,
    reduction: str,
) -> torch.Tensor:
    """∂loss/∂u = G_b·2·(u − u_tgt)/(L_b + ε)^p in one pass."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(u)
    grad_u = torch.empty_like(u)
    grad_stride, grad_scale = _grad_layout(grad_out, reduction, batch)
    _meanflow_bwd_kernel[(n_chunks * batch,)](
        u,
        v,
        dudt,
        t,
        r,
        inv_weight,
        grad_out,
        grad_stride,
        grad_scale,
        grad_u,
        per_sample,
        blocks_per_chunk,
        n_chunks,
        COMPUTE=compute,
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    return grad_u


def residual_backward(
    grad_out: torch.Tensor,
    residual: torch.Tensor,
    coef: torch.Tensor,
    coef_scale: float,
    reduction: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """grad = G_b·coef_scale·coef_b·residual from a residual saved by the forward (coef: (B,)), one
    read and one write; returned in `dtype` (the loss input's)."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(residual)
    grad = torch.empty(residual.shape, dtype=dtype, device=residual.device)
    grad_stride, grad_scale = _grad_layout(grad_out, reduction, batch)
    _residual_bwd_kernel[(n_chunks * batch,)](
        residual,
        grad_out,
        grad_stride,
        grad_scale * coef_scale,
        coef,
        grad,
        per_sample,
        blocks_per_chunk,
        n_chunks,
        COMPUTE=compute,
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    return grad
