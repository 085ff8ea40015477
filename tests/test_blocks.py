import pytest
import torch
import torch.nn.functional as F

import fastcm.blocks as blocks
from fastcm.kernels import blocks as launchers
from fastcm.reference import blocks as ref
from helpers import DEVICE, FAST_DTYPES, assert_close, poisoned_empty, randn, to64

DTYPES = FAST_DTYPES + (torch.float64,)
# The Triton kernels, and the closed forms CPU tensors take under FASTCM_BACKEND=auto.
PATHS = ["triton", "auto"] if DEVICE == "cpu" else ["triton"]
SHAPES = [(2, 5, 24), (3, 17, 40), (1, 1, 7)]


@pytest.fixture(params=["default tiles", "small tiles"])
def tiles(request, monkeypatch):
    """Small tiles split a sample's tokens over several programs (several partials per sample)."""
    if request.param == "small tiles":
        monkeypatch.setattr(launchers, "TILE_ELEMENTS", 64)
        monkeypatch.setattr(launchers, "ELEMENTWISE_BLOCK", 32)


def _norm_inputs(shape, dtype, strided=False, requires_grad=False):
    batch, _, channels = shape
    x = randn(*shape, dtype=dtype, requires_grad=requires_grad)
    if strided:  # shift and scale as chunks of one adaLN output, rows 3·C apart
        mod = randn(batch, 3 * channels, dtype=dtype)
        shift, scale = mod[:, :channels], mod[:, channels : 2 * channels]
        shift, scale = (t.requires_grad_(requires_grad) if requires_grad else t for t in (shift, scale))
    else:
        shift = randn(batch, channels, dtype=dtype, requires_grad=requires_grad)
        scale = randn(batch, channels, dtype=dtype, requires_grad=requires_grad)
    return x, shift, scale


# ---- the reference against other libraries and closed forms ----------------------------------


@pytest.mark.parametrize("norm", ref.NORMS)
def test_reference_norm_matches_torch(norm):
    x, w = torch.randn(2, 3, 12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    shift, scale = torch.randn(2, 12, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    torch_norm = F.layer_norm(x, (12,), w, None, 1e-6) if norm == "layer" else F.rms_norm(x, (12,), w, 1e-6)
    expected = torch_norm * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(
        ref.modulated_norm(x, shift, scale, norm=norm, weight=w), expected, rtol=1e-12, atol=1e-12
    )


def test_reference_activations_match_torch():
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(ref.gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(ref.silu(x), F.silu(x), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(ref.swiglu(x), F.silu(x[:, :5]) * x[:, 5:], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("norm", ref.NORMS)
@pytest.mark.parametrize("weighted", [False, True])
def test_closed_forms_match_autodiff_of_reference(norm, weighted):
    x, shift, scale = (torch.randn(*s, dtype=torch.float64) for s in ((2, 6, 9), (2, 9), (2, 9)))
    w = torch.randn(9, dtype=torch.float64) if weighted else None
    tangents = [torch.randn_like(t) for t in (x, shift, scale)]
    w_t = torch.randn(9, dtype=torch.float64) if weighted else None
    fn = (
        (lambda a, b, c, d: ref.modulated_norm(a, b, c, norm=norm, weight=d))
        if weighted
        else (lambda a, b, c: ref.modulated_norm(a, b, c, norm=norm))
    )
    primals = (x, shift, scale, w) if weighted else (x, shift, scale)
    y, y_t = torch.func.jvp(fn, primals, tuple(tangents) + ((w_t,) if weighted else ()))
    closed_y, closed_t = ref.modulated_norm_closed(x, shift, scale, w, *tangents, w_t, norm, 1e-6, True, True)
    torch.testing.assert_close(closed_y, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(closed_t, y_t, rtol=1e-11, atol=1e-11)
    grad = torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in primals]
    expected = torch.autograd.grad(fn(*leaves), leaves, grad)
    closed = ref.modulated_norm_backward(grad, x, shift, scale, w, norm, 1e-6, (True, True, True, weighted))
    for c, e in zip(closed, expected):
        torch.testing.assert_close(c, e, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("kind", ref.ACTIVATIONS)
def test_activation_closed_forms_match_autodiff(kind):
    x, x_t = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    fn = ref.ACTIVATION_FUNCTIONS[kind]
    y, y_t = torch.func.jvp(fn, (x,), (x_t,))
    closed_y, closed_t = ref.activation_closed(kind, x, x_t, True, True)
    torch.testing.assert_close(closed_y, y, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(closed_t, y_t, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    leaf = x.clone().requires_grad_()
    torch.testing.assert_close(
        ref.activation_backward(kind, grad, x), torch.autograd.grad(fn(leaf), leaf, grad)[0], rtol=1e-12, atol=1e-12
    )


def test_reference_gradcheck():
    x, shift, scale, y = (
        torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 3, 5), (2, 5), (2, 5), (2, 3, 5))
    )
    assert torch.autograd.gradcheck(lambda a, b, c: ref.modulated_norm(a, b, c), (x, shift, scale))
    assert torch.autograd.gradcheck(ref.gated_residual, (x, shift, y))


# ---- fast paths against the reference ----------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("norm", ref.NORMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_modulated_norm_forward_jvp_backward(backend, tiles, path, norm, shape, dtype):
    backend(path)
    x, shift, scale = _norm_inputs(shape, dtype, strided=shape[0] > 1, requires_grad=True)
    w = randn(shape[2], dtype=dtype, requires_grad=True) if shape[1] > 4 else None
    tangents = [randn(*t.shape, dtype=dtype) for t in (x, shift, scale)]
    primals64 = [to64(t) for t in (x, shift, scale)]
    w64 = to64(w)
    expected, expected_t = torch.func.jvp(
        lambda a, b, c: ref.modulated_norm(a, b, c, norm=norm, weight=w64),
        tuple(p.detach() for p in primals64),
        tuple(map(to64, tangents)),
    )
    with poisoned_empty():
        y = blocks.modulated_norm(x, shift, scale, norm=norm, weight=w)
        y_jvp, y_t = torch.func.jvp(
            lambda a, b, c: blocks.modulated_norm(a, b, c, norm=norm, weight=w.detach() if w is not None else None),
            (x.detach(), shift.detach(), scale.detach()),
            tuple(tangents),
        )
        explicit, explicit_t = blocks.modulated_norm_jvp(x, shift, scale, *tangents, norm=norm, weight=w)
    assert y.dtype == dtype and y_t.dtype == dtype
    for actual, name in ((y, "y"), (y_jvp, "jvp primal"), (explicit, "explicit y")):
        assert_close(actual, expected, dtype, name=name)
    assert_close(y_t, expected_t, dtype, name="tangent")
    assert_close(explicit_t, expected_t, dtype, name="explicit tangent")
    grad = randn(*shape, dtype=dtype)
    leaves = [t for t in (x, shift, scale, w) if t is not None]
    leaves64 = [t for t in primals64 + [w64] if t is not None]
    with poisoned_empty():
        grads = torch.autograd.grad(y, leaves, grad)
    expected_grads = torch.autograd.grad(ref.modulated_norm(*primals64, norm=norm, weight=w64), leaves64, to64(grad))
    for name, actual, want in zip(("x", "shift", "scale", "weight"), grads, expected_grads):
        assert actual.dtype == dtype
        assert_close(actual, want, dtype, name=f"grad {name}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_forward_jvp_backward(backend, tiles, path, shape, dtype):
    backend(path)
    x, gate, _ = _norm_inputs(shape, dtype, strided=True, requires_grad=True)
    y = randn(*shape, dtype=dtype, requires_grad=True)
    tangents = [randn(*t.shape, dtype=dtype) for t in (x, gate, y)]
    p64 = [to64(t) for t in (x, gate, y)]
    expected, expected_t = torch.func.jvp(
        ref.gated_residual, tuple(p.detach() for p in p64), tuple(map(to64, tangents))
    )
    with poisoned_empty():
        out = blocks.gated_residual(x, gate, y)
        _, out_t = torch.func.jvp(blocks.gated_residual, (x.detach(), gate.detach(), y.detach()), tuple(tangents))
        explicit, explicit_t = blocks.gated_residual_jvp(x, gate, y, *tangents)
        _, partial_t = blocks.gated_residual_jvp(x, gate, y, None, tangents[1], None)
        grad = randn(*shape, dtype=dtype)
        grads = torch.autograd.grad(out, (x, gate, y), grad)
    assert_close(out, expected, dtype)
    assert_close(explicit, expected, dtype, name="explicit")
    assert_close(out_t, expected_t, dtype, name="tangent")
    assert_close(explicit_t, expected_t, dtype, name="explicit tangent")
    assert_close(partial_t, to64(tangents[1])[:, None] * p64[2].detach(), dtype, name="gate-only tangent")
    expected_grads = torch.autograd.grad(ref.gated_residual(*p64), p64, to64(grad))
    for name, actual, want in zip("x gate y".split(), grads, expected_grads):
        assert_close(actual, want, dtype, name=f"grad {name}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ref.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(3, 10), (2, 3, 70)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_forward_jvp_backward(backend, tiles, path, kind, shape, dtype):
    backend(path)
    x = randn(*shape, dtype=dtype, requires_grad=True)
    x_t = randn(*shape, dtype=dtype)
    fn, spec = getattr(blocks, kind), ref.ACTIVATION_FUNCTIONS[kind]
    expected, expected_t = torch.func.jvp(spec, (to64(x).detach(),), (to64(x_t),))
    with poisoned_empty():
        y = fn(x)
        _, y_t = torch.func.jvp(fn, (x.detach(),), (x_t,))
        explicit, explicit_t = getattr(blocks, f"{kind}_jvp")(x, x_t)
        with torch.autograd.forward_ad.dual_level():
            dual = fn(torch.autograd.forward_ad.make_dual(x.detach(), x_t))
            dual_t = torch.autograd.forward_ad.unpack_dual(dual).tangent
        grad = randn(*expected.shape, dtype=dtype)
        (grad_x,) = torch.autograd.grad(y, x, grad)
    for actual, name in ((y, "y"), (explicit, "explicit")):
        assert_close(actual, expected, dtype, name=name)
    for actual, name in ((y_t, "jvp"), (explicit_t, "explicit tangent"), (dual_t, "dual tangent")):
        assert_close(actual, expected_t, dtype, name=name)
    x64 = to64(x)
    assert_close(grad_x, torch.autograd.grad(spec(x64), x64, to64(grad))[0], dtype, name="grad")


@pytest.mark.parametrize("path", PATHS)
def test_norm_dual_tensors_and_tangent_backpropagation(backend, path):
    """Forward-AD dual tensors, and a jvp taken with grad enabled then backpropagated through
    (second order: the rule switches to the differentiable closed forms)."""
    backend(path)
    x, shift, scale = (randn(*s, dtype=torch.float64) for s in ((2, 4, 6), (2, 6), (2, 6)))
    x_t = randn(2, 4, 6, dtype=torch.float64)
    with torch.autograd.forward_ad.dual_level():
        dual = blocks.modulated_norm(torch.autograd.forward_ad.make_dual(x, x_t), shift, scale)
        tangent = torch.autograd.forward_ad.unpack_dual(dual).tangent
    expected_t = torch.func.jvp(lambda a: ref.modulated_norm(a, shift, scale), (x,), (x_t,))[1]
    torch.testing.assert_close(tangent, expected_t, rtol=1e-12, atol=1e-12)
    scale_leaf, ref_leaf = scale.clone().requires_grad_(), scale.clone().requires_grad_()
    _, fast_t = torch.func.jvp(lambda a: blocks.modulated_norm(a, shift, scale_leaf), (x,), (x_t,))
    _, ref_t = torch.func.jvp(lambda a: ref.modulated_norm(a, shift, ref_leaf), (x,), (x_t,))
    (fast_grad,) = torch.autograd.grad(fast_t.pow(2).sum(), scale_leaf)
    (ref_grad,) = torch.autograd.grad(ref_t.pow(2).sum(), ref_leaf)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("path", PATHS)
def test_double_backward(backend, path):
    backend(path)
    x = randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    shift, scale = (randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradgradcheck(lambda a, b, c: blocks.modulated_norm(a, b, c), (x, shift, scale))
    assert torch.autograd.gradgradcheck(blocks.gated_residual, (x, shift, x.detach().clone().requires_grad_()))
    assert torch.autograd.gradgradcheck(blocks.gelu_tanh, (x,))


def test_reference_backend_runs_the_spec(backend):
    backend("reference")
    x, shift, scale = _norm_inputs((2, 3, 4), torch.float64)
    x_t = torch.randn_like(x)
    y, y_t = blocks.modulated_norm_jvp(x, shift, scale, x_t)
    expected, expected_t = torch.func.jvp(lambda a: ref.modulated_norm(a, shift, scale), (x,), (x_t,))
    assert torch.equal(y, expected) and torch.equal(y_t, expected_t)


# ---- bad input ---------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x, shift, scale = _norm_inputs((2, 3, 4), torch.float32)
    with pytest.raises(ValueError, match=r"x must be \(B, N, C\) tokens"):
        blocks.modulated_norm(x[0], shift, scale)
    with pytest.raises(ValueError, match=r"scale must have shape \(B, C\) = \(2, 4\)"):
        blocks.modulated_norm(x, shift, scale[:, :3])
    with pytest.raises(ValueError, match="norm='batch' is not supported"):
        blocks.modulated_norm(x, shift, scale, norm="batch")
    with pytest.raises(ValueError, match="eps must be > 0"):
        blocks.modulated_norm(x, shift, scale, eps=0.0)
    with pytest.raises(ValueError, match="weight must have shape"):
        blocks.modulated_norm(x, shift, scale, weight=torch.ones(5, device=DEVICE))
    with pytest.raises(ValueError, match="x_t has shape"):
        blocks.modulated_norm_jvp(x, shift, scale, x[:, :2])
    with pytest.raises(ValueError, match="weight_t is given but weight is None"):
        blocks.modulated_norm_jvp(x, shift, scale, weight_t=torch.ones(4, device=DEVICE))
    with pytest.raises(TypeError, match="y has dtype torch.float64"):
        blocks.gated_residual(x, shift, x.double())
    with pytest.raises(ValueError, match="last dim must be even"):
        blocks.swiglu(torch.ones(2, 3, device=DEVICE))
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        blocks.silu(torch.ones(3, dtype=torch.long, device=DEVICE))
