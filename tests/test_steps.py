import math

import pytest
import torch

from fastcm import steps as fast
from fastcm.reference import steps as ref
from helpers import DEVICE, FAST_DTYPES, assert_close, poisoned_empty, randn, to64

STEPS = ["euler", "heun", "dpmpp_2m_first", "dpmpp_2m", "ddim", "cm", "trigflow", "cfg", "cfg_rescale"]
SHAPES = [(1, 5), (3, 4, 7, 5), (7, 3, 33), (2, 2100)]  # 2100 > one 2048-element block

# Per-sample parameter ranges (low, high) per step; a 0 entry in sigma_next exercises the σ' = 0 branch.
RANGES = {
    "euler": {"sigma": (0.5, 2.0), "sigma_next": (0.0, 0.4)},
    "heun": {"sigma": (0.5, 2.0), "sigma_next": (0.0, 0.4)},
    "dpmpp_2m_first": {"sigma": (0.5, 2.0), "sigma_next": (0.0, 0.4)},
    "dpmpp_2m": {"sigma": (0.5, 2.0), "sigma_next": (0.0, 0.4), "sigma_prev": (2.5, 4.0)},
    "ddim": {"alpha_bar": (0.1, 0.4), "alpha_bar_next": (0.5, 0.9), "eta": (0.2, 1.0)},
    "cm": {"sigma_next": (0.5, 2.0)},
    "trigflow": {"t_next": (0.2, 1.5)},
    "cfg": {"guidance_scale": (1.0, 7.0)},
    "cfg_rescale": {"guidance_scale": (1.0, 7.0), "guidance_rescale": (0.3, 1.0)},
}
TENSORS = {
    "euler": "xd",
    "heun": "xde",
    "dpmpp_2m_first": "xd",
    "dpmpp_2m": "xde",
    "ddim": "xdz",
    "cm": "dz",
    "trigflow": "dz",
    "cfg": "de",
    "cfg_rescale": "de",
}


def _call(step, mod, t, p, **extra):
    """One step through `mod` (fastcm.steps or the reference) with tensors t and parameters p."""
    if step == "euler":
        return mod.euler_step(t["x"], t["d"], p["sigma"], p["sigma_next"], **extra)
    if step == "heun":
        return mod.heun_step(t["x"], t["d"], p["sigma"], p["sigma_next"], denoised_next=t["e"], **extra)
    if step == "dpmpp_2m_first":
        return mod.dpmpp_2m_step(t["x"], t["d"], p["sigma"], p["sigma_next"], **extra)
    if step == "dpmpp_2m":
        return mod.dpmpp_2m_step(
            t["x"], t["d"], p["sigma"], p["sigma_next"], old_denoised=t["e"], sigma_prev=p["sigma_prev"], **extra
        )
    if step == "ddim":
        return mod.ddim_step(t["x"], t["d"], p["alpha_bar"], p["alpha_bar_next"], eta=p["eta"], noise=t["z"], **extra)
    if step == "cm":
        return mod.cm_step(t["d"], p["sigma_next"], sigma_min=0.002, noise=t["z"], **extra)
    if step == "trigflow":
        return mod.trigflow_step(t["d"], p["t_next"], sigma_data=0.5, noise=t["z"], **extra)
    rescale = p.get("guidance_rescale", 0.0)
    return mod.cfg(t["d"], t["e"], p["guidance_scale"], guidance_rescale=rescale, **extra)


def _tensors(step, shape, dtype=torch.float32, requires_grad=False, noncontiguous=False):
    return {
        c: randn(*shape, dtype=dtype, requires_grad=requires_grad, noncontiguous=noncontiguous) for c in TENSORS[step]
    }


def _params(step, batch, kind, requires_grad=False, dtype=torch.float32, sigma_next_zero=True):
    """kind: "float" (mid-range Python floats), "b" ((B,) tensors), "b111" ((B,1,1)), "0d".
    sigma_next_zero: sample 0 steps to σ' = 0 (a branch point: leave it out for derivatives in σ')."""
    out = {}
    for name, (low, high) in RANGES[step].items():
        if kind == "float":
            out[name] = (low + high) / 2
            continue
        values = torch.rand(batch, dtype=torch.float64) * (high - low) + low
        if name == "sigma_next" and low == 0.0 and sigma_next_zero:
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


# ---- the reference against hand computation and finite differences ---------------------------


def test_reference_matches_hand_computation():
    x, d, e, z = 1.5, -0.25, 0.75, 0.3
    t = {k: torch.tensor([[v]], dtype=torch.float64) for k, v in zip("xdez", (x, d, e, z))}
    s, sn, sp = 2.0, 0.5, 3.0
    dir_ = (x - d) / s
    x_euler = x + (sn - s) * dir_
    hand = {
        "euler": x_euler,
        "heun": x + (sn - s) * (dir_ + (x_euler - e) / sn) / 2,
        "dpmpp_2m_first": (sn / s) * x - math.expm1(math.log(sn) - math.log(s)) * d,
    }
    h, h_prev = math.log(s) - math.log(sn), math.log(sp) - math.log(s)
    r = h_prev / h
    hand["dpmpp_2m"] = (sn / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * d - e / (2 * r))
    ab, abn, eta = 0.3, 0.7, 0.6
    x0 = (x - math.sqrt(1 - ab) * d) / math.sqrt(ab)
    sd = eta * math.sqrt((1 - abn) / (1 - ab)) * math.sqrt(1 - ab / abn)
    hand["ddim"] = math.sqrt(abn) * x0 + math.sqrt(1 - abn - sd**2) * d + sd * z
    hand["cm"] = d + math.sqrt(1.2**2 - 0.002**2) * z
    hand["trigflow"] = math.cos(1.1) * d + math.sin(1.1) * 0.5 * z
    hand["cfg"] = e + 4.0 * (d - e)
    p = {
        "sigma": s,
        "sigma_next": sn,
        "sigma_prev": sp,
        "alpha_bar": ab,
        "alpha_bar_next": abn,
        "eta": eta,
        "t_next": 1.1,
        "guidance_scale": 4.0,
    }
    for step, want in hand.items():
        got = _call(step, ref, t, dict(p, sigma_next=1.2) if step == "cm" else p)
        assert got.item() == pytest.approx(want, rel=1e-13, abs=1e-14), step


def test_reference_cfg_rescale_matches_hand_computation():
    cond = torch.tensor([[1.0, 3.0, -2.0]], dtype=torch.float64)
    uncond = torch.tensor([[0.5, 1.0, 0.0]], dtype=torch.float64)
    w, phi = 3.0, 0.7
    guided = [u + w * (c - u) for c, u in zip(cond[0].tolist(), uncond[0].tolist())]

    def std(v):
        mean = sum(v) / len(v)
        return math.sqrt(sum((a - mean) ** 2 for a in v) / (len(v) - 1))

    factor = phi * std(cond[0].tolist()) / std(guided) + 1 - phi
    got = ref.cfg(cond, uncond, w, guidance_rescale=phi)
    assert got[0].tolist() == pytest.approx([factor * g for g in guided], rel=1e-13)


def test_reference_sigma_next_zero_is_denoised():
    x, d, e = (torch.randn(2, 6, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(ref.euler_step(x, d, 1.3, 0.0), d, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(ref.heun_step(x, d, 1.3, 0.0, denoised_next=e), d, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(
        ref.dpmpp_2m_step(x, d, 1.3, 0.0, old_denoised=e, sigma_prev=2.0), d, rtol=1e-15, atol=1e-15
    )


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


def test_float64_inputs_use_float64_coefficients(backend):
    backend("triton")
    t = _tensors("dpmpp_2m", (3, 40), torch.float64)
    p = {"sigma": 1.7, "sigma_next": 1.6999, "sigma_prev": 2.1}
    assert_close(_call("dpmpp_2m", fast, t, p), _call("dpmpp_2m", ref, _as64(t), p), torch.float64)


@pytest.mark.parametrize("step", STEPS)
def test_backward_matches_reference(backend, step):
    backend("triton")
    t = _tensors(step, (3, 4, 45), requires_grad=True)
    grad_out = randn(3, 4, 45)
    with poisoned_empty():
        got = torch.autograd.grad(_call(step, fast, t, _params(step, 3, "float")), tuple(t.values()), grad_out)
    t64 = _as64(t)
    want = torch.autograd.grad(_call(step, ref, t64, _params(step, 3, "float")), tuple(t64.values()), to64(grad_out))
    for name, g, w in zip(t, got, want):
        assert_close(g, w, torch.float32, name=f"grad {name}")


@pytest.mark.parametrize("step", STEPS)
def test_parameter_gradients_match_reference(backend, step):
    """Per-sample parameter gradients (float64 inputs: exact arithmetic through the same code path)."""
    backend("triton")
    t = _tensors(step, (3, 2, 37), torch.float64, requires_grad=True)
    p = _params(step, 3, "b", requires_grad=True, dtype=torch.float64, sigma_next_zero=False)
    grad_out = randn(3, 2, 37, dtype=torch.float64)
    inputs = tuple(t.values()) + tuple(p.values())
    got = torch.autograd.grad(_call(step, fast, t, p), inputs, grad_out, allow_unused=True)
    # A parameter's gradient sums 74 products per sample, on a GPU in another order than the CPU reference:
    # a change of at most 74·2^-53·max|product|, which for these inputs is < 5e-14·max(1, |gradient|).
    t64, p64 = _as64(t), _as64(p)
    inputs64 = tuple(t64.values()) + tuple(p64.values())
    want = torch.autograd.grad(_call(step, ref, t64, p64), inputs64, to64(grad_out), allow_unused=True)
    for name, g, w in zip(list(t) + list(p), got, want):
        if w is None:
            assert g is None or not g.any(), name
            continue
        assert_close(g, w, torch.float64, name=f"grad {name}")


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jvp_matches_reference(backend, step, dtype):
    backend("triton")
    t = _tensors(step, (3, 5, 41), dtype)
    p = _params(step, 3, "b", sigma_next_zero=False)
    t_dot = {k: randn(*v.shape, dtype=dtype) for k, v in t.items()}
    p_dot = {k: randn(*v.shape) for k, v in p.items()}
    names = list(t) + list(p)

    def make(mod):
        return lambda *v: _call(step, mod, dict(zip(names, v[: len(t)])), dict(zip(names[len(t) :], v[len(t) :])))

    primals = tuple(t.values()) + tuple(p.values())
    tangents = tuple(t_dot.values()) + tuple(p_dot.values())
    with poisoned_empty(), torch.no_grad():
        out, out_t = torch.func.jvp(make(fast), primals, tangents)
    want, want_t = torch.func.jvp(make(ref), tuple(map(to64, primals)), tuple(map(to64, tangents)))
    assert_close(out, want, dtype)
    # The rescaled CFG tangent contains per-sample reductions; judge it in float32 at float32 inputs only.
    if step != "cfg_rescale" or dtype == torch.float32:
        assert_close(out_t, want_t, dtype, name="tangent")


def test_jvp_of_rescaled_cfg_float64(backend):
    backend("triton")
    t = _tensors("cfg_rescale", (2, 3, 29), torch.float64)
    p = _params("cfg_rescale", 2, "b", dtype=torch.float64)
    dots = tuple(torch.randn_like(v) for v in list(t.values()) + list(p.values()))
    fn = lambda mod: lambda d, e, w, phi: mod.cfg(d, e, w, guidance_rescale=phi)  # noqa: E731
    primals = tuple(t.values()) + tuple(p.values())
    _, got = torch.func.jvp(fn(fast), primals, dots)
    _, want = torch.func.jvp(fn(ref), tuple(map(to64, primals)), tuple(map(to64, dots)))
    assert_close(got, want, torch.float64, name="tangent")


def test_forward_ad_dual_tensors(backend):
    backend("triton")
    import torch.autograd.forward_ad as fwAD

    d, z, dd = randn(3, 70), randn(3, 70), randn(3, 70)
    _, want = torch.func.jvp(lambda a: ref.cm_step(a, 0.8, noise=to64(z)), (to64(d),), (to64(dd),))
    with fwAD.dual_level(), torch.no_grad():
        out = fast.cm_step(fwAD.make_dual(d, dd), 0.8, noise=z)
        tangent = fwAD.unpack_dual(out).tangent
    assert_close(tangent, want, torch.float32)


def test_double_backward_through_a_step(backend):
    backend("triton")
    x = randn(2, 13, requires_grad=True)
    d = randn(2, 13)
    sigma = (torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_()
    (g,) = torch.autograd.grad(fast.euler_step(x, d, sigma, 0.2).square().sum(), sigma, create_graph=True)
    (got,) = torch.autograd.grad(g.sum(), x)
    x64, s64 = to64(x), to64(sigma.detach()).requires_grad_()
    (g64,) = torch.autograd.grad(ref.euler_step(x64, to64(d), s64, 0.2).square().sum(), s64, create_graph=True)
    (want,) = torch.autograd.grad(g64.sum(), x64)
    assert_close(got, want, torch.float32)


def test_gradient_of_in_kernel_noise_scale(backend):
    """d x'/d σ' of cm_step without a noise tensor needs the in-kernel noise again: regenerated, not stored."""
    backend("triton")
    d = randn(2, 3000)
    sigma_next = torch.tensor([0.7, 1.3], dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = fast.cm_step(d, sigma_next, seed=5)
    (got,) = torch.autograd.grad(out.sum(), sigma_next)
    z = (out - d).double() / torch.sqrt(sigma_next.detach() ** 2 - 0.002**2)[:, None]
    want = (z * (sigma_next.detach() / torch.sqrt(sigma_next.detach() ** 2 - 0.002**2))[:, None]).sum(1)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-4 * math.sqrt(3000))


# ---- heun / dpm branches, out=, backends -----------------------------------------------------


def test_heun_at_sigma_next_zero_is_euler(backend):
    backend("triton")
    x, d, e = randn(3, 50), randn(3, 50), randn(3, 50)
    assert torch.equal(fast.heun_step(x, d, 1.2, 0.0, denoised_next=e), fast.euler_step(x, d, 1.2, 0.0))
    assert torch.equal(fast.heun_step(x, d, 1.2, 0.0), fast.euler_step(x, d, 1.2, 0.0))
    assert torch.equal(fast.heun_step(x, d, 1.2, torch.zeros(3, device=DEVICE)), fast.euler_step(x, d, 1.2, 0.0))
    with pytest.raises(ValueError, match=r"denoised_next is None but sigma_next=0.5 is not 0"):
        fast.heun_step(x, d, 1.2, 0.5)


@pytest.mark.parametrize("step", ["euler", "dpmpp_2m", "cm", "cfg_rescale"])
def test_out_in_place(backend, step):
    backend("triton")
    t = _tensors(step, (3, 4, 30))
    p = _params(step, 3, "float")
    want = _call(step, fast, t, p)
    aliased = {k: v.clone() for k, v in t.items()}
    target = aliased["x"] if "x" in aliased else aliased["d"]
    result = _call(step, fast, aliased, p, out=target)
    assert result is target
    assert torch.equal(target, want)
    strided = torch.empty(3, 30, 4, device=DEVICE).transpose(1, 2)
    assert torch.equal(_call(step, fast, t, p, out=strided), want)


def test_out_with_autograd_raises(backend):
    backend("triton")
    x, d = randn(2, 5, requires_grad=True), randn(2, 5)
    with pytest.raises(RuntimeError, match=r"out= does not support autograd"):
        fast.euler_step(x, d, 1.0, 0.5, out=torch.empty(2, 5, device=DEVICE))


@pytest.mark.parametrize("step", STEPS)
def test_reference_backend_is_default_on_cpu(step):
    t = _as64(_tensors(step, (2, 9)))
    p = _params(step, 2, "float")
    assert torch.equal(_call(step, fast, t, p), _call(step, ref, t, p))


def test_torch_compile_matches_eager(backend):
    backend("triton")
    d = randn(3, 6, 7)
    fn = lambda a: fast.cm_step(a, 0.8, seed=11, offset=3) * 2 + 1  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    assert torch.equal(compiled(d), fn(d))


# ---- in-kernel noise -------------------------------------------------------------------------


def _noise(shape, **kwargs):
    """z itself: trigflow_step(0, π/2, σd=1) = sin(π/2)·z = z exactly."""
    return fast.trigflow_step(torch.zeros(shape, device=DEVICE), math.pi / 2, sigma_data=1.0, **kwargs)


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_noise_is_deterministic_and_offset_dependent(backend, name):
    backend(name)
    a = _noise((3, 2500), seed=7, offset=0)
    assert torch.equal(a, _noise((3, 2500), seed=7, offset=0))
    assert not torch.equal(a, _noise((3, 2500), seed=8, offset=0))
    assert (a != _noise((3, 2500), seed=7, offset=a.numel())).float().mean() > 0.99
    torch.manual_seed(3)
    b = _noise((3, 2500))
    torch.manual_seed(3)
    assert torch.equal(b, _noise((3, 2500)))
    gen = torch.Generator().manual_seed(4)
    c = _noise((3, 2500), generator=gen)
    assert torch.equal(c, _noise((3, 2500), generator=torch.Generator().manual_seed(4)))


def test_noise_counter_is_offset_plus_index(backend):
    backend("triton")
    a = _noise((2, 3000), seed=21, offset=100).flatten()
    b = _noise((2, 3000), seed=21, offset=100 + 1234).flatten()
    assert torch.equal(a[1234:], b[:-1234])


def test_noise_statistics(backend):
    backend("triton")
    batch, per_sample = 8, 6000  # 6000: blocks of 2048 with a ragged tail
    z = _noise((batch, per_sample), seed=12345).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # Gaussian kurtosis
    centered = z - z.mean(1, keepdim=True)
    corr = (centered @ centered.T) / (centered.norm(dim=1)[:, None] * centered.norm(dim=1)[None, :])
    off_diagonal = corr[~torch.eye(batch, dtype=torch.bool, device=corr.device)]
    assert off_diagonal.abs().max() < 5 / math.sqrt(per_sample)
    blocks = z.flatten()[: (n // 2048) * 2048].reshape(-1, 2048)
    block_corr = torch.corrcoef(blocks)
    assert block_corr[~torch.eye(len(blocks), dtype=torch.bool, device=z.device)].abs().max() < 5 / math.sqrt(2048)
    assert torch.unique(z.flatten()).numel() > 0.999 * n


def test_stochastic_steps_scale_noise(backend):
    backend("triton")
    d = randn(4, 4000)
    z = (fast.cm_step(d, 1.5, seed=3) - d).double() / math.sqrt(1.5**2 - 0.002**2)
    assert abs(z.std().item() - 1) < 5 * math.sqrt(2 / z.numel())
    t = (fast.trigflow_step(d, 0.9, sigma_data=0.5, seed=3) - math.cos(0.9) * d).double() / (0.5 * math.sin(0.9))
    assert abs(t.std().item() - 1) < 5 * math.sqrt(2 / t.numel())
    assert torch.equal(fast.cm_step(d, 0.002, sigma_min=0.002), d)
    assert torch.equal(fast.trigflow_step(d, 0.0), d)


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: fast.euler_step(torch.randn(2, 3), torch.randn(2, 4), 1.0, 0.5),
            ValueError,
            r"euler_step: denoised has shape \(2, 4\) but x has shape \(2, 3\)",
        ),
        (
            lambda: fast.euler_step(torch.randn(2, 3), torch.randn(2, 3).half(), 1.0, 0.5),
            TypeError,
            r"denoised has dtype torch.float16 but x has dtype torch.float32",
        ),
        (
            lambda: fast.euler_step(torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32), 1.0, 0.5),
            TypeError,
            r"x has dtype torch.int32; supported: float32, bfloat16, float16, float64",
        ),
        (
            lambda: fast.euler_step(torch.randn(2, 3), torch.randn(2, 3), 0.0, 0.5),
            ValueError,
            r"euler_step: sigma=0.0 is not supported; expected > 0",
        ),
        (
            lambda: fast.euler_step(torch.randn(2, 3), torch.randn(2, 3), torch.ones(3), 0.5),
            ValueError,
            r"sigma has shape \(3,\); expected a scalar or 2 per-sample values",
        ),
        (
            lambda: fast.heun_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, -0.1),
            ValueError,
            r"heun_step: sigma_next=-0.1 is not supported; expected >= 0",
        ),
        (
            lambda: fast.dpmpp_2m_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5, old_denoised=torch.randn(2, 3)),
            ValueError,
            r"old_denoised and sigma_prev go together",
        ),
        (
            lambda: fast.dpmpp_2m_step(
                torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5, old_denoised=torch.randn(2, 3), sigma_prev=1.0
            ),
            ValueError,
            r"sigma_prev=1.0 equals sigma",
        ),
        (
            lambda: fast.ddim_step(torch.randn(2, 3), torch.randn(2, 3), 0.3, 0.6, eta=-1.0),
            ValueError,
            r"ddim_step: eta=-1.0 is not supported; expected >= 0",
        ),
        (
            lambda: fast.ddim_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.6),
            ValueError,
            r"alpha_bar=1.0 is not supported; expected > 0 and < 1",
        ),
        (
            lambda: fast.cm_step(torch.randn(2, 3), 0.001, sigma_min=0.002),
            ValueError,
            r"cm_step: sigma_next=0.001 is not supported; expected >= sigma_min=0.002",
        ),
        (
            lambda: fast.cm_step(torch.randn(2, 3), 1.0, noise=torch.randn(2, 4)),
            ValueError,
            r"noise has shape \(2, 4\) but denoised has shape \(2, 3\)",
        ),
        (
            lambda: fast.cm_step(torch.randn(2, 3), 1.0, seed=-1),
            ValueError,
            r"seed=-1 is not supported; expected an int in \[0, 2\*\*63\) or None",
        ),
        (
            lambda: fast.cm_step(torch.randn(2, 3), 1.0, seed=1, generator=torch.Generator()),
            ValueError,
            r"pass seed or generator, not both",
        ),
        (
            lambda: fast.trigflow_step(torch.randn(2, 3), 1.0, generator=3),
            TypeError,
            r"generator must be a torch.Generator or None, got int",
        ),
        (
            lambda: fast.trigflow_step(torch.randn(2, 3), 1.0, offset=-5),
            ValueError,
            r"offset=-5 is not supported; expected an int >= 0",
        ),
        (lambda: fast.trigflow_step(torch.randn(2, 3), "1.0"), TypeError, r"t_next must be a float, a 0-d tensor"),
        (
            lambda: fast.cfg(torch.randn(2, 3), torch.randn(2, 3), 3.0, guidance_rescale=-0.5),
            ValueError,
            r"cfg: guidance_rescale=-0.5 is not supported; expected >= 0",
        ),
        (
            lambda: fast.cfg(torch.randn(2, 3), torch.randn(2, 3), 3.0, out=torch.empty(2, 3, dtype=torch.float64)),
            TypeError,
            r"out has dtype torch.float64 but eps_cond has dtype torch.float32",
        ),
        (
            lambda: fast.euler_step(torch.randn(()), torch.randn(()), 1.0, 0.5),
            ValueError,
            r"x must have at least 1 dimension\(s\), got shape \(\)",
        ),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
