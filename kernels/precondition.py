"""Triton kernels for preconditioning: out = c_skip(σ)·x + c_out(σ)·F, its backward and its jvp.

Layout: x, F (and their tangents / the output gradient) are contiguous and viewed as
(B, D); σ is a contiguous (B,) tensor in the compute dtype. Each program handles BLOCK
elements of one sample, so the per-sample scalings are computed once per program from one
scalar load, and the σ-gradient reduces within the program to one partial per (sample, block).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import compute_type, float_param, per_sample_blocks

PARAM_IDS = {"edm": 0, "cm": 1, "trigflow": 2, "flow": 3, "vp-eps": 4, "vp-x0": 5, "vp-v": 6}
BLOCK = 2048
NUM_WARPS = 4


@triton.jit
def _scalings(sigma, sigma_data, sigma_min, PARAM: tl.constexpr):
    """c_skip, c_out and their σ-derivatives (unused ones are removed by the compiler)."""
    if PARAM == 2:
        cos_t = tl.cos(sigma)
        sin_t = tl.sin(sigma)
        return cos_t, -sigma_data * sin_t, -sin_t, -sigma_data * cos_t
    if PARAM == 3:
        return 1.0 + 0.0 * sigma, -sigma, 0.0 * sigma, -1.0 + 0.0 * sigma
    if PARAM == 5:
        return 0.0 * sigma, 1.0 + 0.0 * sigma, 0.0 * sigma, 0.0 * sigma
    if PARAM >= 4:
        # VP: `sigma` is ᾱ; signal = √ᾱ, noise = √(1−ᾱ).
        signal = tl.sqrt(sigma)
        noise = tl.sqrt(1.0 - sigma)
        if PARAM == 4:
            return 1.0 / signal, -noise / signal, -0.5 / (sigma * signal), 0.5 / (noise * sigma * signal)
        return signal, -noise, 0.5 / signal, 0.5 / noise
    sd2 = sigma_data * sigma_data
    variance = sigma * sigma + sd2
    rsd = 1.0 / tl.sqrt(variance)
    if PARAM == 0:
        c_skip = sd2 / variance
        d_c_skip = -2.0 * sigma * c_skip / variance
        c_out = sigma * sigma_data * rsd
        d_c_out = sd2 * sigma_data * rsd / variance
    else:
        shifted = sigma - sigma_min
        shifted_variance = shifted * shifted + sd2
        c_skip = sd2 / shifted_variance
        d_c_skip = -2.0 * shifted * c_skip / shifted_variance
        c_out = shifted * sigma_data * rsd
        d_c_out = sigma_data * rsd * (variance - shifted * sigma) / variance
    return c_skip, c_out, d_c_skip, d_c_out


@triton.jit
def _sample_block(per_sample, blocks_per_sample, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    block = pid % blocks_per_sample
    cols = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offsets = sample.to(tl.int64) * per_sample + cols
    return sample, pid, offsets, cols < per_sample


@triton.jit
def _precondition_fwd_kernel(
    x_ptr,
    f_ptr,
    sigma_ptr,
    out_ptr,
    per_sample,
    blocks_per_sample,
    sigma_data: tl.float64,
    sigma_min: tl.float64,
    PARAM: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    sample, _, offsets, mask = _sample_block(per_sample, blocks_per_sample, BLOCK_SIZE)
    sigma = tl.load(sigma_ptr + sample).to(COMPUTE)
    sigma_data = float_param(sigma_data, COMPUTE)
    sigma_min = float_param(sigma_min, COMPUTE)
    c_skip, c_out, _, _ = _scalings(sigma, sigma_data, sigma_min, PARAM)
    x = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
    f = tl.load(f_ptr + offsets, mask=mask).to(COMPUTE)
    tl.store(out_ptr + offsets, (c_skip * x + c_out * f).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _precondition_bwd_kernel(
    grad_ptr,
    x_ptr,
    f_ptr,
    sigma_ptr,
    grad_x_ptr,
    grad_f_ptr,
    grad_sigma_partial_ptr,
    per_sample,
    blocks_per_sample,
    sigma_data: tl.float64,
    sigma_min: tl.float64,
    NEED_X: tl.constexpr,
    NEED_F: tl.constexpr,
    NEED_SIGMA: tl.constexpr,
    PARAM: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    sample, pid, offsets, mask = _sample_block(per_sample, blocks_per_sample, BLOCK_SIZE)
    sigma = tl.load(sigma_ptr + sample).to(COMPUTE)
    sigma_data = float_param(sigma_data, COMPUTE)
    sigma_min = float_param(sigma_min, COMPUTE)
    c_skip, c_out, d_c_skip, d_c_out = _scalings(sigma, sigma_data, sigma_min, PARAM)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(COMPUTE)
    if NEED_X:
        tl.store(grad_x_ptr + offsets, (c_skip * grad).to(grad_x_ptr.dtype.element_ty), mask=mask)
    if NEED_F:
        tl.store(grad_f_ptr + offsets, (c_out * grad).to(grad_f_ptr.dtype.element_ty), mask=mask)
    if NEED_SIGMA:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        f = tl.load(f_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        partial = tl.sum(grad * (d_c_skip * x + d_c_out * f), axis=0)
        tl.store(grad_sigma_partial_ptr + pid, partial)


@triton.jit
def _precondition_jvp_kernel(
    x_ptr,
    f_ptr,
    x_t_ptr,
    f_t_ptr,
    sigma_ptr,
    sigma_t_ptr,
    out_t_ptr,
    per_sample,
    blocks_per_sample,
    sigma_data: tl.float64,
    sigma_min: tl.float64,
    HAS_X_T: tl.constexpr,
    HAS_F_T: tl.constexpr,
    HAS_SIGMA_T: tl.constexpr,
    PARAM: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    sample, _, offsets, mask = _sample_block(per_sample, blocks_per_sample, BLOCK_SIZE)
    sigma = tl.load(sigma_ptr + sample).to(COMPUTE)
    sigma_data = float_param(sigma_data, COMPUTE)
    sigma_min = float_param(sigma_min, COMPUTE)
    c_skip, c_out, d_c_skip, d_c_out = _scalings(sigma, sigma_data, sigma_min, PARAM)
    out_t = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    if HAS_X_T:
        out_t += c_skip * tl.load(x_t_ptr + offsets, mask=mask).to(COMPUTE)
    if HAS_F_T:
        out_t += c_out * tl.load(f_t_ptr + offsets, mask=mask).to(COMPUTE)
    if HAS_SIGMA_T:
        sigma_t = tl.load(sigma_t_ptr + sample).to(COMPUTE)
        x = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
        f = tl.load(f_ptr + offsets, mask=mask).to(COMPUTE)
        out_t += sigma_t * (d_c_skip * x + d_c_out * f)
    tl.store(out_t_ptr + offsets, out_t.to(out_t_ptr.dtype.element_ty), mask=mask)


def _launch_geometry(x: torch.Tensor):
    return (*per_sample_blocks(x, BLOCK), compute_type(x))


def precondition_forward(
    x: torch.Tensor, net_out: torch.Tensor, sigma: torch.Tensor, param: str, sigma_data: float, sigma_min: float
) -> torch.Tensor:
    """x, net_out: contiguous, same shape/dtype; sigma: (B,) contiguous. Returns c_skip·x + c_out·net_out."""
    out = torch.empty_like(x)
    batch, per_sample, block, blocks_per_sample, compute = _launch_geometry(x)
    if out.numel():
        _precondition_fwd_kernel[(batch * blocks_per_sample,)](
            x,
            net_out,
            sigma,
            out,
            per_sample,
            blocks_per_sample,
            float(sigma_data),
            float(sigma_min),
            PARAM=PARAM_IDS[param],
            COMPUTE=compute,
            BLOCK_SIZE=block,
            num_warps=NUM_WARPS,
        )
    return out


def precondition_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    net_out: torch.Tensor,
    sigma: torch.Tensor,
    param: str,
    sigma_data: float,
    sigma_min: float,
    need_x: bool,
    need_net_out: bool,
    need_sigma: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_x, grad_net_out, grad_sigma (B,)); entries not asked for are empty (0,) tensors
    (a custom op cannot return None)."""
    batch, per_sample, block, blocks_per_sample, compute = _launch_geometry(x)
    grad_x = torch.empty_like(x) if need_x else x.new_zeros(0)
    grad_f = torch.empty_like(net_out) if need_net_out else net_out.new_zeros(0)
    partials = torch.empty((batch, blocks_per_sample), dtype=sigma.dtype, device=x.device) if need_sigma else None
    if x.numel() and (need_x or need_net_out or need_sigma):
        _precondition_bwd_kernel[(batch * blocks_per_sample,)](
            grad_out,
            x,
            net_out,
            sigma,
            grad_x,
            grad_f,
            partials if need_sigma else sigma,
            per_sample,
            blocks_per_sample,
            float(sigma_data),
            float(sigma_min),
            NEED_X=need_x,
            NEED_F=need_net_out,
            NEED_SIGMA=need_sigma,
            PARAM=PARAM_IDS[param],
            COMPUTE=compute,
            BLOCK_SIZE=block,
            num_warps=NUM_WARPS,
        )
    # Per-(sample, block) partials summed here, not with atomics, so the result is deterministic.
    grad_sigma = partials.sum(dim=1) if need_sigma else sigma.new_zeros(0)
    return grad_x, grad_f, grad_sigma


def precondition_jvp(
    x: torch.Tensor,
    net_out: torch.Tensor,
    sigma: torch.Tensor,
    x_t: Optional[torch.Tensor],
    net_out_t: Optional[torch.Tensor],
    sigma_t: Optional[torch.Tensor],
    param: str,
    sigma_data: float,
    sigma_min: float,
) -> torch.Tensor:
    """Output tangent c_skip·ẋ + c_out·Ḟ + σ̇·(c_skip'·x + c_out'·F); absent tangents are None."""
    out_t = torch.empty_like(x)
    batch, per_sample, block, blocks_per_sample, compute = _launch_geometry(x)
    if out_t.numel():
        _precondition_jvp_kernel[(batch * blocks_per_sample,)](
            x,
            net_out,
            x if x_t is None else x_t,
            x if net_out_t is None else net_out_t,
            sigma,
            sigma if sigma_t is None else sigma_t,
            out_t,
            per_sample,
            blocks_per_sample,
            float(sigma_data),
            float(sigma_min),
            HAS_X_T=x_t is not None,
            HAS_F_T=net_out_t is not None,
            HAS_SIGMA_T=sigma_t is not None,
            PARAM=PARAM_IDS[param],
            COMPUTE=compute,
            BLOCK_SIZE=block,
            num_warps=NUM_WARPS,
        )
    return out_t
