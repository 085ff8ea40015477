"""Training-side schedules: closed forms, endpoints, distributions of the samplers, bad input."""

import math

import pytest
import torch

from fastcm import schedules
from helpers import DEVICE


def test_karras_sigmas_closed_form():
    sigmas = schedules.karras_sigmas(5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert sigmas.shape == (5,) and sigmas.dtype == torch.float64
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-12) and sigmas[-1].item() == pytest.approx(0.002, rel=1e-12)
    assert (sigmas[1:] < sigmas[:-1]).all()
    # the midpoint is the ρ-th power of the mean of the ρ-th roots of the ends
    middle = ((80.0 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert sigmas[2].item() == pytest.approx(middle, rel=1e-12)
    # ρ = 1 is a linear grid
    torch.testing.assert_close(
        schedules.karras_sigmas(3, sigma_min=1.0, sigma_max=3.0, rho=1.0),
        torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64),
    )


def test_ict_num_timesteps_curriculum():
    # K = 700 with s0 = 10, s1 = 1280: log2(128) + 1 = 8 stages of K' = 87 steps, N doubles each stage.
    assert [schedules.ict_num_timesteps(k, 700) for k in (0, 86, 87, 174, 608, 609, 699)] == [
        11,
        11,
        21,
        41,
        641,
        1281,
        1281,
    ]
    assert schedules.ict_num_timesteps(10**6, 700) == 1281
    assert schedules.ict_num_timesteps(5, 100, s0=4, s1=4) == 5


def test_ict_sample_sigmas_follow_the_discretised_lognormal():
    generator = torch.Generator().manual_seed(1)
    lower, upper = schedules.ict_sample_sigmas(200_000, 11, generator=generator, device=DEVICE)
    grid = sorted(schedules.karras_sigmas(11).tolist())
    assert lower.shape == upper.shape == (200_000,)
    assert lower.device.type == upper.device.type == torch.device(DEVICE).type
    lower, upper = lower.cpu(), upper.cpu()
    index = torch.tensor([min(range(10), key=lambda i: abs(grid[i] - s)) for s in lower[:2000].tolist()])
    torch.testing.assert_close(
        upper[:2000].double(), torch.tensor(grid, dtype=torch.float64)[index + 1], rtol=1e-6, atol=0
    )
    # P(lower = σ_i) = (Φ(ln σ_{i+1}) − Φ(ln σ_i)) / (Φ(ln σ_N) − Φ(ln σ_1)), Φ the N(−1.1, 2²) CDF
    cdf = [0.5 * (1 + math.erf((math.log(s) + 1.1) / (2.0 * math.sqrt(2)))) for s in grid]
    total = cdf[-1] - cdf[0]
    for i in range(10):
        expected = (cdf[i + 1] - cdf[i]) / total
        observed = (lower.double() - grid[i]).abs().lt(1e-6 * grid[i]).double().mean().item()
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / 200_000) + 1e-9, (i, observed)


def test_ct_loss_weight():
    assert schedules.ct_loss_weight(0.5, 0.75) == pytest.approx(4.0)
    torch.testing.assert_close(
        schedules.ct_loss_weight(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.5])), torch.tensor([0.5, 2.0])
    )


def test_scm_sample_t_is_lognormal_in_sigma():
    generator = torch.Generator().manual_seed(2)
    t = schedules.scm_sample_t(
        100_000, sigma_data=0.5, p_mean=-1.0, p_std=1.4, generator=generator, device=DEVICE, dtype=torch.float64
    )
    assert t.device.type == torch.device(DEVICE).type
    assert ((t > 0) & (t < math.pi / 2)).all()
    log_sigma = torch.log(0.5 * torch.tan(t))  # τ = ln(σd·tan t)
    assert abs(log_sigma.mean().item() + 1.0) < 4 * 1.4 / math.sqrt(100_000)
    assert abs(log_sigma.std().item() - 1.4) < 0.02


def test_tangent_warmup():
    assert [schedules.tangent_warmup(s, 1000) for s in (0, 250, 1000, 5000)] == [0.0, 0.25, 1.0, 1.0]


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: schedules.karras_sigmas(0), ["num=0", ">= 1"]),
        (lambda: schedules.karras_sigmas(5, rho=-7.0), ["rho=-7.0", "positive"]),
        (lambda: schedules.karras_sigmas(5, sigma_min=90.0), ["sigma_min=90.0", "must not exceed sigma_max=80.0"]),
        (lambda: schedules.ict_num_timesteps(-1, 100), ["step=-1", ">= 0"]),
        (lambda: schedules.ict_num_timesteps(1, 0), ["total_steps=0", ">= 1"]),
        (lambda: schedules.ict_num_timesteps(1, 10, s0=20, s1=10), ["s1=10", "s0=20"]),
        (lambda: schedules.ict_sample_sigmas(0, 10), ["batch=0", ">= 1"]),
        (lambda: schedules.ict_sample_sigmas(4, 10, p_std=0.0), ["p_std=0.0", "positive"]),
        (lambda: schedules.scm_sample_t(4, sigma_data=-0.5), ["sigma_data=-0.5", "positive"]),
        (lambda: schedules.tangent_warmup(10, 0), ["warmup_steps=0", "positive"]),
        (lambda: schedules.tangent_warmup(-1), ["step=-1", ">= 0"]),
    ],
)
def test_bad_input(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
