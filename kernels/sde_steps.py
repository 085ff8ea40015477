"""Triton kernel for the stochastic and higher-order sampler steps (fastcm.sde_steps).

Every one of those updates is linear in its tensor inputs once the per-sample coefficients are
known, with up to four tensor terms (DPM-Solver++(3M) SDE: x, D, D_1, D_2) plus noise, so one
kernel serves them all, their backward and their jvp:

    out[b] = c0[b]·t0[b] + c1[b]·t1[b] + c2[b]·t2[b] + c3[b]·t3[b] + c4[b]·z[b]

z is a given tensor or standard normal noise drawn in the kernel with the same Philox stream as
fastcm.kernels.steps (element i of the flattened call at counter offset + i under key `seed`), so a
step of either family with the same (seed, offset) sees the same z. Coefficients are 5 scalars
shared by the batch or a (B, 5) tensor.

Layout: all tensors contiguous, viewed as (B, D); each program handles BLOCK elements of one
sample, so per-sample coefficients are one scalar load per program.
"""

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import compute_type, float64_rows, per_sample_blocks

BLOCK = 2048
NUM_WARPS = 8  # 4 warps spill on sm_90 with four fp16 terms and a noise tensor at BLOCK = 2048

NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2


@triton.jit
def _combination_kernel(
    out_ptr,
    t0_ptr,
    t1_ptr,
    t2_ptr,
    t3_ptr,
    noise_ptr,
    coef_ptr,
    c0,
    c1,
    c2,
    c3,
    c4,
    seed,
    offset,
    per_sample,
    blocks_per_sample,
    HAS_T0: tl.constexpr,
    HAS_T1: tl.constexpr,
    HAS_T2: tl.constexpr,
    HAS_T3: tl.constexpr,
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
        c0 = tl.load(coef_ptr + sample * 5)
        c1 = tl.load(coef_ptr + sample * 5 + 1)
        c2 = tl.load(coef_ptr + sample * 5 + 2)
        c3 = tl.load(coef_ptr + sample * 5 + 3)
        c4 = tl.load(coef_ptr + sample * 5 + 4)
    acc = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
    if HAS_T0:
        acc += c0 * tl.load(t0_ptr + index, mask=mask).to(COMPUTE)
    if HAS_T1:
        acc += c1 * tl.load(t1_ptr + index, mask=mask).to(COMPUTE)
    if HAS_T2:
        acc += c2 * tl.load(t2_ptr + index, mask=mask).to(COMPUTE)
    if HAS_T3:
        acc += c3 * tl.load(t3_ptr + index, mask=mask).to(COMPUTE)
    if NOISE == 1:
        acc += c4 * tl.load(noise_ptr + index, mask=mask).to(COMPUTE)
    if NOISE == 2:
        acc += c4 * tl.randn(seed, offset + index).to(COMPUTE)
    tl.store(out_ptr + index, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combination_into(
    out: torch.Tensor,
    t0: Optional[torch.Tensor],
    t1: Optional[torch.Tensor],
    t2: Optional[torch.Tensor],
    t3: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    coefs: Optional[torch.Tensor],
    scalar_coefs: List[float],
    seed: int,
    offset: int,
    philox: bool,
) -> torch.Tensor:
    """out = c0·t0 + c1·t1 + c2·t2 + c3·t3 + c4·z, written into `out` (contiguous; may alias an input).

    Terms that are None are left out; z is `noise` if given, Philox N(0, 1) noise from
    (seed, offset) if `philox`, else absent. Coefficients: `coefs` (B, 5) in the compute dtype, or
    the five Python floats `scalar_coefs` (float64 inputs always pass a tensor, since Triton takes
    Python floats as float32)."""
    batch, per_sample, block, blocks_per_sample = per_sample_blocks(out, BLOCK)
    compute = compute_type(out)
    if out.dtype == torch.float64 and coefs is None:
        coefs = float64_rows(scalar_coefs, batch, out.device)
    if out.numel() == 0:
        return out
    noise_mode = NOISE_TENSOR if noise is not None else NOISE_PHILOX if philox else NOISE_NONE
    _combination_kernel[(batch * blocks_per_sample,)](
        out,
        out if t0 is None else t0,
        out if t1 is None else t1,
        out if t2 is None else t2,
        out if t3 is None else t3,
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
        HAS_T3=t3 is not None,
        NOISE=noise_mode,
        PER_SAMPLE_COEFS=coefs is not None,
        COMPUTE=compute,
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
    return out


def combination(
    like: torch.Tensor,
    t0: Optional[torch.Tensor],
    t1: Optional[torch.Tensor],
    t2: Optional[torch.Tensor],
    t3: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    coefs: Optional[torch.Tensor],
    scalar_coefs: List[float],
    seed: int,
    offset: int,
    philox: bool,
) -> torch.Tensor:
    """combination_into a new tensor shaped and typed like `like`."""
    return combination_into(
        torch.empty_like(like, memory_format=torch.contiguous_format),
        t0,
        t1,
        t2,
        t3,
        noise,
        coefs,
        scalar_coefs,
        seed,
        offset,
        philox,
    )


__all__ = ["combination", "combination_into"]
