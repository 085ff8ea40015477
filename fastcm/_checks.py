"""Argument checks shared by every op. Each error names the argument, what was received
and what is accepted."""

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, name: str, value, *, dtypes=FLOAT_DTYPES, min_dim: int = 0) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fastcm.{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(
            f"fastcm.{op}: {name} has dtype {value.dtype}; supported: {_dtype_names(dtypes)}")
    if value.dim() < min_dim:
        raise ValueError(
            f"fastcm.{op}: {name} must have at least {min_dim} dimension(s), got shape {tuple(value.shape)}")


def check_same_shape(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(
            f"fastcm.{op}: {name} has shape {tuple(value.shape)} but {ref_name} has shape "
            f"{tuple(ref.shape)}; they must match")


def check_same_dtype(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.dtype != ref.dtype:
        raise TypeError(
            f"fastcm.{op}: {name} has dtype {value.dtype} but {ref_name} has dtype {ref.dtype}; "
            f"they must match")


def check_same_device(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(
            f"fastcm.{op}: {name} is on {value.device} but {ref_name} is on {ref.device}; "
            f"all tensors must be on one device")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"fastcm.{op}: {name}={value!r} is not supported; expected one of {tuple(choices)}")
