"""One place for what every test needs: the device under test, per-dtype tolerances,
NaN-poisoned outputs, float64 references and random inputs."""

import contextlib
import os

import torch

DEVICE = os.environ.get("FASTCM_TEST_DEVICE", "cpu")
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Relative-to-scale tolerances of a fast path vs the float64 reference, per input dtype.
# The inputs are first rounded to the dtype, so these bound the kernel's own arithmetic and its
# final rounding to the output dtype (bf16 has 8 bits of mantissa: 2^-8 = 3.9e-3).
TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, *, name="output"):
    """|actual - expected| <= tol * max(1, |expected|) elementwise, with tol from the dtype of
    the op's inputs. No NaN in either unless both are NaN at the same place (they never should be)."""
    dtype = dtype or actual.dtype
    tol = tolerance(dtype)
    actual64 = actual.detach().to(torch.float64).cpu()
    expected64 = expected.detach().to(torch.float64).cpu()
    assert actual64.shape == expected64.shape, f"{name}: shape {tuple(actual64.shape)} != {tuple(expected64.shape)}"
    assert not torch.isnan(actual64).any(), f"{name}: NaN in result (an unwritten or invalid element)"
    scale = expected64.abs().clamp_min(1.0)
    err = (actual64 - expected64).abs() / scale
    worst = err.max().item() if err.numel() else 0.0
    assert worst <= tol, (
        f"{name}: max scaled error {worst:.3e} > tol {tol:.1e} for {dtype} "
        f"(at index {tuple(int(i) for i in torch.nonzero(err == err.max())[0])})"
    )


def to64(t):
    """Detached float64 copy on CPU, requiring grad if the original did (the reference input)."""
    if t is None or not isinstance(t, torch.Tensor):
        return t
    out = t.detach().to(device="cpu", dtype=torch.float64)
    return out.requires_grad_() if t.requires_grad else out


def randn(*shape, dtype=torch.float32, device=DEVICE, requires_grad=False, noncontiguous=False):
    """Random input rounded to `dtype`. With noncontiguous=True, the tensor is a transposed view
    of the last two dims (or a strided slice for rank 1)."""
    if noncontiguous:
        if len(shape) >= 2:
            base = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float64)
            t = base.to(device=device, dtype=dtype).transpose(-1, -2)
        else:
            t = torch.randn(shape[0] * 2, dtype=torch.float64).to(device=device, dtype=dtype)[::2]
        assert not t.is_contiguous()
    else:
        t = torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


@contextlib.contextmanager
def poisoned_empty():
    """Inside this context torch.empty / empty_like / new_empty return NaN-filled tensors
    (integer tensors: filled with -1), so an element a kernel forgets to write shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point() or t.is_complex():
            return t.fill_(float("nan"))
        if t.dtype != torch.bool:
            return t.fill_(-1)
        return t

    def empty(*args, **kwargs):
        return fill(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return fill(real_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


@contextlib.contextmanager
def cuda_float_arguments():
    """Inside this context Triton's interpreter passes a Python-float kernel argument as a CUDA launch
    does: as a float64 where the kernel parameter is annotated tl.float64, else as a float32. The
    interpreter itself keeps the Python float, so a float64 kernel that takes a constant such as c = 0.1
    unannotated computes with it rounded to float32 on a GPU only. Nothing changes off the interpreter."""
    if DEVICE != "cpu":
        yield
        return
    import inspect

    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import _normalize_ty

    real_run = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters

        def as_launched(name, value):
            if not isinstance(value, float) or "constexpr" in str(params[name].annotation):
                return value
            annotation = params[name].annotation
            fp64 = annotation is not inspect.Parameter.empty and _normalize_ty(annotation) == "fp64"
            dtype, np_dtype = (tl.float64, np.float64) if fp64 else (tl.float32, np.float32)
            return tl.tensor(interpreter.TensorHandle(np.array([value], dtype=np_dtype), dtype), dtype)

        args = tuple(as_launched(name, value) for name, value in zip(params, args))
        kwargs = {name: as_launched(name, value) if name in params else value for name, value in kwargs.items()}
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = real_run
