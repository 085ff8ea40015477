import math

import pytest
import torch

import fastcm
from fastcm.reference.precondition import precondition as ref_precondition
from fastcm.reference.precondition import precondition_scaling_derivatives, precondition_scalings
from helpers import DEVICE, FAST_DTYPES, assert_close, poisoned_empty, randn, to64

# σ-space parameterisations; flow and VP (times in [0, 1]) are tested in tests/test_flow.py.
PARAMS = ("edm", "cm", "trigflow")
SHAPES = [(1, 5), (3, 4, 7, 5), (7, 3, 33), (2, 2100)]  # 2100 > one 2048-element block


def _sigma(kind, batch, dtype=torch.float32, requires_grad=False):
    if kind == "float":
        return 0.7
    values = (torch.rand(batch, dtype=torch.float64) * 1.4 + 0.05).to(device=DEVICE, dtype=dtype)
    if kind == "0d":
        values = values[0]
    elif kind == "b111":
        values = values.reshape(batch, 1, 1)
    return values.requires_grad_(requires_grad)


# ---- the reference against closed-form math --------------------------------------------------


@pytest.mark.parametrize("param", PARAMS)
def test_reference_scalings_closed_form(param):
    sigma, sd, smin = 0.8, 0.5, 0.002
    c_skip, c_out, c_in = (
        float(c)
        for c in precondition_scalings(
            torch.tensor(sigma, dtype=torch.float64), param=param, sigma_data=sd, sigma_min=smin
        )
    )
    expected = {
        "edm": (sd**2 / (sigma**2 + sd**2), sigma * sd / math.sqrt(sigma**2 + sd**2), 1 / math.sqrt(sigma**2 + sd**2)),
        "cm": (
            sd**2 / ((sigma - smin) ** 2 + sd**2),
            (sigma - smin) * sd / math.sqrt(sigma**2 + sd**2),
            1 / math.sqrt(sigma**2 + sd**2),
        ),
        "trigflow": (math.cos(sigma), -sd * math.sin(sigma), 1 / sd),
    }[param]
    assert (c_skip, c_out, c_in) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("param", PARAMS)
def test_reference_scaling_derivatives_match_autograd(param):
    sigma = torch.linspace(0.01, 1.5, 17, dtype=torch.float64, requires_grad=True)
    c_skip, c_out, _ = precondition_scalings(sigma, param=param)
    (auto_skip,) = torch.autograd.grad(c_skip.sum(), sigma, retain_graph=True)
    (auto_out,) = torch.autograd.grad(c_out.sum(), sigma)
    d_skip, d_out = precondition_scaling_derivatives(sigma.detach(), param=param)
    torch.testing.assert_close(d_skip, auto_skip, rtol=1e-12, atol=0)
    torch.testing.assert_close(d_out, auto_out, rtol=1e-12, atol=0)


@pytest.mark.parametrize("param", PARAMS)
def test_reference_gradcheck(param):
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(2, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, f, s: ref_precondition(x, f, s, param=param), (x, f, sigma))
    assert torch.autograd.gradgradcheck(lambda x, f, s: ref_precondition(x, f, s, param=param), (x, f, sigma))


@pytest.mark.parametrize("param", PARAMS)
def test_reference_jvp_matches_finite_differences(param):
    x, f, dx, df = (torch.randn(3, 5, dtype=torch.float64) for _ in range(4))
    sigma, dsigma = torch.rand(3, dtype=torch.float64) + 0.2, torch.randn(3, dtype=torch.float64)
    fn = lambda x, f, s: ref_precondition(x, f, s, param=param)  # noqa: E731
    _, tangent = torch.func.jvp(fn, (x, f, sigma), (dx, df, dsigma))
    eps = 1e-6
    central = (
        fn(x + eps * dx, f + eps * df, sigma + eps * dsigma) - fn(x - eps * dx, f - eps * df, sigma - eps * dsigma)
    ) / (2 * eps)
    torch.testing.assert_close(tangent, central, rtol=1e-7, atol=1e-9)


def test_cm_boundary_condition_returns_x_exactly():
    x, f = torch.randn(4, 6), torch.randn(4, 6)
    out = ref_precondition(x, f, 0.002, param="cm", sigma_min=0.002)
    assert torch.equal(out, x)


# ---- the Triton path against the reference ---------------------------------------------------


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_forward_matches_reference(backend, param, shape, dtype):
    backend("triton")
    x, f = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    sigma = _sigma("b", shape[0])
    with poisoned_empty():
        out = fastcm.precondition(x, f, sigma, param=param)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref_precondition(to64(x), to64(f), to64(sigma), param=param), dtype)


@pytest.mark.parametrize("sigma_kind", ["float", "0d", "b", "b111"])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_forward_sigma_kinds_and_strides(backend, sigma_kind, noncontiguous):
    backend("triton")
    x = randn(3, 6, 5, noncontiguous=noncontiguous)
    f = randn(3, 6, 5, noncontiguous=noncontiguous)
    sigma = _sigma(sigma_kind, 3)
    with poisoned_empty():
        out = fastcm.precondition(x, f, sigma, param="edm")
    assert_close(out, ref_precondition(to64(x), to64(f), to64(sigma)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cm_kernel_boundary_condition_returns_x(backend, dtype):
    """σ = σ_min: c_skip = 1 and c_out = 0 exactly, if σ_min reaches the kernel in the compute dtype."""
    backend("triton")
    x, f = randn(3, 40, dtype=dtype), randn(3, 40, dtype=dtype)
    out = fastcm.precondition(x, f, 0.002, param="cm", sigma_min=0.002)
    assert torch.equal(out, x)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("shape", [(1, 5), (7, 3, 33), (2, 2100)])
@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("sigma_kind", ["0d", "b"])
def test_backward_matches_reference(backend, param, shape, dtype, sigma_kind):
    backend("triton")
    x = randn(*shape, dtype=dtype, requires_grad=True)
    f = randn(*shape, dtype=dtype, requires_grad=True)
    sigma = _sigma(sigma_kind, shape[0], requires_grad=True)
    grad_out = randn(*shape, dtype=dtype)
    with poisoned_empty():
        out = fastcm.precondition(x, f, sigma, param=param)
        grads = torch.autograd.grad(out, (x, f, sigma), grad_out)
    x64, f64, s64 = to64(x), to64(f), to64(sigma)
    expected = torch.autograd.grad(ref_precondition(x64, f64, s64, param=param), (x64, f64, s64), to64(grad_out))
    for name, got, want in zip(("grad x", "grad net_out", "grad sigma"), grads, expected):
        assert got.dtype == (sigma.dtype if name == "grad sigma" else dtype)
        # The σ-gradient sums D products rounded to `dtype`: scale its tolerance by √D.
        tol_dtype = dtype
        if name == "grad sigma":
            want_scale = (to64(grad_out).abs() * (x64.abs() + f64.abs())).flatten(1).sum(1)
            err = (to64(got).reshape(-1) - want.reshape(-1)).abs() / want_scale.reshape(-1).clamp_min(1)
            assert err.max() <= 4 * _tol(tol_dtype), f"grad sigma: {err.max():.3e}"
        else:
            assert_close(got, want, dtype, name=name)


def _tol(dtype):
    from helpers import tolerance

    return tolerance(dtype)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_backward_only_requested_gradients(backend, needs):
    backend("triton")
    x = randn(3, 50, requires_grad=needs[0])
    f = randn(3, 50, requires_grad=needs[1])
    sigma = _sigma("b", 3, requires_grad=needs[2])
    out = fastcm.precondition(x, f, sigma, param="cm")
    wanted = [t for t, need in zip((x, f, sigma), needs) if need]
    grad_out = randn(3, 50)
    with poisoned_empty():
        (got,) = torch.autograd.grad(out, wanted, grad_out)
    inputs64 = [to64(t) for t in (x, f, sigma)]
    (want,) = torch.autograd.grad(
        ref_precondition(*inputs64, param="cm"), [t for t in inputs64 if t.requires_grad], to64(grad_out)
    )
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("tangents", ["all", "x", "sigma"])
def test_jvp_matches_reference(backend, param, dtype, tangents):
    backend("triton")
    shape = (3, 5, 41)
    x, f, dx, df = (randn(*shape, dtype=dtype) for _ in range(4))
    sigma, dsigma = _sigma("b", 3), randn(3)
    if tangents == "x":
        df, dsigma = torch.zeros_like(df), torch.zeros_like(dsigma)
    elif tangents == "sigma":
        dx, df = torch.zeros_like(dx), torch.zeros_like(df)
    with poisoned_empty(), torch.no_grad():
        out, out_t = torch.func.jvp(
            lambda a, b, s: fastcm.precondition(a, b, s, param=param), (x, f, sigma), (dx, df, dsigma)
        )
    ref_fn = lambda a, b, s: ref_precondition(a, b, s, param=param)  # noqa: E731
    want, want_t = torch.func.jvp(ref_fn, (to64(x), to64(f), to64(sigma)), (to64(dx), to64(df), to64(dsigma)))
    assert_close(out, want, dtype)
    assert_close(out_t, want_t, dtype, name="tangent")


def test_forward_ad_dual_tensors(backend):
    backend("triton")
    import torch.autograd.forward_ad as fwAD

    x, f, dx = randn(3, 70), randn(3, 70), randn(3, 70)
    sigma = _sigma("b", 3)
    _, want_t = torch.func.jvp(
        lambda a: ref_precondition(a, to64(f), to64(sigma), param="trigflow"), (to64(x),), (to64(dx),)
    )
    with fwAD.dual_level(), torch.no_grad():
        out = fastcm.precondition(fwAD.make_dual(x, dx), f, sigma, param="trigflow")
        tangent = fwAD.unpack_dual(out).tangent
    assert_close(tangent, want_t, torch.float32)


def _tiny_net(x, t, weight):
    return torch.tanh(x @ weight) * torch.cos(t).reshape(-1, 1)


@pytest.mark.parametrize("param", ["edm", "trigflow"])
def test_jvp_through_a_model(backend, param):
    """The sCM pattern: d/dt of f(x_t, t) = precondition(x, net(x, t), t) along (dx, dt)."""
    backend("triton")
    weight = randn(9, 9) * 0.3
    x, dx = randn(4, 9), randn(4, 9)
    t, dt = _sigma("b", 4), randn(4)
    fn = lambda a, s, w: fastcm.precondition(a, _tiny_net(a, s, w), s, param=param)  # noqa: E731
    ref_fn = lambda a, s, w: ref_precondition(a, _tiny_net(a, s, w), s, param=param)  # noqa: E731
    with torch.no_grad():
        _, tangent = torch.func.jvp(lambda a, s: fn(a, s, weight), (x, t), (dx, dt))
    _, want = torch.func.jvp(lambda a, s: ref_fn(a, s, to64(weight)), (to64(x), to64(t)), (to64(dx), to64(dt)))
    assert_close(tangent, want, torch.float32)


def test_jvp_with_grad_enabled_is_differentiable(backend):
    """MeanFlow backpropagates through a jvp taken with grad enabled; the tangent must carry a graph."""
    backend("triton")
    x = randn(3, 11, requires_grad=True)
    f, dx = randn(3, 11), randn(3, 11)
    sigma = _sigma("b", 3)
    _, tangent = torch.func.jvp(lambda a: fastcm.precondition(a, f * a, sigma), (x,), (dx,))
    (got,) = torch.autograd.grad(tangent.square().sum(), x)
    x64 = to64(x)
    _, want_t = torch.func.jvp(lambda a: ref_precondition(a, to64(f) * a, to64(sigma)), (x64,), (to64(dx),))
    (want,) = torch.autograd.grad(want_t.square().sum(), x64)
    assert_close(got, want, torch.float32)


def test_double_backward_matches_reference(backend):
    backend("triton")
    x = randn(2, 13, requires_grad=True)
    f = randn(2, 13)
    sigma = _sigma("b", 2, requires_grad=True)
    (g,) = torch.autograd.grad(fastcm.precondition(x, f, sigma, param="cm").square().sum(), sigma, create_graph=True)
    (got,) = torch.autograd.grad(g.sum(), x)
    x64, s64 = to64(x), to64(sigma)
    (g64,) = torch.autograd.grad(ref_precondition(x64, to64(f), s64, param="cm").square().sum(), s64, create_graph=True)
    (want,) = torch.autograd.grad(g64.sum(), x64)
    assert_close(got, want, torch.float32)


def test_torch_compile_matches_eager(backend):
    backend("triton")
    x, f = randn(3, 6, 7), randn(3, 6, 7)
    sigma = _sigma("b", 3)
    fn = lambda a, b, s: fastcm.precondition(a, b, s, param="cm") * 2 + 1  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)  # no grad: the op traces as one custom-op node
    torch.testing.assert_close(compiled(x, f, sigma), fn(x, f, sigma), rtol=0, atol=0)


def test_torch_compile_training_step_matches_eager(backend):
    """With inputs that require grad, dynamo cannot trace an autograd.Function that has a custom
    jvp and breaks the graph there; forward and gradients must still equal eager."""
    backend("triton")
    x, f = randn(3, 6, 7, requires_grad=True), randn(3, 6, 7, requires_grad=True)
    sigma = _sigma("b", 3, requires_grad=True)
    fn = lambda a, b, s: (fastcm.precondition(a, b, s, param="edm") * 2).square().sum()  # noqa: E731
    torch._dynamo.reset()
    got_loss = torch.compile(fn)(x, f, sigma)
    got = torch.autograd.grad(got_loss, (x, f, sigma))
    want_loss = fn(x, f, sigma)
    want = torch.autograd.grad(want_loss, (x, f, sigma))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)


def test_reference_backend_on_cpu_by_default():
    x, f = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    out = fastcm.precondition(x, f, 0.3)
    assert torch.equal(out, ref_precondition(x, f, 0.3))


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, message",
    [
        (
            lambda: (torch.randn(2, 3), torch.randn(2, 4), 0.5, {}),
            ValueError,
            r"net_out has shape \(2, 4\).*x has shape \(2, 3\)",
        ),
        (
            lambda: (torch.randn(2, 3), torch.randn(2, 3), torch.rand(3), {}),
            ValueError,
            r"sigma has shape \(3,\); expected a scalar or 2",
        ),
        (
            lambda: (torch.randn(2, 3), torch.randn(2, 3, device="meta"), 0.5, {}),
            ValueError,
            r"net_out is on meta but x is on cpu",
        ),
        (
            lambda: (torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64), 0.5, {}),
            TypeError,
            r"x has dtype torch.int64; supported: float32, bfloat16, float16, float64",
        ),
        (
            lambda: (torch.randn(2, 3), torch.randn(2, 3), 0.5, {"param": "vp"}),
            ValueError,
            r"param='vp' is not supported; expected one of \('edm', 'cm', 'trigflow', 'flow'",
        ),
        (
            lambda: (torch.randn(2, 3), torch.randn(2, 3).half(), 0.5, {}),
            TypeError,
            r"net_out has dtype torch.float16 but x",
        ),
        (lambda: (torch.randn(2, 3), torch.randn(2, 3), "0.5", {}), TypeError, r"sigma must be a float, a 0-d tensor"),
        (
            lambda: (torch.randn(2, 3), torch.randn(2, 3), 0.5, {"sigma_data": 0.0}),
            ValueError,
            r"sigma_data must be > 0",
        ),
    ],
)
def test_bad_input(make, error, message):
    x, f, sigma, kwargs = make()
    with pytest.raises(error, match=message):
        fastcm.precondition(x, f, sigma, **kwargs)


def test_unknown_backend_is_rejected(backend):
    backend("fastest")
    with pytest.raises(ValueError, match=r"FASTCM_BACKEND='fastest' is not a backend; expected one of"):
        fastcm.precondition(torch.randn(2, 3), torch.randn(2, 3), 0.5)


def test_backend_without_an_implementation_raises(backend):
    backend("cuda")
    with pytest.raises(RuntimeError, match=r"FASTCM_BACKEND='cuda' is not implemented for this op"):
        fastcm.precondition(torch.randn(2, 3), torch.randn(2, 3), 0.5)
