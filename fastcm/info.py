"""`python -m fastcm.info`: versions, build flags and which backends can run here."""

import importlib.util
import os
import platform

import torch

import fastcm

from ._backend import requested_backend, triton_installed, triton_interpreter_enabled
from ._extension import extension_status


def report() -> str:
    lines = [
        f"fastcm {fastcm.__version__}",
        f"python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    if triton_installed():
        import triton

        lines.append(f"triton {triton.__version__}")
    else:
        lines.append("triton not installed")
    cuda = torch.cuda.is_available()
    lines.append(
        "CUDA device: "
        + (
            f"{torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})"
            if cuda
            else "none"
        )
    )
    lines.append(f"extension fastcm._C: {extension_status()}")
    lines.append(f"FASTCM_BACKEND={os.environ.get('FASTCM_BACKEND', '')!r} -> {requested_backend()}")
    lines.append(f"TRITON_INTERPRET={'1' if triton_interpreter_enabled() else '0'}")
    backends = {
        "reference": "yes (CPU and CUDA tensors)",
        "triton": (
            "yes (CUDA tensors)"
            if cuda and triton_installed()
            else "interpreter only (CPU tensors, TRITON_INTERPRET=1)"
            if triton_installed() and triton_interpreter_enabled()
            else "no (needs triton and a CUDA device, or TRITON_INTERPRET=1)"
        ),
        "cuda": ("installed" if importlib.util.find_spec("fastcm._C") else "not built (JIT build on first use)"),
    }
    lines += [f"backend {name}: {state}" for name, state in backends.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
