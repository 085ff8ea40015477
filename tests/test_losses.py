"""pseudo_huber_loss, scm_loss, scm_tangent, meanflow_loss: reference vs closed forms, the fused
kernels (Triton interpreter on CPU) vs the float64 reference, bad input."""

import math

import pytest
import torch

import fastcm.kernels.losses as launchers
from fastcm import losses
from fastcm.reference import losses as reference
from helpers import DEVICE, FAST_DTYPES, assert_close, poisoned_empty, randn, to64

F64 = torch.float64
SHAPES = [(1, 5), (3, 3, 37), (7, 2, 5, 9)]  # B = 1, 3, 7; D = 5, 111, 90: never a multiple of a block


@pytest.fixture(params=["default blocks", "small blocks"])
def geometry(request, monkeypatch):
    """Also run with 32-element blocks and few programs, so that the per-program block loop, several
    chunks per sample and a partial last block are exercised on test-sized samples; and with a
    64-element sCM on-chip limit, so that test-sized samples above it take the streaming fallback."""
    if request.param == "small blocks":
        monkeypatch.setattr(launchers, "BLOCK", 32)
        monkeypatch.setattr(launchers, "TARGET_PROGRAMS", 4)
        monkeypatch.setattr(launchers, "SCM_ON_CHIP_ELEMENTS", 64)
    return request.param


def _per_sample_numel(shape):
    return math.prod(shape[1:])


def _cotangent(reduction, batch, scale):
    """Upstream gradient, scaled so that the input gradients are O(1) and the relative tolerance bites."""
    return scale * (randn(batch, dtype=F64) if reduction == "none" else torch.rand((), dtype=F64, device=DEVICE) + 0.5)


def _check_against_reference(fast_fn, ref_fn, inputs, grad_names, dtype, reduction, scale):
    """Forward and the gradient of every name in grad_names, fast path (NaN-poisoned outputs) vs the
    reference in float64 on the same rounded inputs."""
    inputs64 = {k: to64(v) for k, v in inputs.items()}
    with poisoned_empty():
        out = fast_fn(**inputs)
        cot = _cotangent(reduction, out.shape[0] if out.dim() else 1, scale)
        grads = torch.autograd.grad(out, [inputs[n] for n in grad_names], cot.to(out.dtype).reshape(out.shape))
    expected = ref_fn(**inputs64)
    expected_grads = torch.autograd.grad(expected, [inputs64[n] for n in grad_names], to64(cot).reshape(expected.shape))
    assert out.dtype == dtype
    assert_close(out, expected, dtype, name="loss")
    for name, grad, expected_grad in zip(grad_names, grads, expected_grads):
        assert grad.shape == inputs[name].shape
        assert_close(grad, expected_grad, dtype, name=f"grad {name}")


# ------------------------------------------------------------------ references


def test_reference_gradcheck_float64():
    x, y = randn(3, 2, 5, dtype=F64, requires_grad=True), randn(3, 2, 5, dtype=F64, requires_grad=True)
    weight = torch.rand(3, dtype=F64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, w: reference.pseudo_huber_loss(a, b, c=0.3, weight=w), (x, y, weight), check_forward_ad=True
    )
    F, others = randn(3, 2, 5, dtype=F64, requires_grad=True), [randn(3, 2, 5, dtype=F64) for _ in range(4)]
    logvar, t = randn(3, dtype=F64, requires_grad=True), torch.rand(3, dtype=F64, device=DEVICE) * 1.5
    for norm in ("l2", "rms"):
        assert torch.autograd.gradcheck(
            lambda f, lv: reference.scm_loss(f, *others, t, r=0.7, tangent_norm=norm, weight=t + 1, logvar=lv),
            (F, logvar),
            check_forward_ad=True,
        )
    u, v, dudt = randn(3, 2, 5, dtype=F64, requires_grad=True), randn(3, 2, 5, dtype=F64), randn(3, 2, 5, dtype=F64)
    # The adaptive weight is stop-gradient, so the gradient is 2·(u − u_tgt)/(L + ε)^p, not d(loss)/du.
    u_target = v - (t - t / 3).view(3, 1, 1) * dudt
    sq_error = ((u - u_target) ** 2).sum(dim=(1, 2))
    expected = 2 * (u - u_target) / (sq_error.detach() + 1e-3).view(3, 1, 1) ** 0.75 / 3
    (grad,) = torch.autograd.grad(reference.meanflow_loss(u, v, dudt, t, t / 3), u)
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_pseudo_huber_limits(impl, backend):
    """‖x−y‖ ≫ c: loss = ‖x−y‖ − c + c²/(2‖x−y‖) + …;  ‖x−y‖ ≪ c: loss = ‖x−y‖²/(2c) − … (float64)."""
    backend(impl)
    direction = randn(2, 50, dtype=F64)
    direction = direction / direction.norm(dim=1, keepdim=True)
    target = randn(2, 50, dtype=F64)
    far = losses.pseudo_huber_loss(target + 100.0 * direction, target, c=0.01, reduction="none")
    assert ((far - (100.0 - 0.01)).abs() <= 0.01**2 / (2 * 100.0) * 1.001).all(), far
    near = losses.pseudo_huber_loss(target + 1e-6 * direction, target, c=1.0, reduction="none")
    small_limit = 1e-12 / 2.0
    assert ((near - small_limit).abs() <= small_limit * 1e-9).all(), near


def _hand_scm_tangent():
    """A two-element sample with cos t = 0.6, sin t = 0.8, σd = 0.5, r = 0.5, worked by hand:
    g_i = −0.36·(0.5·F⁻_i − dx_i) − 0.5·(0.48·x_i + 0.5·F_jvp_i)."""
    t = math.atan2(0.8, 0.6)
    F_minus, dx_dt, x_t, F_jvp = [1.0, -2.0], [0.5, 1.0], [2.0, 0.0], [0.2, 0.4]
    # element 0: −0.36·(0.5 − 0.5) − 0.5·(0.96 + 0.1) = −0.53
    # element 1: −0.36·(−1 − 1) − 0.5·(0 + 0.2) = 0.72 − 0.1 = 0.62
    g = [-0.53, 0.62]
    tensors = [torch.tensor([v], dtype=F64, device=DEVICE) for v in (F_minus, F_jvp, x_t, dx_dt)]
    return tensors, t, g


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("norm", ["none", "l2", "rms"])
def test_scm_tangent_hand_computed(impl, norm, backend):
    backend(impl)
    tensors, t, g = _hand_scm_tangent()
    l2 = math.sqrt(g[0] ** 2 + g[1] ** 2)
    divisor = {"none": 1.0, "l2": l2 + 0.1, "rms": l2 / math.sqrt(2) + 0.1}[norm]
    got = losses.scm_tangent(*tensors, t, sigma_data=0.5, r=0.5, tangent_norm=norm)
    expected = torch.tensor([[g[0] / divisor, g[1] / divisor]], dtype=F64)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_scm_tangent_is_cos_t_times_consistency_function_derivative(impl, backend):
    """With r = 1 and no normalisation, g = cos t · d/dt f(x_t, t) for the TrigFlow consistency
    function f = cos t·x_t − sin t·σd·F(x_t/σd, t), along x_t = cos t·x0 + sin t·z."""
    backend(impl)
    sigma_data, batch = 0.5, 3
    x0, z = randn(batch, 6, dtype=F64), sigma_data * randn(batch, 6, dtype=F64)
    weight, bias = randn(6, 6, dtype=F64, device="cpu").to(DEVICE) / 3, randn(6, dtype=F64)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=F64, device=DEVICE)

    def network(x_scaled, time):
        return torch.tanh(x_scaled @ weight + time.unsqueeze(1) * bias)

    def trajectory(time):
        return torch.cos(time).unsqueeze(1) * x0 + torch.sin(time).unsqueeze(1) * z

    def consistency_function(time):
        x_t = trajectory(time)
        return torch.cos(time).unsqueeze(1) * x_t - torch.sin(time).unsqueeze(1) * sigma_data * network(
            x_t / sigma_data, time
        )

    _, df_dt = torch.func.jvp(consistency_function, (t,), (torch.ones_like(t),))
    x_t, dx_dt = torch.func.jvp(trajectory, (t,), (torch.ones_like(t),))
    cos_sin = (torch.cos(t) * torch.sin(t)).unsqueeze(1)
    F_minus, F_jvp = torch.func.jvp(network, (x_t / sigma_data, t), (cos_sin * dx_dt / sigma_data, cos_sin[:, 0]))
    g = losses.scm_tangent(F_minus, F_jvp, x_t, dx_dt, t, sigma_data=sigma_data, r=1.0, tangent_norm="none")
    torch.testing.assert_close(g, torch.cos(t).unsqueeze(1) * df_dt, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ fast path vs reference


@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_pseudo_huber_matches_reference(dtype, shape, reduction, geometry, backend):
    backend("triton")
    batch, per_sample_numel = shape[0], _per_sample_numel(shape)
    inputs = {
        "input": randn(*shape, dtype=dtype, requires_grad=True),
        "target": randn(*shape, dtype=dtype, requires_grad=reduction != "sum"),
        "weight": torch.rand(batch, dtype=F64, device=DEVICE).add(0.5).requires_grad_()
        if reduction != "mean"
        else None,
    }
    grad_names = ["input"] + (["target"] if reduction != "sum" else []) + (["weight"] if reduction != "mean" else [])
    _check_against_reference(
        lambda **kw: losses.pseudo_huber_loss(**kw, reduction=reduction),
        lambda **kw: reference.pseudo_huber_loss(**kw, reduction=reduction),
        inputs,
        grad_names,
        dtype,
        reduction,
        math.sqrt(per_sample_numel),
    )


@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_pseudo_huber_noncontiguous_broadcast_weight_and_c(dtype, backend):
    backend("triton")
    inputs = {
        "input": randn(3, 4, 9, dtype=dtype, requires_grad=True, noncontiguous=True),
        "target": randn(3, 4, 9, dtype=dtype, noncontiguous=True),
        "weight": torch.rand(3, 1, 1, dtype=torch.float32, device=DEVICE).add(0.5).requires_grad_(),
    }
    _check_against_reference(
        lambda **kw: losses.pseudo_huber_loss(**kw, c=0.7, reduction="sum"),
        lambda **kw: reference.pseudo_huber_loss(**kw, c=0.7, reduction="sum"),
        inputs,
        ["input", "weight"],
        dtype,
        "sum",
        6.0,
    )


def _scm_inputs(shape, dtype, *, aliased=False, with_logvar=True, with_weight=True, noncontiguous=False):
    batch = shape[0]
    F = randn(*shape, dtype=dtype, requires_grad=True, noncontiguous=noncontiguous)
    t = torch.rand(batch, dtype=F64, device=DEVICE) * 1.5 + 0.02
    return {
        "F": F,
        "F_minus": F.detach() if aliased else randn(*shape, dtype=dtype, noncontiguous=noncontiguous),
        "F_jvp": randn(*shape, dtype=dtype, noncontiguous=noncontiguous),
        "x_t": randn(*shape, dtype=dtype),
        "dx_dt": randn(*shape, dtype=dtype),
        "t": t,
        "r": torch.rand(batch, dtype=F64, device=DEVICE),
        "weight": 1.0 / (0.5 * torch.tan(t)) if with_weight else None,
        "logvar": (0.5 * randn(batch, dtype=F64)).requires_grad_() if with_logvar else None,
    }


@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_scm_loss_matches_reference(dtype, shape, reduction, geometry, backend):
    backend("triton")
    options = {
        "mean": {"tangent_norm": "l2"},
        "sum": {"tangent_norm": "rms", "tangent_norm_c": 0.3},
        "none": {"tangent_norm": "none"},
    }[reduction]
    inputs = _scm_inputs(
        shape, dtype, aliased=reduction == "mean", with_logvar=reduction != "sum", with_weight=reduction != "none"
    )
    grad_names = ["F"] + (["logvar"] if reduction != "sum" else [])
    _check_against_reference(
        lambda **kw: losses.scm_loss(**kw, **options, reduction=reduction),
        lambda **kw: reference.scm_loss(**kw, **options, reduction=reduction),
        inputs,
        grad_names,
        dtype,
        reduction,
        _per_sample_numel(shape) / 2,
    )


@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_scm_loss_noncontiguous_scalar_t(dtype, backend):
    backend("triton")
    inputs = _scm_inputs((3, 5, 8), dtype, noncontiguous=True)
    inputs["t"], inputs["r"] = 0.8, 0.25
    _check_against_reference(
        lambda **kw: losses.scm_loss(**kw),
        lambda **kw: reference.scm_loss(**kw),
        inputs,
        ["F", "logvar"],
        dtype,
        "mean",
        20.0,
    )


@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("norm", ["l2", "rms", "none"])
def test_scm_tangent_matches_reference(dtype, norm, geometry, backend):
    backend("triton")
    inputs = {
        k: v
        for k, v in _scm_inputs((3, 3, 37), dtype, noncontiguous=True).items()
        if k in ("F_minus", "F_jvp", "x_t", "dx_dt", "t", "r")
    }
    with poisoned_empty():
        got = losses.scm_tangent(**inputs, tangent_norm=norm)
    assert got.dtype == dtype and not got.requires_grad
    assert_close(got, reference.scm_tangent(**{k: to64(v) for k, v in inputs.items()}, tangent_norm=norm), dtype)


@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_meanflow_loss_matches_reference(dtype, shape, reduction, geometry, backend):
    backend("triton")
    batch = shape[0]
    t = torch.rand(batch, dtype=F64, device=DEVICE)
    inputs = {
        "u": randn(*shape, dtype=dtype, requires_grad=True, noncontiguous=reduction == "sum" and batch > 1),
        "v": randn(*shape, dtype=dtype),
        "dudt": randn(*shape, dtype=dtype),
        "t": t,
        "r": t * torch.rand(batch, dtype=F64, device=DEVICE) if reduction != "mean" else 0.0,
    }
    scale = (3.0 * _per_sample_numel(shape)) ** 0.75 / 2
    _check_against_reference(
        lambda **kw: losses.meanflow_loss(**kw, reduction=reduction),
        lambda **kw: reference.meanflow_loss(**kw, reduction=reduction),
        inputs,
        ["u"],
        dtype,
        reduction,
        scale,
    )


# ------------------------------------------------------------------ saved residual


def _spy_forward(monkeypatch, name):
    """Record, per call of the forward launcher `name`, (save_residual asked, residual elements saved)."""
    calls, real = [], getattr(losses._ops, name)

    def spy(*args):
        out = real(*args)
        calls.append((args[-1], out[2].numel()))
        return out

    monkeypatch.setattr(losses._ops, name, spy)
    return calls


def _scm_residual64(inputs):
    """F − F⁻ − ĝ of the reference in float64 on the same inputs."""
    x = {k: to64(v) for k, v in inputs.items()}
    g_hat = reference.scm_tangent(x["F_minus"], x["F_jvp"], x["x_t"], x["dx_dt"], x["t"], r=x["r"])
    return x["F"].detach() - x["F_minus"] - g_hat


@pytest.mark.parametrize("dtype", FAST_DTYPES + (F64,))
@pytest.mark.parametrize("path", ["on chip", "streamed"])
def test_scm_saved_residual_and_no_grad_paths_match_reference(dtype, path, monkeypatch, backend):
    """With grad, the forward saves F − F⁻ − ĝ (compute dtype) where a sample fits on chip and the
    backward reads it; larger samples stream and save nothing. Without grad nothing is saved."""
    backend("triton")
    monkeypatch.setattr(launchers, "SCM_ON_CHIP_ELEMENTS", 256 if path == "on chip" else 64)
    calls = _spy_forward(monkeypatch, "scm_forward")
    shape = (3, 3, 37)
    inputs = _scm_inputs(shape, dtype)
    _check_against_reference(
        lambda **kw: losses.scm_loss(**kw),
        lambda **kw: reference.scm_loss(**kw),
        inputs,
        ["F", "logvar"],
        dtype,
        "mean",
        _per_sample_numel(shape) / 2,
    )
    with poisoned_empty():
        residual = launchers.scm_forward(
            *(inputs[k].detach() for k in ("F", "F_minus", "F_jvp", "x_t", "dx_dt")),
            *(v.to(launchers.compute_dtype(inputs["F"])) for v in (inputs["t"], inputs["r"])),
            None,
            None,
            0.5,
            0.1,
            "l2",
            "mean",
            True,
        )[2]
    if path == "on chip":
        assert residual.dtype == (F64 if dtype == F64 else torch.float32)
        assert_close(residual, _scm_residual64(inputs), dtype, name="residual")
    else:
        assert residual.numel() == 0
    with torch.no_grad(), poisoned_empty():
        out = losses.scm_loss(**inputs, reduction="none")
    assert_close(out, reference.scm_loss(**{k: to64(v) for k, v in inputs.items()}, reduction="none"), dtype)
    saved = math.prod(shape) if path == "on chip" else 0
    assert calls == [(True, saved), (False, 0)], calls


def test_scm_residual_saved_only_for_a_gradient_of_F(monkeypatch, backend):
    backend("triton")
    calls = _spy_forward(monkeypatch, "scm_forward")
    inputs = _scm_inputs((2, 7), torch.float32)
    inputs["F"] = inputs["F"].detach()
    loss = losses.scm_loss(**inputs)
    torch.autograd.grad(loss, inputs["logvar"])
    assert calls == [(False, 0)], calls


@pytest.mark.parametrize("dtype", FAST_DTYPES + (F64,))
def test_meanflow_saved_residual_and_no_grad_paths_match_reference(dtype, monkeypatch, backend):
    """float32/float64: the forward saves u − u_tgt and the backward reads it; bf16/fp16 save
    nothing (a float32 residual would move more bytes than the re-read). No grad: nothing saved."""
    backend("triton")
    calls = _spy_forward(monkeypatch, "meanflow_forward")
    shape = (3, 3, 37)
    t = torch.rand(3, dtype=F64, device=DEVICE)
    inputs = {
        "u": randn(*shape, dtype=dtype, requires_grad=True),
        "v": randn(*shape, dtype=dtype),
        "dudt": randn(*shape, dtype=dtype),
        "t": t,
        "r": t * torch.rand(3, dtype=F64, device=DEVICE),
    }
    _check_against_reference(
        losses.meanflow_loss,
        reference.meanflow_loss,
        inputs,
        ["u"],
        dtype,
        "mean",
        (3.0 * _per_sample_numel(shape)) ** 0.75 / 2,
    )
    with torch.no_grad(), poisoned_empty():
        out = losses.meanflow_loss(**inputs, reduction="none")
    assert_close(out, reference.meanflow_loss(**{k: to64(v) for k, v in inputs.items()}, reduction="none"), dtype)
    saved = math.prod(shape) if dtype in (torch.float32, F64) else 0
    assert calls == [(True, saved), (False, 0)], calls


# ------------------------------------------------------------------ jvp and double backward


def _jvp_cases(dtype):
    """loss -> (primals, other inputs, fn(module, *primals, *others)). The other inputs are passed in rather
    than closed over, so that a caller can move them with the primals (to64 for the CPU reference)."""
    shape = (3, 4, 9)
    x, y, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), torch.rand(3, dtype=F64, device=DEVICE) + 0.5
    scm = _scm_inputs(shape, dtype)
    u, v, dudt = (randn(*shape, dtype=dtype) for _ in range(3))
    t = torch.rand(3, dtype=F64, device=DEVICE)
    scm_others = tuple(scm[k] for k in ("F_minus", "F_jvp", "x_t", "dx_dt", "t", "r", "weight"))
    return {
        "pseudo_huber": ((x, y, w), (), lambda mod, a, b, c: mod.pseudo_huber_loss(a, b, weight=c, reduction="none")),
        "scm": (
            (scm["F"].detach(), scm["logvar"].detach()),
            scm_others,
            lambda mod, f, lv, f_minus, f_jvp, x_t, dx_dt, time, r, weight: mod.scm_loss(
                f, f_minus, f_jvp, x_t, dx_dt, time, r=r, weight=weight, logvar=lv, reduction="none"
            ),
        ),
        "meanflow": (
            (u,),
            (v, dudt, t),
            lambda mod, a, b, c, time: mod.meanflow_loss(a, b, c, time, time / 2, reduction="sum"),
        ),
    }


@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("loss", ["pseudo_huber", "scm", "meanflow"])
def test_jvp_matches_reference(loss, dtype, backend):
    backend("triton")
    primals, others, fn = _jvp_cases(dtype)[loss]
    tangents = tuple(torch.randn_like(p, dtype=F64).to(p.dtype) for p in primals)
    with poisoned_empty():
        out, out_t = torch.func.jvp(lambda *a: fn(losses, *a, *others), primals, tangents)
    others64 = tuple(map(to64, others))
    expected, expected_t = torch.func.jvp(
        lambda *a: fn(reference, *a, *others64), tuple(map(to64, primals)), tuple(map(to64, tangents))
    )
    assert_close(out, expected, dtype, name="loss")
    assert_close(out_t, expected_t, dtype, name="loss tangent")


@pytest.mark.parametrize("loss", ["pseudo_huber", "scm", "meanflow"])
def test_double_backward_matches_reference(loss, backend):
    """create_graph=True takes the differentiable torch-op backward; its gradient must match too."""
    backend("triton")
    primals, others, fn = _jvp_cases(F64)[loss]

    def grad_norm(mod, *args):
        args = tuple(a.detach().requires_grad_() for a in args)
        grads = torch.autograd.grad(fn(mod, *args, *others).sum(), args, create_graph=True)
        return torch.autograd.grad(sum((g**2).sum() for g in grads), args)

    for got, expected in zip(grad_norm(losses, *primals), grad_norm(reference, *primals)):
        assert_close(got, expected, F64)


def test_auto_backend_on_cpu_is_the_reference(monkeypatch):
    """auto on CPU tensors runs the reference: no kernel is launched."""
    if DEVICE != "cpu":
        pytest.skip("the auto backend picks the kernels on CUDA tensors")
    monkeypatch.setattr(launchers, "pseudo_huber_forward", None)
    x, y = randn(2, 7), randn(2, 7)
    assert_close(losses.pseudo_huber_loss(x, y), reference.pseudo_huber_loss(to64(x), to64(y)), torch.float32)


# ------------------------------------------------------------------ bad input


def _huber(**overrides):
    kwargs = {"input": randn(3, 4), "target": randn(3, 4)}
    kwargs.update(overrides)
    return losses.pseudo_huber_loss(**kwargs)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: _huber(target=randn(3, 5)), ValueError, ["target", "(3, 5)", "(3, 4)"]),
        (lambda: _huber(target=randn(3, 4, dtype=torch.float16)), TypeError, ["target", "float16", "float32"]),
        (
            lambda: _huber(target=torch.ones(3, 4, dtype=torch.int64, device=DEVICE)),
            TypeError,
            ["target", "int64", "bfloat16"],
        ),
        (lambda: _huber(weight=torch.ones(4, device=DEVICE)), ValueError, ["weight", "(4,)", "3 per-sample"]),
        (lambda: _huber(c=-0.1), ValueError, ["c=-0.1", ">= 0"]),
        (lambda: _huber(reduction="avg"), ValueError, ["reduction='avg'", "'none', 'mean', 'sum'"]),
        (lambda: _huber(input=randn(0, 4), target=randn(0, 4)), ValueError, ["input", "(0, 4)", "at least one"]),
        (lambda: losses.scm_loss(*[randn(2, 3)] * 4, randn(2, 4), 0.5), ValueError, ["dx_dt", "(2, 4)", "(2, 3)"]),
        (
            lambda: losses.scm_loss(*[randn(2, 3)] * 5, torch.ones(3, device=DEVICE)),
            ValueError,
            ["t", "(3,)", "2 per-sample"],
        ),
        (
            lambda: losses.scm_loss(*[randn(2, 3)] * 5, 0.5, logvar=torch.zeros(5, device=DEVICE)),
            ValueError,
            ["logvar", "(5,)"],
        ),
        (
            lambda: losses.scm_loss(*[randn(2, 3)] * 5, 0.5, tangent_norm="l1"),
            ValueError,
            ["tangent_norm='l1'", "'l2', 'rms', 'none'"],
        ),
        (lambda: losses.scm_loss(*[randn(2, 3)] * 5, 0.5, tangent_norm_c=-1.0), ValueError, ["tangent_norm_c=-1.0"]),
        (lambda: losses.scm_loss(*[randn(2, 3)] * 5, 0.5, reduction="max"), ValueError, ["reduction='max'", "'mean'"]),
        (lambda: losses.scm_tangent(*[randn(2, 3)] * 4, 0.5, sigma_data=0.0), ValueError, ["sigma_data=0.0"]),
        (lambda: losses.meanflow_loss(randn(2, 3), randn(2, 3), randn(3, 3), 0.5, 0.1), ValueError, ["dudt", "(3, 3)"]),
        (
            lambda: losses.meanflow_loss(*[randn(2, 3)] * 3, 0.5, torch.ones(4, device=DEVICE)),
            ValueError,
            ["r", "(4,)"],
        ),
        (lambda: losses.meanflow_loss(*[randn(2, 3)] * 3, 0.5, 0.1, eps=0.0), ValueError, ["eps=0.0", "positive"]),
        (
            lambda: losses.meanflow_loss(*[randn(2, 3)] * 3, 0.5, 0.1, reduction="mean_sum"),
            ValueError,
            ["reduction='mean_sum'"],
        ),
    ],
)
def test_bad_input(impl, call, error, words, backend):
    backend(impl)
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_large_samples_match_reference_on_gpu(dtype, backend):
    """The benchmark's per-sample size (64K elements, several chunks per sample at default geometry,
    sCM streamed), and the largest sCM sample held on chip (8192 elements, 16 warps)."""
    backend("triton")
    shape = (5, 4, 128, 128)
    inputs = {"input": randn(*shape, dtype=dtype, requires_grad=True), "target": randn(*shape, dtype=dtype)}
    _check_against_reference(
        losses.pseudo_huber_loss, reference.pseudo_huber_loss, inputs, ["input"], dtype, "mean", 256.0
    )
    for scm_shape in (shape, (5, 2, 64, 64)):
        _check_against_reference(
            losses.scm_loss,
            reference.scm_loss,
            _scm_inputs(scm_shape, dtype),
            ["F", "logvar"],
            dtype,
            "mean",
            _per_sample_numel(scm_shape) / 2,
        )
