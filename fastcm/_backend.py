"""Backend selection: which implementation runs a call.

FASTCM_BACKEND is read on every call (not at import), so tests and users can switch it
at run time. Values:
  auto       CUDA tensors -> the fast path (Triton kernels, or the CUDA extension for
             attention); CPU tensors -> the reference (the C++ CPU extension for attention).
  triton     Triton kernels; on CPU tensors only when TRITON_INTERPRET=1 was set before
             triton was imported.
  cuda       the compiled extension in csrc/ (attention; its C++ implementation serves CPU tensors).
  reference  the pure-PyTorch implementation in fastcm/reference.
"""

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")


def requested_backend() -> str:
    value = os.environ.get("FASTCM_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTCM_BACKEND={value!r} is not a backend; expected one of {BACKENDS}")
    return value


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# find_spec locates the package without importing it.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of `device`."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreter_enabled()


def select_backend(op: str, device: torch.device, implemented=("triton", "reference")) -> str:
    """Resolve FASTCM_BACKEND for one call of `op` on `device`.

    `implemented` lists the backends `op` has besides the reference. An explicitly requested
    backend that cannot run here raises RuntimeError saying why, never falls back silently.
    """
    requested = requested_backend()
    if requested == "auto":
        if device.type == "cuda" and "triton" in implemented and triton_runs_on(device):
            return "triton"
        if "cuda" in implemented:  # the compiled extension serves CPU and CUDA tensors alike
            return "cuda"
        return "reference"
    if requested == "reference":
        return "reference"
    if requested not in implemented:
        raise RuntimeError(
            f"fastcm.{op}: FASTCM_BACKEND={requested!r} is not implemented for this op; "
            f"it supports {tuple(implemented) + ('reference',)}"
        )
    if requested == "triton" and not triton_runs_on(device):
        reason = (
            "triton is not installed"
            if not triton_installed()
            else "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before import "
            "to run them on CPU tensors in the interpreter"
        )
        raise RuntimeError(f"fastcm.{op}: FASTCM_BACKEND='triton' cannot run on {device}: {reason}")
    return requested
