import math

import pytest
import torch

import fastcm
from fastcm.reference import flow as ref
from fastcm.reference.precondition import precondition as ref_precondition
from fastcm.reference.precondition import precondition_scaling_derivatives, precondition_scalings
from helpers import DEVICE, FAST_DTYPES, assert_close, poisoned_empty, randn, to64

FLOW_PARAMS = ("flow", "vp-eps", "vp-x0", "vp-v")
# A time inside every schedule's open range: flow t and VP ᾱ in (0, 1), TrigFlow t < π/2, EDM σ > 0.
TIME_RANGE = (0.1, 0.9)


def _times(batch, dtype=torch.float32, requires_grad=False):
    low, high = TIME_RANGE
    values = torch.rand(batch, dtype=torch.float64) * (high - low) + low
    return values.to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


# ---- precondition: flow and VP ------------------------------------------------------------------


@pytest.mark.parametrize("param", FLOW_PARAMS)
def test_precondition_recovers_x0_from_the_exact_prediction(param):
    """x_t built from known x0, ε; the exact network output for the param gives x0 back."""
    x0, eps = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    tau = torch.tensor([0.2, 0.5, 0.64, 0.9], dtype=torch.float64).reshape(4, 1)
    if param == "flow":
        x_t, net_out = (1 - tau) * x0 + tau * eps, eps - x0
    else:
        a, s = tau.sqrt(), (1 - tau).sqrt()
        x_t = a * x0 + s * eps
        net_out = {"vp-eps": eps, "vp-x0": x0, "vp-v": a * eps - s * x0}[param]
    torch.testing.assert_close(ref_precondition(x_t, net_out, tau, param=param), x0, rtol=1e-12, atol=1e-12)


def test_precondition_vp_closed_form_scalings():
    alpha_bar = torch.tensor(0.64, dtype=torch.float64)  # √ᾱ = 0.8, √(1−ᾱ) = 0.6
    expected = {"vp-eps": (1 / 0.8, -0.6 / 0.8), "vp-x0": (0.0, 1.0), "vp-v": (0.8, -0.6), "flow": (1.0, -0.64)}
    for param, (c_skip, c_out) in expected.items():
        got = precondition_scalings(alpha_bar, param=param)
        assert (float(got[0]), float(got[1]), float(got[2])) == pytest.approx((c_skip, c_out, 1.0), rel=1e-14)


@pytest.mark.parametrize("param", FLOW_PARAMS)
def test_precondition_flow_vp_derivatives_match_autograd(param):
    tau = torch.linspace(0.05, 0.95, 13, dtype=torch.float64, requires_grad=True)
    c_skip, c_out, _ = precondition_scalings(tau, param=param)
    d_skip, d_out = precondition_scaling_derivatives(tau.detach(), param=param)
    for c, closed in ((c_skip, d_skip), (c_out, d_out)):
        # A constant scaling (no graph to τ) has derivative 0.
        auto = torch.autograd.grad(c.sum(), tau, retain_graph=True)[0] if c.requires_grad else torch.zeros_like(closed)
        torch.testing.assert_close(closed, auto, rtol=1e-12, atol=0)


@pytest.mark.parametrize("param", FLOW_PARAMS)
def test_precondition_flow_vp_reference_gradcheck(param):
    x, f = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    tau = (torch.rand(2, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, f, s: ref_precondition(x, f, s, param=param), (x, f, tau))


@pytest.mark.parametrize("param", FLOW_PARAMS)
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_precondition_flow_vp_kernel_forward_backward(backend, param, dtype):
    backend("triton")
    shape = (3, 5, 41)
    x, f = randn(*shape, dtype=dtype, requires_grad=True), randn(*shape, dtype=dtype, requires_grad=True)
    tau = _times(3, requires_grad=True)
    grad_out = randn(*shape, dtype=dtype)
    with poisoned_empty():
        out = fastcm.precondition(x, f, tau, param=param)
        grads = torch.autograd.grad(out, (x, f, tau), grad_out)
    x64, f64, t64 = to64(x), to64(f), to64(tau)
    want = ref_precondition(x64, f64, t64, param=param)
    assert_close(out, want, dtype)
    want_grads = torch.autograd.grad(want, (x64, f64, t64), to64(grad_out), allow_unused=True)
    want_grads = [torch.zeros_like(t64) if g is None else g for g in want_grads]  # vp-x0 ignores τ
    assert_close(grads[0], want_grads[0], dtype, name="grad x")
    assert_close(grads[1], want_grads[1], dtype, name="grad net_out")
    # The τ-gradient sums D products of `dtype`-rounded values: compare relative to that sum's scale.
    scale = (to64(grad_out).abs() * (x64.abs() + f64.abs())).flatten(1).sum(1) * 4
    err = (to64(grads[2]) - want_grads[2]).abs() / scale.clamp_min(1)
    assert err.max() <= 4e-5 if dtype == torch.float32 else err.max() <= 4e-2


@pytest.mark.parametrize("param", FLOW_PARAMS)
def test_precondition_flow_vp_kernel_jvp(backend, param):
    backend("triton")
    x, f, dx, df = (randn(3, 37) for _ in range(4))
    tau, dtau = _times(3), randn(3)
    with poisoned_empty(), torch.no_grad():
        out, out_t = torch.func.jvp(
            lambda a, b, s: fastcm.precondition(a, b, s, param=param), (x, f, tau), (dx, df, dtau)
        )
    want, want_t = torch.func.jvp(
        lambda a, b, s: ref_precondition(a, b, s, param=param),
        (to64(x), to64(f), to64(tau)),
        (to64(dx), to64(df), to64(dtau)),
    )
    assert_close(out, want, torch.float32)
    assert_close(out_t, want_t, torch.float32, name="tangent")


# ---- prediction conversion -----------------------------------------------------------------------


def _truth(schedule, prediction, x0, eps, tau):
    """A prediction from the known x0 and ε, written out per schedule (independent of the reference)."""
    sd = 0.5
    alpha, noise, d_alpha, d_noise = {
        "flow": (1 - tau, tau, -torch.ones_like(tau), torch.ones_like(tau)),
        "trigflow": (torch.cos(tau), sd * torch.sin(tau), -torch.sin(tau), sd * torch.cos(tau)),
        "vp": (tau.sqrt(), (1 - tau).sqrt(), 0.5 / tau.sqrt(), -0.5 / (1 - tau).sqrt()),
        "edm": (torch.ones_like(tau), tau, torch.zeros_like(tau), torch.ones_like(tau)),
    }[schedule]
    snr_angle = torch.atan2(noise, alpha * sd)  # the TrigFlow time of the same SNR
    norm = torch.sqrt(alpha**2 + noise**2)
    return {
        "x0": x0,
        "eps": eps,
        "flow": eps - x0,
        "velocity": d_alpha * x0 + d_noise * eps,
        "v": (alpha * eps - noise * x0) / norm,
        "trigflow": torch.cos(snr_angle) * eps - torch.sin(snr_angle) * x0 / sd,
    }[prediction], alpha * x0 + noise * eps


@pytest.mark.parametrize("schedule", ref.SCHEDULES)
def test_reference_conversion_maps_exact_predictions_onto_each_other(schedule):
    x0, eps = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    tau = torch.tensor([0.15, 0.4, 0.6, 0.85], dtype=torch.float64).reshape(4, 1)
    for source in ref.PREDICTIONS:
        pred, x_t = _truth(schedule, source, x0, eps, tau)
        for target in ref.PREDICTIONS:
            want, _ = _truth(schedule, target, x0, eps, tau)
            got = ref.convert_prediction(x_t, pred, tau, schedule=schedule, source=source, target=target)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{source} -> {target}")


def test_reference_add_noise_trigflow_velocity_is_sigma_data_times_f():
    x0, eps = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64).reshape(3, 1)
    x_t, velocity = ref.add_noise(x0, eps, t, schedule="trigflow", target="velocity")
    _, f = ref.add_noise(x0, eps, t, schedule="trigflow", target="trigflow")
    z = 0.5 * eps
    torch.testing.assert_close(x_t, torch.cos(t) * x0 + torch.sin(t) * z, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(velocity, torch.cos(t) * z - torch.sin(t) * x0, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(velocity, 0.5 * f, rtol=1e-12, atol=1e-12)


def test_reference_convert_prediction_gradcheck():
    x_t, pred = (torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    tau = (torch.rand(2, dtype=torch.float64) * 0.6 + 0.2).requires_grad_()
    fn = lambda a, b, s: ref.convert_prediction(a, b, s, schedule="flow", source="flow", target="trigflow")  # noqa
    assert torch.autograd.gradcheck(fn, (x_t, pred, tau))


CONVERSIONS = [
    ("flow", "flow", "trigflow"),
    ("flow", "eps", "x0"),
    ("trigflow", "trigflow", "flow"),
    ("vp", "eps", "v"),
    ("vp", "v", "velocity"),
    ("edm", "x0", "eps"),
]


@pytest.mark.parametrize("schedule, source, target", CONVERSIONS)
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_convert_prediction_kernel_forward_backward(backend, schedule, source, target, dtype):
    backend("triton")
    x_t, pred = (randn(3, 4, 9, dtype=dtype, requires_grad=True) for _ in range(2))
    tau = _times(3, requires_grad=True)
    grad_out = randn(3, 4, 9, dtype=dtype)
    kwargs = dict(schedule=schedule, source=source, target=target)
    with poisoned_empty():
        out = fastcm.convert_prediction(x_t, pred, tau, **kwargs)
        grads = torch.autograd.grad(out, (x_t, pred, tau), grad_out)
    inputs = [to64(t) for t in (x_t, pred, tau)]
    want = ref.convert_prediction(*inputs, **kwargs)
    want_grads = torch.autograd.grad(want, inputs, to64(grad_out))
    assert out.dtype == dtype
    assert_close(out, want, dtype)
    assert_close(grads[0], want_grads[0], dtype, name="grad x_t")
    assert_close(grads[1], want_grads[1], dtype, name="grad pred")
    scale = (to64(grad_out).abs() * (inputs[0].abs() + inputs[1].abs())).flatten(1).sum(1)
    err = (to64(grads[2]) - want_grads[2]).abs() / scale.clamp_min(1)
    assert err.max() <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("schedule, source, target", CONVERSIONS[:3])
def test_convert_prediction_kernel_jvp_with_time_tangent(backend, schedule, source, target):
    backend("triton")
    x_t, pred, dx, dp = (randn(3, 21) for _ in range(4))
    tau, dtau = _times(3), randn(3)
    kwargs = dict(schedule=schedule, source=source, target=target)
    with torch.no_grad():
        out, out_t = torch.func.jvp(
            lambda a, b, s: fastcm.convert_prediction(a, b, s, **kwargs), (x_t, pred, tau), (dx, dp, dtau)
        )
    want, want_t = torch.func.jvp(
        lambda a, b, s: ref.convert_prediction(a, b, s, **kwargs),
        tuple(map(to64, (x_t, pred, tau))),
        tuple(map(to64, (dx, dp, dtau))),
    )
    assert_close(out, want, torch.float32)
    assert_close(out_t, want_t, torch.float32, name="tangent")


# ---- time conversion -----------------------------------------------------------------------------


def test_convert_time_flow_to_trigflow_closed_form_and_x_scale():
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    sd = 0.5
    u, k = fastcm.convert_time(t, source="flow", target="trigflow", sigma_data=sd)
    torch.testing.assert_close(u, torch.atan2(t, sd * (1 - t)), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(k, sd / torch.sqrt(sd**2 * (1 - t) ** 2 + t**2), rtol=1e-14, atol=1e-14)
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    x_flow = (1 - t[:, None]) * x0 + t[:, None] * eps
    x_trig = torch.cos(u[:, None]) * x0 + torch.sin(u[:, None]) * sd * eps
    torch.testing.assert_close(k[:, None] * x_flow, x_trig, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("source", ref.SCHEDULES)
@pytest.mark.parametrize("target", ref.SCHEDULES)
def test_convert_time_round_trip(source, target):
    tau = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    there, k = fastcm.convert_time(tau, source=source, target=target)
    back, k_back = fastcm.convert_time(there, source=target, target=source)
    torch.testing.assert_close(back, tau, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k * k_back, torch.ones_like(k), rtol=1e-12, atol=1e-12)


def test_convert_time_tangent_inside_jvp():
    t, dt = torch.tensor([0.2, 0.7], dtype=torch.float64), torch.tensor([1.0, -2.0], dtype=torch.float64)
    sd = 0.5
    _, (du, _) = torch.func.jvp(lambda s: fastcm.convert_time(s, source="flow", target="trigflow"), (t,), (dt,))
    torch.testing.assert_close(du, dt * sd / (sd**2 * (1 - t) ** 2 + t**2), rtol=1e-13, atol=0)


# ---- forward noising -----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule, target", [("flow", "flow"), ("trigflow", "velocity"), ("vp", "eps"), ("edm", "x0")])
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_add_noise_kernel_matches_reference(backend, schedule, target, dtype):
    backend("triton")
    x0, noise = randn(3, 5, 7, dtype=dtype, requires_grad=True), randn(3, 5, 7, dtype=dtype)
    tau = _times(3)
    with poisoned_empty():
        x_t, tgt = fastcm.add_noise(x0, tau, schedule=schedule, target=target, noise=noise)
        (grad,) = torch.autograd.grad((x_t.float() + 2 * tgt.float()).sum(), x0)
    x064 = to64(x0)
    want_x, want_tgt = ref.add_noise(x064, to64(noise), to64(tau), schedule=schedule, target=target)
    (want_grad,) = torch.autograd.grad((want_x + 2 * want_tgt).sum(), x064)
    assert_close(x_t, want_x, dtype)
    assert_close(tgt, want_tgt, dtype, name="target")
    assert_close(grad, want_grad, dtype, name="grad x0")


def test_add_noise_philox_both_outputs_share_the_noise(backend):
    backend("triton")
    x0, t = randn(4, 300), _times(4)
    x_t, velocity = fastcm.add_noise(x0, t, schedule="flow", target="flow", seed=1234)
    t_b = t.reshape(4, 1)
    torch.testing.assert_close(x_t - t_b * velocity, x0, rtol=0, atol=1e-5)  # x0 = x_t − t·v
    eps = x_t + (1 - t_b) * velocity
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.1
    again, _ = fastcm.add_noise(x0, t, schedule="flow", target="flow", seed=1234)
    other, _ = fastcm.add_noise(x0, t, schedule="flow", target="flow", seed=1235)
    assert torch.equal(again, x_t) and not torch.equal(other, x_t)


# ---- flow map ------------------------------------------------------------------------------------


def test_flow_map_kernel_forward_backward_jvp(backend):
    backend("triton")
    x_t, u = randn(3, 2, 19, requires_grad=True), randn(3, 2, 19, requires_grad=True)
    t = _times(3, requires_grad=True)
    r = (t.detach() * 0.5).requires_grad_()
    grad_out = randn(3, 2, 19)
    with poisoned_empty():
        out = fastcm.flow_map(x_t, u, t, r)
        grads = torch.autograd.grad(out, (x_t, u, t, r), grad_out)
    inputs = [to64(v) for v in (x_t, u, t, r)]
    want = ref.flow_map(*inputs)
    want_grads = torch.autograd.grad(want, inputs, to64(grad_out))
    assert_close(out, want, torch.float32)
    for got, expected in zip(grads, want_grads):
        assert_close(got, expected, torch.float32, name="grad")
    tangents = (randn(3, 2, 19), randn(3, 2, 19), randn(3), randn(3))
    with torch.no_grad():
        _, out_t = torch.func.jvp(fastcm.flow_map, tuple(v.detach() for v in (x_t, u, t, r)), tangents)
    _, want_t = torch.func.jvp(ref.flow_map, tuple(v.detach() for v in inputs), tuple(map(to64, tangents)))
    assert_close(out_t, want_t, torch.float32, name="tangent")


def test_flow_map_of_the_exact_average_velocity_is_the_flow():
    """On a straight flow x_t = (1−t)·x0 + t·ε the average velocity is ε − x0 and f(x_t, t, r) = x_r."""
    x0, eps = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    t, r = 0.8, 0.3
    got = fastcm.flow_map((1 - t) * x0 + t * eps, eps - x0, t, r)
    torch.testing.assert_close(got, (1 - r) * x0 + r * eps, rtol=1e-14, atol=1e-14)


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: fastcm.convert_prediction(
                torch.randn(2, 3), torch.randn(2, 3), 0.5, schedule="ve", source="x0", target="eps"
            ),
            ValueError,
            r"schedule='ve' is not supported; expected one of",
        ),
        (
            lambda: fastcm.convert_prediction(
                torch.randn(2, 3), torch.randn(2, 3), 0.5, schedule="flow", source="score", target="eps"
            ),
            ValueError,
            r"source='score' is not supported",
        ),
        (
            lambda: fastcm.convert_prediction(
                torch.randn(2, 3), torch.randn(2, 4), 0.5, schedule="flow", source="x0", target="eps"
            ),
            ValueError,
            r"pred has shape \(2, 4\) but x_t has shape",
        ),
        (
            lambda: fastcm.convert_time(0.5, source="flow", target="edm", sigma_data=-1.0),
            ValueError,
            r"sigma_data=-1.0 is not supported",
        ),
        (
            lambda: fastcm.convert_time("0.5", source="flow", target="edm"),
            TypeError,
            r"time must be a float or a tensor",
        ),
        (
            lambda: fastcm.add_noise(torch.randn(2, 3), 0.5, schedule="flow", target="flow", seed=-1),
            ValueError,
            r"seed=-1 is not supported",
        ),
        (
            lambda: fastcm.flow_map(torch.randn(2, 3), torch.randn(2, 3), torch.rand(3), 0.0),
            ValueError,
            r"t has shape \(3,\); expected a scalar or 2",
        ),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---- flow-map loss and sampler -------------------------------------------------------------------


@pytest.mark.parametrize("tangent_norm", ["l2", "rms", "none"])
def test_flow_map_loss_matches_reference(backend, tangent_norm):
    backend("triton")
    u = randn(3, 4, 11, requires_grad=True)
    u_minus, u_jvp, v = u.detach() + 0.1 * randn(3, 4, 11), randn(3, 4, 11), randn(3, 4, 11)
    logvar = randn(3, requires_grad=True)
    weight = _times(3) + 0.5
    kwargs = dict(r=0.7, tangent_norm=tangent_norm, weight=weight, logvar=logvar)
    with poisoned_empty():
        loss = fastcm.flow_map_loss(u, u_minus, u_jvp, v, **kwargs)
        grads = torch.autograd.grad(loss, (u, logvar))
    u64, lv64 = to64(u), to64(logvar)
    want = ref.flow_map_loss(
        u64, to64(u_minus), to64(u_jvp), to64(v), **{**kwargs, "weight": to64(weight), "logvar": lv64}
    )
    want_grads = torch.autograd.grad(want, (u64, lv64))
    assert_close(loss, want, torch.float32)
    assert_close(grads[0], want_grads[0], torch.float32, name="grad u")
    assert_close(grads[1], want_grads[1], torch.float32, name="grad logvar")


def test_flow_map_loss_gradient_points_at_the_meanflow_target():
    """Without normalisation and warm-up, −½·D·∂loss/∂u = u_tgt − u at u = u⁻ (MeanFlow's target)."""
    u = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    v, dudt = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    t, s = torch.tensor([[0.9], [0.6]], dtype=torch.float64), torch.tensor([[0.2], [0.1]], dtype=torch.float64)
    loss = fastcm.flow_map_loss(u, u.detach(), (t - s) * dudt, v, tangent_norm="none", reduction="sum")
    (grad,) = torch.autograd.grad(loss, u)
    torch.testing.assert_close(-0.5 * 6 * grad, (v - (t - s) * dudt) - u.detach(), rtol=1e-12, atol=1e-12)


def test_sample_flow_map_is_exact_for_the_exact_average_velocity():
    """Two Gaussians' straight flow from a point mass: x0 fixed, so u(x_t, t, r) = (x_t − x0)/t exactly
    and one step from t = 1 lands on x0; several steps too."""
    x0 = torch.tensor([[1.5, -0.5]], dtype=torch.float64)

    def model(x, t, r):
        return (x - x0) / t.reshape(-1, 1)

    noise = torch.randn(5, 2, dtype=torch.float64)
    for times in ([1.0, 0.0], [1.0, 0.6, 0.25, 0.0]):
        out = fastcm.sampling.sample_flow_map(model, noise, times)
        torch.testing.assert_close(out, x0.expand(5, 2), rtol=1e-12, atol=1e-12)


def test_sample_flow_map_passes_t_and_r_and_rejects_increasing_times():
    seen = []

    def model(x, t, r):
        seen.append((t.tolist(), r.tolist()))
        return torch.zeros_like(x)

    fastcm.sampling.sample_flow_map(model, torch.randn(2, 3), [1.0, 0.5, 0.0])
    assert seen == [([1.0, 1.0], [0.5, 0.5]), ([0.5, 0.5], [0.0, 0.0])]
    with pytest.raises(ValueError, match=r"must decrease strictly"):
        fastcm.sampling.sample_flow_map(model, torch.randn(2, 3), [0.5, 1.0])


@pytest.mark.gpu
def test_sample_flow_map_cuda_graph_matches_eager():
    weight = torch.randn(4, 4, device="cuda") * 0.3

    def model(x, t, r):
        return torch.tanh(x @ weight) * (t - r).reshape(-1, 1)

    x = torch.randn(8, 4, device="cuda")
    eager = fastcm.sampling.sample_flow_map(model, x, [1.0, 0.5, 0.0])
    captured = fastcm.sampling.sample_flow_map(model, x, [1.0, 0.5, 0.0], capture=True)
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)


# ---- time samplers -------------------------------------------------------------------------------


def test_logit_normal_t_distribution_and_shift():
    from fastcm import schedules

    t = schedules.logit_normal_t(200_000, mean=0.3, std=0.8, seed=1, dtype=torch.float64)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.3) < 0.01 and abs(logit.std().item() - 0.8) < 0.01
    shifted = schedules.logit_normal_t(200_000, mean=0.3, std=0.8, shift=3.0, seed=1, dtype=torch.float64)
    torch.testing.assert_close(shifted, 3 * t / (1 + 2 * t), rtol=1e-14, atol=0)
    assert torch.equal(schedules.logit_normal_t(7, seed=5), schedules.logit_normal_t(7, seed=5))
    assert not torch.equal(schedules.logit_normal_t(7, seed=5), schedules.logit_normal_t(7, seed=6))


def test_resolution_shift_endpoints():
    from fastcm import schedules

    assert schedules.resolution_shift(256) == pytest.approx(math.exp(0.5), rel=1e-14)
    assert schedules.resolution_shift(4096) == pytest.approx(math.exp(1.15), rel=1e-14)


def test_lognormal_sigma_and_trigflow_t():
    from fastcm import schedules

    sigma = schedules.lognormal_sigma(200_000, p_mean=-1.1, p_std=2.0, seed=3, dtype=torch.float64)
    assert abs(sigma.log().mean().item() + 1.1) < 0.02 and abs(sigma.log().std().item() - 2.0) < 0.02
    t = schedules.trigflow_sample_t(200_000, sigma_data=0.5, p_mean=-1.0, p_std=1.4, seed=3, dtype=torch.float64)
    tau = torch.log(0.5 * torch.tan(t))
    assert abs(tau.mean().item() + 1.0) < 0.02 and abs(tau.std().item() - 1.4) < 0.02
    generator = torch.Generator().manual_seed(11)
    host = schedules.scm_sample_t(50, generator=generator, dtype=torch.float64)
    same = schedules.trigflow_sample_t(50, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    torch.testing.assert_close(host, same, rtol=0, atol=0)


@pytest.mark.parametrize("distribution", ["logit_normal", "uniform"])
def test_meanflow_sample_tr(distribution):
    from fastcm import schedules

    t, r = schedules.meanflow_sample_tr(1000, distribution=distribution, equal_fraction=0.25, seed=2)
    assert t.shape == r.shape == (1000,)
    assert (r <= t).all() and (t < 1).all() and (r > 0).all()
    assert torch.equal(t[:250], r[:250]) and (r[250:] < t[250:]).all()
    if distribution == "uniform":
        # max of two uniforms has mean 2/3, min 1/3
        assert abs(t[250:].mean().item() - 2 / 3) < 0.03 and abs(r[250:].mean().item() - 1 / 3) < 0.03


def test_ect_mapping_and_weight():
    from fastcm import schedules

    t = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    for stage in (0, 1, 5):
        ratio = 1 - (1 + 8 / (1 + torch.exp(t))) / 2 ** (stage + 1)
        torch.testing.assert_close(schedules.ect_r(t, stage), (t * ratio).clamp_min(0), rtol=1e-14, atol=0)
    assert (schedules.ect_r(t, 6) <= t).all() and (schedules.ect_r(t, 0) == 0).sum() >= 1
    assert schedules.ect_stage(2500, 1000) == 2
    torch.testing.assert_close(
        schedules.ect_weight(t, sigma_data=0.5), (t**2 + 0.25) / (t * 0.5) ** 2, rtol=1e-14, atol=0
    )


@pytest.mark.gpu
def test_time_samplers_draw_on_the_device():
    from fastcm import schedules

    for t in (
        schedules.logit_normal_t(8, seed=0, device="cuda"),
        schedules.lognormal_sigma(8, seed=0, device="cuda"),
        schedules.trigflow_sample_t(8, seed=0, device="cuda"),
        *schedules.meanflow_sample_tr(8, seed=0, device="cuda"),
    ):
        assert t.device.type == "cuda"


# ---- ECT: pseudo-Huber with c = 0 ----------------------------------------------------------------


def test_pseudo_huber_c0_is_the_l2_distance_with_zero_gradient_at_zero():
    from fastcm.reference.losses import pseudo_huber_loss as ref_huber

    x, y = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True), torch.randn(3, 4, 5, dtype=torch.float64)
    y = torch.cat([y[:2], x[2:].detach()])  # sample 2: zero distance
    loss = ref_huber(x, y, c=0.0, reduction="none")
    torch.testing.assert_close(loss, (x - y).flatten(1).norm(dim=1), rtol=1e-14, atol=0)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(grad).all() and torch.equal(grad[2], torch.zeros_like(grad[2]))
    torch.testing.assert_close(
        grad[:2], ((x - y) / (x - y).flatten(1).norm(dim=1).reshape(-1, 1, 1))[:2].detach(), rtol=1e-13, atol=0
    )


@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_pseudo_huber_c0_kernel_matches_reference(backend, dtype):
    from fastcm.reference.losses import pseudo_huber_loss as ref_huber

    backend("triton")
    x, y = randn(3, 37, dtype=dtype), randn(3, 37, dtype=dtype)
    y[1] = x[1]
    x.requires_grad_()
    weight = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
    with poisoned_empty():
        loss = fastcm.pseudo_huber_loss(x, y, c=0.0, weight=weight, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    x64 = to64(x)
    want = ref_huber(x64, to64(y), c=0.0, weight=to64(weight), reduction="sum")
    (want_grad,) = torch.autograd.grad(want, x64)
    assert_close(loss, want, dtype)
    assert_close(grad, want_grad, dtype, name="grad input")
    assert torch.equal(grad[1].float(), torch.zeros(37, device=DEVICE))


@pytest.mark.parametrize("philox", [False, True])
def test_add_noise_gradients_and_tangents_of_every_input(backend, philox):
    """Gradients of x0, ε and the time, and the jvp along all three, against the reference; with Philox,
    the reference gets the kernel's own ε (recovered from the two outputs of a flow/flow call)."""
    backend("triton")
    x0 = randn(3, 2, 17, requires_grad=True)
    t = _times(3, requires_grad=True)
    kwargs = dict(schedule="trigflow", target="trigflow")
    if philox:
        x_flow, v_flow = fastcm.add_noise(x0.detach(), 0.5, schedule="flow", target="flow", seed=9)
        noise = x_flow + 0.5 * v_flow  # ε = x_s + (1 − s)·v at s = 0.5
        x_t, tgt = fastcm.add_noise(x0, t, seed=9, **kwargs)
    else:
        noise = randn(3, 2, 17, requires_grad=True)
        x_t, tgt = fastcm.add_noise(x0, t, noise=noise, **kwargs)
    g1, g2 = randn(3, 2, 17), randn(3, 2, 17)
    inputs = (x0, t) if philox else (x0, t, noise)
    grads = torch.autograd.grad((x_t * g1).sum() + (tgt * g2).sum(), inputs)
    x064, t64, n64 = to64(x0), to64(t), to64(noise.detach()).requires_grad_(not philox)
    want_x, want_tgt = ref.add_noise(x064, n64, t64, **kwargs)
    want_inputs = (x064, t64) if philox else (x064, t64, n64)
    want = torch.autograd.grad((want_x * to64(g1)).sum() + (want_tgt * to64(g2)).sum(), want_inputs)
    for got, expected in zip(grads, want):
        assert_close(got, expected, torch.float32, name="grad")
    tangents = (randn(3, 2, 17), randn(3), randn(3, 2, 17))
    with torch.no_grad():
        if philox:
            _, got_t = torch.func.jvp(
                lambda a, s: fastcm.add_noise(a, s, seed=9, **kwargs), (x0.detach(), t.detach()), tangents[:2]
            )
        else:
            _, got_t = torch.func.jvp(
                lambda a, s, e: fastcm.add_noise(a, s, noise=e, **kwargs),
                (x0.detach(), t.detach(), noise.detach()),
                tangents,
            )
    n_tangent = torch.zeros_like(n64) if philox else to64(tangents[2])
    _, want_t = torch.func.jvp(
        lambda a, s, e: ref.add_noise(a, e, s, **kwargs),
        (x064.detach(), t64.detach(), n64.detach()),
        (to64(tangents[0]), to64(tangents[1]), n_tangent),
    )
    for got, expected in zip(got_t, want_t):
        assert_close(got, expected, torch.float32, name="tangent")


def test_add_noise_tangent_taken_with_grad_is_differentiable(backend):
    backend("triton")
    x0, noise = randn(2, 9, requires_grad=True), randn(2, 9)
    t, dt = _times(2), randn(2)
    kwargs = dict(schedule="vp", target="v")
    _, (x_dot, target_dot) = torch.func.jvp(lambda s: fastcm.add_noise(x0, s, noise=noise, **kwargs), (t,), (dt,))
    (got,) = torch.autograd.grad((x_dot.square() + target_dot).sum(), x0)
    x064 = to64(x0)
    _, (want_x, want_tgt) = torch.func.jvp(
        lambda s: ref.add_noise(x064, to64(noise), s, **kwargs), (to64(t),), (to64(dt),)
    )
    (want,) = torch.autograd.grad((want_x.square() + want_tgt).sum(), x064)
    assert_close(got, want, torch.float32)
