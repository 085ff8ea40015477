"""fastcm.vp_steps (LCM, TCD, DDPM ancestral): the float64 reference against closed forms and diffusers' own
schedulers, and the fused steps against the reference."""

import pytest
import torch

from fastcm import steps
from fastcm import vp_steps as fast
from fastcm.reference import vp_steps as ref
from helpers import DEVICE, FAST_DTYPES, assert_close, poisoned_empty, randn, to64

# diffusers is a test extra (its schedulers are the oracle); a machine without it skips this file.
diffusers = pytest.importorskip("diffusers")
randn_tensor = pytest.importorskip("diffusers.utils.torch_utils").randn_tensor

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEPS = ["lcm", "tcd", "ddpm"]
RANGES = {
    "alpha_bar": (0.1, 0.3),
    "alpha_bar_next": (0.4, 0.6),
    "alpha_bar_s": (0.7, 0.9),
    "c_skip": (0.0, 0.2),
    "c_out": (0.8, 1.0),
}
PARAMS = {
    "lcm": ("alpha_bar", "alpha_bar_next", "c_skip", "c_out"),
    "tcd": ("alpha_bar", "alpha_bar_s", "alpha_bar_next"),
    "ddpm": ("alpha_bar", "alpha_bar_next"),
}


def _call(step, mod, x, m, z, p, prediction_type="epsilon", **extra):
    common = dict(prediction_type=prediction_type, noise=z, **extra)
    if step == "lcm":
        return mod.lcm_step(x, m, p["alpha_bar"], p["alpha_bar_next"], c_skip=p["c_skip"], c_out=p["c_out"], **common)
    if step == "tcd":
        return mod.tcd_step(x, m, p["alpha_bar"], p["alpha_bar_s"], p["alpha_bar_next"], **common)
    return mod.ddpm_step(x, m, p["alpha_bar"], p["alpha_bar_next"], **common)


def _params(step, batch, kind, dtype=torch.float32, requires_grad=False):
    out = {}
    for name in PARAMS[step]:
        low, high = RANGES[name]
        if kind == "float":
            out[name] = (low + high) / 2
            continue
        values = (torch.rand(batch, dtype=torch.float64) * (high - low) + low).to(DEVICE, dtype)
        out[name] = (values[-1] if kind == "0d" else values).requires_grad_(requires_grad)
    return out


def test_ddpm_posterior_is_ddim_with_eta_one():
    """The exact posterior mean and variance equal DDIM's η = 1 update (Song et al. 2021), a closed-form identity."""
    x, eps, z = (torch.randn(2, 9, dtype=torch.float64) for _ in range(3))
    got = ref.ddpm_step(x, eps, 0.3, 0.55, noise=z)
    torch.testing.assert_close(got, steps.ddim_step(x, eps, 0.3, 0.55, eta=1.0, noise=z), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("name", ["LCMScheduler", "TCDScheduler", "DDPMScheduler"])
def test_reference_matches_diffusers_step(name, prediction_type):
    """diffusers' scheduler stepped on float64 tensors, its noise drawn from a generator and passed to ours."""
    config = dict(SD_CONFIG, prediction_type=prediction_type)
    if name == "DDPMScheduler":
        config["clip_sample"] = False
    scheduler = getattr(diffusers, name)(**config)
    scheduler.set_timesteps(4)
    sample = torch.randn(2, 3, 4, dtype=torch.float64)
    for i, t in enumerate(scheduler.timesteps[:-1]):
        output = 0.5 * sample + 0.1
        noise = randn_tensor(sample.shape, generator=torch.Generator().manual_seed(i), dtype=sample.dtype)
        kwargs = {"eta": 0.4} if name == "TCDScheduler" else {}
        want = scheduler.step(output, t, sample, generator=torch.Generator().manual_seed(i), **kwargs).prev_sample
        t_next = scheduler.timesteps[i + 1]
        ab, ab_next = scheduler.alphas_cumprod[t].item(), scheduler.alphas_cumprod[t_next].item()
        if name == "LCMScheduler":
            c_skip, c_out = (c.item() for c in scheduler.get_scalings_for_boundary_condition_discrete(t))
            got = ref.lcm_step(
                sample, output, ab, ab_next, c_skip=c_skip, c_out=c_out, prediction_type=prediction_type, noise=noise
            )
        elif name == "TCDScheduler":
            ab_s = scheduler.alphas_cumprod[int((1 - 0.4) * t_next)].item()
            got = ref.tcd_step(sample, output, ab, ab_s, ab_next, prediction_type=prediction_type, noise=noise)
        else:
            ab_next = scheduler.alphas_cumprod[scheduler.previous_timestep(t)].item()
            got = ref.ddpm_step(sample, output, ab, ab_next, prediction_type=prediction_type, noise=noise)
        # diffusers keeps alphas_cumprod in float32: the coefficients agree to float32 rounding
        assert_close(got, want, torch.float32, name=f"step {i}")
        sample = want


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_forward_matches_reference(backend, step, prediction_type, dtype):
    backend("triton")
    x, m, z = (randn(3, 5, 7, dtype=dtype) for _ in range(3))
    p = _params(step, 3, "b")
    with poisoned_empty():
        out = _call(step, fast, x, m, z, p, prediction_type)
    assert out.dtype == dtype
    assert_close(
        out, _call(step, ref, to64(x), to64(m), to64(z), {k: to64(v) for k, v in p.items()}, prediction_type), dtype
    )


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("kind", ["float", "0d"])
def test_parameter_kinds_and_in_kernel_noise(backend, step, kind):
    backend("triton")
    x, m = randn(2, 40), randn(2, 40)
    p = _params(step, 2, kind)
    a = _call(step, fast, x, m, None, p, seed=4)
    assert torch.equal(a, _call(step, fast, x, m, None, p, seed=4))
    assert not torch.equal(a, _call(step, fast, x, m, None, p, seed=5))
    noiseless = _call(step, fast, x, m, torch.zeros_like(x), p)
    scale = _call(step, fast, torch.zeros_like(x), torch.zeros_like(m), torch.ones_like(x), p)
    z = (a - noiseless) / scale  # the kernel's own z, recovered from the linear update
    assert z.abs().max() < 7 and z.std() > 0.5


@pytest.mark.parametrize("step", STEPS)
def test_gradients_and_tangents_match_reference(backend, step):
    backend("triton")
    x, m, z = (randn(3, 29, dtype=torch.float64, requires_grad=True) for _ in range(3))
    p = _params(step, 3, "b", dtype=torch.float64, requires_grad=True)
    inputs = (x, m, z) + tuple(p.values())
    grad_out = randn(3, 29, dtype=torch.float64)
    names = list(p)
    fn = lambda mod: lambda a, b, c, *q: _call(step, mod, a, b, c, dict(zip(names, q)), "v_prediction")  # noqa
    got = torch.autograd.grad(fn(fast)(*inputs), inputs, grad_out)
    want = torch.autograd.grad(fn(ref)(*inputs), inputs, grad_out)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float64)
    tangents = tuple(torch.randn_like(a) for a in inputs)
    detached = tuple(a.detach() for a in inputs)
    with torch.no_grad():
        _, got_t = torch.func.jvp(fn(fast), detached, tangents)
    _, want_t = torch.func.jvp(fn(ref), detached, tangents)
    assert_close(got_t, want_t, torch.float64, name="tangent")


def test_out_in_place(backend):
    backend("triton")
    x, m, z = (randn(2, 33) for _ in range(3))
    want = fast.tcd_step(x, m, 0.2, 0.8, 0.5, noise=z)
    target = x.clone()
    assert fast.tcd_step(target, m, 0.2, 0.8, 0.5, noise=z, out=target) is target
    assert torch.equal(target, want)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: fast.lcm_step(torch.randn(2, 3), torch.randn(2, 3), 1.5, 0.5, c_skip=0.0, c_out=1.0),
            ValueError,
            r"lcm_step: alpha_bar=1.5 is not supported; expected a cumulative alpha in \(0, 1\]",
        ),
        (
            lambda: fast.ddpm_step(torch.randn(2, 3), torch.randn(2, 3), 0.2, 0.5, prediction_type="flow"),
            ValueError,
            r"ddpm_step: prediction_type='flow' is not supported",
        ),
        (
            lambda: fast.tcd_step(torch.randn(2, 3), torch.randn(2, 4), 0.2, 0.8, 0.5),
            ValueError,
            r"model_output has shape \(2, 4\) but x has shape \(2, 3\)",
        ),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "name, loop, options",
    [
        ("LCMScheduler", "sample_lcm", {}),
        ("LCMScheduler", "sample_lcm", {"prediction_type": "v_prediction"}),
        ("TCDScheduler", "sample_tcd", {"gamma": 0.3}),
        ("TCDScheduler", "sample_tcd", {"gamma": 0.0}),
        ("DDPMScheduler", "sample_ddpm", {"prediction_type": "sample"}),
    ],
)
@pytest.mark.parametrize("name_backend", ["reference", "triton"])
def test_loops_match_diffusers_loops(backend, name, loop, options, name_backend):
    """fastcm's loop and diffusers' scheduler loop on the same model and the same noise (drawn from equal
    generators with diffusers' randn_tensor, in the order diffusers draws it)."""
    from fastcm import sampling

    backend(name_backend)
    prediction_type = options.get("prediction_type", "epsilon")
    config = dict(SD_CONFIG, prediction_type=prediction_type)
    if name == "DDPMScheduler":
        config["clip_sample"] = False
    scheduler = getattr(diffusers, name)(**config)
    scheduler.set_timesteps(4 if name != "DDPMScheduler" else 5)

    def model(x, t, shift):
        return (0.5 * x + shift * torch.cos(t.reshape(-1, 1) / 300)).to(x.dtype)

    x = torch.randn(2, 24, device=DEVICE)
    generator = torch.Generator().manual_seed(1)
    want = x.clone()
    kwargs = {"eta": options["gamma"]} if name == "TCDScheduler" else {}
    for t in scheduler.timesteps:
        output = model(want, torch.full((2,), float(t), device=DEVICE), 0.1)
        want = scheduler.step(output, t, want, generator=generator, **kwargs).prev_sample
    mine = torch.Generator().manual_seed(1)
    seen = []
    got = getattr(sampling, loop)(
        model,
        x,
        scheduler.alphas_cumprod,
        scheduler.timesteps,
        {"shift": 0.1},
        seen.append,
        **options,
        # diffusers' own draw: on the CPU generator, then moved to the sample's device
        noise_sampler=lambda t, t_next: randn_tensor(x.shape, generator=mine, device=x.device, dtype=x.dtype),
    )
    assert_close(got, want, torch.float32)
    assert [s["i"] for s in seen] == list(range(len(scheduler.timesteps)))
    assert torch.equal(seen[0]["x"], x)
