"""Launch helpers shared by the Triton families: the compute type and the per-sample grid.

Every per-sample family views its (B, ...) tensors as (B, D) and gives each program a block of
one sample's D elements, so that per-sample scalars are loaded once per program.
"""

import torch
import triton
import triton.language as tl

from .._checks import compute_dtype

__all__ = ["compute_dtype", "compute_type", "float64_rows", "float_param", "per_sample_blocks"]


def compute_type(x):
    """The register type of a kernel over x (a tensor or a dtype): float64 for float64, float32 otherwise."""
    return tl.float64 if compute_dtype(x) == torch.float64 else tl.float32


def per_sample_blocks(x: torch.Tensor, max_block: int):
    """(batch B, elements per sample D, block, blocks per sample) for a (B, ...) tensor x. The block
    is the smallest power of two ≥ D (at least 16, Triton's smallest useful vector), capped at
    max_block."""
    batch = x.shape[0]
    per_sample = x.numel() // batch if batch else 0
    block = min(max_block, max(triton.next_power_of_2(per_sample), 16))
    return batch, per_sample, block, triton.cdiv(per_sample, block)


def float64_rows(values, batch: int, device) -> torch.Tensor:
    """(batch, len(values)) float64 tensor whose columns are the Python floats `values`, filled on
    `device` (kernels take Python floats as float32, so float64 paths pass their scalars this way).
    Fills, not a host-to-device copy: a CUDA-graph capture accepts the former only."""
    rows = torch.empty(batch, len(values), dtype=torch.float64, device=device)
    for column, value in enumerate(values):
        rows[:, column].fill_(value)
    return rows


@triton.jit
def float_param(value, COMPUTE: tl.constexpr):
    """A float kernel argument (sigma_data, c, 1/B, ...) in the compute type. Declare the parameter
    `name: tl.float64`: on a GPU, Triton passes an unannotated Python float as a float32, so a float64
    kernel would compute with c = 0.1 rounded to 0.10000000149 (relative error up to 3e-8). Triton's
    interpreter keeps the Python float and hides this; tl.full makes it the compute type in both."""
    return tl.full((), value, COMPUTE)
