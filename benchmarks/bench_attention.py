"""Attention benchmarks: primal, primal+tangent and backward of fastcm.attention vs the
MATH-backend F.scaled_dot_product_attention (the only SDPA backend with a forward-mode
derivative, O(N²) memory). On CPU this times the C++ kernel; GPU columns need a GPU."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import importlib

# The module, not the function of the same name that the package exports.
fa = importlib.import_module("fastcm.attention")

from .common import Case, make_pytest_benchmark

GPU_SHAPE = (4, 16, 2048, 64)
CPU_SHAPES = ((1, 4, 256, 64), (1, 4, 1024, 64))


def _math_sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def _primal_tangent_reference(q, k, v, q_t, k_t, v_t):
    return torch.func.jvp(_math_sdpa, (q, k, v), (q_t, k_t, v_t))


def _cases_for(device, shape, dtype):
    B, H, N, D = shape
    element = torch.finfo(dtype).bits // 8
    qkv_bytes = 3 * B * H * N * D * element

    def tensors(count, requires_grad=False):
        return tuple(torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad)
                     for _ in range(count))

    def backward_inputs():
        return tensors(3, requires_grad=True) + tensors(1)

    def backward(op):
        def run(q, k, v, grad_out):
            return torch.autograd.grad(op(q, k, v), (q, k, v), grad_out)
        return run

    per_head = B * H * N * N * D
    return [
        Case("attention", "primal", shape, dtype, lambda: tensors(3), reference=_math_sdpa,
             fastcm=lambda q, k, v: fa.attention(q, k, v),
             min_bytes=qkv_bytes + qkv_bytes // 3, flops=4 * per_head),
        Case("attention", "primal+tangent", shape, dtype, lambda: tensors(6),
             reference=_primal_tangent_reference,
             fastcm=lambda q, k, v, q_t, k_t, v_t: fa.attention_jvp(q, k, v, q_t, k_t, v_t),
             min_bytes=2 * qkv_bytes + 2 * qkv_bytes // 3, flops=12 * per_head),
        # Backward: forward (4·N²·d) plus dQ, dK, dV (~10·N²·d with the recomputed P).
        Case("attention", "backward", shape, dtype, backward_inputs, reference=backward(_math_sdpa),
             fastcm=backward(fa.attention), min_bytes=2 * qkv_bytes + 2 * qkv_bytes // 3,
             flops=14 * per_head),
    ]


def cases(device: torch.device, small: bool) -> list:
    shapes = CPU_SHAPES if small else (GPU_SHAPE,)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return [case for shape in shapes for case in _cases_for(device, shape, dtype)]


test_attention = make_pytest_benchmark(cases)
