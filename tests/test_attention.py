"""fastcm.attention vs the float64 reference: forward, LSE, tangents, gradients, masks, GQA,
forward-mode AD entry points, torch.compile, merging, bad input; on the C++ extension (the default
choice) and on the Triton kernels (on CPU in Triton's interpreter, with tiles shrunk to 16 x 16 so
that the small shapes here span several query and key blocks, tails and the causal skip)."""

import importlib
import math
import types

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fastcm.kernels.attention as triton_launchers
from fastcm.reference import attention as ref
from helpers import DEVICE, assert_close, poisoned_empty, to64, tolerance

# The module, not the function of the same name that the package exports.
fa = importlib.import_module("fastcm.attention")

# (B, H, Hkv, Nq, Nk, Dqk, Dv, causal, bias kind, scale): together they cover B in {1, 2},
# GQA/MQA, Nq and Nk in {1, 7, 64, 129, 300}, Dqk != Dv, causal with Nq <, =, > Nk, float bias,
# boolean mask, fully masked rows (causal with Nq > Nk, and a mask) and an explicit scale.
CASES = [
    (1, 2, 2, 1, 1, 8, 8, False, None, None),
    (2, 4, 2, 7, 129, 16, 8, True, "float", None),
    (1, 4, 1, 64, 300, 8, 12, False, "bool", 0.3),
    (2, 2, 1, 129, 64, 12, 4, True, "float", None),
    (1, 3, 3, 300, 7, 5, 9, False, "bool_dead_rows", None),
    (2, 4, 4, 64, 64, 32, 32, True, None, 0.5),
]
# The same features at sizes the Triton interpreter runs in seconds (N <= 40, D <= 32): several 16 x 16
# tiles with tails in both directions, causal with Nq <, > Nk (fully masked rows), GQA / MQA.
TRITON_CASES = [
    (1, 2, 2, 1, 1, 8, 8, False, None, None),
    (2, 4, 2, 7, 37, 16, 8, True, "float", None),
    (1, 4, 1, 20, 40, 8, 12, False, "bool", 0.3),
    (2, 2, 1, 37, 20, 12, 4, True, "float", None),
    (1, 3, 3, 40, 7, 5, 9, False, "bool_dead_rows", None),
    (1, 4, 4, 33, 33, 32, 32, True, None, 0.5),
]
# (Larger scales make the float32 tangent ill-conditioned: at scale 1.7, D = 32 PyTorch's own
# float32 math is 3.5e-5 off in Ȯ, beyond the float32 tolerance for any implementation.)
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# The dtype of the tests that follow the kernels through autograd, forward AD and torch.compile:
# float64 on CPU (the C++ kernels take every dtype: exact comparisons); on CUDA float16, the finer
# of the two dtypes the CUDA kernels take (float32 / float64 CUDA inputs run the reference).
KERNEL_DTYPE = torch.float64 if DEVICE == "cpu" else torch.float16


def _case_id(case):
    return "x".join(map(str, case[:7])) + f"-{case[7]}-{case[8]}"


def _use_triton(monkeypatch):
    monkeypatch.setenv("FASTCM_BACKEND", "triton")
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_launchers, "BLOCK_OVERRIDE", (16, 16))


@pytest.fixture
def triton_kernels(monkeypatch):
    """The test runs on the Triton kernels (FASTCM_BACKEND=triton; 16 x 16 tiles in the interpreter)."""
    _use_triton(monkeypatch)


@pytest.fixture(params=["auto", "triton"])
def kernels(request, monkeypatch):
    """The test runs twice: on the default choice (auto: the extension) and on the Triton kernels."""
    if request.param == "triton":
        _use_triton(monkeypatch)
    return request.param


def _bias(kind, B, H, Nq, Nk, dtype):
    if kind == "float":  # broadcast over batch: the kernel reads a stride-0 view
        return torch.randn(1, H, Nq, Nk, dtype=torch.float64).to(DEVICE, dtype)
    if kind == "bool":
        mask = torch.rand(B, 1, Nq, Nk) > 0.3
        mask[..., 0] = True
        return mask.to(DEVICE)
    if kind == "bool_dead_rows":
        mask = torch.rand(B, H, Nq, Nk) > 0.5
        mask[:, :, ::5] = False  # every fifth query sees no key
        return mask.to(DEVICE)
    return None


def _inputs(case, dtype):
    B, H, Hkv, Nq, Nk, Dqk, Dv, causal, kind, scale = case
    q = torch.randn(B, H, Nq, Dqk, dtype=torch.float64).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Nk, Dqk, dtype=torch.float64).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Nk, Dv, dtype=torch.float64).to(DEVICE, dtype)
    tangents = [torch.randn(t.shape, dtype=torch.float64).to(DEVICE, dtype) for t in (q, k, v)]
    bias = _bias(kind, B, H, Nq, Nk, dtype)
    bias_t = (
        torch.randn(bias.shape, dtype=torch.float64).to(DEVICE, dtype)
        if bias is not None and bias.is_floating_point()
        else None
    )
    return (q, k, v), tangents, bias, bias_t, dict(scale=scale, causal=causal)


def _to64(t):
    """to64 for inputs; a boolean mask stays boolean (on CPU, beside the reference's other inputs)."""
    return t.cpu() if t is not None and t.dtype == torch.bool else to64(t)


def _finite(t):
    return torch.where(torch.isinf(t), torch.zeros_like(t), t)


def _compare(actual, expected, dtype, name, bf16_reference=None):
    """Per-dtype criterion. -inf (fully masked LSE) must match exactly. For bfloat16 the error
    vs float64 may be at most 2x the error of the reference run in bfloat16 on the same inputs."""
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(torch.isinf(actual64), torch.isinf(expected64)), f"{name}: -inf pattern differs"
    actual64, expected64 = _finite(actual64), _finite(expected64)
    if dtype != torch.bfloat16:
        assert_close(actual64, expected64, dtype, name=name)
        return
    assert not torch.isnan(actual64).any(), f"{name}: NaN in result"
    own = (actual64 - expected64).abs().max().item()
    ref_err = (_finite(bf16_reference.detach().double().cpu()) - expected64).abs().max().item()
    assert own <= 2 * ref_err, f"{name}: bf16 error {own:.3e} > 2x reference bf16 error {ref_err:.3e}"


def _reference_jvp(primals, tangents, bias, bias_t, opts):
    return ref.attention_jvp(*primals, *tangents, attn_bias=bias, bias_t=bias_t, return_lse=True, **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_tangent_and_gradients_match_reference(case, dtype):
    _check_forward_tangent_and_gradients(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_forward_tangent_and_gradients_match_reference(case, dtype, triton_kernels):
    _check_forward_tangent_and_gradients(case, dtype)


def _check_forward_tangent_and_gradients(case, dtype):
    primals, tangents, bias, bias_t, opts = _inputs(case, dtype)
    with poisoned_empty():
        out, out_t, lse, lse_t = fa.attention_jvp(
            *primals, *tangents, attn_bias=bias, bias_t=bias_t, return_lse=True, **opts
        )
    expected = _reference_jvp([to64(t) for t in primals], [to64(t) for t in tangents], _to64(bias), to64(bias_t), opts)
    low = _reference_jvp(primals, tangents, bias, bias_t, opts) if dtype == torch.bfloat16 else [None] * 4
    for name, a, e, lo in zip(("out", "out_t", "lse", "lse_t"), (out, out_t, lse, lse_t), expected, low):
        _compare(a, e, dtype, name, lo)
    assert out.dtype == out_t.dtype == dtype
    assert lse.dtype == lse_t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    # Gradients w.r.t. q, k, v and a float bias, with an LSE gradient in the loss.
    leaves = [t.detach().requires_grad_() for t in primals]
    bias_leaf = bias.detach().requires_grad_() if bias_t is not None else bias
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(DEVICE, dtype)
    grad_lse = torch.randn(lse.shape, dtype=torch.float64).to(DEVICE)

    def grads(fn, tensors, bias_in, cast):
        o, l = fn(*tensors, attn_bias=bias_in, return_lse=True, **opts)
        live = torch.isfinite(l)
        loss = (o * cast(grad_out)).sum() + torch.where(live, l * cast(grad_lse).to(l.dtype), 0).sum()
        wrt = tensors + ([bias_in] if bias_t is not None else [])
        return torch.autograd.grad(loss, wrt)

    with poisoned_empty():
        got = grads(fa.attention, leaves, bias_leaf, lambda t: t)
    want = grads(ref.attention, [to64(t) for t in leaves], _to64(bias_leaf), to64)
    low = (
        grads(ref.attention, [t.detach().requires_grad_() for t in primals], bias_leaf, lambda t: t)
        if dtype == torch.bfloat16
        else [None] * len(want)
    )
    for name, a, e, lo in zip(("dq", "dk", "dv", "dbias"), got, want, low):
        _compare(a, e, dtype, name, lo)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU kernel's two backward schedules")
@pytest.mark.parametrize("threads", [1, 8], ids=["one-sweep", "two-pass"])
def test_cpu_backward_schedules_match_reference(threads):
    """The CPU backward sweeps all key blocks per (batch, kv head) when those tasks fill the
    threads, and splits into a dQ pass and a dK/dV pass otherwise: both against autograd of the
    float64 reference, on several key and query blocks, GQA, causal Nq < Nk and a float bias."""
    from fastcm._extension import extension_ops

    B, H, Hkv, Nq, Nk, D = 1, 4, 2, 200, 300, 16
    q, k, v = (torch.randn(B, h, n, D, dtype=torch.float64) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    bias = torch.randn(1, H, Nq, Nk, dtype=torch.float64)
    grad_out = torch.randn(B, H, Nq, D, dtype=torch.float64)
    grad_lse = torch.randn(B, H, Nq, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = ref.attention(*leaves, attn_bias=bias, causal=True, return_lse=True)
    want = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    want_with_lse = torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse).sum(), leaves)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = (grad_out, q, k, v, out.detach(), lse.detach(), bias, D**-0.5, True)
        got = extension_ops().attention_backward(*args)
        got_with_lse = extension_ops().attention_backward(*args, grad_lse)
    finally:
        torch.set_num_threads(previous)
    for name, a, e in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, e, torch.float64, name=name)
    for name, a, e in zip(("dq", "dk", "dv"), got_with_lse, want_with_lse):
        assert_close(a, e, torch.float64, name=name + " with an LSE gradient")


def test_fully_masked_rows_give_zeros_and_minus_inf(kernels):
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64).to(DEVICE, KERNEL_DTYPE) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=DEVICE)
    mask[..., 2, :] = False
    q_t, k_t, v_t = (torch.randn_like(t) for t in (q, k, v))
    out, out_t, lse, lse_t = fa.attention_jvp(q, k, v, q_t, k_t, v_t, attn_bias=mask, return_lse=True)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.equal(out_t[:, :, 2], torch.zeros_like(out_t[:, :, 2]))
    assert torch.equal(lse[:, :, 2], torch.full_like(lse[:, :, 2], -math.inf))
    assert torch.equal(lse_t[:, :, 2], torch.zeros_like(lse_t[:, :, 2]))
    assert torch.isfinite(lse[:, :, [0, 1, 3]]).all()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fa.attention(*leaves, attn_bias=mask).square().sum().backward()
    assert torch.equal(leaves[0].grad[:, :, 2], torch.zeros_like(leaves[0].grad[:, :, 2]))
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_reference_gradcheck_and_jvp_vs_finite_differences():
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, bias):
        return ref.attention(q, k, v, attn_bias=bias, causal=True, return_lse=True)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))
    tangents = tuple(torch.randn_like(t) for t in (q, k, v, bias))
    _, (out_t, lse_t) = torch.func.jvp(fn, (q, k, v, bias), tangents)
    eps = 1e-6
    plus = fn(*(p + eps * t for p, t in zip((q, k, v, bias), tangents)))
    minus = fn(*(p - eps * t for p, t in zip((q, k, v, bias), tangents)))
    torch.testing.assert_close(out_t, (plus[0] - minus[0]) / (2 * eps), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lse_t, (plus[1] - minus[1]) / (2 * eps), rtol=1e-6, atol=1e-7)


class _Block(torch.nn.Module):
    """A small DiT-style block: LayerNorm, QKV projection, GQA self-attention, MLP."""

    def __init__(self, attn, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.attn, self.heads, self.kv_heads, self.head_dim = attn, heads, kv_heads, dim // heads
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim)
        self.proj = torch.nn.Linear(heads * self.head_dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.GELU(), torch.nn.Linear(64, dim))

    def forward(self, x, t):
        B, N, _ = x.shape
        split = (self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        q, k, v = self.qkv(self.norm(x) * (1 + t.view(-1, 1, 1))).split(split, dim=-1)
        q, k, v = (z.view(B, N, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        x = x + self.proj(self.attn(q, k, v).transpose(1, 2).reshape(B, N, -1))
        return x + self.mlp(x)


def _in_kernel_dtype(attention):
    """attention run in KERNEL_DTYPE inside a float64 model (the casts carry gradients and
    tangents both ways)."""
    return lambda q, k, v: attention(q.to(KERNEL_DTYPE), k.to(KERNEL_DTYPE), v.to(KERNEL_DTYPE)).to(q.dtype)


def _blocks():
    """One block three ways: fastcm's attention in KERNEL_DTYPE, the reference in float64 (the
    expected values) and the reference in KERNEL_DTYPE (PyTorch's own low-precision error)."""
    fast = _Block(_in_kernel_dtype(fa.attention)).to(DEVICE, torch.float64)
    slow = _Block(ref.attention).to(DEVICE, torch.float64)
    torch_lowp = _Block(_in_kernel_dtype(ref.attention)).to(DEVICE, torch.float64)
    slow.load_state_dict(fast.state_dict())
    torch_lowp.load_state_dict(fast.state_dict())
    return fast, slow, torch_lowp


def _assert_close_as_torch(actual, expected, torch_lowp, name):
    """actual vs the float64 `expected`: the scaled error within KERNEL_DTYPE's tolerance, or at
    most twice that of `torch_lowp`, the same computation with PyTorch's attention in KERNEL_DTYPE
    (parameter gradients sum many low-precision products, beyond a per-element tolerance for any
    implementation). On CPU KERNEL_DTYPE is float64 and this is assert_close."""

    def error(value):
        a, e = value.detach().double().cpu(), expected.detach().double().cpu()
        return ((a - e).abs() / e.abs().clamp_min(1.0)).max().item()

    assert not torch.isnan(actual).any(), f"{name}: NaN"
    own, torch_error = error(actual), error(torch_lowp)
    assert own <= max(2 * torch_error, tolerance(KERNEL_DTYPE)), (
        f"{name}: scaled error {own:.3e} > 2x PyTorch's {KERNEL_DTYPE} error {torch_error:.3e} and > "
        f"tolerance {tolerance(KERNEL_DTYPE):.0e}"
    )


def _param_grads(module):
    return [(name, p.grad) for name, p in module.named_parameters()]


def test_func_jvp_of_block_then_backward_scm_pattern(kernels):
    blocks = _blocks()
    x = torch.randn(2, 19, 32, dtype=torch.float64, device=DEVICE)
    t = torch.rand(2, dtype=torch.float64, device=DEVICE)
    x_t, t_t = torch.randn_like(x), torch.ones_like(t)
    with torch.no_grad():
        (out, out_t), (ref_out, ref_out_t), (low_out, low_out_t) = (
            torch.func.jvp(block, (x, t), (x_t, t_t)) for block in blocks
        )
    _assert_close_as_torch(out, ref_out, low_out, "out")
    _assert_close_as_torch(out_t, ref_out_t, low_out_t, "out_t")
    # The sCM step: a separate forward with grad, loss built from the detached tangent.
    for block in blocks:
        (block(x, t) * ref_out_t).sum().backward()
    for (name, got), (_, want), (_, low) in zip(*(_param_grads(block) for block in blocks)):
        _assert_close_as_torch(got, want, low, name)


def test_forward_ad_dual_tensors_and_backward_through_the_tangent(kernels):
    blocks = _blocks()
    x = torch.randn(1, 7, 32, dtype=torch.float64, device=DEVICE)
    t = torch.rand(1, dtype=torch.float64, device=DEVICE)
    x_t = torch.randn_like(x)
    out_ts = []
    for block in blocks:
        with fwAD.dual_level():
            out_t = fwAD.unpack_dual(block(fwAD.make_dual(x, x_t), t)).tangent
            # Parameters require grad: a loss on the tangent backpropagates to them (second order).
            out_t.square().sum().backward()
        out_ts.append(out_t)
    _assert_close_as_torch(*out_ts, "out_t")
    for (name, got), (_, want), (_, low) in zip(*(_param_grads(block) for block in blocks)):
        if want is None:  # the last bias does not reach the tangent
            assert got is None, name
            continue
        _assert_close_as_torch(got, want, low, name)


@pytest.mark.parametrize("tangent_loss", ["detached", "differentiated"])
def test_func_jvp_with_grad_enabled_never_drops_the_tangent_gradient(tangent_loss, kernels):
    """MeanFlow takes the jvp with grad enabled and backpropagates through the primal with the
    tangent detached; a loss on the tangent itself (TVM-style, flow-map losses) backpropagates
    through it: both give the reference's parameter gradients."""
    blocks = _blocks()
    x = torch.randn(1, 7, 32, dtype=torch.float64, device=DEVICE)
    t = torch.rand(1, dtype=torch.float64, device=DEVICE)
    x_t = torch.randn_like(x)
    for block in blocks:
        out, out_t = torch.func.jvp(lambda x: block(x, t), (x,), (x_t,))
        out_t = out_t.detach() if tangent_loss == "detached" else out_t
        (out.sum() + out_t.square().sum()).backward()
    for (name, got), (_, want), (_, low) in zip(*(_param_grads(block) for block in blocks)):
        _assert_close_as_torch(got, want, low, name)


def test_jvp_uses_one_fused_kernel_call(monkeypatch, kernels):
    calls = []
    ops_for = fa._ops_for

    class Counting:
        def __init__(self, q, v):
            self.ops = ops_for(q, v)

        def __getattr__(self, name):
            op = getattr(self.ops, name)
            return lambda *args: calls.append(name) or op(*args)

    monkeypatch.setattr(fa, "_ops_for", Counting)
    q, k, v = (torch.randn(1, 2, 9, 8, device=DEVICE, dtype=KERNEL_DTYPE) for _ in range(3))
    torch.func.jvp(lambda q, k, v: fa.attention(q, k, v), (q, k, v), (q, k, v))
    assert calls == ["attention_forward_jvp"]


def test_noncontiguous_inputs_and_reference_backend(backend):
    q, k, v = (torch.randn(2, 33, 4, 8, dtype=torch.float64, device=DEVICE).transpose(1, 2) for _ in range(3))
    expected = ref.attention(q, k, v, causal=True)
    assert_close(fa.attention(q, k, v, causal=True), expected, torch.float64)
    backend("reference")
    assert_close(fa.attention(q, k, v, causal=True), expected, torch.float64)
    backend("triton")
    assert_close(fa.attention(q, k, v, causal=True), expected, torch.float64)


def test_torch_compile_forward_backward_and_jvp_never_silently_wrong(kernels):
    q, k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float64).to(DEVICE, KERNEL_DTYPE) for _ in range(3))
    q_t = torch.randn_like(q)
    fa.attention(q, k, v)  # loads the extension eagerly, so the compiled graph has no break
    leaf = q.clone().requires_grad_()
    out = torch.compile(lambda q: fa.attention(q, k, v, causal=True), fullgraph=True)(leaf)
    out.sum().backward()
    ref_leaf = to64(q).requires_grad_()
    ref_out = ref.attention(ref_leaf, to64(k), to64(v), causal=True)
    ref_out.sum().backward()
    assert_close(out, ref_out, KERNEL_DTYPE)
    assert_close(leaf.grad, ref_leaf.grad, KERNEL_DTYPE)

    _, ref_out_t = torch.func.jvp(lambda q: ref.attention(q, to64(k), to64(v)), (to64(q),), (to64(q_t),))
    _, out_t = torch.compile(fa.attention_jvp, fullgraph=True)(q, k, v, q_t, torch.zeros_like(k), torch.zeros_like(v))
    assert_close(out_t, ref_out_t, KERNEL_DTYPE)
    # torch.compile around torch.func.jvp (pytorch issue 192985): graph-breaks to eager (correct)
    # or raises; it must never return a wrong tangent.
    try:
        _, out_t = torch.compile(lambda q, q_t: torch.func.jvp(lambda q: fa.attention(q, k, v), (q,), (q_t,)))(q, q_t)
    except RuntimeError as error:
        assert "192985" in str(error)
    else:
        assert_close(out_t, ref_out_t, KERNEL_DTYPE)


def test_backend_choice_of_cuda_inputs_traces_under_torch_compile(monkeypatch):
    """Inside a torch.compile trace of CUDA inputs, the default choice asks the extension whether it
    has CUDA kernels (an op returning a bool, which Dynamo cannot put in a graph: fullgraph raised)
    and the device's capability: the trace must take them as constants and choose as eager does.
    (The capability is patched: there is no GPU to ask here.)"""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    fa._cuda_capability.cache_clear()
    try:
        fa._ops()  # loads the extension outside the trace

        def route(x):
            choice = fa._backend(torch.device("cuda"), torch.float16, 8, 8)
            return x + {"cuda": 1, "triton": 2, "reference": 3}[choice]

        x = torch.zeros(2)
        assert torch.equal(torch.compile(route, fullgraph=True)(x), route(x))
    finally:
        fa._cuda_capability.cache_clear()


def test_fake_implementations_match_the_ops(kernels):
    """The fake (meta) kernels torch.compile traces with give the ops' shapes, dtypes and strides,
    also for (B, N, H, D) storage viewed as (B, H, N, D), whose gradients come back contiguous."""
    ops = fa._ops()  # loads the extension and registers the fakes
    if kernels == "triton":
        names = ("attention_forward", "attention_forward_jvp", "attention_backward")
        ops = types.SimpleNamespace(
            **{name: getattr(torch.ops.fastcm, name.replace("attention_", "attention_triton_")) for name in names}
        )

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(DEVICE, KERNEL_DTYPE)

    q, k, v = rand(1, 9, 2, 8).transpose(1, 2), rand(1, 11, 1, 8).transpose(1, 2), rand(1, 11, 1, 8).transpose(1, 2)
    out, lse = ops.attention_forward(q, k, v, None, 0.3, True)
    grad_out, grad_lse = rand(*out.shape), torch.randn_like(lse)
    for op, args in [
        (ops.attention_forward.default, (q, k, v, None, 0.3, True)),
        (ops.attention_forward_jvp.default, (q, k, v, q, k, v, None, None, 0.3, False)),
        *(
            [(ops.attention_forward_jvp.default, (q, k, v, None, k, None, None, None, 0.3, True))]
            if kernels == "triton"
            else []
        ),
        (ops.attention_backward.default, (grad_out, q, k, v, out, lse, None, 0.3, True, None)),
        (ops.attention_backward.default, (grad_out, q, k, v, out, lse, None, 0.3, True, grad_lse)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    leaf = q.detach().requires_grad_()
    torch.compile(lambda q: fa.attention(q, k, v), fullgraph=True)(leaf).sum().backward()
    ref_leaf = to64(q).requires_grad_()
    ref.attention(ref_leaf, to64(k), to64(v)).sum().backward()
    assert_close(leaf.grad, ref_leaf.grad, KERNEL_DTYPE)


@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_merge_of_key_shards_reproduces_unsplit(shards, kernels):
    q, q_t = (torch.randn(2, 4, 9, 8, dtype=torch.float64, device=DEVICE) for _ in range(2))
    k, k_t = (torch.randn(2, 2, 50, 8, dtype=torch.float64, device=DEVICE) for _ in range(2))
    v, v_t = (torch.randn(2, 2, 50, 6, dtype=torch.float64, device=DEVICE) for _ in range(2))
    mask = torch.rand(2, 4, 9, 50, device=DEVICE) > 0.4
    mask[:, :, 3] = False  # a row masked in every shard
    mask[:, :, 5, :25] = False  # a row masked in the first shards only
    expected = ref.attention_jvp(q, k, v, q_t, k_t, v_t, attn_bias=mask, return_lse=True)
    bounds = torch.linspace(0, 50, shards + 1).long().tolist()
    parts = [
        fa.attention_jvp(
            q,
            k[:, :, a:b],
            v[:, :, a:b],
            q_t,
            k_t[:, :, a:b],
            v_t[:, :, a:b],
            attn_bias=mask[..., a:b],
            return_lse=True,
        )
        for a, b in zip(bounds, bounds[1:])
    ]
    outs, out_ts, lses, lse_ts = (list(x) for x in zip(*parts))
    with poisoned_empty():
        merged = fa.merge_attention_partials(outs, lses, out_ts, lse_ts)
    ref_merged = ref.merge_attention_partials(outs, lses, out_ts, lse_ts) if shards > 1 else None
    for i, name in enumerate(("out", "out_t", "lse", "lse_t")):
        _compare(merged[i], expected[i], torch.float64, name)
    if ref_merged is not None:  # the jvp of the logsumexp form, on rows some shard sees
        live = torch.isfinite(expected[2])
        for i, name in enumerate(("out", "out_t")):
            assert_close(merged[i][live], ref_merged[i][live], torch.float64, name=name)
    out, lse = fa.merge_attention_partials(outs, lses)
    _compare(out, expected[0], torch.float64, "out (primal merge)")
    _compare(lse, expected[2], torch.float64, "lse (primal merge)")


def _bad_cases():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 3)
    return [
        (dict(q=q[0]), ValueError, "q must be 4-D"),
        (dict(k=torch.randn(3, 2, 6, 8)), ValueError, "batch sizes differ"),
        (dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 3)), ValueError, "not a multiple of the 3 heads"),
        (dict(v=torch.randn(2, 2, 7, 3)), ValueError, "same heads and keys"),
        (dict(k=torch.randn(2, 2, 6, 4)), ValueError, "k has head dim 4 but q has 8"),
        (dict(v=v.double()), TypeError, "v has dtype torch.float64 but q has dtype torch.float32"),
        (dict(q=q.int()), TypeError, "q has dtype torch.int32; supported"),
        (dict(v=v.to("meta")), ValueError, "v is on meta but q is on cpu"),
        (dict(attn_bias=torch.randn(2, 4, 5, 7)), ValueError, "attn_bias has shape (2, 4, 5, 7), not broadcastable"),
        (dict(attn_bias=torch.ones(5, 6, dtype=torch.int64)), TypeError, "attn_bias has dtype torch.int64"),
        (dict(scale="big"), TypeError, "scale must be a finite float"),
        (dict(causal=1), TypeError, "causal must be a bool"),
    ], (q, k, v)


@pytest.mark.parametrize("index", range(12))
def test_bad_inputs_raise_clear_errors(index):
    cases, (q, k, v) = _bad_cases()
    changes, error, message = cases[index]
    kwargs = dict(q=q, k=k, v=v)
    kwargs.update(changes)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        fa.attention(**kwargs)


def test_bad_tangent_and_merge_arguments():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 3)
    with pytest.raises(ValueError, match=r"k_t has shape \(1, 2, 6, 3\) but k has shape"):
        fa.attention_jvp(q, k, v, q, v, v)
    with pytest.raises(ValueError, match="bias_t needs a float attn_bias"):
        fa.attention_jvp(q, k, v, q, k, v, bias_t=torch.zeros(5, 6))
    with pytest.raises(ValueError, match="need one LSE per output"):
        fa.merge_attention_partials([v], [])
    with pytest.raises(ValueError, match="give both out_tangents and lse_tangents"):
        fa.merge_attention_partials([v], [v[..., 0]], out_tangents=[v])


def test_extension_op_checks_name_argument_and_supported_set():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 3)
    ops = fa._ops()
    with pytest.raises(RuntimeError, match=r"bias has shape \[1, 2, 5, 5\]; expected \(B, H, Nq, Nk\)"):
        ops.attention_forward(q, k, v, torch.zeros(1, 2, 5, 5), 1.0, False)
    with pytest.raises(RuntimeError, match="q has dtype Int; supported: float32, float64, bfloat16"):
        ops.attention_forward(q.int(), k.int(), v.int(), None, 1.0, False)
    with pytest.raises(RuntimeError, match="lse has dtype Double; expected Float"):
        ops.attention_backward(
            torch.zeros(1, 2, 5, 3),
            q,
            k,
            v,
            torch.zeros(1, 2, 5, 3),
            torch.zeros(1, 2, 5, dtype=torch.float64),
            None,
            1.0,
            False,
        )
    with pytest.raises(RuntimeError, match="grad_lse must match lse"):
        ops.attention_backward(
            torch.zeros(1, 2, 5, 3),
            q,
            k,
            v,
            torch.zeros(1, 2, 5, 3),
            torch.zeros(1, 2, 5),
            None,
            1.0,
            False,
            torch.zeros(1, 2, 5, dtype=torch.float64),
        )
    assert ops.has_cuda() in (True, False)


def test_backend_choice_per_device_dtype_and_head_dim(backend, monkeypatch):
    """auto: CPU tensors run the C++ kernel; CUDA tensors the extension's CUDA kernels where they serve
    the call (built with CUDA, sm_80 / sm_90, bfloat16 / float16, D_qk <= 256) and the Triton kernels
    otherwise; without triton, the extension for low precision and the reference (with a warning)
    for float32 / float64. Explicit backends are obeyed or raise. (Decided from the device: no GPU.)"""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    capability, has_cuda = [(8, 0)], [True]
    monkeypatch.setattr(fa, "_cuda_capability", lambda index: capability[0])
    monkeypatch.setattr(fa, "_extension_has_cuda", lambda: has_cuda[0])
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert fa._backend(cpu, dtype, 64, 64) == "cuda"
    for cap in ((8, 0), (9, 0)):
        capability[0] = cap
        assert fa._backend(cuda, torch.bfloat16, 128, 128) == fa._backend(cuda, torch.float16, 256, 512) == "cuda"
        assert fa._backend(cuda, torch.bfloat16, 64, 256) == "cuda"
        for dtype in (torch.float32, torch.float64):
            assert fa._backend(cuda, dtype, 64, 32) == "triton"
        with pytest.warns(UserWarning, match="the Triton kernels take head dims up to 256, not 264 and 64"):
            assert fa._backend(cuda, torch.bfloat16, 264, 64) == "reference"
    capability[0] = (8, 6)
    assert fa._backend(cuda, torch.bfloat16, 64, 64) == "triton"
    assert fa._backend(cuda, torch.bfloat16, 64, 512) == "cuda"  # beyond Triton's head dims: the extension
    capability[0], has_cuda[0] = (9, 0), False
    assert fa._backend(cuda, torch.bfloat16, 64, 64) == "triton"

    monkeypatch.setattr(fa, "triton_runs_on", lambda device: False)
    with pytest.warns(UserWarning, match="torch.bfloat16 CUDA inputs run the PyTorch reference"):
        assert fa._backend(cuda, torch.bfloat16, 64, 64) == "reference"
    has_cuda[0], capability[0] = True, (8, 6)
    assert fa._backend(cuda, torch.bfloat16, 64, 64) == "cuda"
    with pytest.warns(UserWarning, match="torch.float32 CUDA inputs run the PyTorch reference.*triton is not inst"):
        assert fa._backend(cuda, torch.float32, 64, 64) == "reference"

    backend("cuda")
    with pytest.raises(RuntimeError, match="FASTCM_BACKEND='cuda' cannot run torch.float32 CUDA tensors"):
        fa._backend(cuda, torch.float32, 64, 64)
    assert fa._backend(cuda, torch.bfloat16, 64, 64) == fa._backend(cpu, torch.float32, 64, 64) == "cuda"
    backend("reference")
    assert fa._backend(cuda, torch.bfloat16, 64, 64) == "reference"
    monkeypatch.undo()
    backend("triton")
    assert fa._backend(cuda, torch.bfloat16, 64, 64) == "triton"


def _spy_forward_kernel(monkeypatch):
    """The constexpr switches of every forward kernel launch."""
    launches = []
    kernel = triton_launchers._attention_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append({name: kwargs[name] for name in ("HAS_Q_T", "HAS_K_T", "HAS_V_T", "HAS_BIAS_T", "JVP")})
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_launchers, "_attention_fwd_kernel", Spy())
    return launches


@pytest.mark.parametrize("absent", ["q_t", "k_t", "v_t", "k_t v_t", "q_t k_t v_t"])
def test_triton_partial_tangents_skip_the_absent_work(absent, triton_kernels, monkeypatch):
    """A tangent given as None is zero: the kernel is compiled without its loads and products (the
    constexpr switch is off) and the result equals that with an explicit zero tangent and the
    float64 reference's."""
    q, k, v = (torch.randn(2, 4, n, 12, dtype=torch.float64, device=DEVICE) for n in (21, 30, 30))
    k, v = k[:, :2], v[:, :2, :, :7]
    bias = torch.randn(1, 4, 21, 30, dtype=torch.float64, device=DEVICE).expand(2, 4, 21, 30)
    bias_t = torch.randn_like(bias)
    tangents = {name: torch.randn_like(p) for name, p in (("q_t", q), ("k_t", k), ("v_t", v))}
    given = {name: None if name in absent.split() else t for name, t in tangents.items()}
    zeros = {name: torch.zeros_like(t) if given[name] is None else t for name, t in tangents.items()}
    launches = _spy_forward_kernel(monkeypatch)
    with poisoned_empty():
        got = triton_launchers.attention_forward_jvp(q, k, v, *given.values(), bias, None, 0.4, True)
    assert launches == [
        {
            "HAS_Q_T": given["q_t"] is not None,
            "HAS_K_T": given["k_t"] is not None,
            "HAS_V_T": given["v_t"] is not None,
            "HAS_BIAS_T": False,
            "JVP": True,
        }
    ]
    with_zeros = triton_launchers.attention_forward_jvp(q, k, v, *zeros.values(), bias, None, 0.4, True)
    want = ref.attention_jvp(q, k, v, *zeros.values(), scale=0.4, causal=True, attn_bias=bias, return_lse=True)
    for name, a, z, w in zip(("out", "out_t", "lse", "lse_t"), got, with_zeros, want):
        assert_close(a, z, torch.float64, name=name + " vs zero tangent")
        _compare(a, w, torch.float64, name)
    # Only the bias tangent: Ṡ = ḃias.
    got = triton_launchers.attention_forward_jvp(q, k, v, None, None, None, bias, bias_t, 0.4, True)
    want = ref.attention_jvp(
        q,
        k,
        v,
        *(torch.zeros_like(t) for t in (q, k, v)),
        scale=0.4,
        causal=True,
        attn_bias=bias,
        bias_t=bias_t,
        return_lse=True,
    )
    for name, a, w in zip(("out", "out_t", "lse", "lse_t"), got, want):
        _compare(a, w, torch.float64, name + " (bias tangent only)")


def test_triton_boolean_mask_and_float32_bias_in_the_op(triton_kernels):
    """The Triton op also takes a boolean mask (True = attend) and a bias of another float dtype
    than q (read as it is), as the extension's CUDA op does."""
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64, device=DEVICE).to(torch.float32) for n in (19, 23, 23))
    mask = torch.rand(1, 1, 19, 23, device=DEVICE) > 0.5
    mask[..., 4, :] = False
    mask = mask.expand(1, 2, 19, 23)
    grad_out = torch.randn(1, 2, 19, 8, device=DEVICE)
    out, lse = triton_launchers.attention_forward(q, k, v, mask, 0.35, False)
    want_out, want_lse = ref.attention(to64(q), to64(k), to64(v), scale=0.35, attn_bias=mask.cpu(), return_lse=True)
    _compare(out, want_out, torch.float32, "out (mask)")
    _compare(lse, want_lse, torch.float32, "lse (mask)")
    leaves = [to64(t).requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(ref.attention(*leaves, scale=0.35, attn_bias=mask.cpu()), leaves, to64(grad_out))
    got = triton_launchers.attention_backward(grad_out, q, k, v, out, lse, mask, 0.35, False)
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        _compare(a, w, torch.float32, name + " (mask)")
    bias64 = 30 * torch.randn(1, 2, 19, 23, dtype=torch.float64, device=DEVICE)
    out, _ = triton_launchers.attention_forward(q.double(), k.double(), v.double(), bias64.float(), 0.35, False)
    want_out = ref.attention(to64(q), to64(k), to64(v), scale=0.35, attn_bias=to64(bias64.float()))
    _compare(out, want_out, torch.float64, "out (float32 bias, float64 inputs)")


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_triton_gpu_tile_configs_at_large_head_dims(head_dim, monkeypatch):
    """The GPU launch configurations (no shrinking) at head dims 64 / 128 / 256 in bfloat16, on tiny
    sequences: forward, forward + JVP and backward against the float64 reference (criterion: 2x
    PyTorch's bf16 error). These launches are also the ones scripts/compile_triton_kernels.py
    compiles at the goal shapes' tile sizes."""
    monkeypatch.setenv("FASTCM_BACKEND", "triton")
    monkeypatch.setattr(triton_launchers, "BLOCK_OVERRIDE", None)
    case = (1, 2, 1, 9, 70, head_dim, head_dim, True, None, None)
    _check_forward_tangent_and_gradients(case, torch.bfloat16)
    q, k, v = (torch.randn(1, 2, 5, head_dim, dtype=torch.float64).to(DEVICE, torch.bfloat16) for _ in range(3))
    out, lse = fa.attention(q, k, v, return_lse=True)
    want_out, want_lse = ref.attention(to64(q), to64(k), to64(v), return_lse=True)
    low_out, low_lse = ref.attention(q, k, v, return_lse=True)
    _compare(out, want_out, torch.bfloat16, "out", low_out)
    _compare(lse, want_lse, torch.bfloat16, "lse", low_lse)


def test_nn_attention_module_matches_reference_and_jvp(kernels):
    import fastcm.nn

    module = fastcm.nn.Attention(32, 4, kv_heads=2, qk_norm=True).to(DEVICE, torch.float64)
    x, x_t = (torch.randn(2, 11, 32, dtype=torch.float64, device=DEVICE) for _ in range(2))

    def reference_forward(x):
        B, N, _ = x.shape
        q, k, v = module.qkv(x).split((32, 16, 16), dim=-1)
        q, k, v = (t.view(B, N, -1, 8).transpose(1, 2) for t in (q, k, v))
        out = ref.attention(module.q_norm(q), module.k_norm(k), v)
        return module.proj(out.transpose(1, 2).reshape(B, N, -1))

    out, out_t = torch.func.jvp(module, (x,), (x_t,))
    ref_out, ref_out_t = torch.func.jvp(reference_forward, (x,), (x_t,))
    assert_close(out, ref_out, torch.float64)
    assert_close(out_t, ref_out_t, torch.float64)
    with pytest.raises(ValueError, match="heads=4 and heads by kv_heads=3"):
        fastcm.nn.Attention(32, 4, kv_heads=3)
    with pytest.raises(ValueError, match="cuda_dtype must be None, torch.bfloat16 or torch.float16"):
        fastcm.nn.Attention(32, 4, cuda_dtype=torch.float32)
    # cuda_dtype changes nothing but float32 CUDA inputs.
    module.cuda_dtype = torch.bfloat16
    assert torch.equal(module(x), out)
