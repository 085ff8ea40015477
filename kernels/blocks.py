"""Triton kernels for the DiT block ops: adaLN modulated norm, gated residual, MLP activations.

Layout: token tensors are contiguous (B, N, C); per-sample vectors (shift, scale, gate and their
tangents) contiguous (B, C). A norm / residual program owns a tile of BLOCK_N tokens of one
sample and the whole row of C channels, so row statistics are one in-register reduction and the
per-sample gradients of shift / scale / gate reduce over the tile's tokens to one partial per
(sample, tile), summed afterwards (deterministic, no atomics). Statistics are recomputed from x
in every pass instead of being stored. Each forward kernel writes the primal, its tangent, or
both from one read of the inputs (constexpr flags), so the jvp rule and the explicit-tangent
form launch the same kernel. eps is a constexpr: a Python float kernel argument reaches a compiled
kernel as float32 (the interpreter keeps it float64), which would round the float64 path's eps.
"""

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, compute_type

TILE_ELEMENTS = 4096  # BLOCK_N · BLOCK_C per program
ELEMENTWISE_BLOCK = 1024
NUM_WARPS = 4
NORM_IDS = {"layer": 0, "rms": 1}
ACTIVATION_IDS = {"gelu_tanh": 0, "silu": 1, "swiglu": 2}
GELU_K = 0.7978845608028654  # √(2/π)
GELU_C = 0.044715


def _tile_geometry(x: torch.Tensor):
    batch, tokens, channels = x.shape
    block_c = max(triton.next_power_of_2(channels), 16)
    # float64 tiles take twice the registers: an eighth of the elements keeps the widest kernel
    # (primal and tangent, every input) from spilling on sm_80 (a quarter still spilled 4 B).
    elements = TILE_ELEMENTS // 8 if x.dtype == torch.float64 else TILE_ELEMENTS
    block_n = max(1, min(triton.next_power_of_2(max(tokens, 1)), elements // block_c))
    return batch, tokens, channels, block_n, block_c, triton.cdiv(tokens, block_n)


def _tile_warps(block_n: int, block_c: int) -> int:
    """Warps for a [block_n, block_c] tile: NUM_WARPS, fewer for small tiles, which four warps would
    spread so thin that ptxas spills the replicated values (a 1 x 32 float64 tile did on sm_90)."""
    return max(1, min(NUM_WARPS, block_n * block_c // 256))


@triton.jit
def _tile(tokens, channels, tiles_per_sample, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    sample = pid // tiles_per_sample
    rows = (pid % tiles_per_sample) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < tokens
    col_mask = cols < channels
    offsets = (sample.to(tl.int64) * tokens + rows[:, None]) * channels + cols[None, :]
    return pid, sample, offsets, row_mask[:, None] & col_mask[None, :], cols, col_mask


@triton.jit
def _normalized(x, mask, channels, EPS: tl.constexpr, NORM: tl.constexpr):
    """(x̂, rstd per row) of a [BLOCK_N, BLOCK_C] tile; masked entries of x̂ are 0."""
    if NORM == 0:
        mean = tl.sum(x, axis=1) / channels
        centred = tl.where(mask, x - mean[:, None], 0.0)
    else:
        centred = x
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / channels + EPS)
    return centred * rstd[:, None], rstd


@triton.jit
def _modulated_norm_kernel(
    x_ptr,
    shift_ptr,
    scale_ptr,
    weight_ptr,
    x_t_ptr,
    shift_t_ptr,
    scale_t_ptr,
    weight_t_ptr,
    y_ptr,
    y_t_ptr,
    tokens,
    channels,
    tiles_per_sample,
    shift_stride,
    scale_stride,
    shift_t_stride,
    scale_t_stride,
    EPS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_X_T: tl.constexpr,
    HAS_SHIFT_T: tl.constexpr,
    HAS_SCALE_T: tl.constexpr,
    HAS_WEIGHT_T: tl.constexpr,
    WRITE_Y: tl.constexpr,
    WRITE_Y_T: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    _, sample, offsets, mask, cols, col_mask = _tile(tokens, channels, tiles_per_sample, BLOCK_N, BLOCK_C)
    sample = sample.to(tl.int64)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    normed, rstd = _normalized(x, mask, channels, EPS, NORM)
    one_plus_scale = 1.0 + tl.load(scale_ptr + sample * scale_stride + cols, mask=col_mask, other=0.0).to(COMPUTE)
    weight = tl.full([BLOCK_C], 1.0, COMPUTE)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    affine = normed * weight[None, :]
    if WRITE_Y:
        shift = tl.load(shift_ptr + sample * shift_stride + cols, mask=col_mask, other=0.0).to(COMPUTE)
        y = affine * one_plus_scale[None, :] + shift[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_Y_T:
        y_t = tl.zeros([BLOCK_N, BLOCK_C], dtype=COMPUTE)
        if HAS_X_T:
            x_t = tl.load(x_t_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
            correlation = tl.sum(normed * x_t, axis=1) / channels
            if NORM == 0:
                x_t = tl.where(mask, x_t - (tl.sum(x_t, axis=1) / channels)[:, None], 0.0)
            normed_t = (x_t - normed * correlation[:, None]) * rstd[:, None]
            y_t += normed_t * (weight * one_plus_scale)[None, :]
        if HAS_WEIGHT_T:
            weight_t = tl.load(weight_t_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
            y_t += normed * (weight_t * one_plus_scale)[None, :]
        if HAS_SCALE_T:
            scale_t = tl.load(scale_t_ptr + sample * scale_t_stride + cols, mask=col_mask, other=0.0).to(COMPUTE)
            y_t += affine * scale_t[None, :]
        if HAS_SHIFT_T:
            shift_t = tl.load(shift_t_ptr + sample * shift_t_stride + cols, mask=col_mask, other=0.0).to(COMPUTE)
            y_t += shift_t[None, :]
        tl.store(y_t_ptr + offsets, y_t.to(y_t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modulated_norm_bwd_kernel(
    grad_ptr,
    x_ptr,
    scale_ptr,
    weight_ptr,
    grad_x_ptr,
    shift_partial_ptr,
    scale_partial_ptr,
    weight_partial_ptr,
    tokens,
    channels,
    tiles_per_sample,
    scale_stride,
    EPS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_SHIFT: tl.constexpr,
    NEED_SCALE: tl.constexpr,
    NEED_WEIGHT: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid, sample, offsets, mask, cols, col_mask = _tile(tokens, channels, tiles_per_sample, BLOCK_N, BLOCK_C)
    partial = pid.to(tl.int64) * channels + cols
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    normed, rstd = _normalized(x, mask, channels, EPS, NORM)
    one_plus_scale = 1.0 + tl.load(scale_ptr + sample.to(tl.int64) * scale_stride + cols, mask=col_mask, other=0.0).to(
        COMPUTE
    )
    weight = tl.full([BLOCK_C], 1.0, COMPUTE)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    if NEED_X:
        grad_normed = grad * (one_plus_scale * weight)[None, :]
        correlation = tl.sum(grad_normed * normed, axis=1) / channels
        if NORM == 0:
            grad_normed = tl.where(mask, grad_normed - (tl.sum(grad_normed, axis=1) / channels)[:, None], 0.0)
        grad_x = (grad_normed - normed * correlation[:, None]) * rstd[:, None]
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if NEED_SHIFT:
        tl.store(shift_partial_ptr + partial, tl.sum(grad, axis=0), mask=col_mask)
    if NEED_SCALE:
        tl.store(scale_partial_ptr + partial, tl.sum(grad * normed, axis=0) * weight, mask=col_mask)
    if NEED_WEIGHT:
        tl.store(weight_partial_ptr + partial, tl.sum(grad * normed, axis=0) * one_plus_scale, mask=col_mask)


def _or(tensor: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    return fallback if tensor is None else tensor


def _row_stride(vector: Optional[torch.Tensor]) -> int:
    return 0 if vector is None else vector.stride(0)


def modulated_norm_launch(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: Optional[torch.Tensor],
    x_t: Optional[torch.Tensor],
    shift_t: Optional[torch.Tensor],
    scale_t: Optional[torch.Tensor],
    weight_t: Optional[torch.Tensor],
    norm: str,
    eps: float,
    want_y: bool,
    want_y_t: bool,
) -> List[torch.Tensor]:
    """x (B, N, C) and x_t contiguous; shift/scale and their tangents (B, C) with unit channel stride
    (rows may be strided: the chunks of one adaLN linear); weight and its tangent (C,) contiguous;
    absent tangents are None. Returns [y, ẏ], each an empty (0,) tensor when not asked for."""
    y = torch.empty_like(x) if want_y else x.new_empty(0)
    y_t = torch.empty_like(x) if want_y_t else x.new_empty(0)
    batch, tokens, channels, block_n, block_c, tiles = _tile_geometry(x)
    if x.numel():
        _modulated_norm_kernel[(batch * tiles,)](
            x,
            shift,
            scale,
            _or(weight, scale),
            _or(x_t, x),
            _or(shift_t, shift),
            _or(scale_t, scale),
            _or(weight_t, scale),
            y,
            y_t,
            tokens,
            channels,
            tiles,
            shift.stride(0),
            scale.stride(0),
            _row_stride(shift_t),
            _row_stride(scale_t),
            EPS=float(eps),
            NORM=NORM_IDS[norm],
            HAS_WEIGHT=weight is not None,
            HAS_X_T=x_t is not None,
            HAS_SHIFT_T=shift_t is not None,
            HAS_SCALE_T=scale_t is not None,
            HAS_WEIGHT_T=weight_t is not None,
            WRITE_Y=want_y,
            WRITE_Y_T=want_y_t,
            COMPUTE=compute_type(x.dtype),
            BLOCK_N=block_n,
            BLOCK_C=block_c,
            num_warps=_tile_warps(block_n, block_c),
        )
    return [y, y_t]


def modulated_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    weight: Optional[torch.Tensor],
    norm: str,
    eps: float,
    need_x: bool,
    need_shift: bool,
    need_scale: bool,
    need_weight: bool,
) -> List[torch.Tensor]:
    """[grad_x, grad_shift (B, C), grad_scale (B, C), grad_weight (C,)] in float32 (float64 for
    float64) except grad_x (x's dtype); entries not asked for are empty (0,) tensors."""
    batch, tokens, channels, block_n, block_c, tiles = _tile_geometry(x)
    accumulate = compute_dtype(x)
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    partials = [
        torch.empty((batch, tiles, channels), dtype=accumulate, device=x.device) if need else None
        for need in (need_shift, need_scale, need_weight)
    ]
    if x.numel():
        _modulated_norm_bwd_kernel[(batch * tiles,)](
            grad,
            x,
            scale,
            _or(weight, scale),
            grad_x,
            *(_or(p, grad_x) for p in partials),
            tokens,
            channels,
            tiles,
            scale.stride(0),
            EPS=float(eps),
            NORM=NORM_IDS[norm],
            HAS_WEIGHT=weight is not None,
            NEED_X=need_x,
            NEED_SHIFT=need_shift,
            NEED_SCALE=need_scale,
            NEED_WEIGHT=need_weight,
            COMPUTE=compute_type(x.dtype),
            BLOCK_N=block_n,
            BLOCK_C=block_c,
            num_warps=_tile_warps(block_n, block_c),
        )
    empty = x.new_empty(0, dtype=accumulate)
    shift_partial, scale_partial, weight_partial = partials
    return [
        grad_x,
        empty if shift_partial is None else shift_partial.sum(1),
        empty if scale_partial is None else scale_partial.sum(1),
        empty if weight_partial is None else weight_partial.sum((0, 1)),
    ]


@triton.jit
def _gated_residual_kernel(
    x_ptr,
    gate_ptr,
    y_ptr,
    x_t_ptr,
    gate_t_ptr,
    y_t_ptr,
    out_ptr,
    out_t_ptr,
    tokens,
    channels,
    tiles_per_sample,
    gate_stride,
    gate_t_stride,
    HAS_X_T: tl.constexpr,
    HAS_GATE_T: tl.constexpr,
    HAS_Y_T: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    WRITE_OUT_T: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    _, sample, offsets, mask, cols, col_mask = _tile(tokens, channels, tiles_per_sample, BLOCK_N, BLOCK_C)
    sample = sample.to(tl.int64)
    gate = tl.load(gate_ptr + sample * gate_stride + cols, mask=col_mask, other=0.0).to(COMPUTE)[None, :]
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    if WRITE_OUT:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        tl.store(out_ptr + offsets, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_OUT_T:
        out_t = tl.zeros([BLOCK_N, BLOCK_C], dtype=COMPUTE)
        if HAS_X_T:
            out_t += tl.load(x_t_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        if HAS_GATE_T:
            gate_t = tl.load(gate_t_ptr + sample * gate_t_stride + cols, mask=col_mask, other=0.0).to(COMPUTE)
            out_t += gate_t[None, :] * y
        if HAS_Y_T:
            out_t += gate * tl.load(y_t_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        tl.store(out_t_ptr + offsets, out_t.to(out_t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    grad_ptr,
    gate_ptr,
    y_ptr,
    grad_y_ptr,
    gate_partial_ptr,
    tokens,
    channels,
    tiles_per_sample,
    gate_stride,
    NEED_Y: tl.constexpr,
    NEED_GATE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid, sample, offsets, mask, cols, col_mask = _tile(tokens, channels, tiles_per_sample, BLOCK_N, BLOCK_C)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    if NEED_Y:
        gate = tl.load(gate_ptr + sample.to(tl.int64) * gate_stride + cols, mask=col_mask, other=0.0).to(COMPUTE)
        tl.store(grad_y_ptr + offsets, (grad * gate[None, :]).to(grad_y_ptr.dtype.element_ty), mask=mask)
    if NEED_GATE:
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        tl.store(gate_partial_ptr + pid.to(tl.int64) * channels + cols, tl.sum(grad * y, axis=0), mask=col_mask)


def gated_residual_launch(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    x_t: Optional[torch.Tensor],
    gate_t: Optional[torch.Tensor],
    y_t: Optional[torch.Tensor],
    want_out: bool,
    want_out_t: bool,
) -> List[torch.Tensor]:
    """x, y (B, N, C) contiguous, gate (B, C) with unit channel stride, tangents alike or None. Returns [out, ȯut]
    (empty (0,) when not asked for)."""
    out = torch.empty_like(x) if want_out else x.new_empty(0)
    out_t = torch.empty_like(x) if want_out_t else x.new_empty(0)
    batch, tokens, channels, block_n, block_c, tiles = _tile_geometry(x)
    if x.numel():
        _gated_residual_kernel[(batch * tiles,)](
            x,
            gate,
            y,
            _or(x_t, x),
            _or(gate_t, gate),
            _or(y_t, y),
            out,
            out_t,
            tokens,
            channels,
            tiles,
            gate.stride(0),
            _row_stride(gate_t),
            HAS_X_T=x_t is not None,
            HAS_GATE_T=gate_t is not None,
            HAS_Y_T=y_t is not None,
            WRITE_OUT=want_out,
            WRITE_OUT_T=want_out_t,
            COMPUTE=compute_type(x.dtype),
            BLOCK_N=block_n,
            BLOCK_C=block_c,
            num_warps=_tile_warps(block_n, block_c),
        )
    return [out, out_t]


def gated_residual_backward(
    grad: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, need_y: bool, need_gate: bool
) -> List[torch.Tensor]:
    """[grad_y = gate·g, grad_gate = Σ_tokens g⊙y (B, C) in float32 / float64]; empty (0,) when not asked for.
    (grad_x is g itself.)"""
    batch, tokens, channels, block_n, block_c, tiles = _tile_geometry(y)
    accumulate = compute_dtype(y)
    grad_y = torch.empty_like(y) if need_y else y.new_empty(0)
    partial = torch.empty((batch, tiles, channels), dtype=accumulate, device=y.device) if need_gate else None
    if y.numel():
        _gated_residual_bwd_kernel[(batch * tiles,)](
            grad,
            gate,
            y,
            grad_y,
            _or(partial, grad_y),
            tokens,
            channels,
            tiles,
            gate.stride(0),
            NEED_Y=need_y,
            NEED_GATE=need_gate,
            COMPUTE=compute_type(y.dtype),
            BLOCK_N=block_n,
            BLOCK_C=block_c,
            num_warps=_tile_warps(block_n, block_c),
        )
    return [grad_y, y.new_empty(0, dtype=accumulate) if partial is None else partial.sum(1)]


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """(f(x), f'(x)) for GELU-tanh (ACT 0) and SiLU (otherwise)."""
    if ACT == 0:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        th = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        value = 0.5 * x * (1.0 + th)
        slope = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    else:
        sig = tl.sigmoid(x)
        value = x * sig
        slope = sig * (1.0 + x * (1.0 - sig))
    return value, slope


@triton.jit
def _elementwise_offsets(numel, hidden, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """Output offsets and the input offsets of a (and of b for SwiGLU, whose input rows are 2·hidden wide)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    if ACT == 2:
        a_offsets = (offsets // hidden) * (2 * hidden) + offsets % hidden
    else:
        a_offsets = offsets
    return offsets, mask, a_offsets, a_offsets + hidden


@triton.jit
def _activation_kernel(
    x_ptr,
    x_t_ptr,
    y_ptr,
    y_t_ptr,
    numel,
    hidden,
    ACT: tl.constexpr,
    WRITE_Y: tl.constexpr,
    WRITE_Y_T: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets, mask, a_offsets, b_offsets = _elementwise_offsets(numel, hidden, ACT, BLOCK)
    a = tl.load(x_ptr + a_offsets, mask=mask, other=0.0).to(COMPUTE)
    value, slope = _activation(a, ACT)
    a_t = tl.zeros([BLOCK], dtype=COMPUTE)
    if WRITE_Y_T:
        a_t = tl.load(x_t_ptr + a_offsets, mask=mask, other=0.0).to(COMPUTE)
    if ACT == 2:
        b = tl.load(x_ptr + b_offsets, mask=mask, other=0.0).to(COMPUTE)
        if WRITE_Y:
            tl.store(y_ptr + offsets, (value * b).to(y_ptr.dtype.element_ty), mask=mask)
        if WRITE_Y_T:
            b_t = tl.load(x_t_ptr + b_offsets, mask=mask, other=0.0).to(COMPUTE)
            tl.store(y_t_ptr + offsets, (slope * a_t * b + value * b_t).to(y_t_ptr.dtype.element_ty), mask=mask)
    else:
        if WRITE_Y:
            tl.store(y_ptr + offsets, value.to(y_ptr.dtype.element_ty), mask=mask)
        if WRITE_Y_T:
            tl.store(y_t_ptr + offsets, (slope * a_t).to(y_t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_bwd_kernel(
    grad_ptr, x_ptr, grad_x_ptr, numel, hidden, ACT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr
):
    offsets, mask, a_offsets, b_offsets = _elementwise_offsets(numel, hidden, ACT, BLOCK)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    value, slope = _activation(tl.load(x_ptr + a_offsets, mask=mask, other=0.0).to(COMPUTE), ACT)
    if ACT == 2:
        b = tl.load(x_ptr + b_offsets, mask=mask, other=0.0).to(COMPUTE)
        tl.store(grad_x_ptr + a_offsets, (grad * b * slope).to(grad_x_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_x_ptr + b_offsets, (grad * value).to(grad_x_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(grad_x_ptr + a_offsets, (grad * slope).to(grad_x_ptr.dtype.element_ty), mask=mask)


def _activation_geometry(kind: str, x: torch.Tensor):
    hidden = x.shape[-1] // 2 if kind == "swiglu" else max(x.shape[-1], 1)
    out_shape = x.shape[:-1] + (hidden,) if kind == "swiglu" else x.shape
    numel = torch.Size(out_shape).numel()
    return out_shape, numel, hidden, (triton.cdiv(numel, ELEMENTWISE_BLOCK),)


def activation_launch(
    x: torch.Tensor, x_t: Optional[torch.Tensor], kind: str, want_y: bool, want_y_t: bool
) -> List[torch.Tensor]:
    """x contiguous (SwiGLU: last dim 2H), x_t alike (needed when want_y_t). Returns [y, ẏ]."""
    out_shape, numel, hidden, grid = _activation_geometry(kind, x)
    y = x.new_empty(out_shape) if want_y else x.new_empty(0)
    y_t = x.new_empty(out_shape) if want_y_t else x.new_empty(0)
    if numel:
        _activation_kernel[grid](
            x,
            _or(x_t, x),
            y,
            y_t,
            numel,
            hidden,
            ACT=ACTIVATION_IDS[kind],
            WRITE_Y=want_y,
            WRITE_Y_T=want_y_t,
            COMPUTE=compute_type(x.dtype),
            BLOCK=ELEMENTWISE_BLOCK,
            num_warps=NUM_WARPS,
        )
    return [y, y_t]


def activation_backward(grad: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """grad (output shape), x contiguous. Returns the input gradient, shaped like x."""
    _, numel, hidden, grid = _activation_geometry(kind, x)
    grad_x = torch.empty_like(x)
    if numel:
        _activation_bwd_kernel[grid](
            grad,
            x,
            grad_x,
            numel,
            hidden,
            ACT=ACTIVATION_IDS[kind],
            COMPUTE=compute_type(x.dtype),
            BLOCK=ELEMENTWISE_BLOCK,
            num_warps=NUM_WARPS,
        )
    return grad_x
