"""Attention benchmarks: primal, primal+tangent (also cross-attention with K̇ = V̇ absent vs
zeros) and backward (also through the tangent) of fastcm.attention vs the
MATH-backend F.scaled_dot_product_attention (the only SDPA backend with a forward-mode
derivative, O(N²) memory). On CPU this times the C++ kernel; GPU columns need a GPU."""

import importlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .common import Case, make_pytest_benchmark

# The module, not the function of the same name that the package exports.
fa = importlib.import_module("fastcm.attention")

GPU_SHAPE = (4, 16, 2048, 64)
CPU_SHAPES = ((1, 4, 256, 64), (1, 4, 1024, 64))
# Cross-attention (B, H, Nq, Nk, D): image queries against conditioning keys without a tangent.
GPU_CROSS_SHAPE = (4, 16, 4096, 256, 64)
CPU_CROSS_SHAPE = (1, 4, 1024, 256, 64)


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
        return tuple(torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(count))

    def backward_inputs():
        return tensors(3, requires_grad=True) + tensors(1)

    def backward(op):
        def run(q, k, v, grad_out):
            return torch.autograd.grad(op(q, k, v), (q, k, v), grad_out)

        return run

    per_head = B * H * N * N * D
    return [
        Case(
            "attention",
            "primal",
            shape,
            dtype,
            lambda: tensors(3),
            reference=_math_sdpa,
            fastcm=lambda q, k, v: fa.attention(q, k, v),
            min_bytes=qkv_bytes + qkv_bytes // 3,
            flops=4 * per_head,
        ),
        Case(
            "attention",
            "primal+tangent",
            shape,
            dtype,
            lambda: tensors(6),
            reference=_primal_tangent_reference,
            fastcm=lambda q, k, v, q_t, k_t, v_t: fa.attention_jvp(q, k, v, q_t, k_t, v_t),
            min_bytes=2 * qkv_bytes + 2 * qkv_bytes // 3,
            flops=12 * per_head,
        ),
        # Backward: forward (4·N²·d) plus dQ, dK, dV (~10·N²·d with the recomputed P).
        Case(
            "attention",
            "backward",
            shape,
            dtype,
            backward_inputs,
            reference=backward(_math_sdpa),
            fastcm=backward(fa.attention),
            min_bytes=2 * qkv_bytes + 2 * qkv_bytes // 3,
            flops=14 * per_head,
        ),
    ]


def _cross_attention_cases(device, shape, dtype):
    """Forward+JVP where only Q carries a tangent (K̇ = V̇ = 0): absent (None) vs zeros passed.
    Both rows share one floor, the work of the Q̇ tangent alone (Q̇Kᵀ and (P⊙Ṡ)V on top of the
    forward), so their ratios show what reading zeros costs."""
    B, H, Nq, Nk, D = shape
    element = torch.finfo(dtype).bits // 8
    q_bytes, kv_bytes = B * H * Nq * D * element, 2 * B * H * Nk * D * element

    def tensors(with_zeros):
        q, q_t = (torch.randn(B, H, Nq, D, device=device, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(B, H, Nk, D, device=device, dtype=dtype) for _ in range(2))
        return (q, k, v, q_t) + ((torch.zeros_like(k), torch.zeros_like(v)) if with_zeros else ())

    def reference(q, k, v, q_t, *zero_tangents):
        if zero_tangents:
            return _primal_tangent_reference(q, k, v, q_t, *zero_tangents)
        return torch.func.jvp(lambda q: _math_sdpa(q, k, v), (q,), (q_t,))

    def fastcm(q, k, v, q_t, k_t=None, v_t=None):
        return fa.attention_jvp(q, k, v, q_t, k_t, v_t)

    # Reads Q, Q̇, K, V; writes O, Ȯ.
    floor = {"min_bytes": 4 * q_bytes + kv_bytes, "flops": 8 * B * H * Nq * Nk * D}
    return [
        Case(
            "attention",
            f"cross primal+tangent, k_t=v_t={name}",
            shape,
            dtype,
            lambda z=with_zeros: tensors(z),
            reference=reference,
            fastcm=fastcm,
            **floor,
        )
        for name, with_zeros in (("None", False), ("zeros", True))
    ]


def _tangent_backward_case(device, shape, dtype):
    """torch.autograd.grad of a loss on the tangent Ȯ of torch.func.jvp, w.r.t. Q, K, V and their
    tangents (reverse mode through the tangent), vs the same through MATH SDPA."""
    B, H, N, D = shape
    qkv_bytes = 3 * B * H * N * D * torch.finfo(dtype).bits // 8

    def inputs():
        return tuple(torch.randn(shape, device=device, dtype=dtype, requires_grad=i < 6) for i in range(7))

    def grad_of_tangent(op):
        def run(q, k, v, q_t, k_t, v_t, grad_out_t):
            _, out_t = torch.func.jvp(op, (q, k, v), (q_t, k_t, v_t))
            return torch.autograd.grad(out_t, (q, k, v, q_t, k_t, v_t), grad_out_t)

        return run

    # Forward+JVP (12·N²·d) and the chunked recomputation: S, Ṡ, gȮVᵀ, gȮV̇ᵀ and the six
    # gradient products (26·N²·d).
    return Case(
        "attention",
        "backward through tangent",
        shape,
        dtype,
        inputs,
        reference=grad_of_tangent(_math_sdpa),
        fastcm=grad_of_tangent(lambda q, k, v: fa.attention(q, k, v)),
        min_bytes=5 * qkv_bytes,
        flops=38 * B * H * N * N * D,
        compile_reference=False,
    )


def cases(device: torch.device, small: bool) -> list:
    shapes = CPU_SHAPES if small else (GPU_SHAPE,)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return (
        [case for shape in shapes for case in _cases_for(device, shape, dtype)]
        + _cross_attention_cases(device, CPU_CROSS_SHAPE if small else GPU_CROSS_SHAPE, dtype)
        + [_tangent_backward_case(device, shapes[0], dtype)]
    )


test_attention = make_pytest_benchmark(cases)
