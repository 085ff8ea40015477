"""fastcm.attention's tangents beyond the plain jvp: absent tangents (conditioning tokens that carry
none cost no zeros) and reverse mode through the tangent (losses on Ȯ and μ), against the float64
reference and float64 double autograd of it."""

import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from test_attention import CASES, _compare, _finite, _inputs, _to64
from torch.utils._python_dispatch import TorchDispatchMode

from fastcm.reference import attention as ref
from helpers import DEVICE, assert_close, poisoned_empty, to64, tolerance

# The module, not the function of the same name that the package exports.
fa = importlib.import_module("fastcm.attention")

CASE_IDS = ["x".join(map(str, c[:7])) + f"-{c[7]}-{c[8]}" for c in CASES]
# Which of (q_t, k_t, v_t) are absent: cross-attention conditioning (k, v), one at a time, all.
ABSENT = [(False, True, True), (True, False, False), (False, True, False), (False, False, True), (True, True, True)]
ABSENT_IDS = ["absent-" + "".join(n for n, a in zip("qkv", absent) if a) for absent in ABSENT]


def _drop(tangents, absent):
    return [None if gone else t for t, gone in zip(tangents, absent)]


def _zeros_for(tangents, primals):
    return [torch.zeros_like(p) if t is None else t for t, p in zip(tangents, primals)]


# ---------------------------------------------------------------------------------------------
# Partial tangents
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("absent", ABSENT, ids=ABSENT_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_absent_tangents_match_zero_tangents(case, dtype, absent):
    primals, tangents, bias, bias_t, opts = _inputs(case, dtype)
    given = _drop(tangents, absent)
    with poisoned_empty():
        got = fa.attention_jvp(*primals, *given, attn_bias=bias, bias_t=bias_t, return_lse=True, **opts)
    zero_tangents = _zeros_for(given, primals)
    expected = ref.attention_jvp(
        *(to64(t) for t in primals),
        *(to64(t) for t in zero_tangents),
        attn_bias=_to64(bias),
        bias_t=to64(bias_t),
        return_lse=True,
        **opts,
    )
    low = (
        ref.attention_jvp(*primals, *zero_tangents, attn_bias=bias, bias_t=bias_t, return_lse=True, **opts)
        if dtype == torch.bfloat16
        else [None] * 4
    )
    for name, a, e, lo in zip(("out", "out_t", "lse", "lse_t"), got, expected, low):
        _compare(a, e, dtype, name, lo)
    # Passing zeros explicitly runs the full tangent kernel: the same values up to the order of sums.
    with_zeros = fa.attention_jvp(*primals, *zero_tangents, attn_bias=bias, bias_t=bias_t, return_lse=True, **opts)
    for name, a, e in zip(("out", "out_t", "lse", "lse_t"), got, with_zeros):
        assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{name}: -inf pattern differs from zeros passed"
        assert_close(_finite(a), _finite(e), dtype, name=name + " vs zeros passed")


def test_absent_tangents_through_func_jvp_and_dual_tensors():
    """Cross-attention whose K, V carry no tangent, through both forward-AD entry points."""
    (q, k, v), (q_t, _, _), bias, bias_t, opts = _inputs(CASES[1], torch.float64)
    _, (expected_t, expected_lse_t) = torch.func.jvp(
        lambda q, b: ref.attention(q, k, v, attn_bias=b, return_lse=True, **opts),
        (q, bias.expand(q.shape[:3] + k.shape[2:3]).contiguous()),
        (q_t, bias_t.expand(q.shape[:3] + k.shape[2:3]).contiguous()),
    )
    _, (out_t, lse_t) = torch.func.jvp(
        lambda q, b: fa.attention(q, k, v, attn_bias=b, return_lse=True, **opts), (q, bias), (q_t, bias_t)
    )
    assert_close(out_t, expected_t, torch.float64, name="out_t (func.jvp)")
    assert_close(lse_t, expected_lse_t, torch.float64, name="lse_t (func.jvp)")
    with fwAD.dual_level():
        out = fa.attention(fwAD.make_dual(q, q_t), k, v, attn_bias=fwAD.make_dual(bias, bias_t), **opts)
        assert_close(fwAD.unpack_dual(out).tangent, expected_t, torch.float64, name="out_t (dual)")


class _TensorsOfShapes(TorchDispatchMode):
    """Records every aten op that creates or writes a tensor of one of `shapes` (views excepted)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.hits = {tuple(s) for s in shapes}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.is_view:
            return result
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes:
                self.hits.append(f"{func}: {tuple(t.shape)}")
        return result


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU kernel skips absent tangents; the CUDA kernels read zeros")
def test_absent_tangents_allocate_nothing_of_their_shape():
    """No op creates a tensor of K's or V's shape (zeros for their tangents) when K̇ and V̇ are
    absent, whether they are None in attention_jvp, missing under torch.func.jvp or not dual."""
    q, q_t = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(2))
    k, v = torch.randn(1, 1, 13, 8, dtype=torch.float64), torch.randn(1, 1, 13, 6, dtype=torch.float64)
    fa._ops()  # loads the extension outside the recording
    calls = {
        "attention_jvp": lambda: fa.attention_jvp(q, k, v, q_t, None, None),
        "func.jvp": lambda: torch.func.jvp(lambda q: fa.attention(q, k, v), (q,), (q_t,)),
        "dual": lambda: _dual_tangent(q, q_t, k, v),
    }
    for name, call in calls.items():
        with _TensorsOfShapes([k.shape, v.shape]) as recorder:
            call()
        assert recorder.hits == [], f"{name}: tensors of K's / V's shape were created: {recorder.hits}"
    # The recorder sees them when zeros are passed: the check can fail.
    with _TensorsOfShapes([k.shape, v.shape]) as recorder:
        fa.attention_jvp(q, k, v, q_t, torch.zeros_like(k), torch.zeros_like(v))
    assert len(recorder.hits) >= 2


def _dual_tangent(q, q_t, k, v):
    with fwAD.dual_level():
        return fwAD.unpack_dual(fa.attention(fwAD.make_dual(q, q_t), k, v)).tangent


def test_op_takes_none_tangents_and_fake_matches():
    ops = fa._ops()
    q, q_t = (torch.randn(1, 2, 9, 8, dtype=torch.float64).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(1, 1, 11, 8, dtype=torch.float64).to(DEVICE) for _ in range(2))
    if DEVICE == "cuda":
        q, q_t, k, v = (t.half() for t in (q, q_t, k, v))
    for args in [
        (q, k, v, q_t, None, None, None, None, 0.3, True),
        (q, k, v, None, None, v, None, None, 0.3, False),
        (q, k, v, None, None, None, None, None, 0.3, False),
    ]:
        torch.library.opcheck(ops.attention_forward_jvp.default, args, test_utils=("test_schema", "test_faketensor"))
        got = ops.attention_forward_jvp(*args)
        full = ops.attention_forward_jvp(*args[:3], *_zeros_for(args[3:6], args[:3]), *args[6:])
        for name, a, e in zip(("out", "out_t", "lse", "lse_t"), got, full):
            assert_close(a, e, q.dtype, name=name)
    _, out_t, _, lse_t = ops.attention_forward_jvp(q, k, v, None, None, None, None, None, 0.3, False)
    assert not out_t.any() and not lse_t.any()


# ---------------------------------------------------------------------------------------------
# Backward through the tangent
# ---------------------------------------------------------------------------------------------


def _loss_weights(out_shape, dtype):
    """Upstream gradients for O, LSE, Ȯ, μ in float64, rounded to the dtype of those outputs (so
    the float64 reference weighs them exactly as the fast path does)."""
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(shape, dtype):
        return torch.randn(shape, dtype=torch.float64).to(dtype).double()

    return (
        rand(out_shape, dtype),
        rand(out_shape[:-1], lse_dtype),
        rand(out_shape, dtype),
        rand(out_shape[:-1], lse_dtype),
    )


def _loss(out, lse, out_t, lse_t, weights):
    g_out, g_lse, g_out_t, g_lse_t = (w.to(out.device) for w in weights)
    live = torch.isfinite(lse)
    return (
        (out * g_out.to(out.dtype)).sum()
        + torch.where(live, lse * g_lse.to(lse.dtype), 0).sum()
        + (out_t * g_out_t.to(out_t.dtype)).sum()
        + (lse_t * g_lse_t.to(lse_t.dtype)).sum()
    )


def _leaves(primals, tangents, bias, bias_t):
    """(q, k, v, q_t, k_t, v_t[, bias, bias_t]) as leaves that require grad (None stays None)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in list(primals) + list(tangents)]
    if bias_t is not None:
        leaves += [bias.detach().requires_grad_(), bias_t.detach().requires_grad_()]
    return leaves


def _split(leaves, bias):
    bias_leaf, bias_t = (leaves[6], leaves[7]) if len(leaves) == 8 else (bias, None)
    return leaves[:3], leaves[3:6], bias_leaf, bias_t


def _reference_grads(leaves, bias, opts, weights):
    """Double autograd of the reference: torch.autograd.grad through its torch.func.jvp."""
    primals, tangents, bias_leaf, bias_t = _split(leaves, bias)
    outputs = ref.attention_jvp(*primals, *tangents, attn_bias=bias_leaf, bias_t=bias_t, return_lse=True, **opts)
    loss = _loss(outputs[0], outputs[2], outputs[1], outputs[3], weights)
    wrt = [t for t in leaves if t is not None]
    return torch.autograd.grad(loss, wrt, allow_unused=True)


def _dual_grads(leaves, bias, opts, weights):
    """torch.autograd.grad of a loss on forward-AD dual tensors' tangents, with grad enabled."""
    primals, tangents, bias_leaf, bias_t = _split(leaves, bias)
    with fwAD.dual_level():
        duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        if bias_t is not None:
            bias_leaf = fwAD.make_dual(bias_leaf, bias_t)
        out, lse = (fwAD.unpack_dual(t) for t in fa.attention(*duals, attn_bias=bias_leaf, return_lse=True, **opts))
        loss = _loss(out.primal, lse.primal, out.tangent, lse.tangent, weights)
    return torch.autograd.grad(loss, [t for t in leaves if t is not None])


GRAD_NAMES = ("dq", "dk", "dv", "dq_t", "dk_t", "dv_t", "dbias", "dbias_t")


def _scaled_error(actual, expected):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs() / e.abs().clamp_min(1.0)).max().item()


def _compare_second_order(actual, expected, torch_lowp, dtype, name):
    """actual vs the float64 `expected`: float64 within its tolerance; other dtypes within theirs or
    at most twice the error of `torch_lowp`, double autograd of the reference run in that dtype.
    Second-order gradients sum products of first-order terms that already carry the dtype's
    rounding: at scale 0.5, D = 32 PyTorch's own float32 dQ is 1.5e-5 off, beyond float32's 1e-5."""
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    if dtype == torch.float64:
        assert_close(actual, expected, dtype, name=name)
        return
    own, torch_error = _scaled_error(actual, expected), _scaled_error(torch_lowp, expected)
    assert own <= max(2 * torch_error, tolerance(dtype)), (
        f"{name}: scaled error {own:.3e} > 2x PyTorch's {dtype} error {torch_error:.3e} and > "
        f"tolerance {tolerance(dtype):.0e}"
    )


def _compare_grads(got, want, low, dtype, names=GRAD_NAMES):
    assert len(got) == len(want)
    for name, a, e, lo in zip(names, got, want, low):
        _compare_second_order(a, e, lo, dtype, name)


@pytest.fixture
def small_chunks(monkeypatch):
    """Three query rows per recomputed chunk, so the small cases run several chunks and a tail."""

    def rows(case):
        B, H, _, _, Nk = case[:5]
        monkeypatch.setattr(fa, "_TANGENT_CHUNK_ELEMENTS", 3 * B * H * Nk)

    return rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_through_tangent_matches_double_autograd(case, dtype, small_chunks):
    """Gradients of <gO, O> + <gLSE, LSE> + <gȮ, Ȯ> + <gμ, μ> w.r.t. q, k, v, their tangents and a
    float bias and its tangent, through forward-AD dual tensors with grad enabled."""
    small_chunks(case)
    primals, tangents, bias, bias_t, opts = _inputs(case, dtype)
    weights = _loss_weights(primals[0].shape[:3] + primals[2].shape[-1:], dtype)
    leaves = _leaves(primals, tangents, bias, bias_t)
    with poisoned_empty():
        got = _dual_grads(leaves, bias, opts, weights)
    want = _reference_grads([to64(t) for t in leaves], _to64(bias), opts, weights)
    low = (
        _reference_grads(_leaves(primals, tangents, bias, bias_t), bias, opts, weights)
        if dtype != torch.float64
        else [None] * len(want)
    )
    _compare_grads(got, want, low, dtype)
    assert all(a.dtype == dtype for a in got)


@pytest.mark.parametrize("absent", ABSENT[:-1], ids=ABSENT_IDS[:-1])
def test_backward_through_partial_tangents(absent, small_chunks):
    """Absent tangents: gradients w.r.t. the primals and the tangents that are given (with none
    given there is no tangent to differentiate)."""
    case = CASES[1]
    small_chunks(case)
    primals, tangents, bias, _, opts = _inputs(case, torch.float64)
    leaves = _leaves(primals, _drop(tangents, absent), bias, None)
    weights = _loss_weights(primals[0].shape[:3] + primals[2].shape[-1:], torch.float64)
    got = _dual_grads(leaves, bias, opts, weights)
    want = _reference_grads([to64(t) for t in leaves], to64(bias), opts, weights)
    names = [n for n, t in zip(GRAD_NAMES, leaves) if t is not None]
    _compare_grads(got, want, [None] * len(want), torch.float64, names)


@pytest.mark.parametrize("wrt", ["primals", "tangents"])
def test_backward_through_tangent_for_primals_or_tangents_only(wrt, small_chunks):
    """Only the tangents require grad (the fused attention backward gives their gradients) or
    only the primals (the chunked recomputation), with a float bias and its tangent."""
    case = CASES[3]
    small_chunks(case)
    primals, tangents, bias, bias_t, opts = _inputs(case, torch.float64)
    leaves = _leaves(primals, tangents, bias, bias_t)
    chosen = [0, 1, 2, 6] if wrt == "primals" else [3, 4, 5, 7]
    for i, leaf in enumerate(leaves):
        leaf.requires_grad_(i in chosen)
    weights = _loss_weights(primals[0].shape[:3] + primals[2].shape[-1:], torch.float64)
    primals_, tangents_, bias_leaf, bias_t_ = _split(leaves, bias)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals_, tangents_)]
        out = fa.attention(*duals, attn_bias=fwAD.make_dual(bias_leaf, bias_t_), return_lse=True, **opts)
        out, lse = (fwAD.unpack_dual(t) for t in out)
        loss = _loss(out.primal, lse.primal, out.tangent, lse.tangent, weights)
    got = torch.autograd.grad(loss, [leaves[i] for i in chosen])
    want = _reference_grads([to64(t).requires_grad_() for t in leaves], bias, opts, weights)
    _compare_grads(got, [want[i] for i in chosen], [None] * 4, torch.float64, [GRAD_NAMES[i] for i in chosen])


def test_autograd_grad_through_func_jvp_and_func_grad_of_func_jvp(small_chunks):
    """Reverse over forward through torch.func: torch.autograd.grad of torch.func.jvp, and
    torch.func.grad of a function that calls torch.func.jvp (a Hessian-vector product)."""
    case = CASES[2]  # MQA cross-attention with a boolean mask
    small_chunks(case)
    (q, k, v), (q_t, k_t, v_t), mask, _, opts = _inputs(case, torch.float64)
    g_out_t = torch.randn(q.shape[:3] + v.shape[-1:], dtype=torch.float64, device=DEVICE)

    def tangent_loss(attention, mask, g_out_t):
        def loss(q, k, v, q_t, k_t, v_t):
            _, out_t = torch.func.jvp(
                lambda q, k, v: attention(q, k, v, attn_bias=mask, **opts), (q, k, v), (q_t, k_t, v_t)
            )
            return (out_t * g_out_t).sum()

        return loss

    inputs = (q, k, v, q_t, k_t, v_t)
    reference_loss = tangent_loss(ref.attention, _to64(mask), to64(g_out_t))
    want = torch.func.grad(reference_loss, argnums=tuple(range(6)))(*(to64(t) for t in inputs))
    got = torch.func.grad(tangent_loss(fa.attention, mask, g_out_t), argnums=tuple(range(6)))(*inputs)
    _compare_grads(got, want, [None] * 6, torch.float64)
    leaves = [t.detach().requires_grad_() for t in inputs]
    got = torch.autograd.grad(tangent_loss(fa.attention, mask, g_out_t)(*leaves), leaves)
    _compare_grads(got, want, [None] * 6, torch.float64)
    # A Hessian-vector product of f(q) = <g, attention(q, k, v)>: grad of <∇f, t> = H·t.
    g_out = torch.randn_like(g_out_t)

    def hvp(attention):
        def f(q):
            return (attention(q, k, v, attn_bias=mask, **opts) * g_out).sum()

        return torch.func.grad(lambda q: torch.func.jvp(f, (q,), (q_t,))[1])(q)

    assert_close(hvp(fa.attention), hvp(ref.attention), torch.float64, name="Hessian-vector product")


def test_attention_jvp_is_differentiable_when_inputs_require_grad(small_chunks):
    case = CASES[1]
    small_chunks(case)
    primals, tangents, bias, bias_t, opts = _inputs(case, torch.float64)
    leaves = _leaves(primals, tangents, bias, bias_t)
    weights = _loss_weights(primals[0].shape[:3] + primals[2].shape[-1:], torch.float64)
    outputs = fa.attention_jvp(*leaves[:6], attn_bias=leaves[6], bias_t=leaves[7], return_lse=True, **opts)
    got = torch.autograd.grad(_loss(outputs[0], outputs[2], outputs[1], outputs[3], weights), leaves)
    want = _reference_grads([to64(t) for t in leaves], bias, opts, weights)
    _compare_grads(got, want, [None] * 8, torch.float64)
    with torch.no_grad():
        outputs = fa.attention_jvp(*leaves[:6], attn_bias=leaves[6], bias_t=leaves[7], **opts)
    assert not any(t.requires_grad for t in outputs)


def test_reference_backward_formulas_match_double_autograd():
    """fastcm.reference.attention.attention_jvp_backward, the written-out formulas, against
    float64 double autograd of the reference attention_jvp on every case."""
    for case in CASES:
        primals, tangents, bias, bias_t, opts = _inputs(case, torch.float64)
        primals, tangents, bias, bias_t = (
            [to64(t) for t in primals],
            [to64(t) for t in tangents],
            _to64(bias),
            to64(bias_t),
        )
        weights = _loss_weights(primals[0].shape[:3] + primals[2].shape[-1:], torch.float64)
        zero = [torch.zeros_like(w) for w in weights[:2]]
        want = _reference_grads(_leaves(primals, tangents, bias, bias_t), bias, opts, tuple(zero) + weights[2:])
        got = ref.attention_jvp_backward(*primals, *tangents, *weights[2:], attn_bias=bias, bias_t=bias_t, **opts)
        if bias_t is None:
            assert got[6:] == (None, None)
            got = got[:6]
        else:  # the reference returns the (B, H, Nq, Nk) bias gradients; the leaf is broadcast over B
            got = got[:6] + tuple(g.sum(0, keepdim=True) for g in got[6:])
        _compare_grads(got, want, [None] * len(want), torch.float64)


def test_late_tangent_path_skips_absent_tangents_and_is_differentiable():
    """_Attention.jvp, the path for tangents attention() could not see up front (it runs one more
    fused pass): a Q-only tangent and a loss on it, against double autograd of the reference."""
    case = CASES[1]
    primals, tangents, bias, _, opts = _inputs(case, torch.float64)
    leaves = _leaves(primals, _drop(tangents, ABSENT[0]), bias, None)
    q, k, v, q_t = leaves[:4]
    scale = q.shape[-1] ** -0.5
    weights = _loss_weights(q.shape[:3] + v.shape[-1:], torch.float64)
    with fwAD.dual_level():
        out, lse = fa._Attention.apply(fwAD.make_dual(q, q_t), k, v, fa._kernel_bias(bias, q, k), scale, opts["causal"])
        out, lse = fwAD.unpack_dual(out), fwAD.unpack_dual(lse)
        loss = _loss(out.primal, lse.primal, out.tangent, lse.tangent, weights)
    got = torch.autograd.grad(loss, [q, k, v, q_t])
    want = _reference_grads([to64(t) for t in leaves], to64(bias), opts, weights)
    _compare_grads(got, want, [None] * 4, torch.float64, GRAD_NAMES[:4])
