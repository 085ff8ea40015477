"""Lazy loading of the compiled extension fastcm._C (csrc/).

Nothing is loaded at `import fastcm`: the first op that needs the extension calls
`extension_ops()`. If the prebuilt module is missing, a source checkout is JIT-compiled with
torch.utils.cpp_extension (ninja) into the torch extensions cache; if that fails too, the
error says what to do.
"""

import functools
import glob
import os
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent.parent / "csrc"


class ExtensionUnavailable(RuntimeError):
    pass


def _jit_build():
    from torch.utils.cpp_extension import load

    sources = sorted(glob.glob(str(_CSRC / "*.cpp")))
    if not sources:
        raise ExtensionUnavailable(f"no C++ sources under {_CSRC}")
    load(
        name="fastcm_C_jit",
        sources=sources,
        extra_cflags=["-O3", "-std=c++17"],
        is_python_module=False,
        verbose=os.environ.get("FASTCM_VERBOSE_BUILD") == "1",
    )


@functools.lru_cache(maxsize=None)
def load_extension() -> str:
    """Load the extension once; return how it was obtained ("prebuilt" or "jit")."""
    try:
        import fastcm._C  # noqa: F401  (registers torch.ops.fastcm.*)

        return "prebuilt"
    except ImportError as prebuilt_error:
        if os.environ.get("FASTCM_NO_JIT") == "1":
            raise ExtensionUnavailable(
                f"fastcm's compiled extension fastcm._C is not importable ({prebuilt_error}) and "
                "FASTCM_NO_JIT=1 forbids a JIT build. Reinstall with `pip install --no-build-isolation "
                "-e .` against the torch you run, or set FASTCM_BACKEND=reference."
            ) from prebuilt_error
        try:
            _jit_build()
        except Exception as jit_error:
            raise ExtensionUnavailable(
                f"fastcm's compiled extension fastcm._C is not importable ({prebuilt_error}), and the "
                f"JIT build from {_CSRC} failed ({type(jit_error).__name__}: {jit_error}). Install "
                "ninja and a C++17 compiler and reinstall with `pip install --no-build-isolation -e .` "
                f"against this torch ({torch.__version__}), or set FASTCM_BACKEND=reference."
            ) from jit_error
        return "jit"


def extension_ops():
    """torch.ops.fastcm, with the extension loaded."""
    load_extension()
    return torch.ops.fastcm


def extension_status() -> str:
    """One line for `python -m fastcm.info`; never builds anything."""
    try:
        import fastcm._C  # noqa: F401
    except ImportError as error:
        return f"not built ({error}); a JIT build is attempted on first use"
    cuda = hasattr(torch.ops.fastcm, "has_cuda") and bool(torch.ops.fastcm.has_cuda())
    return f"prebuilt ({'with' if cuda else 'without'} CUDA kernels)"
