"""fastcm.ema: the reference against closed forms and EDM2's published values, the fused multi-profile
update (Triton interpreter on CPU) against K separate float64 reference EMAs, state_dict, post-hoc
reconstruction, bad input."""

import io
import math

import pytest
import torch

import fastcm.kernels.ema as launchers
from fastcm import ema
from fastcm.reference import ema as reference
from helpers import DEVICE, assert_close, poisoned_empty

F64 = torch.float64
# Shadows are float32 whatever the parameters' dtype: the update is float32 arithmetic on exact
# (widened) parameter values, so the float32 tolerance applies to every parameter dtype.
SHADOW_TOL_DTYPE = torch.float32


@pytest.fixture(params=["default block", "small block"])
def block(request, monkeypatch):
    """Also run with 32-element chunks, so that parameters span several chunks with a partial last one."""
    if request.param == "small block":
        monkeypatch.setattr(launchers, "BLOCK", 32)
    return request.param


def _params(
    dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float32), shapes=((5, 7), (33,), (3, 2, 11), (1,))
):
    return [torch.randn(shape, dtype=F64).to(device=DEVICE, dtype=dtype) for shape, dtype in zip(shapes, dtypes)]


def _profiles():
    return [
        ema.power(0.05),
        ema.power(0.2),
        ema.constant(0.9),
        ema.halflife(40.0, 4, 0.5),
        ema.ct_target(0.95, 2, 10, 20),
    ]


def _reference_run(params_per_step, profiles, initial):
    """K separate float64 EMAs, one per profile, each with reference.ema_update on its own."""
    results = []
    for profile in profiles:
        shadows = [s.clone() for s in initial]
        for step, params in enumerate(params_per_step, start=1):
            reference.ema_update([shadows], params, [profile.beta(step)])
        results.append(shadows)
    return results


# ------------------------------------------------------------------ reference and profiles


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94)])
def test_sigma_rel_to_gamma_matches_edm2(sigma_rel, gamma):
    """EDM2 (Karras et al. 2024) quotes γ = 16.97 for σ_rel = 0.05 and γ = 6.94 for σ_rel = 0.10."""
    assert reference.sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=0.005)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.13, 0.29, reference.MAX_SIGMA_REL])
def test_gamma_solves_the_cubic_on_the_falling_branch(sigma_rel):
    gamma = reference.sigma_rel_to_gamma(sigma_rel)
    cubic = sigma_rel**2 * (gamma**3 + 7 * gamma**2 + 16 * gamma + 12) - gamma - 1
    assert abs(cubic) < 1e-9 * (gamma**3 + 1)
    assert gamma >= reference.GAMMA_OF_MAX_SIGMA_REL - 1e-9
    assert reference.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-9)


@pytest.mark.parametrize("gamma", [0.5, 6.94, 16.97])
def test_power_ema_weights_are_the_recursion_and_have_width_sigma_rel(gamma):
    """The telescoped weights w_t(τ) equal running the recursion on one-hot parameter histories; they sum
    to 1, and their relative std tends to σ_rel(γ)."""
    steps = 50
    shadow = [torch.zeros(steps, dtype=F64)]
    for step in range(1, steps + 1):
        reference.ema_update([shadow], [torch.eye(steps, dtype=F64)[step - 1]], [reference.power_beta(step, gamma)])
    torch.testing.assert_close(shadow[0], reference.power_ema_weights(steps, gamma), rtol=1e-12, atol=1e-15)
    long = 20000
    weights = reference.power_ema_weights(long, gamma)
    tau = torch.arange(1, long + 1, dtype=F64) / long
    mean = (weights * tau).sum()
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert math.sqrt((weights * (tau - mean) ** 2).sum().item()) == pytest.approx(
        reference.gamma_to_sigma_rel(gamma), rel=2e-3
    )


@pytest.mark.parametrize(
    "a, b", [((100.0, 3.0), (100.0, 3.0)), ((80.0, 16.97), (130.0, 6.94)), ((1000.0, 0.2), (400.0, 30.0))]
)
def test_power_profile_inner_product_is_the_integral(a, b):
    """The closed form against trapezoid quadrature of ∫ p_a(τ)·p_b(τ) dτ on [0, min(t_a, t_b)]."""

    def profile(t, gamma, tau):
        return (gamma + 1) * tau**gamma / t ** (gamma + 1)

    tau = torch.linspace(0.0, min(a[0], b[0]), 400001, dtype=F64)
    quadrature = torch.trapezoid(profile(*a, tau) * profile(*b, tau), tau).item()
    assert reference.power_profile_inner_product(*a, *b) == pytest.approx(quadrature, rel=1e-6)


def test_profile_betas_closed_forms():
    assert ema.power(0.1).beta(1) == 0.0
    assert ema.power_from_gamma(2.0).beta(4) == pytest.approx((3 / 4) ** 3, rel=1e-15)
    assert ema.constant(0.999).beta(17) == 0.999
    # Half-life h samples: after h/batch steps the old average's weight has halved.
    assert ema.halflife(1000.0, 10, None).beta(5) ** 100 == pytest.approx(0.5, rel=1e-12)
    assert ema.halflife(1000.0, 10, 0.5).beta(1) == 0.0  # no samples seen yet: the ramp-up copies θ
    assert ema.halflife(1000.0, 10, 0.5).beta(11) == pytest.approx(0.5 ** (10 / 50), rel=1e-12)
    # CT: N(0) = s0, so μ = μ0 at the start; N(K) = s1 + 1 at the end.
    assert ema.ct_target(0.9, 2, 150, 1000).beta(1) == pytest.approx(0.9, rel=1e-12)
    assert ema.ct_target(0.9, 2, 150, 1000).beta(1001) == pytest.approx(0.9 ** (2 / 151), rel=1e-12)
    assert ema.ct_target(0.0, 2, 150, 1000).beta(500) == 0.0


# ------------------------------------------------------------------ the fused update


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_k_profiles_equal_k_separate_reference_emas(impl, backend, block):
    backend(impl)
    params = _params()
    profiles = _profiles()
    history = []
    with poisoned_empty():
        averages = ema.EMA(params, profiles)
    initial = [p.detach().to(F64).cpu() for p in params]
    for _ in range(6):
        for p in params:
            p.add_(torch.randn(p.shape, dtype=F64).to(p.dtype).to(p.device))
        history.append([p.detach().to(F64).cpu() for p in params])
        averages.update()
    expected = _reference_run(history, profiles, initial)
    for k in range(len(profiles)):
        for j, (got, want) in enumerate(zip(averages.shadows(k), expected[k])):
            assert got.dtype == torch.float32
            assert_close(got, want, SHADOW_TOL_DTYPE, name=f"profile {k} parameter {j}")


def test_constant_parameters_stay_constant(backend, block):
    backend("triton")
    params = _params()
    averages = ema.EMA(params, [ema.power(0.07), ema.constant(0.99993), ema.constant(0.3)])
    for _ in range(5):
        averages.update()
    for k in range(3):
        for got, p in zip(averages.shadows(k), params):
            assert torch.equal(got, p.float())


def test_one_step_is_the_lerp(backend, block):
    """From shadows s ≠ θ, one update gives lerp(s, θ, 1 − β) (float64 oracle)."""
    backend("triton")
    params = _params()
    profiles = [ema.constant(0.9), ema.constant(0.25), ema.power_from_gamma(1.0)]
    averages = ema.EMA(params, profiles)
    averages.step = 3
    start = torch.randn(averages.shadow.shape, dtype=F64)
    averages.shadow.copy_(start)
    start32 = averages.shadow.to(F64).cpu()
    averages.update()
    theta = torch.cat([p.detach().to(F64).cpu().flatten() for p in params])
    for k, profile in enumerate(profiles):
        want = torch.lerp(start32[k], theta, 1 - profile.beta(4))
        assert_close(averages.shadow[k], want, SHADOW_TOL_DTYPE, name=f"profile {k}")


def test_replaced_parameter_storage_is_followed(backend):
    """Assigning p.data moves the parameter: the address table is rebuilt, not read stale."""
    backend("triton")
    net = torch.nn.Linear(3, 4).to(DEVICE)
    averages = ema.EMA(net.parameters(), [ema.constant(0.5)])
    before = averages.shadows(0)[0].clone()
    averages.update()
    net.weight.data = torch.full((4, 3), 2.0, device=DEVICE)
    averages.update()
    before64 = before.to(F64)
    assert_close(averages.shadows(0)[0], before64 + 0.5 * (2.0 - before64), SHADOW_TOL_DTYPE)


def test_state_dict_round_trip(backend):
    backend("triton")
    params = _params()
    profiles = [ema.power(0.1), ema.constant(0.8)]
    first = ema.EMA(params, profiles)
    for _ in range(3):
        first.update()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = ema.EMA(params, profiles)
    second.load_state_dict(torch.load(buffer))
    for p in params:
        p.add_(1.0)
    first.update()
    second.update()
    assert second.step == first.step == 4
    assert torch.equal(first.shadow, second.shadow)
    with pytest.raises(ValueError, match="saved profiles"):
        ema.EMA(params, [ema.power(0.1)]).load_state_dict(first.state_dict())


def test_copy_to(backend):
    backend("triton")
    net, copy = torch.nn.Linear(3, 4).to(DEVICE), torch.nn.Linear(3, 4).to(DEVICE).to(torch.bfloat16)
    averages = ema.EMA(net.parameters(), [ema.constant(0.5)])
    averages.copy_to(copy.parameters(), 0)
    for a, b in zip(copy.parameters(), net.parameters()):
        assert torch.equal(a, b.to(torch.bfloat16))


# ------------------------------------------------------------------ post-hoc EMA


def _trajectory(step, size=6):
    """A smooth, non-polynomial parameter path θ(τ) (what post-hoc EMA interpolates between)."""
    tau = torch.tensor(float(step), dtype=F64)
    return [torch.sin(tau / 70.0 + torch.arange(size, dtype=F64)).float(), torch.cos(tau / 45.0).reshape(1).float()]


def _run_with_snapshots(sigma_rels, steps=600, every=100):
    params = [t.to(DEVICE) for t in _trajectory(0)]
    averages = ema.EMA(params, [ema.power(s) for s in sigma_rels])
    snapshots = []
    for step in range(1, steps + 1):
        for p, value in zip(params, _trajectory(step)):
            p.copy_(value)
        averages.update()
        if step % every == 0:
            snapshots += averages.snapshot()
    return averages, snapshots


def test_posthoc_of_a_stored_sigma_rel_is_that_snapshot():
    averages, snapshots = _run_with_snapshots([0.05, 0.1])
    coefficients = reference.posthoc_coefficients(
        [s["step"] for s in snapshots], [s["gamma"] for s in snapshots], 600, ema.power(0.1).gamma
    )
    expected = torch.zeros(len(snapshots), dtype=F64)
    expected[-1] = 1.0  # the last snapshot is the σ_rel = 0.1 profile at step 600
    torch.testing.assert_close(coefficients, expected, rtol=0, atol=1e-6)
    for got, want in zip(ema.posthoc_reconstruct(snapshots, 0.1), averages.shadows(1)):
        assert_close(got, want.to(F64), SHADOW_TOL_DTYPE)


def test_posthoc_reconstruction_beats_the_stored_profiles():
    """A σ_rel that was not stored, rebuilt from snapshots of two others, is much closer to an EMA that
    tracked it than either stored average is."""
    truth, _ = _run_with_snapshots([0.07])
    _, snapshots = _run_with_snapshots([0.05, 0.1])
    rebuilt = ema.posthoc_reconstruct(snapshots, 0.07)
    truth_params = [t.cpu() for t in truth.shadows(0)]  # snapshots and the reconstruction are on the CPU
    error = max((a - b).abs().max().item() for a, b in zip(rebuilt, truth_params))
    stored_error = min(
        max((a - b).abs().max().item() for a, b in zip(s["params"], truth_params)) for s in snapshots[-2:]
    )
    assert error < 0.1 * stored_error


# ------------------------------------------------------------------ bad input


def test_bad_input():
    with pytest.raises(ValueError, match="sigma_rel=0.5"):
        ema.power(0.5)
    with pytest.raises(ValueError, match="decay=1.0"):
        ema.constant(1.0)
    with pytest.raises(TypeError, match=r"parameters\[0\].*float64"):
        ema.EMA([torch.zeros(3, dtype=F64)], [ema.constant(0.5)])
    with pytest.raises(ValueError, match=r"parameters\[1\].*not contiguous"):
        ema.EMA([torch.zeros(3), torch.zeros(3, 4).t()], [ema.constant(0.5)])
    with pytest.raises(ValueError, match="profiles"):
        ema.EMA([torch.zeros(3)], [0.99])
    with pytest.raises(ValueError, match="snapshots is empty"):
        ema.posthoc_reconstruct([], 0.1)
