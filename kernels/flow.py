"""Triton kernel for forward noising: x_t = α·x0 + s·ε and the training target p·x0 + q·ε in one pass.

Layout: x0 (and ε) contiguous, viewed as (B, D); coefficients a contiguous (B, 4) tensor (α, s, p, q) in
the compute dtype; each program handles BLOCK elements of one sample. ε is a given tensor or standard
normal noise drawn in the kernel: element i of the flattened call uses Philox counter offset + i under key
`seed`, the stream of kernels/steps.py, so its linear-combination kernel redraws the same ε for the
backward and the jvp. The noise is never written to memory.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import compute_type, per_sample_blocks

BLOCK = 2048
NUM_WARPS = 4


@triton.jit
def _noising_kernel(
    x0_ptr,
    noise_ptr,
    coef_ptr,
    x_t_ptr,
    target_ptr,
    seed,
    offset,
    per_sample,
    blocks_per_sample,
    PHILOX: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    cols = (pid % blocks_per_sample) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < per_sample
    index = sample.to(tl.int64) * per_sample + cols
    alpha = tl.load(coef_ptr + sample * 4)
    sigma = tl.load(coef_ptr + sample * 4 + 1)
    p = tl.load(coef_ptr + sample * 4 + 2)
    q = tl.load(coef_ptr + sample * 4 + 3)
    x0 = tl.load(x0_ptr + index, mask=mask).to(COMPUTE)
    if PHILOX:
        noise = tl.randn(seed, offset + index).to(COMPUTE)
    else:
        noise = tl.load(noise_ptr + index, mask=mask).to(COMPUTE)
    tl.store(x_t_ptr + index, (alpha * x0 + sigma * noise).to(x_t_ptr.dtype.element_ty), mask=mask)
    tl.store(target_ptr + index, (p * x0 + q * noise).to(target_ptr.dtype.element_ty), mask=mask)


def add_noise(
    x0: torch.Tensor, noise: Optional[torch.Tensor], coefs: torch.Tensor, seed: int, offset: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(α·x0 + s·ε, p·x0 + q·ε) with coefs (B, 4) = (α, s, p, q); ε = `noise` or, if None, Philox(seed, offset)."""
    x_t, target = torch.empty_like(x0), torch.empty_like(x0)
    batch, per_sample, block, blocks_per_sample = per_sample_blocks(x0, BLOCK)
    if x0.numel():
        _noising_kernel[(batch * blocks_per_sample,)](
            x0,
            x0 if noise is None else noise,
            coefs,
            x_t,
            target,
            int(seed),
            int(offset),
            per_sample,
            blocks_per_sample,
            PHILOX=noise is None,
            COMPUTE=compute_type(x0),
            BLOCK_SIZE=block,
            num_warps=NUM_WARPS,
        )
    return x_t, target
