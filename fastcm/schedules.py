"""Training-side schedules for consistency models: the Karras σ grid, the iCT discretisation
curriculum and lognormal σ sampling, the iCT/ECT loss weighting, sCM time sampling and the sCM
tangent warm-up. Plain PyTorch and Python: these run once per step on a handful of numbers.
"""

import math

import torch

from ._checks import check_positive


def karras_sigmas(num, *, sigma_min=0.002, sigma_max=80.0, rho=7.0, append_zero=False, device=None,
                  dtype=torch.float64):
    """The Karras/EDM σ grid, descending from σmax to σmin, shape (num,) (num + 1 with append_zero,
    the final 0 a sampling loop ends at): σ_i = (σmax^{1/ρ} + i/(num−1)·(σmin^{1/ρ} − σmax^{1/ρ}))^ρ."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"fastcm.karras_sigmas: num={num!r} is not supported; expected an int >= 1")
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        check_positive("karras_sigmas", name, value)
    if not sigma_min <= sigma_max:
        raise ValueError(f"fastcm.karras_sigmas: sigma_min={sigma_min} must not exceed sigma_max={sigma_max}")
    ramp = torch.linspace(0.0, 1.0, num, dtype=torch.float64) if num > 1 else torch.zeros(1, dtype=torch.float64)
    max_root, min_root = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (max_root + ramp * (min_root - max_root)) ** rho
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


def ict_num_timesteps(step, total_steps, *, s0=10, s1=1280):
    """iCT's exponential discretisation curriculum (Song & Dhariwal 2023):
    N(k) = min(s0·2^⌊k/K'⌋, s1) + 1,  K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋, k = step, K = total_steps."""
    for name, value in (("step", step), ("total_steps", total_steps), ("s0", s0), ("s1", s1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "step" else 1):
            raise ValueError(f"fastcm.ict_num_timesteps: {name}={value!r} is not supported; expected an int "
                             f"{'>= 0' if name == 'step' else '>= 1'}")
    if s1 < s0:
        raise ValueError(f"fastcm.ict_num_timesteps: s1={s1} must be >= s0={s0}")
    stage_length = max(1, total_steps // (int(math.log2(s1 // s0)) + 1))
    return min(s0 * 2 ** (step // stage_length), s1) + 1


def ict_sample_sigmas(batch, num_timesteps, *, p_mean=-1.1, p_std=2.0, sigma_min=0.002, sigma_max=80.0,
                      rho=7.0, generator=None, device=None, dtype=torch.float32):
    """iCT lognormal σ sampling on the Karras grid σ_1 < … < σ_N (N = num_timesteps): draws
    i ∈ {1 … N−1} with p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2·P_std)) − erf((ln σ_i − P_mean)/(√2·P_std))
    and returns (sigma_lower, sigma_upper) = (σ_i, σ_{i+1}), each of shape (batch,)."""
    check_positive("ict_sample_sigmas", "p_std", p_std)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"fastcm.ict_sample_sigmas: batch={batch!r} is not supported; expected an int >= 1")
    sigmas = karras_sigmas(num_timesteps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).flip(0)
    cdf = torch.special.erf((sigmas.log() - p_mean) / (math.sqrt(2.0) * p_std))
    probabilities = cdf[1:] - cdf[:-1]
    index = torch.multinomial(probabilities, batch, replacement=True, generator=generator)
    return sigmas[index].to(device=device, dtype=dtype), sigmas[index + 1].to(device=device, dtype=dtype)


def ct_loss_weight(sigma_lower, sigma_upper):
    """iCT/ECT loss weighting λ = 1/(σ_upper − σ_lower) (iCT: 1/(σ_{i+1} − σ_i); ECT: 1/(t − r)),
    elementwise on tensors or floats."""
    return 1.0 / (sigma_upper - sigma_lower)


def scm_sample_t(batch, *, sigma_data=0.5, p_mean=-1.0, p_std=1.4, generator=None, device=None,
                 dtype=torch.float32):
    """sCM training times t = arctan(e^τ/σd), τ ~ N(P_mean, P_std²), shape (batch,), t ∈ (0, π/2)."""
    check_positive("scm_sample_t", "sigma_data", sigma_data)
    check_positive("scm_sample_t", "p_std", p_std)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"fastcm.scm_sample_t: batch={batch!r} is not supported; expected an int >= 1")
    tau = p_mean + p_std * torch.randn(batch, generator=generator, dtype=torch.float64)
    return torch.atan(torch.exp(tau) / sigma_data).to(device=device, dtype=dtype)


def tangent_warmup(step, warmup_steps=10000):
    """sCM tangent warm-up r(step) = min(1, step / warmup_steps), the r of fastcm.scm_loss."""
    check_positive("tangent_warmup", "warmup_steps", warmup_steps)
    if step < 0:
        raise ValueError(f"fastcm.tangent_warmup: step={step!r} is not supported; expected step >= 0")
    return min(1.0, step / warmup_steps)



def exponential_sigmas(num, *, sigma_min, sigma_max, append_zero=True, device=None, dtype=torch.float64):
    """σ grid uniform in log σ from σmax to σmin, shape (num,) (+ a final 0 with append_zero), as
    k-diffusion's get_sigmas_exponential."""
    return polyexponential_sigmas(num, sigma_min=sigma_min, sigma_max=sigma_max, rho=1.0, append_zero=append_zero,
                                  device=device, dtype=dtype)


def polyexponential_sigmas(num, *, sigma_min, sigma_max, rho=1.0, append_zero=True, device=None,
                           dtype=torch.float64):
    """σ_i = exp(r_i^ρ·(log σmax − log σmin) + log σmin), r_i = 1 − i/(num − 1): polynomial in log σ (ρ = 1:
    exponential), as k-diffusion's get_sigmas_polyexponential; (num,) (+ a final 0 with append_zero)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"fastcm.polyexponential_sigmas: num={num!r} is not supported; expected an int >= 2")
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        check_positive("polyexponential_sigmas", name, value)
    ramp = torch.linspace(1.0, 0.0, num, dtype=torch.float64) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


def flow_shift(t, shift):
    """The time shift of SD3-style flow-matching schedules, t ↦ s·t/(1 + (s − 1)·t) (s > 1 spends more steps
    at high noise); elementwise on floats or tensors."""
    check_positive("flow_shift", "shift", shift)
    return shift * t / (1 + (shift - 1) * t)


def flow_times(num_steps, *, shift=1.0, device=None, dtype=torch.float64):
    """Flow-matching time grid for fastcm.sampling.sample_flow_euler / sample_flow_heun: t_i = flow_shift(1 − i/n,
    shift) for i = 0 … n, from 1 (noise) to 0 (data), shape (num_steps + 1,)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"fastcm.flow_times: num_steps={num_steps!r} is not supported; expected an int >= 1")
    return flow_shift(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).to(device=device,
                                                                                          dtype=dtype)



VP_BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def vp_betas(num_train_timesteps=1000, *, schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
             max_beta=0.999, zero_terminal_snr=False, dtype=torch.float64):
    """The β_1 … β_T of a discrete VP (DDPM) process, shape (T,), as diffusers builds them:
    "linear": linspace(β_start, β_end); "scaled_linear" (Stable Diffusion): linspace(√β_start, √β_end)²;
    "cosine" (Nichol & Dhariwal 2021, diffusers' squaredcos_cap_v2): β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta),
    ᾱ(t) = cos²((t + 0.008)/1.008 · π/2). zero_terminal_snr: rescale_zero_terminal_snr on the result."""
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"fastcm.vp_betas: num_train_timesteps={num_train_timesteps!r} is not supported; expected an "
                         "int >= 2")
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        steps = num_train_timesteps
        betas = torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta)
                              for i in range(steps)], dtype=torch.float64)
    else:
        raise ValueError(f"fastcm.vp_betas: schedule={schedule!r} is not supported; expected one of "
                         f"{VP_BETA_SCHEDULES}")
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas.to(dtype)


def rescale_zero_terminal_snr(betas):
    """β rescaled so that the last step is pure noise (Lin et al. 2024, Common Diffusion Noise Schedules and Sample
    Steps are Flawed, Algorithm 1): √ᾱ is shifted so √ᾱ_T = 0 and scaled so √ᾱ_1 is unchanged. (T,) → (T,)."""
    root = torch.cumprod(1 - betas.to(torch.float64), 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alpha_bar = root ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1 - alphas).to(betas.dtype)


def vp_sigmas(alphas_cumprod):
    """The EDM noise levels of a VP process, σ = √((1 − ᾱ)/ᾱ), elementwise (k-diffusion / diffusers' Euler
    schedulers use these for ε-prediction models)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5

__all__ = ["karras_sigmas", "ict_num_timesteps", "ict_sample_sigmas", "ct_loss_weight", "scm_sample_t",
           "tangent_warmup", "exponential_sigmas", "polyexponential_sigmas", "flow_shift", "flow_times",
           "vp_betas", "rescale_zero_terminal_snr", "vp_sigmas", "VP_BETA_SCHEDULES"]
