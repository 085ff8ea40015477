"""Flow-matching steps and loops: the fused steps against the float64 reference, the loops against the exact
solution of the flow ODE for Gaussian data, and the shifted time grid."""

import pytest
import torch

from fastcm import flow_steps as fast
from fastcm import sampling, schedules
from fastcm.reference import flow_steps as ref
from helpers import DEVICE, FAST_DTYPES, assert_close, poisoned_empty, randn, to64

MU, S = 0.3, 0.5


def exact_velocity(x, t):
    """E[ε − x0 | x_t = x] for x0 ~ N(μ, s²), x_t = (1 − t)·x0 + t·ε."""
    t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    variance = (1 - t) ** 2 * S**2 + t**2
    centered = x - (1 - t) * MU
    return t / variance * centered - (MU + (1 - t) * S**2 / variance * centered)


def _call(name, mod, x, v, w, t, t_next, **extra):
    if name == "euler":
        return mod.flow_euler_step(x, v, t, t_next, **extra)
    return mod.flow_heun_step(x, v, t, t_next, velocity_next=w, **extra)


def test_reference_matches_hand_computation():
    x, v, w = (torch.tensor([[a]], dtype=torch.float64) for a in (1.5, -0.4, 0.6))
    assert ref.flow_euler_step(x, v, 0.8, 0.5).item() == pytest.approx(1.5 - 0.3 * -0.4, rel=1e-15)
    assert ref.flow_heun_step(x, v, 0.8, 0.5, velocity_next=w).item() == pytest.approx(1.5 - 0.3 * 0.1, rel=1e-15)


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("kind", ["float", "b"])
def test_forward_matches_reference(backend, name, dtype, kind):
    backend("triton")
    x, v, w = (randn(3, 5, 7, dtype=dtype) for _ in range(3))
    t, t_next = (
        (0.8, 0.3)
        if kind == "float"
        else (torch.rand(3, device=DEVICE) * 0.5 + 0.5, torch.rand(3, device=DEVICE) * 0.5)
    )
    with poisoned_empty():
        out = _call(name, fast, x, v, w, t, t_next)
    assert out.dtype == dtype
    assert_close(out, _call(name, ref, to64(x), to64(v), to64(w), to64(t), to64(t_next)), dtype)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_gradients_and_tangents_match_reference(backend, name):
    backend("triton")
    x, v, w = (randn(2, 33, dtype=torch.float64, requires_grad=True) for _ in range(3))
    t = torch.tensor([0.9, 0.6], dtype=torch.float64, device=DEVICE, requires_grad=True)
    grad_out = randn(2, 33, dtype=torch.float64)
    inputs = (x, v, w, t)
    got = torch.autograd.grad(_call(name, fast, x, v, w, t, 0.2), inputs, grad_out, allow_unused=True)
    want = torch.autograd.grad(_call(name, ref, x, v, w, t, 0.2), inputs, grad_out, allow_unused=True)
    for g, h in zip(got, want):
        assert (g is None) == (h is None)
        if h is not None:
            assert_close(g, h, torch.float64)
    tangents = tuple(torch.randn_like(a) for a in inputs)
    fn = lambda mod: lambda *a: _call(name, mod, *a[:3], a[3], 0.2)  # noqa: E731
    with torch.no_grad():
        _, got_t = torch.func.jvp(fn(fast), tuple(a.detach() for a in inputs), tangents)
    _, want_t = torch.func.jvp(fn(ref), tuple(a.detach() for a in inputs), tangents)
    assert_close(got_t, want_t, torch.float64, name="tangent")


def test_out_in_place(backend):
    backend("triton")
    x, v, w = (randn(2, 40) for _ in range(3))
    want = fast.flow_heun_step(x, v, 0.7, 0.2, velocity_next=w)
    target = x.clone()
    assert fast.flow_heun_step(target, v, 0.7, 0.2, velocity_next=w, out=target) is target
    assert torch.equal(target, want)


@pytest.mark.parametrize("sampler, order", [(sampling.sample_flow_euler, 1), (sampling.sample_flow_heun, 2)])
def test_flow_samplers_converge_to_the_exact_ode_solution(sampler, order):
    """From x_1 at t = 1 the flow ODE for Gaussian data ends at x_0 = μ + s·x_1."""
    x = torch.randn(256, 2, dtype=torch.float64, device=DEVICE)
    exact = MU + S * x
    errors = []
    for n in (8, 16, 32):
        out = sampler(exact_velocity, x, schedules.flow_times(n, shift=3.0))
        errors.append(((out - exact).norm() / exact.norm()).item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(r > 0.8 * 2**order for r in ratios), (errors, ratios)


def test_flow_loops_on_the_kernels_match_the_reference_loops(backend):
    x = torch.randn(2, 9, dtype=torch.float64, device=DEVICE)
    times = schedules.flow_times(4, shift=2.0)
    seen = []
    backend("reference")
    want = sampling.sample_flow_heun(
        lambda a, t, scale: scale * exact_velocity(a, t), x, times, {"scale": 1.0}, lambda info: seen.append(info)
    )
    backend("triton")
    with poisoned_empty():
        got = sampling.sample_flow_heun(lambda a, t, scale: scale * exact_velocity(a, t), x, times, {"scale": 1.0})
    assert_close(got, want, torch.float64)
    assert [s["i"] for s in seen] == list(range(4)) and set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    t0 = torch.ones(2, dtype=torch.float64, device=DEVICE)
    assert_close(seen[0]["denoised"], x - exact_velocity(x, t0), torch.float64)


def test_flow_shift_and_times():
    assert schedules.flow_shift(0.5, 3.0) == pytest.approx(1.5 / 2.0)
    times = schedules.flow_times(4, shift=3.0)
    assert times.tolist() == pytest.approx([3 * t / (1 + 2 * t) for t in (1.0, 0.75, 0.5, 0.25, 0.0)], rel=1e-14)
    assert schedules.flow_times(2).tolist() == pytest.approx([1.0, 0.5, 0.0])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: fast.flow_euler_step(torch.randn(2, 3), torch.randn(2, 3), 1.2, 0.5),
            ValueError,
            r"flow_euler_step: t=1.2 is not supported; expected a time in \[0, 1\]",
        ),
        (
            lambda: fast.flow_heun_step(
                torch.randn(2, 3), torch.randn(2, 3), 0.5, 0.2, velocity_next=torch.randn(3, 3)
            ),
            ValueError,
            r"velocity_next has shape \(3, 3\) but x has shape \(2, 3\)",
        ),
        (
            lambda: sampling.sample_flow_euler(exact_velocity, torch.randn(2, 3), [0.5, 0.7]),
            ValueError,
            r"sample_flow_euler: times \[0.5, 0.7\] must decrease strictly within \[0, 1\]",
        ),
        (lambda: schedules.flow_times(0), ValueError, r"flow_times: num_steps=0 is not supported"),
        (lambda: schedules.flow_shift(0.5, -1.0), ValueError, r"flow_shift: shift=-1.0 is not supported"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
