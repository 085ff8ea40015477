"""Per-sample parameters (sigma, t, weights).

A per-sample parameter is a Python float, a 0-d tensor, or a tensor with B = x.shape[0]
elements laid out as (B,) or (B, 1, ..., 1); it broadcasts over every non-batch dim.
"""

import torch

from ._checks import compute_dtype


def per_sample(op: str, name: str, value, x: torch.Tensor, *, dtype=None) -> torch.Tensor:
    """Return `value` as a contiguous (B,) tensor on x.device, in `dtype`
    (default: float64 for float64 x, else float32). Differentiable: gradients flow back to a
    tensor `value` through the expand/reshape/cast."""
    batch = x.shape[0]
    if dtype is None:
        dtype = compute_dtype(x)
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(
            f"fastcm.{op}: {name} must be a float, a 0-d tensor or a tensor of {batch} per-sample "
            f"values, got {type(value).__name__}"
        )
    if not isinstance(value, torch.Tensor):
        return torch.full((batch,), float(value), dtype=dtype, device=x.device)
    if not value.is_floating_point():
        raise TypeError(f"fastcm.{op}: {name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != x.device:
        raise ValueError(f"fastcm.{op}: {name} is on {value.device} but x is on {x.device}")
    if value.dim() == 0:
        return value.to(dtype).expand(batch).contiguous()
    if value.shape[0] != batch or value.numel() != batch:
        raise ValueError(
            f"fastcm.{op}: {name} has shape {tuple(value.shape)}; expected a scalar or {batch} "
            f"per-sample values shaped ({batch},) or ({batch}, 1, ..., 1)"
        )
    return value.reshape(batch).to(dtype).contiguous()


def sum_to_param(grad: torch.Tensor, value):
    """Reduce a (B,) gradient to the shape and dtype of the parameter it belongs to
    (None for Python floats and tensors that do not require grad)."""
    if not isinstance(value, torch.Tensor):
        return None
    if value.dim() == 0:
        return grad.sum().to(value.dtype)
    return grad.reshape(value.shape).to(value.dtype)


def view_per_sample(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so that it broadcasts against x."""
    return param.reshape((x.shape[0],) + (1,) * (x.dim() - 1))
