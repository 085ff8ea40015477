"""Argument checks shared by every op. Each error names the argument, what was received
and what is accepted."""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def compute_dtype(x) -> torch.dtype:
    """The dtype an op computes and keeps its statistics in: float64 for float64 x (a tensor or a
    dtype), else float32."""
    dtype = x.dtype if isinstance(x, torch.Tensor) else x
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, name: str, value, *, dtypes=FLOAT_DTYPES, min_dim: int = 0) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fastcm.{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"fastcm.{op}: {name} has dtype {value.dtype}; supported: {_dtype_names(dtypes)}")
    if value.dim() < min_dim:
        raise ValueError(
            f"fastcm.{op}: {name} must have at least {min_dim} dimension(s), got shape {tuple(value.shape)}"
        )


def check_same_shape(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(
            f"fastcm.{op}: {name} has shape {tuple(value.shape)} but {ref_name} has shape "
            f"{tuple(ref.shape)}; they must match"
        )


def check_same_dtype(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.dtype != ref.dtype:
        raise TypeError(
            f"fastcm.{op}: {name} has dtype {value.dtype} but {ref_name} has dtype {ref.dtype}; they must match"
        )


def check_same_device(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(
            f"fastcm.{op}: {name} is on {value.device} but {ref_name} is on {ref.device}; "
            f"all tensors must be on one device"
        )


def check_like(op: str, name: str, value, ref_name: str, ref: torch.Tensor, *, min_dim: int = 0) -> None:
    """`value` is a float tensor of ref's shape, dtype and device."""
    check_tensor(op, name, value, min_dim=min_dim)
    check_same_shape(op, name, value, ref_name, ref)
    check_same_dtype(op, name, value, ref_name, ref)
    check_same_device(op, name, value, ref_name, ref)


def check_positive(op: str, name: str, value, *, allow_zero: bool = False, hint: str = "") -> None:
    """A positive (or, with allow_zero, non-negative) finite Python number; `hint` names an
    alternative, e.g. " (or None for ...)"."""
    accepted = "a finite float >= 0" if allow_zero else "a positive finite float"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fastcm.{op}: {name} must be {accepted}{hint}, got {type(value).__name__}")
    if not ((value >= 0 if allow_zero else value > 0) and math.isfinite(value)):
        raise ValueError(f"fastcm.{op}: {name}={value!r} is not supported; expected {accepted}{hint}")


def check_finite(op: str, name: str, value) -> None:
    """A finite Python number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"fastcm.{op}: {name} must be a finite float, got {value!r}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"fastcm.{op}: {name}={value!r} is not supported; expected one of {tuple(choices)}")
