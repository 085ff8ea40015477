"""fastcm.sde_steps: the fused kernel against the float64 reference (which tests/test_kdiffusion_compat.py
checks against k-diffusion's own loops), gradients, tangents, in-kernel noise, out= and bad input."""

import math

import pytest
import torch

from fastcm import sde_steps as fast
from fastcm import steps
from fastcm.reference import sde_steps as ref
from helpers import DEVICE, FAST_DTYPES, assert_close, poisoned_empty, randn, to64

STEPS = [
    "churn",
    "euler_ancestral",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_euler",
    "dpmpp_sde",
    "dpmpp_2m_sde_first",
    "dpmpp_2m_sde_midpoint",
    "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde_1",
    "dpmpp_3m_sde_2",
    "dpmpp_3m_sde_3",
]
SHAPES = [(1, 5), (3, 4, 7), (2, 2100)]  # 2100 > one 2048-element block

RANGES = {
    "sigma": (1.0, 2.0),
    "sigma_next": (0.0, 0.8),
    "sigma_prev": (2.5, 4.0),
    "sigma_prev2": (4.5, 6.0),
    "eta": (0.3, 1.0),
    "s_noise": (0.9, 1.1),
    "sigma_hat": (2.1, 3.0),
}
PARAMS = {
    "churn": ("sigma", "sigma_hat", "s_noise"),
    "euler_ancestral": ("sigma", "sigma_next", "eta", "s_noise"),
    "dpmpp_2s_ancestral": ("sigma", "sigma_next", "eta", "s_noise"),
    "dpmpp_2s_ancestral_euler": ("sigma", "sigma_next", "s_noise"),
    "dpmpp_sde": ("sigma", "sigma_next", "eta", "s_noise"),
    "dpmpp_2m_sde_first": ("sigma", "sigma_next", "eta", "s_noise"),
    "dpmpp_2m_sde_midpoint": ("sigma", "sigma_next", "sigma_prev", "eta", "s_noise"),
    "dpmpp_2m_sde_heun": ("sigma", "sigma_next", "sigma_prev", "eta", "s_noise"),
    "dpmpp_3m_sde_1": ("sigma", "sigma_next", "eta", "s_noise"),
    "dpmpp_3m_sde_2": ("sigma", "sigma_next", "sigma_prev", "eta", "s_noise"),
    "dpmpp_3m_sde_3": ("sigma", "sigma_next", "sigma_prev", "sigma_prev2", "eta", "s_noise"),
}
TENSORS = {
    "churn": "xz",
    "euler_ancestral": "xdz",
    "dpmpp_2s_ancestral": "xdez",
    "dpmpp_2s_ancestral_euler": "xdz",
    "dpmpp_sde": "xdez",
    "dpmpp_2m_sde_first": "xdz",
    "dpmpp_2m_sde_midpoint": "xdez",
    "dpmpp_2m_sde_heun": "xdez",
    "dpmpp_3m_sde_1": "xdz",
    "dpmpp_3m_sde_2": "xdez",
    "dpmpp_3m_sde_3": "xdefz",
}


def _call(step, mod, t, p, **extra):
    x, z = t["x"], t.get("z")
    if step == "churn":
        return mod.churn_step(x, p["sigma"], p["sigma_hat"], s_noise=p["s_noise"], noise=z, **extra)
    common = dict(s_noise=p["s_noise"], noise=z, **extra)
    if step == "euler_ancestral":
        return mod.euler_ancestral_step(x, t["d"], p["sigma"], p["sigma_next"], eta=p["eta"], **common)
    if step == "dpmpp_2s_ancestral":
        return mod.dpmpp_2s_ancestral_step(
            x, t["d"], p["sigma"], p["sigma_next"], denoised_mid=t["e"], eta=p["eta"], **common
        )
    if step == "dpmpp_2s_ancestral_euler":  # η large enough that σ_up = σ', σ_down = 0
        return mod.dpmpp_2s_ancestral_step(x, t["d"], p["sigma"], p["sigma_next"], eta=50.0, **common)
    if step == "dpmpp_sde":
        return mod.dpmpp_sde_step(
            x, t["d"], p["sigma"], p["sigma_next"], denoised_mid=t["e"], r=0.4, eta=p["eta"], **common
        )
    if step.startswith("dpmpp_2m_sde"):
        history = {} if step.endswith("first") else dict(old_denoised=t["e"], sigma_prev=p["sigma_prev"])
        solver = "heun" if step.endswith("heun") else "midpoint"
        return mod.dpmpp_2m_sde_step(
            x, t["d"], p["sigma"], p["sigma_next"], eta=p["eta"], solver_type=solver, **history, **common
        )
    history = {}
    if step[-1] in "23":
        history.update(denoised_1=t["e"], sigma_prev=p["sigma_prev"])
    if step[-1] == "3":
        history.update(denoised_2=t["f"], sigma_prev2=p["sigma_prev2"])
    return mod.dpmpp_3m_sde_step(x, t["d"], p["sigma"], p["sigma_next"], eta=p["eta"], **history, **common)


def _tensors(step, shape, dtype=torch.float32, requires_grad=False, noncontiguous=False):
    return {
        c: randn(*shape, dtype=dtype, requires_grad=requires_grad, noncontiguous=noncontiguous) for c in TENSORS[step]
    }


def _params(step, batch, kind, requires_grad=False, dtype=torch.float32, sigma_next_zero=True):
    """kind: "float", "b" ((B,)), "b111" ((B,1,1)), "0d". sigma_next_zero: sample 0 ends at σ' = 0."""
    out = {}
    for name in PARAMS[step]:
        low, high = RANGES[name]
        if kind == "float":
            out[name] = (low + high) / 2
            continue
        values = torch.rand(batch, dtype=torch.float64) * (high - low) + low
        if name == "sigma_next" and sigma_next_zero:
            values[0] = 0.0
        values = values.to(device=DEVICE, dtype=dtype)
        if kind == "0d":
            values = values[-1]
        elif kind == "b111":
            values = values.reshape(batch, 1, 1)
        out[name] = values.requires_grad_(requires_grad)
    return out


def _as64(d):
    return {k: to64(v) for k, v in d.items()}


# ---- the reference ---------------------------------------------------------------------------


def test_reference_matches_hand_computation():
    x, d, e, z = 1.5, -0.25, 0.75, 0.3
    t = {k: torch.tensor([[v]], dtype=torch.float64) for k, v in zip("xdez", (x, d, e, z))}
    s, sn, eta = 2.0, 0.5, 0.6
    up = min(sn, eta * math.sqrt(sn**2 * (s**2 - sn**2) / s**2))
    down = math.sqrt(sn**2 - up**2)
    got = ref.euler_ancestral_step(t["x"], t["d"], s, sn, eta=eta, s_noise=1.1, noise=t["z"]).item()
    assert got == pytest.approx(x + (down - s) * (x - d) / s + 1.1 * up * z, rel=1e-13)
    h = math.log(s / sn)
    first = sn / s * math.exp(-eta * h) * x - math.expm1(-h - eta * h) * d
    noise = sn * math.sqrt(-math.expm1(-2 * eta * h)) * z
    got = ref.dpmpp_2m_sde_step(t["x"], t["d"], s, sn, eta=eta, noise=t["z"]).item()
    assert got == pytest.approx(first + noise, rel=1e-13)
    got = ref.dpmpp_3m_sde_step(t["x"], t["d"], s, sn, eta=eta, noise=t["z"]).item()
    assert got == pytest.approx(first + noise, rel=1e-13)  # first order: the same update as 2M SDE's first
    assert ref.churn_step(t["x"], 1.0, 1.5, noise=t["z"]).item() == pytest.approx(x + math.sqrt(1.25) * z, rel=1e-14)


def test_reference_deterministic_limits():
    """η = 0: 2M SDE (midpoint) is DPM-Solver++(2M); ancestral Euler is Euler; σ' = 0 steps return D."""
    x, d, e, z = (torch.randn(2, 6, dtype=torch.float64) for _ in range(4))
    torch.testing.assert_close(
        ref.dpmpp_2m_sde_step(x, d, 1.3, 0.6, old_denoised=e, sigma_prev=2.0, eta=0.0, noise=z),
        steps.dpmpp_2m_step(x, d, 1.3, 0.6, old_denoised=e, sigma_prev=2.0),
        rtol=1e-14,
        atol=0,
    )
    torch.testing.assert_close(
        ref.euler_ancestral_step(x, d, 1.3, 0.6, eta=0.0, noise=z),
        steps.euler_step(x, d, 1.3, 0.6),
        rtol=1e-14,
        atol=1e-15,
    )
    for step in ("dpmpp_sde", "dpmpp_2m_sde_midpoint", "dpmpp_3m_sde_3"):
        t = dict(x=x, d=d, e=e, f=z, z=z)
        p = dict(sigma=1.3, sigma_next=0.0, sigma_prev=2.0, sigma_prev2=3.0, eta=0.7, s_noise=1.0)
        assert torch.equal(_call(step, ref, t, p), d), step


@pytest.mark.parametrize("step", STEPS)
def test_reference_gradcheck_and_forward_ad(step):
    t = _as64(_tensors(step, (2, 5), requires_grad=True))
    p = _as64(_params(step, 2, "b", requires_grad=True, sigma_next_zero=False))
    names = list(t) + list(p)

    def fn(*values):
        return _call(step, ref, dict(zip(names, values[: len(t)])), dict(zip(names[len(t) :], values[len(t) :])))

    assert torch.autograd.gradcheck(fn, tuple(t.values()) + tuple(p.values()), check_forward_ad=True)


# ---- the Triton path against the reference ---------------------------------------------------


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_forward_matches_reference(backend, step, shape, dtype):
    backend("triton")
    t = _tensors(step, shape, dtype)
    p = _params(step, shape[0], "b")
    with poisoned_empty():
        out = _call(step, fast, t, p)
    assert out.dtype == dtype and out.shape == tuple(shape)
    assert_close(out, _call(step, ref, _as64(t), _as64(p)), dtype)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("kind", ["float", "0d", "b111"])
def test_forward_parameter_kinds_and_strides(backend, step, kind):
    backend("triton")
    t = _tensors(step, (3, 6, 5), noncontiguous=True)
    p = _params(step, 3, kind)
    with poisoned_empty():
        out = _call(step, fast, t, p)
    assert_close(out, _call(step, ref, _as64(t), _as64(p)), torch.float32)


@pytest.mark.parametrize("step", ["dpmpp_3m_sde_3", "dpmpp_2m_sde_heun"])
def test_float64_inputs_use_float64_coefficients(backend, step):
    backend("triton")
    t = _tensors(step, (3, 40), torch.float64)
    p = _params(step, 3, "float")
    assert_close(_call(step, fast, t, p), _call(step, ref, _as64(t), p), torch.float64)


@pytest.mark.parametrize("step", STEPS)
def test_backward_matches_reference(backend, step):
    backend("triton")
    t = _tensors(step, (3, 2, 45), requires_grad=True)
    grad_out = randn(3, 2, 45)
    with poisoned_empty():
        got = torch.autograd.grad(_call(step, fast, t, _params(step, 3, "float")), tuple(t.values()), grad_out)
    t64 = _as64(t)
    want = torch.autograd.grad(_call(step, ref, t64, _params(step, 3, "float")), tuple(t64.values()), to64(grad_out))
    for name, g, w in zip(t, got, want):
        assert_close(g, w, torch.float32, name=f"grad {name}")


@pytest.mark.parametrize("step", STEPS)
def test_parameter_gradients_match_reference(backend, step):
    backend("triton")
    t = _tensors(step, (3, 37), torch.float64, requires_grad=True)
    p = _params(step, 3, "b", requires_grad=True, dtype=torch.float64, sigma_next_zero=False)
    grad_out = randn(3, 37, dtype=torch.float64)
    inputs = tuple(t.values()) + tuple(p.values())
    got = torch.autograd.grad(_call(step, fast, t, p), inputs, grad_out, allow_unused=True)
    # A parameter's gradient sums 37 products per sample, on a GPU in another order than the CPU reference:
    # a change of at most 37·2^-53·max|product|, which for these inputs is < 4e-14·max(1, |gradient|).
    t64, p64 = _as64(t), _as64(p)
    want = torch.autograd.grad(
        _call(step, ref, t64, p64), tuple(t64.values()) + tuple(p64.values()), to64(grad_out), allow_unused=True
    )
    for name, g, w in zip(list(t) + list(p), got, want):
        if w is None:
            assert g is None or not g.any(), name
            continue
        assert_close(g, w, torch.float64, name=f"grad {name}")


@pytest.mark.parametrize("step", STEPS)
def test_jvp_matches_reference(backend, step):
    backend("triton")
    t = _tensors(step, (3, 41))
    p = _params(step, 3, "b", sigma_next_zero=False)
    names = list(t) + list(p)

    def make(mod):
        return lambda *v: _call(step, mod, dict(zip(names, v[: len(t)])), dict(zip(names[len(t) :], v[len(t) :])))

    primals = tuple(t.values()) + tuple(p.values())
    tangents = tuple(torch.randn_like(v) for v in primals)
    with poisoned_empty(), torch.no_grad():
        out, out_t = torch.func.jvp(make(fast), primals, tangents)
    want, want_t = torch.func.jvp(make(ref), tuple(map(to64, primals)), tuple(map(to64, tangents)))
    assert_close(out, want, torch.float32)
    assert_close(out_t, want_t, torch.float32, name="tangent")


def test_forward_ad_dual_tensors(backend):
    backend("triton")
    import torch.autograd.forward_ad as fwAD

    t = _tensors("dpmpp_3m_sde_3", (3, 70))
    p = _params("dpmpp_3m_sde_3", 3, "float")
    dots = {k: torch.randn_like(v) for k, v in t.items()}
    names = list(t)
    fn = lambda mod: lambda *v: _call("dpmpp_3m_sde_3", mod, dict(zip(names, v)), p)  # noqa: E731
    _, want = torch.func.jvp(fn(ref), tuple(map(to64, t.values())), tuple(map(to64, dots.values())))
    with fwAD.dual_level(), torch.no_grad():
        out = fn(fast)(*(fwAD.make_dual(t[k], dots[k]) for k in names))
        tangent = fwAD.unpack_dual(out).tangent
    assert_close(tangent, want, torch.float32)


def test_gradient_of_in_kernel_noise_scale(backend):
    """d x'/d s_noise without a noise tensor needs the in-kernel noise again: regenerated, not stored."""
    backend("triton")
    x, d = randn(2, 300), randn(2, 300)
    s_noise = torch.tensor([0.9, 1.2], dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = fast.euler_ancestral_step(x, d, 1.5, 0.7, s_noise=s_noise, seed=5)
    (got,) = torch.autograd.grad(out.sum(), s_noise)
    deterministic = fast.euler_ancestral_step(x, d, 1.5, 0.7, s_noise=0.0)
    want = ((out - deterministic).double() / s_noise.detach()[:, None]).sum(1)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-4 * math.sqrt(300))


# ---- noise, out=, backends --------------------------------------------------------------------


def test_in_kernel_noise_is_the_steps_family_stream(backend):
    """Same (seed, offset) → the same z as fastcm.steps' kernels; deterministic; offset-dependent."""
    backend("triton")
    shape = (3, 2500)
    zeros = torch.zeros(shape, device=DEVICE)
    z = fast.churn_step(zeros, 0.0 + 1e-30, 1.0, seed=7, offset=11)  # √(1 − 1e-60) = 1 in float64
    same = steps.trigflow_step(zeros, math.pi / 2, sigma_data=1.0, seed=7, offset=11)
    assert torch.equal(z, same)
    assert torch.equal(z, fast.churn_step(zeros, 1e-30, 1.0, seed=7, offset=11))
    assert (z != fast.churn_step(zeros, 1e-30, 1.0, seed=7, offset=z.numel())).float().mean() > 0.99
    n = z.numel()
    assert abs(z.double().mean().item()) < 5 / math.sqrt(n)
    assert abs(z.double().var().item() - 1) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_seeded_noise_is_reproducible(backend, name):
    backend(name)
    x, d = randn(2, 50), randn(2, 50)
    a = fast.dpmpp_3m_sde_step(x, d, 1.5, 0.7, seed=3)
    assert torch.equal(a, fast.dpmpp_3m_sde_step(x, d, 1.5, 0.7, seed=3))
    assert not torch.equal(a, fast.dpmpp_3m_sde_step(x, d, 1.5, 0.7, seed=4))
    torch.manual_seed(9)
    b = fast.euler_ancestral_step(x, d, 1.5, 0.7)
    torch.manual_seed(9)
    assert torch.equal(b, fast.euler_ancestral_step(x, d, 1.5, 0.7))


@pytest.mark.parametrize("step", ["euler_ancestral", "dpmpp_3m_sde_3", "churn"])
def test_out_in_place(backend, step):
    backend("triton")
    t = _tensors(step, (3, 4, 30))
    p = _params(step, 3, "float")
    want = _call(step, fast, t, p)
    aliased = {k: v.clone() for k, v in t.items()}
    result = _call(step, fast, aliased, p, out=aliased["x"])
    assert result is aliased["x"]
    assert torch.equal(aliased["x"], want)
    strided = torch.empty(3, 30, 4, device=DEVICE).transpose(1, 2)
    assert torch.equal(_call(step, fast, t, p, out=strided), want)


@pytest.mark.parametrize("step", STEPS)
def test_reference_backend_is_default_on_cpu(step):
    t = _as64(_tensors(step, (2, 9)))
    p = _params(step, 2, "float")
    assert torch.equal(_call(step, fast, t, p), _call(step, ref, t, p))


def test_torch_compile_matches_eager(backend):
    backend("triton")
    x, d = randn(3, 6, 7), randn(3, 6, 7)
    fn = lambda a, b: fast.dpmpp_2m_sde_step(a, b, 1.4, 0.6, seed=11, offset=3) * 2 + 1  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    assert torch.equal(compiled(x, d), fn(x, d))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: fast.churn_step(torch.randn(2, 3), 1.0, 0.5),
            ValueError,
            r"churn_step: sigma_hat=0.5 is not supported; expected >= sigma=1.0",
        ),
        (
            lambda: fast.euler_ancestral_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, 1.5),
            ValueError,
            r"euler_ancestral_step: sigma_next=1.5 is not supported; expected <= sigma=1.0",
        ),
        (
            lambda: fast.euler_ancestral_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5, eta=-1.0),
            ValueError,
            r"eta=-1.0 is not supported; expected >= 0",
        ),
        (
            lambda: fast.euler_ancestral_step(torch.randn(2, 3), torch.randn(2, 4), 1.0, 0.5),
            ValueError,
            r"denoised has shape \(2, 4\) but x has shape \(2, 3\)",
        ),
        (
            lambda: fast.dpmpp_2s_ancestral_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5),
            ValueError,
            r"denoised_mid is None but sigma_down is not 0",
        ),
        (
            lambda: fast.dpmpp_sde_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5),
            ValueError,
            r"dpmpp_sde_step: denoised_mid is None but sigma_next=0.5 is not 0",
        ),
        (
            lambda: fast.dpmpp_sde_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.0, r=1.5),
            ValueError,
            r"r=1.5 is not supported; expected a float in \(0, 1\]",
        ),
        (
            lambda: fast.dpmpp_2m_sde_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5, solver_type="euler"),
            ValueError,
            r"solver_type='euler' is not supported; expected one of \('midpoint', 'heun'\)",
        ),
        (
            lambda: fast.dpmpp_2m_sde_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5, sigma_prev=2.0),
            ValueError,
            r"old_denoised and sigma_prev go together",
        ),
        (
            lambda: fast.dpmpp_3m_sde_step(
                torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5, denoised_2=torch.randn(2, 3), sigma_prev2=3.0
            ),
            ValueError,
            r"denoised_2 needs denoised_1",
        ),
        (
            lambda: fast.dpmpp_3m_sde_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5, seed=-2),
            ValueError,
            r"seed=-2 is not supported",
        ),
        (
            lambda: fast.churn_step(torch.randn(2, 3), 1.0, 1.5, s_noise=-0.1),
            ValueError,
            r"churn_step: s_noise=-0.1 is not supported; expected >= 0",
        ),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
