"""Triton kernels for RoPE and the sinusoidal timestep embedding, primal and tangent in one pass.

RoPE: a contiguous (B, H, N, d) tensor is viewed as B·H·N rows of d; row r sits at position
r mod N of the (N, d/2) cos / sin tables. A program rotates BLOCK_R rows and, when asked, the
same rows of the tangent, loading the tables once for both. The gradient is the rotation by the
negated angle (SIGN = −1). Timestep embedding: one program per sample; the backward reduces
the whole row in the program (d is at most a few thousand), so grad_t is deterministic.
ln(max_period) is a constexpr: a Python float kernel argument reaches a compiled kernel as float32
(the interpreter keeps it float64), and its rounding (~5e-8 relative) would reach every float64
frequency.
"""

import math
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, compute_type

ROWS_PER_PROGRAM = 16
NUM_WARPS = 4


@triton.jit
def _rotate(ptr, out_ptr, first, second, mask, cos, sin, COMPUTE: tl.constexpr):
    x1 = tl.load(ptr + first, mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(ptr + second, mask=mask, other=0.0).to(COMPUTE)
    tl.store(out_ptr + first, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + second, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    x_ptr,
    x_t_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    out_t_ptr,
    rows,
    tokens,
    half,
    SIGN: tl.constexpr,
    WRITE_Y: tl.constexpr,
    WRITE_Y_T: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mask = (row < rows)[:, None] & (cols < half)[None, :]
    table = (row % tokens)[:, None] * half + cols[None, :]
    cos = tl.load(cos_ptr + table, mask=mask, other=0.0).to(COMPUTE)
    sin = SIGN * tl.load(sin_ptr + table, mask=mask, other=0.0).to(COMPUTE)
    first = row[:, None] * (2 * half) + cols[None, :]
    if WRITE_Y:
        _rotate(x_ptr, out_ptr, first, first + half, mask, cos, sin, COMPUTE)
    if WRITE_Y_T:
        _rotate(x_t_ptr, out_t_ptr, first, first + half, mask, cos, sin, COMPUTE)


def rope_launch(
    x: torch.Tensor,
    x_t: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool,
    want_y: bool,
    want_y_t: bool,
) -> List[torch.Tensor]:
    """x (B, H, N, d) contiguous, x_t alike (when want_y_t); cos/sin (N, d/2) contiguous.
    Returns [rotated x, rotated x_t] (empty (0,) when not asked for)."""
    out = torch.empty_like(x) if want_y else x.new_empty(0)
    out_t = torch.empty_like(x) if want_y_t else x.new_empty(0)
    tokens, half = x.shape[-2], x.shape[-1] // 2
    rows = x.numel() // max(2 * half, 1)
    if x.numel():
        _rope_kernel[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
            x,
            x if x_t is None else x_t,
            cos,
            sin,
            out,
            out_t,
            rows,
            tokens,
            half,
            SIGN=-1.0 if inverse else 1.0,
            WRITE_Y=want_y,
            WRITE_Y_T=want_y_t,
            COMPUTE=compute_type(x.dtype),
            BLOCK_R=ROWS_PER_PROGRAM,
            BLOCK_H=max(triton.next_power_of_2(half), 16),
            num_warps=NUM_WARPS,
        )
    return [out, out_t]


@triton.jit
def _timestep_terms(t_ptr, sample, cols, half, LOG_PERIOD: tl.constexpr, COMPUTE: tl.constexpr):
    """(value, ∂value/∂t) of the embedding columns `cols` of one sample (0 past 2·half)."""
    t = tl.load(t_ptr + sample).to(COMPUTE)
    is_sin = cols >= half
    index = tl.where(is_sin, cols - half, cols).to(COMPUTE)
    freq = tl.exp(-LOG_PERIOD * index / half)
    cos = tl.cos(t * freq)
    sin = tl.sin(t * freq)
    valid = cols < 2 * half
    value = tl.where(valid, tl.where(is_sin, sin, cos), 0.0)
    slope = tl.where(valid, tl.where(is_sin, freq * cos, -freq * sin), 0.0)
    return value, slope


@triton.jit
def _timestep_kernel(
    t_ptr,
    t_t_ptr,
    y_ptr,
    y_t_ptr,
    dim,
    half,
    LOG_PERIOD: tl.constexpr,
    WRITE_Y: tl.constexpr,
    WRITE_Y_T: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sample = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    value, slope = _timestep_terms(t_ptr, sample, cols, half, LOG_PERIOD, COMPUTE)
    mask = cols < dim
    if WRITE_Y:
        tl.store(y_ptr + sample * dim + cols, value.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_Y_T:
        t_t = tl.load(t_t_ptr + sample).to(COMPUTE)
        tl.store(y_t_ptr + sample * dim + cols, (t_t * slope).to(y_t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _timestep_bwd_kernel(
    grad_ptr, t_ptr, grad_t_ptr, dim, half, LOG_PERIOD: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr
):
    sample = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    _, slope = _timestep_terms(t_ptr, sample, cols, half, LOG_PERIOD, COMPUTE)
    grad = tl.load(grad_ptr + sample * dim + cols, mask=cols < dim, other=0.0).to(COMPUTE)
    tl.store(grad_t_ptr + sample, tl.sum(grad * slope, axis=0).to(grad_t_ptr.dtype.element_ty))


def timestep_embedding_launch(
    t: torch.Tensor, t_t: Optional[torch.Tensor], dim: int, max_period: float, want_y: bool, want_y_t: bool
) -> List[torch.Tensor]:
    """t (B,) contiguous, t_t alike (when want_y_t). Returns [embedding, tangent], (B, dim) float32
    (float64 for float64 t); empty (0,) when not asked for."""
    dtype = compute_dtype(t)
    y = t.new_empty((t.shape[0], dim), dtype=dtype) if want_y else t.new_empty(0, dtype=dtype)
    y_t = t.new_empty((t.shape[0], dim), dtype=dtype) if want_y_t else t.new_empty(0, dtype=dtype)
    if t.numel() and dim:
        _timestep_kernel[(t.shape[0],)](
            t,
            t if t_t is None else t_t,
            y,
            y_t,
            dim,
            dim // 2,
            LOG_PERIOD=math.log(max_period),
            WRITE_Y=want_y,
            WRITE_Y_T=want_y_t,
            COMPUTE=compute_type(t.dtype),
            BLOCK=max(triton.next_power_of_2(dim), 16),
            num_warps=NUM_WARPS,
        )
    return [y, y_t]


def timestep_embedding_backward(grad: torch.Tensor, t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """grad (B, dim) contiguous -> grad_t (B,) in t's dtype."""
    grad_t = torch.empty_like(t)
    if t.numel():
        _timestep_bwd_kernel[(t.shape[0],)](
            grad,
            t,
            grad_t,
            dim,
            dim // 2,
            LOG_PERIOD=math.log(max_period),
            COMPUTE=compute_type(t.dtype),
            BLOCK=max(triton.next_power_of_2(dim), 16),
            num_warps=NUM_WARPS,
        )
    return grad_t
