"""Triton kernels for the distribution-matching losses: one pass over the inputs producing per-sample
partial sums; the per-sample epilogue (a few B-sized ops) and the backward (one elementwise linear
combination, kernels/steps.py) live in fastcm/dmd.py.

Layout: tensors contiguous, viewed as (B, D); each program handles BLOCK elements of one sample and
writes its partial sums to (B, blocks, K), summed on the host side of the launch (deterministic, no
atomics).
"""

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, compute_type, per_sample_blocks

BLOCK = 2048
NUM_WARPS = 4


@triton.jit
def _dmd_sums_kernel(
    x_ptr,
    real_ptr,
    fake_ptr,
    partial_ptr,
    per_sample,
    blocks_per_sample,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    cols = (pid % blocks_per_sample) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < per_sample
    index = sample.to(tl.int64) * per_sample + cols
    x = tl.load(x_ptr + index, mask=mask, other=0.0).to(COMPUTE)
    real = tl.load(real_ptr + index, mask=mask, other=0.0).to(COMPUTE)
    fake = tl.load(fake_ptr + index, mask=mask, other=0.0).to(COMPUTE)
    difference = fake - real
    tl.store(partial_ptr + pid * 2, tl.sum(tl.abs(x - real), axis=0))
    tl.store(partial_ptr + pid * 2 + 1, tl.sum(difference * difference, axis=0))


@triton.jit
def _denoising_sums_kernel(
    out_ptr,
    x0_ptr,
    noise_ptr,
    coef_ptr,
    partial_ptr,
    per_sample,
    blocks_per_sample,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    cols = (pid % blocks_per_sample) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < per_sample
    index = sample.to(tl.int64) * per_sample + cols
    p = tl.load(coef_ptr + sample * 2)
    q = tl.load(coef_ptr + sample * 2 + 1)
    out = tl.load(out_ptr + index, mask=mask, other=0.0).to(COMPUTE)
    x0 = tl.load(x0_ptr + index, mask=mask, other=0.0).to(COMPUTE)
    noise = tl.load(noise_ptr + index, mask=mask, other=0.0).to(COMPUTE)
    residual = out - (p * x0 + q * noise)
    tl.store(partial_ptr + pid, tl.sum(residual * residual, axis=0))


def _geometry(x: torch.Tensor):
    return (*per_sample_blocks(x, BLOCK), compute_dtype(x))


def dmd_sums(x: torch.Tensor, real_denoised: torch.Tensor, fake_denoised: torch.Tensor) -> torch.Tensor:
    """Per sample (Σ|x − D_real|, Σ(D_fake − D_real)²): a (B, 2) tensor in the compute dtype.
    Inputs contiguous, one shape and dtype, at least one element per sample."""
    batch, per_sample, block, blocks_per_sample, work = _geometry(x)
    partials = torch.empty((batch, blocks_per_sample, 2), dtype=work, device=x.device)
    _dmd_sums_kernel[(batch * blocks_per_sample,)](
        x,
        real_denoised,
        fake_denoised,
        partials,
        per_sample,
        blocks_per_sample,
        COMPUTE=compute_type(work),
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    return partials.sum(dim=1)


def denoising_sums(net_out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
    """Per sample Σ(net_out − p·x0 − q·ε)² with coefs (B, 2) = (p, q) in the compute dtype: a (B,) tensor."""
    batch, per_sample, block, blocks_per_sample, work = _geometry(net_out)
    partials = torch.empty((batch, blocks_per_sample), dtype=work, device=net_out.device)
    _denoising_sums_kernel[(batch * blocks_per_sample,)](
        net_out,
        x0,
        noise,
        coefs,
        partials,
        per_sample,
        blocks_per_sample,
        COMPUTE=compute_type(work),
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    return partials.sum(dim=1)
