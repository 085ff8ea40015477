"""Triton kernels for the consistency-model losses: pseudo-Huber, sCM and MeanFlow.

Layout: every per-element input is contiguous and viewed as (B, D); per-sample parameters are
contiguous (B,) tensors in the compute dtype. A forward is one streaming pass: a grid of
(chunk, sample) programs, each looping over `blocks_per_chunk` blocks of one sample and writing
its partial per-sample sums, then a one-program epilogue that adds the partials in a fixed order
(deterministic, no atomics), evaluates the per-sample loss, saves the few per-sample numbers the
backward needs and applies the batch reduction. A backward is one elementwise pass that
rebuilds the per-element term from the inputs and those saved per-sample numbers.

The sCM loss needs ‖F − F⁻ − g/(‖g‖+c)‖², whose normalisation is known only once ‖g‖ is. It is
assembled from three sums taken in the same pass, ‖Δ‖², ⟨Δ,g⟩ and ‖g‖² (Δ = F − F⁻), so the
inputs are read once; in the usual sCM setting F⁻ is F detached, Δ = 0 and the expansion is exact.

The upstream gradient is a 0-d tensor (mean, sum) or a (B,) tensor (none), read with its stride
(0 for a scalar) and multiplied by `grad_scale` (1/B for mean).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

BLOCK = 2048
NUM_WARPS = 8
# Enough (chunk, sample) programs to fill a GPU when B is small; B·chunks ≥ TARGET_PROGRAMS
# when the samples are large enough.
TARGET_PROGRAMS = 1024
EPILOGUE_TILE = 2048
TANGENT_NORM_IDS = {"none": 0, "l2": 1, "rms": 2}
REDUCTION_IDS = {"none": 0, "mean": 1, "sum": 2}


@triton.jit
def _chunk_columns(block_index, per_sample, BLOCK_SIZE: tl.constexpr):
    cols = block_index * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    return cols, cols < per_sample


@triton.jit
def _upstream_grad(grad_ptr, grad_stride, grad_scale, sample, COMPUTE: tl.constexpr):
    return tl.load(grad_ptr + sample * grad_stride).to(COMPUTE) * grad_scale


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


# ---------------------------------------------------------------- pseudo-Huber

@triton.jit
def _huber_partial_kernel(x_ptr, y_ptr, partial_ptr, per_sample, blocks_per_chunk,
                          COMPUTE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    chunk = tl.program_id(0)
    sample = tl.program_id(1)
    base = sample.to(tl.int64) * per_sample
    acc = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    for i in range(blocks_per_chunk):
        cols, mask = _chunk_columns(chunk * blocks_per_chunk + i, per_sample, BLOCK_SIZE)
        diff = (tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(COMPUTE)
                - tl.load(y_ptr + base + cols, mask=mask, other=0.0).to(COMPUTE))
        acc += diff * diff
    tl.store(partial_ptr + sample * tl.num_programs(0) + chunk, tl.sum(acc, axis=0))


@triton.jit
def _huber_epilogue_kernel(partial_ptr, weight_ptr, distance_ptr, inv_root_ptr, out_ptr, batch, n_chunks, c,
                           HAS_WEIGHT: tl.constexpr, REDUCTION: tl.constexpr, COMPUTE: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    total = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for start in range(0, batch, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_mask = rows < batch
        sq_dist = _sum_partials(partial_ptr, rows, row_mask, n_chunks, BLOCK_C)
        root = tl.sqrt(sq_dist + c * c)
        # √(s + c²) − c written as s / (√(s + c²) + c): no cancellation when s ≪ c².
        distance = sq_dist / (root + c)
        tl.store(distance_ptr + rows, distance, mask=row_mask)
        tl.store(inv_root_ptr + rows, 1.0 / root, mask=row_mask)
        loss = distance
        if HAS_WEIGHT:
            loss = loss * tl.load(weight_ptr + rows, mask=row_mask, other=0.0)
        total = _write_loss(out_ptr, rows, row_mask, loss, total, REDUCTION)
    _finish_reduction(out_ptr, total, batch, REDUCTION)


@triton.jit
def _huber_bwd_kernel(x_ptr, y_ptr, grad_ptr, grad_stride, grad_scale, weight_ptr, inv_root_ptr,
                      grad_x_ptr, grad_y_ptr, per_sample, blocks_per_chunk,
                      HAS_WEIGHT: tl.constexpr, NEED_X: tl.constexpr, NEED_Y: tl.constexpr,
                      COMPUTE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    chunk = tl.program_id(0)
    sample = tl.program_id(1)
    base = sample.to(tl.int64) * per_sample
    coef = _upstream_grad(grad_ptr, grad_stride, grad_scale, sample, COMPUTE) * tl.load(inv_root_ptr + sample)
    if HAS_WEIGHT:
        coef = coef * tl.load(weight_ptr + sample)
    for i in range(blocks_per_chunk):
        cols, mask = _chunk_columns(chunk * blocks_per_chunk + i, per_sample, BLOCK_SIZE)
        grad = coef * (tl.load(x_ptr + base + cols, mask=mask).to(COMPUTE)
                       - tl.load(y_ptr + base + cols, mask=mask).to(COMPUTE))
        if NEED_X:
            tl.store(grad_x_ptr + base + cols, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if NEED_Y:
            tl.store(grad_y_ptr + base + cols, (-grad).to(grad_y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- sCM

@triton.jit
def _scm_tangent_block(fm_ptr, fj_ptr, xt_ptr, dxdt_ptr, offsets, mask, cos_t, sin_t, r, sigma_data,
                       COMPUTE: tl.constexpr):
    """g = −cos²t·(σd·F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + σd·F_jvp), zero where masked."""
    f_minus = tl.load(fm_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    f_jvp = tl.load(fj_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    x_t = tl.load(xt_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    dx_dt = tl.load(dxdt_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    g = -cos_t * cos_t * (sigma_data * f_minus - dx_dt) - r * (cos_t * sin_t * x_t + sigma_data * f_jvp)
    return g, f_minus


@triton.jit
def _scm_partial_kernel(f_ptr, fm_ptr, fj_ptr, xt_ptr, dxdt_ptr, t_ptr, r_ptr, gg_ptr, dg_ptr, dd_ptr,
                        per_sample, blocks_per_chunk, sigma_data, HAS_F: tl.constexpr,
                        COMPUTE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    chunk = tl.program_id(0)
    sample = tl.program_id(1)
    base = sample.to(tl.int64) * per_sample
    t = tl.load(t_ptr + sample)
    cos_t = tl.cos(t)
    sin_t = tl.sin(t)
    r = tl.load(r_ptr + sample)
    acc_gg = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    acc_dg = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    acc_dd = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    for i in range(blocks_per_chunk):
        cols, mask = _chunk_columns(chunk * blocks_per_chunk + i, per_sample, BLOCK_SIZE)
        g, f_minus = _scm_tangent_block(fm_ptr, fj_ptr, xt_ptr, dxdt_ptr, base + cols, mask, cos_t, sin_t, r,
                                        sigma_data, COMPUTE)
        acc_gg += g * g
        if HAS_F:
            delta = tl.load(f_ptr + base + cols, mask=mask, other=0.0).to(COMPUTE) - f_minus
            acc_dg += delta * g
            acc_dd += delta * delta
    slot = sample * tl.num_programs(0) + chunk
    tl.store(gg_ptr + slot, tl.sum(acc_gg, axis=0))
    if HAS_F:
        tl.store(dg_ptr + slot, tl.sum(acc_dg, axis=0))
        tl.store(dd_ptr + slot, tl.sum(acc_dd, axis=0))


@triton.jit
def _scm_norm_scale(gg, per_sample, tangent_norm_c, TANGENT_NORM: tl.constexpr):
    """k with ĝ = k·g: 1/(‖g‖ + c) (l2), 1/(‖g‖/√D + c) (rms), 1 (none)."""
    if TANGENT_NORM == 0:
        return gg * 0.0 + 1.0
    if TANGENT_NORM == 1:
        return 1.0 / (tl.sqrt(gg) + tangent_norm_c)
    return 1.0 / (tl.sqrt(gg / per_sample) + tangent_norm_c)


@triton.jit
def _scm_epilogue_kernel(gg_ptr, dg_ptr, dd_ptr, weight_ptr, logvar_ptr, stats_ptr, out_ptr, batch, n_chunks,
                         per_sample, tangent_norm_c, HAS_WEIGHT: tl.constexpr, HAS_LOGVAR: tl.constexpr,
                         TANGENT_NORM: tl.constexpr, REDUCTION: tl.constexpr, COMPUTE: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """stats rows: 0 k (ĝ = k·g), 1 scale = w·e^{−logvar}, 2 mse = ‖Δ − ĝ‖²/D."""
    total = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for start in range(0, batch, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_mask = rows < batch
        gg = _sum_partials(gg_ptr, rows, row_mask, n_chunks, BLOCK_C)
        dg = _sum_partials(dg_ptr, rows, row_mask, n_chunks, BLOCK_C)
        dd = _sum_partials(dd_ptr, rows, row_mask, n_chunks, BLOCK_C)
        k = _scm_norm_scale(gg, per_sample, tangent_norm_c, TANGENT_NORM)
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
def _scm_tangent_epilogue_kernel(gg_ptr, k_ptr, batch, n_chunks, per_sample, tangent_norm_c,
                                 TANGENT_NORM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    for start in range(0, batch, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_mask = rows < batch
        gg = _sum_partials(gg_ptr, rows, row_mask, n_chunks, BLOCK_C)
        tl.store(k_ptr + rows, _scm_norm_scale(gg, per_sample, tangent_norm_c, TANGENT_NORM), mask=row_mask)


@triton.jit
def _scm_apply_kernel(f_ptr, fm_ptr, fj_ptr, xt_ptr, dxdt_ptr, t_ptr, r_ptr, stats_ptr, grad_ptr, grad_stride,
                      grad_scale, out_ptr, batch, per_sample, blocks_per_chunk, sigma_data, IS_GRAD: tl.constexpr,
                      COMPUTE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """IS_GRAD: out = ∂loss/∂F = G·scale·(2/D)·(F − F⁻ − k·g) (2/D folded into grad_scale);
    otherwise out = ĝ = k·g."""
    chunk = tl.program_id(0)
    sample = tl.program_id(1)
    base = sample.to(tl.int64) * per_sample
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
        g, f_minus = _scm_tangent_block(fm_ptr, fj_ptr, xt_ptr, dxdt_ptr, base + cols, mask, cos_t, sin_t, r,
                                        sigma_data, COMPUTE)
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
def _meanflow_partial_kernel(u_ptr, v_ptr, dudt_ptr, t_ptr, r_ptr, partial_ptr, per_sample, blocks_per_chunk,
                             COMPUTE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    chunk = tl.program_id(0)
    sample = tl.program_id(1)
    base = sample.to(tl.int64) * per_sample
    t_minus_r = tl.load(t_ptr + sample) - tl.load(r_ptr + sample)
    acc = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    for i in range(blocks_per_chunk):
        cols, mask = _chunk_columns(chunk * blocks_per_chunk + i, per_sample, BLOCK_SIZE)
        error = _meanflow_error_block(u_ptr, v_ptr, dudt_ptr, base + cols, mask, t_minus_r, COMPUTE)
        acc += error * error
    tl.store(partial_ptr + sample * tl.num_programs(0) + chunk, tl.sum(acc, axis=0))


@triton.jit
def _meanflow_epilogue_kernel(partial_ptr, inv_weight_ptr, out_ptr, batch, n_chunks, eps, p,
                              REDUCTION: tl.constexpr, COMPUTE: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
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
def _meanflow_bwd_kernel(u_ptr, v_ptr, dudt_ptr, t_ptr, r_ptr, inv_weight_ptr, grad_ptr, grad_stride, grad_scale,
                         grad_u_ptr, per_sample, blocks_per_chunk, COMPUTE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    chunk = tl.program_id(0)
    sample = tl.program_id(1)
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
    batch = x.shape[0]
    per_sample = x.numel() // batch
    block = min(BLOCK, max(triton.next_power_of_2(per_sample), 16))
    n_blocks = triton.cdiv(per_sample, block)
    chunks = min(n_blocks, max(1, triton.cdiv(TARGET_PROGRAMS, batch)))
    blocks_per_chunk = triton.cdiv(n_blocks, chunks)
    n_chunks = triton.cdiv(n_blocks, blocks_per_chunk)
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32
    return batch, per_sample, block, blocks_per_chunk, n_chunks, compute


def _epilogue_tiles(batch: int, n_chunks: int):
    block_c = triton.next_power_of_2(n_chunks)
    block_b = max(1, min(triton.next_power_of_2(batch), EPILOGUE_TILE // block_c))
    return {"BLOCK_B": block_b, "BLOCK_C": block_c}


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _loss_output(x: torch.Tensor, reduction: str) -> torch.Tensor:
    return torch.empty((x.shape[0],) if reduction == "none" else (), dtype=x.dtype, device=x.device)


def _grad_layout(grad_out: torch.Tensor, reduction: str, batch: int):
    stride = grad_out.stride(0) if grad_out.dim() else 0
    return stride, (1.0 / batch if reduction == "mean" else 1.0)


def pseudo_huber_forward(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], c: float,
                         reduction: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """input, target: contiguous (B, ...); weight: (B,) or None. Returns (loss, stats) with
    stats = [distance_b; 1/√(s_b + c²)], shape (2, B)."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(input)
    partials = torch.empty((batch, n_chunks), dtype=_stats_dtype(input), device=input.device)
    stats = torch.empty((2, batch), dtype=_stats_dtype(input), device=input.device)
    out = _loss_output(input, reduction)
    _huber_partial_kernel[(n_chunks, batch)](input, target, partials, per_sample, blocks_per_chunk,
                                             COMPUTE=compute, BLOCK_SIZE=block, num_warps=NUM_WARPS)
    _huber_epilogue_kernel[(1,)](partials, stats if weight is None else weight, stats[0], stats[1], out, batch,
                                 n_chunks, float(c), HAS_WEIGHT=weight is not None,
                                 REDUCTION=REDUCTION_IDS[reduction], COMPUTE=compute,
                                 **_epilogue_tiles(batch, n_chunks))
    return out, stats


def pseudo_huber_backward(grad_out: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                          weight: Optional[torch.Tensor], stats: torch.Tensor, reduction: str, need_input: bool,
                          need_target: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_target); one not asked for is an empty (0,) tensor."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(input)
    unused = input.new_empty(0)
    grad_input = torch.empty_like(input) if need_input else unused
    grad_target = torch.empty_like(target) if need_target else unused
    grad_stride, grad_scale = _grad_layout(grad_out, reduction, batch)
    _huber_bwd_kernel[(n_chunks, batch)](
        input, target, grad_out, grad_stride, grad_scale, stats if weight is None else weight, stats[1],
        grad_input, grad_target, per_sample, blocks_per_chunk, HAS_WEIGHT=weight is not None,
        NEED_X=need_input, NEED_Y=need_target, COMPUTE=compute, BLOCK_SIZE=block, num_warps=NUM_WARPS)
    return grad_input, grad_target


def _scm_partials(F: Optional[torch.Tensor], F_minus: torch.Tensor, F_jvp: torch.Tensor, x_t: torch.Tensor,
                  dx_dt: torch.Tensor, t: torch.Tensor, r: torch.Tensor, sigma_data: float):
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(F_minus)
    sums = torch.empty((3 if F is not None else 1, batch, n_chunks), dtype=_stats_dtype(F_minus),
                       device=F_minus.device)
    gg, dg, dd = (sums[0], sums[1], sums[2]) if F is not None else (sums[0], sums[0], sums[0])
    _scm_partial_kernel[(n_chunks, batch)](
        F_minus if F is None else F, F_minus, F_jvp, x_t, dx_dt, t, r, gg, dg, dd, per_sample, blocks_per_chunk,
        float(sigma_data), HAS_F=F is not None, COMPUTE=compute, BLOCK_SIZE=block, num_warps=NUM_WARPS)
    return (gg, dg, dd), n_chunks


def scm_forward(F: torch.Tensor, F_minus: torch.Tensor, F_jvp: torch.Tensor, x_t: torch.Tensor,
                dx_dt: torch.Tensor, t: torch.Tensor, r: torch.Tensor, weight: Optional[torch.Tensor],
                logvar: Optional[torch.Tensor], sigma_data: float, tangent_norm_c: float, tangent_norm: str,
                reduction: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """All per-element inputs contiguous (B, ...); t, r (and weight, logvar): (B,). Returns
    (loss, stats) with stats = [k; w·e^{−logvar}; ‖F − F⁻ − k·g‖²/D], shape (3, B)."""
    batch, per_sample, _, _, _, compute = _geometry(F)
    (gg, dg, dd), n_chunks = _scm_partials(F, F_minus, F_jvp, x_t, dx_dt, t, r, sigma_data)
    stats = torch.empty((3, batch), dtype=_stats_dtype(F), device=F.device)
    out = _loss_output(F, reduction)
    _scm_epilogue_kernel[(1,)](
        gg, dg, dd, stats if weight is None else weight, stats if logvar is None else logvar, stats, out, batch,
        n_chunks, per_sample, float(tangent_norm_c), HAS_WEIGHT=weight is not None, HAS_LOGVAR=logvar is not None,
        TANGENT_NORM=TANGENT_NORM_IDS[tangent_norm], REDUCTION=REDUCTION_IDS[reduction], COMPUTE=compute,
        **_epilogue_tiles(batch, n_chunks))
    return out, stats


def scm_backward(grad_out: torch.Tensor, F: torch.Tensor, F_minus: torch.Tensor, F_jvp: torch.Tensor,
                 x_t: torch.Tensor, dx_dt: torch.Tensor, t: torch.Tensor, r: torch.Tensor, stats: torch.Tensor,
                 sigma_data: float, reduction: str) -> torch.Tensor:
    """∂loss/∂F = G_b·w_b·e^{−logvar_b}·2·(F − F⁻ − ĝ)/D in one pass."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(F)
    grad_F = torch.empty_like(F)
    grad_stride, grad_scale = _grad_layout(grad_out, reduction, batch)
    _scm_apply_kernel[(n_chunks, batch)](
        F, F_minus, F_jvp, x_t, dx_dt, t, r, stats, grad_out, grad_stride, grad_scale * 2.0 / per_sample, grad_F,
        batch, per_sample, blocks_per_chunk, float(sigma_data), IS_GRAD=True, COMPUTE=compute, BLOCK_SIZE=block,
        num_warps=NUM_WARPS)
    return grad_F


def scm_tangent(F_minus: torch.Tensor, F_jvp: torch.Tensor, x_t: torch.Tensor, dx_dt: torch.Tensor,
                t: torch.Tensor, r: torch.Tensor, sigma_data: float, tangent_norm_c: float,
                tangent_norm: str) -> torch.Tensor:
    """ĝ = g/(‖g‖ + c): one pass for ‖g‖² (skipped for tangent_norm='none'), one pass writing ĝ."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(F_minus)
    k = torch.empty((batch,), dtype=_stats_dtype(F_minus), device=F_minus.device)
    if tangent_norm == "none":
        k.fill_(1.0)
    else:
        (gg, _, _), n_chunks = _scm_partials(None, F_minus, F_jvp, x_t, dx_dt, t, r, sigma_data)
        _scm_tangent_epilogue_kernel[(1,)](gg, k, batch, n_chunks, per_sample, float(tangent_norm_c),
                                           TANGENT_NORM=TANGENT_NORM_IDS[tangent_norm],
                                           **_epilogue_tiles(batch, n_chunks))
    g_hat = torch.empty_like(F_minus)
    _scm_apply_kernel[(n_chunks, batch)](
        F_minus, F_minus, F_jvp, x_t, dx_dt, t, r, k, k, 0, 1.0, g_hat, batch, per_sample, blocks_per_chunk,
        float(sigma_data), IS_GRAD=False, COMPUTE=compute, BLOCK_SIZE=block, num_warps=NUM_WARPS)
    return g_hat


def meanflow_forward(u: torch.Tensor, v: torch.Tensor, dudt: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                     eps: float, p: float, reduction: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, inv_weight) with inv_weight_b = (L_b + ε)^{−p}, shape (B,)."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(u)
    partials = torch.empty((batch, n_chunks), dtype=_stats_dtype(u), device=u.device)
    inv_weight = torch.empty((batch,), dtype=_stats_dtype(u), device=u.device)
    out = _loss_output(u, reduction)
    _meanflow_partial_kernel[(n_chunks, batch)](u, v, dudt, t, r, partials, per_sample, blocks_per_chunk,
                                                COMPUTE=compute, BLOCK_SIZE=block, num_warps=NUM_WARPS)
    _meanflow_epilogue_kernel[(1,)](partials, inv_weight, out, batch, n_chunks, float(eps), float(p),
                                    REDUCTION=REDUCTION_IDS[reduction], COMPUTE=compute,
                                    **_epilogue_tiles(batch, n_chunks))
    return out, inv_weight


def meanflow_backward(grad_out: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dudt: torch.Tensor,
                      t: torch.Tensor, r: torch.Tensor, inv_weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """∂loss/∂u = G_b·2·(u − u_tgt)/(L_b + ε)^p in one pass."""
    batch, per_sample, block, blocks_per_chunk, n_chunks, compute = _geometry(u)
    grad_u = torch.empty_like(u)
    grad_stride, grad_scale = _grad_layout(grad_out, reduction, batch)
    _meanflow_bwd_kernel[(n_chunks, batch)](u, v, dudt, t, r, inv_weight, grad_out, grad_stride, grad_scale,
                                            grad_u, per_sample, blocks_per_chunk, COMPUTE=compute,
                                            BLOCK_SIZE=block, num_warps=NUM_WARPS)
    return grad_u
