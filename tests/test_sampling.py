"""Sampling loops on a toy problem with a known answer: Gaussian data x0 ~ N(μ, s²·I), for which the
EDM denoiser, the probability-flow ODE and the consistency function are all closed-form."""

import math
import statistics

import pytest
import torch

from fastcm import sampling, steps
from helpers import DEVICE, assert_close, poisoned_empty

MU, S = 0.3, 0.5  # data mean and std per dimension
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002


def exact_denoiser(x, sigma):
    """E[x0 | x0 + σ·n = x] for x0 ~ N(μ, s²)."""
    sigma = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_consistency(x, sigma):
    """The probability-flow ODE map from σ to σmin (the consistency function with boundary σmin)."""
    sigma = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return MU + torch.sqrt((S**2 + SIGMA_MIN**2) / (S**2 + sigma**2)) * (x - MU)


def exact_ode_end(x_start, sigma_start):
    """The ODE solution at σ = 0 from x_start at σ_start: the gain every solver approximates."""
    return MU + S / math.sqrt(S**2 + sigma_start**2) * (x_start - MU)


def start_noise(batch, dims=2, sigma=SIGMA_MAX, dtype=torch.float64):
    """Exact marginal at σ: N(μ, s² + σ²)."""
    return MU + math.sqrt(S**2 + sigma**2) * torch.randn(batch, dims, dtype=dtype, device=DEVICE)


# ---- schedules --------------------------------------------------------------------------------


def test_karras_sigmas_match_the_formula():
    got = sampling.karras_sigmas(5, sigma_min=0.002, sigma_max=80.0, rho=7.0, append_zero=True)
    ramp = [i / 4 for i in range(5)]
    want = [(80.0 ** (1 / 7) + r * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7 for r in ramp] + [0.0]
    assert got.tolist() == pytest.approx(want, rel=1e-13)
    assert sampling.karras_sigmas(3, append_zero=False).tolist() == pytest.approx(
        want[:1] + [(80.0 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7, 0.002], rel=1e-13
    )


def test_trigflow_times():
    t_max = math.atan(80.0 / 0.5)
    assert sampling.trigflow_times(1).tolist() == pytest.approx([t_max, 0.0])
    assert sampling.trigflow_times(2).tolist() == pytest.approx([t_max, 1.1, 0.0])
    assert sampling.trigflow_times(3, intermediate=[1.3, 0.8]).tolist() == pytest.approx([t_max, 1.3, 0.8, 0.0])
    assert sampling.trigflow_times(4, t_max=1.2).tolist() == pytest.approx([1.2, 0.9, 0.6, 0.3, 0.0])


# ---- ODE samplers converge to the exact answer -------------------------------------------------


def _gain_error(sampler, n):
    x = start_noise(512)
    out = sampler(exact_denoiser, x, sampling.karras_sigmas(n))
    exact = exact_ode_end(x, SIGMA_MAX)
    return ((out - exact).norm() / (exact - MU).norm()).item(), out


@pytest.mark.parametrize(
    "sampler, order", [(sampling.sample_euler, 1), (sampling.sample_heun, 2), (sampling.sample_dpmpp_2m, 2)]
)
def test_ode_samplers_converge_with_steps(sampler, order):
    """Error against the exact ODE solution shrinks by ~2^order per doubling of the steps."""
    errors = [_gain_error(sampler, n)[0] for n in (16, 32, 64)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(r > 0.8 * 2**order for r in ratios), (errors, ratios)
    assert errors[-1] < (0.05 if order == 1 else 5e-3), errors


@pytest.mark.parametrize("sampler", [sampling.sample_heun, sampling.sample_dpmpp_2m])
def test_ode_samplers_reproduce_data_moments(sampler):
    torch.manual_seed(1)
    x = start_noise(20000, dims=1)
    out = sampler(exact_denoiser, x, sampling.karras_sigmas(40, append_zero=True))
    n = out.numel()
    assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(out.var().item() / S**2 - 1) < 5 * math.sqrt(2 / n)


# ---- CM / TrigFlow sampling with the exact consistency function --------------------------------


@pytest.mark.parametrize(
    "sigmas", [[SIGMA_MAX, SIGMA_MIN], [SIGMA_MAX, 1.0, SIGMA_MIN], [SIGMA_MAX, 5.0, 0.8, 0.2, SIGMA_MIN]]
)
def test_cm_sampling_reproduces_data_moments(sigmas):
    x = start_noise(20000, dims=1)
    out = sampling.sample_cm(exact_consistency, x, sigmas, seed=3)
    n, variance = out.numel(), S**2 + SIGMA_MIN**2
    assert abs(out.mean().item() - MU) < 5 * math.sqrt(variance / n)
    assert abs(out.var().item() / variance - 1) < 5 * math.sqrt(2 / n)


def test_trigflow_sampling_reproduces_data_moments():
    sd = 0.5

    def consistency(x, t):
        t = t.reshape(-1, 1).to(x.dtype)
        spread = torch.sqrt(torch.cos(t) ** 2 * S**2 + torch.sin(t) ** 2 * sd**2)
        return MU + S / spread * (x - torch.cos(t) * MU)

    for num_steps in (1, 2, 3):
        times = sampling.trigflow_times(num_steps)
        t0 = times[0].item()
        x = math.cos(t0) * MU + math.sqrt(math.cos(t0) ** 2 * S**2 + math.sin(t0) ** 2 * sd**2) * torch.randn(
            20000, 1, dtype=torch.float64, device=DEVICE
        )
        out = sampling.sample_trigflow(consistency, x, times, sigma_data=sd, seed=num_steps)
        n = out.numel()
        assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n)
        assert abs(out.var().item() / S**2 - 1) < 5 * math.sqrt(2 / n)


def test_cm_sampling_is_openai_iterative_sampler():
    """Hand-written loop of openai/consistency_models' stochastic_iterative_sampler (ts = [0, 22, 39] on a
    40-level grid) on the same noise; its last re-noise is to σmin, i.e. adds no noise."""
    sigmas = sampling.karras_sigmas(40, append_zero=False)[[0, 22, 39]]
    x = start_noise(4)
    got = sampling.sample_cm(exact_consistency, x, sigmas, seed=9)
    x0 = exact_consistency(x, torch.full((4,), SIGMA_MAX, dtype=torch.float64, device=DEVICE))
    x1 = steps.cm_step(x0, sigmas[1].item(), seed=9, offset=0)
    want = exact_consistency(x1, torch.full((4,), sigmas[1].item(), dtype=torch.float64, device=DEVICE))
    assert torch.equal(got, want)


def test_stochastic_samplers_are_deterministic_per_seed():
    x = start_noise(6)
    sigmas = [SIGMA_MAX, 1.0, 0.3, SIGMA_MIN]
    a = sampling.sample_cm(exact_consistency, x, sigmas, seed=4)
    assert torch.equal(a, sampling.sample_cm(exact_consistency, x, sigmas, seed=4))
    assert not torch.equal(a, sampling.sample_cm(exact_consistency, x, sigmas, seed=5))
    gen = torch.Generator().manual_seed(2)
    b = sampling.sample_cm(exact_consistency, x, sigmas, generator=gen)
    assert torch.equal(b, sampling.sample_cm(exact_consistency, x, sigmas, generator=torch.Generator().manual_seed(2)))


# ---- the loops wire the Triton kernels (interpreter on CPU) ----------------------------------


def _toy_denoiser(x, sigma):
    return exact_denoiser(x, sigma).to(x.dtype)


@pytest.mark.parametrize("sampler", [sampling.sample_euler, sampling.sample_heun, sampling.sample_dpmpp_2m])
def test_triton_loops_match_reference_loops(backend, sampler):
    """float64 through the kernels, so loop-level error accumulation cannot hide a wiring mistake."""
    x = start_noise(3, dims=40)
    sigmas = sampling.karras_sigmas(4, append_zero=True)
    backend("reference")
    want = sampler(_toy_denoiser, x, sigmas)
    backend("triton")
    with poisoned_empty():
        got = sampler(_toy_denoiser, x, sigmas)
    assert_close(got, want, torch.float64)


@pytest.mark.parametrize("stochastic", ["cm", "trigflow"])
def test_triton_stochastic_loops_use_the_kernel_noise(backend, stochastic):
    backend("triton")
    x = start_noise(3, dims=40, dtype=torch.float32)
    if stochastic == "cm":
        got = sampling.sample_cm(_toy_denoiser, x, [SIGMA_MAX, 0.5, SIGMA_MIN], seed=2)
        manual = steps.cm_step(_toy_denoiser(x, torch.full((3,), SIGMA_MAX, device=DEVICE)), 0.5, seed=2, offset=0)
        want = _toy_denoiser(manual, torch.full((3,), 0.5, device=DEVICE))
    else:
        got = sampling.sample_trigflow(_toy_denoiser, x, [1.5, 0.7, 0.0], seed=2)
        manual = steps.trigflow_step(_toy_denoiser(x, torch.full((3,), 1.5, device=DEVICE)), 0.7, seed=2, offset=0)
        want = _toy_denoiser(manual, torch.full((3,), 0.7, device=DEVICE))
    assert torch.equal(got, want)


# ---- progress, callback, capture ---------------------------------------------------------------


def test_progress_bar_and_callback(capsys):
    seen = []
    sampling.sample_euler(
        exact_denoiser,
        start_noise(2),
        sampling.karras_sigmas(5, append_zero=True),
        progress=True,
        callback=lambda info: seen.append((info["i"], info["sigma"])),
    )
    assert [i for i, _ in seen] == list(range(5))
    assert seen[0][1] == pytest.approx(SIGMA_MAX)
    assert "sample_euler [####################] 5/5" in capsys.readouterr().err


def test_capture_on_cpu_raises():
    with pytest.raises(
        ValueError,
        match=r"sample_cm: capture=True records a CUDA graph and needs CUDA tensors; "
        r"x is on cpu",
    ):
        sampling.sample_cm(exact_consistency, torch.randn(2, 3, device="cpu"), [80.0, 0.002], capture=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cm", "trigflow", "euler", "heun", "dpmpp_2m"])
def test_capture_matches_uncaptured_loop(name):
    x = start_noise(8, dims=4096, dtype=torch.float32).cuda()
    kwargs = {"seed": 17} if name in ("cm", "trigflow") else {}
    schedule = {"cm": [SIGMA_MAX, 2.0, 0.5, SIGMA_MIN], "trigflow": sampling.trigflow_times(3)}.get(
        name, sampling.karras_sigmas(6, append_zero=True)
    )
    sampler = getattr(sampling, f"sample_{name}")
    plain = sampler(_toy_denoiser, x, schedule, **kwargs)
    captured = sampler(_toy_denoiser, x, schedule, capture=True, **kwargs)
    assert torch.equal(plain, captured)


# ---- self-consistency error ---------------------------------------------------------------------


def test_self_consistency_error():
    times = [0.1, 0.5, 2.0, 10.0, 80.0]
    x0, z = (torch.randn(5, 3, dtype=torch.float64, device=DEVICE) for _ in range(2))

    def trajectory(t):  # one probability-flow trajectory of the Gaussian toy, at level t
        return MU + math.sqrt(S**2 + t**2) / S * (x0 - MU) + 0 * z

    exact = sampling.self_consistency_error(exact_consistency, trajectory, times)
    assert exact.item() < 1e-20
    per_time = sampling.self_consistency_error(lambda x, t: t.reshape(-1, 1).expand_as(x), trajectory, times)
    assert per_time.item() == pytest.approx(statistics.variance(times), rel=1e-12)
    assert sampling.self_consistency_error(exact_denoiser, trajectory, times).item() > 1e-3


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: sampling.karras_sigmas(0), ValueError, r"karras_sigmas: num=0 is not supported; expected an int >= 1"),
        (
            lambda: sampling.karras_sigmas(4, sigma_min=1.0, sigma_max=0.5),
            ValueError,
            r"sigma_min=1.0 must not exceed sigma_max=0.5",
        ),
        (
            lambda: sampling.trigflow_times(3, intermediate=[1.0]),
            ValueError,
            r"intermediate has 1 times; expected num_steps - 1 = 2",
        ),
        (
            lambda: sampling.trigflow_times(2, t_max=2.0),
            ValueError,
            r"t_max=2.0 is not supported; expected in \(0, pi/2\]",
        ),
        (
            lambda: sampling.sample_euler(exact_denoiser, torch.randn(2, 3), [80.0]),
            ValueError,
            r"sample_euler: sigmas needs at least 2 entries \(start and end\), got 1",
        ),
        (
            lambda: sampling.sample_heun(exact_denoiser, torch.randn(2, 3), torch.ones(2, 2)),
            ValueError,
            r"sample_heun: sigmas must be 1-D, got shape \(2, 2\)",
        ),
        (
            lambda: sampling.sample_cm(exact_consistency, torch.randn(2, 3), [80.0, 0.001, 0.002]),
            ValueError,
            r"intermediate sigmas \[0.001\] must be >= sigma_min=0.002",
        ),
        (
            lambda: sampling.sample_cm(
                exact_consistency, torch.randn(2, 3), [80.0, 0.002], seed=1, generator=torch.Generator()
            ),
            ValueError,
            r"pass seed or generator, not both",
        ),
        (
            lambda: sampling.sample_dpmpp_2m(exact_denoiser, [1.0, 2.0], [80.0, 0.0]),
            TypeError,
            r"sample_dpmpp_2m: x must be a tensor of shape \(B, ...\), got list",
        ),
        (
            lambda: sampling.sample_euler(exact_denoiser, torch.randn(2, 3), [80.0, float("nan")]),
            ValueError,
            r"sigmas must be finite and >= 0",
        ),
        (
            lambda: sampling.self_consistency_error(exact_consistency, lambda t: torch.randn(2, 3), [1.0]),
            ValueError,
            r"self_consistency_error: times needs at least 2 entries",
        ),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
