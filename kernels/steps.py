"""Triton kernels for the sampler steps.

Every step (Euler, Heun, DPM-Solver++(2M), DDIM, CM/TrigFlow re-noising, CFG) is linear in its
tensor inputs once the per-sample coefficients are known, so one kernel serves them all, their
backward and their jvp:

    out[b] = c0[b]·t0[b] + c1[b]·t1[b] + c2[b]·t2[b] + c3[b]·z[b]

with up to three tensor terms, and z either a given tensor or standard normal noise drawn in the
kernel (Philox: element i of the flattened call uses counter offset + i under key `seed`; the noise
is never written to memory). Coefficients are 4 scalars shared by the batch or a (B, 4) tensor.
A second kernel computes the per-sample moments that CFG's rescale needs.

Layout: all tensors contiguous, viewed as (B, D); each program handles BLOCK elements of one
sample, so per-sample coefficients are one scalar load per program.
"""

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, compute_type, float64_rows, per_sample_blocks

BLOCK = 2048
NUM_WARPS = 4
MOMENTS_BLOCK = 4096

NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2


@triton.jit
def _linear_combination_kernel(
    out_ptr,
    t0_ptr,
    t1_ptr,
    t2_ptr,
    noise_ptr,
    coef_ptr,
    c0,
    c1,
    c2,
    c3,
    seed,
    offset,
    per_sample,
    blocks_per_sample,
    HAS_T0: tl.constexpr,
    HAS_T1: tl.constexpr,
    HAS_T2: tl.constexpr,
    NOISE: tl.constexpr,
    PER_SAMPLE_COEFS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    cols = (pid % blocks_per_sample) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < per_sample
    index = sample.to(tl.int64) * per_sample + cols
    if PER_SAMPLE_COEFS:
        c0 = tl.load(coef_ptr + sample * 4)
        c1 = tl.load(coef_ptr + sample * 4 + 1)
        c2 = tl.load(coef_ptr + sample * 4 + 2)
        c3 = tl.load(coef_ptr + sample * 4 + 3)
    acc = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    if HAS_T0:
        acc += c0 * tl.load(t0_ptr + index, mask=mask).to(COMPUTE)
    if HAS_T1:
        acc += c1 * tl.load(t1_ptr + index, mask=mask).to(COMPUTE)
    if HAS_T2:
        acc += c2 * tl.load(t2_ptr + index, mask=mask).to(COMPUTE)
    if NOISE == 1:
        acc += c3 * tl.load(noise_ptr + index, mask=mask).to(COMPUTE)
    if NOISE == 2:
        acc += c3 * tl.randn(seed, offset + index).to(COMPUTE)
    tl.store(out_ptr + index, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _guided_moments_kernel(
    cond_ptr,
    uncond_ptr,
    scale_ptr,
    scale,
    partial_ptr,
    per_sample,
    blocks_per_sample,
    PER_SAMPLE_SCALE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    cols = (pid % blocks_per_sample) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < per_sample
    index = sample.to(tl.int64) * per_sample + cols
    if PER_SAMPLE_SCALE:
        scale = tl.load(scale_ptr + sample)
    cond = tl.load(cond_ptr + index, mask=mask, other=0.0).to(COMPUTE)
    uncond = tl.load(uncond_ptr + index, mask=mask, other=0.0).to(COMPUTE)
    guided = uncond + scale * (cond - uncond)
    count = tl.sum(mask.to(COMPUTE), axis=0)
    # Block mean and sum of squared deviations (merged across blocks with Chan's formula on the
    # host): no E[x²] − E[x]² cancellation when the mean is large against the spread.
    mean_cond = tl.sum(cond, axis=0) / count
    mean_guided = tl.sum(guided, axis=0) / count
    dev_cond = tl.where(mask, cond - mean_cond, 0.0)
    dev_guided = tl.where(mask, guided - mean_guided, 0.0)
    tl.store(partial_ptr + pid * 4, mean_cond)
    tl.store(partial_ptr + pid * 4 + 1, tl.sum(dev_cond * dev_cond, axis=0))
    tl.store(partial_ptr + pid * 4 + 2, mean_guided)
    tl.store(partial_ptr + pid * 4 + 3, tl.sum(dev_guided * dev_guided, axis=0))


def _geometry(like: torch.Tensor, block: int):
    return (*per_sample_blocks(like, block), compute_type(like))


def linear_combination_into(
    out: torch.Tensor,
    t0: Optional[torch.Tensor],
    t1: Optional[torch.Tensor],
    t2: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    coefs: Optional[torch.Tensor],
    scalar_coefs: List[float],
    seed: int,
    offset: int,
    philox: bool,
) -> torch.Tensor:
    """out = c0·t0 + c1·t1 + c2·t2 + c3·z, written into `out` (contiguous; may alias an input).

    Terms that are None are left out; z is `noise` if given, Philox N(0, 1) noise from
    (seed, offset) if `philox`, else absent. Coefficients: `coefs` (B, 4) in the compute dtype,
    or the four Python floats `scalar_coefs` (float64 inputs always pass a tensor, since Triton
    takes Python floats as float32)."""
    batch, per_sample, block, blocks_per_sample, compute = _geometry(out, BLOCK)
    if out.dtype == torch.float64 and coefs is None:
        coefs = float64_rows(scalar_coefs, batch, out.device)
    if out.numel() == 0:
        return out
    noise_mode = NOISE_TENSOR if noise is not None else NOISE_PHILOX if philox else NOISE_NONE
    _linear_combination_kernel[(batch * blocks_per_sample,)](
        out,
        out if t0 is None else t0,
        out if t1 is None else t1,
        out if t2 is None else t2,
        out if noise is None else noise,
        out if coefs is None else coefs,
        *[float(c) for c in scalar_coefs],
        int(seed),
        int(offset),
        per_sample,
        blocks_per_sample,
        HAS_T0=t0 is not None,
        HAS_T1=t1 is not None,
        HAS_T2=t2 is not None,
        NOISE=noise_mode,
        PER_SAMPLE_COEFS=coefs is not None,
        COMPUTE=compute,
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    return out


def linear_combination(
    like: torch.Tensor,
    t0: Optional[torch.Tensor],
    t1: Optional[torch.Tensor],
    t2: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    coefs: Optional[torch.Tensor],
    scalar_coefs: List[float],
    seed: int,
    offset: int,
    philox: bool,
) -> torch.Tensor:
    """linear_combination_into a new tensor shaped and typed like `like`."""
    return linear_combination_into(
        torch.empty_like(like, memory_format=torch.contiguous_format),
        t0,
        t1,
        t2,
        noise,
        coefs,
        scalar_coefs,
        seed,
        offset,
        philox,
    )


def guided_moments(
    eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: Optional[torch.Tensor], scalar_scale: float
) -> torch.Tensor:
    """Per-sample (mean ε_c, std ε_c, mean ε̃, std ε̃), ε̃ = ε_u + w·(ε_c − ε_u), std unbiased, as a
    (B, 4) tensor in the compute dtype. w: `scale` (B,) in the compute dtype, or `scalar_scale`."""
    batch, per_sample, block, blocks_per_sample, compute = _geometry(eps_cond, MOMENTS_BLOCK)
    work = compute_dtype(eps_cond)
    if eps_cond.dtype == torch.float64 and scale is None:
        scale = torch.full((batch,), scalar_scale, dtype=torch.float64, device=eps_cond.device)
    partial = torch.empty((batch, blocks_per_sample, 4), dtype=work, device=eps_cond.device)
    if eps_cond.numel():
        _guided_moments_kernel[(batch * blocks_per_sample,)](
            eps_cond,
            eps_uncond,
            eps_cond if scale is None else scale,
            float(scalar_scale),
            partial,
            per_sample,
            blocks_per_sample,
            PER_SAMPLE_SCALE=scale is not None,
            COMPUTE=compute,
            BLOCK_SIZE=block,
            num_warps=NUM_WARPS,
        )
    counts = torch.full((blocks_per_sample,), float(block), dtype=torch.float64, device=eps_cond.device)
    counts[-1] = per_sample - block * (blocks_per_sample - 1)
    partial = partial.to(torch.float64)
    means = (partial[:, :, 0::2] * counts[None, :, None]).sum(1) / per_sample
    spread = partial[:, :, 1::2].sum(1) + (counts[None, :, None] * (partial[:, :, 0::2] - means[:, None, :]) ** 2).sum(
        1
    )
    std = torch.sqrt(spread / (per_sample - 1))
    return torch.stack([means[:, 0], std[:, 0], means[:, 1], std[:, 1]], dim=1).to(work)


__all__ = ["linear_combination", "linear_combination_into", "guided_moments"]
