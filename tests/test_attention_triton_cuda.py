"""The Triton attention kernels (kernels/attention.py) on a GPU against the float64 reference and
PyTorch's MATH-backend SDPA in float64. Every test is marked gpu: collected everywhere, run only with
FASTCM_TEST_DEVICE=cuda. (On CPU the same kernels run the tests/test_attention.py matrix in the
interpreter.)

Criterion for bf16/fp16 as in tests/test_attention_cuda.py: the kernel's Frobenius error against the
float64 reference at most 2x that of PyTorch's own low-precision math on the same rounded inputs;
float32 inputs (IEEE products) against float64 SDPA within the float32 tolerance of tests/helpers.
"""

import pytest
import torch
import torch.nn.functional as F
from test_attention_cuda import BWD_SHAPES, LOWP, SHAPES, _check_against_torch, _inputs, _poison_allocator

import fastcm.kernels.attention as triton_attention
from fastcm.reference import attention as ref
from helpers import DEVICE, assert_close, to64

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_jvp_and_forward_match_reference(shape, causal, dtype):
    B, H, Hkv, Nq, Nk, Dqk, Dv = shape
    q, k, v, qt, kt, vt = _inputs(*shape, dtype)
    scale = Dqk**-0.5
    _poison_allocator((B, H, Nq, Dv), (B, H, Nq), dtype=dtype)
    got = triton_attention.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, scale, causal)
    want = ref.attention_jvp(*map(to64, (q, k, v, qt, kt, vt)), scale=scale, causal=causal, return_lse=True)
    low = ref.attention_jvp(q, k, v, qt, kt, vt, scale=scale, causal=causal, return_lse=True)
    for name, a, t, r in zip(("out", "out_t", "lse", "lse_t"), got, low, want):
        _check_against_torch(name, a, t, r)
    out, lse = triton_attention.attention_forward(q, k, v, None, scale, causal)
    _check_against_torch("out (forward)", out, low[0], want[0])
    _check_against_torch("lse (forward)", lse, low[2], want[2])


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", BWD_SHAPES)
def test_backward_matches_reference(shape, causal, dtype):
    q, k, v, _, _, _ = _inputs(*shape, dtype)
    scale = shape[5] ** -0.5
    out, lse = triton_attention.attention_forward(q, k, v, None, scale, causal)
    grad, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    _poison_allocator(q.shape, k.shape, v.shape, dtype=dtype)
    got = triton_attention.attention_backward(grad, q, k, v, out, lse, None, scale, causal, grad_lse)

    def grads(q_, k_, v_, g_, gl_):
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q_, k_, v_))
        o, l = ref.attention(q_, k_, v_, scale=scale, causal=causal, return_lse=True)
        live = torch.isfinite(l)
        return torch.autograd.grad((o * g_).sum() + torch.where(live, l * gl_.to(l.dtype), 0).sum(), (q_, k_, v_))

    want = grads(*map(to64, (q, k, v, grad, grad_lse)))
    low = grads(q, k, v, grad, grad_lse)
    for name, a, t, r in zip(("dq", "dk", "dv"), got, low, want):
        _check_against_torch(name, a, t, r)
    again = triton_attention.attention_backward(grad, q, k, v, out, lse, None, scale, causal, grad_lse)
    assert all(torch.equal(a, b) for a, b in zip(got, again)), "the backward is not deterministic"


@pytest.mark.parametrize("causal", [False, True])
def test_float32_inputs_match_math_sdpa_in_float64(causal):
    """float32 CUDA inputs go to the Triton kernels under auto (no reference warning) and match
    PyTorch's MATH SDPA evaluated in float64 (outputs, tangents, gradients)."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fastcm

    q, k, v, qt, kt, vt = _inputs(2, 4, 4, 150, 170, 64, 64, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, out_t = fastcm.attention_jvp(q, k, v, qt, kt, vt, causal=causal)
    with sdpa_kernel(SDPBackend.MATH):

        def sdpa(a, b, c):
            return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

        want, want_t = torch.func.jvp(sdpa, tuple(map(to64, (q, k, v))), tuple(map(to64, (qt, kt, vt))))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        grad = torch.randn_like(out)
        got_grads = torch.autograd.grad(fastcm.attention(*leaves, causal=causal), leaves, grad)
        leaves64 = [to64(t).requires_grad_() for t in (q, k, v)]
        want_grads = torch.autograd.grad(sdpa(*leaves64), leaves64, to64(grad))
    # Causal SDPA is top-left aligned; with Nq < Nk fastcm's is bottom-right, so compare at Nq = Nk there.
    if not causal:
        assert_close(out, want, torch.float32, name="out")
        assert_close(out_t, want_t, torch.float32, name="out_t")
        for name, a, b in zip(("dq", "dk", "dv"), got_grads, want_grads):
            assert_close(a, b, torch.float32, name=name)
    q, k, v = (t[:, :, :150] for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(*map(to64, (q, k, v)), is_causal=causal)
    assert_close(fastcm.attention(q, k, v, causal=causal), want, torch.float32, name="out (Nq = Nk)")


@pytest.mark.parametrize("dtype", LOWP)
def test_partial_tangents_and_bias(dtype):
    """No K̇, V̇ (conditioning tokens without a tangent) and a float32 broadcast bias with a tangent."""
    q, k, v, qt, _, _ = _inputs(1, 4, 2, 200, 77, 64, 64, dtype)
    bias = torch.randn(1, 1, 200, 77, device=DEVICE).expand(1, 4, 200, 77)
    bias_t = torch.randn(1, 4, 200, 77, device=DEVICE)
    got = triton_attention.attention_forward_jvp(q, k, v, qt, None, None, bias, bias_t, 0.125, False)
    zeros = [torch.zeros_like(t) for t in (k, v)]
    want = ref.attention_jvp(
        *map(to64, (q, k, v, qt, *zeros)), scale=0.125, attn_bias=to64(bias), bias_t=to64(bias_t), return_lse=True
    )
    low = ref.attention_jvp(
        q, k, v, qt, *zeros, scale=0.125, attn_bias=bias.to(dtype), bias_t=bias_t.to(dtype), return_lse=True
    )
    for name, a, t, r in zip(("out", "out_t", "lse", "lse_t"), got, low, want):
        _check_against_torch(name, a, t, r)
