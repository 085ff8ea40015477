"""UniPC (bh2, data prediction): the float64 reference against closed forms and the literal predictor-corrector
recursion, fastcm.sde_steps.unipc_step's kernel path against the reference (forward, gradients, tangents),
fastcm.sampling.sample_unipc against diffusers' own UniPCMultistepScheduler, and bad input."""

import math

import pytest
import torch

from fastcm import sampling, steps
from fastcm import sde_steps as fast
from fastcm.reference import sde_steps as ref
from helpers import DEVICE, FAST_DTYPES, assert_close, poisoned_empty, randn, to64

LEVELS = dict(sigma_prev3=6.0, sigma_prev2=3.5, sigma_prev=2.2, sigma=1.3, sigma_next=0.6)
# (predictor order, corrector order): every pair the loop produces, and the largest (five tensors).
ORDERS = [(1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (2, 2), (3, 2), (3, 3), (1, 3)]


def _call(mod, x, d, history, levels, order, corrector_order, **extra):
    named = {f"denoised_{k + 1}": h for k, h in enumerate(history)}
    names = ("sigma_prev", "sigma_prev2", "sigma_prev3")
    named.update({names[k]: levels[names[k]] for k in range(len(history))})
    return mod.unipc_step(
        x,
        d,
        levels["sigma"],
        levels["sigma_next"],
        order=order,
        corrector_order=corrector_order,
        **named,
        **extra,
    )


def _needed(order, corrector_order):
    return max(order - 1, corrector_order)


# ---- the reference against closed forms ---------------------------------------------------------

COEFS = (0.7, -0.3, 0.25, 0.1, -0.05)


def _poly_denoised(sigma, anchor, degree):
    """An x-independent data prediction D(λ) = Σ_n c_n·(λ − λ_anchor)^n, λ = −log σ."""
    u = math.log(anchor) - math.log(sigma)
    return sum(COEFS[n] * u**n for n in range(degree + 1))


def _exact(x, sigma, sigma_next, degree):
    """The probability-flow ODE dx/dλ = D − x solved exactly from (σ, x) to σ' for that D (anchored at σ):
    x' = e^(−h)·x + Σ_n c_n·I_n(h), I_n(h) = ∫_0^h e^(u−h)·u^n du = h^n − n·I_(n−1), I_0 = 1 − e^(−h)."""
    h = math.log(sigma / sigma_next)
    total, integral = 0.0, -math.expm1(-h)
    for n in range(degree + 1):
        if n:
            integral = h**n - n * integral
        total += COEFS[n] * integral
    return math.exp(-h) * x + total


def _scalar(v):
    return torch.full((1, 1), v, dtype=torch.float64)


@pytest.mark.parametrize("order", [1, 3])
def test_predictor_is_exact_for_polynomial_data_predictions(order):
    """UniP_p solves the p − 1 order conditions: exact when D is a polynomial of degree p − 1 in λ (and not for a
    higher degree), for UniP_3 and UniP_1 (DDIM); UniP_2 uses ρ = ½ instead and is checked by hand below."""
    sig = [LEVELS[k] for k in ("sigma_prev2", "sigma_prev", "sigma", "sigma_next")]
    for degree, exact in ((order - 1, True), (order, False)):
        d = [_scalar(_poly_denoised(s, sig[2], degree)) for s in sig]
        history = [d[1], d[0]][: order - 1]
        got = ref.unipc_predictor_step(
            _scalar(1.3), d[2], sig[2], sig[3], denoised_history=history, sigma_history=[sig[1], sig[0]][: order - 1]
        ).item()
        want = _exact(1.3, sig[2], sig[3], degree)
        if exact:
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
        else:
            assert abs(got - want) > 1e-4


@pytest.mark.parametrize("order", [2, 3])
def test_corrector_is_exact_for_polynomial_data_predictions(order):
    """UniC_p (p ≥ 2) solves p order conditions with the new output as its last node: exact for degree p."""
    sig = [LEVELS[k] for k in ("sigma_prev2", "sigma_prev", "sigma", "sigma_next")]
    for degree, exact in ((order, True), (order + 1, False)):
        d = [_scalar(_poly_denoised(s, sig[2], degree)) for s in sig]
        got = ref.unipc_corrector_step(
            _scalar(1.3),
            d[2],
            sig[2],
            sig[3],
            d[3],
            denoised_history=[d[1], d[0]][: order - 1],
            sigma_history=[sig[1], sig[0]][: order - 1],
        ).item()
        want = _exact(1.3, sig[2], sig[3], degree)
        if exact:
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
        else:
            assert abs(got - want) > 1e-5


def test_reference_matches_hand_computation():
    """UniP_1 is DDIM / Euler in σ; UniP_2 and UniC_1 use ρ = ½ (B(h) = expm1(−h) for bh2)."""
    x, d, d1, d_new = (_scalar(v) for v in (1.5, -0.25, 0.75, 0.4))
    s1, s, sn = 2.2, 1.3, 0.6
    torch.testing.assert_close(ref.unipc_predictor_step(x, d, s, sn), steps.euler_step(x, d, s, sn), rtol=1e-14, atol=0)
    h, r1 = math.log(s / sn), math.log(s / s1) / math.log(s / sn)
    b_h = math.expm1(-h)
    want = sn / s * 1.5 - b_h * -0.25 - b_h * 0.5 * (0.75 + 0.25) / r1
    got = ref.unipc_predictor_step(x, d, s, sn, denoised_history=[d1], sigma_history=[s1]).item()
    assert got == pytest.approx(want, rel=1e-13)
    want = sn / s * 1.5 - b_h * -0.25 - b_h * 0.5 * (0.4 + 0.25)
    assert ref.unipc_corrector_step(x, d, s, sn, d_new).item() == pytest.approx(want, rel=1e-13)
    assert torch.equal(ref.unipc_predictor_step(x, d, s, 0.0, denoised_history=[d1], sigma_history=[s1]), d)


def test_fused_step_is_the_literal_predictor_corrector_recursion():
    """A UniPC run kept the textbook way (store the corrected point, correct it, predict from it) against the
    fused reference step that never sees the corrected point: every step equal to float64 rounding."""
    torch.manual_seed(0)
    sigmas = [8.0, 5.0, 3.0, 1.8, 1.0, 0.55, 0.3, 0.15]
    weight = torch.randn(2, 5, dtype=torch.float64)

    def denoiser(x, sigma):
        return torch.tanh(weight * x / (1 + sigma)) + 0.1 * x / (1 + sigma**2)

    x_fused = x_literal = 8.0 * torch.randn(2, 5, dtype=torch.float64)
    previous_corrected, history, previous_order = None, [], 0
    for i in range(len(sigmas) - 1):
        d = denoiser(x_literal, sigmas[i])
        torch.testing.assert_close(denoiser(x_fused, sigmas[i]), d, rtol=1e-12, atol=1e-12)
        order = min(3, len(history) + 1)
        levels = sigmas[:i][::-1]
        start = x_literal
        if previous_order:
            c = previous_order
            start = ref.unipc_corrector_step(
                previous_corrected,
                history[0],
                levels[0],
                sigmas[i],
                d,
                denoised_history=history[1:c],
                sigma_history=levels[1:c],
            )
        x_literal = ref.unipc_predictor_step(
            start, d, sigmas[i], sigmas[i + 1], denoised_history=history[: order - 1], sigma_history=levels[: order - 1]
        )
        named = {f"denoised_{k + 1}": h for k, h in enumerate(history)}
        named.update({("sigma_prev", "sigma_prev2", "sigma_prev3")[k]: levels[k] for k in range(len(history))})
        x_fused = ref.unipc_step(
            x_fused, d, sigmas[i], sigmas[i + 1], order=order, corrector_order=previous_order, **named
        )
        torch.testing.assert_close(x_fused, x_literal, rtol=1e-12, atol=1e-12)
        previous_corrected, previous_order = start, order
        history = [d] + history[:2]


@pytest.mark.parametrize("orders", ORDERS, ids=str)
def test_reference_gradcheck_and_forward_ad(orders):
    order, corrector_order = orders
    n = _needed(order, corrector_order)
    tensors = [torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2 + n)]
    names = ["sigma", "sigma_next", "sigma_prev", "sigma_prev2", "sigma_prev3"][: 2 + n]
    jitter = torch.tensor([1.0, 0.93], dtype=torch.float64)
    params = [(LEVELS[k] * jitter).requires_grad_() for k in names]

    def fn(*values):
        ts, ps = values[: len(tensors)], values[len(tensors) :]
        return _call(ref, ts[0], ts[1], ts[2:], dict(zip(names, ps)), order, corrector_order)

    assert torch.autograd.gradcheck(fn, tuple(tensors) + tuple(params), check_forward_ad=True)


# ---- the kernel path against the reference ------------------------------------------------------


def _inputs(orders, shape, dtype=torch.float32, requires_grad=False, noncontiguous=False):
    n = _needed(*orders)
    return [randn(*shape, dtype=dtype, requires_grad=requires_grad, noncontiguous=noncontiguous) for _ in range(2 + n)]


def _levels(batch, kind, dtype=torch.float32, final=True, requires_grad=False):
    """kind: "float", "b" ((B,)), "b111" ((B, 1, 1)) or "0d"; with final, sample 0 steps to σ' = 0."""
    out = {}
    for name, value in LEVELS.items():
        if kind == "float":
            out[name] = value
            continue
        values = value * (1 + 0.1 * torch.rand(batch, dtype=torch.float64))
        if name == "sigma_next" and final:
            values[0] = 0.0
        values = values.to(device=DEVICE, dtype=dtype)
        values = values[-1] if kind == "0d" else values.reshape(batch, 1, 1) if kind == "b111" else values
        out[name] = values.requires_grad_(requires_grad)
    return out


def _as64(levels):
    return {k: to64(v) for k, v in levels.items()}


@pytest.mark.parametrize("orders", ORDERS, ids=str)
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_forward_matches_reference(backend, orders, dtype):
    backend("triton")
    t = _inputs(orders, (3, 4, 7), dtype)
    levels = _levels(3, "b")
    with poisoned_empty():
        out = _call(fast, t[0], t[1], t[2:], levels, *orders)
    assert out.dtype == dtype and out.shape == (3, 4, 7)
    want = _call(ref, to64(t[0]), to64(t[1]), [to64(v) for v in t[2:]], _as64(levels), *orders)
    assert_close(out, want, dtype)
    assert torch.equal(out[0], t[1][0])  # σ' = 0: x' = D


@pytest.mark.parametrize("kind", ["float", "0d", "b111"])
def test_parameter_kinds_strides_and_blocks(backend, kind):
    backend("triton")
    t = _inputs((3, 3), (2, 40, 55), noncontiguous=True)  # 2200 elements per sample: two kernel blocks
    levels = _levels(2, kind, final=False)
    with poisoned_empty():
        out = _call(fast, t[0], t[1], t[2:], levels, 3, 3)
    want = _call(ref, to64(t[0]), to64(t[1]), [to64(v) for v in t[2:]], _as64(levels), 3, 3)
    assert_close(out, want, torch.float32)


def test_float64_inputs_use_float64_coefficients(backend):
    backend("triton")
    t = [v.double() for v in _inputs((3, 3), (3, 40))]
    assert_close(
        _call(fast, t[0], t[1], t[2:], LEVELS, 3, 3), _call(ref, t[0], t[1], t[2:], LEVELS, 3, 3), torch.float64
    )


@pytest.mark.parametrize("orders", [(3, 3), (2, 1)], ids=str)
def test_backward_matches_reference(backend, orders):
    backend("triton")
    t = _inputs(orders, (3, 2, 45), requires_grad=True)
    grad_out = randn(3, 2, 45)
    with poisoned_empty():
        got = torch.autograd.grad(_call(fast, t[0], t[1], t[2:], LEVELS, *orders), t, grad_out)
    t64 = [to64(v) for v in t]
    want = torch.autograd.grad(_call(ref, t64[0], t64[1], t64[2:], LEVELS, *orders), t64, to64(grad_out))
    for k, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, torch.float32, name=f"grad of tensor {k}")


@pytest.mark.parametrize("orders", [(3, 3), (2, 2)], ids=str)
def test_level_gradients_match_reference(backend, orders):
    backend("triton")
    t = [v.double().requires_grad_() for v in _inputs(orders, (3, 37))]
    levels = _levels(3, "b", dtype=torch.float64, final=False, requires_grad=True)
    grad_out = randn(3, 37, dtype=torch.float64)
    inputs = tuple(t) + tuple(levels.values())
    got = torch.autograd.grad(_call(fast, t[0], t[1], t[2:], levels, *orders), inputs, grad_out, allow_unused=True)
    t64 = [v.detach().clone().requires_grad_() for v in t]
    l64 = {k: v.detach().clone().requires_grad_() for k, v in levels.items()}
    want = torch.autograd.grad(
        _call(ref, t64[0], t64[1], t64[2:], l64, *orders), tuple(t64) + tuple(l64.values()), grad_out, allow_unused=True
    )
    for name, g, w in zip([f"t{k}" for k in range(len(t))] + list(levels), got, want):
        if w is None:
            assert g is None or not g.any(), name
            continue
        assert_close(g, w, torch.float64, name=f"grad {name}")


@pytest.mark.parametrize("orders", [(3, 3), (3, 1)], ids=str)
def test_jvp_matches_reference(backend, orders):
    backend("triton")
    t = _inputs(orders, (3, 41))
    levels = _levels(3, "b", final=False)
    names = list(levels)

    def make(mod):
        def fn(*v):
            return _call(mod, v[0], v[1], v[2 : len(t)], dict(zip(names, v[len(t) :])), *orders)

        return fn

    primals = tuple(t) + tuple(levels.values())
    tangents = tuple(torch.randn_like(v) for v in primals)
    with poisoned_empty(), torch.no_grad():
        out, out_t = torch.func.jvp(make(fast), primals, tangents)
    want, want_t = torch.func.jvp(make(ref), tuple(map(to64, primals)), tuple(map(to64, tangents)))
    assert_close(out, want, torch.float32)
    assert_close(out_t, want_t, torch.float32, name="tangent")


def test_forward_ad_dual_tensors(backend):
    backend("triton")
    import torch.autograd.forward_ad as fwAD

    t = _inputs((3, 3), (3, 70))
    dots = [torch.randn_like(v) for v in t]
    _, want = torch.func.jvp(
        lambda *v: _call(ref, v[0], v[1], v[2:], LEVELS, 3, 3), tuple(map(to64, t)), tuple(map(to64, dots))
    )
    with fwAD.dual_level(), torch.no_grad():
        duals = [fwAD.make_dual(v, dv) for v, dv in zip(t, dots)]
        tangent = fwAD.unpack_dual(_call(fast, duals[0], duals[1], duals[2:], LEVELS, 3, 3)).tangent
    assert_close(tangent, want, torch.float32)


def test_out_in_place(backend):
    backend("triton")
    t = _inputs((3, 3), (3, 4, 30))
    want = _call(fast, t[0], t[1], t[2:], LEVELS, 3, 3)
    aliased = t[0].clone()
    result = _call(fast, aliased, t[1], t[2:], LEVELS, 3, 3, out=aliased)
    assert result is aliased and torch.equal(aliased, want)
    strided = torch.empty(3, 30, 4, device=DEVICE).transpose(1, 2)
    assert torch.equal(_call(fast, t[0], t[1], t[2:], LEVELS, 3, 3, out=strided), want)


def test_reference_backend_is_default_on_cpu():
    t = [v.double() for v in _inputs((3, 3), (2, 9))]
    assert torch.equal(_call(fast, t[0], t[1], t[2:], LEVELS, 3, 3), _call(ref, t[0], t[1], t[2:], LEVELS, 3, 3))


def test_unused_history_is_ignored(backend):
    backend("triton")
    t = _inputs((3, 3), (2, 33))
    got = _call(fast, t[0], t[1], t[2:], LEVELS, 2, 1)
    assert torch.equal(got, _call(fast, t[0], t[1], t[2:3], LEVELS, 2, 1))


def _bad(**overrides):
    x = torch.randn(2, 3)
    kwargs = dict(denoised_1=torch.randn(2, 3), sigma_prev=2.0, order=2, corrector_order=1)
    kwargs.update(overrides)
    args = kwargs.pop("args", (x, torch.randn(2, 3), 1.0, 0.5))
    return lambda: fast.unipc_step(*args, **kwargs)


@pytest.mark.parametrize(
    "call, message",
    [
        (_bad(order=4), r"unipc_step: order=4 is not supported; expected an int in \[1, 3\]"),
        (_bad(corrector_order=-1), r"corrector_order=-1 is not supported; expected an int in \[0, 3\]"),
        (_bad(order=True), r"order=True is not supported"),
        (_bad(order=3), r"order=3, corrector_order=1 read denoised_1..denoised_2 .*; denoised_2 is None"),
        (_bad(sigma_prev=None), r"denoised_1 and sigma_prev go together; got sigma_prev=None with denoised_1 given"),
        (_bad(sigma_prev=0.9), r"expected sigma_next < sigma < sigma_prev"),
        (_bad(args=(torch.randn(2, 3), torch.randn(2, 3), 1.0, 1.0)), r"expected sigma_next < sigma"),
        (_bad(args=(torch.randn(2, 3), torch.randn(2, 3), 1.0, 1.5)), r"sigma_next=1.5 is not supported"),
        (_bad(args=(torch.randn(2, 3), torch.randn(2, 3), -1.0, 0.5)), r"sigma=-1.0 is not supported; expected > 0"),
        (_bad(denoised_1=torch.randn(2, 4)), r"denoised_1 has shape \(2, 4\) but x has shape \(2, 3\)"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- the sampling loop against diffusers' own scheduler -----------------------------------------


def _edm_denoiser(x, sigma):
    """An analytic stand-in for a network: any smooth function of (x, σ)."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return 0.6 * x / (1 + s**2) + 0.3 * torch.sin(x / (1 + s)) - 0.1


@pytest.mark.parametrize(
    "options",
    [
        dict(solver_order=3),
        dict(solver_order=2, prediction_type="v_prediction"),
        dict(solver_order=1),
        dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min", disable_corrector=[1, 4]),
        dict(solver_order=3, use_karras_sigmas=True),
    ],
    ids=str,
)
def test_sample_unipc_matches_diffusers_scheduler(options):
    """diffusers steps VP samples x_vp = x/√(1 + σ²) with ε- or v-prediction; the same denoiser, converted, drives
    it, and every point the model sees (and the end) matches sample_unipc's to float32 rounding."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **options
    )
    scheduler.set_timesteps(8)
    sigmas = scheduler.sigmas.double()
    x = (torch.randn(2, 3, 5, 4, dtype=torch.float64) * sigmas[0]).float()
    seen = []
    got = sampling.sample_unipc(
        _edm_denoiser,
        x,
        sigmas,
        callback=lambda info: seen.append(info["x"].clone()),
        order=options["solver_order"],
        lower_order_final=options.get("lower_order_final", True),
        disable_corrector=options.get("disable_corrector", ()),
    )
    sample = x / (1 + sigmas[0] ** 2) ** 0.5
    for i, t in enumerate(scheduler.timesteps):
        sigma = sigmas[i].item()
        scale = (1 + sigma**2) ** 0.5
        assert_close(seen[i] / scale, sample, torch.float32, name=f"step {i}")
        edm_x = sample * scale
        denoised = _edm_denoiser(edm_x, torch.full((2,), sigma))
        eps = (edm_x - denoised) / sigma
        if options.get("prediction_type") == "v_prediction":  # v = α·ε − σ_vp·x0 with α = 1/scale, σ_vp = σ/scale
            output = (eps - sigma * denoised) / scale
        else:
            output = eps
        sample = scheduler.step(output.float(), t, sample.float()).prev_sample
    last = sigmas[-1].item()
    assert_close(got / (1 + last**2) ** 0.5, sample, torch.float32, name="end")


@pytest.mark.parametrize(
    "order, corrector, rate", [(1, True, 2), (2, True, 3), (3, True, 4), (1, False, 1), (2, False, 2)]
)
def test_sample_unipc_convergence_order(order, corrector, rate):
    """On Gaussian data (D = s²/(s² + σ²)·x, whose ODE solution is x·√((s² + σ'²)/(s² + σ²))) the global error of
    UniP_p falls as N^−p and the corrector raises it to N^−(p+1) (Zhao et al. 2023): the observed rate from 32 to
    64 Karras steps is within 0.25 of that."""
    data_std, sigma_min, sigma_max = 0.5, 0.05, 10.0
    x = 10.0 * torch.randn(2, 8, dtype=torch.float64)

    def denoiser(x, sigma):
        return data_std**2 / (data_std**2 + sigma[:, None] ** 2) * x

    exact = x * math.sqrt((data_std**2 + sigma_min**2) / (data_std**2 + sigma_max**2))
    errors = []
    for n in (32, 64):
        sigmas = sampling.karras_sigmas(n, sigma_min=sigma_min, sigma_max=sigma_max)  # ends at σ_min > 0
        assert sigmas[-1].item() == pytest.approx(sigma_min)
        out = sampling.sample_unipc(
            denoiser, x, sigmas, order=order, lower_order_final=False, disable_corrector=() if corrector else range(n)
        )
        errors.append((out - exact).abs().max().item())
    assert abs(math.log2(errors[0] / errors[1]) - rate) < 0.25, errors


def test_sample_unipc_on_the_kernel_matches_reference_backend(backend):
    sigmas = sampling.karras_sigmas(5, sigma_min=0.05, sigma_max=10.0)
    x = 10.0 * randn(2, 3, 11)
    want = sampling.sample_unipc(_edm_denoiser, to64(x), sigmas)
    backend("triton")
    with poisoned_empty():
        got = sampling.sample_unipc(_edm_denoiser, x, sigmas)
    assert_close(got, want, torch.float32)


def test_sample_unipc_calling_convention():
    calls, infos = [], []

    def model(x, sigma, scale=None):
        calls.append(scale)
        return 0.5 * x

    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.0])
    x = torch.randn(2, 3)
    out = sampling.sample_unipc(model, x, sigmas, {"scale": 7}, infos.append, True)
    assert calls == [7, 7, 7]
    assert [i["i"] for i in infos] == [0, 1, 2] and infos[1]["sigma"] is not None
    assert set(infos[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert torch.equal(out, infos[2]["denoised"])  # the last step, to σ = 0, returns D
    with pytest.raises(ValueError, match=r"sample_unipc: order=4 is not supported"):
        sampling.sample_unipc(model, x, sigmas, order=4)
    with pytest.raises(ValueError, match=r"must decrease strictly"):
        sampling.sample_unipc(model, x, [4.0, 2.0, 2.0, 0.0])
    with pytest.raises(ValueError, match=r"capture=True records a CUDA graph"):
        sampling.sample_unipc(model, x, sigmas, capture=True)


@pytest.mark.gpu
def test_sample_unipc_capture_matches_eager():
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need FASTCM_TEST_DEVICE=cuda")
    sigmas = sampling.karras_sigmas(6, sigma_min=0.05, sigma_max=10.0)
    x = 10.0 * randn(2, 4, 16, 16)
    eager = sampling.sample_unipc(_edm_denoiser, x, sigmas)
    captured = sampling.sample_unipc(_edm_denoiser, x, sigmas, capture=True)
    assert torch.equal(captured, eager)
