"""Preconditioning benchmarks: forward (read x, F; write out) and backward (read grad, x, F;
write grad_x, grad_F; the per-sample σ-gradient is B floats)."""

import torch

import fastcm
from fastcm.reference.precondition import precondition as reference

from .common import Case, make_pytest_benchmark

GPU_SHAPE = (64, 4, 128, 128)
CPU_SHAPE = (8, 4, 32, 32)


def _forward_case(device, shape, dtype, param):
    def make_inputs():
        x = torch.randn(shape, device=device, dtype=dtype)
        # flow t and VP ᾱ must lie in (0, 1)
        scale = 0.8 if param in ("flow", "vp-eps") else 1.0
        return x, torch.randn_like(x), torch.rand(shape[0], device=device) * scale + 0.1

    numel = torch.Size(shape).numel()
    return Case(
        "precondition",
        f"{param} fwd",
        shape,
        dtype,
        make_inputs,
        reference=lambda x, f, s: reference(x, f, s, param=param),
        fastcm=lambda x, f, s: fastcm.precondition(x, f, s, param=param),
        min_bytes=3 * numel * torch.finfo(dtype).bits // 8,
    )


def _backward_case(device, shape, dtype, param):
    def make_inputs():
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        f = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        sigma = (torch.rand(shape[0], device=device) + 0.1).requires_grad_()
        return x, f, sigma, torch.randn(shape, device=device, dtype=dtype)

    def fwd_bwd(op):
        def run(x, f, s, grad):
            return torch.autograd.grad(op(x, f, s, param=param), (x, f, s), grad)

        return run

    numel = torch.Size(shape).numel()
    # Forward: read x, F, write out. Backward: read grad, x, F; write grad_x, grad_F.
    return Case(
        "precondition",
        f"{param} fwd+bwd",
        shape,
        dtype,
        make_inputs,
        reference=fwd_bwd(reference),
        fastcm=fwd_bwd(fastcm.precondition),
        min_bytes=8 * numel * torch.finfo(dtype).bits // 8,
    )


def cases(device: torch.device, small: bool):
    shape = CPU_SHAPE if small else GPU_SHAPE
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for param in ("edm", "trigflow", "flow", "vp-eps"):
            out.append(_forward_case(device, shape, dtype, param))
        out.append(_backward_case(device, shape, dtype, "edm"))
    return out


test_precondition = make_pytest_benchmark(cases)
