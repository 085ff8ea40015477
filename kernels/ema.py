"""Triton kernel for the multi-profile EMA update: every parameter read once, K float32 shadows updated.

Multi-tensor layout. The parameters stay where the model keeps them (separate tensors: the
optimizer, FSDP and user code hold references to them, so re-pointing them into one buffer is not
ours to do); their addresses go into a device table instead, as int64, and each program turns one
entry back into a pointer. The shadows are ours: one float32 buffer (K, total), profile k's
shadow of parameter j at row k, columns [offset_j, offset_j + numel_j). A chunk table lists
(parameter index, first element) for every BLOCK-sized chunk of every parameter, so one launch
covers all parameters of one dtype with evenly sized programs, however unequal the parameters are.
Per program: load the chunk of θ once (bf16/fp16/fp32, widened to fp32), then for each profile
load, update and store its shadow chunk: bytes moved = |θ| + 2·K·4·numel, the floor.
"""

import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _ema_update_kernel(
    param_addresses_ptr,
    param_numels_ptr,
    shadow_offsets_ptr,
    chunk_params_ptr,
    chunk_starts_ptr,
    shadow_ptr,
    weights_ptr,
    shadow_row_stride,
    num_profiles,
    PARAM_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    chunk = tl.program_id(0)
    param = tl.load(chunk_params_ptr + chunk)
    start = tl.load(chunk_starts_ptr + chunk)
    numel = tl.load(param_numels_ptr + param)
    param_ptr = tl.load(param_addresses_ptr + param).to(tl.pointer_type(PARAM_DTYPE))
    cols = start + tl.arange(0, BLOCK_SIZE).to(tl.int64)
    mask = cols < numel
    theta = tl.load(param_ptr + cols, mask=mask).to(tl.float32)
    shadow_cols = tl.load(shadow_offsets_ptr + param) + cols
    for k in range(num_profiles):
        # Lerp form s + w·(θ − s): a shadow equal to θ stays exactly θ whatever the rounding of w.
        weight = tl.load(weights_ptr + k)
        row = shadow_ptr + k * shadow_row_stride + shadow_cols
        shadow = tl.load(row, mask=mask)
        tl.store(row, shadow + weight * (theta - shadow), mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def chunk_table(numels: torch.Tensor, block: int):
    """(chunk_params, chunk_starts), int64 (C,): the parameter index and first element of every
    `block`-sized chunk of parameters with `numels` elements, in order."""
    counts = (numels + block - 1) // block
    chunk_params = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_starts = (torch.arange(int(counts.sum())) - first_chunk[chunk_params]) * block
    return chunk_params, chunk_starts


def ema_update_(
    param_addresses: torch.Tensor,
    param_numels: torch.Tensor,
    shadow_offsets: torch.Tensor,
    chunk_params: torch.Tensor,
    chunk_starts: torch.Tensor,
    shadow: torch.Tensor,
    weights: torch.Tensor,
    param_dtype: torch.dtype,
    block: int,
) -> None:
    """In place: shadow[k, offset_j + i] += weights[k]·(θ_j[i] − shadow[k, offset_j + i]) for every
    parameter j in the table (all of dtype `param_dtype`, contiguous, at the int64 addresses
    `param_addresses`) and profile k. shadow: float32 (K, total) with unit column stride; weights:
    float32 (K,) = 1 − β_k; the tables: int64 on the shadow's device (chunk_table with `block`)."""
    if chunk_params.numel() == 0:
        return
    _ema_update_kernel[(chunk_params.numel(),)](
        param_addresses,
        param_numels,
        shadow_offsets,
        chunk_params,
        chunk_starts,
        shadow,
        weights,
        shadow.stride(0),
        shadow.shape[0],
        PARAM_DTYPE=_TL_DTYPES[param_dtype],
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
